"""The metrics port: ``/metrics`` (Prometheus text format), ``/healthz`` and ``/readyz``.

A deliberately small HTTP/1.1 responder on asyncio streams: GET only, one request per
connection, bounded header size.  ``/healthz`` answers 200 while the process serves;
``/readyz`` answers 200 only once every model is placed and loaded, 503 before.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.observability.metrics import Metrics

logger = logging.getLogger(__name__)

#: the most bytes of request line and headers read before the connection is dropped
MAX_HEADER_BYTES = 16 * 1024


class MetricsServer:
    """Serves the metrics of ``metrics`` and the health of ``ready()``."""

    def __init__(
        self, metrics: Metrics, ready: Callable[[], bool], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, limit=MAX_HEADER_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
            status, content_type, body = self._route(method, path.split("?", 1)[0])
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (body if method != "HEAD" else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a slow, truncated or oversized request: drop it
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        text = "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", text, b"GET only\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
        if path == "/healthz":
            return "200 OK", text, b"ok\n"
        if path == "/readyz":
            if self.ready():
                return "200 OK", text, b"ready\n"
            return "503 Service Unavailable", text, b"loading\n"
        return "404 Not Found", text, b"not found: try /metrics, /healthz or /readyz\n"


__all__ = ["MetricsServer"]
