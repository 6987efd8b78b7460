"""A synchronous client of the admin service (``idl/admin.thrift``), for ``dagserve admin``,
benchmarks and tests.

Admin calls are rare and may take long (a reload loads and warms models), so the client opens
one connection per call, with a generous ``timeout_s``, and never retries (a ``load`` or
``reload`` is not idempotent).  Errors come back typed:

- ``AdminError`` (the server refused the change and changed nothing) as :class:`AdminRefused`;
- ``Unauthorized`` (wrong or missing token) as :class:`AdminUnauthorized`;
- a ``TApplicationException`` as :class:`~engine.errors.ApplicationError`;
- a connection that cannot be made or breaks (a TLS handshake refused included) as
  :class:`~engine.errors.ClientConnectionError`.

Answers are the IDL's ``VersionInfo`` structs: ``pipeline``, ``version``, ``state``, ``why``,
``weight``, ``shadow``, ``sticky_header``, ``inflight``, ``path``, ``models``, ``variants``
(node -> ``NodeVariants``: ``weights``, ``own_weight``, ``shadow``).
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Mapping
from typing import Any

from thriftpy2.thrift import TApplicationException, TMessageType

from engine.errors import ApplicationError, ClientConnectionError, ClientTimeout
from engine.transport.client import _SyncConnection
from engine.transport.codec import encode_message, message_reader
from engine.transport.wire_errors import from_wire
from idl import admin_thrift
from model_plugins.errors import DagserveError

_SERVICE = admin_thrift.AdminService


class AdminRefused(DagserveError):
    """The server refused the change (``AdminError``); the message says why."""


class AdminUnauthorized(DagserveError):
    """The admin token is missing or wrong (the server says no more)."""


class AdminClient:
    """Calls the admin service at ``host:port``.

    Args:
        token: the content of the server's ``admin_token_file`` ("" when it has none).
        timeout_s: bound of one call, connect included; a reload waits for its models.
        ssl_context: TLS (``engine.transport.client.tls_context``, with a client certificate
            where the server requires one).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9091,
        *,
        token: str = "",
        timeout_s: float = 300.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.token = token
        self.timeout_s = timeout_s
        self.ssl_context = ssl_context
        self._seqids = itertools.count(1)

    def list_versions(self) -> list[Any]:
        """Every version of every pipeline, with its state and traffic."""
        return list(self._call("list_versions"))

    def load(self, path: str) -> Any:
        """Load the pipeline file at ``path`` (a path on the server); its ``VersionInfo``."""
        return self._call("load", path=path)

    def traffic(
        self,
        pipeline: str,
        weights: Mapping[str, float],
        *,
        shadow: str | None = None,
        sticky_header: str | None = None,
    ) -> list[Any]:
        """Set the weights (and shadow, sticky header) of ``pipeline``; its versions after."""
        answer = self._call(
            "traffic", pipeline=pipeline, weights=dict(weights), shadow=shadow,
            sticky_header=sticky_header,
        )  # fmt: skip
        return list(answer)

    def variants(self, pipeline: str, version: str, node: str, weights: Mapping[str, float]) -> Any:
        """Set the weights (percent) of ``node``'s variants in one version (those not named
        keep theirs); the version's ``VersionInfo`` after."""
        return self._call(
            "variants", pipeline=pipeline, version=version, node=node, weights=dict(weights)
        )

    def reload(self, pipeline: str, version: str, *, in_place: bool = False) -> Any:
        """Re-read the version's files and swap them in; its ``VersionInfo`` after."""
        return self._call("reload", pipeline=pipeline, version=version, in_place=in_place)

    def unload(self, pipeline: str, version: str) -> None:
        """Stop routing to the version, drain it, free its models."""
        self._call("unload", pipeline=pipeline, version=version)

    def _call(self, name: str, **arguments: Any) -> Any:
        seqid = next(self._seqids) % 2**31
        args = getattr(_SERVICE, f"{name}_args")(token=self.token, **arguments)
        payload = encode_message(name, TMessageType.CALL, seqid, args)
        try:
            connection = _SyncConnection(self.host, self.port, self.timeout_s, self.ssl_context)
        except OSError as exc:
            error = self._connection_error("connect", exc)
            raise error from exc
        try:
            frame = connection.roundtrip(payload)
        except Exception as exc:  # OSError, or a reply frame too large
            error = self._connection_error(name, exc)
            raise error from exc
        finally:
            connection.close()
        return _unpack(frame, name, seqid)

    def _connection_error(self, what: str, exc: BaseException) -> ClientConnectionError:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, TimeoutError):
            message = f"{where}: no answer to {what} within {self.timeout_s} s"
            return ClientTimeout(message, self.host, self.port)
        return ClientConnectionError(f"{where}: {what} failed: {exc}", self.host, self.port)

    def __repr__(self) -> str:
        return f"AdminClient({self.host!r}, {self.port})"


def _unpack(frame: bytes | bytearray, name: str, seqid: int) -> Any:
    protocol = message_reader(frame)
    try:
        reply_name, message_type, reply_seqid = protocol.read_message_begin()
        if message_type == TMessageType.EXCEPTION:
            app_error = TApplicationException()
            protocol.read_struct(app_error)
        else:
            result = getattr(_SERVICE, f"{name}_result")()
            protocol.read_struct(result)
    except Exception as exc:
        msg = f"undecodable reply to {name}: {type(exc).__name__}: {exc}"
        raise ApplicationError(msg, kind=TApplicationException.PROTOCOL_ERROR) from exc
    if reply_name != name or reply_seqid != seqid:
        msg = f"reply to {reply_name!r} #{reply_seqid} for call {name!r} #{seqid}"
        raise ApplicationError(msg, kind=TApplicationException.BAD_SEQUENCE_ID)
    if message_type == TMessageType.EXCEPTION:
        raise from_wire(app_error)
    if getattr(result, "unauthorized", None) is not None:
        msg = "unauthorized: the admin token is missing or wrong"
        raise AdminUnauthorized(msg)
    if getattr(result, "error", None) is not None:
        raise AdminRefused(str(result.error.message or ""))
    if name == "unload":
        return None
    if result.success is None:
        msg = f"{name} answered no result"
        raise ApplicationError(msg, kind=TApplicationException.MISSING_RESULT)
    return result.success


__all__ = ["AdminClient", "AdminRefused", "AdminUnauthorized"]
