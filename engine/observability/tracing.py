"""W3C trace context (``traceparent``) and an optional OpenTelemetry bridge.

A caller may send a ``traceparent`` header with a request (``InferRequest.headers``).
:func:`parse_traceparent` reads it, :meth:`TraceContext.child` makes the span id of work done
on its behalf, and :func:`format_traceparent` writes one back.  None of that needs a library.

:func:`start_request_span` and :func:`start_node_span` open OpenTelemetry spans when the
``opentelemetry`` package is importable (``pip install 'dagserve[otel]'``); the request span
continues the caller's trace, so its trace id is the caller's.  Without the package both are
cheap no-ops and ``opentelemetry`` is never imported.  Which exporter the spans go to is the
application's choice, made the OpenTelemetry way (an SDK ``TracerProvider``); with the API
alone the spans are non-recording.
"""

from __future__ import annotations

import contextvars
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TraceContext",
    "parse_traceparent",
    "format_traceparent",
    "traceparent_of",
    "start_request_span",
    "start_node_span",
    "tracing_enabled",
    "request_trace",
    "outgoing_traceparent",
    "disable_opentelemetry",
]

#: version-traceid-parentid-flags, lowercase hex; a future version may append ``-...``
_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})"
    r"-(?P<flags>[0-9a-f]{2})(?P<rest>-.*)?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 0x01
_TRACER_NAME = "dagserve"
#: what the OpenTelemetry API hands out while no SDK provider is set: their spans record nothing
_NO_OP_TRACERS = frozenset({"ProxyTracer", "NoOpTracer"})


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's place in a distributed trace (the fields of a ``traceparent``)."""

    trace_id: str
    """32 lowercase hex digits, not all zero."""
    span_id: str
    """16 lowercase hex digits, not all zero (the ``parent-id`` field on the wire)."""
    flags: int = _SAMPLED
    """trace flags, 0..255; bit 0 is *sampled*."""

    @property
    def sampled(self) -> bool:
        """Whether the caller recorded (sampled) this trace."""
        return bool(self.flags & _SAMPLED)

    def child(self) -> TraceContext:
        """A new span in the same trace, with the same flags and a fresh random span id."""
        return TraceContext(self.trace_id, _new_span_id(), self.flags)


def _new_span_id() -> str:
    while True:
        span_id = secrets.token_hex(8)
        if span_id != _ZERO_SPAN:
            return span_id


def parse_traceparent(value: object) -> TraceContext | None:
    """The trace context in a ``traceparent`` header value, or None if it is not a valid one.

    Follows W3C Trace Context level 1: version ``00`` is exactly
    ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>``; version ``ff`` is invalid; a
    later version is read as ``00`` and may carry more ``-``-separated fields.  Hex is
    lowercase; all-zero ids are invalid.  Surrounding whitespace is ignored.  Never raises.

    >>> parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    TraceContext(trace_id='4bf92f3577b34da6a3ce929d0e0e4736', span_id='00f067aa0ba902b7', flags=1)
    >>> parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01") is None
    True
    """
    if not isinstance(value, str):
        return None
    match = _TRACEPARENT.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.group(
        "version", "trace_id", "span_id", "flags", "rest"
    )
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def format_traceparent(ctx: TraceContext) -> str:
    """The version-``00`` ``traceparent`` header value of ``ctx``.

    >>> format_traceparent(TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
    '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'
    """
    return f"00-{ctx.trace_id}-{ctx.span_id}-{ctx.flags:02x}"


def traceparent_of(headers: Mapping[str, str] | None) -> TraceContext | None:
    """The valid ``traceparent`` among ``headers`` (name matched case-insensitively), if any."""
    if not headers:
        return None
    value = headers.get("traceparent")
    if value is None:
        for name, candidate in headers.items():
            if isinstance(name, str) and name.lower() == "traceparent":
                value = candidate
                break
    return parse_traceparent(value)


# --- OpenTelemetry bridge ---------------------------------------------------------------

_UNRESOLVED: Any = object()
#: ``(opentelemetry.trace, opentelemetry.propagate)`` once looked up; None when not installed
_otel: Any = _UNRESOLVED


def _opentelemetry() -> Any:
    """``(trace, propagate)`` of OpenTelemetry, or None; imported on first use only."""
    global _otel
    if _otel is _UNRESOLVED:
        try:
            from opentelemetry import propagate, trace
        except ImportError:
            _otel = None
        else:
            _otel = (trace, propagate)
    return _otel


def disable_opentelemetry() -> None:
    """Never import OpenTelemetry in this process: ``dagserve serve`` with tracing off.

    Trace contexts are still continued (the log lines' ``trace_id``, a remote node's
    ``traceparent``); no span is made.
    """
    global _otel
    _otel = None


def _context_of(span: Any) -> TraceContext | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return TraceContext(f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}", int(ctx.trace_flags))


#: how long "no SDK provider" is believed before asking OpenTelemetry again (asking costs
#: more than the rest of a request's tracing; OpenTelemetry sets a provider once, for good)
_RECHECK_S = 1.0
#: the last answer: (the bridge it is about, spans are recorded, believed until)
_answer: tuple[Any, bool, float] | None = None


def tracing_enabled() -> bool:
    """Whether spans are recorded: OpenTelemetry is installed and an SDK provider is set.

    A provider set while serving is seen within :data:`_RECHECK_S`.
    """
    global _answer
    otel = _opentelemetry()
    if otel is None:
        return False
    answer = _answer
    if answer is not None and answer[0] is otel and (answer[1] or time.monotonic() < answer[2]):
        return answer[1]
    # Until an application sets a provider, the API hands out a proxy whose spans are no-ops:
    # skip the work of making them.
    enabled = type(otel[0].get_tracer(_TRACER_NAME)).__name__ not in _NO_OP_TRACERS
    _answer = (otel, enabled, time.monotonic() + _RECHECK_S)
    return enabled


#: what the span functions return while nothing records spans: no generator per request
_NO_SPAN: AbstractContextManager[None] = nullcontext()


def start_request_span(
    pipeline: str, headers: Mapping[str, str] | None = None
) -> AbstractContextManager[TraceContext | None]:
    """Trace one request of ``pipeline``, continuing the caller's ``traceparent`` if any.

    Yields the trace context of this request's span: what to log beside the request and to
    send downstream.  With an OpenTelemetry SDK that is the span it opened (its trace id is the
    caller's, or a new one); otherwise it is a child of the caller's context, or None when the
    caller sent none.
    An exception leaving the block is recorded on the span and propagates.
    """
    if not tracing_enabled():
        parent = traceparent_of(headers)
        return _NO_SPAN if parent is None else nullcontext(parent.child())
    return _request_span(pipeline, headers)


@contextmanager
def _request_span(
    pipeline: str, headers: Mapping[str, str] | None
) -> Iterator[TraceContext | None]:
    trace, propagate = _opentelemetry()
    carrier = {k.lower(): v for k, v in (headers or {}).items() if isinstance(k, str)}
    context = propagate.extract(carrier)
    tracer = trace.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        f"infer {pipeline}",
        context=context,
        kind=trace.SpanKind.SERVER,
        attributes={"dagserve.pipeline": pipeline, "rpc.system": "apache_thrift"},
    ) as span:
        if span.is_recording():
            yield _context_of(span)
        else:  # no SDK configured: the span is the caller's context, passed through
            parent = traceparent_of(headers)
            yield None if parent is None else parent.child()


def start_node_span(
    pipeline: str, node: str, *, model: str | None = None, batch_size: int | None = None
) -> AbstractContextManager[None]:
    """Trace one node run of ``pipeline`` as a child of the current (request) span.

    A no-op without OpenTelemetry, or while no SDK provider is set.  ``model``
    (``"pipeline/node"`` of the model's first user) and ``batch_size`` become span attributes.
    """
    if not tracing_enabled():
        return _NO_SPAN
    attributes: dict[str, str | int] = {"dagserve.pipeline": pipeline, "dagserve.node": node}
    if model is not None:
        attributes["dagserve.model"] = model
    if batch_size is not None:
        attributes["dagserve.batch_size"] = batch_size
    tracer = _opentelemetry()[0].get_tracer(_TRACER_NAME)
    span: AbstractContextManager[None] = tracer.start_as_current_span(
        f"node {node}", attributes=attributes
    )
    return span


#: the trace context of the request being served in this task (what ``start_request_span``
#: yielded), set by the engine: a call made on the request's behalf carries it on
request_trace: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "dagserve_request_trace", default=None
)


def outgoing_traceparent() -> str | None:
    """The ``traceparent`` to send with a call made on behalf of the request being served.

    With an OpenTelemetry SDK, the current span's (a node span, so the callee's spans hang
    under the node that called it); otherwise a child of the request's own trace context,
    so the callee's log lines still carry the caller's trace id.  None when neither exists.
    """
    if tracing_enabled():
        span = _opentelemetry()[0].get_current_span()
        current = _context_of(span)
        if current is not None:
            return format_traceparent(current)
    trace = request_trace.get()
    return None if trace is None else format_traceparent(trace.child())
