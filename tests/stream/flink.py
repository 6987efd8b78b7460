"""`dagserve stream` as the tests run it: .venv-flink's Python in a process group of its own,
so that the JVM of the mini-cluster and its Python workers end with the test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.serving import ROOT

FLINK_PYTHON = ROOT / ".venv-flink" / "bin" / "python"

needs_flink = pytest.mark.skipif(
    not FLINK_PYTHON.exists(), reason="no .venv-flink (make flink-venv installs PyFlink there)"
)


def group_members(pgid: int) -> list[str]:
    """``pid comm state`` of every process still in process group ``pgid`` (zombies too)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid:
            found.append(f"{entry.name} {comm} {state}")
    return found


class StreamJob:
    """``dagserve stream ARGS`` started now; :meth:`finish` waits for it and checks that
    nothing it started (the JVM, the Python workers) outlives it."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(FLINK_PYTHON), "-m", "engine.cli", "stream", *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,  # its own process group: the JVM and workers join it
        )  # fmt: skip
        self.pgid = self.process.pid

    def finish(self, timeout_s: float = 240) -> tuple[int, str, str]:
        """Exit status, stdout, stderr; fails the test if the job or a child is left."""
        try:
            out, err = self.process.communicate(timeout=timeout_s)
        finally:
            self.stop()
        deadline = time.monotonic() + 10
        while (left := group_members(self.pgid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            os.killpg(self.pgid, signal.SIGKILL)
        assert not left, f"left behind by dagserve stream: {left}"
        return self.process.returncode, out, err

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.pgid, signal.SIGKILL)
            self.process.wait(10)
