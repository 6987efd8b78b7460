"""The Flink job of ``dagserve stream``: JSONL lines -> a dagserve pipeline -> JSONL answers.

The job runs on a local Flink mini-cluster (PyFlink starts it in a JVM of its own, a child
of this process): a ``FileSource`` reads the source file line by line, the async operator
(:class:`~engine.stream.operator.PipelineFunction`) calls the pipeline, and one Python task
(:class:`~engine.stream.sink.JsonlWriter`) writes its rows to ONE sink file and ONE
dead-letter file as they come, and their counts to a summary file that this process reads
when the job has ended.

Both Python sides, this client and the UDF workers, run ``sys.executable``: PyFlink would
otherwise start the ``python`` found on PATH, which need not have dagserve or PyFlink.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from engine.transport.client import Client
from model_plugins.errors import DagserveError

#: Flink's own async timeout: none.  PyFlink 2.3 starts a ``threading.Timer`` (a thread) per
#: record for it, which halved a local job's rate; the operator's calls end by each record's
#: deadline themselves (``RecordCaller``), so every record completes without it.
FLINK_TIMEOUT_MS = 0


class StreamJobError(DagserveError):
    """The Flink job failed, or could not be built (the message says which and why)."""


def jsonl_path(location: str, what: str) -> Path:
    """The path of a ``jsonl:PATH`` location; raises ``ValueError`` for any other scheme."""
    scheme, sep, path = location.partition(":")
    if not sep or scheme != "jsonl" or not path:
        msg = f"{what} {location!r}: expected jsonl:PATH (the only {what} this command runs)"
        raise ValueError(msg)
    return Path(path)


def default_dead_letters(sink: Path) -> Path:
    """Where dead letters go without ``--dead-letter``: ``out.jsonl`` -> ``out.dead.jsonl``."""
    stem = sink.name[: -len(".jsonl")] if sink.name.endswith(".jsonl") else sink.name
    return sink.with_name(f"{stem}.dead.jsonl")


@dataclass(frozen=True)
class StreamSpec:
    """What to run; see ``dagserve stream --help`` for each field."""

    targets: Sequence[str]
    pipeline: str
    source: Path
    sink: Path
    dead_letters: Path
    parallelism: int = 1
    capacity: int = 100
    ordered: bool = False
    timeout_ms: int = 30_000
    input_map: Mapping[str, str] = field(default_factory=dict)
    output_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.targets:
            msg = "at least one target host:port"
            raise ValueError(msg)
        for target in self.targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                msg = f"target {target!r}: expected HOST:PORT"
                raise ValueError(msg)
        if self.parallelism < 1 or self.capacity < 1 or self.timeout_ms < 1:
            msg = "parallelism, capacity and timeout_ms must be >= 1"
            raise ValueError(msg)
        files = [self.source.resolve(), self.sink.resolve(), self.dead_letters.resolve()]
        if len(set(files)) < len(files):
            # the sink and dead letters are written from the start: the source would be lost
            msg = "the source, the sink and the dead letters must be three different files"
            raise ValueError(msg)
        if self.ordered and self.parallelism != 1:
            # rows of several subtasks interleave at the one writer, whatever each keeps
            msg = (
                "--ordered keeps the source order with --parallelism 1 only "
                "(--capacity sets the concurrency)"
            )
            raise ValueError(msg)


@dataclass
class StreamSummary:
    """What the job did with every line read."""

    sink: Path
    dead_letters: Path
    answered: int = 0
    blank: int = 0
    dead: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    #: from the job's submission to its end, and to the first and last row written
    elapsed_s: float = 0.0
    first_row_s: float | None = None
    last_row_s: float | None = None

    @property
    def read(self) -> int:
        return self.answered + self.blank + sum(self.dead.values())

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, Any], sink: Path, dead_letters: Path, started_at: float
    ) -> StreamSummary:
        """The summary of a :class:`~engine.stream.sink.JsonlWriter`'s counts; ``started_at``
        is the wall-clock time the job was submitted."""

        def since(at: float | None) -> float | None:
            return None if at is None else round(at - started_at, 3)

        return cls(
            sink,
            dead_letters,
            answered=int(counts["answered"]),
            blank=int(counts["blank"]),
            dead=Counter({str(k): int(v) for k, v in counts["dead"].items()}),
            retries=int(counts["retries"]),
            first_row_s=since(counts["first_row_at"]),
            last_row_s=since(counts["last_row_at"]),
        )

    @property
    def warm_records_per_s(self) -> float | None:
        """Rows per second from the first row written to the last (the job's start-up,
        seconds of JVM and Python workers, left out)."""
        if self.first_row_s is None or self.last_row_s is None or self.read < 2:
            return None
        span = self.last_row_s - self.first_row_s
        return (self.read - 1) / span if span > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "read": self.read,
            "answered": self.answered,
            "dead_letters": sum(self.dead.values()),
            "dead_by_type": dict(sorted(self.dead.items())),
            "blank": self.blank,
            "retries": self.retries,
            "elapsed_s": round(self.elapsed_s, 3),
            "first_row_s": self.first_row_s,
            "last_row_s": self.last_row_s,
            "warm_records_per_s": self.warm_records_per_s,
            "sink": str(self.sink),
            "dead_letter_file": str(self.dead_letters),
        }

    def render(self) -> str:
        dead = sum(self.dead.values())
        by_type = ", ".join(f"{name} {count}" for name, count in sorted(self.dead.items()))
        lines = [
            f"read {self.read} records in {self.elapsed_s:.1f} s",
            f"  answered     {self.answered} -> {self.sink}",
            f"  dead letters {dead} -> {self.dead_letters}" + (f" ({by_type})" if by_type else ""),
            f"  retries      {self.retries}",
        ]
        if self.blank:
            lines.append(f"  blank lines  {self.blank} (skipped)")
        rate = self.warm_records_per_s
        if rate is not None:
            lines.append(f"  {rate:.1f} records/s from the first answer to the last")
        return "\n".join(lines)


def describe_inputs(targets: Sequence[str], pipeline: str) -> dict[str, Any]:
    """The pipeline's input specs, from the first target that answers ``describe``."""
    last: DagserveError | None = None
    for target in targets:
        host, _, port = target.rpartition(":")
        try:
            with Client(host, int(port), timeout_s=30) as client:
                return dict(client.describe(pipeline).inputs)
        except DagserveError as exc:
            last = exc
    assert last is not None
    raise last


def run_stream(
    spec: StreamSpec, progress: TextIO | None = None, every_s: float = 10.0
) -> StreamSummary:
    """Run the job to the end of the source; raises :class:`StreamJobError` if it fails.

    ``progress`` (stderr, say) gets the lines written so far every ``every_s`` seconds.
    """
    if not spec.source.is_file():
        msg = f"source {spec.source}: no such file"
        raise StreamJobError(msg)
    inputs = describe_inputs(spec.targets, spec.pipeline)

    from pyflink.common import Configuration, Time, WatermarkStrategy
    from pyflink.datastream import AsyncDataStream, StreamExecutionEnvironment
    from pyflink.datastream.connectors import Sink
    from pyflink.datastream.connectors.file_system import FileSource, StreamFormat

    from engine.stream.operator import OUTPUT_TYPE, PipelineFunction
    from engine.stream.sink import DISCARDING_SINK, JsonlWriter

    config = Configuration()
    config.set_string("python.executable", sys.executable)
    config.set_string("python.client.executable", sys.executable)
    env = StreamExecutionEnvironment.get_execution_environment(config)
    env.set_parallelism(spec.parallelism)
    source = FileSource.for_record_stream_format(
        StreamFormat.text_line_format(), str(spec.source.resolve())
    ).build()
    lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "jsonl source")
    if spec.parallelism > 1:
        # One file is one split, read by one source subtask; a forward edge would hand every
        # record to the operator subtask of the same index and leave the others idle.
        lines = lines.rebalance()
    function = PipelineFunction(
        spec.targets,
        spec.pipeline,
        inputs,
        input_map=spec.input_map,
        output_map=spec.output_map,
        timeout_ms=spec.timeout_ms,
    )
    wait = AsyncDataStream.ordered_wait if spec.ordered else AsyncDataStream.unordered_wait
    rows = wait(
        lines,
        function,
        Time.milliseconds(FLINK_TIMEOUT_MS),
        spec.capacity,
        OUTPUT_TYPE,
    )
    for path in (spec.sink, spec.dead_letters):
        # emptied now: a file that cannot be written fails here, and the progress never
        # counts the lines of a previous run before the writer opens it
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"")
        except OSError as exc:
            msg = f"cannot write {path}: {exc}"
            raise StreamJobError(msg) from exc
    with tempfile.TemporaryDirectory(prefix="dagserve-stream-") as scratch:
        counts_file = Path(scratch) / "counts.json"
        writer = JsonlWriter(spec.sink.resolve(), spec.dead_letters.resolve(), counts_file)
        # one writer: the files are written from the start by one task
        rows.flat_map(writer).set_parallelism(1).name("jsonl sink").sink_to(Sink(DISCARDING_SINK))
        started_at, started = time.time(), time.monotonic()
        watcher = _Progress(spec, progress, every_s) if progress is not None else None
        try:
            env.execute(f"dagserve stream {spec.pipeline}")
        except Exception as exc:  # Py4JJavaError and friends: the job failed in Flink
            msg = f"the Flink job failed: {_first_line(exc)}"
            raise StreamJobError(msg) from exc
        finally:
            if watcher is not None:
                watcher.stop()
        if not counts_file.exists():
            msg = "the Flink job ended without its sink's counts (the writer was not closed)"
            raise StreamJobError(msg)
        counts = json.loads(counts_file.read_text(encoding="utf-8"))
    summary = StreamSummary.from_counts(counts, spec.sink, spec.dead_letters, started_at)
    summary.elapsed_s = time.monotonic() - started
    return summary


class _Progress:
    """Says how many lines the sink and dead-letter files have, every ``every_s`` seconds, on
    a thread of its own (the job's ``execute`` blocks); reads only what was added since."""

    def __init__(self, spec: StreamSpec, out: TextIO, every_s: float) -> None:
        self.files = (spec.sink, spec.dead_letters)
        self.offsets = [0, 0]
        self.lines = [0, 0]
        self.out = out
        self.every_s = every_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dagserve-stream-progress")
        self.thread.daemon = True
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every_s):
            for index, path in enumerate(self.files):
                with contextlib.suppress(OSError), path.open("rb") as file:
                    file.seek(self.offsets[index])
                    added = file.read()
                    self.offsets[index] += len(added)
                    self.lines[index] += added.count(b"\n")
            answered, dead = self.lines
            self.out.write(f"dagserve stream: {answered} answered, {dead} dead letters so far\n")
            self.out.flush()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def _first_line(exc: BaseException) -> str:
    # a Py4JJavaError's text is the Java stack: its deepest "Caused by:" says what failed
    lines = [line.strip() for line in str(exc).strip().splitlines()]
    causes = [line for line in lines if line.startswith("Caused by:")]
    if causes:
        return causes[-1]
    return lines[0] if lines and lines[0] else type(exc).__name__


__all__ = [
    "FLINK_TIMEOUT_MS",
    "StreamJobError",
    "StreamSpec",
    "StreamSummary",
    "default_dead_letters",
    "describe_inputs",
    "jsonl_path",
    "run_stream",
]
