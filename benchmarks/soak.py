"""Soak: a server under steady good load meets bad input, overload and a worker kill.

    .venv/bin/python -m benchmarks.soak [--quick | --phase SECONDS]

One server (``dagserve serve`` in a subprocess) serves tests/pipelines/calc.yaml and
soak.yaml (a batched model bounded by ``max_queue`` and ``max_queue_delay_ms``).  Good load
runs the whole time (closed loop, 8 connections, the batched worker model).  Faults come in
turn: malformed frames and invalid tensors, an overload burst, ten times the sustainable rate
(open loop) for a while, a SIGKILL of the worker.

Reported, for every stream of requests apart (the valid ones, the deliberately invalid ones,
and the 10x phase's): requests sent, answered, succeeded, refused by type, and LOST (a request
with neither an answer nor a typed error: must be 0).  Malformed frames are counted apart: they
are not requests, and the server closes their connections without an answer.  Also: peak
memory of the server and its worker, worker restarts, the steady load's latency before and
during the 10x load, and for each fault how the steady load fared: its requests that failed
from the fault's start until the next fault, and the recovery time, from the fault's end (the
kill, for the SIGKILL) to the first success of a steady-load request SENT after it.  A fault
that disturbs nothing still shows one request's latency there: compare it with the p50.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ClientConnectionError
from engine.runtime.workers.pool import resident_mb
from engine.tools.bench import BenchResult, BenchSpec, run_bench
from engine.tools.ports import ServerNotReady, free_port, wait_ready
from engine.transport.client import AsyncClient, Client
from model_plugins.errors import DagserveError

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = [
    ROOT / "tests" / "pipelines" / "calc.yaml",
    ROOT / "tests" / "pipelines" / "soak.yaml",
]
GOOD = {"x": np.ones((1, 2), np.float32)}
#: the overload burst: this many requests at once, of this many items each
BURST, BURST_ITEMS = 200, 40


@dataclass
class Stream:
    """The requests of one kind: each one sent is counted once, by outcome."""

    name: str
    sent: int = 0
    #: "ok" or the error's type, for every request sent
    outcomes: Counter[str] = field(default_factory=Counter)
    #: the ones that got no answer (a broken connection, a client timeout), by type
    lost: Counter[str] = field(default_factory=Counter)
    #: (sent at, done at, outcome) of each request, time.monotonic(); kept where asked
    records: list[tuple[float, float, str]] | None = None

    @property
    def answered(self) -> int:
        return self.sent - sum(self.lost.values())

    @property
    def refused(self) -> Counter[str]:
        return Counter({k: v for k, v in self.outcomes.items() if k != "ok" and k not in self.lost})

    def start(self) -> float:
        self.sent += 1
        return time.monotonic()

    def done(self, sent_at: float, error: BaseException | None) -> None:
        outcome = "ok" if error is None else type(error).__name__
        self.outcomes[outcome] += 1
        if error is not None and not _is_answer(error):
            self.lost[outcome] += 1
        if self.records is not None:
            self.records.append((sent_at, time.monotonic(), outcome))

    async def call(self, request: Callable[[], Awaitable[Any]]) -> None:
        sent_at = self.start()
        try:
            await request()
        except Exception as exc:  # counted by type; the load goes on
            self.done(sent_at, exc)
        else:
            self.done(sent_at, None)

    @classmethod
    def of_bench(cls, name: str, result: BenchResult) -> Stream:
        """The 10x phase as a stream: every request run_bench sent, warm-up and drain too."""
        stream = cls(name, sent=result.sent, outcomes=Counter(result.outcomes))
        unanswered = result.sent - result.answered
        client_side = {k: v for k, v in result.outcomes.items() if k.startswith("Client")}
        stream.lost.update(client_side)
        if unanswered != sum(client_side.values()):
            stream.lost["other"] += unanswered - sum(client_side.values())
        return stream


def _is_answer(error: BaseException) -> bool:
    """A typed error is the server's answer; a broken connection or a timeout is none."""
    return isinstance(error, DagserveError) and not isinstance(error, ClientConnectionError)


async def good_load(port: int, until: float, stream: Stream) -> None:
    async with AsyncClient("127.0.0.1", port, pool_size=8, timeout_s=30) as client:

        async def loop() -> None:
            while time.monotonic() < until:
                await stream.call(lambda: client.infer("soak", GOOD, timeout_ms=5000))

        await asyncio.gather(*(loop() for _ in range(8)))


def bad_input(port: int, seconds: float, invalid: Stream, frames: Counter[str]) -> None:
    """Garbage frames, huge frame headers, and invalid tensors, for ``seconds``."""
    end = time.monotonic() + seconds
    rng = np.random.default_rng(1)
    with Client("127.0.0.1", port, timeout_s=10) as client:
        while time.monotonic() < end:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(struct.pack("!i", 64) + rng.bytes(64))
                frames["garbage"] += 1
                raw.sendall(struct.pack("!i", 2**31 - 1))
                frames["huge header"] += 1
            sent_at = invalid.start()
            try:
                client.infer("calc", {"x": np.ones((1, 7), np.float32)})
            except Exception as exc:
                invalid.done(sent_at, exc)
            else:
                invalid.done(sent_at, None)


async def overload_burst(port: int, burst: Stream) -> None:
    """BURST requests at once, of BURST_ITEMS items each: far more than the model's queue."""
    x = np.ones((BURST_ITEMS, 2), np.float32)
    async with AsyncClient("127.0.0.1", port, pool_size=BURST, timeout_s=30) as client:
        await asyncio.gather(*(burst.call(lambda: client.infer("soak", {"x": x}))
                               for _ in range(BURST)))  # fmt: skip


def worker_pid(port: int) -> int | None:
    with Client("127.0.0.1", port) as client:
        details = client.health().details
    text = details.get("worker.numpy@cpu", "")
    for part in text.split():
        if part.startswith("pid="):
            return int(part[4:])
    return None


def _p(ordered: list[float], percentile: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(percentile / 100 * len(ordered)))] * 1000


def latencies(stream: Stream, start: float, end: float) -> list[float]:
    """Sorted latencies of the successful requests sent in [start, end)."""
    assert stream.records is not None
    return sorted(d - s for s, d, o in stream.records if o == "ok" and start <= s < end)


@dataclass(frozen=True)
class Fault:
    name: str
    start: float
    end: float


def recovery(stream: Stream, fault: Fault) -> float | None:
    """Seconds from the fault's end to the first success of a request sent after it (None:
    never).  A request sent before the fault's end does not count, whenever it succeeded."""
    assert stream.records is not None
    after = [d for s, d, o in stream.records if o == "ok" and s >= fault.end]
    return min(after) - fault.end if after else None


def failures(stream: Stream, start: float, end: float) -> Counter[str]:
    """The requests that failed with an answer or without one in [start, end), by type."""
    assert stream.records is not None
    return Counter(o for _, d, o in stream.records if o != "ok" and start <= d < end)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(counter.items())) or "0"


async def main_async(phase: float) -> int:
    port = free_port()
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
        [sys.executable, "-m", "engine.cli", "serve", *map(str, PIPELINES), "--port", str(port),
         "--log-level", "error"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        try:  # blocks the loop, which runs nothing yet
            wait_ready(port, server, timeout_s=60, poll_s=0.2)
        except ServerNotReady as exc:
            print(exc, file=sys.stderr)
            return 1
        good = Stream("steady load (valid, 1 item)", records=[])
        invalid = Stream("invalid tensors (deliberately)")
        burst = Stream(f"overload burst (valid, {BURST_ITEMS} items)")
        frames: Counter[str] = Counter()
        start = time.monotonic()
        load = asyncio.create_task(good_load(port, start + phase * 6, good))
        peak = {"server MB": 0.0, "workers MB": 0.0}
        faults: list[Fault] = []

        async def sample_memory() -> None:
            while not load.done():
                peak["server MB"] = max(peak["server MB"], resident_mb(server.pid) or 0)
                pid = await asyncio.to_thread(worker_pid, port)
                peak["workers MB"] = max(peak["workers MB"], resident_mb(pid) or 0)
                await asyncio.sleep(0.5)

        sampler = asyncio.create_task(sample_memory())
        await asyncio.sleep(phase)  # baseline
        baseline = (start, time.monotonic())
        baseline_rps = sum(1 for s, _, o in good.records or [] if o == "ok") / phase
        began = time.monotonic()
        await asyncio.to_thread(bad_input, port, phase, invalid, frames)
        faults.append(Fault("bad input", began, time.monotonic()))
        await asyncio.sleep(phase / 2)
        began = time.monotonic()
        await overload_burst(port, burst)
        faults.append(Fault("overload burst", began, time.monotonic()))
        await asyncio.sleep(phase / 2)
        # ten times the sustainable rate, open loop, on top of the steady load
        rate = max(10 * baseline_rps, 50.0)
        began = time.monotonic()
        heavy_result = await run_bench(
            BenchSpec(
                "127.0.0.1", port, "soak", [GOOD], concurrency=2000, rate=rate,
                duration_s=phase, warmup_s=0.0, timeout_ms=5000,
            )
        )  # fmt: skip
        faults.append(Fault("10x load", began, time.monotonic()))
        heavy = Stream.of_bench("10x open-loop load (valid, 1 item)", heavy_result)
        await asyncio.sleep(phase / 2)
        pid = await asyncio.to_thread(worker_pid, port)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        faults.append(Fault("worker SIGKILL", killed, killed))
        await load
        await sampler
        with Client("127.0.0.1", port) as c:
            details = c.health().details
        restarts = details.get("worker.numpy@cpu", "")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)

    streams = [good, burst, heavy, invalid]
    valid = [good, burst, heavy]
    print(f"Soak: {phase:g} s phases, {phase * 6:g} s of steady load in all.\n")
    print("| requests | sent | answered | succeeded | refused (typed answer) | LOST |")
    print("|---|---|---|---|---|---|")
    for s in streams:
        print(f"| {s.name} | {s.sent} | {s.answered} | {s.outcomes['ok']} | "
              f"{_counts(s.refused)} | {sum(s.lost.values())} |")  # fmt: skip
    print(f"| **all valid requests** | {sum(s.sent for s in valid)} | "
          f"{sum(s.answered for s in valid)} | {sum(s.outcomes['ok'] for s in valid)} | "
          f"{_counts(sum((s.refused for s in valid), Counter()))} | "
          f"{sum(sum(s.lost.values()) for s in valid)} |")  # fmt: skip
    print(f"| **all requests** | {sum(s.sent for s in streams)} | "
          f"{sum(s.answered for s in streams)} | {sum(s.outcomes['ok'] for s in streams)} | "
          f"{_counts(sum((s.refused for s in streams), Counter()))} | "
          f"{sum(sum(s.lost.values()) for s in streams)} |")  # fmt: skip
    print(f"\nMalformed frames (not requests; their connections are closed, unanswered): "
          f"{_counts(frames)}. Peak memory: server {peak['server MB']:.0f} MB, "
          f"worker {peak['workers MB']:.0f} MB.")  # fmt: skip
    not_sent = heavy_result.errors.get("ClientBackpressure", 0)
    print(
        f"\n10x load: open loop at {rate:.0f}/s for {phase:g} s; {not_sent} arrivals not sent "
        f"(the client's cap of 2000 in flight); answers in its window: {heavy_result.ok} ok."
    )
    print()
    steady = latencies(good, *baseline)
    print(
        f"| phase | steady-load requests that failed in it | recovery: the fault's end to "
        f"the first success of a request sent after it (steady p50 {_p(steady, 50):.0f} ms) |"
    )
    print("|---|---|---|")
    print(f"| baseline | {_counts(failures(good, *baseline))} | - |")
    recovered_all = True
    ends = [f.start for f in faults[1:]] + [float("inf")]
    for fault, phase_end in zip(faults, ends, strict=True):
        seconds = recovery(good, fault)
        recovered_all &= seconds is not None
        shown = f"{seconds * 1000:.0f} ms" if seconds is not None else "never"
        until = "the next fault" if phase_end != float("inf") else "the end"
        print(f"| {fault.name}, until {until} | "
              f"{_counts(failures(good, fault.start, phase_end))} | {shown} |")  # fmt: skip
    print()
    heavy_fault = next(f for f in faults if f.name == "10x load")
    during = latencies(good, heavy_fault.start, heavy_fault.end)
    print("| steady load, successful requests | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| baseline ({baseline_rps:.0f} req/s) | {_p(steady, 50):.1f} | {_p(steady, 99):.1f} |")
    print(f"| sent during the 10x open-loop load | {_p(during, 50):.1f} | {_p(during, 99):.1f} |")
    print(f"\nworker after the run: {restarts}; server exit code {code}")
    lost = sum(sum(s.lost.values()) for s in streams)
    if lost:
        print(f"LOST requests by stream: { {s.name: dict(s.lost) for s in streams if s.lost} }")
    sigkill = recovery(good, faults[-1])
    print(
        f"Reading: {sum(s.sent for s in valid)} valid requests ({invalid.sent} invalid ones "
        f"apart), {lost} lost; the steady load recovered "
        + (f"{sigkill * 1000:.0f} ms after the worker SIGKILL" if sigkill is not None
           else "NEVER after the worker SIGKILL")
        + f"; its p99 {_p(steady, 99):.0f} ms before, {_p(during, 99):.0f} ms during 10x load."
    )  # fmt: skip
    return 0 if lost == 0 and code == 0 and recovered_all else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="4 s phases instead of 12 s")
    length.add_argument("--phase", type=float, help="seconds per phase (a short check: 1.5)")
    args = parser.parse_args(argv)
    phase = args.phase if args.phase is not None else 4.0 if args.quick else 12.0
    if phase <= 0:
        parser.error(f"--phase must be > 0 (got {phase:g})")
    return asyncio.run(main_async(phase))


if __name__ == "__main__":
    sys.exit(main())
