"""Tensor, description and message conversions, without a socket."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from thriftpy2.thrift import TMessageType

from engine.runtime.types import HealthReport
from engine.transport.codec import (
    decode_tensor,
    encode_message,
    encode_tensor,
    health_from_wire,
    health_to_wire,
    message_reader,
    pipeline_from_wire,
    pipeline_to_wire,
)
from idl import dagserve_thrift as t
from model_plugins.errors import InvalidRequest
from model_plugins.specs import NUMPY_DTYPES
from tests.engine.fake_engine import ECHO

FIXED = sorted(NUMPY_DTYPES)


def round_trip(array: np.ndarray) -> np.ndarray:
    """Encode, put through the binary codec (as on the wire), decode."""
    args = t.InferenceService.infer_args(
        request=t.InferRequest(pipeline="p", inputs={"x": encode_tensor(array)})
    )
    protocol = message_reader(encode_message("infer", TMessageType.CALL, 1, args))
    protocol.read_message_begin()
    decoded = t.InferenceService.infer_args()
    protocol.read_struct(decoded)
    return decode_tensor(decoded.request.inputs["x"], "inputs.x")


@pytest.mark.parametrize("dtype", FIXED)
@pytest.mark.parametrize("shape", [(1, 3), (4, 2, 3), (0, 5), (2,)])
def test_fixed_dtypes_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.random(shape) * 100).astype(dtype)
    back = round_trip(array)
    assert back.dtype == np.dtype(dtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, array)


def test_decoded_fixed_tensor_is_a_read_only_view() -> None:
    data = np.arange(6, dtype="<f4").tobytes()
    array = decode_tensor(t.Tensor(dtype=t.DataType.FLOAT32, shape=[2, 3], data=data), "inputs.x")
    assert not array.flags.writeable
    assert array.base is not None  # a view on the received bytes, not a copy
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3))


def test_big_endian_and_strided_arrays_go_out_little_endian_and_contiguous() -> None:
    array = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]
    tensor = encode_tensor(array)
    assert tensor.shape == [3, 2]
    assert tensor.data == np.ascontiguousarray(array, dtype="<i4").tobytes()
    np.testing.assert_array_equal(round_trip(array), array)


def test_strings_round_trip_with_non_ascii() -> None:
    array = np.array([["héllo", "日本語"], ["", "emoji 🙂"]], dtype=object)
    back = round_trip(array)
    assert back.dtype == object
    assert back.shape == (2, 2)
    assert back.tolist() == array.tolist()
    assert all(isinstance(v, str) for v in back.flat)


def test_numpy_unicode_and_bytes_arrays_are_supported() -> None:
    assert round_trip(np.array(["a", "bé"])).tolist() == ["a", "bé"]
    tensor = encode_tensor(np.array([b"ab", b"c"]))
    assert tensor.dtype == t.DataType.BYTES
    assert tensor.elements == [b"ab", b"c"]


def test_bytes_round_trip_with_nuls() -> None:
    array = np.array([b"\x00a\x00", b"", b"\xff\x00"], dtype=object)
    tensor = encode_tensor(array)
    assert tensor.dtype == t.DataType.BYTES
    back = round_trip(array)
    assert back.tolist() == [b"\x00a\x00", b"", b"\xff\x00"]
    assert all(isinstance(v, bytes) for v in back.flat)


def test_empty_string_tensor_round_trips() -> None:
    back = round_trip(np.empty((0, 2), dtype=object))
    assert back.shape == (0, 2)
    assert back.dtype == object


def test_zero_d_array_is_refused() -> None:
    with pytest.raises(ValueError, match="item dimension"):
        encode_tensor(np.array(1.0, dtype=np.float32))


def test_unsupported_numpy_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match="complex"):
        encode_tensor(np.zeros(2, dtype=np.complex64))


def test_mixed_object_array_is_refused() -> None:
    with pytest.raises(TypeError, match="str"):
        encode_tensor(np.array(["a", b"b"], dtype=object))


F32 = t.DataType.FLOAT32
STR = t.DataType.STRING

BAD = [
    pytest.param(t.Tensor(dtype=42, shape=[1]), "dtype", "unknown dtype 42", id="unknown-dtype"),
    pytest.param(t.Tensor(dtype=None, shape=[1]), "dtype", "unknown dtype", id="no-dtype"),
    pytest.param(t.Tensor(dtype=F32, shape=None, data=b""), "shape", "missing", id="no-shape"),
    pytest.param(t.Tensor(dtype=F32, shape=[], data=b"\0" * 4), "shape", "item", id="scalar"),
    pytest.param(t.Tensor(dtype=F32, shape=[2, -1], data=b""), "shape", ">= 0", id="negative"),
    pytest.param(
        t.Tensor(dtype=F32, shape=[2**40, 2**40, 0], data=b""), "shape", "absurd", id="absurd"
    ),
    pytest.param(t.Tensor(dtype=F32, shape=[1] * 33, data=b""), "shape", "33", id="too-many-dims"),
    pytest.param(
        t.Tensor(dtype=F32, shape=[2, 3], data=b"\0" * 20),
        "data",
        "data has 20 bytes but shape [2, 3] of float32 needs 24",
        id="short-data",
    ),
    pytest.param(
        t.Tensor(dtype=F32, shape=[2**20, 2**20], data=b"\0" * 8),
        "data",
        "8 bytes but shape [1048576, 1048576] of float32 needs 4398046511104",
        id="huge-product",
    ),
    pytest.param(t.Tensor(dtype=F32, shape=[1], data=None), "data", "needs 4", id="no-data"),
    pytest.param(
        t.Tensor(dtype=F32, shape=[1], data=b"\0" * 4, elements=[b"x"]),
        "elements",
        "carries `data`",
        id="elements-for-fixed",
    ),
    pytest.param(
        t.Tensor(dtype=STR, shape=[1], data=b"x", elements=[b"x"]),
        "data",
        "carries `elements`",
        id="data-for-string",
    ),
    pytest.param(
        t.Tensor(dtype=STR, shape=[2, 2], elements=[b"a", b"b", b"c"]),
        "elements",
        "3 elements but shape [2, 2] needs 4",
        id="element-count",
    ),
    pytest.param(
        t.Tensor(dtype=STR, shape=[2], elements=[b"ok", b"\xff\xfe"]),
        "elements",
        "element 1 is not valid UTF-8",
        id="bad-utf8",
    ),
    pytest.param(
        t.Tensor(dtype=t.DataType.BOOL, shape=[2], data=b"\x01\x02"),
        "data",
        "0 and 1",
        id="bool-not-0-or-1",
    ),
]


@pytest.mark.parametrize(("tensor", "what", "message"), BAD)
def test_bad_tensor_is_an_invalid_request_naming_its_field(
    tensor: object, what: str, message: str
) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)) as info:
        decode_tensor(tensor, "inputs.image")
    assert info.value.field == f"inputs.image.{what}"


def test_pipeline_description_round_trip_skips_outputs_without_spec() -> None:
    info = pipeline_to_wire(ECHO)
    assert [s.name for s in info.outputs] == ["x"]  # "mystery" has no spec (documented)
    text = next(s for s in info.inputs if s.name == "text")
    assert text.is_optional is True
    assert text.dtype == t.DataType.STRING
    back = pipeline_from_wire(info)
    assert back.inputs == ECHO.inputs
    assert back.outputs == {"x": ECHO.outputs["x"]}
    assert back.edges == ECHO.edges
    assert (back.name, back.version, back.nodes) == ("echo", "1", ["echo"])


def test_health_round_trip() -> None:
    report = HealthReport(live=True, ready=False, details={"workers": "0/2"})
    assert health_from_wire(health_to_wire(report)) == report


def test_truncated_frame_fails_instead_of_reading_past_its_end() -> None:
    # A binary field announcing 100000 bytes in a 30-byte frame: thriftpy2's memory buffer
    # would fill it with whatever lies in the heap; our reader raises.
    body = encode_message("infer", TMessageType.CALL, 1, t.InferenceService.infer_args())
    body = body[:-1] + bytes([12]) + struct.pack(">h", 1) + bytes([11]) + struct.pack(">h", 1)
    body += bytes([11]) + struct.pack(">hi", 3, 100_000) + b"x" * 10
    protocol = message_reader(body)
    protocol.read_message_begin()
    with pytest.raises(Exception, match="End of file"):
        protocol.read_struct(t.InferenceService.infer_args())
