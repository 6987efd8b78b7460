"""What each layer loads: checked in a fresh interpreter, where nothing else was imported first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def loaded(modules: list[str], prefixes: list[str]) -> list[str]:
    """The modules under ``prefixes`` that importing ``modules`` loads."""
    code = (
        f"import sys\nfor m in {modules!r}: __import__(m)\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {prefixes!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [m for m in done.stdout.strip().split(",") if m]


def test_placement_devices_and_config_do_not_load_the_idl() -> None:
    # Their errors (engine.errors) are plain classes; the wire mapping lives in transport.
    modules = ["engine.runtime.placement", "engine.runtime.devices", "engine.config"]
    assert loaded(modules, ["idl", "thriftpy2"]) == []


@pytest.mark.parametrize("module", ["dag", "dag.executor", "dag.pipeline"])
def test_dag_does_not_import_engine(module: str) -> None:
    assert loaded([module], ["engine", "idl", "thriftpy2"]) == []


def test_nothing_imports_ray_without_a_ray_key() -> None:
    # The server, its placement and the Ray backend's modules load Ray only when an actor
    # starts (a server config with ``ray:``).
    modules = [
        "engine.server",
        "engine.runtime.ray_placement",
        "engine.runtime.workers.ray_worker",
        "model_plugins._host.ray_actor",
    ]
    assert loaded(modules, ["ray"]) == []
