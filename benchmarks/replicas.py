"""Replicas behind one balancing client: throughput by replica count, and a replica SIGKILLed.

Three ``dagserve serve`` processes are up throughout, each serving two pipelines of one node
(one instance, no batching, run in a thread):

- ``hold``: holds its one instance for 5 ms a call, sleeping (the shape of a model bound by
  its device, not by this machine's CPUs): one replica answers at most ~200 req/s, so the
  figure says whether the client spreads its calls;
- ``matmul``: a 256x256 float32 product, 8 times a call (numpy, one BLAS thread): bound by the
  machine's cores, which the client process and every replica share.

One ``AsyncClient(targets=[...])`` over the first 1, 2, then 3 replicas drives a closed loop
of ``CONCURRENCY`` calls, in half windows ordered 1 2 3 3 2 1 (the machine is shared: a
drift weighs on every count alike).  Then, over all three, one replica is SIGKILLed halfway
through a window: the calls lost (target 0) are those that raised; the replica's calls in
flight are retried on the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from benchmarks._serving import HOST, dagserve_command, ratio, serving
from engine.tools.bench import render_table
from engine.tools.ports import free_port
from engine.transport.client import AsyncClient
from model_plugins import ModelPlugin, TensorSpec

#: calls in flight from the one client
CONCURRENCY = 24
#: replica counts measured
COUNTS = (1, 2, 3)


class Hold(ModelPlugin):
    """Holds its instance ``params.seconds`` (default 0.005) a call; passes x through."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context: Any) -> None:
        self.seconds = float(context.params.get("seconds", 0.005))

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(self.seconds)
        return {"y": batch["x"]}


class MatMul(ModelPlugin):
    """Eight 256x256 float32 products a call: CPU work that releases the GIL."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context: Any) -> None:
        self.matrix = np.random.default_rng(0).random((256, 256), dtype=np.float32)

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        product = self.matrix
        for _ in range(8):
            product = (product @ self.matrix) / np.float32(256)
        return {"y": batch["x"] + product[0, : batch["x"].shape[1]]}


def write_pipelines(folder: Path) -> list[Path]:
    paths = []
    for name, plugin in (("hold", "Hold"), ("matmul", "MatMul")):
        path = folder / f"replicas_{name}.yaml"
        path.write_text(
            f"name: replicas_{name}\ninputs:\n  x: {{dtype: float32, shape: [4]}}\n"
            f"nodes:\n  work:\n    plugin: benchmarks.replicas:{plugin}\n    runner: thread\n"
            "    inputs: {x: $inputs.x}\noutputs:\n  y: work.y\n",
            encoding="utf-8",
        )
        paths.append(path)
    return paths


async def closed_loop(
    client: AsyncClient, pipeline: str, duration_s: float, kill: Any = None
) -> dict[str, float]:
    """``CONCURRENCY`` callers for ``duration_s``; ``kill()`` runs halfway through."""
    x = {"x": np.ones((1, 4), np.float32)}
    answered = lost = 0
    errors: list[str] = []
    end = time.monotonic() + duration_s

    async def caller() -> None:
        nonlocal answered, lost
        while time.monotonic() < end:
            try:
                await client.infer(pipeline, x, timeout_ms=10_000)
                answered += 1
            except Exception as exc:
                lost += 1
                errors.append(f"{type(exc).__name__}: {exc}")

    async def killer() -> None:
        await asyncio.sleep(duration_s / 2)
        kill()

    started = time.monotonic()
    tasks = [caller() for _ in range(CONCURRENCY)] + ([killer()] if kill else [])
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - started
    if errors:
        print(f"<!-- {pipeline}: {len(errors)} lost, first: {errors[0]} -->")
    return {"req/s": answered / elapsed, "answered": answered, "lost": lost, "s": elapsed}


async def warm(client: AsyncClient, pipelines: Sequence[str]) -> None:
    x = {"x": np.ones((1, 4), np.float32)}
    for pipeline in pipelines:
        await asyncio.gather(*(client.infer(pipeline, x) for _ in range(3 * CONCURRENCY)))


#: the rows of a table
Rows = list[dict[str, Any]]


async def measure(ports: list[int], duration_s: float, victim: Any) -> tuple[Rows, Rows]:
    targets = [f"{HOST}:{port}" for port in ports]
    rows: Rows = []
    for pipeline in ("replicas_hold", "replicas_matmul"):
        # one client per replica count; half windows in the order 1 2 3 3 2 1, so that a
        # drift of the shared machine weighs on every count alike
        clients = {n: AsyncClient(targets=targets[:n], timeout_s=30) for n in COUNTS}
        totals = {n: {"answered": 0.0, "lost": 0.0, "s": 0.0} for n in COUNTS}
        for count in COUNTS:
            await warm(clients[count], [pipeline])
        before = {n: clients[n].replica_stats() for n in COUNTS}
        for count in (*COUNTS, *reversed(COUNTS)):
            result = await closed_loop(clients[count], pipeline, duration_s / 2)
            for key, total in totals[count].items():
                totals[count][key] = total + result[key]
        one = totals[1]["answered"] / totals[1]["s"]
        for count in COUNTS:
            stats = clients[count].replica_stats()
            shares = [stats[t].answered - before[count][t].answered for t in stats]
            await clients[count].aclose()
            rate = totals[count]["answered"] / totals[count]["s"]
            rows.append({
                "pipeline": pipeline.removeprefix("replicas_"),
                "replicas": count,
                "req/s": round(rate),
                "x 1 replica": f"{ratio(rate, one):.2f}",
                "answers per replica": " / ".join(map(str, shares)),
                "lost": int(totals[count]["lost"]),
            })  # fmt: skip
    kill_rows: Rows = []
    async with AsyncClient(targets=targets, timeout_s=30) as client:
        await warm(client, ["replicas_hold"])
        result = await closed_loop(
            client, "replicas_hold", duration_s, kill=lambda: victim.send_signal(signal.SIGKILL)
        )
        stats = client.replica_stats()
    kill_rows.append({
        "pipeline": "hold",
        "replicas": "3, one SIGKILLed halfway",
        "answered": int(result["answered"]),
        "lost": int(result["lost"]),
        "target": 0,
        "met?": "yes" if result["lost"] == 0 else "no",
        "answers per replica (killed last)": " / ".join(
            str(s.answered) for s in stats.values()
        ),
    })  # fmt: skip
    return rows, kill_rows


def run_scenario(duration_s: float) -> tuple[Rows, Rows]:
    with tempfile.TemporaryDirectory(prefix="replicas-") as tmp, contextlib.ExitStack() as stack:
        paths = write_pipelines(Path(tmp))
        # one BLAS thread per replica: the matmul figure then counts replicas, not BLAS pools
        env = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        ports = [free_port() for _ in COUNTS]
        processes = [
            stack.enter_context(serving(dagserve_command(paths, port), port, env=env))
            for port in ports
        ]
        return asyncio.run(measure(ports, duration_s, processes[-1]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    args = parser.parse_args(argv)
    duration_s = 2.0 if args.quick else 8.0
    cores = os.cpu_count()
    rows, kill_rows = run_scenario(duration_s)
    print(
        f"### Replicas behind one balancing client: closed loop of {CONCURRENCY} calls from "
        f"one AsyncClient(targets=...), {duration_s:g} s per count in halves ordered 1 2 3 3 2 1, "
        f"{cores} cores here\n"
    )
    print(render_table(rows))
    print()
    print(render_table(kill_rows))
    print()
    by = {(r["pipeline"], r["replicas"]): r["x 1 replica"] for r in rows}
    lost = kill_rows[0]["lost"]
    print(
        f"Reading: 3 replicas / 1: {by[('hold', 3)]}x for a model that holds its instance "
        f"(the client spreads its calls), {by[('matmul', 3)]}x for CPU work (bounded by this "
        f"machine's {cores} cores, shared by the client and every replica); a replica "
        f"SIGKILLed under load lost {lost} calls (target 0)"
    )
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
