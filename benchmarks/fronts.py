"""Two front processes against one (``front_processes``), side by side in one run.

Two servers are up at once, one with ``--front-processes 1`` and one with ``2``, each serving
the same two pipelines: the identity pipeline (a 1x4 float32 tensor through the built-in
``identity`` node: the front's own cost) and the light model (the MLP of
``benchmarks/batching.py``, TorchScript, batched up to 32: a model whose items every front
sends to the first front's batcher).  Each (pipeline, server) pair is loaded in closed loop for
two half windows in the order A B then B A, so that a drift of the shared machine weighs on both.

The load comes from ``--clients`` processes (default 2), each a closed loop of
``concurrency / clients`` requests on connections of its own: one Python client process
tops out near the rate of one front, and would hide what a second front gives.  The kernel
spreads the connections over the fronts (SO_REUSEPORT hashes each connection to a listener).

Target (issue 15): 2 fronts >= 1.5x one "where the machine has the cores".  The figure is
only meaningful where there are cores for the clients, both fronts and the model's worker;
the table says how many this machine has.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._serving import HOST, ROOT, dagserve_command, ratio, serving
from benchmarks.rpc_overhead import merge
from engine.tools.bench import BenchResult, BenchSpec, render_table, run_bench
from engine.tools.ports import free_port

CONCURRENCY = {"identity": 16, "light (MLP)": 32}
PIPELINES = {"identity": "fronts_identity", "light (MLP)": "fronts_mlp"}
TARGET = 1.5


def write_pipelines(folder: Path) -> list[Path]:
    from benchmarks.batching import export_models

    export_models(folder)
    identity = folder / "fronts_identity.yaml"
    identity.write_text(
        "name: fronts_identity\ninputs:\n  x: {dtype: float32, shape: [4]}\n"
        "nodes:\n  echo:\n    plugin: identity\n    inputs: {x: $inputs.x}\n"
        "outputs:\n  x: echo.x\n",
        encoding="utf-8",
    )
    mlp = folder / "fronts_mlp.yaml"
    mlp.write_text(
        "name: fronts_mlp\ninputs:\n  x: {dtype: float32, shape: [512]}\n"
        "nodes:\n  model:\n    plugin: torchscript\n    model: mlp.pt\n"
        "    params: {input_names: [x], output_names: [y]}\n"
        "    batching: {max_batch_size: 32, max_queue: 1024}\n"
        "    inputs: {x: $inputs.x}\n"
        "outputs:\n  y: model.y\n",
        encoding="utf-8",
    )
    return [identity, mlp]


def _samples(pipeline: str) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    width = 4 if pipeline == "fronts_identity" else 512
    return [{"x": rng.standard_normal((1, width)).astype(np.float32)} for _ in range(8)]


def _client(port: int, pipeline: str, concurrency: int, duration_s: float, warmup_s: float) -> None:
    """One load process (``--_client``): prints its window as JSON."""
    spec = BenchSpec(
        HOST, port, pipeline, _samples(pipeline),
        concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s,
    )  # fmt: skip
    result = asyncio.run(run_bench(spec))
    print(json.dumps({
        "window_s": result.window_s, "ok": result.ok, "items": result.items,
        "errors": dict(result.errors), "latencies_s": result.latencies_s,
    }))  # fmt: skip


def load(
    port: int, pipeline: str, concurrency: int, clients: int, duration_s: float, warmup_s: float
) -> BenchResult:
    """``clients`` processes in closed loop at once; their windows as one."""
    command = [sys.executable, "-m", "benchmarks.fronts", "--_client", str(port), pipeline,
               str(max(1, concurrency // clients)), str(duration_s), str(warmup_s)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        outs = list(pool.map(
            lambda _: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                                     check=True, timeout=duration_s + warmup_s + 60).stdout,
            range(clients),
        ))  # fmt: skip
    merged = BenchResult(pipeline, f"closed x{concurrency}", 0.0, concurrency)
    for out in outs:
        data = json.loads(out.strip().splitlines()[-1])
        merged.window_s = max(merged.window_s, data["window_s"])
        merged.ok += data["ok"]
        merged.items += data["items"]
        merged.errors.update(data["errors"])
        merged.latencies_s.extend(data["latencies_s"])
    merged.latencies_s.sort()
    return merged


def run_scenario(duration_s: float, warmup_s: float, clients: int) -> list[dict[str, Any]]:
    ports = {1: free_port(), 2: free_port()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fronts-") as tmp, contextlib.ExitStack() as stack:
        pipelines = write_pipelines(Path(tmp))
        for fronts, port in ports.items():
            command = [*dagserve_command(pipelines, port), "--front-processes", str(fronts)]
            stack.enter_context(serving(command, port, ready_timeout_s=240))
        for label, pipeline in PIPELINES.items():
            concurrency = CONCURRENCY[label]
            halves: dict[int, list[BenchResult]] = {1: [], 2: []}
            for order in ((1, 2), (2, 1)):
                for fronts in order:
                    print(f"{label} x{concurrency}, {fronts} front(s) ...", file=sys.stderr,
                          flush=True)  # fmt: skip
                    halves[fronts].append(
                        load(
                            ports[fronts], pipeline, concurrency, clients, duration_s / 2, warmup_s
                        )
                    )
            for fronts, results in halves.items():
                merged = merge(results)
                summary = merged.summary()
                rows.append({
                    "pipeline": label, "concurrency": concurrency, "fronts": fronts,
                    "req/s": summary["req/s"], "p50 ms": summary["p50 ms"],
                    "p99 ms": summary["p99 ms"], "errors": summary["errors"],
                })  # fmt: skip
    return rows


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cores = len(os.sched_getaffinity(0))
    out = []
    for label in PIPELINES:
        one = next(r for r in rows if r["pipeline"] == label and r["fronts"] == 1)
        two = next(r for r in rows if r["pipeline"] == label and r["fronts"] == 2)
        value = ratio(two["req/s"], one["req/s"])
        out.append({
            "pipeline": label, "2 fronts / 1 (req/s)": round(value, 2),
            "target": f">= {TARGET} where the machine has the cores",
            "met?": "yes" if value >= TARGET else "no", "cores here": cores,
        })  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--clients", type=int, default=2, help="load processes (default 2)")
    parser.add_argument("--_client", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._client:
        port, pipeline, concurrency, duration_s, warmup_s = args._client
        _client(int(port), pipeline, int(concurrency), float(duration_s), float(warmup_s))
        return 0
    duration_s, warmup_s = (4.0, 1.0) if args.quick else (12.0, 2.0)
    rows = run_scenario(duration_s, warmup_s, args.clients)
    print(f"### Front processes: closed loop from {args.clients} client processes, "
          f"{duration_s:g} s per server (two halves, A B B A)\n")  # fmt: skip
    print(render_table(rows))
    print()
    targets = target_rows(rows)
    print(render_table(targets))
    print()
    parts = ", ".join(f"{t['pipeline']} {t['2 fronts / 1 (req/s)']}" for t in targets)
    print(
        f"Reading: 2 front processes / 1, req/s: {parts} "
        f"(target >= {TARGET} where the machine has the cores; this one has "
        f"{targets[0]['cores here']} for the clients, the fronts and the worker alike)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
