"""`dagserve stream` on a real local PyFlink mini-cluster against real dagserve servers
(tests/pipelines/stream.yaml): every valid record answered once with the answers of direct
calls, invalid ones in the dead letters with why, ordered mode, and a server restarted in the
middle of a job.  One job (a JVM, seconds to start) per test, several checks per job."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.tools.ports import free_port, wait_ready
from engine.transport.client import Client
from tests.serving import PIPELINES, ROOT, ServerThread, serving, wait_until
from tests.stream.flink import StreamJob, needs_flink

STREAM = PIPELINES / "stream.yaml"

pytestmark = [pytest.mark.e2e, pytest.mark.slow, needs_flink]


def png(width: int, height: int, rgb: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_lines(path: Path, records: list[Any]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct_inputs(record: dict[str, Any]) -> dict[str, Any]:
    inputs: dict[str, Any] = {"x": np.array([record["x"]], np.float32)}
    if "image" in record:
        inputs["image"] = np.array([base64.b64decode(record["image"])], object)
    return inputs


def stream_args(port: int, tmp_path: Path, *more: str) -> list[str]:
    return [
        "--target", f"127.0.0.1:{port}", "--pipeline", "stream",
        "--source", f"jsonl:{tmp_path / 'in.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out.jsonl'}",
        "--json", str(tmp_path / "summary.json"), *more,
    ]  # fmt: skip


@pytest.mark.timeout(300)  # a JVM and its Python workers start on a loaded machine
def test_valid_records_answered_once_as_direct_calls_and_invalid_ones_dead(tmp_path: Path):
    valid = [{"id": i, "x": [i, i + 0.5, -i], "tag": f"t{i}"} for i in range(150)]
    for record in valid[::10]:
        record["image"] = png(6 + record["id"] % 5, 5, (record["id"], 100, 200))
    invalid = [
        ("not json", "InvalidRecord", "not JSON"),
        ({"id": "missing"}, "InvalidRecord", "required input 'x' missing"),
        ({"id": "shape", "x": [1, 2]}, "InvalidRecord", "shape [2] for a float32[3] input"),
        ({"id": "b64", "x": [1, 2, 3], "image": "@@@"}, "InvalidRecord", "bad base64"),
        ({"id": "negative", "x": [-1, 2, 3]}, "InferenceError", "negative input"),
        ({"id": "nan", "x": [1, float("nan"), 3]}, "InvalidRequest", "NaN"),
        (
            {"id": "notpng", "x": [1, 2, 3], "image": base64.b64encode(b"GIF?").decode()},
            "InvalidRequest",
            "",
        ),
    ]
    lines: list[Any] = [*valid[:70], *(r for r, _, _ in invalid), "", *valid[70:]]
    write_lines(tmp_path / "in.jsonl", lines)
    with serving([STREAM]) as server:
        job = StreamJob(
            *stream_args(server.port, tmp_path, "--parallelism", "2", "--capacity", "16")
        )
        code, out, err = job.finish()
        assert code == 0, err[-3000:]
        with Client("127.0.0.1", server.port) as client:
            direct = {r["id"]: client.infer("stream", direct_inputs(r)).outputs for r in valid}
    answers = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(a["id"] for a in answers) == list(range(150)), "each valid record once"
    for answer in answers:
        record = valid[answer["id"]]
        assert answer["tag"] == record["tag"]  # other fields pass through
        assert "x" not in answer
        assert "image" not in answer
        for name, array in direct[answer["id"]].items():
            np.testing.assert_allclose(answer[name], array[0], rtol=1e-6)
        assert ("pixels" in answer) == ("image" in record)

    dead = {
        d.get("record", {}).get("id", d.get("line")): d
        for d in read_jsonl(tmp_path / "out.dead.jsonl")
    }
    assert len(dead) == len(invalid)
    for record, error_type, why in invalid:
        key = record["id"] if isinstance(record, dict) else record
        assert dead[key]["error"]["type"] == error_type, dead[key]
        assert why in dead[key]["error"]["message"], dead[key]
    assert dead["negative"]["error"]["node"] == "check"
    assert dead["shape"]["error"]["field"] == "x"
    assert dead["notpng"]["error"]["field"].startswith("inputs.data")

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["read"] == len(lines)
    assert summary["answered"] == 150
    assert summary["dead_by_type"] == {"InferenceError": 1, "InvalidRecord": 4, "InvalidRequest": 2}
    assert summary["blank"] == 1
    assert f"answered     150 -> {tmp_path / 'out.jsonl'}" in out


def requests_served(server: ServerThread) -> float:
    return float(sum(server.engine.metrics.requests.snapshot().values()))


@pytest.mark.timeout(300)  # a JVM and its Python workers start on a loaded machine
def test_ordered_mode_keeps_the_source_order_over_two_replicas(tmp_path: Path):
    # every 7th record fails: dead letters wait their turn too, answers keep their order;
    # the fields are renamed both ways (--input-map, --output-map)
    records = [{"id": i, "values": [-1 if i % 7 == 3 else i, 1, 2]} for i in range(400)]
    write_lines(tmp_path / "in.jsonl", records)
    with serving([STREAM]) as one, serving([STREAM]) as two:
        more = [
            "--target", f"127.0.0.1:{two.port}", "--ordered", "--capacity", "32",
            "--input-map", "values=x", "--output-map", "doubled=twice",
        ]  # fmt: skip
        code, _, err = StreamJob(*stream_args(one.port, tmp_path, *more)).finish()
        # the balancing client spread the records over both
        assert requests_served(one) > 0, "no record reached the first replica"
        assert requests_served(two) > 0, "no record reached the second replica"
    assert code == 0, err[-3000:]
    answers = read_jsonl(tmp_path / "out.jsonl")
    assert [a["id"] for a in answers] == [r["id"] for r in records if r["id"] % 7 != 3]
    assert sorted(answers[1]) == ["checked", "id", "twice"]
    assert answers[1]["twice"] == [2.0, 2.0, 4.0]
    dead = [d["record"]["id"] for d in read_jsonl(tmp_path / "out.dead.jsonl")]
    assert dead == [r["id"] for r in records if r["id"] % 7 == 3]


def serve(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", str(STREAM), "--port", str(port),
         "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.timeout(360)
def test_a_server_restarted_mid_job_loses_no_record(tmp_path: Path):
    total = 3000
    write_lines(tmp_path / "in.jsonl", [{"id": i, "x": [i, 1, 2]} for i in range(total)])
    port = free_port()
    server = serve(port)
    job = None
    try:
        wait_ready(port, server, timeout_s=60)
        job = StreamJob(*stream_args(port, tmp_path, "--capacity", "16", "--timeout-ms", "60000"))
        sink = tmp_path / "out.jsonl"

        def answered() -> int:
            return len(sink.read_text().splitlines()) if sink.exists() else 0

        wait_until(lambda: answered() >= 200 or job.process.poll() is not None, "200 answers", 90)
        server.send_signal(signal.SIGTERM)  # drain: answers in flight, refuses the rest
        assert server.wait(30) == 0
        at_restart = answered()
        assert at_restart < total, "the job ended before the server stopped: no restart tested"
        server = serve(port)
        wait_ready(port, server, timeout_s=60)
        code, out, err = job.finish(timeout_s=240)
    finally:
        if job is not None:
            job.stop()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert code == 0, err[-3000:]
    ids = [a["id"] for a in read_jsonl(tmp_path / "out.jsonl")]
    assert sorted(ids) == list(range(total)), f"lost or doubled: {len(ids)} answers"
    assert (tmp_path / "out.dead.jsonl").read_text() == ""
    assert json.loads((tmp_path / "summary.json").read_text())["retries"] > 0, out


def test_without_pyflink_the_command_names_the_extra(tmp_path: Path):
    # the main venv has no PyFlink (it pins other numpy, protobuf and grpcio versions)
    result = subprocess.run(
        [sys.executable, "-m", "engine.cli", "stream", "--target", "127.0.0.1:1",
         "--pipeline", "p", "--source", "jsonl:a.jsonl", "--sink", "jsonl:b.jsonl"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "pip install 'dagserve[flink]'" in result.stderr


def test_what_cannot_run_exits_before_a_job_starts(tmp_path: Path):
    write_lines(tmp_path / "in.jsonl", [{"id": 1, "x": [1, 2, 3]}])
    with serving([STREAM]) as server:
        args = stream_args(server.port, tmp_path)
        unknown = StreamJob(*[("nope" if a == "stream" else a) for a in args]).finish(60)
        no_source = StreamJob(
            *args[:4], "--source", f"jsonl:{tmp_path / 'absent.jsonl'}", *args[6:]
        ).finish(60)
        ordered = StreamJob(*args, "--ordered", "--parallelism", "2").finish(60)
        kafka = StreamJob(*args[:4], "--source", "kafka:broker/topic", *args[6:]).finish(60)
        same = StreamJob(*args, "--dead-letter", f"jsonl:{tmp_path / 'in.jsonl'}").finish(60)
        no_port = StreamJob(*args, "--target", "127.0.0.1").finish(60)
    assert unknown[0] == 1
    assert "PipelineNotFound" in unknown[2]
    assert no_source[0] == 1
    assert "absent.jsonl: no such file" in no_source[2]
    assert ordered[0] == 2
    assert "--parallelism 1" in ordered[2]
    assert kafka[0] == 2
    assert "expected jsonl:PATH" in kafka[2]
    assert no_port[0] == 2
    assert "'127.0.0.1': expected HOST:PORT" in no_port[2]
    assert same[0] == 2
    assert "three different files" in same[2]
    assert (tmp_path / "in.jsonl").read_text().startswith('{"id": 1')
    assert not (tmp_path / "out.jsonl").exists()
