"""``dagserve bench``: load on one pipeline of a running server, and what it measured.

Two ways to load:

* **closed loop** (``concurrency``): that many tasks each send a request, await its answer and
  send the next, so the offered load follows the server;
* **open loop** (``rate``): requests leave at Poisson arrivals of ``rate`` per second whatever
  the server does, up to ``concurrency`` in flight (past it an arrival is counted as
  ``ClientBackpressure`` and not sent).  Latency is measured from the scheduled arrival, so a
  server that falls behind is not flattered (no coordinated omission).

Time is a warm-up, whose answers are not counted, then a window of ``duration_s``: a request
counts when it completes inside the window.  Errors are counted by type and never stop the load.
Every request sent, warm-up and drain included, is also counted by outcome (``ok`` or the
error's type) in ``outcomes``: the server's ``dagserve_requests_total`` counts the same ones
by status.  It is ``answered`` only when the server answered (a result or a typed error), not
when the connection broke or the client timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ClientConnectionError
from engine.transport.client import AsyncClient
from model_plugins.errors import DagserveError
from model_plugins.specs import NUMPY_DTYPES, TensorSpec

#: the percentiles the table reports
PERCENTILES = (50.0, 95.0, 99.0, 99.9)

Inputs = Mapping[str, Any]


@dataclass(frozen=True)
class BenchSpec:
    """What to send, where, and how hard."""

    host: str
    port: int
    pipeline: str
    #: the requests' inputs, used in turn (the first dimension of each is the item dimension)
    samples: Sequence[Inputs]
    concurrency: int = 8
    #: requests per second (open loop); None: closed loop at ``concurrency``
    rate: float | None = None
    duration_s: float = 10.0
    warmup_s: float = 1.0
    timeout_ms: int | None = None
    client_timeout_s: float = 60.0
    seed: int = 0


@dataclass
class BenchResult:
    """What one run measured, inside its window."""

    pipeline: str
    mode: str
    window_s: float
    #: the closed loop's tasks, or the most requests the open loop keeps in flight
    concurrency: int = 0
    ok: int = 0
    items: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list, repr=False)
    #: requests sent in all (warm-up and drain included), and those the server answered (a
    #: result or a typed error); a connection error or client timeout is not an answer
    sent: int = 0
    answered: int = 0
    #: every request sent, by outcome: ``ok`` or the error's type (the server's metrics count
    #: the answered ones by the same outcomes)
    outcomes: Counter[str] = field(default_factory=Counter)
    error_examples: dict[str, str] = field(default_factory=dict)

    @property
    def throughput_rps(self) -> float:
        return self.ok / self.window_s if self.window_s else 0.0

    @property
    def throughput_items_s(self) -> float:
        return self.items / self.window_s if self.window_s else 0.0

    def latency_ms(self, percentile: float) -> float:
        """Nearest-rank percentile of the successful requests' latency; NaN without any."""
        ordered = self.latencies_s
        if not ordered:
            return math.nan
        rank = max(1, math.ceil(percentile / 100 * len(ordered)))
        return ordered[rank - 1] * 1000

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "pipeline": self.pipeline,
            "load": self.mode,
            "ok": self.ok,
            "req/s": self.throughput_rps,
            "items/s": self.throughput_items_s,
        }
        for p in PERCENTILES:
            row[f"p{p:g} ms"] = self.latency_ms(p)
        row["errors"] = ", ".join(f"{k}={v}" for k, v in sorted(self.errors.items())) or "0"
        return row

    def to_json(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "window_s": self.window_s,
            "errors": dict(self.errors),
            "error_examples": self.error_examples,
            "sent": self.sent,
            "answered": self.answered,
            "outcomes": dict(self.outcomes),
            "mean_ms": (sum(self.latencies_s) / len(self.latencies_s) * 1000)
            if self.latencies_s
            else None,
        }


def _items(inputs: Inputs) -> int:
    first = next(iter(inputs.values()))
    return len(first)


async def run_bench(
    spec: BenchSpec, *, progress: Callable[[float, BenchResult], None] | None = None
) -> BenchResult:
    """Load ``spec.pipeline`` as ``spec`` says and return what was measured."""
    if spec.concurrency < 1:
        msg = f"concurrency must be >= 1 (got {spec.concurrency})"
        raise ValueError(msg)
    if spec.rate is not None and spec.rate <= 0:
        msg = f"rate must be > 0 requests per second (got {spec.rate})"
        raise ValueError(msg)
    if not spec.samples:
        msg = "no samples to send"
        raise ValueError(msg)
    mode = f"closed x{spec.concurrency}" if spec.rate is None else f"open {spec.rate:g}/s"
    result = BenchResult(spec.pipeline, mode, spec.duration_s, spec.concurrency)
    # perf_counter, not loop.time(): uvloop's clock ticks once a millisecond
    now = time.perf_counter
    window_start = now() + spec.warmup_s
    window_end = window_start + spec.duration_s
    samples = list(spec.samples)
    counter = iter(range(1 << 62))

    async with AsyncClient(
        spec.host, spec.port, pool_size=spec.concurrency, timeout_s=spec.client_timeout_s
    ) as client:

        async def one(started: float) -> None:
            inputs = samples[next(counter) % len(samples)]
            result.sent += 1
            error: str | None = None
            try:
                await client.infer(spec.pipeline, inputs, timeout_ms=spec.timeout_ms)
            except Exception as exc:  # every error is counted, by type; the load goes on
                error = type(exc).__name__
                result.error_examples.setdefault(error, str(exc)[:300])
                # a typed error is the server's answer; a lost connection, a client timeout
                # or a failure inside the client is not
                if isinstance(exc, DagserveError) and not isinstance(exc, ClientConnectionError):
                    result.answered += 1
            else:
                result.answered += 1
            result.outcomes[error or "ok"] += 1
            done = now()
            if not window_start <= done < window_end:
                return
            if error is None:
                result.ok += 1
                result.items += _items(inputs)
                result.latencies_s.append(done - started)
            else:
                result.errors[error] += 1

        async def closed_loop() -> None:
            while now() < window_end:
                await one(now())

        async def open_loop() -> None:
            assert spec.rate is not None
            arrivals = random.Random(spec.seed)
            tasks: set[asyncio.Task[None]] = set()
            next_at = now()
            while next_at < window_end:
                await asyncio.sleep(max(0.0, next_at - now()))
                if len(tasks) >= spec.concurrency:
                    if window_start <= now() < window_end:
                        result.errors["ClientBackpressure"] += 1
                else:
                    task = asyncio.create_task(one(next_at))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                next_at += arrivals.expovariate(spec.rate)
            if tasks:
                await asyncio.gather(*tasks)

        async def report() -> None:
            while True:
                await asyncio.sleep(0.5)
                if progress is not None:
                    progress(now() - window_start, result)

        reporter = asyncio.create_task(report())
        try:
            if spec.rate is None:
                await asyncio.gather(*(closed_loop() for _ in range(spec.concurrency)))
            else:
                await open_loop()
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    result.latencies_s.sort()
    return result


# -- inputs ----------------------------------------------------------------------------------


def samples_from_file(
    path: Path, specs: Mapping[str, TensorSpec] | None = None
) -> list[dict[str, Any]]:
    """Samples from ``.npz`` (one array per input; each row is one single-item request),
    ``.json`` (a list of objects, each ``{input: value}`` for one single-item request) or
    ``.jsonl`` (the records of ``dagserve stream``, one request each: read with the pipeline's
    input ``specs``, so that the same file loads the server directly and through Flink)."""
    if path.suffix == ".jsonl":
        if specs is None:
            msg = f"{path}: records (.jsonl) are read with the pipeline's input specs"
            raise ValueError(msg)
        return samples_from_records(path, specs)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        counts = {len(a) for a in arrays.values()}
        if len(counts) != 1:
            msg = f"{path}: arrays must have the same first dimension (got {sorted(counts)})"
            raise ValueError(msg)
        return [{k: a[i : i + 1] for k, a in arrays.items()} for i in range(counts.pop())]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            msg = f"{path}: expected a JSON list of objects, one per request"
            raise ValueError(msg)
        return [{k: _as_item(v) for k, v in row.items()} for row in rows]
    msg = f"{path}: samples must be a .npz or a .json file"
    raise ValueError(msg)


def samples_from_records(path: Path, specs: Mapping[str, TensorSpec]) -> list[dict[str, Any]]:
    """The request of each record of a ``dagserve stream`` source file (JSONL: each input one
    item, BYTES as base64; other fields are left out); a line that is no record of the
    pipeline is a ValueError naming its line number, not a request left out."""
    from engine.stream.records import RecordError, RecordMapping

    mapping = RecordMapping(specs)
    samples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                _, inputs = mapping.parse(line)
            except RecordError as exc:
                msg = f"{path}:{number}: {exc.message}"
                raise ValueError(msg) from exc
            if not inputs:
                msg = f"{path}:{number}: a record without any input of the pipeline"
                raise ValueError(msg)
            samples.append(inputs)
    return samples


def _as_item(value: Any) -> np.ndarray:
    if isinstance(value, str):
        return np.array([value], dtype=object)
    return np.asarray([value])


def generated_samples(
    specs: Mapping[str, TensorSpec], *, count: int = 16, seed: int = 0, optional: bool = True
) -> list[dict[str, np.ndarray]]:
    """Single-item requests made up from the pipeline's declared input specs.

    Numbers are random; ``-1`` dimensions get 8; strings are short random sentences; BYTES
    inputs get small random PNG images (the usual bytes input is an encoded image).
    """
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        sample: dict[str, np.ndarray] = {}
        for name, spec in specs.items():
            if spec.optional and not optional:
                continue
            shape = (1, *(8 if d == -1 else d for d in spec.shape))
            sample[name] = _random_tensor(spec.dtype, shape, rng)
        samples.append(sample)
    return samples


_WORDS = [
    "a", "the", "cat", "sun", "sea", "pizza", "match", "guitar",
    "phone", "runs", "sleeps", "plays", "under", "over", "with",
]  # fmt: skip


def _random_tensor(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "string":
        out = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            out[index] = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 12))))
        return out
    if dtype == "bytes":
        out = np.empty(shape, dtype=object)
        for index in np.ndindex(shape):
            out[index] = _random_png(rng)
        return out
    np_dtype = NUMPY_DTYPES[dtype]
    if np_dtype.kind == "f":
        return rng.standard_normal(shape).astype(np_dtype)
    if np_dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 100, shape).astype(np_dtype)


def _random_png(rng: np.random.Generator) -> bytes:
    from PIL import Image

    pixels = rng.integers(0, 256, (int(rng.integers(32, 97)), int(rng.integers(32, 97)), 3))
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- output ----------------------------------------------------------------------------------


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows with the same keys as a Markdown table."""
    if not rows:
        return "(no rows)"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key, "")
            if isinstance(value, float):
                if math.isnan(value):
                    cells.append("-")
                else:
                    cells.append(f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress_bar(total_s: float) -> Callable[[float, BenchResult], None]:
    """A one-line progress bar on stderr (when it is a terminal)."""

    def show(elapsed: float, result: BenchResult) -> None:
        if not sys.stderr.isatty():
            return
        done = min(max(elapsed / total_s, 0.0), 1.0) if total_s else 1.0
        bar = "#" * int(done * 30)
        errors = sum(result.errors.values())
        sys.stderr.write(
            f"\r[{bar:<30}] {max(elapsed, 0):5.1f}/{total_s:g} s  ok {result.ok}  "
            f"errors {errors}  p50 {result_p50(result):.2f} ms   "
        )
        sys.stderr.flush()

    return show


def result_p50(result: BenchResult) -> float:
    if not result.latencies_s:
        return math.nan
    ordered = sorted(result.latencies_s[-2000:])
    return ordered[len(ordered) // 2] * 1000


__all__ = [
    "BenchResult",
    "BenchSpec",
    "generated_samples",
    "progress_bar",
    "render_table",
    "run_bench",
    "samples_from_file",
    "samples_from_records",
]
