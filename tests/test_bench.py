"""`dagserve bench` against a small pipeline: the counts must add up."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import socket
from collections import Counter

import numpy as np
import pytest

from engine.observability.metrics import STATUSES
from engine.tools.bench import BenchSpec, generated_samples, run_bench, samples_from_file
from engine.transport.client import Client
from model_plugins.specs import TensorSpec
from tests.engine.test_metrics import scrape
from tests.serving import PIPELINES, serving
from tests.test_cli import dagserve

pytestmark = pytest.mark.e2e

#: the bench's outcome (``ok`` or an error's type) -> the server's ``status`` label
STATUS = {"ok": "ok", **{kind.__name__: status for status, kind in STATUSES}}


@pytest.fixture(scope="module")
def server():
    with serving([PIPELINES / "calc.yaml"], metrics_port=0) as thread:
        yield thread


def received(server, pipeline: str = "calc") -> Counter[str]:
    """What the server's metrics say it answered for ``pipeline``, by status."""
    counts: Counter[str] = Counter()
    for (name, labels), count in scrape(server.server.metrics_port).items():
        if name == "dagserve_requests_total" and dict(labels)["pipeline"] == pipeline:
            counts[dict(labels)["status"]] += int(count)
    return counts


def assert_the_server_saw_the_same(outcomes: dict[str, int], before: Counter[str], after):
    """The bench's counts, by outcome, are the requests the server counted meanwhile."""
    served = after - before
    assert served == Counter({STATUS[outcome]: n for outcome, n in outcomes.items()})


def test_closed_loop_counts_match_the_servers_metrics(server):
    samples = [{"x": np.ones((1, 3), np.float32)}, {"x": -np.ones((1, 3), np.float32)}]
    spec = BenchSpec("127.0.0.1", server.port, "calc", samples, concurrency=4,
                     duration_s=1.0, warmup_s=0.2)  # fmt: skip
    before = received(server)
    result = server.run(run_bench(spec))
    assert_the_server_saw_the_same(result.outcomes, before, received(server))
    assert set(result.outcomes) == {"ok", "InferenceError"}  # the negative one fails `check`
    assert abs(result.outcomes["ok"] - result.outcomes["InferenceError"]) <= 4  # they alternate
    assert sum(result.outcomes.values()) == result.sent == result.answered
    # the window's counts are a part of all: the warm-up's and the drain's are left out
    assert 0 < result.ok < result.outcomes["ok"]
    assert 0 < result.errors["InferenceError"] < result.outcomes["InferenceError"]
    assert result.items == result.ok
    assert len(result.latencies_s) == result.ok
    assert result.latency_ms(50) <= result.latency_ms(99) <= result.latency_ms(99.9)


def test_open_loop_sends_at_the_rate(server):
    samples = [{"x": np.ones((1, 3), np.float32)}]
    spec = BenchSpec("127.0.0.1", server.port, "calc", samples, concurrency=50, rate=100,
                     duration_s=2.0, warmup_s=0.2, seed=3)  # fmt: skip
    before = received(server)
    result = server.run(run_bench(spec))
    assert_the_server_saw_the_same(result.outcomes, before, received(server))
    assert result.outcomes == {"ok": result.sent}
    assert 100 <= result.ok <= 320  # ~200 Poisson arrivals in the 2 s window
    assert not math.isnan(result.latency_ms(99))


def test_requests_nobody_answered_are_not_counted_as_answered():
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    samples = [{"x": np.ones((1, 3), np.float32)}]
    spec = BenchSpec("127.0.0.1", port, "calc", samples, concurrency=2, duration_s=0.2,
                     warmup_s=0.0)  # fmt: skip
    result = asyncio.run(run_bench(spec))
    assert result.sent > 0
    assert result.answered == 0
    assert result.outcomes == {"ClientConnectionError": result.sent}
    assert result.ok == 0


def test_samples_generated_from_the_declared_specs(server):
    with Client("127.0.0.1", server.port) as client:
        specs = client.describe("calc").inputs
    samples = generated_samples(specs, count=3)
    assert samples[0]["x"].shape == (1, 3)
    assert samples[0]["x"].dtype == np.float32
    assert "extra" in samples[0]
    assert "extra" not in generated_samples(specs, optional=False)[0]


def test_samples_from_files(tmp_path):
    np.savez(tmp_path / "s.npz", x=np.arange(6, dtype=np.float32).reshape(2, 3))
    rows = samples_from_file(tmp_path / "s.npz")
    assert [r["x"].tolist() for r in rows] == [[[0, 1, 2]], [[3, 4, 5]]]
    (tmp_path / "s.json").write_text(json.dumps([{"x": [1, 2, 3], "t": "hi"}]))
    row = samples_from_file(tmp_path / "s.json")[0]
    assert row["x"].shape == (1, 3)
    assert row["t"].tolist() == ["hi"]


def test_samples_from_stream_records(tmp_path):
    """A dagserve stream source file: each input one item, BYTES as base64, the rest left out;
    a line that is no record is refused with its line number."""
    specs = {
        "x": TensorSpec("float32", [3]),
        "t": TensorSpec("string", [], optional=True),
        "b": TensorSpec("bytes", [], optional=True),
    }
    lines = [
        {"id": "a", "x": [1, 2, 3], "t": "hi", "b": base64.b64encode(b"\x00\xff").decode()},
        {"id": "b", "x": [4, 5, 6]},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "\n")
    first, second = samples_from_file(path, specs)
    assert first["x"].dtype == np.float32
    assert first["x"].tolist() == [[1, 2, 3]]
    assert first["t"].tolist() == ["hi"]
    assert first["b"].tolist() == [b"\x00\xff"]
    assert sorted(second) == ["x"]
    with pytest.raises(ValueError, match="input specs"):
        samples_from_file(path, None)
    path.write_text(json.dumps(lines[0]) + "\n" + '{"id": "c", "x": "text"}\n')
    with pytest.raises(ValueError, match=r"records.jsonl:2: .*'x'"):
        samples_from_file(path, specs)


def test_the_command_line_sends_stream_records(server, tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"id": 1, "x": [1, 2, 3]}\n{"id": 2, "x": [4, 5, 6], "extra": [1, 1, 1]}\n')
    out = tmp_path / "bench.json"
    result = dagserve(
        "bench", "--pipeline", "calc", "--port", str(server.port), "--duration", "0.5",
        "--warmup", "0.1", "--concurrency", "2", "--samples", str(path), "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["ok"] > 0
    assert data["outcomes"] == {"ok": data["sent"]}


def test_the_command_line_prints_a_table_and_writes_json(server, tmp_path):
    out = tmp_path / "bench.json"
    before = received(server)
    result = dagserve(
        "bench", "--pipeline", "calc", "--port", str(server.port), "--duration", "1",
        "--warmup", "0.2", "--concurrency", "2", "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "| pipeline | load | ok | req/s | items/s | p50 ms | p95 ms | p99 ms | p99.9 ms |"
        in result.stdout
    )
    data = json.loads(out.read_text())
    assert data["ok"] > 0
    assert data["sent"] == data["answered"] == sum(data["outcomes"].values())
    assert f"answered {data['sent']}" in result.stdout
    # what the CLI counted is what the server received (its describe call is no infer)
    assert_the_server_saw_the_same(data["outcomes"], before, received(server))
