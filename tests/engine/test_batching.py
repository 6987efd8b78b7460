"""Dynamic batching through the whole server: requests meet in batches, models are shared."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest

from engine.transport.client import Client
from model_plugins.errors import InvalidRequest, Overloaded
from tests.serving import PIPELINES, occupy, serving, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server():
    names = ("batched_a", "batched_b", "partial", "branches")
    paths = [PIPELINES / f"{name}.yaml" for name in names]
    with serving(paths) as thread:
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


def test_two_branches_of_one_request_meet_in_one_batch_of_their_shared_model(server):
    model = next(m for m in server.engine.models.values() if m.model_id == "branches/left")
    assert model.nodes == ["branches/left", "branches/right"]  # one model, 0.2 s a call
    x = np.ones((1, 2), np.float32)
    seconds = []
    with Client("127.0.0.1", server.port) as client:
        client.infer("branches", {"x": x})  # the first call of the worker
        before = model.statistics()
        for _ in range(3):
            started = time.perf_counter()
            out = client.infer("branches", {"x": x}).outputs
            seconds.append(time.perf_counter() - started)
            assert int(out["left_batch"][0]) == int(out["right_batch"][0]) == 2
    after = model.statistics()
    assert after.batches - before.batches == 3
    assert after.batch_sizes[2] - before.batch_sizes.get(2, 0) == 3  # one batch of 2 each
    assert min(seconds) < 1.5 * 0.2  # one model call, not two in a row (0.4 s)


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


def test_a_model_fails_bad_items_alone_and_answers_their_neighbours_in_the_same_batch(server):
    model = next(m for m in server.engine.models.values() if m.model_id == "partial/check")
    good = [np.full((1, 2), v, np.float32) for v in range(1, 9)]
    bad = [np.full((1, 2), -1, np.float32), np.full((1, 2), -2, np.float32)]
    mixed = [np.array([[10, 0], [-3, 0], [11, 0]], np.float32)] * 2  # its item 1 is bad
    requests = good + bad + mixed  # 16 items: one batch of max_batch_size

    def infer(x: np.ndarray) -> dict[str, np.ndarray] | InvalidRequest:
        with Client("127.0.0.1", server.port) as client:
            try:
                return client.infer("partial", {"x": x}).outputs
            except InvalidRequest as exc:
                return exc

    before = model.statistics()
    # While one request holds the only instance (0.5 s), the 12 requests queue up together.
    busy = occupy(server, "partial", "partial/check", {"x": np.zeros((1, 2), np.float32)}, "y")
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        futures = [pool.submit(infer, x) for x in requests]
        wait_until(lambda: model.statistics().queued_items == 16, "16 items queued")
        results = [f.result() for f in futures]
    busy.join(10)

    answered = results[: len(good)]
    for x, out in zip(good, answered, strict=True):
        assert isinstance(out, dict), out
        np.testing.assert_array_equal(out["y"], x * 2)
        assert out["batch"][0] == 16  # with every other request, bad items included
        assert out["failed"][0] == 4
    assert len({int(out["call"][0]) for out in answered}) == 1  # all in one predict call
    for x, error in zip(bad, results[len(good) : len(good) + 2], strict=True):
        assert isinstance(error, InvalidRequest)
        assert str(error) == f"node 'check': item 0: x[0] is {x[0, 0]:g}, must be >= 0"
    for error in results[-2:]:
        assert isinstance(error, InvalidRequest)
        assert str(error) == "node 'check': item 1: x[0] is -3, must be >= 0"
    # predict ran once per batch: the busy one and the 16 items; none of them ran again
    after = model.statistics()
    assert after.batches - before.batches == 2
    assert after.items - before.items == 17
    assert after.failed_requests - before.failed_requests == 4


def test_the_server_wide_inflight_limit_answers_overloaded_at_once():
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
