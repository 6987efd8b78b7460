"""The SDK's public surface is pinned: changing it is a deliberate act (trio test_exports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import model_plugins
from model_plugins import errors, harness, params, partial, plugin, specs

EXPECTED = [
    "ModelPlugin",
    "TensorSpec",
    "LoadContext",
    "Batch",
    "Signature",
    "Params",
    "Partial",
    "PluginHarness",
    "DagserveError",
    "InvalidRequest",
    "PipelineNotFound",
    "Overloaded",
    "DeadlineExceeded",
    "InferenceError",
    "BatchContractError",
    "PluginError",
    "PluginNotFound",
    "PluginLoadError",
]

REPO = Path(__file__).resolve().parents[2]


def test_all_is_pinned() -> None:
    assert model_plugins.__all__ == EXPECTED


def test_every_name_is_the_object_of_its_module() -> None:
    homes = {
        "ModelPlugin": plugin,
        "LoadContext": plugin,
        "Batch": plugin,
        "Signature": plugin,
        "Params": params,
        "Partial": partial,
        "TensorSpec": specs,
        "PluginHarness": harness,
    }
    for name in EXPECTED:
        home = homes.get(name, errors)
        assert getattr(model_plugins, name) is getattr(home, name), name


def test_no_private_or_stray_public_names() -> None:
    public = {
        name
        for name, value in vars(model_plugins).items()
        if not name.startswith("_") and not isinstance(value, type(model_plugins))
    }
    assert public == set(EXPECTED)


def test_import_is_light() -> None:
    heavy = ["PIL", "torch", "tensorflow", "paddle", "model_plugins.builtins"]
    code = f"import sys, model_plugins; print(','.join(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == ""
