"""Models served on real GPUs: every adapter on cuda:0 (and cuda:1 where there are two cards),
placement over real NVML, and batches that cross to a GPU worker and back.

Run with ``make gpu-check``.  Skipped, with the reason, where no CUDA device is visible; where
one is, a missing piece (``nvidia-ml-py``, a framework build without CUDA) fails instead.  The
pytest process imports no framework: models are built and asked in child processes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.transport.client import Client
from tests.frameworks.conftest import Builds
from tests.frameworks.models import load_cases
from tests.gpu.conftest import INVENTORY, SKIP, framework_sees, installed
from tests.serving import serving

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    pytest.mark.frameworks,
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
]

#: GPU kernels (TF32 matmuls where the framework enables them) differ from the CPU reference
ATOL = 1e-2

#: adapter -> (framework module, model file, params, reference cases)
ADAPTERS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "torchscript": ("torch", "mlp.pt", {"output_names": ["y"]}, "mlp.npz"),
    "torch": (
        "torch",
        "mlp_state.pt",
        {"factory": "tests.frameworks.models:make_mlp", "output_names": ["y"]},
        "mlp.npz",
    ),
    "tensorflow": ("tensorflow", "saved_model", {}, "mlp.npz"),
    "paddle": ("paddle", "mlp/inference", {"output_names": ["y"]}, "mlp.npz"),
}

#: how each framework counts the cards it can use, printed by a child process
COUNT = {
    "torch": "print(torch.cuda.device_count())",
    "tensorflow": "print(len(tensorflow.config.list_physical_devices('GPU')))",
    "paddle": "print(paddle.device.cuda.device_count())",
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("module", sorted(COUNT))
def test_each_installed_framework_sees_every_card(cards: list[int], module: str) -> None:
    if not installed(module):
        pytest.skip(f"{module} is not installed here")
    assert framework_sees(module, COUNT[module]) == len(cards), (
        f"NVML sees {len(cards)} card(s) but {module} does not: install its CUDA build"
    )


@pytest.mark.parametrize("position", [0, 1], ids=["first card", "second card"])
@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_adapter_serves_on_a_card(
    gpu_builds: Builds, cards: list[int], tmp_path: Path, adapter: str, position: int
) -> None:
    if position >= len(cards):
        pytest.skip(f"this machine has {len(cards)} card; the second-card case needs two")
    module, model, params, reference = ADAPTERS[adapter]
    if not installed(module):
        pytest.skip(f"{module} is not installed here")
    card = cards[position]
    folder = gpu_builds.folder(adapter)
    path = write(
        tmp_path,
        f"name: on_gpu\ninputs: {{x: {{dtype: float32, shape: [8]}}}}\nnodes:\n"
        f"  m:\n    plugin: {adapter}\n    model: {folder / model}\n    params: {params}\n"
        f"    device: cuda:{card}\n    gpu_memory_mb: 1024\n    inputs: {{x: $inputs.x}}\n"
        f"    outputs: {{y: {{dtype: float32, shape: [4]}}}}\n"
        f"outputs: {{y: m.y}}\n",
    )
    cases = load_cases(folder / reference)
    assert cases, f"no reference cases in {folder / reference}"
    with serving([path]) as server, Client("127.0.0.1", server.port, timeout_s=120) as client:
        for inputs, outputs in cases:
            got = client.infer("on_gpu", inputs).outputs["y"]
            np.testing.assert_allclose(got, outputs["y"], rtol=0, atol=ATOL)
        assert server.engine.placement.models == {"on_gpu/m": f"cuda:{card}"}
        framework = "torch" if module == "torch" else module
        assert f"{framework}@cuda:{card}" in server.engine.workers.statistics()


PROBE = """
name: probe
inputs: {x: {dtype: float32, shape: [4]}}
nodes:
  p:
    plugin: tests.gpu.probe:CudaProbe
    gpu_memory_mb: 512
    batching: {max_batch_size: 16, max_delay_ms: 50}
    inputs: {x: $inputs.x}
outputs: {y: p.y, device: p.device, card: p.card, batch: p.batch}
"""


def test_placement_over_real_nvml_and_batches_cross_to_the_card_and_back(
    cards: list[int], tmp_path: Path
) -> None:
    if not installed("torch"):
        pytest.skip("torch is not installed here")
    assert INVENTORY.source == "NVML"
    path = write(tmp_path, PROBE)
    results: list[dict[str, np.ndarray]] = []
    errors: list[BaseException] = []
    with serving([path]) as server:
        placed = server.engine.placement.models["probe/p"]
        assert placed in {f"cuda:{i}" for i in cards}  # device: auto, by NVML's free memory

        def call(i: int) -> None:
            try:
                with Client("127.0.0.1", server.port, timeout_s=120) as client:
                    x = np.full((1, 4), i, np.float32)
                    results.append(client.infer("probe", {"x": x}).outputs | {"i": np.array(i)})
            except BaseException as exc:  # reported below
                errors.append(exc)

        with Client("127.0.0.1", server.port, timeout_s=120) as client:
            client.infer("probe", {"x": np.zeros((1, 4), np.float32)})  # warm the card up
            details = client.health().details
        threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    assert len(results) == 32
    for result in results:
        np.testing.assert_array_equal(result["y"], np.full((1, 4), 2 * result["i"] + 1))
        assert result["device"][0] == "cuda:0"  # the worker sees only its card
        assert result["card"][0] != "cpu"
    assert max(int(r["batch"][0]) for r in results) > 1, "no two requests shared a batch"
    assert f"placement.{placed}" in details
