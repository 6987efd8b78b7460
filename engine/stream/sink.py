"""The JSONL sink of ``dagserve stream``: the operator's rows written by a Python task.

:class:`JsonlWriter` runs as ONE subtask after the operator, in a Python worker of the job:
it writes each answer to the sink file and each dead letter to the dead-letter file as they
come (line-buffered, so the files grow while the job runs), counts them, and writes those
counts to a summary file when Flink closes it at the end of the input.

Why not Flink's collect sink into the ``dagserve stream`` process: it fetches every row from
the JVM with py4j calls (``hasNext``, ``next``), about a millisecond a row, which capped a
local job near 700 rows/s whatever the pipeline; rows between Python tasks travel in batches.
Why not a ``FileSink``: it writes a folder of part files, committed at checkpoints.

The writer emits nothing; Flink runs only streams that end in a sink, so a discarding one
ends the job's graph.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from pyflink.datastream import FlatMapFunction, RuntimeContext

from engine.stream.caller import Outcome

#: the Java sink that ends the job's graph (it drops what it gets: nothing)
DISCARDING_SINK = "org.apache.flink.streaming.api.functions.sink.v2.DiscardingSink"


class JsonlWriter(FlatMapFunction):  # type: ignore[misc]
    """Writes operator rows (``Outcome.to_row``) to ``sink`` and ``dead_letters``, and the
    counts to ``summary`` (JSON) on close.  Run it with parallelism 1: it opens the files for
    writing, from the start."""

    def __init__(self, sink: Path, dead_letters: Path, summary: Path) -> None:
        self.paths = (str(sink), str(dead_letters), str(summary))
        self._files: tuple[TextIO, TextIO] | None = None
        self._closing = contextlib.ExitStack()
        self._counts: dict[str, Any] = {}

    def open(self, runtime_context: RuntimeContext) -> None:
        sink, dead, _ = self.paths
        # open from open() to close(): the stack closes what was opened if the second fails
        with contextlib.ExitStack() as stack:
            answers = stack.enter_context(Path(sink).open("w", encoding="utf-8", buffering=1))
            letters = stack.enter_context(Path(dead).open("w", encoding="utf-8", buffering=1))
            self._closing = stack.pop_all()
        self._files = (answers, letters)
        self._counts = {
            "answered": 0, "dead": Counter(), "blank": 0, "retries": 0,
            "first_row_at": None, "last_row_at": None,
        }  # fmt: skip

    def flat_map(self, value: str) -> Iterator[Any]:
        if self._files is None:
            msg = "JsonlWriter.flat_map before open()"
            raise RuntimeError(msg)
        outcome = Outcome.from_row(value)
        counts = self._counts
        if outcome.kind == "answer":
            self._files[0].write(outcome.text + "\n")
            counts["answered"] += 1
        elif outcome.kind == "dead":
            self._files[1].write(outcome.text + "\n")
            counts["dead"][outcome.error_type] += 1
        else:
            counts["blank"] += 1
        counts["retries"] += outcome.retries
        now = time.time()  # wall clock: the summary compares it with the job's submission
        if counts["first_row_at"] is None:
            counts["first_row_at"] = now
        counts["last_row_at"] = now
        return iter(())

    def close(self) -> None:
        files, self._files = self._files, None
        if files is None:
            return
        self._closing.close()
        summary = dict(self._counts, dead=dict(self._counts["dead"]))
        Path(self.paths[2]).write_text(json.dumps(summary), encoding="utf-8")


__all__ = ["DISCARDING_SINK", "JsonlWriter"]
