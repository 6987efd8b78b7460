"""engine.transport.frame_guard: no frame's decode may cost more than its length allows.

thriftpy2 0.7.1 skips a container of a non-wire element type by looping ``size`` times
without reading (engine/transport/frame_guard.py); these tests never hand such a frame to an
unguarded decoder with a large size, since that is the stall itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO

import numpy as np
import pytest
from thriftpy2.protocol.binary import TBinaryProtocol
from thriftpy2.thrift import TApplicationException, TMessageType
from thriftpy2.transport.memory import TMemoryBuffer

from engine.transport import frame_guard
from engine.transport.client import Client, _infer_args
from engine.transport.codec import encode_message, message_reader
from engine.transport.frame_guard import MAX_DEPTH, MAX_SKIPPED_VALUES, FrameRejected, check_call
from idl import dagserve_thrift
from tests.engine.fake_engine import serving as serving_fake
from tests.serving import PIPELINES, serving

ARGS = dagserve_thrift.InferenceService.infer_args

BOOL, BYTE, DOUBLE, I16, I32, I64 = 2, 3, 4, 6, 8, 10
STRING, STRUCT, MAP, SET, LIST = 11, 12, 13, 14, 15
#: every wire type and the bytes of one small value of it
SAMPLES: dict[int, bytes] = {
    BOOL: b"\x01", BYTE: b"\x07", DOUBLE: bytes(8), I16: bytes(2), I32: bytes(4),
    I64: bytes(8), STRING: struct.pack("!i", 2) + b"ab", STRUCT: b"\x00",
    MAP: struct.pack("!BBi", I32, I32, 0), SET: struct.pack("!Bi", I32, 0),
    LIST: struct.pack("!Bi", I32, 0),
}  # fmt: skip
WIRE_TYPES = sorted(SAMPLES)
#: bytes that are no wire type: STOP, VOID, the holes, thriftpy2's own 16..18, negatives
NOT_WIRE_TYPES = [0, 1, 5, 7, 9, 16, 17, 18, 19, 127, 128, 255]
HUGE = 2**31 - 1


# --- building frames by hand ------------------------------------------------------------


def header(name: bytes = b"infer", seqid: int = 1) -> bytes:
    return (
        struct.pack("!ii", -2147418112 | TMessageType.CALL, len(name))
        + name
        + (struct.pack("!i", seqid))
    )


def field(ftype: int, fid: int, value: bytes) -> bytes:
    return struct.pack("!Bh", ftype, fid) + value


def string(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def list_of(etype: int, size: int, elements: bytes = b"") -> bytes:
    return struct.pack("!Bi", etype, size) + elements


def map_of(ktype: int, vtype: int, size: int, entries: bytes = b"") -> bytes:
    return struct.pack("!BBi", ktype, vtype, size) + entries


def call(*fields: bytes) -> bytes:
    """An infer call whose arguments struct holds ``fields``."""
    return header() + b"".join(fields) + b"\x00"


def in_tensor(ttype: int, value: bytes) -> bytes:
    """``value`` as an undeclared field (9) of the tensor ``inputs["x"]`` of a request."""
    tensor = field(I32, 1, struct.pack("!i", 7)) + field(ttype, 9, value) + b"\x00"
    inputs = map_of(STRING, STRUCT, 1, string(b"x") + tensor)
    return call(field(STRUCT, 1, field(STRING, 1, string(b"calc")) + field(MAP, 2, inputs) + b"\0"))


#: where a container of type T sits in a call: position name -> frame of (T, container)
POSITIONS: dict[str, Callable[[int, bytes], bytes]] = {
    "a field of the arguments": lambda t, c: call(field(t, 9, c)),
    "a field of a struct": lambda t, c: call(field(STRUCT, 9, field(t, 1, c) + b"\0")),
    "an element of a list": lambda t, c: call(field(LIST, 9, list_of(t, 1, c))),
    "a key of a map": lambda t, c: call(field(MAP, 9, map_of(t, BOOL, 1, c + b"\1"))),
    "a value of a map": lambda t, c: call(field(MAP, 9, map_of(BOOL, t, 1, b"\1" + c))),
    "a field of a request's tensor": in_tensor,
}
#: where a bad element type sits in a container
CONTAINER_LIES: dict[str, Callable[[int, int], tuple[int, bytes]]] = {
    "list element type": lambda e, size: (LIST, list_of(e, size)),
    "set element type": lambda e, size: (SET, list_of(e, size)),
    "map key type": lambda e, size: (MAP, map_of(e, I32, size)),
    "map value type": lambda e, size: (MAP, map_of(I32, e, size)),
}


def refusal(frame: bytes) -> FrameRejected:
    started = time.perf_counter()
    with pytest.raises(FrameRejected) as info:
        check_call(frame, ARGS)
    assert time.perf_counter() - started < 0.5
    return info.value


# --- the validator ------------------------------------------------------------------------


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("lie", CONTAINER_LIES)
@pytest.mark.parametrize("etype", NOT_WIRE_TYPES)
def test_a_container_of_a_non_wire_type_is_refused_wherever_it_is(position, lie, etype):
    ctype, container = CONTAINER_LIES[lie](etype, HUGE)
    error = refusal(POSITIONS[position](ctype, container))
    role = lie.split(" ", 1)[1] if lie.startswith("map") else "element type"
    assert f"{role} {etype} is not a wire type" in str(error)
    assert error.what == ("map" if lie.startswith("map") else lie.split()[0])


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("ctype", [LIST, SET, MAP])
@pytest.mark.parametrize("etype", WIRE_TYPES)
@pytest.mark.parametrize("size", [HUGE, -(2**31)])
def test_a_container_whose_size_does_not_fit_the_frame_is_refused(position, ctype, etype, size):
    container = map_of(etype, etype, size) if ctype == MAP else list_of(etype, size)
    error = refusal(POSITIONS[position](ctype, container + SAMPLES[etype]))
    assert ("negative size" if size < 0 else "elements need at least") in str(error)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("ftype", [t for t in NOT_WIRE_TYPES if t != 0])
def test_a_field_of_a_non_wire_type_is_refused(position, ftype):
    # the "container" is a struct holding the bad field
    error = refusal(POSITIONS[position](STRUCT, field(ftype, 3, b"") + b"\0"))
    assert f"type {ftype} is not a wire type" in str(error)


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.parametrize("length", [HUGE, 1000, -1])
def test_a_string_whose_length_does_not_fit_is_refused(position, length):
    error = refusal(POSITIONS[position](STRING, struct.pack("!i", length) + b"ab"))
    assert error.what == "string"


def test_the_refusal_says_what_and_where():
    error = refusal(in_tensor(LIST, list_of(0, HUGE)))
    assert error.path == [
        "field 1 (request)", "field 2 (inputs)", "map value of key 'x'", "field 9",
    ]  # fmt: skip
    assert str(error).startswith(
        "list at field 1 (request) > field 2 (inputs) > map value of key 'x' > field 9: "
        "element type 0 is not a wire type (byte "
    )
    shape = field(LIST, 2, list_of(STRUCT, 3, b"\0\0" + field(MAP, 1, map_of(1, 1, 5)) + b"\0"))
    tensor = field(I32, 1, struct.pack("!i", 7)) + shape + b"\x00"
    frame = call(field(STRUCT, 1, field(MAP, 2, map_of(STRING, STRUCT, 1, string(b"im") + tensor))))
    assert str(refusal(frame)).startswith(
        "map at field 1 (request) > field 2 (inputs) > map value of key 'im' > field 2 (shape)"
        " > list element 2 > field 1: key type 1 is not a wire type"
    )


def test_strings_where_the_idl_declares_another_type_are_refused():
    # thriftpy2 reads string-typed map values as the IDL's type (here Tensor structs), from
    # bytes that a walk along the wire takes for string contents
    forged = string(field(LIST, 9, list_of(0, HUGE)) + b"\0")
    inputs = map_of(STRING, STRING, 1, string(b"x") + forged)
    error = refusal(call(field(STRUCT, 1, field(MAP, 2, inputs) + b"\0")))
    assert "values are strings where the IDL declares struct" in str(error)
    error = refusal(call(field(STRUCT, 1, field(STRING, 4, string(b"12345678")) + b"\0")))
    assert "a string where the IDL declares i64" in str(error)
    assert error.path == ["field 1 (request)", "field 4 (timeout_ms)"]


def nested_lists(depth: int) -> bytes:
    """A list of a list of ... of nothing: ``depth`` levels."""
    inner = list_of(I32, 0)
    for _ in range(depth - 1):
        inner = list_of(LIST, 1, inner)
    return inner


def test_nesting_is_bounded_as_thriftpy2_bounds_it():
    # the arguments struct is level 1
    deepest = call(field(LIST, 9, nested_lists(MAX_DEPTH - 1)))
    check_call(deepest, ARGS)
    protocol = message_reader(deepest)
    protocol.read_message_begin()
    protocol.read_struct(ARGS())  # thriftpy2 does not raise RecursionError either
    error = refusal(call(field(LIST, 9, nested_lists(MAX_DEPTH))))
    assert f"nested more than {MAX_DEPTH} deep" in str(error)
    structs = b"\0"
    for _ in range(MAX_DEPTH):
        structs = field(STRUCT, 1, structs) + b"\0"
    assert "nested" in str(refusal(header() + structs))


def test_skipped_values_are_bounded():
    # the unknown field counts 1, each of its elements 1
    skipped = field(
        LIST, 9, list_of(STRUCT, MAX_SKIPPED_VALUES - 1, b"\0" * (MAX_SKIPPED_VALUES - 1))
    )
    check_call(call(skipped), ARGS)
    over = call(skipped, field(BOOL, 10, b"\1"))
    assert f"more than {MAX_SKIPPED_VALUES} values" in str(refusal(over))
    # fixed-width elements are checked in O(1) and cost nothing
    check_call(call(field(LIST, 9, list_of(I64, 10**6, bytes(8 * 10**6)))), ARGS)


def test_a_truncated_or_headerless_frame_is_refused():
    good = request_bodies()["every field"]
    for cut in (0, 4, 10, 17, 30, len(good) - 1):
        refusal(good[:cut])
    refusal(struct.pack("!i", 5) + b"infer" + b"\1" + good[-10:])  # no version header


def request_bodies() -> dict[str, bytes]:
    """Well-formed requests, by name."""
    shapes: dict[str, dict[str, object]] = {
        "tiny": {"x": np.ones((1, 4), np.float32)},
        "image": {"image": np.random.default_rng(0).random((1, 3, 224, 224), np.float32)},
        "strings": {"t": np.array(["héllo", "", "wörld"] * 100, dtype=object)},
        "bytes": {"b": np.array([b"\0\1", b""] * 100, dtype=object)},
        "every field": {
            "x": np.arange(6, dtype=np.int64).reshape(2, 3),
            "f": np.array([True, False]),
        },
    }
    out = {}
    for name, inputs in shapes.items():
        full = name == "every field"
        args = _infer_args(
            "calc", inputs, version="2" if full else None, timeout_ms=50 if full else None,
            outputs=["y", "z"] if full else None, request_id="r1",
            headers={"k": "v", "tenant": "t"} if full else None,
        )  # fmt: skip
        out[name] = encode_message("infer", TMessageType.CALL, 3, args)
    return out


@pytest.mark.timeout(20)
def test_well_formed_requests_pass_and_decode_identically():
    for name, body in request_bodies().items():
        check_call(body, ARGS)
        protocol = message_reader(body)
        assert protocol.read_message_begin()[0] == "infer"
        decoded = ARGS()
        protocol.read_struct(decoded)
        again = encode_message("infer", TMessageType.CALL, 3, decoded)
        assert again == body, name
    check_call(bytearray(body), ARGS)
    check_call(memoryview(body), ARGS)
    refusal(bytearray(call(field(LIST, 9, list_of(0, HUGE)))))
    for method in ("list_pipelines", "health"):
        body = header(method.encode()) + b"\0"
        check_call(body, getattr(dagserve_thrift.InferenceService, f"{method}_args"))
    describe = header(b"describe") + field(STRING, 1, string(b"calc")) + b"\0"
    check_call(describe, dagserve_thrift.InferenceService.describe_args)


def test_the_installed_thriftpy2_still_loops_without_reading():
    """The defect the guard exists for (small sizes only: the large ones are the stall).

    When this fails, thriftpy2 refuses non-wire element types itself
    (docs/upstream/thriftpy2-skip-dos.patch): the guard stays harmless but may go.
    """
    frame = call(field(MAP, 9, map_of(0, 1, 100_000)))  # 100,000 entries from 6 bytes
    protocol = message_reader(frame)
    protocol.read_message_begin()
    protocol.read_struct(ARGS())  # no error: it skipped 200,000 "values" reading nothing
    refusal(frame)


# --- the two walks agree, and what passes decodes in bounded time --------------------------


def random_frames(rng: random.Random, count: int) -> Iterator[bytes]:
    """Call headers with random bytes, valid requests with a few bytes changed, and random
    sequences of plausible fields."""
    valid = list(request_bodies().values())
    valid = [v for v in valid if len(v) < 5000]
    plausible = [0, 1, BOOL, BYTE, DOUBLE, I16, I32, I64, STRING, STRUCT, MAP, SET, LIST]
    for index in range(count):
        kind = index % 3
        if kind == 0:
            yield header() + rng.randbytes(rng.randint(1, 600))
        elif kind == 1:
            body = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 4)):
                body[rng.randrange(17, len(body))] = rng.choice([*plausible, rng.randrange(256)])
            yield bytes(body)
        else:
            parts = [header()]
            for _ in range(rng.randint(1, 30)):
                parts.append(bytes([rng.choice([*plausible, rng.randrange(256)])]))
                if rng.random() < 0.5:
                    sizes = [0, 1, 2, 3, -1, HUGE, 70_000, rng.randrange(-5, 50)]
                    parts.append(struct.pack("!i", rng.choice(sizes)))
                else:
                    parts.append(rng.randbytes(rng.randint(0, 3)))
            yield b"".join(parts)


def _fast_accepts(frame: bytes) -> bool:
    compiled = frame_guard._compiled(ARGS)
    try:
        frame_guard._fast_struct(
            compiled.by_header, compiled.declared, frame, 17, len(frame), 1, [MAX_SKIPPED_VALUES]
        )
    except (frame_guard._Refused, IndexError, struct.error):
        return False
    return True


def _careful_accepts(frame: bytes) -> bool:
    try:
        frame_guard._struct(frame, 17, len(frame), ARGS.thrift_spec, 1, [MAX_SKIPPED_VALUES])
    except FrameRejected:
        return False
    return True


@pytest.mark.timeout(120)
def test_the_fast_and_the_careful_walk_refuse_the_same_frames_and_what_passes_decodes_fast():
    rng = random.Random(20260807)
    accepted, slowest = 0, 0.0
    for frame in random_frames(rng, 30_000):
        fast, careful = _fast_accepts(frame), _careful_accepts(frame)
        assert fast == careful, frame.hex()
        if not fast:
            continue
        accepted += 1
        pure_python = TBinaryProtocol(TMemoryBuffer(frame))  # type: ignore[no-untyped-call]
        for reader in (message_reader(frame), pure_python):
            started = time.perf_counter()
            reader.read_message_begin()
            with contextlib.suppress(Exception):  # decode errors are fine: time is tested
                reader.read_struct(ARGS())
            slowest = max(slowest, time.perf_counter() - started)
    assert accepted > 1000
    assert slowest < 0.25  # bounded by 600 bytes (the unguarded stall is seconds)


# --- the server -----------------------------------------------------------------------------


def read_frame(replies: BinaryIO) -> bytes | None:
    """One framed reply from ``sock.makefile("rb")``, or None when the server closed."""
    size = replies.read(4)
    if len(size) < 4:
        return None
    body = replies.read(struct.unpack("!i", size)[0])
    return body if len(body) == struct.unpack("!i", size)[0] else None


@pytest.mark.e2e
@pytest.mark.timeout(30)
def test_the_server_answers_a_forged_frame_with_a_protocol_error_at_once():
    with serving_fake() as server, socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(5)
        replies = sock.makefile("rb")
        frame = call(field(MAP, 9, map_of(0, 0, HUGE)))
        started = time.monotonic()
        sock.sendall(struct.pack("!i", len(frame)) + frame)
        reply = read_frame(replies)
        assert time.monotonic() - started < 1
        assert reply is not None
        protocol = message_reader(reply)
        assert protocol.read_message_begin() == ("infer", TMessageType.EXCEPTION, 1)
        error = TApplicationException()
        protocol.read_struct(error)
        assert error.type == TApplicationException.PROTOCOL_ERROR
        assert "map at field 9: key type 0 is not a wire type" in str(error.message)
        # the same connection goes on serving
        body = encode_message("infer", TMessageType.CALL, 2, _infer_args(
            "echo", {"x": np.ones((1, 3), np.float32)}, version=None, timeout_ms=None,
            outputs=None, request_id=None, headers=None,
        ))  # fmt: skip
        sock.sendall(struct.pack("!i", len(body)) + body)
        reply = read_frame(replies)
        assert reply is not None
        assert message_reader(reply).read_message_begin() == ("infer", TMessageType.REPLY, 2)


FUZZ_FRAMES = 100_000
FUZZ_CONNECTIONS = 4
FUZZ_WINDOW = 64


@pytest.fixture(scope="module")
def app_server():
    with serving([PIPELINES / "calc.yaml"], max_frame_bytes=1 << 20) as thread:
        yield thread


def _fuzz_connection(port: int, frames: list[tuple[int, bytes]], closed: list[int]) -> int:
    """Send ``(seqid, body)`` frames in windows; check each reply; return frames answered."""
    answered = 0
    pending = list(reversed(frames))
    while pending:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(10)
            replies = sock.makefile("rb")
            while pending:
                window = [pending.pop() for _ in range(min(FUZZ_WINDOW, len(pending)))]
                sock.sendall(b"".join(struct.pack("!i", len(b)) + b for _, b in window))
                for position, (seqid, _) in enumerate(window):
                    reply = read_frame(replies)
                    if reply is None:  # closed: the rest of the window goes again
                        closed.append(seqid)
                        pending.extend(reversed(window[position + 1 :]))
                        break
                    name, kind, answered_seqid = message_reader(reply).read_message_begin()
                    assert (name, answered_seqid) == ("infer", seqid)
                    assert kind in (TMessageType.REPLY, TMessageType.EXCEPTION)
                    answered += 1
                else:
                    continue
                break
    return answered


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_100k_forged_infer_frames_are_all_answered_while_a_good_client_is_served(
    app_server, caplog
):
    caplog.set_level(logging.ERROR, logger="engine.transport.thrift")  # 100k "refused" warnings
    rng = random.Random(1007)
    frames = [
        (seqid, header(seqid=seqid) + rng.randbytes(rng.randint(1, 600)))
        for seqid in range(FUZZ_FRAMES)
    ]
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[BaseException] = []

    def good_client() -> None:
        x = np.ones((1, 3), np.float32)
        with Client("127.0.0.1", app_server.port, timeout_s=5) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    assert client.infer("calc", {"x": x}).outputs["doubled"][0, 0] == 2
                except BaseException as exc:  # recorded, asserted below
                    failures.append(exc)
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)

    good = threading.Thread(target=good_client)
    good.start()
    closed: list[int] = []
    started = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(FUZZ_CONNECTIONS) as pool:
            parts = [
                pool.submit(_fuzz_connection, app_server.port, frames[i::FUZZ_CONNECTIONS], closed)
                for i in range(FUZZ_CONNECTIONS)
            ]
            answered = sum(part.result() for part in parts)  # raises what a thread raised
    finally:
        stop.set()
        good.join(10)
    took = time.monotonic() - started
    slowest = max(latencies, default=0.0)
    print(
        f"{FUZZ_FRAMES} frames in {took:.1f} s; {len(closed)} closed a connection; "
        f"good client: {len(latencies)} calls, slowest {slowest:.3f} s"
    )
    assert answered + len(closed) == FUZZ_FRAMES
    assert failures == []
    assert len(latencies) > 10
    assert max(latencies) < 1.0
