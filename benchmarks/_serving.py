"""Serving dagserve (or another server) in a subprocess and loading it: what every scenario
of ``benchmarks/`` shares."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.tools.bench import BenchResult, BenchSpec, run_bench
from engine.tools.ports import wait_ready

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def dagserve_command(pipelines: Sequence[Path], port: int) -> list[str]:
    """The command line that serves ``pipelines`` on ``port``."""
    return [
        sys.executable, "-m", "engine.cli", "serve", *map(str, pipelines),
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


def _log_tail(path: Path, lines: int = 30) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _stop(process: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving(
    command: Sequence[str],
    port: int,
    *,
    ready_timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``command`` (a server on ``port``) until the block ends: ready on entry
    (``health().ready``), SIGTERM and wait on exit.  Its output goes to a log file whose tail
    is in the error when it does not start."""
    with tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False) as f:
        log = Path(f.name)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full_env.get("PYTHONPATH", "")) if p
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            list(command), cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_ready(
            port,
            process,
            host=HOST,
            timeout_s=ready_timeout_s,
            poll_s=0.2,
            output=lambda: _log_tail(log),
        )
        yield process
    finally:
        _stop(process)
        log.unlink(missing_ok=True)


def measure(
    port: int,
    pipeline: str,
    samples: Sequence[Mapping[str, Any]],
    *,
    concurrency: int,
    duration_s: float,
    warmup_s: float = 1.0,
) -> BenchResult:
    """One closed-loop window of ``run_bench`` against ``pipeline``.

    On asyncio's own loop, as ``dagserve bench`` runs it: ``run_bench`` times requests with
    ``loop.time()``, which on uvloop is libuv's cached clock, 1 ms granular (every sub-ms
    latency would read 0 or 1 ms).
    """
    spec = BenchSpec(
        HOST, port, pipeline, samples,
        concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
    )  # fmt: skip
    return asyncio.run(run_bench(spec))


def figures(result: BenchResult) -> dict[str, Any]:
    """req/s, p50 and p99 (ms) and the errors of one window."""
    summary = result.summary()
    return {
        "req/s": summary["req/s"],
        "p50 ms": summary["p50 ms"],
        "p99 ms": summary["p99 ms"],
        "errors": summary["errors"],
    }


def serve_on_one_thread(conn: Any, load: Callable[[], Any], run: Callable[[Any, Any], Any]) -> None:
    """An offline process's loop: the commands that come over ``conn`` run on one thread, as
    a worker's instance runs its calls (frameworks keep per-thread state).

    ``load()`` runs first on that thread (then ``"loaded"`` is sent); each command is answered
    with ``run(loaded, command)``; ``None`` ends it.
    """
    commands: queue.Queue[Any] = queue.Queue()

    def serve() -> None:
        loaded = load()
        conn.send("loaded")
        while (command := commands.get()) is not None:
            conn.send(run(loaded, command))

    thread = threading.Thread(target=serve, name="offline-model")
    thread.start()
    while True:
        command = conn.recv()
        commands.put(command)
        if command is None:
            break
    thread.join()


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0 or NaN."""
    return a / b if b and not np.isnan(b) else float("nan")


# --- the bare echo servers (run as `python -m benchmarks.rpc_overhead --_bare STACK PORT`) ---
