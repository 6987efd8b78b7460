"""Run a real dagserve server (engine, workers, Thrift) on a loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.config import ServerConfig
from engine.runtime.loading import load_for_serving
from engine.server import Server

ROOT = Path(__file__).resolve().parent.parent
PIPELINES = Path(__file__).resolve().parent / "pipelines"


class LoopThread:
    """An event loop on a background thread: ``run`` a coroutine there and wait for it, so
    that sync clients in the test block the calling thread, not the server.  A subclass says
    how its server starts and stops (``_start``, ``_stop``)."""

    #: how long ``run`` waits by default
    timeout_s = 60.0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro: Any, timeout_s: float | None = None) -> Any:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start())

    def stop(self) -> None:
        try:
            self.run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    async def _start(self) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        raise NotImplementedError


class ServerThread(LoopThread):
    """``engine.server.Server`` on 127.0.0.1, port 0, in another thread (sync clients block)."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def admin_port(self) -> int | None:
        return self.server.admin_port

    @property
    def engine(self) -> Any:
        return self.server.engine

    async def _start(self) -> None:
        await self.server.startup()

    async def _stop(self) -> None:
        await self.server.shutdown()


@contextmanager
def serving(paths: Sequence[Path], **config: Any) -> Iterator[ServerThread]:
    """Load ``paths`` (failing the test on any pipeline error) and serve them."""
    pipelines, errors = load_for_serving(paths)
    assert not errors, "\n".join(str(e) for e in errors)
    thread = ServerThread(Server(ServerConfig(port=0, **config), pipelines))
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def occupy(
    thread: ServerThread, pipeline: str, model_id: str, inputs: dict[str, Any], output: str
) -> threading.Thread:
    """Start one request that keeps ``model_id``'s only instance busy; return once it is."""
    import time

    from engine.transport.client import Client

    shared = next(m for m in thread.engine.models.values() if m.model_id == model_id)

    def call() -> None:
        with Client("127.0.0.1", thread.port) as client:
            client.infer(pipeline, inputs, outputs=[output])

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while shared.batcher.statistics().busy_instances == 0:
        assert time.monotonic() < deadline, f"{model_id} never became busy"
        time.sleep(0.005)
    return caller


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = 30.0) -> Any:
    """Poll ``condition()`` until it returns something true, and return that; fail the test
    naming ``what`` if it has not after ``timeout_s`` (state is polled, never assumed)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:g} s"
        time.sleep(0.01)
