"""`make demo`: build the models if needed, serve post_understanding, send the samples, stop.

Runs the real command line (`python -m engine.cli serve`) in a subprocess and talks to it over
Thrift with the Python client, as a business service would; the table comes from client.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from build_models import build
from client import PIPELINE, analyse, load_posts, load_topics, paraphrase_margin, report

from engine.tools.ports import ServerNotReady, free_port, wait_ready
from engine.transport.client import Client

HERE = Path(__file__).resolve().parent


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
                try:  # ready: its three workers have loaded their models
                    wait_ready(port, server, timeout_s=180, poll_s=0.2)
                except ServerNotReady as exc:
                    sys.exit(f"{exc} (server log: {log_path})")
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
