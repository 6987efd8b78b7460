"""The harness raises the server's errors, in process and isolated alike.

Isolated, the plugin runs in the server's own worker code (``model_plugins._host``); in
process, the harness maps plugin exceptions the same way, so one test passes in both modes.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from model_plugins import (
    InferenceError,
    InvalidRequest,
    PluginHarness,
    PluginLoadError,
    TensorSpec,
)

PLUGINS = """
import numpy as np

from model_plugins import InvalidRequest, ModelPlugin, Partial, TensorSpec


class Base(ModelPlugin):
    inputs = {"x": TensorSpec("float32", [])}
    outputs = {"y": TensorSpec("float32", [])}

    def predict(self, batch):
        return {"y": batch["x"]}


class LoadFails(Base):
    def load(self, context):
        raise RuntimeError("no weights")


class SignatureFails(Base):
    @classmethod
    def signature(cls, params, upstream):
        raise KeyError("dim")


class PredictFails(Base):
    def predict(self, batch):
        raise ValueError("bad item")


class Refuses(Base):
    def predict(self, batch):
        raise InvalidRequest("x must be positive", field="inputs.x")


class ReturnsAList(Base):
    def predict(self, batch):
        return {"y": batch["x"].tolist()}


class FailsNegatives(Base):
    def predict(self, batch):
        x = batch["x"]
        errors = {i: InvalidRequest("x must be >= 0") for i in range(len(x)) if x[i] < 0}
        return Partial({"y": x}, errors=errors)


class States(Base):
    def load(self, context):
        self.loaded_outputs = {"y": TensorSpec("float32", [])}
"""

X = {"x": np.ones(2, np.float32)}
MODES = pytest.mark.parametrize("isolated", [False, True], ids=["in_process", "isolated"])


@pytest.fixture
def module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "harness_errors_plugins.py").write_text(textwrap.dedent(PLUGINS), "utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))  # the isolated worker inherits sys.path
    return "harness_errors_plugins"


@MODES
def test_a_failing_load_is_a_plugin_load_error(module: str, isolated: bool) -> None:
    reference = f"{module}:LoadFails"
    with (
        pytest.raises(PluginLoadError) as caught,
        PluginHarness(reference, node="n", isolated=isolated),
    ):
        pass
    expected = f"node 'n' (plugin '{reference}'): load failed: builtins.RuntimeError: no weights"
    assert str(caught.value) == expected


@MODES
def test_a_failing_signature_is_a_plugin_load_error(module: str, isolated: bool) -> None:
    reference = f"{module}:SignatureFails"
    harness = PluginHarness(reference, node="n", isolated=isolated)
    try:
        with pytest.raises(PluginLoadError) as caught:
            harness.signature({})
    finally:
        harness.close()
    expected = f"node 'n' (plugin '{reference}'): signature() failed: builtins.KeyError: 'dim'"
    assert str(caught.value) == expected


@MODES
def test_a_failing_predict_is_an_inference_error_naming_the_cause(
    module: str, isolated: bool
) -> None:
    reference = f"{module}:PredictFails"
    with (
        PluginHarness(reference, node="n", isolated=isolated) as harness,
        pytest.raises(InferenceError) as caught,
    ):
        harness.predict(X)
    error = caught.value
    assert str(error) == f"node 'n' (plugin '{reference}') failed: builtins.ValueError: bad item"
    assert (error.node, error.plugin, error.cause) == ("n", reference, "builtins.ValueError")
    if isolated:
        assert "in the worker process" in "".join(error.__notes__)
    else:
        assert isinstance(error.__cause__, ValueError)


@MODES
def test_dagserve_errors_pass_unchanged(module: str, isolated: bool) -> None:
    with (
        PluginHarness(f"{module}:Refuses", isolated=isolated) as harness,
        pytest.raises(InvalidRequest, match=r"^x must be positive$") as caught,
    ):
        harness.predict(X)
    assert caught.value.field == "inputs.x"


@MODES
def test_outputs_must_be_numpy(module: str, isolated: bool) -> None:
    # Isolated, the worker refuses it before it crosses (a framework's tensor would import
    # its framework on this side); in process, the contract check does: same words.
    with (
        PluginHarness(f"{module}:ReturnsAList", isolated=isolated) as harness,
        pytest.raises(
            InferenceError, match=re.escape("output 'y' must be a numpy array (got list)")
        ),
    ):
        harness.predict(X)


@MODES
def test_declared_is_what_the_plugin_stated_on_load(module: str, isolated: bool) -> None:
    with PluginHarness(f"{module}:States", isolated=isolated) as harness:
        assert harness.declared() == ({}, {"y": TensorSpec("float32", [])})
    with PluginHarness(f"{module}:Base", isolated=isolated) as harness:
        assert harness.declared() == ({}, {})  # it stated nothing: its signature stands


@MODES
def test_a_partial_fails_the_batch_with_its_first_failed_item(module: str, isolated: bool) -> None:
    with PluginHarness(f"{module}:FailsNegatives", isolated=isolated) as harness:
        with pytest.raises(InvalidRequest, match=r"^item 1: x must be >= 0\n") as caught:
            harness.predict({"x": np.array([1, -1, -2], np.float32)})
        assert caught.value.__notes__ == ["items 2 failed too"]
        np.testing.assert_array_equal(harness.predict({"x": [1.0, 2.0]})["y"], [1.0, 2.0])
