"""A closed-loop load generator over :class:`engine.transport.client.AsyncClient`, for the batching
and Ray Serve scenarios (``dagserve bench`` / :mod:`engine.tools.bench` is the general one).

    from benchmarks.loadgen import LoadSpec, run_load
    result = await run_load(LoadSpec(host, port, "heavy", {"pixels": x}, concurrency=64,
                                     duration_s=20, warmup_s=3))
    print(result.throughput_items_s, result.latency_ms(99), result.errors)

Closed loop: ``concurrency`` tasks each send one request, await its answer, and send the next,
so the offered load adapts to the server (no coordinated-omission question: there is no
schedule to fall behind). Each task holds its own connection (the client's pool is as large as
the concurrency).

Time is split into a warm-up, whose completions are thrown away, and a measurement window of
``duration_s``: a request counts when it COMPLETES inside the window (its latency is recorded
then), so the throughput is completions in the window over the window's length. After the
window no new request starts; those still in flight are awaited (bounded by the call timeout)
and not counted.

Errors are counted by type name (``Overloaded``, ``DeadlineExceeded``, ``ClientTimeout`` ...)
and do not stop the load; a task whose call failed starts its next request at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.tools.bench import render_table
from engine.transport.client import AsyncClient


@dataclass(frozen=True)
class LoadSpec:
    """What to send, where, and how hard."""

    host: str
    port: int
    pipeline: str
    #: the request's inputs (the first dimension of each is the item dimension)
    inputs: Mapping[str, Any]
    concurrency: int = 1
    duration_s: float = 10.0
    warmup_s: float = 2.0
    #: the request's deadline, sent to the server (None: the server's default)
    timeout_ms: int | None = None
    #: the client's own bound on one call (connect included)
    client_timeout_s: float = 60.0
    #: items per request (for items/s); by default the first dimension of the first input
    items_per_request: int | None = None
    #: a check on every answer; an exception it raises counts as an error of its type
    check: Callable[[Any], None] | None = None


@dataclass
class LoadResult:
    """What one run measured (the measurement window only)."""

    pipeline: str
    concurrency: int
    window_s: float
    requests: int
    items: int
    #: error type name -> count, inside the window
    errors: dict[str, int] = field(default_factory=dict)
    #: latencies of the successful requests in the window, in seconds, sorted
    latencies_s: list[float] = field(default_factory=list, repr=False)
    #: errors during the warm-up and the drain (not part of the figures)
    errors_outside_window: dict[str, int] = field(default_factory=dict)
    #: error type name -> the first message seen of that type
    error_examples: dict[str, str] = field(default_factory=dict)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.window_s if self.window_s else 0.0

    @property
    def throughput_items_s(self) -> float:
        return self.items / self.window_s if self.window_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_ms(self, percentile: float) -> float:
        """The latency percentile (nearest rank), in milliseconds; NaN without samples."""
        if not self.latencies_s:
            return math.nan
        rank = max(1, math.ceil(percentile / 100 * len(self.latencies_s)))
        return self.latencies_s[rank - 1] * 1000

    @property
    def mean_latency_ms(self) -> float:
        if not self.latencies_s:
            return math.nan
        return sum(self.latencies_s) / len(self.latencies_s) * 1000

    def summary(self) -> dict[str, object]:
        """One table row."""
        return {
            "pipeline": self.pipeline,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "items/s": self.throughput_items_s,
            "p50 ms": self.latency_ms(50),
            "p95 ms": self.latency_ms(95),
            "p99 ms": self.latency_ms(99),
            "errors": ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "0",
        }


def _items_of(spec: LoadSpec) -> int:
    if spec.items_per_request is not None:
        return spec.items_per_request
    first = next(iter(spec.inputs.values()))
    shape = getattr(first, "shape", None)
    return int(shape[0]) if shape else len(first)


async def run_load(spec: LoadSpec, client: AsyncClient | None = None) -> LoadResult:
    """Run the closed loop described by ``spec``; ``client`` (optional) is not closed."""
    if spec.concurrency < 1:
        msg = f"concurrency must be >= 1 (got {spec.concurrency})"
        raise ValueError(msg)
    own = client is None
    if client is None:
        client = AsyncClient(
            spec.host, spec.port, pool_size=spec.concurrency, timeout_s=spec.client_timeout_s
        )
    items = _items_of(spec)
    loop = asyncio.get_running_loop()
    start = loop.time()
    window_start = start + spec.warmup_s
    window_end = window_start + spec.duration_s
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    examples: dict[str, str] = {}

    async def one_task() -> None:
        while True:
            sent = loop.time()
            if sent >= window_end:
                return
            error: str | None = None
            try:
                result = await client.infer(spec.pipeline, spec.inputs, timeout_ms=spec.timeout_ms)
                if spec.check is not None:
                    spec.check(result)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every error counts, by type; the loop goes on
                error = type(exc).__name__
                examples.setdefault(error, str(exc)[:500])
            done = loop.time()
            inside = window_start <= done < window_end
            if error is None:
                if inside:
                    latencies.append(done - sent)
            elif inside:
                errors[error] += 1
            else:
                outside[error] += 1

    try:
        await asyncio.gather(*(one_task() for _ in range(spec.concurrency)))
    finally:
        if own:
            with contextlib.suppress(Exception):
                await client.aclose()
    latencies.sort()
    return LoadResult(
        pipeline=spec.pipeline,
        concurrency=spec.concurrency,
        window_s=spec.duration_s,
        requests=len(latencies),
        items=len(latencies) * items,
        errors=dict(errors),
        latencies_s=latencies,
        errors_outside_window=dict(outside),
        error_examples=examples,
    )


def percentile_ms(samples_s: list[float], percentile: float) -> float:
    """Nearest-rank percentile of unsorted samples in seconds, in milliseconds."""
    ordered = sorted(samples_s)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(percentile / 100 * len(ordered)))
    return ordered[rank - 1] * 1000


def _main() -> None:  # a small CLI until `dagserve bench` exists
    import argparse
    import json

    parser = argparse.ArgumentParser(description="closed-loop load on one dagserve pipeline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--pipeline", required=True)
    parser.add_argument(
        "--input", action="append", required=True, metavar="NAME=DTYPE:SHAPE",
        help="random input, e.g. pixels=float32:1,3,224,224 (first dim = items)",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--timeout-ms", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    inputs = {}
    for text in args.input:
        name, _, rest = text.partition("=")
        dtype, _, shape = rest.partition(":")
        dims = tuple(int(d) for d in shape.split(","))
        inputs[name] = rng.random(dims).astype(dtype)
    spec = LoadSpec(
        args.host, args.port, args.pipeline, inputs, concurrency=args.concurrency,
        duration_s=args.duration, warmup_s=args.warmup, timeout_ms=args.timeout_ms,
    )  # fmt: skip
    started = time.perf_counter()
    result = asyncio.run(run_load(spec))
    row = result.summary()
    if args.json:
        print(json.dumps(row))
    else:
        print(render_table([row]))
        print(f"(ran {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    _main()
