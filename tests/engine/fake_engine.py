"""A fake engine for the Thrift layer's tests, and a server running it on a background loop.

``FakeEngine`` serves one pipeline, ``echo``, that answers its inputs as outputs.  Headers
steer it: ``raise: <kind>`` raises one of :data:`ERRORS`, ``sleep_ms: N`` sleeps first.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dag.pipeline import EdgeDescription, PipelineDescription
from engine.runtime.types import HealthReport, InferenceRequest, InferenceResult
from engine.transport.handler import InferenceHandler
from engine.transport.thrift import ThriftServer
from model_plugins.errors import (
    BatchContractError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
)
from model_plugins.specs import TensorSpec
from tests.serving import LoopThread

#: header value -> the error the fake raises
ERRORS: dict[str, Callable[[], Exception]] = {
    "invalid": lambda: InvalidRequest("inputs.x: bad shape", field="inputs.x.shape"),
    "overloaded": lambda: Overloaded("queue of 'embed' is full", retry_after_ms=250),
    "deadline": lambda: DeadlineExceeded("timeout_ms 5 ran out"),
    "inference": lambda: InferenceError("node 'embed' failed: boom", node="embed"),
    "batch": lambda: BatchContractError("pkg:Bad", "y", expected=2, actual=1, node="embed"),
    "crash": lambda: RuntimeError("kaboom"),
}

ECHO = PipelineDescription(
    name="echo",
    version="1",
    inputs={"x": TensorSpec("float32", (3,)), "text": TensorSpec("string", (), optional=True)},
    outputs={"x": TensorSpec("float32", (3,)), "mystery": None},
    nodes=["echo"],
    edges=[
        EdgeDescription("$inputs", "echo", "x"),
        EdgeDescription("echo", "$outputs", "echo.x"),
    ],
)


class FakeEngine:
    """Implements ``engine.transport.handler.EngineLike``; records the requests it gets."""

    def __init__(self) -> None:
        self.requests: list[InferenceRequest] = []
        #: set when a request reaches infer (a test thread can wait for it)
        self.entered = threading.Event()
        #: set when a request is cancelled while it sleeps
        self.cancelled = threading.Event()
        #: raised by health() when set
        self.health_error: Exception | None = None

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        self.requests.append(request)
        self.entered.set()
        if request.pipeline != "echo":
            raise PipelineNotFound(request.pipeline, request.version, known=["echo"])
        if "sleep_ms" in request.headers:
            try:
                await asyncio.sleep(int(request.headers["sleep_ms"]) / 1000)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if "raise" in request.headers:
            raise ERRORS[request.headers["raise"]]()
        outputs = dict(request.inputs)
        if request.outputs is not None:
            outputs = {name: outputs[name] for name in request.outputs}
        return InferenceResult(
            request_id=request.request_id,
            outputs=outputs,
            version="1",
            node_latency_us={"echo": 7},
        )

    def list_pipelines(self) -> list[PipelineDescription]:
        return [ECHO]

    def describe(self, name: str) -> PipelineDescription:
        if name != "echo":
            raise PipelineNotFound(name, known=["echo"])
        return ECHO

    def health(self) -> HealthReport:
        if self.health_error is not None:
            raise self.health_error
        return HealthReport(live=True, ready=True, details={"pipelines": "1"})


class ServerThread(LoopThread):
    """A :class:`ThriftServer` on 127.0.0.1, port 0, on an event loop in another thread.

    The synchronous client blocks, so the server cannot share the test's thread.
    """

    timeout_s = 10.0

    def __init__(self, engine: FakeEngine, **options: Any) -> None:
        super().__init__()
        self.engine = engine
        self.server = ThriftServer(InferenceHandler(engine), "127.0.0.1", 0, **options)

    @property
    def port(self) -> int:
        return self.server.port

    def read(self, get: Callable[[], Any]) -> Any:
        """Read server state on its own loop (no race with the loop thread)."""

        async def _get() -> Any:
            return get()

        return self.run(_get())

    async def _start(self) -> None:
        await self.server.start()

    async def _stop(self) -> None:
        await self.server.aclose()


@contextmanager
def serving(engine: FakeEngine | None = None, **options: Any) -> Iterator[ServerThread]:
    """Serve a fake engine for the duration of a ``with`` block."""
    thread = ServerThread(engine or FakeEngine(), **options)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()
