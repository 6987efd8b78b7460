"""The `dagserve` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.client import Client
from tests.serving import PIPELINES, ROOT

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.e2e
def test_serve_then_infer_then_sigterm(tmp_path: Path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "serve",
            str(PIPELINES / "calc.yaml"),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        with Client("127.0.0.1", port, timeout_s=5) as client:
            while True:
                try:
                    if client.health().ready:
                        break
                except ConnectionError:
                    pass
                assert server.poll() is None, server.stdout.read() if server.stdout else ""
                assert time.monotonic() < deadline, "server not ready in 60 s"
                time.sleep(0.1)
        result = dagserve(
            "infer", "--pipeline", "calc", "--input", "x=[1, 2, 3]", "--port", str(port), "--json"
        )
        assert result.returncode == 0, result.stderr
        assert '"doubled": [\n      [\n        2.0' in result.stdout
        bad = dagserve("infer", "--pipeline", "calc", "--input", "x=[1, 2]", "--port", str(port))
        assert bad.returncode == 1
        assert "InvalidRequest" in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
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
    assert "3 passed" in run.stdout
    again = dagserve("new-plugin", "my_scorer", "--dir", str(tmp_path))
    assert again.returncode == 2
    assert "already exists" in again.stderr
    assert dagserve("new-plugin", "Bad-Name", "--dir", str(tmp_path)).returncode == 2


def _start_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", *args, "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    with Client("127.0.0.1", port, timeout_s=5) as client:
        while True:
            try:
                if client.health().ready:
                    return server, port
            except ConnectionError:
                pass
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            assert time.monotonic() < deadline, "server not ready in 60 s"
            time.sleep(0.1)


@pytest.mark.e2e
def test_sigterm_lets_requests_in_flight_finish():
    import concurrent.futures

    import numpy as np

    server, port = _start_server(str(PIPELINES / "workers.yaml"))
    try:
        x = np.ones((1, 2), np.float32)

        def one():
            with Client("127.0.0.1", port) as client:
                return client.infer("workers", {"x": x}, outputs=["a"])

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(one) for _ in range(4)]
            time.sleep(0.1)  # the requests are in flight (each takes 0.3 s in the worker)
            server.send_signal(signal.SIGTERM)
            results = [c.result(timeout=30) for c in calls]
        assert all(r.outputs["a"].shape == (1, 2) for r in results)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0, output
    assert "draining" in output


@pytest.mark.e2e
def test_a_second_sigterm_exits_at_once_without_draining():
    import threading

    import numpy as np

    server, port = _start_server(str(PIPELINES / "slow.yaml"))
    try:

        def in_flight() -> None:
            with Client("127.0.0.1", port, timeout_s=30) as client, contextlib.suppress(Exception):
                client.infer("slow", {"x": np.ones((1, 2), np.float32)})

        caller = threading.Thread(target=in_flight)
        caller.start()
        time.sleep(0.3)  # the 5 s request is in flight
        server.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # draining: it would wait up to drain_timeout_s for the request
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        output, _ = server.communicate(timeout=30)
        stopped_in = time.monotonic() - started
        caller.join(30)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 1, output
    assert "second SIGTERM" in output
    assert stopped_in < 3  # not the 5 s the request had left
