"""The RPC ceiling: a one-node ``identity`` pipeline against bare Thrift echo servers.

    .venv/bin/python -m benchmarks.rpc_overhead [--quick] [--duration S]

Three servers, each a SUBPROCESS on uvloop, all up at once and loaded in turn, side by side in
one run, by the same closed loop (``engine.tools.bench.run_bench``: ``AsyncClient``, framed binary
Thrift, on asyncio's loop in this process):

- **dagserve**: ``dagserve serve`` with two pipelines of one ``identity`` node (``x`` in, ``x``
  out): decode to numpy, check against the signature, run the DAG, encode the answer;
- **bare (same stack)**: dagserve's own ``ThriftServer`` (the same connection loop and Cython
  codec) with a handler whose ``infer`` returns the request's input ``Tensor`` structs as its
  outputs, never decoding them to numpy: the ceiling of the engine on this transport;
- **bare (thriftpy2 stock)**: thriftpy2's own asyncio server (``contrib.aio.make_server``,
  framed transport, its pure-Python async binary protocol, ``TCP_NODELAY`` set as dagserve
  sets it) with the same handler: what an off-the-shelf thriftpy2 service would give.

Each server gets its window in two halves, in the order A B C then C B A (drift of the shared
machine then weighs on all alike).  Payloads: a tiny tensor (float32 [1, 4]) and one image
(float32 [1, 3, 224, 224], 602 KB each way); concurrency 1 and 16.  Reported: req/s, p50 and
p99 for each, and each server over bare (same stack).  Target (issue 15): dagserve's req/s at
concurrency 16 >= 0.6 of the stock thriftpy2 server's (its own table, both payloads; the issue's
figure is the tiny one, where the front's cost per request shows).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._serving import (
    HOST,
    dagserve_command,
    figures,
    measure,
    ratio,
    serving,
)
from engine.tools.bench import BenchResult, render_table
from engine.tools.ports import free_port

PAYLOADS: dict[str, tuple[int, ...]] = {"tiny 1x4": (4,), "image 3x224x224": (3, 224, 224)}
CONCURRENCIES = (1, 16)
#: issue 15: the identity pipeline's req/s >= TARGET x the stock thriftpy2 echo server's, at
#: concurrency TARGET_CONCURRENCY
TARGET = 0.6
TARGET_CONCURRENCY = 16


class EchoHandler:
    """``infer`` answers the request's input ``Tensor`` structs as they came, undecoded."""

    async def infer(self, request: Any) -> Any:
        from idl import dagserve_thrift

        return dagserve_thrift.InferResponse(
            request_id=request.request_id or "", outputs=request.inputs
        )

    async def health(self) -> Any:
        from idl import dagserve_thrift

        return dagserve_thrift.HealthStatus(live=True, ready=True, details={})


def _serve_same_stack(port: int) -> None:
    from engine.transport.thrift import ThriftServer

    ThriftServer(EchoHandler(), HOST, port).serve()


def _serve_thriftpy2_stock(port: int) -> None:
    import uvloop
    from thriftpy2.contrib.aio.rpc import make_server
    from thriftpy2.contrib.aio.transport.framed import TAsyncFramedTransportFactory

    from idl import dagserve_thrift

    loop = uvloop.new_event_loop()
    server = make_server(
        dagserve_thrift.InferenceService, EchoHandler(), HOST, port,
        trans_factory=TAsyncFramedTransportFactory(), client_timeout=None, loop=loop,
    )  # fmt: skip
    handle: Any = server.handle

    async def handle_with_nodelay(client: Any) -> None:
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await handle(client)

    server.handle = handle_with_nodelay  # type: ignore[method-assign]
    server.serve()  # type: ignore[no-untyped-call]


BARE_STACKS = {"same-stack": _serve_same_stack, "thriftpy2-stock": _serve_thriftpy2_stock}


# --- the scenario -------------------------------------------------------------------------


def write_pipelines(folder: Path) -> list[Path]:
    """One identity pipeline per payload: ``rpc_<i>`` with input ``x`` of that shape."""
    paths = []
    for i, shape in enumerate(PAYLOADS.values()):
        path = folder / f"rpc_{i}.yaml"
        path.write_text(
            f"name: rpc_{i}\nversion: '1'\n"
            f"inputs:\n  x: {{dtype: float32, shape: {list(shape)}}}\n"
            "nodes:\n  echo:\n    plugin: identity\n    inputs: {x: $inputs.x}\n"
            "outputs:\n  x: echo.x\n",
            encoding="utf-8",
        )
        paths.append(path)
    return paths


def _samples(shape: tuple[int, ...]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal((1, *shape)).astype(np.float32)} for _ in range(4)]


def merge(results: Sequence[BenchResult]) -> BenchResult:
    """Several windows against one server as one: their requests and windows summed."""
    merged = BenchResult(results[0].pipeline, results[0].mode, 0.0)
    for result in results:
        merged.window_s += result.window_s
        merged.ok += result.ok
        merged.items += result.items
        merged.errors.update(result.errors)
        merged.latencies_s.extend(result.latencies_s)
    merged.latencies_s.sort()
    return merged


def interleaved(
    ports: Mapping[str, int],
    pipeline: str,
    samples: Sequence[Mapping[str, Any]],
    concurrency: int,
    *,
    duration_s: float,
    warmup_s: float,
) -> dict[str, BenchResult]:
    """Each server for ``duration_s`` in two halves, in the order A B C then C B A, so that a
    drift of the shared machine weighs on every server alike."""
    halves: dict[str, list[BenchResult]] = {label: [] for label in ports}
    for order in (list(ports), list(ports)[::-1]):
        for label in order:
            print(f"{pipeline} x{concurrency}, {label} ...", file=sys.stderr, flush=True)
            halves[label].append(
                measure(
                    ports[label],
                    pipeline,
                    samples,
                    concurrency=concurrency,
                    duration_s=duration_s / 2,
                    warmup_s=warmup_s,
                )
            )
    return {label: merge(results) for label, results in halves.items()}


def run_scenario(duration_s: float, warmup_s: float) -> list[dict[str, Any]]:
    """Every (payload, concurrency, server) window, all servers up at once."""
    ports = {"dagserve": free_port(), "bare (same stack)": free_port()}
    ports["bare (thriftpy2 stock)"] = free_port()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rpc-overhead-") as tmp, contextlib.ExitStack() as st:
        pipelines = write_pipelines(Path(tmp))
        st.enter_context(serving(dagserve_command(pipelines, ports["dagserve"]), ports["dagserve"]))
        for label, stack in (
            ("bare (same stack)", "same-stack"),
            ("bare (thriftpy2 stock)", "thriftpy2-stock"),
        ):
            command = [sys.executable, "-m", "benchmarks.rpc_overhead", "--_bare", stack,
                       str(ports[label])]  # fmt: skip
            st.enter_context(serving(command, ports[label]))
        for i, (payload, shape) in enumerate(PAYLOADS.items()):
            samples = _samples(shape)
            for concurrency in CONCURRENCIES:
                results = interleaved(ports, f"rpc_{i}", samples, concurrency,
                                      duration_s=duration_s, warmup_s=warmup_s)  # fmt: skip
                for label, result in results.items():
                    rows.append({"payload": payload, "concurrency": concurrency,
                                 "server": label, **figures(result)})  # fmt: skip
    return rows


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row with req/s and p50 relative to the same-stack bare server's, same load."""
    base = {(r["payload"], r["concurrency"]): r for r in rows if r["server"] == "bare (same stack)"}
    out = []
    for row in rows:
        ref = base[(row["payload"], row["concurrency"])]
        out.append({**row, "req/s / bare": ratio(row["req/s"], ref["req/s"]),
                    "p50 / bare": ratio(row["p50 ms"], ref["p50 ms"])})  # fmt: skip
    return out


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per payload at the target's concurrency: dagserve's req/s against the stock echo's."""
    at = {(r["payload"], r["server"]): r for r in rows if r["concurrency"] == TARGET_CONCURRENCY}
    out = []
    for payload in PAYLOADS:
        ours, stock = at[(payload, "dagserve")], at[(payload, "bare (thriftpy2 stock)")]
        value = ratio(ours["req/s"], stock["req/s"])
        out.append({
            "payload": payload, "concurrency": TARGET_CONCURRENCY,
            "dagserve req/s": ours["req/s"], "stock thriftpy2 echo req/s": stock["req/s"],
            "ratio": value, "target": f">= {TARGET}", "met?": "yes" if value >= TARGET else "NO",
        })  # fmt: skip
    return out


def reading(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> str:
    """One line: dagserve's throughput as a fraction of the same-stack ceiling, per load, and
    against the stock echo server at the target's concurrency."""
    parts = [
        f"{r['payload']} x{r['concurrency']}: {r['req/s / bare']:.2f}"
        for r in rows
        if r["server"] == "dagserve"
    ]
    stock = [
        f"{t['payload']} {t['ratio']:.2f} ({'met' if t['met?'] == 'yes' else 'NOT met'})"
        for t in targets
    ]
    return (
        "dagserve req/s / bare same-stack echo: " + "; ".join(parts)
        + f". Identity pipeline / stock thriftpy2 echo at x{TARGET_CONCURRENCY} "
        f"(target >= {TARGET}): " + "; ".join(stock)
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 s windows (default 6 s)")
    parser.add_argument("--duration", type=float, help="seconds per window")
    parser.add_argument("--_bare", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._bare:
        BARE_STACKS[args._bare[0]](int(args._bare[1]))
        return 0
    duration = args.duration or (2.0 if args.quick else 6.0)
    rows = with_ratios(run_scenario(duration, warmup_s=0.5 if args.quick else 1.0))
    print(f"### RPC ceiling: closed loop, {duration:g} s windows\n")
    print(render_table(rows))
    targets = target_rows(rows)
    print(
        f"\n### Target: the identity pipeline against the stock thriftpy2 echo server at "
        f"concurrency {TARGET_CONCURRENCY} (req/s ratio >= {TARGET})\n"
    )
    print(render_table(targets))
    print(f"\nReading: {reading(rows, targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
