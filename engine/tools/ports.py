"""A port to serve on, and waiting until the server on it is ready: what the tests, the
benchmarks and the examples' demos share when they start ``dagserve serve`` in a subprocess.

    port = free_port()
    process = subprocess.Popen([..., "serve", "pipeline.yaml", "--port", str(port)])
    wait_ready(port, process, timeout_s=60)
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

from engine.transport.client import Client

#: where the helpers look by default: a server started for a test or a benchmark listens here
HOST = "127.0.0.1"


class ServerNotReady(RuntimeError):
    """The server's process exited, or it did not report ready in time."""


def free_port(host: str = HOST) -> int:
    """A TCP port that was free on ``host`` a moment ago.

    Another program may take it before the server binds it (the port is closed in between):
    fine for tests and benchmarks, where a server that cannot bind fails loudly.
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_ready(
    port: int,
    process: subprocess.Popen[Any] | None = None,
    *,
    host: str = HOST,
    timeout_s: float = 60.0,
    poll_s: float = 0.1,
    output: Callable[[], str] | None = None,
) -> None:
    """Poll ``health()`` on ``host:port`` until the server reports ready (every model loaded).

    Args:
        port: the server's Thrift port.
        process: the server's process, if this program started it: its exit ends the wait.
        host: the server's address.
        timeout_s: how long to wait.
        poll_s: the pause between two polls.
        output: the server's output so far (a log's tail), added to the error.

    Raises:
        ServerNotReady: the process exited first, or the server was not ready in time.
    """
    deadline = time.monotonic() + timeout_s
    with Client(host, port, timeout_s=2.0, pool_size=1) as client:
        while True:
            if process is not None and process.poll() is not None:
                problem = f"the server exited with code {process.returncode}"
                break
            try:
                if client.health().ready:
                    return
            except ConnectionError:  # not listening yet (or restarting a connection)
                pass
            if time.monotonic() >= deadline:
                problem = f"the server was not ready after {timeout_s:g} s"
                break
            time.sleep(poll_s)
    tail = output() if output is not None else ""
    msg = f"{problem}:\n{tail}" if tail else problem
    raise ServerNotReady(msg)


__all__ = ["HOST", "ServerNotReady", "free_port", "wait_ready"]
