"""The `dagserve` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.tools.ports import free_port, wait_ready
from engine.transport.client import Client
from tests.serving import PIPELINES, ROOT, wait_until

CASES = ROOT / "tests" / "dag" / "cases"
QUICKSTART = ROOT / "examples" / "quickstart" / "pipeline.yaml"


def dagserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        check=False,
    )


def test_validate_ok():
    result = dagserve("validate", str(PIPELINES / "calc.yaml"), str(QUICKSTART))
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout
    assert "calc version 1" in result.stdout


def test_validate_prints_every_error_of_every_file_and_exits_1():
    files = [
        CASES / "e_cycle.yaml",
        CASES / "e_unknown_plugin.yaml",
        CASES / "e_dtype_mismatch.yaml",
    ]
    result = dagserve("validate", *map(str, files))
    assert result.returncode == 1
    for path in files:
        assert f"{path}:" in result.stderr  # FILE:LINE for each file
    assert "cycle:" in result.stderr
    assert "3 error(s) in 3 file(s)" in result.stderr


def test_validate_warns_about_unused_inputs():
    result = dagserve("validate", str(CASES / "w_unused_input.yaml"))
    assert result.returncode == 0
    assert "warning" in result.stderr


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_graph_draws_the_dag(tmp_path: Path, suffix: str):
    out = tmp_path / f"calc{suffix}"
    result = dagserve("graph", str(PIPELINES / "calc.yaml"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    if suffix == ".svg":
        text = data.decode()
        assert "<svg" in text
        assert "tests.plugins:Scale" in text  # nodes are labelled with their plugin
        assert "stroke-dasharray" in text  # the optional branch is drawn dashed
    else:
        assert data.startswith(b"\x89PNG")


def test_graph_refuses_an_unknown_format(tmp_path: Path):
    result = dagserve("graph", str(PIPELINES / "calc.yaml"), "-o", str(tmp_path / "x.gif"))
    assert result.returncode == 2
    assert ".gif" in result.stderr


@pytest.mark.e2e
def test_serve_then_infer_then_sigterm(tmp_path: Path):
    server = ServerProcess(str(PIPELINES / "calc.yaml"))
    try:
        result = dagserve(
            "infer", "--pipeline", "calc", "--input", "x=[1, 2, 3]", "--port", str(server.port),
            "--json",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert '"doubled": [\n      [\n        2.0' in result.stdout
        bad = dagserve(
            "infer", "--pipeline", "calc", "--input", "x=[1, 2]", "--port", str(server.port)
        )
        assert bad.returncode == 1
        assert "InvalidRequest" in bad.stderr
        server.process.send_signal(signal.SIGTERM)
        output = server.wait()
    finally:
        server.kill()
    assert server.process.returncode == 0, output
    assert "dagserve stopped" in output


def test_serve_refuses_an_invalid_pipeline():
    result = dagserve("serve", str(CASES / "e_cycle.yaml"), "--port", "0")
    assert result.returncode == 1
    assert "cycle:" in result.stderr


def test_new_plugin_skeleton_passes_its_own_test(tmp_path: Path):
    result = dagserve("new-plugin", "my_scorer", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "my_scorer"
    assert sorted(p.name for p in folder.iterdir()) == [
        "my_scorer.py", "pipeline.yaml", "test_my_scorer.py",
    ]  # fmt: skip
    # as a plugin author runs it: from their own folder, without our pytest configuration
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "4 passed" in run.stdout
    again = dagserve("new-plugin", "my_scorer", "--dir", str(tmp_path))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert dagserve("new-plugin", "Bad-Name", "--dir", str(tmp_path)).returncode == 2


class ServerProcess:
    """``dagserve serve ARGS`` in a subprocess, ready when constructed; its output is read as
    it comes, so a test can wait for a log line, and its metrics port for a gauge."""

    def __init__(self, *args: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "engine.cli", "serve", *args, "--port", str(self.port),
             "--metrics-port", str(self.metrics_port)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            wait_ready(self.port, self.process, timeout_s=60, output=lambda: self.output)
        except BaseException:
            self.kill()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def inflight(self, pipeline: str) -> float:
        """``dagserve_inflight_requests`` of ``pipeline``, read from the metrics port."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "dagserve_inflight_requests" and sample.labels == {
                    "pipeline": pipeline
                }:
                    return sample.value
        return 0.0  # no request of the pipeline yet

    def wait(self, timeout_s: float = 30) -> str:
        """Wait for the process to exit; its whole output."""
        self.process.wait(timeout_s)
        self._reader.join(10)
        return self.output

    def kill(self) -> None:
        """Kill the process if it still runs; close its pipe (whatever happened)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.mark.e2e
def test_sigterm_lets_requests_in_flight_finish():
    import concurrent.futures

    import numpy as np

    server = ServerProcess(str(PIPELINES / "workers.yaml"))
    try:
        x = np.ones((1, 2), np.float32)

        def one():
            with Client("127.0.0.1", server.port) as client:
                return client.infer("workers", {"x": x}, outputs=["a"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(one) for _ in range(4)]
            # all four are in the server (slow_a takes them one at a time, 0.3 s each)
            wait_until(lambda: server.inflight("workers") == 4, "4 requests in flight")
            server.process.send_signal(signal.SIGTERM)
            results = [c.result(timeout=30) for c in calls]
        assert all(r.outputs["a"].shape == (1, 2) for r in results)
        output = server.wait()
    finally:
        server.kill()
    assert server.process.returncode == 0, output
    assert "draining" in output


@pytest.mark.e2e
def test_a_second_sigterm_exits_at_once_without_draining():
    import numpy as np

    server = ServerProcess(str(PIPELINES / "slow.yaml"))
    try:

        def in_flight() -> None:
            with (
                Client("127.0.0.1", server.port, timeout_s=30) as client,
                contextlib.suppress(Exception),
            ):
                client.infer("slow", {"x": np.ones((1, 2), np.float32)})

        caller = threading.Thread(target=in_flight)
        caller.start()
        wait_until(lambda: server.inflight("slow") == 1, "the 5 s request in flight")
        server.process.send_signal(signal.SIGTERM)
        # draining: it would wait up to drain_timeout_s for the request
        wait_until(lambda: "draining" in server.output, "the server says it is draining")
        assert server.process.poll() is None
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        output = server.wait()
        stopped_in = time.monotonic() - started
        caller.join(30)
    finally:
        server.kill()
    assert server.process.returncode == 1, output
    assert "second SIGTERM" in output
    assert stopped_in < 3  # not the 5 s the request had left
