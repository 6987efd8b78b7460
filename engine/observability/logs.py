"""Logging: human-readable on a terminal, JSON lines otherwise; every line carries its request.

The request being served lives in a context variable, so every log line written while serving
it (by the engine, a runner, a batcher) carries its ``request_id`` (and ``trace_id`` when the
caller sent a W3C ``traceparent``) without passing them around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from typing import Any, Literal

#: the request being served in this task, if any
request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
trace_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)

LogFormat = Literal["auto", "text", "json"]

# attributes every LogRecord has; the rest were passed with `extra=` and are logged as fields
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _is_field(key: str) -> bool:
    """An attribute passed with ``extra=``.  Private ones are a library's record factory's
    (Ray adds ``_ray_timestamp_ns`` to every record once imported, ``ray:`` workers): not ours."""
    return key not in _STANDARD and not key.startswith("_")


class _RequestContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        if not hasattr(record, "trace_id"):
            record.trace_id = trace_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if _is_field(key) and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message [request_id] key=value ...`` for people."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if _is_field(k) and k not in ("request_id", "trace_id") and v is not None
        ]
        rid = getattr(record, "request_id", None)
        if rid:
            text += f" [{rid}]"
        return text + (" " + " ".join(extras) if extras else "")


def configure(level: str = "info", log_format: LogFormat = "auto") -> None:
    """Set up the root logger for ``dagserve serve``."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(_RequestContext())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


__all__ = ["JsonFormatter", "TextFormatter", "configure", "request_id", "trace_id"]
