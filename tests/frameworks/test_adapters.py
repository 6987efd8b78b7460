"""The four framework adapters on small real models, each in an isolated harness.

No framework is ever imported in this process (TensorFlow then Paddle in one process
segfaults): the models are built by ``python -m tests.frameworks.models`` in child processes,
and each adapter runs in the spawned child of ``PluginHarness(..., isolated=True)``.  Each
model's outputs are compared with what the framework itself computed when it was built.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model_plugins import (
    BatchContractError,
    InferenceError,
    InvalidRequest,
    PluginHarness,
    PluginLoadError,
    PluginNotFound,
    TensorSpec,
)
from model_plugins.adapters.paddle import PaddleInferenceAdapter
from model_plugins.adapters.tensorflow import SavedModelAdapter
from model_plugins.adapters.torch_module import TorchModuleAdapter
from model_plugins.adapters.torchscript import TorchScriptAdapter
from model_plugins.registry import resolve
from tests.frameworks.conftest import Builds
from tests.frameworks.models import BATCHES, SEQ_SHAPES, Case, load_cases

pytestmark = pytest.mark.frameworks

REPO = Path(__file__).resolve().parents[2]
FRAMEWORKS = ("torch", "tensorflow", "paddle")
#: the largest difference allowed from the framework's own float32 outputs
ATOL = 1e-5
MLP_IDS = [f"B{b}" for b in BATCHES]
SEQ_IDS = [f"B{b}xL{n}" for b, n in SEQ_SHAPES]


def assert_matches(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].dtype == expected.dtype, name
        assert got[name].shape == expected.shape, name
        np.testing.assert_allclose(got[name], expected, rtol=0, atol=ATOL, err_msg=name)


def test_adapters_are_registered_and_declare_their_framework() -> None:
    assert resolve("torchscript") is TorchScriptAdapter
    assert resolve("torch") is TorchModuleAdapter
    assert resolve("tensorflow") is SavedModelAdapter
    assert resolve("paddle") is PaddleInferenceAdapter
    assert TorchScriptAdapter.framework == TorchModuleAdapter.framework == "torch"
    assert SavedModelAdapter.framework == "tensorflow"
    assert PaddleInferenceAdapter.framework == "paddle"


def test_importing_the_adapters_imports_no_framework() -> None:
    code = (
        "import sys\n"
        "import model_plugins.adapters.torchscript, model_plugins.adapters.torch_module\n"
        "import model_plugins.adapters.tensorflow, model_plugins.adapters.paddle\n"
        f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_adapter_inputs_mirror_what_is_wired() -> None:
    x = TensorSpec("float32", [8])
    assert TorchScriptAdapter.signature({}, {"x": x, "y": None}) == ({"x": x}, {})


# -- torchscript -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torchscript_mlp(builds: Builds) -> Iterator[tuple[PluginHarness, list[Case]]]:
    folder = builds.folder("torchscript")
    params = {"output_names": ["y"]}
    with PluginHarness(
        "torchscript", model_path=folder / "mlp.pt", params=params, isolated=True
    ) as harness:
        yield harness, load_cases(folder / "mlp.npz")


@pytest.mark.parametrize("case", range(len(BATCHES)), ids=MLP_IDS)
def test_torchscript_matches_torch(
    torchscript_mlp: tuple[PluginHarness, list[Case]], case: int
) -> None:
    harness, cases = torchscript_mlp
    inputs, outputs = cases[case]
    assert_matches(harness.predict(inputs), outputs)


def test_torchscript_refuses_an_unexpected_input(
    torchscript_mlp: tuple[PluginHarness, list[Case]],
) -> None:
    harness, _ = torchscript_mlp
    with pytest.raises(InvalidRequest, match=r"unexpected inputs 'z' \(the model takes: x\)"):
        harness.predict({"x": np.zeros((1, 8), np.float32), "z": np.zeros((1, 8), np.float32)})


def test_torchscript_two_inputs_and_a_tuple_out(builds: Builds) -> None:
    folder = builds.folder("torchscript")
    params = {"output_names": ["sum", "product"]}
    with PluginHarness(
        "torchscript", model_path=folder / "pair.pt", params=params, isolated=True
    ) as harness:
        for inputs, outputs in load_cases(folder / "pair.npz"):
            assert_matches(harness.predict(inputs), outputs)
        assert harness.declared() == ({}, {})  # TorchScript states no specs


# -- torch (factory + state_dict) --------------------------------------------------------------


def test_torch_module_matches_torch(builds: Builds) -> None:
    folder = builds.folder("torch")
    params = {
        "factory": "tests.frameworks.models:make_mlp",
        "factory_kwargs": {"in_features": 8},
        "output_names": ["y"],
    }
    with PluginHarness(
        "torch", model_path=folder / "mlp_state.pt", params=params, isolated=True
    ) as harness:
        for inputs, outputs in load_cases(folder / "mlp.npz"):
            assert_matches(harness.predict(inputs), outputs)


# -- tensorflow --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tf_seq(builds: Builds) -> Iterator[tuple[PluginHarness, list[Case]]]:
    folder = builds.folder("tensorflow")
    params = {"signature": "seq", "output_map": {"logits": "scores"}}
    with PluginHarness(
        "tensorflow", model_path=folder / "saved_model", params=params, isolated=True
    ) as harness:
        cases = [(i, {"logits": o["scores"]}) for i, o in load_cases(folder / "seq.npz")]
        yield harness, cases


def test_tensorflow_mlp_matches_tf_and_reports_its_specs(builds: Builds) -> None:
    folder = builds.folder("tensorflow")
    with PluginHarness("tensorflow", model_path=folder / "saved_model", isolated=True) as harness:
        assert harness.declared() == (
            {"x": TensorSpec("float32", [8])},
            {"y": TensorSpec("float32", [4])},
        )
        for inputs, outputs in load_cases(folder / "mlp.npz"):
            assert_matches(harness.predict(inputs), outputs)


@pytest.mark.parametrize("case", range(len(SEQ_SHAPES)), ids=SEQ_IDS)
def test_tensorflow_seq_takes_any_length(
    tf_seq: tuple[PluginHarness, list[Case]], case: int
) -> None:
    harness, cases = tf_seq
    inputs, outputs = cases[case]
    assert_matches(harness.predict(inputs), outputs)


def test_tensorflow_reports_int_specs_under_node_names(
    tf_seq: tuple[PluginHarness, list[Case]],
) -> None:
    harness, _ = tf_seq
    assert harness.declared() == (
        {"ids": TensorSpec("int32", [-1])},
        {"logits": TensorSpec("float32", [3])},
    )


def test_tensorflow_casts_only_what_loses_nothing(
    tf_seq: tuple[PluginHarness, list[Case]],
) -> None:
    harness, cases = tf_seq
    inputs, outputs = cases[0]
    assert_matches(harness.predict({"ids": inputs["ids"].astype(np.int16)}), outputs)
    with pytest.raises(InvalidRequest, match=r"'ids' must be int32 .* \(got int64\)") as caught:
        harness.predict({"ids": inputs["ids"].astype(np.int64)})
    assert caught.value.field == "inputs.ids.dtype"
    assert "plugin 'tensorflow'" in str(caught.value)


def test_tensorflow_converts_lists_to_the_signature_dtype(
    tf_seq: tuple[PluginHarness, list[Case]],
) -> None:
    harness, cases = tf_seq
    inputs, outputs = cases[0]
    assert_matches(harness.predict({"ids": inputs["ids"].tolist()}), outputs)


# -- paddle ------------------------------------------------------------------------------------


def test_paddle_mlp_from_its_prefix(builds: Builds) -> None:
    folder = builds.folder("paddle")
    params = {"output_names": ["y"]}
    with PluginHarness(
        "paddle", model_path=folder / "mlp" / "inference", params=params, isolated=True
    ) as harness:
        assert harness.declared() == (
            {"x": TensorSpec("float32", [8])},
            {"y": TensorSpec("float32", [4])},
        )
        for inputs, outputs in load_cases(folder / "mlp.npz"):
            assert_matches(harness.predict(inputs), outputs)


def test_paddle_seq_from_its_folder(builds: Builds) -> None:
    folder = builds.folder("paddle")
    params = {"output_names": ["scores"], "cpu_threads": 1}
    with PluginHarness(
        "paddle", model_path=folder / "seq", params=params, isolated=True
    ) as harness:
        assert harness.declared() == (
            {"ids": TensorSpec("int64", [-1])},
            {"scores": TensorSpec("float32", [3])},
        )
        cases = load_cases(folder / "seq.npz")
        for inputs, outputs in cases:
            assert_matches(harness.predict(inputs), outputs)
        inputs, outputs = cases[1]
        assert_matches(harness.predict({"ids": inputs["ids"].astype(np.int32)}), outputs)
        with pytest.raises(InvalidRequest, match=r"'ids' must be int64 .* \(got float32\)"):
            harness.predict({"ids": inputs["ids"].astype(np.float32)})


# -- load errors: raised before the framework is imported, so they are cheap -------------------


@pytest.mark.parametrize(
    ("plugin", "model", "params"),
    [
        ("torchscript", "missing.pt", {}),
        ("torch", "missing.pt", {"factory": "tests.frameworks.models:make_mlp"}),
        ("tensorflow", "missing_saved_model", {}),
        ("paddle", "missing/inference", {}),
    ],
)
def test_a_missing_model_file_is_named(
    tmp_path: Path, plugin: str, model: str, params: dict[str, object]
) -> None:
    harness = PluginHarness(plugin, model_path=tmp_path / model, params=params, isolated=True)
    with pytest.raises(PluginLoadError, match="model file not found") as caught, harness:
        pass
    assert str(tmp_path / model) in str(caught.value)
    assert harness._worker is None  # the failed load stopped the worker


@pytest.mark.parametrize(
    ("plugin", "params", "message"),
    [
        ("torchscript", {"colour": "red"}, r"unknown params: colour \(known: input_names, "),
        ("tensorflow", {"signature": ""}, r"params.signature must be a non-empty string"),
        ("paddle", {"onednn": "yes"}, r"params.onednn must be true or false \(got 'yes'\)"),
        ("torch", {"factory": "make_mlp"}, r"params.factory must be 'module:function'"),
        ("torch", {"factory": "tests.frameworks.models:nope"}, r"cannot be imported"),
        ("torchscript", {"output_names": []}, r"output_names must be a list of distinct"),
    ],
)
def test_bad_params_are_load_errors(
    tmp_path: Path, plugin: str, params: dict[str, object], message: str
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with (
        pytest.raises(PluginLoadError, match=message),
        PluginHarness(plugin, model_path=model, params=params, isolated=True),
    ):
        pass


# -- the isolated harness itself, with plain numpy plugins -------------------------------------


def test_isolated_errors_come_back_with_their_class() -> None:
    with PluginHarness("tests.plugins:FailOnNegative", isolated=True, node="n") as harness:
        x = np.array([[1.0, 2.0]], np.float32)
        np.testing.assert_array_equal(harness.predict({"x": x})["y"], x)
        with pytest.raises(InferenceError, match="negative input is not allowed") as caught:
            harness.predict({"x": -x})
    assert caught.value.cause == "builtins.ValueError"
    assert caught.value.node == "n"


def test_isolated_contract_checks_run_in_the_caller() -> None:
    with (
        PluginHarness("tests.plugins:WrongCount", isolated=True) as harness,
        pytest.raises(BatchContractError),
    ):
        harness.predict({"x": np.zeros((2, 3), np.float32)})


def test_isolated_needs_a_reference() -> None:
    from tests.plugins import Scale

    with pytest.raises(TypeError, match="give a reference or a class"):
        PluginHarness(Scale(), isolated=True)


def test_an_unknown_plugin_is_not_found() -> None:
    with (
        pytest.raises(PluginNotFound, match='module "no_such_module" not found'),
        PluginHarness("no_such_module:Plugin", isolated=True),
    ):
        pass


def test_no_framework_entered_this_process() -> None:
    assert not [name for name in FRAMEWORKS if name in sys.modules]
