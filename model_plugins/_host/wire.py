"""Framing of worker messages: pickle protocol 5 with out-of-band buffers.

A numpy array's payload never goes through pickle: pickle writes a small header and hands
each contiguous buffer to us, and we send the buffers as they are, after the header::

    u32 header length | u32 buffer count | u64 length of each buffer | header | buffers...

The receiver reads each buffer into its own bytearray and unpickles with ``buffers=``, so the
arrays it gets are views on those bytearrays: one copy from the kernel, none in Python.
(``benchmarks/worker_crossing.py`` measures the round trip.)
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_PREFIX = struct.Struct("<II")
_LENGTH = struct.Struct("<Q")


def encode(message: Any) -> list[bytes | memoryview]:
    """The pieces of one frame, ready for ``sendmsg`` / ``writelines`` (no payload copies)."""
    buffers: list[pickle.PickleBuffer] = []
    header = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    lengths = b"".join(_LENGTH.pack(r.nbytes) for r in raws)
    return [_PREFIX.pack(len(header), len(raws)) + lengths, header, *raws]


def send(sock: socket.socket, message: Any) -> None:
    """Send one frame on a blocking socket (the caller serialises concurrent senders)."""
    pieces = [memoryview(p).cast("B") for p in encode(message)]
    while pieces:
        sent = sock.sendmsg(pieces)
        while pieces and sent >= pieces[0].nbytes:
            sent -= pieces[0].nbytes
            pieces.pop(0)
        if pieces and sent:
            pieces[0] = pieces[0][sent:]


def _recv_exactly(sock: socket.socket, size: int) -> bytearray:
    data = bytearray(size)
    view = memoryview(data)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            msg = "peer closed the connection"
            raise EOFError(msg)
        got += n
    return data


def recv(sock: socket.socket) -> Any:
    """Receive one frame on a blocking socket.

    Raises:
        EOFError: the peer closed the socket.
    """
    header_length, count = _PREFIX.unpack(_recv_exactly(sock, _PREFIX.size))
    lengths = _recv_exactly(sock, _LENGTH.size * count)
    sizes = [_LENGTH.unpack_from(lengths, i * _LENGTH.size)[0] for i in range(count)]
    header = _recv_exactly(sock, header_length)
    buffers = [_recv_exactly(sock, size) for size in sizes]
    return pickle.loads(header, buffers=buffers)


#: frames below this are sent as one joined buffer (one syscall beats several small ones);
#: the Thrift clients (``engine.transport.client``) join their frames below it too
JOIN_BELOW = 64 * 1024
#: how much a reader asks the kernel for at once when it needs a few bytes
_CHUNK = 64 * 1024


class FrameReader:
    """Reads frames from a non-blocking socket through a small buffer.

    Small reads (prefix, lengths, header, small tensors) are served from one ``recv`` of up to
    64 KiB; a large buffer is read straight into a bytearray of its final size.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self._buffer = bytearray()
        self._chunk = bytearray(_CHUNK)

    async def _fill(self) -> None:
        n = await self.loop.sock_recv_into(self.sock, self._chunk)
        if n == 0:
            msg = "peer closed the connection"
            raise EOFError(msg)
        self._buffer += memoryview(self._chunk)[:n]

    async def read_exactly(self, size: int) -> bytearray:
        if size <= _CHUNK:
            while len(self._buffer) < size:
                await self._fill()
            data = self._buffer[:size]
            del self._buffer[:size]
            return data
        # a large buffer: take what is buffered, then read the rest in place
        data = bytearray(size)
        view = memoryview(data)
        got = min(len(self._buffer), size)
        view[:got] = self._buffer[:got]
        del self._buffer[:got]
        while got < size:
            n = await self.loop.sock_recv_into(self.sock, view[got:])
            if n == 0:
                msg = "peer closed the connection"
                raise EOFError(msg)
            got += n
        return data

    async def read(self) -> Any:
        """Receive one frame.

        Raises:
            EOFError: the peer closed the socket.
        """
        header_length, count = _PREFIX.unpack(await self.read_exactly(_PREFIX.size))
        lengths = await self.read_exactly(_LENGTH.size * count)
        sizes = [_LENGTH.unpack_from(lengths, i * _LENGTH.size)[0] for i in range(count)]
        header = await self.read_exactly(header_length)
        buffers = [await self.read_exactly(size) for size in sizes]
        return pickle.loads(header, buffers=buffers)


async def write(loop: asyncio.AbstractEventLoop, sock: socket.socket, message: Any) -> None:
    """Send one frame on a non-blocking socket (the caller serialises concurrent writers)."""
    pieces = encode(message)
    if sum(memoryview(p).nbytes for p in pieces) < JOIN_BELOW:
        await loop.sock_sendall(sock, b"".join(pieces))
        return
    for piece in pieces:
        await loop.sock_sendall(sock, piece)


__all__ = ["JOIN_BELOW", "FrameReader", "encode", "recv", "send", "write"]
