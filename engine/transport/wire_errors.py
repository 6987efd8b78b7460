"""The ONE place where errors are mapped to and from the wire.

Server side, :func:`map_to_wire` wraps every handler method: a :class:`DagserveError` becomes
the IDL exception of the same name, and anything else becomes the IDL ``InferenceError``
("internal error: ...") after its traceback is logged once.  This is not cosmetic: an
exception that the IDL does not declare would otherwise reach the transport (DESIGN.md, Known
hazards: thriftpy2's asyncio server drops the connection on it).

Client side, :func:`from_wire` turns the IDL exceptions back into ``model_plugins.errors``
classes (and :mod:`engine.errors` ones), so callers catch the same types the engine raises.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from thriftpy2.thrift import TApplicationException, TException

from engine.errors import ApplicationError
from idl import dagserve_thrift
from model_plugins import errors as sdk
from model_plugins.errors import DagserveError

logger = logging.getLogger(__name__)


def to_wire(exc: DagserveError) -> TException:
    """The IDL exception for one of our errors (subclasses map to their nearest IDL parent)."""
    t = dagserve_thrift
    wire: TException
    if isinstance(exc, sdk.InvalidRequest):
        wire = t.InvalidRequest(message=exc.message, field=exc.field)
    elif isinstance(exc, sdk.PipelineNotFound):
        wire = t.PipelineNotFound(message=exc.message)
    elif isinstance(exc, sdk.Overloaded):
        wire = t.Overloaded(message=exc.message, retry_after_ms=exc.retry_after_ms)
    elif isinstance(exc, sdk.DeadlineExceeded):
        wire = t.DeadlineExceeded(message=exc.message)
    elif isinstance(exc, sdk.InferenceError):
        wire = t.InferenceError(message=exc.message, node=exc.node)
    else:
        # PluginError, ConfigError, dag's PipelineError ...: deliberate errors without an
        # IDL twin.
        wire = t.InferenceError(message=exc.message)
    return wire


@contextmanager
def map_to_wire(what: str = "request") -> Iterator[None]:
    """Run a handler body so that only IDL exceptions leave it.

    ``what`` names the call in the log line of an unexpected error.  IDL exceptions raised
    inside pass through unchanged.
    """
    try:
        yield
    except TException:
        raise
    except Exception as exc:
        raise wire_error(exc, what) from exc


def wire_error(exc: Exception, what: str = "request") -> TException:
    """What :func:`map_to_wire` raises for ``exc`` (not an IDL exception itself), for a
    handler that catches its errors itself."""
    if isinstance(exc, DagserveError):
        return to_wire(exc)
    # The one place a traceback of an unexpected error is logged; the client only gets the
    # class and message.
    logger.error("internal error in %s", what, exc_info=exc)
    wire: TException = dagserve_thrift.InferenceError(
        message=f"internal error: {type(exc).__name__}: {exc}"
    )
    return wire


def from_wire(exc: TException, *, pipeline: str | None = None) -> DagserveError:
    """Our error for an IDL exception (or a ``TApplicationException``) a server answered.

    ``pipeline`` fills ``PipelineNotFound.pipeline``, which the wire does not carry.
    """
    t = dagserve_thrift
    message = str(getattr(exc, "message", "") or "")
    if isinstance(exc, t.InvalidRequest):
        return sdk.InvalidRequest(message, field=exc.field)
    if isinstance(exc, t.PipelineNotFound):
        # PipelineNotFound(name, ...) composes its message; the wire carries only the text.
        fields = {"pipeline": pipeline, "version": None}
        return sdk.rebuild(sdk.PipelineNotFound, message, fields)
    if isinstance(exc, t.Overloaded):
        retry = exc.retry_after_ms if exc.retry_after_ms is not None else 100
        return sdk.Overloaded(message, retry_after_ms=retry)
    if isinstance(exc, t.DeadlineExceeded):
        return sdk.DeadlineExceeded(message)
    if isinstance(exc, t.InferenceError):
        return sdk.InferenceError(message, node=exc.node)
    if isinstance(exc, TApplicationException):
        kind = exc.type if exc.type is not None else TApplicationException.UNKNOWN
        return ApplicationError(message or f"application exception {kind}", kind=kind)
    return ApplicationError(f"unexpected exception from the server: {exc!r}")


__all__ = ["from_wire", "map_to_wire", "to_wire", "wire_error"]
