"""One stream record through a pipeline: deadline, retries, and a dead letter when it fails.

:class:`RecordCaller` is what the Flink operator (:mod:`engine.stream.operator`) runs for
each line, kept free of PyFlink so that it runs, and is tested, on any event loop.

- Each record has a deadline, ``timeout_ms`` from its arrival; every attempt sends what is
  left of it as the request's ``timeout_ms``, so the server gives up when the caller does.
- ``Overloaded`` is retried after its ``retry_after_ms``; a connection refused or lost (a
  server restarting, a replica gone) after a backoff that doubles from 50 ms to 1 s.  Both
  stop at the deadline, which then fails the record as ``DeadlineExceeded`` naming the last
  error.  A call cut off mid-way may have run on the server: the pipeline runs again
  (at-least-once to the server), the record still reaches the sink once.
- Every other typed error (``InvalidRequest``, ``InferenceError``, ``PipelineNotFound``, ...)
  fails the record at once: a dead letter with the error's type, message and node.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass
from typing import Any, Literal

from engine.errors import ClientConnectionError
from engine.stream.records import INVALID_RECORD, RecordError, RecordMapping, dead_letter
from engine.transport.client import AsyncClient
from model_plugins.errors import DagserveError, DeadlineExceeded, InvalidRequest, Overloaded

#: first and largest backoff after a connection error
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0

Kind = Literal["answer", "dead", "blank"]


@dataclass(frozen=True)
class Outcome:
    """What became of one line: ``kind`` says where ``text`` (one JSON line) goes: the sink
    (``answer``), the dead letters (``dead``, ``error_type`` says why), or nowhere (``blank``,
    an empty line, counted); ``retries`` counts the attempts after the first."""

    kind: Kind
    text: str
    retries: int = 0
    error_type: str = ""

    def to_row(self) -> str:
        """The operator's output row: ``kind TAB error_type TAB retries TAB text``.

        One string, not a Flink tuple: a string crosses between Python and the JVM as one
        value (the collect sink fetched a tuple field by field, one py4j call each); ``text``
        is JSON (``json.dumps`` escapes tabs and newlines), so the first
        three tabs split the row.
        """
        return f"{self.kind}\t{self.error_type}\t{self.retries}\t{self.text}"

    @classmethod
    def from_row(cls, row: str) -> Outcome:
        kind, error_type, retries, text = row.split("\t", 3)
        if kind not in ("answer", "dead", "blank"):
            msg = f"not an operator row: {row[:80]!r}"
            raise ValueError(msg)
        return cls(kind=kind, text=text, retries=int(retries), error_type=error_type)  # type: ignore[arg-type]


def _dead(letter: dict[str, Any], retries: int = 0) -> Outcome:
    text = json.dumps(letter, ensure_ascii=False)
    return Outcome("dead", text, retries, letter["error"]["type"])


def _server_letter(exc: DagserveError, record: dict[str, Any]) -> dict[str, Any]:
    node = getattr(exc, "node", None)
    field = exc.field if isinstance(exc, InvalidRequest) else None  # "inputs.x"
    return dead_letter(type(exc).__name__, exc.message, node=node, field=field, record=record)


class RecordCaller:
    """Runs lines through ``pipeline`` with ``client``; never raises for a record's fault.

    Args:
        client: the pool of connections (one host, or balanced ``targets``).
        pipeline: the pipeline's name.
        mapping: the pipeline's signature and the field renames.
        timeout_ms: each record's deadline, from when the caller gets it.
    """

    def __init__(
        self, client: AsyncClient, pipeline: str, mapping: RecordMapping, timeout_ms: int
    ) -> None:
        if timeout_ms <= 0:
            msg = f"timeout_ms must be > 0 (got {timeout_ms})"
            raise ValueError(msg)
        self.client = client
        self.pipeline = pipeline
        self.mapping = mapping
        self.timeout_ms = timeout_ms

    async def call(self, line: str) -> Outcome:
        """The outcome of one source line."""
        if not line.strip():
            return Outcome("blank", "")
        try:
            record, inputs = self.mapping.parse(line)
        except RecordError as exc:
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict):
                return _dead(
                    dead_letter(INVALID_RECORD, exc.message, field=exc.field, record=parsed)
                )
            return _dead(dead_letter(INVALID_RECORD, exc.message, field=exc.field, line=line))
        return await self._infer(record, inputs)

    async def _infer(self, record: dict[str, Any], inputs: dict[str, Any]) -> Outcome:
        deadline = time.monotonic() + self.timeout_ms / 1000
        retries, backoff_s = 0, BACKOFF_FIRST_S
        last: DagserveError | None = None
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                why = f"no answer within {self.timeout_ms} ms"
                if last is not None:
                    why += f" ({retries} retries; last: {type(last).__name__}: {last})"
                return _dead(dead_letter(DeadlineExceeded.__name__, why, record=record), retries)
            try:
                async with asyncio.timeout(left_s):
                    result = await self.client.infer(
                        self.pipeline, inputs, timeout_ms=max(1, int(left_s * 1000))
                    )
            except Overloaded as exc:
                last, wait_s = exc, exc.retry_after_ms / 1000
            except ClientConnectionError as exc:  # ClientTimeout too: the server may be gone
                last, wait_s = exc, backoff_s * random.uniform(0.5, 1.0)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
            except DagserveError as exc:
                return _dead(_server_letter(exc, record), retries)
            except TimeoutError:
                continue  # asyncio.timeout: the deadline passed, the check above says so
            else:
                answer = self.mapping.answer(record, result.outputs)
                return Outcome("answer", json.dumps(answer, ensure_ascii=False), retries)
            retries += 1
            await asyncio.sleep(max(0.0, min(wait_s, deadline - time.monotonic())))


__all__ = ["BACKOFF_FIRST_S", "BACKOFF_MAX_S", "Outcome", "RecordCaller"]
