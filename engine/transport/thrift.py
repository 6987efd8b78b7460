"""The Thrift server: framed transport, binary protocol, asyncio (uvloop where installed).

We keep thriftpy2's ``TAsyncServer`` and ``TAsyncServerSocket`` for binding and accepting,
but serve each connection with our own loop (:meth:`ThriftServer.handle`), because thriftpy2's
own asyncio path and its decoder have four hazards (DESIGN.md, "Known hazards"):

- its processor re-raises exceptions the IDL does not declare and the server then drops the
  connection (the client sees "read 0 bytes"): we answer ``TApplicationException`` instead;
- its framed transport reads whatever size a frame header announces, so a few huge headers
  stall every client: we check the size before reading the body, and close that connection;
- its binary decoder can loop for seconds without reading a byte on a small forged frame
  (a container of a non-wire element type): ``engine.transport.frame_guard`` checks every call frame
  before it is decoded, and a refused one gets a ``TApplicationException``;
- ``TAsyncServerSocket``'s default ``client_timeout`` of 3000 ms closes every connection
  after 3 s, busy or not: we pass None and offer an idle timeout between requests instead.

One connection answers its requests in order (a Thrift client waits for each reply);
concurrency comes from many connections.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from thriftpy2.contrib.aio.server import TAsyncServer
from thriftpy2.contrib.aio.socket import StreamHandler, TAsyncServerSocket
from thriftpy2.thrift import TApplicationException, TException, TMessageType

from engine.config import DEFAULT_MAX_FRAME_BYTES
from engine.transport.codec import encode_message, message_reader
from engine.transport.frame_guard import FrameRejected, check_call
from idl import dagserve_thrift

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: StreamReader buffer limit; asyncio's 64 KiB default pauses and resumes the socket many
#: times while one 600 KB tensor arrives
STREAM_LIMIT = 1024 * 1024


@dataclass
class _Connection:
    peer: str
    writer: asyncio.StreamWriter
    #: a request is being read, run or answered (aclose lets it finish within its grace)
    busy: bool = False


class _StreamProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, which also calls ``on_gone`` when the peer goes (EOF or a
    reset): the connection sets it while a request is processed.  A client that closes its
    side (even a half-close, with requests sent ahead) is taken to wait for no answer."""

    on_gone: Callable[[], None] | None = None

    def eof_received(self) -> bool:
        if self.on_gone is not None:
            self.on_gone()
        return bool(super().eof_received())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.on_gone is not None:
            self.on_gone()
        super().connection_lost(exc)


async def _start_server(
    client_connected: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
    *,
    sock: socket.socket,
    ssl: ssl.SSLContext | None,
) -> asyncio.Server:
    """``asyncio.start_server`` with :class:`_StreamProtocol` (thriftpy2's socket calls it)."""
    loop = asyncio.get_running_loop()

    def protocol() -> _StreamProtocol:
        reader = asyncio.StreamReader(limit=STREAM_LIMIT, loop=loop)
        return _StreamProtocol(reader, client_connected, loop=loop)

    return await loop.create_server(protocol, sock=sock, ssl=ssl)


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    # Without TCP_NODELAY a 600 KB reply stalls 40 ms on Nagle (DESIGN.md, Known hazards).
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        logger.debug("cannot set TCP_NODELAY: %s", exc)


class ThriftServer(TAsyncServer):
    """Serves one Thrift service over framed binary Thrift.

    Args:
        handler: an object with one (async) method per service method; it raises only the
            IDL exceptions its methods declare (``engine.transport.handler.InferenceHandler`` does).
        host, port: where to listen; port 0 picks a free port (see :attr:`port`).
        max_frame_bytes: largest frame accepted; a larger (or negative) frame header closes
            that connection before its body is read.
        idle_timeout_s: close a connection that waits this long for its next request;
            None = never.  Never applies while a request is in progress.
        backlog: listen backlog.
        service: the thriftpy2 service class (the IDL's ``InferenceService`` by default).
        ssl_context: TLS on the port (``engine.config.TlsConfig.server_context()``).
    """

    def __init__(
        self,
        handler: object,
        host: str = "127.0.0.1",
        port: int = 9090,
        *,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        idle_timeout_s: float | None = None,
        backlog: int = 128,
        service: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_frame_bytes < 1:
            msg = f"max_frame_bytes must be >= 1 (got {max_frame_bytes})"
            raise ValueError(msg)
        if idle_timeout_s is not None and idle_timeout_s <= 0:
            msg = f"idle_timeout_s must be > 0 or None (got {idle_timeout_s})"
            raise ValueError(msg)
        # client_timeout=None: the default 3000 ms caps the whole connection, not idleness.
        server_socket = TAsyncServerSocket(
            host=host, port=port, client_timeout=None, backlog=backlog, ssl_context=ssl_context
        )
        server_socket.sock_factory = _start_server  # type: ignore[assignment]
        super().__init__(processor=None, trans=server_socket)
        self.handler = handler
        self.service = service if service is not None else dagserve_thrift.InferenceService
        self._methods = _methods(self.service)
        self.host = host
        #: the bound port (the real one once started, also when asked for port 0)
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.idle_timeout_s = idle_timeout_s
        #: connections accepted since start (open or not)
        self.accepted_connections = 0
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._closing = False
        self._stopped: asyncio.Event | None = None

    @property
    def open_connections(self) -> int:
        """Connections open right now."""
        return len(self._connections)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start accepting; returns at once.  :attr:`port` is then the real port."""
        if self.server is not None:
            return
        self._stopped = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.trans.listen()
        self.port = int(self.trans.raw_sock.getsockname()[1])
        self.server = await self.trans.accept(self.handle)
        logger.debug("thrift server listening on %s:%d", self.host, self.port)

    async def serve_forever(self) -> None:
        """Start if needed, then serve until :meth:`aclose` (or cancellation, which closes)."""
        await self.start()
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.aclose()

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Stop accepting, close idle connections, give busy ones ``grace_s`` to answer."""
        if self.closed or self.server is None:
            return
        self._closing = True
        # 1. stop accepting
        self.server.close()
        # 2. idle connections wait for a request that would never be served: close them now
        for task, connection in list(self._connections.items()):
            if not connection.busy:
                task.cancel()
        # 3. busy ones finish the request in hand (their loop ends after it), then are cancelled
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                logger.warning("cancelling a request still running after %.1f s", grace_s)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.server.wait_closed()
        self.trans.close()
        self.server = None
        self.closed = True
        if self._stopped is not None:
            self._stopped.set()

    async def close(self) -> None:
        await self.aclose()

    def serve(self) -> None:
        """Blocking: serve on a new event loop (uvloop where installed) until cancelled."""
        run(self.serve_forever())

    # --- one connection -----------------------------------------------------------------

    async def handle(self, client: StreamHandler) -> None:
        """Serve one connection: read a frame, answer it, repeat until it closes."""
        reader: asyncio.StreamReader = client.reader
        writer: asyncio.StreamWriter = client.writer
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(peer=_peer_name(writer), writer=writer)
        self._connections[task] = connection
        self.accepted_connections += 1
        _set_nodelay(writer)
        try:
            await self._serve_connection(reader, writer, connection)
        except asyncio.CancelledError:
            # aclose() cancels idle connections.  End the task normally: Python 3.11's
            # StreamReaderProtocol calls task.exception() on it, which logs a cancelled task
            # as an "Exception in callback".
            pass
        except Exception:
            logger.exception("connection from %s failed", connection.peer)
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection: _Connection
    ) -> None:
        # If the client hangs up while its request is processed, the request is cancelled
        # instead of running on for nobody: the protocol says when the peer has gone.  The
        # request runs in this task (a task of its own would cost more than a tiny request).
        protocol = writer.transport.get_protocol()
        task = asyncio.current_task()
        assert isinstance(protocol, _StreamProtocol)
        assert task is not None
        hung_up = False

        def hang_up() -> None:  # EOF, then the connection lost: once is enough
            nonlocal hung_up
            if not hung_up:
                hung_up = True
                task.cancel()

        while not self._closing:
            connection.busy = False
            try:
                if self.idle_timeout_s is None:
                    header = await reader.readexactly(4)
                else:
                    header = await asyncio.wait_for(reader.readexactly(4), self.idle_timeout_s)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the peer closed (the normal end of a connection)
            except TimeoutError:
                logger.info(
                    "closing connection from %s: idle for %.1f s", connection.peer,
                    self.idle_timeout_s,
                )  # fmt: skip
                return
            connection.busy = True
            size = int.from_bytes(header, "big", signed=True)
            # Check before reading anything more (DESIGN.md, Known hazards: huge headers).
            if size < 0 or size > self.max_frame_bytes:
                logger.warning(
                    "closing connection from %s: frame of %d bytes announced, limit is %d "
                    "(max_frame_bytes)", connection.peer, size, self.max_frame_bytes,
                )  # fmt: skip
                return
            try:
                body = await reader.readexactly(size)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if reader.at_eof():  # gone already, with its request in hand
                logger.info("client %s hung up; its request was not run", connection.peer)
                return
            protocol.on_gone = hang_up
            try:
                reply = await self._process(body, connection.peer)
            except asyncio.CancelledError:
                if not hung_up:
                    raise
                task.uncancel()  # our own cancellation, handled here
                logger.info("client %s hung up; its request was cancelled", connection.peer)
                return
            finally:
                protocol.on_gone = None
            if reply is None:
                return
            try:
                writer.writelines((len(reply).to_bytes(4, "big"), reply))
                await writer.drain()
            except ConnectionError:
                return

    # --- one message ----------------------------------------------------------------------

    async def _process(self, body: bytes, peer: str) -> bytes | None:
        """The framed reply to one request body; None = undecodable, close the connection."""
        protocol = message_reader(body)
        try:
            name, message_type, seqid = protocol.read_message_begin()
        except Exception as exc:
            logger.warning("closing connection from %s: undecodable frame (%s)", peer, exc)
            return None
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        if message_type != TMessageType.CALL:
            return _application_error(
                name, seqid, TApplicationException.INVALID_MESSAGE_TYPE,
                f"expected a call, got message type {message_type}",
            )  # fmt: skip
        method = self._methods.get(name)
        if method is None:
            return _application_error(
                name, seqid, TApplicationException.UNKNOWN_METHOD, f"unknown method {name!r}"
            )
        args_class, result_class, arg_names = method
        try:
            # Before any decode: thriftpy2's can spin for seconds on a small forged frame
            # (engine/transport/frame_guard.py; DESIGN.md, Known hazards).
            check_call(body, args_class)
        except FrameRejected as exc:
            logger.warning("refused a %s call from %s: %s", name, peer, exc)
            return _application_error(
                name, seqid, TApplicationException.PROTOCOL_ERROR,
                f"cannot decode the arguments of {name}: {exc}",
            )  # fmt: skip
        args = args_class()
        try:
            protocol.read_struct(args)
        except Exception as exc:
            logger.warning("bad %s call from %s: %s: %s", name, peer, type(exc).__name__, exc)
            return _application_error(
                name, seqid, TApplicationException.PROTOCOL_ERROR,
                f"cannot decode the arguments of {name}: {exc}",
            )  # fmt: skip
        result = result_class()
        try:
            answer = getattr(self.handler, name)(**{a: getattr(args, a) for a in arg_names})
            if inspect.isawaitable(answer):
                answer = await answer
            result.success = answer
        except Exception as exc:
            declared = _declared_field(result, exc)
            if declared is None:
                return _undeclared(name, seqid, exc)
            setattr(result, declared, exc)
        try:
            return encode_message(name, TMessageType.REPLY, seqid, result)
        except Exception as exc:
            logger.exception("cannot encode the reply of %s", name)
            return _application_error(
                name, seqid, TApplicationException.INTERNAL_ERROR,
                f"cannot encode the reply of {name}: {exc}",
            )  # fmt: skip


def _methods(service: Any) -> dict[str, tuple[Any, Any, tuple[str, ...]]]:
    """Method name -> its arguments' class, its result's class, its argument names."""
    table = {}
    for name in service.thrift_services:
        args_class = getattr(service, f"{name}_args")
        arg_names = tuple(spec[1] for spec in args_class.thrift_spec.values())
        table[name] = (args_class, getattr(service, f"{name}_result"), arg_names)
    return table


def _declared_field(result: Any, exc: Exception) -> str | None:
    for field_id, spec in result.thrift_spec.items():
        if field_id != 0 and isinstance(exc, spec[2]):
            return str(spec[1])
    return None


def _undeclared(name: str, seqid: int, exc: Exception) -> bytes:
    if isinstance(exc, TException):
        # An IDL exception the method does not declare (map_to_wire already logged any
        # traceback): pass its message on.
        message = str(getattr(exc, "message", None) or exc)
    else:
        # A handler that did not map its errors: log the traceback here, once.
        logger.exception("undeclared error in %s", name)
        message = f"internal error: {type(exc).__name__}: {exc}"
    return _application_error(name, seqid, TApplicationException.INTERNAL_ERROR, message)


def _application_error(name: str, seqid: int, kind: int, message: str) -> bytes:
    error = TApplicationException(type=kind, message=message)
    return encode_message(name, TMessageType.EXCEPTION, seqid, error)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where installed, else on asyncio's loop.

    Installing uvloop is the caller's choice made here, never a side effect of an import.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


__all__ = ["ThriftServer", "run"]
