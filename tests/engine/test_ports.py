"""engine/tools/ports.py: a port to serve on, and waiting for the server on it."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from engine.tools.ports import ServerNotReady, free_port, wait_ready


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_server_that_exits_ends_the_wait_with_its_code_and_output() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(30)
    with pytest.raises(ServerNotReady, match=r"exited with code 3:\nno such pipeline"):
        wait_ready(free_port(), process, timeout_s=30, output=lambda: "no such pipeline")


def test_no_server_is_not_ready_after_the_timeout() -> None:
    with pytest.raises(ServerNotReady, match=r"not ready after 0.3 s$"):
        wait_ready(free_port(), timeout_s=0.3, poll_s=0.05)
