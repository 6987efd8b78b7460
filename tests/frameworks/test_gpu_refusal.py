"""A node placed on a GPU that its framework cannot use fails at load, naming the device.

Without this check TensorFlow's soft placement runs the model on the CPU unannounced, and
torch fails only on the first batch.  The harness child starts with no card visible
(``CUDA_VISIBLE_DEVICES=""``), so the refusal is checked on any machine, GPU or not.
"""

from __future__ import annotations

import pytest

from model_plugins import PluginHarness, PluginLoadError
from tests.frameworks.conftest import Builds

pytestmark = pytest.mark.frameworks

CASES = [
    ("torchscript", "torchscript", "mlp.pt", {"output_names": ["y"]}, "torch"),
    (
        "torch",
        "torch",
        "mlp_state.pt",
        {"factory": "tests.frameworks.models:make_mlp", "output_names": ["y"]},
        "torch",
    ),
    ("tensorflow", "tensorflow", "saved_model", {}, "TensorFlow"),
    ("paddle", "paddle", "mlp/inference", {"output_names": ["y"]}, "Paddle"),
]


@pytest.mark.parametrize(
    ("plugin", "folder", "model", "params", "framework"), CASES, ids=[c[0] for c in CASES]
)
def test_a_gpu_node_without_a_usable_gpu_is_refused_at_load(
    builds: Builds,
    monkeypatch: pytest.MonkeyPatch,
    plugin: str,
    folder: str,
    model: str,
    params: dict[str, object],
    framework: str,
) -> None:
    path = builds.folder(folder) / model
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    harness = PluginHarness(plugin, model_path=path, params=params, device="cuda:0", isolated=True)
    with pytest.raises(PluginLoadError) as info, harness:
        pass
    text = str(info.value)
    assert "placed on cuda:0" in text
    assert f"{framework} in this worker cannot use a GPU" in text
    assert "device: cpu" in text
