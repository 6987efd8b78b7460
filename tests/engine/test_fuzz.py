"""Fuzzing the decoding path: whatever arrives, a typed error or a closed connection, never a
crash, and the server goes on serving everyone else."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.transport.client import Client, _infer_args
from engine.transport.codec import decode_tensor, encode_message
from idl import dagserve_thrift
from model_plugins.errors import InvalidRequest
from tests.serving import PIPELINES, serving

DIMS = st.one_of(st.integers(-3, 6), st.integers(2**31, 2**63 - 1), st.integers(-(2**63), -(2**31)))
TENSORS = st.builds(
    dagserve_thrift.Tensor,
    dtype=st.one_of(st.integers(-2, 12), st.none()),
    shape=st.one_of(st.none(), st.lists(DIMS, max_size=6)),
    data=st.one_of(st.none(), st.binary(max_size=96)),
    elements=st.one_of(st.none(), st.lists(st.binary(max_size=8), max_size=12)),
)


@settings(max_examples=3000, deadline=None)
@given(TENSORS)
def test_any_tensor_decodes_or_is_an_invalid_request(tensor):
    field = None
    try:
        array = decode_tensor(tensor, "inputs.x")
    except InvalidRequest as error:  # the only exception allowed, and it names the field
        field = error.field or ""
    if field is not None:
        assert field.startswith("inputs.x")
    else:
        assert isinstance(array, np.ndarray)
        assert array.ndim >= 1


@pytest.fixture(scope="module")
def server():
    with serving([PIPELINES / "calc.yaml"], max_frame_bytes=1 << 20) as thread:
        yield thread


def _valid_body() -> bytes:
    args = _infer_args(
        "calc", {"x": np.ones((1, 3), np.float32)}, version=None, timeout_ms=None,
        outputs=None, request_id="fuzz", headers=None,
    )  # fmt: skip
    from thriftpy2.thrift import TMessageType

    return encode_message("infer", TMessageType.CALL, 7, args)


VALID = _valid_body()


def _send(port: int, frame: bytes) -> bytes:
    """Send raw bytes; return what the server answered before closing or going quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.settimeout(2)
        sock.sendall(frame)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


MUTATIONS = st.one_of(
    st.binary(max_size=256).map(lambda b: struct.pack("!i", len(b)) + b),  # garbage bodies
    st.binary(max_size=64),  # garbage, no framing
    st.tuples(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8)).map(
        lambda t: struct.pack("!i", len(VALID)) + VALID[: t[0]] + t[1] + VALID[t[0] + len(t[1]) :]
    ),  # a valid request with a few bytes overwritten
    st.integers(0, len(VALID)).map(lambda n: struct.pack("!i", len(VALID)) + VALID[:n]),  # cut
    st.integers(1 << 20, 2**31 - 1).map(lambda n: struct.pack("!i", n)),  # over the frame limit
)


@pytest.mark.e2e
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(MUTATIONS)
def test_malformed_frames_never_hurt_other_clients(server, frame):
    _send(server.port, frame)
    with Client("127.0.0.1", server.port, timeout_s=10) as client:
        assert (
            client.infer("calc", {"x": np.ones((1, 3), np.float32)}).outputs["doubled"][0, 0] == 2
        )
