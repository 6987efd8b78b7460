"""Shared fixtures of the framework tests: the models, built once per session."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Builds:
    """The four model builders, started together in child processes on first use."""

    def __init__(
        self, root: Path, which: tuple[str, ...] = ("torchscript", "torch", "tensorflow", "paddle")
    ) -> None:
        self.root = root
        self.running = {
            which: subprocess.Popen(
                [sys.executable, "-m", "tests.frameworks.models", which, str(root / which)],
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for which in which
        }

    def folder(self, which: str) -> Path:
        process = self.running[which]
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr.decode(errors="replace")[-3000:]
        return self.root / which


@pytest.fixture(scope="session")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    started = Builds(tmp_path_factory.mktemp("models"))
    yield started
    for process in started.running.values():
        process.communicate()
