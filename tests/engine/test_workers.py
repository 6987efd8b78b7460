"""Model plugins in worker processes: sharing, concurrency, errors, crashes and hangs."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import threading
import time

import numpy as np
import pytest

from engine.runtime.types import InferenceRequest
from engine.transport.client import Client
from model_plugins.errors import BatchContractError, InferenceError
from tests.serving import PIPELINES, occupy, serving, wait_until

pytestmark = pytest.mark.e2e

X = np.ones((1, 4), np.float32)


@pytest.fixture(scope="module")
def server():
    paths = [PIPELINES / "workers.yaml", PIPELINES / "isolated.yaml"]
    # A loaded machine may hold a ping up for a second: 3 s tells a hung worker all the same.
    with serving(paths, worker_ping_interval_s=0.2, worker_ping_timeout_s=3.0) as thread:
        yield thread


@pytest.fixture
def client(server):
    with Client("127.0.0.1", server.port, timeout_s=30) as c:
        yield c


def worker_pid(server, name: str) -> int:
    return int(server.engine.workers.statistics()[name]["pid"])


def test_models_of_one_framework_share_one_worker(server, client):
    got = client.infer("workers", {"x": X}, outputs=["pid"]).outputs["pid"][0]
    also = client.infer("isolated", {"x": X}, outputs=["numpy_pid", "other_pid"]).outputs
    assert got == also["numpy_pid"][0] == worker_pid(server, "numpy@cpu")
    assert also["other_pid"][0] == worker_pid(server, "tensorflow@cpu")
    assert got != os.getpid()
    assert also["other_pid"][0] != got
    stats = server.engine.workers.statistics()
    # isolated/numpy_side is the same model as workers/where (plugin, params, device): shared
    assert sorted(stats["numpy@cpu"]["models"]) == [
        "isolated/fail", "isolated/wrong", "workers/slow_a", "workers/slow_b", "workers/where",
    ]  # fmt: skip


def test_two_models_in_one_worker_run_side_by_side(server, client):
    # slow_a and slow_b sleep 0.3 s each in the same worker process; the times they report
    # from inside the worker show their runs overlapping.
    out = client.infer("workers", {"x": X}, outputs=["a_start", "a_end", "b_start", "b_end"])
    a_start, a_end = out.outputs["a_start"][0], out.outputs["a_end"][0]
    b_start, b_end = out.outputs["b_start"][0], out.outputs["b_end"][0]
    assert a_start < b_end
    assert b_start < a_end


def test_a_plugin_that_raises_fails_its_request_and_the_worker_lives_on(server, client):
    pid = worker_pid(server, "numpy@cpu")
    with pytest.raises(InferenceError) as info:
        client.infer("isolated", {"x": -X}, outputs=["checked"])
    assert info.value.node == "fail"
    assert "builtins.ValueError: negative input is not allowed" in str(info.value)
    assert worker_pid(server, "numpy@cpu") == pid
    assert client.infer("isolated", {"x": X}, outputs=["checked"]).outputs["checked"].shape == (
        1,
        4,
    )


def test_wrong_number_of_items_gives_both_numbers(client):
    with pytest.raises(InferenceError) as info:
        client.infer("isolated", {"x": np.ones((3, 4), np.float32)}, outputs=["wrong"])
    assert info.value.node == "wrong"
    assert "3 items" in str(info.value)
    assert "has 4" in str(info.value)


def test_batch_contract_error_is_the_typed_class_inside_the_server(server):
    request = InferenceRequest("isolated", {"x": X}, request_id="r", outputs=["wrong"])
    with pytest.raises(BatchContractError) as info:
        server.run(server.engine.execute(server.engine.find("isolated"), request))
    assert (info.value.expected, info.value.actual) == (1, 2)


@pytest.mark.slow
def test_sigkill_under_load_fails_in_flight_fast_and_spares_other_workers(server):
    old_pid = worker_pid(server, "numpy@cpu")
    stop = threading.Event()
    failures: dict[str, list[tuple[float, BaseException]]] = {"numpy": [], "other": []}
    successes = {"numpy": 0, "other": 0}

    def load(kind: str) -> None:
        pipeline, outputs = ("workers", ["a"]) if kind == "numpy" else ("isolated", ["other_pid"])
        with Client("127.0.0.1", server.port, timeout_s=30) as c:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    c.infer(pipeline, {"x": X}, outputs=outputs)
                    successes[kind] += 1
                except InferenceError as exc:
                    failures[kind].append((time.monotonic() - started, exc))

    slow_a = next(m for m in server.engine.models.values() if m.model_id == "workers/slow_a")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(load, k) for k in ("numpy", "numpy", "numpy", "other", "other")]
        # both kinds of load are served, and a request is inside the worker now
        wait_until(
            lambda: successes["numpy"] and successes["other"]
            and slow_a.batcher.statistics().busy_instances,
            "both loads served and slow_a busy",
        )  # fmt: skip
        os.kill(old_pid, signal.SIGKILL)
        # the worker comes back, and answers again
        wait_until(
            lambda: worker_pid(server, "numpy@cpu") != old_pid
            and server.engine.workers.statistics()["numpy@cpu"]["ready"],
            "numpy@cpu replaced",
        )  # fmt: skip
        before = successes["numpy"]
        wait_until(lambda: successes["numpy"] > before, "a numpy request served after the restart")
        stop.set()
        for f in futures:
            f.result(timeout=60)

    assert failures["other"] == []  # the other worker's requests never failed
    assert failures["numpy"], "the in-flight requests on the killed worker should have failed"
    for elapsed, exc in failures["numpy"]:
        # slow_a sleeps 0.3 s, so a request had at most that long to go when the kill came
        assert elapsed < 2.0
        assert exc.node == "slow_a"
        assert "died" in str(exc)
    assert successes["numpy"] > before  # the worker came back and serves again
    assert server.engine.workers.statistics()["numpy@cpu"]["restarts"] >= 1


@pytest.mark.slow
def test_a_hung_worker_is_replaced(server, client):
    old_pid = worker_pid(server, "tensorflow@cpu")
    os.kill(old_pid, signal.SIGSTOP)  # alive but silent: only the ping notices
    try:
        wait_until(
            lambda: worker_pid(server, "tensorflow@cpu") != old_pid, "tensorflow@cpu replaced"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old_pid, signal.SIGKILL)
    assert worker_pid(server, "tensorflow@cpu") != old_pid
    result = client.infer("isolated", {"x": X}, outputs=["other_pid"])
    assert result.outputs["other_pid"][0] == worker_pid(server, "tensorflow@cpu")


def test_a_client_that_hangs_up_does_not_keep_its_work_queued(server):
    import socket

    from thriftpy2.thrift import TMessageType

    from engine.transport.client import _infer_args
    from engine.transport.codec import encode_message

    shared = next(m for m in server.engine.models.values() if m.model_id == "workers/slow_a")
    before = shared.batcher.statistics()

    # A: a normal request that keeps slow_a's only instance busy for 0.3 s
    first = occupy(server, "workers", "workers/slow_a", {"x": X}, "a")
    # B: a raw client that sends a request for the same model, then hangs up at once
    args = _infer_args(
        "workers", {"x": X}, version=None, timeout_ms=None, outputs=["a"],
        request_id="gone", headers=None,
    )  # fmt: skip
    body = encode_message("infer", TMessageType.CALL, 1, args)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(len(body).to_bytes(4, "big") + body)
        wait_until(lambda: shared.batcher.statistics().queued_items, "B queued", timeout_s=10)
    first.join(10)
    # B's item was dropped from the queue: the model only ever saw A's
    wait_until(
        lambda: shared.batcher.statistics().queued_items == 0, "the queue empty", timeout_s=10
    )
    after = shared.batcher.statistics()
    assert after.items - before.items == 1
