"""What the GPU tests need: the cards NVML sees, and which frameworks can be served on them.

The tests skip, saying why, where no CUDA device is visible.  Where one is (``nvidia-smi``
lists a card), nothing skips for want of a GPU: a missing ``nvidia-ml-py``, or a framework
build that cannot reach the card, fails the run instead of hiding it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.runtime.devices import DeviceInventory
from tests.frameworks.conftest import Builds

REPO = Path(__file__).resolve().parents[2]


def smi_cards() -> list[str]:
    """The cards ``nvidia-smi -L`` lists (empty without the driver's tool)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line for line in done.stdout.splitlines() if line.startswith("GPU ")]


INVENTORY = DeviceInventory.from_nvml()
CARDS = [gpu.index for gpu in INVENTORY.gpus]
SMI = smi_cards()
#: why the GPU tests skip, or None where they run
SKIP = None if CARDS or SMI else f"no CUDA device visible ({INVENTORY.source}; no nvidia-smi card)"


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it here."""
    return importlib.util.find_spec(module) is not None


def framework_sees(module: str, code: str) -> int:
    """How many cards ``module`` sees, asked in a child process (never in this one)."""
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}\n{code}"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def cards() -> list[int]:
    """NVML indices of the cards; fails where nvidia-smi sees cards that NVML does not."""
    assert CARDS, (
        f"nvidia-smi lists {len(SMI)} card(s) but dagserve's inventory has none: "
        f"{INVENTORY.source} (pip install 'dagserve[gpu]')"
    )
    return CARDS


@pytest.fixture(scope="session")
def gpu_builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Builds]:
    """The framework tests' models, built only for the frameworks installed here."""
    wanted = {"torchscript": "torch", "torch": "torch", "tensorflow": "tensorflow",
              "paddle": "paddle"}  # fmt: skip
    which = tuple(w for w, module in wanted.items() if installed(module))
    started = Builds(tmp_path_factory.mktemp("gpu-models"), which)
    yield started
    for process in started.running.values():
        process.communicate()
