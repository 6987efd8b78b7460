"""The parent's handle on one worker process: spawn it, call it, notice when it dies.

When a worker dies, the calls in flight on it are judged from what it left behind
(``model_plugins._host.postmortem``): the call that crashed it fails; the others fail with a
*retryable* :class:`WorkerDied`, which the pool sends again to the replacement worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import signal
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from model_plugins._host import wire
from model_plugins._host.main import worker_entry
from model_plugins._host.messages import Reply, Shutdown
from model_plugins._host.postmortem import FlightRecord, Postmortem
from model_plugins.errors import DagserveError, InferenceError

logger = logging.getLogger(__name__)

# Workers start with spawn: fork after a framework (or CUDA) is initialised is unsafe, and
# a fresh interpreter imports only what the worker needs.
_SPAWN = multiprocessing.get_context("spawn")
# The child copies os.environ when it starts: hold this while swapping variables in and out.
_ENVIRON_LOCK = threading.Lock()


@dataclass
class _Call:
    future: asyncio.Future[Any]
    node: str | None
    plugin: str | None
    model: str | None  # the model a Predict or LoadModel is for


class WorkerDied(InferenceError):
    """The worker process ended while requests were in flight on it.

    ``retryable`` is true for a call that cannot have caused the death: it had not started,
    or it ran on another thread than the one that crashed, or the worker was killed for
    another call's timeout.  Inference is side-effect free, so such a call may be sent again.
    ``blamed_elsewhere`` is true when, besides, the death was laid at another call's door (a
    crash dump named its thread, or it ran past its timeout): that call's model is counted
    towards its quarantine.
    """

    def __init__(
        self,
        message: str,
        node: str | None = None,
        plugin: str | None = None,
        *,
        retryable: bool = False,
        blamed_elsewhere: bool = False,
    ) -> None:
        super().__init__(message, node=node, plugin=plugin)
        self.retryable = retryable
        self.blamed_elsewhere = blamed_elsewhere


@dataclass(frozen=True)
class Death:
    """How a worker ended, for its pool (``WorkerProcess.on_exit``)."""

    how: str
    """"exit code 1", "killed by signal 6 (SIGABRT)", ..."""
    culprits: frozenset[str]
    """The model whose call crashed it, as the crash dump names it; empty when unknown."""
    stopped: bool
    """Stopped on purpose (shutdown): nothing crashed."""
    spared: bool
    """Killed after a call ran past its timeout (``kill(spare_in_flight=True)``)."""


class WorkerProcess:
    """One spawned worker and the socket to it.

    ``call`` sends a message and awaits the reply of the same correlation id.  When the
    process dies, every call in flight fails at once with :class:`WorkerDied` naming its
    node, retryable unless the call may have caused the death; then ``exited`` is set and
    ``on_exit`` is called with the :class:`Death`.
    """

    def __init__(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        log_level: int = 20,
        on_exit: Callable[[Death], None] | None = None,
    ) -> None:
        self.name = name
        self.on_exit = on_exit
        self.env = dict(env or {})
        self.log_level = log_level
        self.process: multiprocessing.process.BaseProcess | None = None
        self.exited = asyncio.Event()
        self._ids = itertools.count(1)
        self._calls: dict[int, _Call] = {}
        self._sock: socket.socket | None = None
        self._send_lock = asyncio.Lock()
        self._reader_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._spare = False
        self._record: FlightRecord | None = None
        #: kill() was called: the process is dying or dead
        self.killed = False

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def location(self) -> dict[str, str]:
        """Nothing beyond this machine (a Ray actor names its node here)."""
        return {}

    async def start(self) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        record = self._record = FlightRecord(self.name)
        process = _SPAWN.Process(
            target=worker_entry,
            args=(child_sock, self.name, self.log_level, *record.paths()),
            name=f"dagserve-worker-{self.name}",
            daemon=True,
        )
        with _ENVIRON_LOCK:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                process.start()
            except BaseException:
                record.remove()
                raise
            finally:
                for key, value in saved.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
        child_sock.close()
        self.process = process
        parent_sock.setblocking(False)
        self._sock = parent_sock
        self._reader_task = asyncio.create_task(self._read_replies(), name=f"{self.name}-rx")
        logger.info("worker %s started (pid %s)", self.name, process.pid)

    async def call(
        self, message: Any, *, node: str | None = None, plugin: str | None = None
    ) -> Any:
        """Send ``message`` and return the value of the worker's reply to it."""
        # A call that never reached the worker cannot have harmed it: it may go again.
        if self.exited.is_set() or self._sock is None:
            msg = f"worker {self.name} is not running"
            raise WorkerDied(msg, node=node, plugin=plugin, retryable=True)
        message_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        model = getattr(message, "model_id", None)
        self._calls[message_id] = _Call(future, node, plugin, model)
        sent = False
        try:
            async with self._send_lock:  # frames must not interleave
                await wire.write(asyncio.get_running_loop(), self._sock, (message_id, message))
            sent = True
            return await future
        except (ConnectionError, RuntimeError) as exc:
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            msg = f"worker {self.name} cannot be reached: {exc}"
            raise WorkerDied(msg, node=node, plugin=plugin, retryable=not sent) from exc
        finally:
            # A call that was sent stays listed until its reply or the worker's death, even
            # when its caller gave up: if it crashes the worker, its model is to blame.
            if not sent:
                self._calls.pop(message_id, None)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to unload and exit; kill it if it does not within ``timeout_s``."""
        self._stopping = True
        if not self.exited.is_set():
            try:
                async with asyncio.timeout(timeout_s):
                    await self.call(Shutdown())
                    await self.exited.wait()
            except (TimeoutError, DagserveError):
                pass
        self.kill()
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)

    def kill(self, *, spare_in_flight: bool = False) -> None:
        """Kill the process (SIGKILL).

        Args:
            spare_in_flight: the call that made the worker useless has been answered already
                (it ran past its timeout): every call still in flight is innocent.
        """
        if self.process is not None and self.process.is_alive():
            self._spare = self._spare or spare_in_flight
            self.killed = True
            self.process.kill()

    async def _read_replies(self) -> None:
        assert self._sock is not None
        reader = wire.FrameReader(asyncio.get_running_loop(), self._sock)
        try:
            while True:
                reply: Reply = await reader.read()
                call = self._calls.pop(reply.id, None)
                if call is None or call.future.done():
                    continue  # the caller gave up (deadline): drop the late answer
                error = reply.exception(call.node, call.plugin)
                if error is None:
                    call.future.set_result(reply.value)
                else:
                    call.future.set_exception(error)
        except (EOFError, ConnectionError, OSError):
            pass
        except Exception:
            logger.exception("worker %s: unreadable reply; dropping the worker", self.name)
            self.kill()
        finally:
            await self._declare_dead()

    async def _declare_dead(self) -> None:
        code = await self._exit_code()
        how = f"exit code {code}" if code is not None else "still running, unreachable"
        if code is not None and code < 0:
            how = f"killed by signal {-code}{_signal_name(-code)}"
        if code is None:
            self.kill()  # unreachable: make it dead before reading what it left
        report = Postmortem()
        if self._record is not None:
            report = self._record.read()
            self._record.remove()
        blame = not (self._stopping or self._spare)
        guilty = {i for i in self._calls if blame and report.is_culprit(i)}
        # Only a dump that names the thread convicts a model; without one, running calls fail
        # as suspects, but nobody is blamed (an OOM kill may hit a bystander).
        convicted = report.faulting_thread is not None and bool(guilty)
        models = (self._calls[i].model for i in guilty) if convicted else ()
        culprits = frozenset(m for m in models if m is not None)
        for message_id, call in self._calls.items():
            if call.future.done():
                continue  # its caller gave up; it still counted for the blame
            if message_id in guilty or self._stopping:
                where = f" while running node {call.node!r}" if call.node else ""
                msg = f"worker {self.name} (pid {self.pid}) died{where}: {how}"
                error = WorkerDied(msg, node=call.node, plugin=call.plugin)
            else:
                where = f"node {call.node!r}" if call.node else "a call"
                msg = (
                    f"worker {self.name} (pid {self.pid}) died ({how}) while {where} was in "
                    "flight on it, though not what crashed it"
                )
                error = WorkerDied(
                    msg, node=call.node, plugin=call.plugin, retryable=True,
                    blamed_elsewhere=convicted or self._spare,
                )  # fmt: skip
            call.future.set_exception(error)
        self._calls.clear()
        if self._sock is not None:
            self._sock.close()
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit(Death(how, culprits, self._stopping, self._spare))
        level = logging.INFO if self._stopping else logging.WARNING
        logger.log(level, "worker %s (pid %s) ended: %s", self.name, self.pid, how)
        if report.dump:
            logger.warning("worker %s (pid %s) crash dump:\n%s", self.name, self.pid, report.head())

    async def _exit_code(self) -> int | None:
        # The socket closes a moment before the process is reaped: wait briefly for the code.
        for _ in range(50):
            if self.process is None or self.process.exitcode is not None:
                break
            await asyncio.sleep(0.01)
        return self.process.exitcode if self.process else None


def _signal_name(number: int) -> str:
    try:
        return f" ({signal.Signals(number).name})"
    except ValueError:
        return ""


__all__ = ["Death", "WorkerDied", "WorkerProcess"]
