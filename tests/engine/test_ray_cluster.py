"""A pipeline's models on two nodes of a real Ray cluster, and the loss of one node (issue 16).

One loopback cluster for the module (tests/raycluster.py): a head with the custom resource
``zone_a`` and a second node with ``zone_b``, both on 127.0.0.1.  One server serves
tests/pipelines/ray/zones.yaml with ``ray: {address}``: a torch model pinned to ``zone_a``
feeding a numpy model pinned to ``zone_b``.  Then the raylet of the ``zone_b`` node is
SIGKILLed under load and another ``zone_b`` node is added, without restarting the server.

Run alone: ``.venv/bin/pytest tests/engine/test_ray_cluster.py`` (about a minute: the
cluster, the server and a node restart).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from engine.config import RayConfig
from engine.transport.client import Client
from model_plugins.errors import DeadlineExceeded, InferenceError
from model_plugins.harness import PluginHarness
from tests.raycluster import HOST, LoopbackCluster
from tests.serving import PIPELINES, ServerThread, serving, wait_until

HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None

pytestmark = [
    pytest.mark.skipif(not HAS_RAY, reason="the ray extra is not installed"),
    pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed"),
    pytest.mark.slow,
    pytest.mark.e2e,
    pytest.mark.frameworks,
    # the first test also starts the cluster (15-25 s) and the server; a loaded machine doubles it
    pytest.mark.timeout(240),
]

ZONES = PIPELINES / "ray" / "zones.yaml"
#: the deadline of each request of the load (ms): a request to the lost model fails by then
DEADLINE_MS = 4000
#: from the new node counted alive to the lost model answering again (s)
BACK_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    cluster = LoopbackCluster({"zone_a": 1})
    try:
        cluster.add_node({"zone_b": 1})
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def server(cluster: LoopbackCluster) -> Iterator[ServerThread]:
    ray = RayConfig(address=cluster.address, node_ip_address=HOST)
    # a request waits for a worker being replaced no longer than its deadline anyway
    with serving([ZONES], ray=ray, worker_restart_wait_s=DEADLINE_MS / 1000) as thread:
        yield thread


def _worker_of(thread: ServerThread, model_id: str) -> tuple[str, dict[str, Any]]:
    stats = thread.engine.workers.statistics()
    return next((name, s) for name, s in stats.items() if model_id in s["models"])


def _expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two models run directly, as the pipeline wires them: (scaled, y)."""
    with PluginHarness("tests.plugins:TorchScale", params={"factor": 3}, isolated=True) as a:
        a.load()
        scaled = a.predict({"x": x})["y"]
    with PluginHarness("tests.plugins:Scale", params={"factor": 2}) as b:
        b.load()
        y = b.predict({"x": scaled})["y"]
    return scaled, y


def test_two_models_pinned_to_two_nodes_answer_and_say_where_they_ran(
    cluster: LoopbackCluster, server: ServerThread
) -> None:
    x = np.random.default_rng(16).normal(size=(5, 4)).astype(np.float32)
    with Client(HOST, server.port) as client:
        result = client.infer("ray_zones", {"x": x}).outputs
    scaled, y = _expected(x)
    np.testing.assert_allclose(result["scaled"], scaled, rtol=1e-6)
    np.testing.assert_allclose(result["y"], y, rtol=1e-6)

    # each model's worker is an actor on the node with its zone, and health says so
    first, first_stats = _worker_of(server, "ray_zones/first")
    second, second_stats = _worker_of(server, "ray_zones/second")
    head, other = cluster.head.node_id, cluster.workers[0].node_id
    assert first_stats["ray_node"] == head
    assert second_stats["ray_node"] == other
    assert head != other
    assert {first_stats["ray_ip"], second_stats["ray_ip"]} == {HOST}
    health = server.engine.health().details
    assert health[f"worker.{first}"].startswith(f"ray_node={head} ray_ip={HOST}")
    assert health[f"worker.{second}"].startswith(f"ray_node={other} ray_ip={HOST}")


@dataclass
class Load:
    """Closed-loop requests from ``threads`` threads, each asking for ``output`` only, until
    stopped: every outcome (its end time, how long it took, its error) is kept."""

    server: ServerThread
    output: str
    threads: int = 2
    outcomes: list[tuple[float, float, BaseException | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.x = np.arange(4, dtype=np.float32).reshape(1, 4) + 1
        self.want = {"scaled": self.x * 3, "y": self.x * 6}[self.output]
        self._threads = [threading.Thread(target=self._run) for _ in range(self.threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(DEADLINE_MS / 1000 + 30)
        assert not any(t.is_alive() for t in self._threads), f"a request for {self.output} hung"

    def _run(self) -> None:
        with Client(HOST, self.server.port, timeout_s=DEADLINE_MS / 1000 + 20) as client:
            while not self.stop.is_set():
                start = time.monotonic()
                error: BaseException | None = None
                try:
                    answer = client.infer(
                        "ray_zones", {"x": self.x}, outputs=[self.output], timeout_ms=DEADLINE_MS
                    )
                    np.testing.assert_allclose(answer.outputs[self.output], self.want)
                except Exception as exc:
                    error = exc
                    time.sleep(0.05)  # a failing model answers at once: do not spin
                end = time.monotonic()
                self.outcomes.append((end, end - start, error))

    def since(self, moment: float) -> list[tuple[float, float, BaseException | None]]:
        return [o for o in self.outcomes if o[0] >= moment]


def test_losing_a_node_fails_only_its_model_until_a_node_returns(
    cluster: LoopbackCluster, server: ServerThread
) -> None:
    lost = cluster.workers[0]
    second, before = _worker_of(server, "ray_zones/second")
    assert before["ray_node"] == lost.node_id
    _, first_before = _worker_of(server, "ray_zones/first")

    with Load(server, "scaled") as on_first, Load(server, "y") as on_both:
        wait_until(lambda: len(on_both.outcomes) >= 5, "the load ran on both models")
        killed = time.monotonic()
        noticed_s = cluster.kill_node(lost)
        time.sleep(3)  # the load runs on, the zone_b node gone
        added = time.monotonic()
        new = cluster.add_node({"zone_b": 1})
        alive = time.monotonic()
        wait_until(
            lambda: any(e is None for _, _, e in on_both.since(alive)),
            "the model of the lost node answering again",
            timeout_s=BACK_WITHIN_S,
        )
        back = time.monotonic()
        time.sleep(1)  # and keeps answering

    # the model on the node that stayed answered every request, the whole time
    assert on_first.outcomes, "no request reached the first model"
    assert len(on_first.since(killed)) >= 10
    failed = [e for _, _, e in on_first.outcomes if e is not None]
    assert not failed, f"the first model failed {len(failed)} requests: {failed[:3]}"

    # the lost model's requests failed typed and within their deadline, or were retried
    during = [o for o in on_both.outcomes if killed <= o[0]]
    errors = [e for _, _, e in during if e is not None]
    assert errors, "no request failed while the zone_b node was gone"
    for error in errors:
        # (not a ClientConnectionError: the server stood)
        assert isinstance(error, (InferenceError, DeadlineExceeded)), repr(error)
    slowest = max(seconds for _, seconds, _ in on_both.outcomes)
    assert slowest < DEADLINE_MS / 1000 + 5, f"a request took {slowest:.1f} s"
    # once back, it answers: the last requests all succeeded
    assert all(e is None for _, _, e in on_both.since(back + 0.5))

    # the same server: the lost model's worker restarted on the new node, the other untouched
    _, after = _worker_of(server, "ray_zones/second")
    assert after["ray_node"] == new.node_id != lost.node_id
    assert after["restarts"] > before["restarts"]
    health = server.engine.health().details[f"worker.{second}"]
    assert health.startswith(f"ray_node={new.node_id} ray_ip={HOST}")
    _, first_after = _worker_of(server, "ray_zones/first")
    assert first_after["ray_node"] == cluster.head.node_id
    assert first_after["restarts"] == first_before["restarts"]
    assert first_after["pid"] == first_before["pid"]
    print(
        f"node marked dead {noticed_s:.1f} s after its raylet's SIGKILL; {len(errors)} of "
        f"{len(during)} requests on it failed after; a new node alive {alive - added:.1f} s "
        f"after add_node; the model answered again {back - alive:.1f} s after that"
    )
