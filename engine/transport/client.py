"""Python clients of a dagserve server: :class:`Client` (threads) and :class:`AsyncClient`.

Both speak framed binary Thrift over pooled TCP connections (TCP_NODELAY), encode and decode
with thriftpy2's Cython codec (``engine.transport.codec``), and raise OUR errors:

- the IDL exceptions come back as ``model_plugins.errors`` classes (``InvalidRequest`` with
  its ``field``, ``Overloaded`` with ``retry_after_ms``, ...);
- a ``TApplicationException`` (unknown method, an error the method does not declare) as
  :class:`engine.errors.ApplicationError`;
- a connection that cannot be made or breaks as :class:`engine.errors.ClientConnectionError`
  (a ``ConnectionError``; :class:`~engine.errors.ClientTimeout` after ``timeout_s``).

A connection that broke, timed out or answered garbage is closed, never put back in the pool.
A typed error leaves the connection usable.  A client of one ``host:port`` retries nothing.

``targets=["host:port", ...]`` or ``targets="dns:///name:port"`` makes a client that balances
over replicas (:mod:`engine.transport.balancer`: least outstanding of two random choices,
ejection with backoff, DNS followed): a call whose replica died before answering is retried
once on another, ``Overloaded`` moves it to a replica with room.  Each replica has its own
pool of connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import select
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

from thriftpy2.thrift import TApplicationException, TMessageType

from dag.pipeline import PipelineDescription
from engine.errors import ApplicationError, ClientConnectionError, ClientTimeout
from engine.runtime.types import HealthReport, InferenceResult
from engine.transport.balancer import (
    Attempts,
    Balancer,
    Replica,
    ReplicaStats,
    Resolver,
    Targets,
    args_timeout,
    call_deadline_s,
    shorten_deadline,
)
from engine.transport.codec import (
    decode_tensors,
    encode_message,
    encode_tensor,
    health_from_wire,
    message_reader,
    pipeline_from_wire,
)
from engine.transport.wire_errors import from_wire
from idl import dagserve_thrift
from model_plugins._host.wire import JOIN_BELOW
from model_plugins.errors import DagserveError, InvalidRequest
from model_plugins.specs import as_array

#: largest reply frame a client accepts (replies carry whole batches of outputs)
MAX_REPLY_BYTES = 1024 * 1024 * 1024

_SERVICE = dagserve_thrift.InferenceService


class _BadReply(Exception):
    """The reply cannot be trusted: the connection must be closed."""


def _infer_args(
    pipeline: str,
    inputs: Mapping[str, Any],
    *,
    version: str | None,
    timeout_ms: int | None,
    outputs: Sequence[str] | None,
    request_id: str | None,
    headers: Mapping[str, str] | None,
) -> Any:
    tensors = {}
    for name, value in inputs.items():
        try:
            tensors[name] = encode_tensor(as_array(value))
        except (TypeError, ValueError) as exc:
            msg = f"input {name!r}: {exc}"
            raise InvalidRequest(msg, field=f"inputs.{name}") from exc
    request = dagserve_thrift.InferRequest(
        pipeline=pipeline,
        inputs=tensors,
        request_id=request_id,
        timeout_ms=timeout_ms,
        outputs=list(outputs) if outputs is not None else None,
        version=version,
        headers=dict(headers) if headers is not None else None,
    )
    return _SERVICE.infer_args(request=request)


def _infer_result(response: Any) -> InferenceResult:
    # The engine's own result type: fixed-width outputs are read-only views on the reply, and
    # ``version`` is "" from a server that does not say which version answered.
    return InferenceResult(
        request_id=response.request_id,
        outputs=decode_tensors(response.outputs, "outputs"),
        version=response.version or "",
        node_latency_us=dict(response.node_latency_us or {}),
    )


def _unpack_reply(frame: bytes | bytearray, name: str, seqid: int, pipeline: str | None) -> Any:
    """The ``success`` value of a reply; raises our typed error, or _BadReply."""
    protocol = message_reader(frame)
    try:
        reply_name, message_type, reply_seqid = protocol.read_message_begin()
        if reply_name != name or reply_seqid != seqid:
            msg = f"reply to {reply_name!r} #{reply_seqid} for call {name!r} #{seqid}"
            raise _BadReply(msg)
        if message_type == TMessageType.EXCEPTION:
            app_error = TApplicationException()
            protocol.read_struct(app_error)
            raise from_wire(app_error)
        result = getattr(_SERVICE, f"{name}_result")()
        protocol.read_struct(result)
    except (DagserveError, _BadReply):
        raise
    except Exception as exc:
        msg = f"undecodable reply: {type(exc).__name__}: {exc}"
        raise _BadReply(msg) from exc
    if result.success is not None:
        return result.success
    for field_id, spec in result.thrift_spec.items():
        error = getattr(result, spec[1])
        if field_id != 0 and error is not None:
            raise from_wire(error, pipeline=pipeline)
    msg = f"{name} answered no result"
    raise ApplicationError(msg, kind=TApplicationException.MISSING_RESULT)


def tls_context(
    cafile: str | None = None, certfile: str | None = None, keyfile: str | None = None
) -> ssl.SSLContext:
    """A client TLS context: trust ``cafile`` (else the system's CAs), and present
    ``certfile``/``keyfile`` when the server requires client certificates (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context


class _Endpoint:
    """What both clients share: address, settings, seqids."""

    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        pool_size: int,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if timeout_s <= 0:
            msg = f"timeout_s must be > 0 (got {timeout_s})"
            raise ValueError(msg)
        if pool_size < 1:
            msg = f"pool_size must be >= 1 (got {pool_size})"
            raise ValueError(msg)
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self.pool_size = pool_size
        #: TLS to the server (``tls_context()`` makes one); None: plain TCP
        self.ssl_context = ssl_context
        # next() on itertools.count is atomic under the GIL: safe across threads
        self._seqids = itertools.count(1)
        #: the replicas of ``targets``; None: one ``host:port``
        self._balancer: Balancer[Any] | None = None
        #: the name TLS checks the server's certificate against (None: ``host``); a replica
        #: of ``dns:///name:port`` is checked against ``name``, not its pod's address
        self.server_hostname: str | None = None

    def _next_seqid(self) -> int:
        return next(self._seqids) % 2**31

    def _connection_error(self, what: str, exc: BaseException) -> ClientConnectionError:
        where = f"{self.host}:{self.port}"
        if isinstance(exc, TimeoutError):
            return ClientTimeout(
                f"{where}: no answer to {what} within {self.timeout_s} s", self.host, self.port
            )
        msg = f"{where}: {what} failed: {exc}"
        return ClientConnectionError(msg, self.host, self.port, sent=what != "connect")

    def __repr__(self) -> str:
        if self._balancer is not None:
            return f"{type(self).__name__}(targets={str(self._balancer.targets)!r})"
        return f"{type(self).__name__}({self.host!r}, {self.port})"

    def _balance(
        self,
        targets: str | Sequence[str] | None,
        make: Any,
        close: Any,
        resolve_interval_s: float,
        resolver: Resolver | None,
    ) -> None:
        if targets is not None:
            parsed = Targets.parse(targets)

            def replica(host: str, port: int) -> Any:
                client = make(host, port)
                client.server_hostname = parsed.dns[0] if parsed.dns is not None else None
                return client

            self._balancer = Balancer(
                parsed, replica, close, resolve_interval_s=resolve_interval_s, resolver=resolver
            )
            self.host, self.port = str(parsed), 0

    def replica_stats(self) -> dict[str, ReplicaStats]:
        """What this client saw of each replica, by ``"host:port"`` (empty without
        ``targets``): calls answered, in flight, failed for want of a connection, refused
        with ``Overloaded``, and whether it is ejected now."""
        return {} if self._balancer is None else self._balancer.replica_stats()

    def _attempts(self, args: Any) -> Attempts[Any]:
        assert self._balancer is not None
        return self._balancer.start(call_deadline_s(args_timeout(args), self.timeout_s))


# --- synchronous ----------------------------------------------------------------------------


class _SyncConnection:
    def __init__(
        self,
        host: str,
        port: int,
        timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is not None:
            try:
                sock = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            except (ssl.SSLError, OSError):
                sock.close()
                raise
        self.sock = sock

    def roundtrip(self, payload: bytes) -> bytearray:
        header = len(payload).to_bytes(4, "big")
        # Small payloads go out in one send with their header (one packet under TCP_NODELAY);
        # larger ones are sent after it rather than copied behind it.
        if len(payload) < JOIN_BELOW:
            self.sock.sendall(header + payload)
        else:
            self.sock.sendall(header)
            self.sock.sendall(payload)
        size = int.from_bytes(self._recv_exactly(4), "big", signed=True)
        if not 0 <= size <= MAX_REPLY_BYTES:
            msg = f"reply frame of {size} bytes (limit {MAX_REPLY_BYTES})"
            raise _BadReply(msg)
        return self._recv_exactly(size)

    def _recv_exactly(self, size: int) -> bytearray:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            count = self.sock.recv_into(view[got:])
            if count == 0:
                msg = "connection closed by the server"
                raise ConnectionError(msg)
            got += count
        return buffer

    def is_stale(self) -> bool:
        # An idle pooled connection must have nothing to read; EOF (the server closed it)
        # or stray bytes both make it unusable.
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        self.sock.close()


class Client(_Endpoint):
    """A thread-safe, synchronous client with a pool of connections.

    At most ``pool_size`` idle connections are kept (per replica with ``targets``); more
    threads than that may call at once (each extra call opens a connection, closed after it).

    ``targets`` (a list of ``"host:port"``, or ``"dns:///name:port"`` resolved again every
    ``resolve_interval_s`` by ``resolver``, ``socket.getaddrinfo`` by default) balances over
    replicas instead of calling ``host:port``; see :mod:`engine.transport.balancer`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        *,
        timeout_s: float = 30.0,
        pool_size: int = 8,
        ssl_context: ssl.SSLContext | None = None,
        targets: str | Sequence[str] | None = None,
        resolve_interval_s: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        super().__init__(host, port, timeout_s, pool_size, ssl_context)
        self._idle: list[_SyncConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._balance(
            targets,
            lambda h, p: Client(
                h, p, timeout_s=timeout_s, pool_size=pool_size, ssl_context=ssl_context
            ),
            Client.close,
            resolve_interval_s,
            resolver,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection; the client cannot be used afterwards."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        if self._balancer is not None:
            for replica in self._balancer.close():
                replica.close()

    def infer(
        self,
        pipeline: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        timeout_ms: int | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> InferenceResult:
        """Run ``pipeline`` on ``inputs`` (arrays, or lists that ``np.asarray`` takes).

        Returns the engine's :class:`~engine.runtime.types.InferenceResult`; its fixed-width
        outputs are read-only views on the reply.
        """
        args = _infer_args(
            pipeline, inputs, version=version, timeout_ms=timeout_ms, outputs=outputs,
            request_id=request_id, headers=headers,
        )  # fmt: skip
        return _infer_result(self._call("infer", args, pipeline))

    def list_pipelines(self) -> list[PipelineDescription]:
        """Every served pipeline."""
        infos = self._call("list_pipelines", _SERVICE.list_pipelines_args())
        return [pipeline_from_wire(info) for info in infos]

    def describe(self, name: str) -> PipelineDescription:
        """One pipeline; raises ``PipelineNotFound``."""
        info = self._call("describe", _SERVICE.describe_args(pipeline=name), name)
        return pipeline_from_wire(info)

    def health(self) -> HealthReport:
        """Whether the server is live and ready."""
        return health_from_wire(self._call("health", _SERVICE.health_args()))

    def _acquire(self) -> _SyncConnection:
        with self._lock:
            if self._closed:
                msg = f"{self!r} is closed"
                raise RuntimeError(msg)
            while self._idle:
                connection = self._idle.pop()
                if not connection.is_stale():
                    return connection
                connection.close()
        try:
            return _SyncConnection(
                self.host, self.port, self.timeout_s, self.ssl_context, self.server_hostname
            )
        except OSError as exc:
            error = self._connection_error("connect", exc)
            raise error from exc

    def _release(self, connection: _SyncConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.pool_size:
                self._idle.append(connection)
                return
        connection.close()

    def _call(self, name: str, args: Any, pipeline: str | None = None) -> Any:
        if self._balancer is not None:
            return self._call_balanced(name, args, pipeline)
        seqid = self._next_seqid()
        payload = encode_message(name, TMessageType.CALL, seqid, args)
        connection = self._acquire()
        try:
            frame = connection.roundtrip(payload)
            value = _unpack_reply(frame, name, seqid, pipeline)
        except DagserveError:
            self._release(connection)  # a typed answer: the connection is fine
            raise
        except (OSError, _BadReply) as exc:
            connection.close()
            raise self._connection_error(name, exc) from exc
        except BaseException:
            connection.close()
            raise
        self._release(connection)
        return value

    def _call_balanced(self, name: str, args: Any, pipeline: str | None) -> Any:
        balancer = self._balancer
        assert balancer is not None
        if balancer.resolution_due():
            assert balancer.targets.dns is not None
            try:
                balancer.update(balancer.resolver(*balancer.targets.dns))
            except Exception as exc:  # any resolver's failure: keep the last set, say why
                balancer.resolve_failed(exc)
        attempts = self._attempts(args)
        while True:
            replica: Replica[Client] = attempts.pick()
            try:
                if balancer.needs_check(replica):
                    if not _ready(replica.client):
                        msg = f"{replica.name}: not ready, or no answer to health()"
                        attempts.failed(replica, ClientConnectionError(msg, sent=False), sent=False)
                        continue
                    balancer.checked(replica)
                if len(attempts.tried) > 1:
                    shorten_deadline(args, attempts.remaining_s())
                value = replica.client._call(name, args, pipeline)
            except BaseException as exc:
                attempts.failed(replica, exc, sent=getattr(exc, "sent", True))
            else:
                attempts.answered(replica)
                return value
            finally:
                attempts.done(replica)


def _ready(client: Client) -> bool:
    """A replica back from ejection takes calls again once ``health()`` says ready."""
    try:
        return bool(client.health().ready)
    except DagserveError:
        return False


# --- asyncio --------------------------------------------------------------------------------


class _AsyncConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> _AsyncConnection:
        reader, writer = await asyncio.open_connection(
            host,
            port,
            limit=1024 * 1024,
            ssl=ssl_context,
            server_hostname=(server_hostname or host) if ssl_context is not None else None,
        )
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def roundtrip(self, payload: bytes) -> bytes:
        self.writer.writelines((len(payload).to_bytes(4, "big"), payload))
        await self.writer.drain()
        size = int.from_bytes(await self.reader.readexactly(4), "big", signed=True)
        if not 0 <= size <= MAX_REPLY_BYTES:
            msg = f"reply frame of {size} bytes (limit {MAX_REPLY_BYTES})"
            raise _BadReply(msg)
        return await self.reader.readexactly(size)

    def is_stale(self) -> bool:
        return self.writer.is_closing() or self.reader.at_eof()

    def close(self) -> None:
        self.writer.close()


class AsyncClient(_Endpoint):
    """An asyncio client with a pool of connections; use it from one event loop.

    Concurrent calls each take their own connection; at most ``pool_size`` idle ones are
    kept (per replica with ``targets``).  ``timeout_s`` bounds each call (connect included).

    ``targets``, ``resolve_interval_s`` and ``resolver`` balance over replicas as
    :class:`Client`'s do (the resolver runs in the loop's default executor).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 9090,
        *,
        timeout_s: float = 30.0,
        pool_size: int = 8,
        ssl_context: ssl.SSLContext | None = None,
        targets: str | Sequence[str] | None = None,
        resolve_interval_s: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        super().__init__(host, port, timeout_s, pool_size, ssl_context)
        self._idle: list[_AsyncConnection] = []
        self._closed = False
        self._balance(
            targets,
            lambda h, p: AsyncClient(
                h, p, timeout_s=timeout_s, pool_size=pool_size, ssl_context=ssl_context
            ),
            AsyncClient._close_now,
            resolve_interval_s,
            resolver,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every pooled connection; the client cannot be used afterwards."""
        for connection in self._close_now():
            with contextlib.suppress(OSError):
                await connection.writer.wait_closed()
        if self._balancer is not None:
            for replica in self._balancer.close():
                await replica.aclose()

    def _close_now(self) -> list[_AsyncConnection]:
        # closes without waiting: a replica that left the resolution is closed from sync code
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()
        return idle

    async def infer(
        self,
        pipeline: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        timeout_ms: int | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> InferenceResult:
        """Run ``pipeline`` on ``inputs`` (arrays, or lists that ``np.asarray`` takes).

        Returns the engine's :class:`~engine.runtime.types.InferenceResult`; its fixed-width
        outputs are read-only views on the reply.
        """
        args = _infer_args(
            pipeline, inputs, version=version, timeout_ms=timeout_ms, outputs=outputs,
            request_id=request_id, headers=headers,
        )  # fmt: skip
        return _infer_result(await self._call("infer", args, pipeline))

    async def list_pipelines(self) -> list[PipelineDescription]:
        """Every served pipeline."""
        infos = await self._call("list_pipelines", _SERVICE.list_pipelines_args())
        return [pipeline_from_wire(info) for info in infos]

    async def describe(self, name: str) -> PipelineDescription:
        """One pipeline; raises ``PipelineNotFound``."""
        info = await self._call("describe", _SERVICE.describe_args(pipeline=name), name)
        return pipeline_from_wire(info)

    async def health(self) -> HealthReport:
        """Whether the server is live and ready."""
        return health_from_wire(await self._call("health", _SERVICE.health_args()))

    async def _acquire(self) -> _AsyncConnection:
        if self._closed:
            msg = f"{self!r} is closed"
            raise RuntimeError(msg)
        while self._idle:
            connection = self._idle.pop()
            if not connection.is_stale():
                return connection
            connection.close()
        try:
            return await _AsyncConnection.open(
                self.host, self.port, self.ssl_context, self.server_hostname
            )
        except OSError as exc:
            error = self._connection_error("connect", exc)
            raise error from exc

    def _release(self, connection: _AsyncConnection) -> None:
        if not self._closed and len(self._idle) < self.pool_size:
            self._idle.append(connection)
        else:
            connection.close()

    async def _call(self, name: str, args: Any, pipeline: str | None = None) -> Any:
        if self._balancer is not None:
            return await self._call_balanced(name, args, pipeline)
        seqid = self._next_seqid()
        payload = encode_message(name, TMessageType.CALL, seqid, args)
        connection: _AsyncConnection | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                connection = await self._acquire()
                frame = await connection.roundtrip(payload)
            value = _unpack_reply(frame, name, seqid, pipeline)
        except DagserveError:
            if connection is not None:
                self._release(connection)
            raise
        except (OSError, EOFError, _BadReply) as exc:
            # TimeoutError is an OSError; IncompleteReadError an EOFError
            if connection is not None:
                connection.close()
            raise self._connection_error(name, exc) from exc
        except BaseException:
            # cancelled mid-call: the reply may still arrive, so the connection is unusable
            if connection is not None:
                connection.close()
            raise
        self._release(connection)
        return value

    async def _call_balanced(self, name: str, args: Any, pipeline: str | None) -> Any:
        balancer = self._balancer
        assert balancer is not None
        if balancer.resolution_due():
            assert balancer.targets.dns is not None
            loop = asyncio.get_running_loop()
            try:
                found = await loop.run_in_executor(None, balancer.resolver, *balancer.targets.dns)
            except Exception as exc:  # any resolver's failure: keep the last set, say why
                balancer.resolve_failed(exc)
            else:
                balancer.update(found)
        attempts = self._attempts(args)
        while True:
            replica: Replica[AsyncClient] = attempts.pick()
            try:
                if balancer.needs_check(replica):
                    if not await _aready(replica.client):
                        msg = f"{replica.name}: not ready, or no answer to health()"
                        attempts.failed(replica, ClientConnectionError(msg, sent=False), sent=False)
                        continue
                    balancer.checked(replica)
                if len(attempts.tried) > 1:
                    shorten_deadline(args, attempts.remaining_s())
                value = await replica.client._call(name, args, pipeline)
            except BaseException as exc:
                attempts.failed(replica, exc, sent=getattr(exc, "sent", True))
            else:
                attempts.answered(replica)
                return value
            finally:
                attempts.done(replica)


async def _aready(client: AsyncClient) -> bool:
    try:
        return bool((await client.health()).ready)
    except DagserveError:
        return False


__all__ = ["AsyncClient", "Client", "MAX_REPLY_BYTES"]
