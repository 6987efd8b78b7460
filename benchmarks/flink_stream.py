"""Records per second through Flink into the example pipeline against ``dagserve bench``.

    .venv/bin/python -m benchmarks.flink_stream [--quick] [--parallelism 1] [--capacity 8]

``examples/post_understanding/pipeline.yaml`` (its models built first, as
``benchmarks.pipeline_vs_members`` builds them) is served by ONE ``dagserve serve`` subprocess,
up from start to end.  The records are the valid lines of the example's stream
(``make_stream.lines()``: the sample posts and the random ones, text, image or both; the
invalid lines left out), written to one JSONL file that both loads read, at the same
concurrency, ``CAPACITY`` x ``PARALLELISM``:

- **direct**: ``run_bench`` closed loop, ``CAPACITY x PARALLELISM`` tasks, the records in
  turn, read by ``samples_from_file`` as ``dagserve bench --samples FILE.jsonl`` reads them
  (with the job's own record parser, ``engine.stream.records``);
- **Flink**: ``dagserve stream --parallelism PARALLELISM --capacity CAPACITY`` (unordered),
  run from the Flink venv (``.venv-flink``, ``make flink-venv``) over the records repeated to
  last about 25 s (8 s with ``--quick``) at the direct rate, and at least once through.  The
  job writes each answer to its sink file as it comes; this process counts the file's lines
  every 0.1 s, and the Flink figure is the rate over the middle of the job, from the poll
  where 10% of the records were in the sink to the one where 90% were: the job's start (a
  JVM, the mini-cluster, the Python workers: seconds) and its first and last answers are left
  out, "once the job is warm" as issue 17 asks.  Beside it: the job's own figure (``--json``:
  first answer to last) and every record over the job's wall time, start included.

The concurrency is one subtask with 8 records in flight by default: the job reads its one
source file (one split) in one source subtask, whose records go FORWARD to the operator's
subtask of the same index (the job's execution plan, PyFlink 2.3), so a second subtask gets no
record and ``--parallelism 2 --capacity 4`` has only 4 in flight, not 8.

Direct, Flink, direct: the direct figure is the mean of its two windows (a drift of the shared
machine weighs on both sides alike).  Every record must be answered by the job (no dead
letter); the target is Flink / direct >= 0.8.  Without ``.venv-flink`` the scenario stops
with a message (``run_all`` does not start it there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks._serving import HOST, ROOT, dagserve_command, figures, ratio, serving
from benchmarks.pipeline_vs_members import EXAMPLE, PIPELINE_FILE, build_models
from engine.tools.bench import BenchResult, BenchSpec, render_table, run_bench, samples_from_file
from engine.tools.ports import free_port
from engine.transport.client import Client

PIPELINE = "post_understanding"
FLINK_PYTHON = ROOT / ".venv-flink" / "bin" / "python"
#: the job's operator subtasks, and records in flight in each: the direct loop's concurrency is
#: their product (see the docstring for why one subtask)
PARALLELISM = 1
CAPACITY = 8
#: the share of the records in the sink where the Flink figure's window starts, and ends
WINDOW = (0.1, 0.9)
#: Flink / direct records per second, once the job is warm (issue 17)
TARGET = 0.8


def stream_records() -> list[str]:
    """The valid lines of the example's stream (``make_stream.lines()``), in order."""
    sys.path.insert(0, str(EXAMPLE))
    from make_stream import INVALID_LINES, lines  # examples/post_understanding/make_stream.py

    invalid = {bad.line for bad in INVALID_LINES}
    return [line for line in lines() if line not in invalid]


def write_records(path: Path, records: Sequence[str], count: int) -> Path:
    """``count`` lines: ``records`` in turn, each with a unique ``id`` (``<id>#<pass>``)."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(count):
            record = json.loads(records[i % len(records)])
            record["id"] = f"{record['id']}#{i // len(records)}"
            f.write(json.dumps(record) + "\n")
    return path


def flink_python() -> Path:
    """The Flink venv's interpreter, once PyFlink imports there (this never installs)."""
    probe = [str(FLINK_PYTHON), "-c", "import pyflink, engine.stream.operator"]
    done = (
        subprocess.run(probe, capture_output=True, text=True, timeout=300, cwd=ROOT)
        if FLINK_PYTHON.exists()
        else None
    )
    if done is None or done.returncode != 0:
        why = "it does not exist" if done is None else done.stderr.strip()[-500:]
        msg = f"PyFlink is not importable from {FLINK_PYTHON} ({why}): `make flink-venv`"
        raise SystemExit(msg)
    return FLINK_PYTHON


@dataclass(frozen=True)
class Load:
    """The job's subtasks and records in flight in each; the direct loop runs their product."""

    parallelism: int = PARALLELISM
    capacity: int = CAPACITY

    @property
    def concurrency(self) -> int:
        return self.parallelism * self.capacity


def direct(port: int, records: Path, load: Load, duration_s: float, warmup_s: float) -> BenchResult:
    """One closed-loop window of the records, as ``dagserve bench --samples`` sends them."""
    with Client(HOST, port) as client:
        specs = client.describe(PIPELINE).inputs
    spec = BenchSpec(
        HOST, port, PIPELINE, samples_from_file(records, specs),
        concurrency=load.concurrency, duration_s=duration_s, warmup_s=warmup_s,
    )  # fmt: skip
    return asyncio.run(run_bench(spec))


class SinkWatch(threading.Thread):
    """Counts the lines of a growing file every ``poll_s``: ``samples`` of (seconds, lines)."""

    def __init__(self, path: Path, poll_s: float = 0.1) -> None:
        super().__init__(name="sink-watch", daemon=True)
        self.path, self.poll_s = path, poll_s
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()

    def run(self) -> None:
        offset = lines = 0
        while not self._done.is_set():
            if self.path.exists():
                with self.path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                lines += chunk.count(b"\n")
            self.samples.append((time.monotonic(), lines))
            self._done.wait(self.poll_s)

    def stop(self) -> list[tuple[float, int]]:
        self._done.set()
        self.join()
        return self.samples


def window_rate(samples: Sequence[tuple[float, int]], total: int) -> float:
    """Lines per second between the first poll that saw ``WINDOW[0]`` of ``total`` lines and
    the first that saw ``WINDOW[1]`` of them (NaN when the job never got that far)."""
    marks = []
    for share in WINDOW:
        found = next(((t, n) for t, n in samples if n >= share * total), None)
        if found is None:
            return float("nan")
        marks.append(found)
    (t0, n0), (t1, n1) = marks
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def through_flink(
    python: Path, port: int, records: Path, load: Load, out: Path, bound_s: float
) -> dict[str, Any]:
    """Run ``dagserve stream`` over ``records``: its ``--json`` summary, its wall time and the
    rate over the middle of the job (``window rec/s``)."""
    summary, sink = out / "summary.json", out / "sink.jsonl"
    command = [
        str(python), "-m", "engine.cli", "stream", "--target", f"{HOST}:{port}",
        "--pipeline", PIPELINE, "--source", f"jsonl:{records}",
        "--sink", f"jsonl:{sink}", "--dead-letter", f"jsonl:{out / 'dead.jsonl'}",
        "--parallelism", str(load.parallelism), "--capacity", str(load.capacity),
        "--json", str(summary),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    watch = SinkWatch(sink)
    watch.start()
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=bound_s, check=False
        )
    finally:
        samples = watch.stop()
    wall_s = time.monotonic() - started
    if done.returncode != 0 or not summary.exists():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-20:])
        msg = f"dagserve stream exited with {done.returncode}:\n{tail}"
        raise RuntimeError(msg)
    job = json.loads(summary.read_text(encoding="utf-8"))
    return {**job, "wall_s": wall_s, "window rec/s": window_rate(samples, job["answered"])}


def run_scenario(
    load: Load, duration_s: float, flink_s: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    python = flink_python()
    build_models()
    records = stream_records()
    port = free_port()
    command = dagserve_command([PIPELINE_FILE], port)
    with (
        tempfile.TemporaryDirectory(prefix="flink-stream-") as tmp,
        serving(command, port, ready_timeout_s=300.0, env={"PYTHONPATH": str(EXAMPLE)}),
    ):
        folder = Path(tmp)
        once = write_records(folder / "records.jsonl", records, len(records))
        before = direct(port, once, load, duration_s, warmup_s=2.0)
        # the job's source: enough records for about flink_s seconds at the direct rate
        count = max(len(records), round(before.throughput_rps * flink_s))
        source = write_records(folder / "source.jsonl", records, count)
        job = through_flink(python, port, source, load, folder, bound_s=flink_s * 4 + 180)
        after = direct(port, once, load, duration_s, warmup_s=0.5)
    rows = [
        {"load": "direct (dagserve bench), before the job", **figures(before)},
        {"load": "direct (dagserve bench), after the job", **figures(after)},
    ]
    direct_rps = (before.throughput_rps + after.throughput_rps) / 2
    flink_rps = job["window rec/s"]
    result = {
        "records": job["read"],
        "answered": job["answered"],
        "dead letters": job["dead_letters"],
        "job wall s": job["wall_s"],
        "first answer s": job.get("first_row_s") or float("nan"),
        "Flink rec/s (10-90%)": flink_rps,
        "first-last": job.get("warm_records_per_s") or float("nan"),
        "start incl.": job["read"] / job["wall_s"],
        "direct rec/s": direct_rps,
        "Flink / direct": ratio(flink_rps, direct_rps),
    }
    result["met?"] = "yes" if result["Flink / direct"] >= TARGET else "no"
    return rows, result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (a smoke run)")
    parser.add_argument("--parallelism", type=int, default=PARALLELISM, help="job subtasks")
    parser.add_argument("--capacity", type=int, default=CAPACITY, help="in flight a subtask")
    args = parser.parse_args(argv)
    load = Load(args.parallelism, args.capacity)
    duration_s, flink_s = (4.0, 8.0) if args.quick else (10.0, 25.0)
    rows, result = run_scenario(load, duration_s, flink_s)
    print(
        f"### Flink against the direct load: the example's stream of posts, {load.concurrency} "
        f"in flight both ways (Flink: --parallelism {load.parallelism} --capacity "
        f"{load.capacity}; direct: closed loop x{load.concurrency}), {duration_s:g} s direct "
        f"windows before and after the job\n"
    )
    print(render_table(rows))
    print()
    print(render_table([result]))
    low, high = (f"{share:.0%}" for share in WINDOW)
    print(
        f"\n(Flink rec/s: answers per second while the sink went from {low} to {high} of the "
        "records; first-last: the job's own figure, from its first answer to its last; start "
        "incl.: every record over the job's wall time, the JVM's and workers' start included; "
        "direct rec/s: the mean of the two direct windows)"
    )
    lost = result["records"] - result["answered"]
    print(
        f"\nReading: through Flink {result['Flink rec/s (10-90%)']:.1f} records/s once the job "
        f"is warm, direct {result['direct rec/s']:.1f}: {result['Flink / direct']:.2f} of the "
        f"direct figure (target >= {TARGET}, met? {result['met?']}); {result['answered']} of "
        f"{result['records']} records answered, {result['dead letters']} dead letters"
    )
    return 0 if lost == 0 and result["dead letters"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
