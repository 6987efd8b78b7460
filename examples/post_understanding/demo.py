"""`make demo`: build the models if needed, serve post_understanding, send the samples, stop.

Runs the real command line (`python -m engine.cli serve`) in a subprocess and talks to it over
Thrift with the Python client, as a business service would; the table comes from client.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from build_models import build
from client import PIPELINE, analyse, load_posts, load_topics, paraphrase_margin, report

from engine.transport.client import Client

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(client: Client, server: subprocess.Popen[bytes], timeout_s: float = 180) -> None:
    """Wait until the server reports ready (its three workers have loaded their models)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited early with code {server.returncode}")
        try:
            if client.health().ready:
                return
        except ConnectionError:
            pass
        time.sleep(0.2)
    sys.exit(f"the server was not ready after {timeout_s} s")


def main() -> int:
    build()
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
    # The server's log goes to a file: the demo's output is the table.
    log_path = HERE / "models" / "server.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        server = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            with Client("127.0.0.1", port) as client:
                wait_ready(client, server)
                print(f"ready in {time.perf_counter() - started:.1f} s (server log: {log_path})")
                info = client.describe(PIPELINE)
                print(f"pipeline {info.name} v{info.version}: nodes {', '.join(info.nodes)}\n")
                samples = load_posts()
                answers = analyse(client, samples)
            report(answers, samples, load_topics())
            margin = paraphrase_margin(answers, samples)
            verdict = "closer than" if margin > 0 else "NOT closer than"
            print(
                f"  -> each paraphrase pair is {verdict} each unrelated one (margin {margin:.2f})"
            )
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
    print(f"\nserver stopped (exit code {code})")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
