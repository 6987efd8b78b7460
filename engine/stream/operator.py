"""The PyFlink operator: an ``AsyncFunction`` that runs each record through a dagserve pipeline.

Use it with Flink's own async I/O::

    from pyflink.common import Time
    from pyflink.datastream import AsyncDataStream

    answers = AsyncDataStream.unordered_wait(
        lines, PipelineFunction(["127.0.0.1:9090"], "calc", inputs), Time.seconds(35),
        capacity=100, output_type=OUTPUT_TYPE,
    )

Each output row is one string, ``kind TAB error_type TAB retries TAB json_line``
(:meth:`~engine.stream.caller.Outcome.to_row`; ``Outcome.from_row`` reads it back): ``kind``
is ``answer`` (to the sink), ``dead`` (a dead letter) or ``blank``; a record's failure never
fails the job, a bug in this code does.

How PyFlink 2.3 runs it (``pyflink/fn_execution/datastream/process/async_function/
operation.py``): ``open`` is called before the operator starts its event loop thread, and
``close`` after that loop has stopped, so neither can await on it.  The function therefore
runs its client on an event loop of its own, on a thread started in ``open`` and stopped in
``close`` (after the pool's connections are closed on it); ``async_invoke``, on Flink's loop,
awaits the call made there.  Each call ends by the record's deadline (``timeout_ms``), so
Flink's own timeout is not needed (``dagserve stream`` sets none: PyFlink starts a thread per
record for it); where one is set, :meth:`PipelineFunction.timeout` answers a dead letter rather
than failing the job: set it above ``timeout_ms``, so that the record's own deadline fires
first and says what it waited for.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import uvloop
from pyflink.common import Types
from pyflink.datastream import AsyncFunction, RuntimeContext

from engine.stream.caller import Outcome, RecordCaller
from engine.stream.records import RecordMapping, dead_letter
from engine.transport.client import AsyncClient
from model_plugins.errors import DeadlineExceeded
from model_plugins.specs import TensorSpec

#: the type of the operator's output rows (``Outcome.to_row``: one string a record)
OUTPUT_TYPE = Types.STRING()


class PipelineFunction(AsyncFunction):  # type: ignore[misc]
    """Calls ``pipeline`` on the servers at ``targets`` for each source line.

    Args:
        targets: ``"host:port"`` of the server, or of each replica (a balancing client).
        pipeline: the pipeline's name.
        inputs: the pipeline's input specs (``describe``), to check records before sending.
        input_map: record field -> pipeline input (identity for fields not named).
        output_map: pipeline output -> record field (identity for outputs not named).
        timeout_ms: each record's deadline, retries included.
        pool_size: idle connections kept per server and task (up to ``capacity`` are open
            while that many records are in flight).
    """

    def __init__(
        self,
        targets: Sequence[str],
        pipeline: str,
        inputs: Mapping[str, TensorSpec],
        *,
        input_map: Mapping[str, str] | None = None,
        output_map: Mapping[str, str] | None = None,
        timeout_ms: int = 30_000,
        pool_size: int = 64,
    ) -> None:
        if not targets:
            msg = "PipelineFunction needs at least one target host:port"
            raise ValueError(msg)
        if timeout_ms <= 0:
            msg = f"timeout_ms must be > 0 (got {timeout_ms})"
            raise ValueError(msg)
        self.targets = list(targets)
        self.pipeline = pipeline
        self.mapping = RecordMapping(dict(inputs), dict(input_map or {}), dict(output_map or {}))
        self.timeout_ms = timeout_ms
        self.pool_size = pool_size
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._caller: RecordCaller | None = None

    def open(self, runtime_context: RuntimeContext) -> None:
        loop = uvloop.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name=f"dagserve-{self.pipeline}", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        # the client only holds settings until its first call opens connections on this loop
        self._caller = RecordCaller(self._client(), self.pipeline, self.mapping, self.timeout_ms)

    def _client(self) -> AsyncClient:
        # the record's deadline bounds each call; the client's own timeout only backs it up
        timeout_s = self.timeout_ms / 1000 + 5
        if len(self.targets) == 1:
            host, _, port = self.targets[0].rpartition(":")
            return AsyncClient(host, int(port), timeout_s=timeout_s, pool_size=self.pool_size)
        return AsyncClient(targets=self.targets, timeout_s=timeout_s, pool_size=self.pool_size)

    async def async_invoke(self, value: str) -> list[str]:
        if self._loop is None or self._caller is None:
            msg = "PipelineFunction.async_invoke before open()"
            raise RuntimeError(msg)
        done: Future[Outcome] = asyncio.run_coroutine_threadsafe(
            self._caller.call(value), self._loop
        )
        outcome = await asyncio.wrap_future(done)
        return [outcome.to_row()]

    def timeout(self, value: str) -> list[str]:
        # Flink's timer passed before the record's own deadline: the operator's timeout is
        # shorter than timeout_ms, or the loop is starved; a dead letter, not a failed job
        why = (
            f"Flink's async timeout passed before an answer (record deadline {self.timeout_ms} ms)"
        )
        try:
            record: Any = json.loads(value)
        except json.JSONDecodeError:
            record = None
        letter = dead_letter(DeadlineExceeded.__name__, why, record=record, line=value)
        return [Outcome("dead", json.dumps(letter), 0, DeadlineExceeded.__name__).to_row()]

    def close(self) -> None:
        loop, thread, caller = self._loop, self._thread, self._caller
        self._loop = self._thread = self._caller = None
        if loop is None or thread is None:
            return
        try:
            if caller is not None:
                asyncio.run_coroutine_threadsafe(caller.client.aclose(), loop).result(10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


__all__ = ["OUTPUT_TYPE", "PipelineFunction"]
