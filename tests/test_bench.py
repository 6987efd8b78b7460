"""`dagserve bench` against a small pipeline: the counts must add up."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from engine.bench import BenchSpec, generated_samples, run_bench, samples_from_file
from engine.client import Client
from tests.serving import PIPELINES, serving
from tests.test_cli import dagserve

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    with serving([PIPELINES / "calc.yaml"]) as thread:
        yield thread


def test_closed_loop_counts_add_up(server):
    samples = [{"x": np.ones((1, 3), np.float32)}, {"x": -np.ones((1, 3), np.float32)}]
    spec = BenchSpec("127.0.0.1", server.port, "calc", samples, concurrency=4,
                     duration_s=1.0, warmup_s=0.2)  # fmt: skip
    result = server.run(run_bench(spec))
    assert result.ok > 0
    assert result.errors["InferenceError"] > 0  # the negative sample fails the `check` node
    assert abs(result.ok - result.errors["InferenceError"]) <= 4  # they alternate
    assert result.sent == result.answered  # nothing lost: every request sent was answered
    assert result.ok + sum(result.errors.values()) <= result.answered
    assert result.items == result.ok
    assert len(result.latencies_s) == result.ok
    assert result.latency_ms(50) <= result.latency_ms(99) <= result.latency_ms(99.9)


def test_open_loop_sends_at_the_rate(server):
    samples = [{"x": np.ones((1, 3), np.float32)}]
    spec = BenchSpec("127.0.0.1", server.port, "calc", samples, concurrency=50, rate=100,
                     duration_s=2.0, warmup_s=0.2, seed=3)  # fmt: skip
    result = server.run(run_bench(spec))
    assert result.sent == result.answered
    assert 100 <= result.ok <= 320  # ~200 Poisson arrivals in the 2 s window
    assert not math.isnan(result.latency_ms(99))


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


def test_the_command_line_prints_a_table_and_writes_json(server, tmp_path):
    out = tmp_path / "bench.json"
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
    assert data["sent"] == data["answered"]
