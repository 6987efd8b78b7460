"""The example pipeline with its workers as Ray actors on a two-node cluster, against local
worker processes, side by side in one run (issue 16).

    .venv/bin/python -m benchmarks.ray_workers [--quick]

A Ray cluster of two nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head with the custom
resource ``zone_a``, a second node with ``zone_b``) is started by this process and shut down
at its end (never ``ray stop``).  ``examples/post_understanding/pipeline.yaml`` (its models
built first by ``build_models.py``) is served by two ``dagserve serve`` subprocesses, up
together: one with local workers, one whose config has ``ray: {address}``, its pipeline a copy
whose PyTorch nodes are pinned to ``zone_a`` and its TensorFlow and Paddle nodes to ``zone_b``
(``ray_resources``), so that the models run on both nodes.  Both are loaded by
``engine.tools.bench.run_bench``, closed loop, concurrency 8, with the example's image+text
posts, in windows ordered local, Ray, Ray, local (a drift of the shared machine weighs on both
alike); each side's figures sum its two windows.

Then what one call costs, without the DAG and the batcher: ``WorkerPool.predict`` of the
identity plugin on a local worker process, on a Ray actor on the node this process is attached
to and on one on the other node, at three sizes: a tiny tensor (inlined in Ray's call), one
224x224 image and a batch of 32 (both through Ray's object store, copied between the two
nodes' stores for the other node).  Both nodes share this machine's cores and loopback: the
Ray figures price Ray's path, not a network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks._serving import HOST, ROOT, dagserve_command, measure, ratio, serving
from benchmarks.pipeline_vs_members import (
    CONCURRENCY,
    EXAMPLE,
    PIPELINE_FILE,
    build_models,
    post_samples,
)
from benchmarks.worker_crossing import median_ms
from engine.config import RayConfig
from engine.runtime.ray_placement import ActorRequest
from engine.runtime.workers.pool import WorkerKey, WorkerPool
from engine.runtime.workers.ray_worker import RayBackend
from engine.tools.bench import BenchResult, render_table
from engine.tools.ports import free_port
from model_plugins.plugin import LoadContext

#: the custom resource of each node, and which framework's nodes are pinned to it
ZONES = {"zone_a": ("torch",), "zone_b": ("tensorflow", "paddle")}
#: the example's plugins by framework (the built-ins, decode and the fusion, go where Ray likes)
FRAMEWORK_OF = {"torchscript": "torch", "tensorflow": "tensorflow", "paddle": "paddle"}
#: CPUs each node offers Ray (logical: both share this machine's cores)
NODE_CPUS = 4
#: how much of its zone resource a node has; each actor pinned to it takes 1
ZONE_AMOUNT = 8
#: tensors of the per-call comparison: (label, shape)
SIZES = (
    ("1x4 float32", (1, 4)),
    ("1 image 3x224x224", (1, 3, 224, 224)),
    ("32 images", (32, 3, 224, 224)),
)


# -- the cluster -----------------------------------------------------------------------------


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Any]:
    """A head (``zone_a``) and a second node (``zone_b``) on 127.0.0.1, shut down on exit.

    Their worker processes (the actors) get this process's environment: ``PYTHONPATH``
    names the repository and the example, so that the actors import the example's plugins.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), str(EXAMPLE), os.environ.get("PYTHONPATH", "")) if p
    )
    from ray.cluster_utils import Cluster

    cluster: Any = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": NODE_CPUS,
            "resources": {"zone_a": ZONE_AMOUNT},
            "node_ip_address": HOST,
            "include_dashboard": False,
        },
    )
    try:
        cluster.add_node(
            num_cpus=NODE_CPUS, resources={"zone_b": ZONE_AMOUNT}, node_ip_address=HOST
        )
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        cluster.shutdown()


def pinned_pipeline(folder: Path) -> Path:
    """A copy of the example's pipeline, model paths absolute, its framework nodes pinned."""
    pipeline = yaml.safe_load(PIPELINE_FILE.read_text(encoding="utf-8"))
    for spec in pipeline["nodes"].values():
        if "model" in spec:
            spec["model"] = str((EXAMPLE / spec["model"]).resolve())
        framework = FRAMEWORK_OF.get(spec["plugin"])
        if spec["plugin"].startswith("post_understanding_plugins:"):
            framework = "torch"  # the MiniLM encoder
        for zone, frameworks in ZONES.items():
            if framework in frameworks:
                spec["ray_resources"] = {zone: 1}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    return path


def ray_config(folder: Path, pipeline: Path, address: str) -> Path:
    path = folder / "server.yaml"
    config = {
        "pipelines": [str(pipeline)],
        "ray": {"address": address, "node_ip_address": HOST, "start_timeout_s": 120},
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# -- served: local workers against Ray actors ------------------------------------------------


Rows = list[dict[str, Any]]


def served(address: str, duration_s: float, warmup_s: float) -> Rows:
    """Both servers up; windows local, Ray, Ray, local; one row per side (sums of two)."""
    build_models()
    posts = post_samples()
    env = {"PYTHONPATH": str(EXAMPLE)}
    with tempfile.TemporaryDirectory(prefix="ray-workers-") as tmp, contextlib.ExitStack() as stack:
        folder = Path(tmp)
        config = ray_config(folder, pinned_pipeline(folder), address)
        local, remote = "local workers", "Ray actors, 2 nodes"
        ports = {local: free_port(), remote: free_port()}
        commands = {
            local: dagserve_command([PIPELINE_FILE], ports[local]),
            remote: dagserve_command([config], ports[remote]),
        }
        for side, command in commands.items():
            print(f"starting {side} ...", file=sys.stderr, flush=True)
            stack.enter_context(serving(command, ports[side], ready_timeout_s=300.0, env=env))
        windows: dict[str, list[BenchResult]] = {side: [] for side in ports}
        for side in (local, remote, remote, local):
            print(f"{side} ...", file=sys.stderr, flush=True)
            result = measure(
                ports[side], "post_understanding", posts,
                concurrency=CONCURRENCY, duration_s=duration_s, warmup_s=warmup_s,
            )  # fmt: skip
            windows[side].append(result)
    return [{"workers": side, **_merged(results)} for side, results in windows.items()]


def _merged(results: Sequence[BenchResult]) -> dict[str, Any]:
    """req/s over both windows; p50/p99 (nearest rank) of both windows' latencies together."""
    latencies = sorted(s for r in results for s in r.latencies_s)

    def percentile_ms(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[max(1, math.ceil(p / 100 * len(latencies))) - 1] * 1000

    seconds = sum(r.window_s for r in results)
    return {
        "req/s": round(sum(r.ok for r in results) / seconds, 1) if seconds else 0.0,
        "p50 ms": round(percentile_ms(50), 1),
        "p99 ms": round(percentile_ms(99), 1),
        "errors": sum(sum(r.errors.values()) for r in results),
    }


# -- one call: WorkerPool.predict through both backends --------------------------------------


async def per_call(address: str, repeat: int) -> Rows:
    """Median ms of one identity call: a local worker, a Ray actor on this process's node,
    a Ray actor on the other node (an actor pinned to each zone, then told apart by node)."""
    local = WorkerPool()
    remote = WorkerPool(backend=RayBackend(RayConfig(address=address, node_ip_address=HOST)))
    keys = {"local": WorkerKey("numpy", "cpu")}
    pinned = [
        WorkerKey("numpy", "cpu", ActorRequest(index=i, resources=((zone, 1.0),)))
        for i, zone in enumerate(ZONES)
    ]
    context = LoadContext(node="identity", plugin="identity")
    rows: Rows = []
    try:
        await local.load(keys["local"], "bench/identity", "identity", (context,))
        for key in pinned:
            await remote.load(key, "bench/identity", "identity", (context,))
        here = _driver_node()
        for key in pinned:
            worker = remote.process(key)
            assert worker is not None
            keys["same node" if worker.location["ray_node"] == here else "other node"] = key
        assert set(keys) == {"local", "same node", "other node"}, f"actors on {keys}"
        for label, shape in SIZES:
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            ms = {}
            for name, key in keys.items():
                pool = local if name == "local" else remote

                async def call(
                    pool: WorkerPool = pool, key: WorkerKey = key, x: np.ndarray = x
                ) -> object:
                    return await pool.predict(
                        key, "bench/identity", {"x": x}, node="identity", plugin="identity"
                    )

                ms[name] = await median_ms(call, repeat)
            rows.append({
                "tensor": label,
                "MB each way": f"{x.nbytes / 1e6:.3g}",
                "local worker ms": round(ms["local"], 2),
                "Ray actor, same node ms": round(ms["same node"], 2),
                "Ray actor, other node ms": round(ms["other node"], 2),
                "other node - local ms": round(ms["other node"] - ms["local"], 2),
                "other node / local": f"{ratio(ms['other node'], ms['local']):.1f}",
            })  # fmt: skip
    finally:
        await local.aclose()
        await remote.aclose()
    return rows


def _driver_node() -> str:
    """The Ray node this process is attached to (the pools' connection)."""
    import ray

    context: Any = ray.get_runtime_context()
    node: str = context.get_node_id()
    return node


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s windows (default 10 s)")
    args = parser.parse_args(argv)
    duration_s, warmup_s, repeat = (3.0, 1.0, 10) if args.quick else (10.0, 2.0, 30)
    with two_node_cluster() as cluster:
        calls = asyncio.run(per_call(cluster.address, repeat))
        rows = served(cluster.address, duration_s, warmup_s)
    local, remote = rows
    print(
        f"### Workers as Ray actors on a two-node loopback cluster against local workers: "
        f"the example pipeline, closed loop x{CONCURRENCY}, {duration_s:g} s windows ordered "
        f"local, Ray, Ray, local; {os.cpu_count()} cores shared by both nodes and both servers\n"
    )
    print("Load: the example's image+text posts; PyTorch nodes pinned to the head (zone_a), "
          "TensorFlow and Paddle to the second node (zone_b).\n")  # fmt: skip
    print(render_table(rows))
    print(f"\nOne call, `WorkerPool.predict` of the identity plugin (median of {repeat}):\n")
    print(render_table(calls))
    tiny, _, large = calls
    print(
        f"\nReading: Ray actors / local workers = {ratio(remote['req/s'], local['req/s']):.2f} "
        f"in req/s (p50 {local['p50 ms']:.0f} -> {remote['p50 ms']:.0f} ms, p99 "
        f"{local['p99 ms']:.0f} -> {remote['p99 ms']:.0f} ms); one call through a Ray actor on "
        f"the other node costs {tiny['other node - local ms']:.1f} ms more than through a local "
        f"worker for a tiny tensor, {large['other node - local ms']:.0f} ms more for "
        f"{large['tensor']} ({large['MB each way']} MB each way)"
    )
    return 0 if local["errors"] == 0 and remote["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
