"""A server's front processes after the first send their models' items to the first.

With ``front_processes: N`` a server runs N front processes on one port (``engine.fronts``):
each accepts its share of the connections, decodes, checks and runs the DAG of its requests,
with the nodes that run in the front process run there.  A model's batcher, though, must see
the items of every front, or N fronts would cut its batches N ways (and its ``max_queue``,
learned batch size and deadlines would each see a part of the load).  So the first front, the
*primary*, keeps what a one-front server has: every model's batcher, the worker pool and its
supervision, quarantine and crash retries.  The other fronts, *secondaries*, hold a
:class:`RelayedModel` per model, which sends each request's items to the primary over a Unix
socket and awaits their rows: one hop, no second batcher, every behaviour of a model unchanged.

The protocol is the workers' framing (``model_plugins._host.wire``: pickle 5, tensors out of
band), as ``(call id, message)`` envelopes answered by a :class:`Reply` of the same id; id 0 is
a message that wants no answer.  A secondary sends :class:`Hello` once (the answer is the
:class:`Plan`: placement, model ids, model outputs), :class:`Submit` per model call,
:class:`Cancel` when the request behind a submit was given up, :class:`Health` for the health
call (one report for the whole server), and a :class:`Report` every second (its metrics,
connections and readiness), which the primary adds into its own ``/metrics``.

What it costs the primary per relayed item: one frame in, a task, the batcher's work, one frame
out; ``benchmarks/fronts.py`` measures what N fronts give.  Past a few fronts a model's items
all go through one process: see the README ("Front processes") on what scales and what
does not.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dag.pipeline import Pipeline
from dag.schema import NodeSpec
from engine.runtime.batcher import BatcherStatistics
from engine.runtime.local import NodeBinding
from engine.runtime.model import ModelRunner
from engine.runtime.placement import Placement
from engine.runtime.types import HealthReport
from engine.runtime.workers.pool import WorkerKey
from model_plugins._host import wire
from model_plugins._host.messages import Reply
from model_plugins.errors import DagserveError, DeadlineExceeded, InferenceError
from model_plugins.plugin import Batch
from model_plugins.specs import TensorSpec

if TYPE_CHECKING:
    from engine.runtime.engine import Engine
    from engine.runtime.lifecycle import PeerState

logger = logging.getLogger(__name__)

#: how often a secondary reports its metrics, connections and readiness
REPORT_INTERVAL_S = 1.0


# --- messages (secondary -> primary) ------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    """The first message of a secondary front; answered with the :class:`Plan`."""

    front: int
    pid: int


@dataclass(frozen=True)
class Plan:
    """What a secondary takes from the primary instead of placing and loading models."""

    placement: Placement
    model_ids: dict[tuple[Any, ...], str]
    """Model identity (``assembly.model_identity``) -> model id, as the primary planned them."""
    outputs: dict[str, dict[str, TensorSpec]]
    """Model id -> its outputs, completed at load by what the model reported."""
    state: PeerState | None = None
    """The versions and routes to serve (``Lifecycle.follow``)."""


@dataclass(frozen=True)
class Sync:
    """The primary's versions or routes changed (an admin call): serve them as it does; the
    reply comes once this front has (an unload has drained here)."""

    plan: Plan


@dataclass(frozen=True)
class Submit:
    """One request's items for ``model_id``; answered with their rows (or the error)."""

    model_id: str
    inputs: Batch
    timeout_s: float | None
    """What is left of the request's deadline when the item was sent; None: no deadline."""


@dataclass(frozen=True)
class Cancel:
    """The request behind submit ``call`` was given up (its client went away)."""

    call: int


@dataclass(frozen=True)
class Health:
    """Asks for the health report of the whole server."""


@dataclass(frozen=True)
class Report:
    """A secondary's state, sent every :data:`REPORT_INTERVAL_S` and when it stops."""

    front: int
    pid: int
    ready: bool
    connections: int
    metrics: dict[str, Any] = field(default_factory=dict)


# --- framing --------------------------------------------------------------------------------


class FrameWriter:
    """Writes whole frames, in order, on a non-blocking socket.

    ``write`` does not await: it hands the kernel what it takes at once and queues the rest
    for a flushing task, so two frames never interleave and a caller cancelled right after
    ``write`` cannot cut its frame in half.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self._pending: collections.deque[memoryview] = collections.deque()
        self._flushing: asyncio.Task[None] | None = None
        #: set when the socket failed: later writes are dropped (the reader sees it close)
        self.failed = False

    def write(self, message: Any) -> None:
        if self.failed:
            return
        pieces = wire.encode(message)
        if sum(memoryview(p).nbytes for p in pieces) < wire.JOIN_BELOW:
            pieces = [b"".join(pieces)]
        views = [memoryview(p).cast("B") for p in pieces]
        if self._pending:
            self._pending.extend(views)
            return
        while views:
            try:
                sent = self.sock.sendmsg(views)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.failed = True
                return
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]
        if views:
            self._pending.extend(views)
            self._flushing = self.loop.create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._pending:
                await self.loop.sock_sendall(self.sock, self._pending[0])
                self._pending.popleft()
        except OSError:
            self.failed = True
            self._pending.clear()


# --- the primary's side ---------------------------------------------------------------------


@dataclass
class FrontState:
    """What the primary knows of one secondary front, from its last :class:`Report`."""

    pid: int
    ready: bool = False
    connections: int = 0
    connected: bool = True
    writer: FrameWriter | None = None
    #: the primary's own calls to it (:class:`Sync`), by call id
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)


class RelayServer:
    """Serves the secondaries of ``engine``'s server on a Unix socket at ``path``.

    ``health`` gives the report of the whole server (the engine's and each front's), for the
    primary's own health call as for a secondary's.
    """

    def __init__(self, engine: Engine, path: str) -> None:
        self.engine = engine
        self.path = path
        #: front index -> its state
        self.fronts: dict[int, FrontState] = {}
        self._models: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: asyncio.Task[None] | None = None
        #: set whenever a front reports: ``wait_ready`` waits on it
        self._changed = asyncio.Event()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self.path)
        os.chmod(self.path, 0o600)  # this user's fronts only
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept(), name="relay-accept")

    async def aclose(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    def connections(self) -> int:
        """Client connections open on the secondaries, as they last reported."""
        return sum(f.connections for f in self.fronts.values() if f.connected)

    def all_ready(self, count: int) -> bool:
        """Whether fronts 1 .. ``count`` - 1 are connected and said they are ready."""
        return all(
            (f := self.fronts.get(i)) is not None and f.connected and f.ready
            for i in range(1, count)
        )

    async def wait_changed(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def health(self) -> HealthReport:
        report = self.engine.health()
        details = dict(report.details)
        details["front.0"] = f"pid={os.getpid()} ready={self.engine.ready}"
        for index, front in sorted(self.fronts.items()):
            details[f"front.{index}"] = (
                f"pid={front.pid} ready={front.ready and front.connected} "
                f"connections={front.connections}"
            )
        details["fronts"] = str(1 + len(self.fronts))
        return HealthReport(live=report.live, ready=report.ready, details=details)

    def plan(self) -> Plan:
        engine = self.engine
        assert engine.placement is not None, "the engine has not started"
        ids = {identity: model.model_id for identity, model in engine.models.items()}
        outputs = {model.model_id: dict(model.outputs) for model in engine.models.values()}
        return Plan(engine.placement, ids, outputs, engine.lifecycle.peer_state())

    async def sync(self, timeout_s: float = 300.0) -> None:
        """Bring every connected secondary to the primary's versions and routes, and wait
        until each has (``Lifecycle.on_change``).

        Raises:
            InferenceError: a front refused or did not answer in ``timeout_s`` (the others
                went on; the message names each one and why).
        """
        loop = asyncio.get_running_loop()
        message = Sync(self.plan())
        calls = {}
        for index, front in self.fronts.items():
            if front.connected and front.writer is not None:
                call_id = next(self._ids)
                future = front.pending[call_id] = loop.create_future()
                front.writer.write((call_id, message))
                calls[index] = future
        if not calls:
            return
        done = await asyncio.gather(
            *(asyncio.wait_for(f, timeout_s) for f in calls.values()), return_exceptions=True
        )
        failed = {i: r for i, r in zip(calls, done, strict=True) if isinstance(r, BaseException)}
        if failed:
            why = "; ".join(f"front {i}: {type(r).__name__}: {r}" for i, r in failed.items())
            msg = f"fronts did not follow the change: {why}"
            raise InferenceError(msg)

    async def _accept(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            conn.setblocking(False)
            self._spawn(self._serve(conn))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _model(self, model_id: str) -> Any:
        model = self._models.get(model_id)
        if model is None:  # models may come and go (lifecycle): look again
            self._models = {m.model_id: m for m in self.engine.models.values()}
            model = self._models.get(model_id)
        return model

    async def _serve(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = wire.FrameReader(loop, conn)
        writer = FrameWriter(loop, conn)
        calls: dict[int, asyncio.Task[None]] = {}
        front: int | None = None
        try:
            while True:
                call_id, message = await reader.read()
                if isinstance(message, Submit):
                    calls[call_id] = self._spawn(self._submit(writer, call_id, message, calls))
                elif isinstance(message, Cancel):
                    task = calls.pop(message.call, None)
                    if task is not None:
                        task.cancel()
                elif isinstance(message, Report):
                    front = message.front
                    self._absorb(message)
                elif isinstance(message, Reply):  # to a Sync of ours
                    pending = self.fronts[front].pending if front is not None else {}
                    future = pending.pop(message.id, None)
                    if future is not None and not future.done():
                        if message.error is None:
                            future.set_result(message.value)
                        else:
                            future.set_exception(message.error)  # type: ignore[arg-type]
                elif isinstance(message, Hello):
                    front = message.front
                    self.fronts[front] = FrontState(message.pid, writer=writer)
                    writer.write(Reply(call_id, value=self.plan()))
                elif isinstance(message, Health):
                    writer.write(Reply(call_id, value=self.health()))
                else:
                    error = InferenceError(f"the relay has no message {type(message).__name__}")
                    writer.write(Reply(call_id, error=error))
        except (EOFError, ConnectionError, OSError):
            pass  # the front went away
        except Exception:
            logger.exception("front %s: unreadable relay message; closing its relay", front)
        finally:
            for task in calls.values():
                task.cancel()
            conn.close()
            if front is not None:
                self._gone(front)

    async def _submit(
        self, writer: FrameWriter, call_id: int, message: Submit, calls: dict[int, Any]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            model = self._model(message.model_id)
            if model is None:
                msg = f"model {message.model_id!r} is not served (any more)"
                raise InferenceError(msg)
            deadline = None if message.timeout_s is None else loop.time() + message.timeout_s
            reply = Reply(call_id, value=await model.submit(message.inputs, deadline=deadline))
        except asyncio.CancelledError:
            return  # the request was given up: nobody reads an answer
        except DagserveError as exc:
            reply = Reply(call_id, error=exc)
        except Exception as exc:
            logger.exception("model %s: relayed call failed", message.model_id)
            reply = Reply(call_id, error=InferenceError(f"{type(exc).__name__}: {exc}"))
        finally:
            calls.pop(call_id, None)
        writer.write(reply)

    def _absorb(self, report: Report) -> None:
        state = self.fronts[report.front]
        if state.pid != report.pid:  # a restarted front starts its counts again
            self.engine.metrics.retire(report.front)
            state.pid = report.pid
        state.ready, state.connections, state.connected = report.ready, report.connections, True
        self.engine.metrics.absorb(report.front, report.metrics)
        self._changed.set()

    def _gone(self, front: int) -> None:
        state = self.fronts.get(front)
        if state is not None:
            state.connected = False
            state.ready = False
            for future in state.pending.values():
                if not future.done():
                    future.set_exception(InferenceError(f"front {front} went away"))
            state.pending.clear()
        # Its counts stay in the totals (counters never go back); its gauges drop out.
        self.engine.metrics.retire(front)
        self._changed.set()


# --- a secondary's side ---------------------------------------------------------------------


class RelayClient:
    """A secondary front's connection to the primary."""

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._writer: FrameWriter | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._reading: asyncio.Task[None] | None = None
        #: set when the primary went away: the secondary stops
        self.closed = asyncio.Event()
        #: answers the primary's own calls (a :class:`Sync`): message -> value
        self.on_request: Callable[[Any], Awaitable[Any]] | None = None
        self._requests: set[asyncio.Task[None]] = set()

    async def connect(self, path: str) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, path)
        self._sock = sock
        self._writer = FrameWriter(loop, sock)
        self._reading = asyncio.create_task(self._read(), name="relay-rx")

    async def aclose(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._reading is not None:
            await asyncio.gather(self._reading, return_exceptions=True)

    async def call(self, message: Any) -> Any:
        """Send ``message`` and return the value of the primary's reply."""
        if self.closed.is_set() or self._writer is None:
            msg = "this front lost its connection to the first front process"
            raise InferenceError(msg)
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            self._writer.write((call_id, message))
            return await future
        except asyncio.CancelledError:
            if isinstance(message, Submit) and not future.done():
                self.tell(Cancel(call_id))
            raise
        finally:
            self._calls.pop(call_id, None)

    def tell(self, message: Any) -> None:
        """Send ``message``; no answer comes."""
        if self._writer is not None and not self.closed.is_set():
            self._writer.write((0, message))

    async def _answer(self, call_id: int, message: Any) -> None:
        try:
            if self.on_request is None:
                msg = f"this front answers no {type(message).__name__}"
                raise InferenceError(msg)
            reply = Reply(call_id, value=await self.on_request(message))
        except DagserveError as exc:
            reply = Reply(call_id, error=exc)
        except Exception as exc:
            logger.exception("answering the first front's %s failed", type(message).__name__)
            reply = Reply(call_id, error=InferenceError(f"{type(exc).__name__}: {exc}"))
        self.tell(reply)

    async def submit(self, model_id: str, inputs: Batch, *, deadline: float | None) -> Batch:
        timeout_s = None
        if deadline is not None:
            timeout_s = deadline - asyncio.get_running_loop().time()
            if timeout_s <= 0:
                msg = f"deadline exceeded before model {model_id} was called"
                raise DeadlineExceeded(msg)
        rows: Batch = await self.call(Submit(model_id, inputs, timeout_s))
        return rows

    async def _read(self) -> None:
        assert self._sock is not None
        reader = wire.FrameReader(asyncio.get_running_loop(), self._sock)
        try:
            while True:
                reply = await reader.read()
                if isinstance(reply, tuple):  # a call of the primary's
                    task = asyncio.create_task(self._answer(*reply))
                    self._requests.add(task)
                    task.add_done_callback(self._requests.discard)
                    continue
                future = self._calls.pop(reply.id, None)
                if future is None or future.done():
                    continue
                if reply.error is None:
                    future.set_result(reply.value)
                else:
                    future.set_exception(reply.error)
        except (EOFError, ConnectionError, OSError):
            pass
        except Exception:
            logger.exception("unreadable reply from the first front; stopping")
        finally:
            self.closed.set()
            for future in self._calls.values():
                if not future.done():
                    msg = "the first front process went away while this call was in flight"
                    future.set_exception(InferenceError(msg))
            self._calls.clear()
            if self._sock is not None:
                self._sock.close()


class RelayedModel:
    """A model of the primary front, as a secondary's nodes see it: its items go there.

    It stands where a :class:`~engine.runtime.model.Model` stands in a one-front server (the
    engine's ``models``, a :class:`ModelRunner` per node), without a batcher of its own.
    """

    def __init__(
        self,
        model_id: str,
        binding: NodeBinding,
        key: WorkerKey,
        relay: RelayClient,
        outputs: dict[str, TensorSpec] | None,
    ) -> None:
        self.model_id = model_id
        self.key = key
        self.binding = binding
        self.nodes: list[str] = []
        self.outputs = dict(outputs) if outputs is not None else dict(binding.outputs)
        self._relay = relay

    @property
    def plugin(self) -> str:
        return self.binding.plugin

    def runner(self, pipeline: str, node: str) -> ModelRunner:
        self.nodes.append(f"{pipeline}/{node}")
        return ModelRunner(self, pipeline, node)  # type: ignore[arg-type]

    async def start(self) -> None:
        """Nothing to load: the primary loaded it."""

    async def aclose(self) -> None:
        """Nothing to unload: the primary owns it."""

    async def submit(self, inputs: Batch, *, deadline: float | None) -> Batch:
        return await self._relay.submit(self.model_id, inputs, deadline=deadline)

    def statistics(self) -> BatcherStatistics:
        """Empty: the batcher is the primary's, which reports it."""
        return BatcherStatistics(
            queued_items=0, busy_instances=0, batches=0, items=0, batch_sizes={},
            queue_wait_s_total=0.0, queue_wait_s_max=0.0, deadline_dropped=0, rejected=0,
            failed_requests=0, best_batch_size=None, throughput={},
        )  # fmt: skip


class RelayedModels:
    """The :class:`~engine.runtime.assembly.ModelSource` of a secondary front.

    ``plan`` is the primary's latest: a :class:`Sync` replaces it before the secondary loads
    or reloads the versions it names.
    """

    def __init__(self, relay: RelayClient, plan: Plan) -> None:
        self.relay = relay
        self._plan = plan

    def update(self, plan: Plan) -> None:
        self._plan = plan

    def plan(self, pipelines: Iterable[Pipeline]) -> tuple[Placement, dict[tuple[Any, ...], str]]:
        return self._plan.placement, dict(self._plan.model_ids)

    def new_model(self, model_id: str, binding: NodeBinding, node: NodeSpec, key: WorkerKey) -> Any:
        return RelayedModel(model_id, binding, key, self.relay, self._plan.outputs.get(model_id))


def health_from(relay: RelayClient) -> Callable[[], Any]:
    """The health call of a secondary: the primary's report of the whole server."""

    async def health() -> HealthReport:
        report: HealthReport = await relay.call(Health())
        return report

    return health


__all__ = [
    "REPORT_INTERVAL_S",
    "Cancel",
    "FrameWriter",
    "FrontState",
    "Health",
    "Hello",
    "Plan",
    "RelayClient",
    "RelayServer",
    "RelayedModel",
    "RelayedModels",
    "Report",
    "Submit",
    "Sync",
]
