"""The parent's handle on one worker process: spawn it, call it, notice when it dies."""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from engine.workers import wire
from engine.workers.main import worker_entry
from engine.workers.messages import Ping, RemoteError, Reply, Shutdown
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


class WorkerDied(InferenceError):
    """The worker process ended while requests were in flight on it."""


class WorkerProcess:
    """One spawned worker and the socket to it.

    ``call`` sends a message and awaits the reply of the same correlation id.  When the
    process dies, every call in flight fails at once with :class:`WorkerDied` naming its
    node, and ``exited`` is set.
    """

    def __init__(
        self,
        name: str,
        *,
        env: Mapping[str, str] | None = None,
        log_level: int = 20,
        on_exit: Callable[[], None] | None = None,
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

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = _SPAWN.Process(
            target=worker_entry,
            args=(child_sock, self.name, self.log_level),
            name=f"dagserve-worker-{self.name}",
            daemon=True,
        )
        with _ENVIRON_LOCK:
            saved = {k: os.environ.get(k) for k in self.env}
            os.environ.update(self.env)
            try:
                process.start()
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
        if self.exited.is_set() or self._sock is None:
            msg = f"worker {self.name} is not running"
            raise WorkerDied(msg, node=node, plugin=plugin)
        message_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[message_id] = _Call(future, node, plugin)
        try:
            async with self._send_lock:  # frames must not interleave
                await wire.write(asyncio.get_running_loop(), self._sock, (message_id, message))
            return await future
        except (ConnectionError, RuntimeError) as exc:
            if future.done() and future.exception() is not None:
                raise future.exception() from None  # type: ignore[misc]
            msg = f"worker {self.name} cannot be reached: {exc}"
            raise WorkerDied(msg, node=node, plugin=plugin) from exc
        finally:
            self._calls.pop(message_id, None)

    async def ping(self, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await self.call(Ping())
        except (TimeoutError, DagserveError):
            return False
        return True

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

    def kill(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    async def _read_replies(self) -> None:
        assert self._sock is not None
        reader = wire.FrameReader(asyncio.get_running_loop(), self._sock)
        try:
            while True:
                reply: Reply = await reader.read()
                call = self._calls.get(reply.id)
                if call is None or call.future.done():
                    continue  # the caller gave up (deadline): drop the late answer
                if reply.error is None:
                    call.future.set_result(reply.value)
                elif isinstance(reply.error, RemoteError):
                    call.future.set_exception(
                        reply.error.to_inference_error(call.node, call.plugin)
                    )
                else:
                    call.future.set_exception(reply.error)
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
            how = f"killed by signal {-code}"
        for call in list(self._calls.values()):
            if not call.future.done():
                where = f" while running node {call.node!r}" if call.node else ""
                msg = f"worker {self.name} (pid {self.pid}) died{where}: {how}"
                call.future.set_exception(WorkerDied(msg, node=call.node, plugin=call.plugin))
        if self._sock is not None:
            self._sock.close()
        self.exited.set()
        if self.on_exit is not None:
            self.on_exit()
        level = logging.INFO if self._stopping else logging.WARNING
        logger.log(level, "worker %s (pid %s) ended: %s", self.name, self.pid, how)

    async def _exit_code(self) -> int | None:
        # The socket closes a moment before the process is reaped: wait briefly for the code.
        for _ in range(50):
            if self.process is None or self.process.exitcode is not None:
                break
            await asyncio.sleep(0.01)
        return self.process.exitcode if self.process else None


__all__ = ["WorkerDied", "WorkerProcess"]
