"""Warm-up: a version runs its ``warmup:`` samples (generated, or from an npz file) through
every node and variant before it takes traffic; a warm-up that fails stops the load, naming
the node.  The plugins count their calls (tests/pipelines/variants/variant_plugins.py:
Counted answers which call of its instance served an item)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.errors import LifecycleError
from engine.runtime.devices import CpuInfo, DeviceInventory
from engine.runtime.engine import Engine
from engine.runtime.loading import load_for_serving
from engine.runtime.types import InferenceRequest
from engine.runtime.variants import set_variant_weights
from engine.runtime.workers.pool import WorkerPool
from engine.transport.client import Client
from model_plugins.errors import PluginLoadError
from tests.serving import PIPELINES, serving

PLUGINS = "tests.pipelines.variants.variant_plugins"
X = np.ones((1, 2), np.float32)


def engine_of(paths: list[Path]) -> Engine:
    pipelines, errors = load_for_serving(paths)
    assert not errors, "\n".join(str(e) for e in errors)
    inventory = DeviceInventory.cpu_only(CpuInfo(2, 4000))
    return Engine(pipelines, workers=WorkerPool(), inventory=inventory)


def write(
    folder: Path,
    *,
    warmup: str = "",
    node_warmup: str = "",
    variants: str = "",
    params: str = "{fail_below: 0}",
) -> Path:
    """Pipeline ``w``: one Counted node ``check`` on a thread (x float32[2] -> y, call)."""
    path = folder / "w.yaml"
    path.write_text(
        "name: w\n"
        "inputs:\n"
        "  x: {dtype: float32, shape: [2]}\n"
        f"{warmup}"
        "nodes:\n"
        "  check:\n"
        f"    plugin: {PLUGINS}:Counted\n"
        "    runner: thread\n"
        f"    params: {params}\n"
        f"{node_warmup}{variants}"
        "    inputs: {x: $inputs.x}\n"
        "outputs:\n"
        "  call: check.call\n"
    )
    return path


@pytest.mark.e2e
def test_every_node_and_variant_is_warmed_up_before_the_server_takes_requests():
    warm = PIPELINES / "variants" / "warm.yaml"
    with serving([warm]) as server, Client("127.0.0.1", server.port) as client:
        first = client.infer("warm", {"x": X})
        # a: 3 requests through the pipeline, then this one; b: 3, its own 2, this one
        assert (int(first.outputs["a"][0]), int(first.outputs["b"][0])) == (4, 6)
        # the canary of `a` (weight 0: never answered yet) was warmed up as well
        set_variant_weights(server.engine.find("warm").runners, "a", {"canary": 100})
        canary = client.infer("warm", {"x": X})
        assert int(canary.outputs["a"][0]) == 4
        assert set(canary.node_latency_us) == {"a@canary", "b"}


async def test_a_warmup_file_is_read_beside_the_pipeline_and_runs_before_ready(tmp_path):
    np.savez(tmp_path / "samples.npz", x=np.arange(8, dtype=np.float64).reshape(4, 2))
    engine = engine_of([write(tmp_path, warmup="warmup: {file: samples.npz}\n")])
    try:
        await engine.start()
        result = await engine.infer(InferenceRequest("w", {"x": X}, "r"))
        assert int(result.outputs["call"][0]) == 5  # 4 samples, then this request
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (
            {"warmup": "warmup: {file: bad.npz}\n"},
            "pipeline 'w' version '1': warm-up request 2 of 2 failed at node 'check': ",
        ),
        (
            {"node_warmup": "    warmup: {file: bad.npz}\n"},
            "pipeline 'w' version '1': warm-up request 2 of 2 failed at node 'check': ",
        ),
        (
            {
                "warmup": "warmup: {file: bad.npz}\n",
                "variants": "    variants:\n      lax: {params: {}}\n      strict: {}\n",
            },
            # the node refuses first; the variant `lax` would have passed
            "failed at node 'check': ",
        ),
    ],
)
async def test_a_failing_warmup_stops_the_start_naming_the_node(tmp_path, options, words):
    np.savez(tmp_path / "bad.npz", x=np.array([[1, 1], [-1, 1]], np.float32))
    engine = engine_of([write(tmp_path, **options)])
    with pytest.raises(PluginLoadError) as caught:
        await engine.start()
    assert words in caught.value.message
    assert "x[0] below 0 is refused" in caught.value.message
    assert not engine.ready


async def test_a_failing_variant_is_named_node_at_variant(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.array([[-1, 1]], np.float32))
    path = write(
        tmp_path,
        warmup="warmup: {file: bad.npz}\n",
        params="{}",  # the node takes -1; its variant refuses it
        variants="    variants:\n      strict: {params: {fail_below: 0}}\n",
    )
    engine = engine_of([path])
    with pytest.raises(PluginLoadError, match=r"failed at node 'check@strict': .*below 0"):
        await engine.start()


async def test_a_warmup_file_that_does_not_fit_is_refused_naming_it(tmp_path):
    np.savez(tmp_path / "odd.npz", z=np.zeros((2, 2), np.float32))
    engine = engine_of([write(tmp_path, warmup="warmup: {file: odd.npz}\n")])
    with pytest.raises(PluginLoadError) as caught:
        await engine.start()
    message = caught.value.message
    assert "odd.npz" in message
    assert "arrays ['z'] are not inputs (inputs: x)" in message


async def test_a_version_loaded_at_run_time_whose_warmup_fails_is_refused(tmp_path):
    serving_now = write(tmp_path)
    (tmp_path / "v2").mkdir()
    np.savez(tmp_path / "v2" / "bad.npz", x=np.array([[-1, 1]], np.float32))
    broken = write(tmp_path / "v2", warmup="warmup: {file: bad.npz}\n")
    broken.write_text(broken.read_text().replace("name: w\n", 'name: w\nversion: "2"\n'))
    engine = engine_of([serving_now])
    try:
        await engine.start()
        with pytest.raises(LifecycleError, match="failed at node 'check'"):
            await engine.lifecycle.load(broken)
        result = await engine.infer(InferenceRequest("w", {"x": X}, "r"))
        assert result.version == "1"
        assert [s.version for s in engine.lifecycle.versions() if s.state == "ready"] == ["1"]
    finally:
        await engine.aclose()


@pytest.mark.parametrize(
    ("options", "node_calls_before"),
    [
        ({}, 1),  # nothing declared: one request of zeros warms the node
        # a variant's warmup: the zeros request does not run through the node
        ({"variants": "    variants:\n      canary: {warmup: {samples: 2}}\n"}, 0),
        ({"node_warmup": "    warmup: {samples: 2}\n"}, 2),
    ],
)
async def test_a_version_loaded_at_run_time_gets_zeros_only_when_it_declares_no_warmup(
    tmp_path, options, node_calls_before
):
    (tmp_path / "v2").mkdir()
    loaded = write(tmp_path / "v2", **options)
    loaded.write_text(loaded.read_text().replace("name: w\n", 'name: w\nversion: "2"\n'))
    engine = engine_of([write(tmp_path)])
    try:
        await engine.start()
        await engine.lifecycle.load(loaded)
        result = await engine.infer(InferenceRequest("w", {"x": X}, "r", version="2"))
        assert int(result.outputs["call"][0]) == node_calls_before + 1
        if "variants" in options:  # the canary ran its own 2 samples, and nothing else
            await engine.lifecycle.set_variant_weights("w", "2", "check", {"canary": 100})
            canary = await engine.infer(InferenceRequest("w", {"x": X}, "r", version="2"))
            assert int(canary.outputs["call"][0]) == 3
    finally:
        await engine.aclose()
