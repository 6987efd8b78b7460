"""PluginHarness and the contract checks it shares with the engine."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from model_plugins import (
    BatchContractError,
    InferenceError,
    InvalidRequest,
    LoadContext,
    ModelPlugin,
    PluginHarness,
    TensorSpec,
)
from model_plugins.contract import check_inputs, check_outputs
from model_plugins.plugin import Batch


class Scale(ModelPlugin):
    """y = x * factor; records its lifecycle."""

    inputs: ClassVar = {"x": TensorSpec("float32", [2])}
    outputs: ClassVar = {"y": TensorSpec("float32", [2])}

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.context: LoadContext | None = None

    def load(self, context: LoadContext) -> None:
        self.calls.append("load")
        self.context = context

    def predict(self, batch: Batch) -> Batch:
        self.calls.append("predict")
        factor = np.float32(self.context.params.get("factor", 1.0) if self.context else 1.0)
        return {"y": batch["x"] * factor}

    def unload(self) -> None:
        self.calls.append("unload")


class DropsAnItem(Scale):
    def predict(self, batch: Batch) -> Batch:
        return {"y": batch["x"][:-1]}


class ReturnsFloat64(Scale):
    def predict(self, batch: Batch) -> Batch:
        return {"y": batch["x"].astype(np.float64)}


class ForgetsAnOutput(Scale):
    outputs: ClassVar = {"y": TensorSpec("float32", [2]), "z": TensorSpec("float32", [])}


class WrongItemShape(Scale):
    def predict(self, batch: Batch) -> Batch:
        return {"y": np.zeros((len(batch["x"]), 3), np.float32)}


class ReturnsAList(Scale):
    def predict(self, batch: Batch) -> Batch:
        return [batch["x"]]  # type: ignore[return-value]


class Texts(ModelPlugin):
    inputs: ClassVar = {"text": TensorSpec("string", []), "tag": TensorSpec("bytes", [], True)}
    outputs: ClassVar = {"length": TensorSpec("int64", [])}

    def predict(self, batch: Batch) -> Batch:
        return {"length": np.array([len(t) for t in batch["text"]], dtype=np.int64)}


X = np.arange(6, dtype=np.float32).reshape(3, 2)


def test_predict_runs_the_plugin_with_the_context() -> None:
    with PluginHarness(Scale, params={"factor": 2}, model_path="m.pt", node="n") as harness:
        out = harness.predict({"x": X})
        context = harness.plugin.context  # type: ignore[attr-defined]
    np.testing.assert_array_equal(out["y"], X * 2)
    assert context.model_path == Path("m.pt")
    assert context.device == "cpu"
    assert context.node == "n"
    assert context.plugin.endswith(":Scale")


def test_context_manager_unloads_even_on_error() -> None:
    plugin = Scale()
    with pytest.raises(InvalidRequest), PluginHarness(plugin) as harness:
        harness.predict({"x": np.zeros((1, 5), np.float32)})
    assert plugin.calls == ["load", "unload"]


def test_predict_before_load_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="load"):
        PluginHarness(Scale).predict({"x": X})


def test_lists_become_arrays_of_the_declared_dtype() -> None:
    with PluginHarness(Scale) as harness:
        out = harness.predict({"x": [[1, 2], [3, 4]]})
    assert out["y"].dtype == np.float32
    with PluginHarness(Texts) as harness:
        out = harness.predict({"text": ["ab", "cde"], "tag": [b"x", b"y"]})
    np.testing.assert_array_equal(out["length"], [2, 3])


def test_batch_contract_error_gives_both_numbers() -> None:
    with (
        PluginHarness(DropsAnItem, node="embed") as harness,
        pytest.raises(BatchContractError) as caught,
    ):
        harness.predict({"x": X})
    error = caught.value
    assert (error.expected, error.actual, error.node) == (3, 2, "embed")
    assert "the batch has 3 items but output 'y' has 2" in str(error)
    assert isinstance(error, InferenceError)


def test_wrong_output_dtype() -> None:
    with (
        PluginHarness(ReturnsFloat64) as harness,
        pytest.raises(InferenceError, match=r"output 'y' must be float32 \(got float64\)"),
    ):
        harness.predict({"x": X})


def test_missing_output() -> None:
    with (
        PluginHarness(ForgetsAnOutput) as harness,
        pytest.raises(InferenceError, match=r"did not return output 'z' \(returned 'y'\)"),
    ):
        harness.predict({"x": X})


def test_wrong_output_item_shape() -> None:
    with (
        PluginHarness(WrongItemShape) as harness,
        pytest.raises(
            InferenceError, match=r"items of shape float32\[2\] \(got items of shape \[3\]\)"
        ),
    ):
        harness.predict({"x": X})


def test_result_must_be_a_dict() -> None:
    with PluginHarness(ReturnsAList) as harness, pytest.raises(InferenceError, match="dict"):
        harness.predict({"x": X})


@pytest.mark.parametrize(
    ("batch", "field", "message"),
    [
        ({"x": X.astype(np.int32)}, "inputs.x.dtype", r"must be float32 \(got int32\)"),
        ({"x": [[0.5, 1.5]] * 2 + [[1.0]]}, "inputs.x", "not a rectangular list"),
        ({"x": np.zeros((3, 4), np.float32)}, "inputs.x.shape", r"\(got items of shape \[4\]\)"),
        ({"x": np.float32(1)}, "inputs.x", "numpy array or a list"),
        ({"x": X, "extra": X}, "inputs.extra", r"unexpected input 'extra' \(declared: x\)"),
        ({}, "inputs.x", r"required input 'x' \(float32\[2\]\) is missing"),
    ],
)
def test_bad_inputs(batch: dict[str, object], field: str, message: str) -> None:
    with PluginHarness(Scale) as harness, pytest.raises(InvalidRequest, match=message) as caught:
        harness.predict(batch)
    assert caught.value.field == field


def test_object_elements_are_checked_one_by_one() -> None:
    data = np.array([b"ok", "not bytes"], dtype=object)
    with (
        PluginHarness(Texts) as harness,
        pytest.raises(InvalidRequest, match=r"must hold bytes \(element 1 is str\)"),
    ):
        harness.predict({"text": ["a", "b"], "tag": data})


def test_inputs_must_agree_on_the_item_count() -> None:
    specs = {"a": TensorSpec("float32", []), "b": TensorSpec("float32", [])}
    batch = {"a": np.zeros(3, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(InvalidRequest, match="'a' has 3, 'b' has 2") as caught:
        check_inputs(specs, batch, where="node 'n'")
    assert caught.value.field == "inputs.b.shape"


def test_partial_batches_and_optional_inputs() -> None:
    specs = {"a": TensorSpec("float32", []), "b": TensorSpec("float32", [], optional=True)}
    assert check_inputs(specs, {"a": np.zeros(2, np.float32)}, where="n") == 2
    assert check_inputs(specs, {}, where="n", partial=True) is None
    with pytest.raises(InvalidRequest, match="required input 'a'"):
        check_inputs(specs, {"b": np.zeros(2, np.float32)}, where="n")


def test_check_outputs_names_the_node_and_checks_undeclared_arrays() -> None:
    specs = {"y": TensorSpec("float32", [])}
    outputs = {"y": np.zeros(2, np.float32), "debug": np.zeros(5)}
    with pytest.raises(BatchContractError, match="node 'n' \\(plugin 'p'\\)") as caught:
        check_outputs(specs, outputs, 2, plugin="p", node="n")
    assert (caught.value.expected, caught.value.actual) == (2, 5)


def test_empty_batch_needs_n_items() -> None:
    class Source(ModelPlugin):
        outputs: ClassVar = {"y": TensorSpec("int64", [])}

        def predict(self, batch: Batch) -> Batch:
            return {"y": np.arange(4)}

    with PluginHarness(Source) as harness:
        with pytest.raises(ValueError, match="n_items"):
            harness.predict({})
        assert harness.predict({}, n_items=4)["y"].tolist() == [0, 1, 2, 3]
