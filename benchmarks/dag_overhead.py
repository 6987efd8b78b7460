"""What one more node in a DAG costs: chains and fan-outs of ``identity`` nodes.

    .venv/bin/python -m benchmarks.dag_overhead [--quick] [--duration S]

Six pipelines, served together by ONE ``dagserve serve`` subprocess and loaded in turn, side
by side in one run, by ``engine.tools.bench.run_bench`` (closed loop, concurrency 8), each with a
float32 [8] input:

- **chain N** (N = 1, 4, 16): ``n0 -> n1 -> ... -> n{N-1}``, each an ``identity`` node;
- **fan N**: N ``identity`` branches on the input, joined by one ``concat_fusion`` node
  (``dims`` = 8 per branch; output float32 [8N]).  Fan N therefore has N + 1 nodes.

Reported per pipeline: req/s and p50/p99, and the cost of one more node,
``(p50(N) - p50(1)) / (N - 1)`` in microseconds (for the fan: one more branch, its share of
the wider concat included), also from req/s as ``(1/rps(N) - 1/rps(1)) / (N - 1)`` of server
time per request (at concurrency 8 the server is saturated, so 1/rps is its time per request).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._serving import dagserve_command, figures, measure, serving
from engine.tools.bench import render_table
from engine.tools.ports import free_port

SIZES = (1, 4, 16)
CONCURRENCY = 8
WIDTH = 8


def chain_yaml(n: int) -> str:
    """A chain of ``n`` identity nodes from ``$inputs.x`` to the output ``x``."""
    lines = [f"name: chain_{n}", "version: '1'", "inputs:",
             f"  x: {{dtype: float32, shape: [{WIDTH}]}}", "nodes:"]  # fmt: skip
    for i in range(n):
        source = "$inputs.x" if i == 0 else f"n{i - 1}.x"
        lines += [f"  n{i}:", "    plugin: identity", f"    inputs: {{x: {source}}}"]
    lines += ["outputs:", f"  x: n{n - 1}.x"]
    return "\n".join(lines) + "\n"


def fan_yaml(n: int) -> str:
    """``n`` identity branches on ``$inputs.x``, concatenated by one ``concat_fusion``."""
    lines = [f"name: fan_{n}", "version: '1'", "inputs:",
             f"  x: {{dtype: float32, shape: [{WIDTH}]}}", "nodes:"]  # fmt: skip
    for i in range(n):
        lines += [f"  b{i}:", "    plugin: identity", "    inputs: {x: $inputs.x}"]
    joined = ", ".join(f"b{i}: b{i}.x" for i in range(n))
    dims = ", ".join(f"b{i}: {WIDTH}" for i in range(n))
    lines += ["  join:", "    plugin: concat_fusion", f"    inputs: {{{joined}}}",
              f"    params: {{dims: {{{dims}}}}}", "outputs:", "  x: join.embedding"]  # fmt: skip
    return "\n".join(lines) + "\n"


def write_pipelines(folder: Path) -> list[Path]:
    """chain_N.yaml and fan_N.yaml for every N of ``SIZES``."""
    paths = []
    for n in SIZES:
        for kind, text in (("chain", chain_yaml(n)), ("fan", fan_yaml(n))):
            path = folder / f"{kind}_{n}.yaml"
            path.write_text(text, encoding="utf-8")
            paths.append(path)
    return paths


def run_scenario(duration_s: float, warmup_s: float) -> list[dict[str, Any]]:
    """One window per pipeline, chain then fan, N ascending, one server for all."""
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((1, WIDTH)).astype(np.float32)} for _ in range(4)]
    port = free_port()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dag-overhead-") as tmp:
        pipelines = write_pipelines(Path(tmp))
        with serving(dagserve_command(pipelines, port), port):
            for kind in ("chain", "fan"):
                for n in SIZES:
                    print(f"{kind} {n} ...", file=sys.stderr, flush=True)
                    result = measure(
                        port, f"{kind}_{n}", samples,
                        concurrency=CONCURRENCY, duration_s=duration_s, warmup_s=warmup_s,
                    )  # fmt: skip
                    rows.append({"shape": kind, "N": n, **figures(result)})
    return rows


def with_node_cost(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with the µs per extra node against N = 1 of the same shape."""
    base = {r["shape"]: r for r in rows if r["N"] == 1}
    out = []
    for row in rows:
        ref, extra = base[row["shape"]], row["N"] - 1
        p50_cost = (row["p50 ms"] - ref["p50 ms"]) * 1000 / extra if extra else float("nan")
        rps_cost = (
            (1 / row["req/s"] - 1 / ref["req/s"]) * 1e6 / extra
            if extra and row["req/s"] and ref["req/s"]
            else float("nan")
        )
        out.append({**row, "µs/node (p50)": p50_cost, "µs/node (1/rps)": rps_cost})
    return out


def reading(rows: list[dict[str, Any]]) -> str:
    """One line: the per-node cost at N = 16 and how far N = 16 falls behind N = 1."""
    parts = []
    for shape in ("chain", "fan"):
        one = next(r for r in rows if r["shape"] == shape and r["N"] == 1)
        big = next(r for r in rows if r["shape"] == shape and r["N"] == max(SIZES))
        parts.append(
            f"{shape}: {big['µs/node (p50)']:.0f} µs/node at p50, "
            f"req/s N={max(SIZES)} / N=1 = {big['req/s'] / one['req/s']:.2f}"
        )
    return "; ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 s windows (default 8 s)")
    parser.add_argument("--duration", type=float, help="seconds per window")
    args = parser.parse_args(argv)
    duration = args.duration or (3.0 if args.quick else 8.0)
    rows = with_node_cost(run_scenario(duration, warmup_s=0.5 if args.quick else 1.0))
    print(f"### DAG overhead: closed loop x{CONCURRENCY}, {duration:g} s windows\n")
    print(render_table(rows))
    print(f"\nReading: {reading(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
