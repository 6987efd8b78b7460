"""The Thrift handler: a thin adapter between the wire structs and a transport-neutral engine.

Each method does three things: convert the Thrift structs (``engine.transport.codec``), call the
engine, convert the answer back.  :func:`engine.transport.wire_errors.map_to_wire` wraps each
body (``infer``, the hot one, calls its ``wire_error`` itself), so only exceptions that the IDL
declares leave it (STYLE.md, guideline 6).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from thriftpy2.thrift import TException

from dag.pipeline import PipelineDescription
from engine.runtime.types import HealthReport, InferenceRequest, InferenceResult
from engine.transport.codec import (
    decode_tensors,
    encode_tensors,
    health_to_wire,
    pipeline_to_wire,
)
from engine.transport.wire_errors import map_to_wire, wire_error
from idl import dagserve_thrift
from model_plugins.errors import InvalidRequest


class EngineLike(Protocol):
    """What the handler needs from the engine (``engine.runtime.engine.Engine`` provides it)."""

    async def infer(self, request: InferenceRequest) -> InferenceResult: ...

    def list_pipelines(self) -> list[PipelineDescription]: ...

    def describe(self, name: str) -> PipelineDescription:
        """Raises ``PipelineNotFound``."""
        ...

    def health(self) -> HealthReport: ...


def request_from_wire(request: Any) -> InferenceRequest:
    """Decode and check an ``InferRequest``; a missing ``request_id`` gets a fresh one."""
    if request is None:
        msg = "the call carries no request"
        raise InvalidRequest(msg, field="request")
    if not request.pipeline:
        msg = "pipeline is missing"
        raise InvalidRequest(msg, field="pipeline")
    # The struct was decoded for this call alone: its list and dict are ours, not copied.
    return InferenceRequest(
        pipeline=request.pipeline,
        inputs=decode_tensors(request.inputs, "inputs"),
        request_id=request.request_id or _new_request_id(),
        version=request.version or None,
        timeout_ms=request.timeout_ms,
        # unknown output names are the engine's to judge
        outputs=request.outputs,
        headers=request.headers if request.headers is not None else {},
    )


#: a fresh request id is this process's random prefix and a count (16 + 16 hex digits, as a
#: uuid4's hex, at a fraction of its cost)
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNT = itertools.count(1)


def _new_request_id() -> str:
    """A request id for a request that came without one: unique, 32 hex digits."""
    return f"{_ID_PREFIX}{next(_ID_COUNT):016x}"


def response_to_wire(result: InferenceResult) -> Any:
    """The ``InferResponse`` of an engine result."""
    return dagserve_thrift.InferResponse(
        request_id=result.request_id,
        outputs=encode_tensors(result.outputs),
        node_latency_us=result.node_latency_us,
        version=result.version,
    )


class InferenceHandler:
    """The ``InferenceService`` of ``idl/dagserve.thrift``, served by ``transport.thrift``."""

    def __init__(
        self,
        engine: EngineLike,
        *,
        health: Callable[[], Awaitable[HealthReport]] | None = None,
    ) -> None:
        self.engine = engine
        #: the server's health, where the engine's own is not all of it (``engine.fronts``)
        self._health = health

    async def infer(self, request: Any) -> Any:
        # map_to_wire's work, without a context manager per request
        try:
            result = await self.engine.infer(request_from_wire(request))
            return response_to_wire(result)
        except TException:
            raise
        except Exception as exc:
            raise wire_error(exc, "infer") from exc

    async def list_pipelines(self) -> list[Any]:
        with map_to_wire("list_pipelines"):
            return [pipeline_to_wire(d) for d in self.engine.list_pipelines()]

    async def describe(self, pipeline: str) -> Any:
        with map_to_wire("describe"):
            return pipeline_to_wire(self.engine.describe(pipeline))

    async def health(self) -> Any:
        with map_to_wire("health"):
            report = await self._health() if self._health else self.engine.health()
            return health_to_wire(report)


__all__ = ["EngineLike", "InferenceHandler", "request_from_wire", "response_to_wire"]
