"""Soak: a server under steady good load meets bad input, overload and a worker kill.

    .venv/bin/python -m benchmarks.soak [--quick]

One server (``dagserve serve`` in a subprocess) serves tests/pipelines/calc.yaml and
soak.yaml (a batched model bounded by ``max_queue`` and ``max_queue_delay_ms``).  Good load
runs the whole time (closed loop, 8 connections, the batched worker model).  Faults come in
turn: malformed frames and invalid tensors, an overload burst, ten times the sustainable rate
(open loop) for a while, a SIGKILL of the worker.  Reported: requests sent, answered,
succeeded, refused by type, LOST (a request with neither an answer nor a typed error: must be
0), peak memory of the server and its workers, worker restarts, the steady load's latency
before and during the 10x load, and for each fault the time until good requests succeed again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.bench import BenchSpec, run_bench
from engine.client import AsyncClient, Client
from engine.errors import ClientConnectionError
from engine.workers.pool import resident_mb
from model_plugins.errors import DagserveError

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = [
    ROOT / "tests" / "pipelines" / "calc.yaml",
    ROOT / "tests" / "pipelines" / "soak.yaml",
]
GOOD = {"x": np.ones((1, 2), np.float32)}


@dataclass
class Tally:
    sent: int = 0
    answered: int = 0
    ok: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    ok_times: list[float] = field(default_factory=list)
    ok_latencies: list[float] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def good_load(port: int, until: float, tally: Tally) -> None:
    async with AsyncClient("127.0.0.1", port, pool_size=8, timeout_s=30) as client:

        async def loop() -> None:
            while time.monotonic() < until:
                tally.sent += 1
                try:
                    started = time.perf_counter()
                    await client.infer("soak", GOOD, timeout_ms=5000)
                    tally.ok_latencies.append(time.perf_counter() - started)
                    tally.ok += 1
                    tally.ok_times.append(time.monotonic())
                    tally.answered += 1
                except DagserveError as exc:  # a typed answer: counted, not lost
                    tally.refused[type(exc).__name__] += 1
                    tally.answered += 1
                except (ClientConnectionError, ConnectionError, TimeoutError) as exc:
                    tally.lost[type(exc).__name__] += 1

        await asyncio.gather(*(loop() for _ in range(8)))


def bad_input(port: int, seconds: float, tally: Tally) -> None:
    """Garbage frames, huge frame headers, and invalid tensors, for ``seconds``."""
    end = time.monotonic() + seconds
    rng = np.random.default_rng(1)
    with Client("127.0.0.1", port, timeout_s=10) as client:
        while time.monotonic() < end:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(struct.pack("!i", 64) + rng.bytes(64))
                raw.sendall(struct.pack("!i", 2**31 - 1))
            tally.sent += 1
            try:
                client.infer("calc", {"x": np.ones((1, 7), np.float32)})
            except DagserveError as exc:
                tally.refused[type(exc).__name__] += 1
                tally.answered += 1


async def overload_burst(port: int, tally: Tally) -> None:
    """200 requests at once, each more items than the model's queue holds in total."""
    async with AsyncClient("127.0.0.1", port, pool_size=200, timeout_s=30) as client:

        async def one() -> None:
            tally.sent += 1
            try:
                await client.infer("soak", {"x": np.ones((40, 2), np.float32)})
                tally.ok += 1
                tally.answered += 1
            except DagserveError as exc:
                tally.refused[type(exc).__name__] += 1
                tally.answered += 1
            except (ClientConnectionError, ConnectionError, TimeoutError) as exc:
                tally.lost[type(exc).__name__] += 1

        await asyncio.gather(*(one() for _ in range(200)))


def worker_pid(port: int) -> int | None:
    with Client("127.0.0.1", port) as client:
        details = client.health().details
    text = details.get("worker.numpy@cpu", "")
    for part in text.split():
        if part.startswith("pid="):
            return int(part[4:])
    return None


def _latencies_ms(tally: Tally) -> tuple[float, float]:
    return _p(sorted(tally.ok_latencies), 50), _p(sorted(tally.ok_latencies), 99)


def _p(ordered: list[float], percentile: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(percentile / 100 * len(ordered)))] * 1000


def recovery_s(tally: Tally, fault_end: float) -> float | None:
    after = [t for t in tally.ok_times if t >= fault_end]
    return (after[0] - fault_end) if after else None


async def main_async(quick: bool) -> int:
    phase = 4.0 if quick else 12.0
    port = _free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "engine.cli", "serve", *map(str, PIPELINES), "--port", str(port),
         "--log-level", "error"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client("127.0.0.1", port, timeout_s=2) as c:
                    if c.health().ready:
                        break
            except ConnectionError:
                pass
            if time.monotonic() > deadline:
                print("server not ready", file=sys.stderr)
                return 1
            await asyncio.sleep(0.2)
        tally = Tally()
        start = time.monotonic()
        total = phase * 6
        load = asyncio.create_task(good_load(port, start + total, tally))
        peak = {"server MB": 0.0, "workers MB": 0.0}
        fault_ends: dict[str, float] = {}

        async def sample_memory() -> None:
            while not load.done():
                peak["server MB"] = max(peak["server MB"], resident_mb(server.pid) or 0)
                pid = await asyncio.to_thread(worker_pid, port)
                peak["workers MB"] = max(peak["workers MB"], resident_mb(pid) or 0)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.sleep(phase)  # baseline
        baseline_ok = tally.ok
        baseline_rps = baseline_ok / phase
        baseline_lat = _latencies_ms(tally)
        await asyncio.to_thread(bad_input, port, phase, tally)
        fault_ends["bad input"] = time.monotonic()
        await asyncio.sleep(phase / 2)
        await overload_burst(port, tally)
        fault_ends["overload burst"] = time.monotonic()
        await asyncio.sleep(phase / 2)
        # ten times the sustainable rate, open loop, on top of the steady load
        mark = len(tally.ok_latencies)
        heavy = await run_bench(
            BenchSpec(
                "127.0.0.1", port, "soak", [GOOD], concurrency=2000,
                rate=max(10 * baseline_rps, 50.0), duration_s=phase, warmup_s=0.0,
                timeout_ms=5000,
            )
        )  # fmt: skip
        fault_ends["10x load"] = time.monotonic()
        during_lat = sorted(tally.ok_latencies[mark:])
        await asyncio.sleep(phase / 2)
        pid = await asyncio.to_thread(worker_pid, port)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        fault_ends["worker SIGKILL"] = time.monotonic()
        await load
        await sampler
        recoveries = {fault: recovery_s(tally, end) for fault, end in fault_ends.items()}
        with Client("127.0.0.1", port) as c:
            details = c.health().details
        restarts = details.get("worker.numpy@cpu", "")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)

    print(
        "| sent | answered | succeeded | refused (typed) | LOST | peak server MB | peak worker MB |"
    )
    print("|---|---|---|---|---|---|---|")
    refused = ", ".join(f"{k}={v}" for k, v in sorted(tally.refused.items())) or "0"
    lost = sum(tally.lost.values())
    print(f"| {tally.sent} | {tally.answered} | {tally.ok} | {refused} | {lost} "
          f"| {peak['server MB']:.0f} | {peak['workers MB']:.0f} |")  # fmt: skip
    print()
    print("| fault | time until good requests succeed again |")
    print("|---|---|")
    for fault, seconds in recoveries.items():
        shown = f"{seconds * 1000:.0f} ms" if seconds is not None else "never"
        print(f"| {fault} | {shown} |")
    print()
    print("| steady load, accepted requests | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(
        f"| baseline ({baseline_rps:.0f} req/s) | {baseline_lat[0]:.1f} | {baseline_lat[1]:.1f} |"
    )
    print(f"| during 10x open-loop load | {_p(during_lat, 50):.1f} | {_p(during_lat, 99):.1f} |")
    extra = ", ".join(f"{k}={v}" for k, v in sorted(heavy.errors.items())) or "none"
    print(
        f"\n10x load: {heavy.sent} sent at {max(10 * baseline_rps, 50.0):.0f}/s for {phase:g} s, "
        f"{heavy.ok} accepted and answered in the window, refused: {extra}"
    )
    print(f"\nworker after the run: {restarts}; server exit code {code}")
    if lost:
        print(f"LOST requests by error: {dict(tally.lost)}")
    return 0 if lost == 0 and code == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s phases instead of 12 s")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args.quick))


if __name__ == "__main__":
    sys.exit(main())
