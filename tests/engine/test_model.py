"""One model behind its batcher: identity, sharing, and errors named for each node.

The worker pool is a fake here: what a worker answers is set by each test.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dag import load_pipeline
from engine.observability.metrics import Metrics
from engine.runtime.assembly import plan_placement, serve_pipeline
from engine.runtime.devices import CpuInfo, DeviceInventory
from engine.runtime.model import ModelRunner
from model_plugins import BatchContractError, InferenceError, InvalidRequest, Partial

# Three nodes of one plugin: `a` and `c` are one model; `b` waits longer before its worker is
# replaced, so it is a model of its own.
PIPELINE = """
name: p
inputs:
  x: {dtype: float32, shape: [1]}
nodes:
  a:
    plugin: tests.plugins:Scale
    timeout_ms: 500
    batching: {max_batch_size: 8}
    inputs: {x: $inputs.x}
  b:
    plugin: tests.plugins:Scale
    timeout_ms: 2000
    batching: {max_batch_size: 8}
    inputs: {x: $inputs.x}
  c:
    plugin: tests.plugins:Scale
    timeout_ms: 500
    batching: {max_batch_size: 8}
    inputs: {x: $inputs.x}
outputs:
  a: a.y
  b: b.y
  c: c.y
"""


class FakeWorkers:
    """Answers each predict with ``answer(inputs)``; records the calls."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.calls: list[dict] = []

    async def predict(self, key, model_id, inputs, **options):
        self.calls.append({"model_id": model_id, "inputs": inputs, **options})
        return self.answer(inputs)


def serve(tmp_path: Path, workers: FakeWorkers):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    pipeline = load_pipeline(path)
    placement, ids = plan_placement([pipeline], DeviceInventory.cpu_only(CpuInfo(8, 32000)))
    models: dict = {}
    with ThreadPoolExecutor(1) as pool:
        served = serve_pipeline(pipeline, pool, workers, models, placement, ids, Metrics())
    return served.runners, models


def test_nodes_with_another_timeout_ms_get_a_model_of_their_own(tmp_path):
    runners, models = serve(tmp_path, FakeWorkers(lambda inputs: inputs))
    by_id = {m.model_id: m for m in models.values()}
    assert sorted(by_id) == ["p/a", "p/b"]
    assert by_id["p/a"].nodes == ["p/a", "p/c"]
    assert by_id["p/a"].timeout_s == 0.5
    assert by_id["p/b"].timeout_s == 2.0
    assert all(isinstance(r, ModelRunner) for r in runners.values())
    assert runners["a"].model is runners["c"].model is by_id["p/a"]


async def test_a_shared_models_error_names_the_node_of_each_request(tmp_path):
    def fail(inputs):
        raise InferenceError("plugin 'tests.plugins:Scale' failed: builtins.ValueError: boom")

    workers = FakeWorkers(fail)
    runners, _ = serve(tmp_path, workers)
    x = np.ones((1, 1), np.float32)
    # `a` and `c` go through one model and its batcher, into one batch
    got = await asyncio.gather(
        runners["a"].run({"x": x}, deadline=None),
        runners["c"].run({"x": x}, deadline=None),
        return_exceptions=True,
    )
    for node, error in zip("ac", got, strict=True):
        assert isinstance(error, InferenceError)
        assert error.node == node
        assert error.plugin == "tests.plugins:Scale"
        assert str(error) == (
            f"node {node!r}: plugin 'tests.plugins:Scale' failed: builtins.ValueError: boom"
        )
    assert workers.calls[0]["instance"] == 0
    assert "node" not in workers.calls[0]  # the model names no node: its batch serves two


async def test_a_partial_result_fails_the_item_of_its_own_request_only(tmp_path):
    def partial(inputs):
        x = inputs["x"]
        bad = {int(i): InvalidRequest("negative") for i in np.flatnonzero(x[:, 0] < 0)}
        return Partial({"y": x * 2}, errors=bad)

    workers = FakeWorkers(partial)
    runners, _ = serve(tmp_path, workers)
    good = np.array([[1], [2]], np.float32)
    bad = np.array([[3], [-4]], np.float32)
    answers = await asyncio.gather(
        runners["a"].run({"x": good}, deadline=None),
        runners["c"].run({"x": bad}, deadline=None),
        return_exceptions=True,
    )
    np.testing.assert_array_equal(answers[0]["y"], good * 2)
    assert isinstance(answers[1], InvalidRequest)
    assert str(answers[1]) == "node 'c': item 1: negative"
    assert answers[1].field == "c"


async def test_the_batch_contract_is_checked_on_what_the_worker_returns(tmp_path):
    runners, _ = serve(tmp_path, FakeWorkers(lambda inputs: {"y": np.zeros((5, 1), np.float32)}))
    with pytest.raises(BatchContractError) as info:
        await runners["b"].run({"x": np.ones((2, 1), np.float32)}, deadline=None)
    assert info.value.node == "b"
    assert str(info.value).startswith("node 'b': plugin 'tests.plugins:Scale' broke the batch")
