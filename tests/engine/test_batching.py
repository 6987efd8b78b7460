"""Dynamic batching through the whole server: requests meet in batches, models are shared."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from engine.transport.client import Client
from model_plugins.errors import InvalidRequest, Overloaded
from tests.serving import PIPELINES, occupy, serving

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    with serving([PIPELINES / "batched_a.yaml", PIPELINES / "batched_b.yaml"]) as thread:
        yield thread


def call(port: int, pipeline: str, value: float) -> dict[str, np.ndarray]:
    name = "x" if pipeline == "batched_a" else "features"
    with Client("127.0.0.1", port) as client:
        x = np.full((1, 2), value, np.float32)
        return client.infer(pipeline, {name: x}, outputs=["y", "batch"]).outputs


def test_an_idle_model_answers_a_lone_request_in_a_batch_of_one(server):
    out = call(server.port, "batched_a", 1.0)
    assert out["batch"][0] == 1
    np.testing.assert_array_equal(out["y"], [[2, 2]])


def test_concurrent_requests_of_two_pipelines_share_batches_of_one_model(server):
    engine = server.engine
    shared = [m for m in engine.models.values() if m.model_id == "batched_a/probe"]
    assert len(shared) == 1
    assert shared[0].nodes == ["batched_a/probe", "batched_b/same_probe"]
    before = shared[0].batcher.statistics()
    jobs = [("batched_a" if i % 2 else "batched_b", float(i)) for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda job: call(server.port, *job), jobs))
    for (_, value), out in zip(jobs, results, strict=True):
        np.testing.assert_array_equal(out["y"], [[2 * value, 2 * value]])  # each got its own
    after = shared[0].batcher.statistics()
    batches = after.batches - before.batches
    assert after.items - before.items == 48
    assert batches < 48  # batches formed: fewer calls than requests
    assert max(int(out["batch"][0]) for out in results) > 1


def test_variable_length_items_are_padded_and_cut_back(server):
    with Client("127.0.0.1", server.port) as client:

        def one(length: int) -> dict[str, np.ndarray]:
            ids = np.arange(1, length + 1, dtype=np.int64)[None]
            return client.infer(
                "batched_b",
                {"features": np.zeros((1, 2), np.float32), "ids": ids},
                outputs=["tokens", "total"],
            ).outputs

        for length in (1, 4, 9):
            out = one(length)
            np.testing.assert_array_equal(out["tokens"][0], 2 * np.arange(1, length + 1))
            assert out["total"][0] == length * (length + 1) // 2


def test_statistics_reach_health(server):
    with Client("127.0.0.1", server.port) as client:
        details = client.health().details
    assert any(key.startswith("model.batched_a/probe") for key in details)


def test_a_request_larger_than_the_whole_queue_is_invalid_and_names_the_limit(server):
    shared = next(m for m in server.engine.models.values() if m.model_id == "batched_a/probe")
    assert shared.batcher.max_queue == 64
    with Client("127.0.0.1", server.port) as client:
        # 65 items in one request can never fit a queue of 64: no retry would help
        with pytest.raises(InvalidRequest) as info:
            client.infer("batched_a", {"x": np.zeros((65, 2), np.float32)})
        message = str(info.value)
        assert "model 'batched_a/probe'" in message
        assert "65 items" in message
        assert "max_queue 64" in message
        # the whole queue's worth is served (split across batches of 16)
        out = client.infer("batched_a", {"x": np.ones((64, 2), np.float32)}).outputs
    assert out["y"].shape == (64, 2)


def test_the_server_wide_inflight_limit_answers_overloaded_at_once():
    import time

    with serving([PIPELINES / "workers.yaml"], max_inflight=1) as thread:
        x = np.ones((1, 2), np.float32)
        first = occupy(thread, "workers", "workers/slow_a", {"x": x}, "a")
        with Client("127.0.0.1", thread.port) as client:
            started = time.monotonic()
            with pytest.raises(Overloaded, match="max_inflight 1") as info:
                client.infer("workers", {"x": x}, outputs=["a"])
            refused_in = time.monotonic() - started
        first.join(10)
    assert info.value.retry_after_ms > 0
    assert refused_in < 0.25  # answered at once, not after the 0.3 s request in flight
