"""A real multi-node Ray cluster on this machine, for tests: ``ray.cluster_utils.Cluster``
with every node on 127.0.0.1, torn down by whoever started it (never ``ray stop``, which ends
every Ray process of the machine, other sessions' included).

Measured here (2 loaded cores, Ray 2.60): the head starts in 10-16 s, each further node in
4-6 s.  The head's GCS is told to check its nodes' health every second and to declare a node
dead after 3 failed checks, so a node whose raylet was SIGKILLed (its port refuses at once) is
marked dead within about 3 s (Ray's defaults take 30 s or more); a live raylet has 3 s to
answer each check, so a busy machine does not get a healthy node declared dead (0.5 s checks
with a 0.5 s timeout noticed a kill in 1.3-1.5 s, but left that margin thin).

Ray is imported when a cluster starts, never at import of this module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator, Mapping
from typing import Any

HOST = "127.0.0.1"
#: the head's GCS health checks of its nodes: a killed node is dead in ~3 s
HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 3000,
    "health_check_failure_threshold": 3,
}


class LoopbackCluster:
    """A head and further nodes on 127.0.0.1, each with its CPUs and custom resources.

    The test process is connected to it (``ray.init``) so that a server started in the
    process uses that connection (it then leaves ``ray.shutdown`` to :meth:`shutdown`).
    """

    def __init__(self, head_resources: Mapping[str, float], *, num_cpus: int = 2) -> None:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray
        from ray.cluster_utils import Cluster

        self._ray: Any = ray
        cluster: Any = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": num_cpus,
                "resources": dict(head_resources),
                "node_ip_address": HOST,
                "include_dashboard": False,
                "_system_config": HEALTH_CHECKS,
            },
        )
        self.cluster = cluster
        try:
            ray.init(address=cluster.address, _node_ip_address=HOST)
        except BaseException:
            cluster.shutdown()
            raise

    @property
    def address(self) -> str:
        """The head's GCS, ``127.0.0.1:port`` (what ``ray: {address}`` takes)."""
        address: str = self.cluster.address
        return address

    @property
    def head(self) -> Any:
        return self.cluster.head_node

    @property
    def workers(self) -> list[Any]:
        """The nodes other than the head, still part of the cluster (not killed)."""
        return list(self.cluster.worker_nodes)

    def add_node(self, resources: Mapping[str, float], *, num_cpus: int = 2) -> Any:
        """Start one more node and return it once the head counts it alive."""
        node = self.cluster.add_node(
            num_cpus=num_cpus, resources=dict(resources), node_ip_address=HOST
        )
        self.cluster.wait_for_nodes(timeout=60)
        return node

    def alive(self) -> set[str]:
        """The ids of the nodes the head counts alive (hex, as ``ray.nodes()`` gives them)."""
        return {n["NodeID"] for n in self._ray.nodes() if n["Alive"]}

    @staticmethod
    def raylet_pid(node: Any) -> int:
        """The pid of ``node``'s raylet (its only process of its own; a worker node has no GCS)."""
        from ray._private import ray_constants

        (info,) = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]
        pid: int = info.process.pid
        return pid

    def kill_node(self, node: Any, timeout_s: float = 30.0) -> float:
        """SIGKILL ``node``'s raylet, as a machine lost would, and return once the head has
        marked the node dead: the seconds that took.  The node's remains are then reaped
        (``remove_node``), so that :meth:`add_node` counts only the living."""
        started = time.monotonic()
        os.kill(self.raylet_pid(node), signal.SIGKILL)
        deadline = started + timeout_s
        while node.node_id in self.alive():
            if time.monotonic() > deadline:
                msg = f"the head still counts node {node.node_id} alive after {timeout_s} s"
                raise TimeoutError(msg)
            time.sleep(0.05)
        noticed = time.monotonic() - started
        self.cluster.remove_node(node, allow_graceful=False)
        return noticed

    def shutdown(self) -> None:
        """Disconnect, then end every process of this cluster (and only of this one)."""
        try:
            if self._ray.is_initialized():
                self._ray.shutdown()
        finally:
            self.cluster.shutdown()


@contextlib.contextmanager
def loopback_cluster(
    head_resources: Mapping[str, float], *nodes: Mapping[str, float], num_cpus: int = 2
) -> Iterator[LoopbackCluster]:
    """A head with ``head_resources`` and one more node per mapping in ``nodes``; shut down
    on exit."""
    cluster = LoopbackCluster(head_resources, num_cpus=num_cpus)
    try:
        for resources in nodes:
            cluster.add_node(resources, num_cpus=num_cpus)
        yield cluster
    finally:
        cluster.shutdown()
