"""Real PyTorch, TensorFlow and Paddle models served through pipelines, over Thrift.

The served outputs must equal what each framework computed itself when the model was built
(max abs difference <= 1e-5).  The pytest process imports no framework: the models load in
the server's worker processes, one per framework.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engine.transport.client import Client
from tests.frameworks.conftest import Builds
from tests.frameworks.models import BATCHES, SEQ_SHAPES, Case, load_cases
from tests.serving import ServerThread, serving

pytestmark = [pytest.mark.e2e, pytest.mark.frameworks]

ATOL = 1e-5
MLP_IDS = [f"B{b}" for b in BATCHES]
SEQ_IDS = [f"B{b}xL{n}" for b, n in SEQ_SHAPES]

THREE = """
name: three_frameworks
inputs:
  x: {dtype: float32, shape: [8]}
nodes:
  ts:
    plugin: torchscript
    model: torchscript/mlp.pt
    params: {output_names: [y]}
    inputs: {x: $inputs.x}
    outputs: {y: {dtype: float32, shape: [4]}}
  tf:
    plugin: tensorflow
    model: tensorflow/saved_model
    inputs: {x: $inputs.x}
  pd:
    plugin: paddle
    model: paddle/mlp/inference
    params: {output_names: [y]}
    inputs: {x: $inputs.x}
  fuse:
    plugin: concat_fusion
    inputs: {torch: ts.y, tensorflow: tf.y, paddle: pd.y}
outputs:
  torch: ts.y
  tensorflow: tf.y
  paddle: pd.y
  fused: fuse.embedding
"""

MODULE_AND_SEQUENCES = """
name: more_models
inputs:
  x: {dtype: float32, shape: [8]}
  ids32: {dtype: int32, shape: [-1], optional: true}
  ids64: {dtype: int64, shape: [-1], optional: true}
nodes:
  module:
    plugin: torch
    model: torch/mlp_state.pt
    params: {factory: "tests.frameworks.models:make_mlp", output_names: [y]}
    instances: 2
    inputs: {x: $inputs.x}
  tf_seq:
    plugin: tensorflow
    model: tensorflow/saved_model
    params: {signature: seq}
    inputs: {ids: $inputs.ids32}
  pd_seq:
    plugin: paddle
    model: paddle/seq
    params: {output_names: [scores]}
    inputs: {ids: $inputs.ids64}
outputs:
  module: module.y
  tf_scores: tf_seq.scores
  pd_scores: pd_seq.scores
"""


@pytest.fixture(scope="module")
def server(builds: Builds) -> Iterator[ServerThread]:
    for which in ("torchscript", "torch", "tensorflow", "paddle"):
        builds.folder(which)
    root = builds.root
    (root / "three.yaml").write_text(THREE)
    (root / "more.yaml").write_text(MODULE_AND_SEQUENCES)
    with serving([root / "three.yaml", root / "more.yaml"]) as thread:
        yield thread


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with Client("127.0.0.1", server.port, timeout_s=60) as c:
        yield c


def close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def cases(builds: Builds, name: str, expected: int) -> list[Case]:
    """The cases a builder saved, as many as it was asked for (never none)."""
    found = load_cases(builds.root / name)
    assert len(found) == expected, f"{name}: {len(found)} cases, expected {expected}"
    return found


@pytest.mark.parametrize("case", range(len(BATCHES)), ids=MLP_IDS)
def test_three_frameworks_in_one_pipeline(
    server: ServerThread, client: Client, builds: Builds, case: int
):
    inputs, t = cases(builds, "torchscript/mlp.npz", len(BATCHES))[case]
    tf_inputs, f = cases(builds, "tensorflow/mlp.npz", len(BATCHES))[case]
    paddle_inputs, p = cases(builds, "paddle/mlp.npz", len(BATCHES))[case]
    np.testing.assert_array_equal(tf_inputs["x"], inputs["x"])  # the same inputs for all three
    np.testing.assert_array_equal(paddle_inputs["x"], inputs["x"])
    result = client.infer("three_frameworks", inputs)
    close(result.outputs["torch"], t["y"])
    close(result.outputs["tensorflow"], f["y"])
    close(result.outputs["paddle"], p["y"])
    close(result.outputs["fused"], np.concatenate([t["y"], f["y"], p["y"]], axis=1))


def test_each_framework_has_its_worker_and_none_entered_the_front(server: ServerThread):
    workers = server.engine.workers.statistics()
    assert {"torch@cpu", "tensorflow@cpu", "paddle@cpu"} <= set(workers)
    for name in ("torch", "tensorflow", "paddle"):
        assert name not in sys.modules, f"the front process imported {name}"


@pytest.mark.parametrize("case", range(len(BATCHES)), ids=MLP_IDS)
def test_torch_module_factory_with_state_dict(client: Client, builds: Builds, case: int):
    inputs, outputs = cases(builds, "torch/mlp.npz", len(BATCHES))[case]
    close(client.infer("more_models", inputs, outputs=["module"]).outputs["module"], outputs["y"])


@pytest.mark.parametrize("case", range(len(SEQ_SHAPES)), ids=SEQ_IDS)
@pytest.mark.parametrize(
    ("folder", "input_name", "output"),
    [("tensorflow", "ids32", "tf_scores"), ("paddle", "ids64", "pd_scores")],
)
def test_variable_length_integer_inputs(
    client: Client, builds: Builds, folder: str, input_name: str, output: str, case: int
):
    inputs, outputs = cases(builds, f"{folder}/seq.npz", len(SEQ_SHAPES))[case]
    ids = inputs["ids"]
    request = {"x": np.zeros((len(ids), 8), np.float32), input_name: ids}
    result = client.infer("more_models", request, outputs=[output])
    close(result.outputs[output], outputs["scores"])


def test_model_specs_reported_by_the_framework_are_adopted(server: ServerThread):
    served = server.engine.find("three_frameworks")
    # tf and pd declare no outputs in the YAML: the workers reported them after load
    assert served.runners["tf"].model.outputs["y"].describe() == "float32[4]"
    assert served.runners["pd"].model.outputs["y"].describe() == "float32[4]"


def test_a_model_whose_outputs_contradict_the_pipeline_refuses_to_start(
    builds: Builds, tmp_path: Path
):
    from model_plugins.errors import PluginLoadError

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ninputs: {x: {dtype: float32, shape: [8]}}\nnodes:\n  pd:\n"
        f"    plugin: paddle\n    model: {builds.root / 'paddle/mlp/inference'}\n"
        "    params: {output_names: [y]}\n    inputs: {x: $inputs.x}\n"
        "    outputs: {y: {dtype: float32, shape: [5]}}\noutputs: {y: pd.y}\n"
    )
    with (
        pytest.raises(PluginLoadError, match=r"float32\[4\].*declares float32\[5\]"),
        serving([bad]),
    ):
        pass
