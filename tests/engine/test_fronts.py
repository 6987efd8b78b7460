"""``front_processes: 2``: two processes serve one port, and the server is still one.

Connections land on either front (the kernel spreads them, SO_REUSEPORT); every model item goes
to the first front's batcher, so batches hold the items of both; metrics and health count the
server as one; a second front that dies is started again; shutdown drains both.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import urllib.request

import numpy as np
import pytest

from engine.fronts import MAX_AUTO_FRONTS, front_count, per_front
from engine.observability.metrics import Counter, Gauge, Histogram
from engine.transport.client import Client
from model_plugins.errors import DeadlineExceeded, InferenceError
from tests.serving import PIPELINES, serving, wait_until

CONNECTIONS = 16


@pytest.fixture(scope="module")
def server():
    paths = [PIPELINES / "fronts.yaml", PIPELINES / "slow.yaml"]
    with serving(paths, front_processes=2, metrics_port=0) as thread:
        yield thread


def _infer(port: int, value: float, **options) -> dict[str, np.ndarray]:
    with Client("127.0.0.1", port) as client:
        x = np.full((1, 2), value, np.float32)
        return client.infer("fronts", {"x": x}, **options).outputs


def _requests_by_front(engine, pipeline: str = "fronts") -> tuple[float, float]:
    """Requests of ``pipeline`` counted by the first front itself, and reported by the second."""
    own = sum(v for k, v in engine.metrics.requests.snapshot().items() if k[0] == pipeline)
    remote = sum(
        v for k, v in engine.metrics.requests._remote.get(1, {}).items() if k[0] == pipeline
    )
    return own, remote


@pytest.mark.e2e
def test_both_fronts_serve_the_port_and_their_items_meet_in_one_batcher(server):
    model = next(m for m in server.engine.models.values() if m.model_id == "fronts/probe")
    before = model.batcher.statistics()
    values = [float(i) for i in range(96)]
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        results = list(pool.map(lambda v: _infer(server.port, v), values))
    for value, out in zip(values, results, strict=True):
        np.testing.assert_array_equal(out["y"], [[2 * value, 2 * value]])  # each got its own
    after = model.batcher.statistics()
    # every item of both fronts went through the first front's one batcher, in shared batches
    assert after.items - before.items == len(values)
    assert after.batches - before.batches < len(values)
    # and both fronts answered some of the requests (16 connections over two listeners)
    own, _ = wait_until(
        lambda: (counts := _requests_by_front(server.engine))[1] > 0 and counts,
        "the second front reported the requests it served",
    )
    assert own > 0


@pytest.mark.e2e
def test_metrics_and_health_count_the_server_as_one(server):
    def total_ok() -> float:
        url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [
            line for line in text.splitlines()
            if line.startswith('dagserve_requests_total{pipeline="fronts",status="ok"')
        ]  # fmt: skip
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    start = total_ok()
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        list(pool.map(lambda v: _infer(server.port, v), [1.0] * 48))
    # the second front reports every second: the sum reaches exactly 48 more
    wait_until(lambda: total_ok() == start + 48, "/metrics counted both fronts' requests")
    # whichever front a connection reached, health answers for the whole server
    for _ in range(8):
        with Client("127.0.0.1", server.port) as client:
            details = client.health().details
        assert details["fronts"] == "2"
        assert "ready=True" in details["front.1"]
        assert "model.fronts/probe" in details


@pytest.mark.e2e
def test_errors_and_deadlines_come_back_typed_from_either_front(server):
    # Several connections: the kernel puts some on each front (1 in 2^16 that none reach one).
    def bad(_: int) -> BaseException | None:
        try:
            _infer(server.port, -1.0)
        except InferenceError as exc:
            return exc
        return None

    def late(_: int) -> BaseException | None:
        with Client("127.0.0.1", server.port) as client:
            try:
                client.infer("slow", {"x": np.ones((1, 2), np.float32)}, timeout_ms=200)
            except DeadlineExceeded as exc:
                return exc
        return None

    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        errors = list(pool.map(bad, range(CONNECTIONS)))
        late_errors = list(pool.map(late, range(CONNECTIONS)))
    assert all(isinstance(e, InferenceError) and e.node == "check" for e in errors)
    assert all("negative input is not allowed" in str(e) for e in errors)
    assert all(isinstance(e, DeadlineExceeded) for e in late_errors)

    def failures_by_front() -> tuple[float, float]:
        metrics = server.engine.metrics.requests
        own = sum(v for k, v in metrics.snapshot().items() if k[2] != "ok")
        remote = sum(v for k, v in metrics._remote.get(1, {}).items() if k[2] != "ok")
        return own, remote

    wait_until(lambda: min(failures_by_front()) > 0, "both fronts answered failures")


@pytest.mark.e2e
def test_a_second_front_that_dies_is_started_again_and_the_port_keeps_serving(server):
    fronts = server.server.fronts
    (pid,) = fronts.pids
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: fronts.pids[0] != pid, "a new second front", timeout_s=30)
    wait_until(lambda: server.server.ready, "the server is ready again", timeout_s=60)
    with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
        results = list(pool.map(lambda v: _infer(server.port, v), [3.0] * 32))
    assert all(out["y"][0, 0] == 6.0 for out in results)


@pytest.mark.e2e
def test_shutdown_lets_requests_in_flight_on_both_fronts_finish():
    # 2 s a batch: requests in flight when the server is told to stop still answer.
    paths = [PIPELINES / "fronts_slow.yaml"]
    with serving(paths, front_processes=2, drain_timeout_s=20) as thread:

        def call(value: float) -> np.ndarray:
            with Client("127.0.0.1", thread.port, timeout_s=60) as client:
                x = np.full((1, 2), value, np.float32)
                return client.infer("fronts_slow", {"x": x}).outputs["y"]

        metrics = thread.engine.metrics
        with concurrent.futures.ThreadPoolExecutor(CONNECTIONS) as pool:
            futures = {v: pool.submit(call, v) for v in range(CONNECTIONS)}
            wait_until(lambda: min(_inflight(metrics)) > 0, "requests in flight on both fronts")
            thread.run(thread.server.shutdown(), timeout_s=60)
            for value, future in futures.items():
                np.testing.assert_array_equal(future.result(timeout=60), [[2 * value] * 2])


def _inflight(metrics) -> tuple[float, float]:
    """Requests in flight on the first front, and on the second as it last reported."""
    return (
        sum(metrics.inflight.snapshot().values()),
        sum(metrics.inflight._remote.get(1, {}).values()),
    )


def test_auto_is_one_front_per_core_up_to_a_cap() -> None:
    assert front_count("auto", cores=1) == 1
    assert front_count("auto", cores=2) == 2
    assert front_count("auto", cores=64) == MAX_AUTO_FRONTS
    assert front_count(3, cores=64) == 3
    assert per_front(4096, 3) == 1366
    assert per_front(None, 3) is None


def test_families_add_other_fronts_numbers_and_keep_a_retired_fronts_counts() -> None:
    counter = Counter("c", "", ["a"])
    counter.inc("x")
    counter.absorb(1, {("x",): 2.0, ("y",): 1.0})
    assert {s.labels["a"]: s.value for s in counter.collect().samples if s.name == "c_total"} == {
        "x": 3.0, "y": 1.0,
    }  # fmt: skip
    counter.retire(1)  # the front ended: its counts stay
    counter.absorb(1, {("x",): 1.0})  # its successor starts from 0
    assert {s.labels["a"]: s.value for s in counter.collect().samples if s.name == "c_total"} == {
        "x": 4.0, "y": 1.0,
    }  # fmt: skip
    gauge = Gauge("g", "", [])
    gauge.inc()
    gauge.absorb(1, {(): 5.0})
    assert gauge.collect().samples[0].value == 6.0
    gauge.retire(1)  # a gauge of a front that ended is gone
    assert gauge.collect().samples[0].value == 1.0
    histogram = Histogram("h", "", [], [1.0])
    histogram.observe(0.5)
    histogram.absorb(1, {(): ([1, 2], 4.5)})
    samples = {s.name + s.labels.get("le", ""): s.value for s in histogram.collect().samples}
    assert (samples["h_bucket1.0"], samples["h_bucket+Inf"]) == (2, 4)
    assert (samples["h_count"], samples["h_sum"]) == (4, 5.0)


@pytest.mark.e2e
def test_a_rollout_under_load_reaches_every_front_and_fails_no_request(tmp_path):
    # Each admin change returns once every front serves it: a front still routing to a
    # version whose models the first front unloads would fail its requests.
    from tests.engine.test_lifecycle import Load, roll_out, versions_in

    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    with (
        serving([v1], front_processes=2, state_file=tmp_path / "state.json") as server,
        Load(server.port, clients=8) as load,
    ):
        roll_out(server, load, v2, {"1": 0.5, "2": 0.5}, at_least=200, in_canary=200,
                 timeout_s=120)  # fmt: skip
        own, _ = wait_until(
            lambda: (counts := _requests_by_front(server.engine, "scale"))[1] > 0 and counts,
            "the second front served some of the requests",
        )
        assert own > 0
    assert load.failures == []
    assert load.wrong == []
    assert set(load.at("v1")) == set(load.at("loaded")) == {("1", 2.0)}
    assert set(load.at("canary")) == {("1", 2.0), ("2", 3.0)}
    assert set(load.at("promoted")) == {("2", 3.0)}
    # after the reload and the unload, no front answers with the old file or the old version
    assert set(load.at("reloaded")) == set(load.at("v2")) == {("2", 5.0)}
