"""`make demo`: build the models if needed, serve post_understanding, send the samples, stop.

Runs the real command line (`python -m engine.cli serve`) in a subprocess and talks to it over
Thrift with the Python client, as a business service would; the table comes from client.py.
:func:`serve` (the server's start and stop) is shared with ``stream_demo.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from build_models import build
from client import PIPELINE, analyse, load_posts, load_topics, paraphrase_margin, report

from engine.tools.ports import ServerNotReady, free_port, wait_ready
from engine.transport.client import Client

HERE = Path(__file__).resolve().parent
#: the server's log: the demo's output is the table
SERVER_LOG = HERE / "models" / "server.log"


@dataclass
class Served:
    """The server :func:`serve` started: its port, its process, its exit code once stopped."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    exit_code: int | None = None


@contextlib.contextmanager
def serve(log_path: Path = SERVER_LOG, ready_timeout_s: float = 180) -> Iterator[Served]:
    """`dagserve serve pipeline.yaml` on a free port, ready (its three workers have loaded
    their models) when the block starts; SIGTERM and wait for its exit when the block ends."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "engine.cli",
        "serve",
        str(HERE / "pipeline.yaml"),
        "--port",
        str(port),
    ]
    print("\n$", " ".join(command[2:]))
    with log_path.open("wb") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    served = Served(port, process, log_path)
    try:
        try:
            wait_ready(port, process, timeout_s=ready_timeout_s, poll_s=0.2)
        except ServerNotReady as exc:
            sys.exit(f"{exc} (server log: {log_path})")
        print(f"ready in {time.perf_counter() - started:.1f} s (server log: {log_path})")
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        served.exit_code = process.wait(timeout=60)


def main() -> int:
    build()
    with serve() as served:
        with Client("127.0.0.1", served.port) as client:
            info = client.describe(PIPELINE)
            print(f"pipeline {info.name} v{info.version}: nodes {', '.join(info.nodes)}\n")
            samples = load_posts()
            answers = analyse(client, samples)
        report(answers, samples, load_topics())
        margin = paraphrase_margin(answers, samples)
        verdict = "closer than" if margin > 0 else "NOT closer than"
        print(f"  -> each paraphrase pair is {verdict} each unrelated one (margin {margin:.2f})")
    print(f"\nserver stopped (exit code {served.exit_code})")
    return 0 if served.exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
