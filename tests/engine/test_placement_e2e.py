"""Placement through the server: models land on the GPUs of an explicit inventory.

No GPU is needed: the plugins are numpy code that declares a GPU framework, and the inventory
is given in the server config, as an operator would to reserve cards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.runtime.placement import PlacementError
from engine.transport.client import Client
from tests.serving import serving

pytestmark = pytest.mark.e2e

GPUS = [
    {"index": 0, "name": "FakeCard", "memory_mb": 16000},
    {"index": 1, "name": "FakeCard", "memory_mb": 8000},
]


def pipeline(tmp_path: Path, nodes: dict[str, str]) -> Path:
    text = "name: gpu\ninputs: {x: {dtype: float32, shape: [-1]}}\nnodes:\n"
    for name, extra in nodes.items():
        text += (
            f"  {name}:\n    plugin: tests.plugins:Env\n    framework: torch\n"
            f"    params: {{tag: {name}}}\n"  # distinct models (the same ones would be shared)
            f"    inputs: {{x: $inputs.x}}\n    {extra}\n"
        )
    text += "outputs:\n" + "".join(f"  {n}: {n}.visible\n  {n}_device: {n}.device\n" for n in nodes)
    path = tmp_path / "gpu.yaml"
    path.write_text(text)
    return path


def test_models_are_packed_by_memory_and_each_worker_sees_only_its_card(tmp_path):
    path = pipeline(
        tmp_path,
        {
            "big": "gpu_memory_mb: 12000",
            "small": "gpu_memory_mb: 6000",  # does not fit next to big on cuda:0
            "pinned": "device: cuda:0\n    gpu_memory_mb: 1000",
        },
    )
    with serving([path], gpus=GPUS) as server:
        placement = server.engine.placement
        assert placement.models == {
            "gpu/big": "cuda:0",
            "gpu/small": "cuda:1",
            "gpu/pinned": "cuda:0",
        }
        with Client("127.0.0.1", server.port) as client:
            out = client.infer("gpu", {"x": np.zeros((1, 1), np.float32)}).outputs
            details = client.health().details
    assert out["big"][0] == "0"
    assert out["small"][0] == "1"
    assert out["pinned"][0] == "0"
    # Each worker sees only its card, so every plugin is told cuda:0 (cuda:1 would be an
    # invalid ordinal inside the worker of card 1); the physical index stays in placement.
    assert out["big_device"][0] == "cuda:0"
    assert out["small_device"][0] == "cuda:0"
    assert out["pinned_device"][0] == "cuda:0"
    assert set(server.engine.workers.statistics()) == {"torch@cuda:0", "torch@cuda:1"}
    assert "placement.cuda:0" in details
    assert "memory=13000/16000MB" in details["placement.cuda:0"]


def test_a_pipeline_that_does_not_fit_is_refused_at_startup(tmp_path):
    path = pipeline(
        tmp_path,
        {
            "a": "gpu_memory_mb: 4000\n    gpu_share: 0.6",
            "b": "gpu_memory_mb: 4000\n    gpu_share: 0.6",
            "c": "gpu_memory_mb: 4000\n    gpu_share: 0.6",  # memory left, compute spoken for
        },
    )
    with pytest.raises(PlacementError) as info, serving([path], gpus=GPUS):
        pass
    text = str(info.value)
    assert "node 'c'" in text or "node 'a'" in text or "node 'b'" in text
    assert "cuda:0" in text
    assert "cuda:1" in text


def test_without_gpus_auto_models_run_on_the_cpu(tmp_path):
    path = pipeline(tmp_path, {"m": "gpu_memory_mb: 1000"})
    with serving([path], gpus=[]) as server:
        assert server.engine.placement.models == {"gpu/m": "cpu"}
        with Client("127.0.0.1", server.port) as client:
            out = client.infer("gpu", {"x": np.zeros((1, 1), np.float32)}).outputs
    assert out["m"][0] == ""
