"""Conversions between the Thrift wire structs and the engine's numpy world.

Tensors (``Tensor`` <-> ``np.ndarray``), pipeline descriptions, health, and the message
codec that both the server and the clients use to turn a frame body into Thrift structs.

Decoded fixed-width tensors are ``np.frombuffer`` views on the received ``bytes``: no copy of
the payload, and therefore **read-only** (``array.flags.writeable`` is False).  A plugin that
must write into an input copies it first.  STRING tensors decode to object arrays of ``str``,
BYTES tensors to object arrays of ``bytes``.

Every check on a received tensor raises :class:`~model_plugins.errors.InvalidRequest` with a
``field`` such as ``inputs.image.data`` naming what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

# The Cython classes, imported from their compiled modules on purpose: thriftpy2's package
# namespaces fall back to pure-Python classes without a word when Cython is missing, and those
# decode differently.  The compiled modules carry no type information.
from thriftpy2.protocol.cybin import TCyBinaryProtocol  # type: ignore[attr-defined]
from thriftpy2.thrift import TPayload
from thriftpy2.transport.buffered import TCyBufferedTransport  # type: ignore[attr-defined]
from thriftpy2.transport.memory import TCyMemoryBuffer  # type: ignore[attr-defined]

from dag.pipeline import EdgeDescription, PipelineDescription
from engine.runtime.types import HealthReport
from idl import dagserve_thrift
from model_plugins.errors import InvalidRequest
from model_plugins.specs import DTYPES, NUMPY_DTYPES, OBJECT_DTYPES, DType, TensorSpec, dtype_of

#: wire enum value -> dtype name; the IDL enum lists the dtypes in the order of ``DTYPES``
DTYPE_OF_WIRE: dict[int, DType] = {
    getattr(dagserve_thrift.DataType, name.upper()): name for name in DTYPES
}
#: dtype name -> wire enum value
WIRE_OF_DTYPE: dict[DType, int] = {name: value for value, name in DTYPE_OF_WIRE.items()}
#: numpy refuses more dimensions than this (NPY_MAXDIMS of numpy 1.x; numpy 2 allows 64)
MAX_NDIM = 32
#: bound on the product of the non-zero dimensions, so that an empty tensor with absurd
#: dimensions (``[2**62, 0]``) cannot make numpy overflow
MAX_ELEMENTS = 2**40


# --- tensors ------------------------------------------------------------------------------


def _invalid(where: str, what: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}", field=f"{where}.{what}")


def _check_shape(shape: Any, where: str) -> tuple[int, ...]:
    if shape.__class__ is list and 0 < len(shape) <= MAX_NDIM:  # as thriftpy2 decodes it
        elements = 1
        for d in shape:
            if d.__class__ is not int or d < 0:
                break
            if d:
                elements *= d
        else:
            if elements <= MAX_ELEMENTS:
                return tuple(shape)
    # what is wrong, and where
    if shape is None:
        raise _invalid(where, "shape", "shape is missing")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) for d in shape):
        raise _invalid(where, "shape", f"shape must be a list of integers (got {shape!r})")
    if len(shape) == 0:
        raise _invalid(
            where, "shape", "shape must have at least the item dimension (got a scalar shape [])"
        )
    if len(shape) > MAX_NDIM:
        raise _invalid(where, "shape", f"shape has {len(shape)} dimensions; at most {MAX_NDIM}")
    if any(d < 0 for d in shape):
        raise _invalid(where, "shape", f"dimensions must be >= 0 (got {list(shape)})")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise _invalid(where, "shape", f"shape {list(shape)} is absurdly large")
    return tuple(shape)


def decode_tensor(tensor: Any, where: str) -> np.ndarray:
    """The numpy array of a wire ``Tensor``; fixed-width payloads are read-only views.

    ``where`` is the tensor's place in the request (``inputs.image``) and prefixes every
    ``InvalidRequest.field``.
    """
    dtype = DTYPE_OF_WIRE.get(tensor.dtype) if isinstance(tensor.dtype, int) else None
    if dtype is None:
        raise _invalid(where, "dtype", f"unknown dtype {tensor.dtype!r}")
    shape = _check_shape(tensor.shape, where)
    count = math.prod(shape)
    if dtype in OBJECT_DTYPES:
        return _decode_elements(tensor, dtype, shape, count, where)
    if tensor.elements is not None:
        raise _invalid(where, "elements", f"a {dtype} tensor carries `data`, not `elements`")
    numpy_dtype = NUMPY_DTYPES[dtype]
    data = tensor.data if tensor.data is not None else b""
    expected = count * numpy_dtype.itemsize
    if len(data) != expected:
        raise _invalid(
            where,
            "data",
            f"data has {len(data)} bytes but shape {list(shape)} of {dtype} needs {expected}",
        )
    array = np.frombuffer(data, dtype=numpy_dtype).reshape(shape)
    if dtype == "bool" and count and np.frombuffer(data, dtype=np.uint8).max() > 1:
        # numpy would keep the raw byte; a bool is 0 or 1 on the wire
        raise _invalid(where, "data", "bool data must hold only the bytes 0 and 1")
    return array


def _decode_elements(
    tensor: Any, dtype: DType, shape: tuple[int, ...], count: int, where: str
) -> np.ndarray:
    if tensor.data is not None:
        raise _invalid(where, "data", f"a {dtype} tensor carries `elements`, not `data`")
    elements = tensor.elements if tensor.elements is not None else []
    if len(elements) != count:
        raise _invalid(
            where,
            "elements",
            f"{len(elements)} elements but shape {list(shape)} needs {count}",
        )
    if dtype == "string":
        try:
            values: list[Any] = [e.decode("utf-8") for e in elements]
        except UnicodeDecodeError as exc:
            index = next(i for i, e in enumerate(elements) if not _is_utf8(e))
            raise _invalid(where, "elements", f"element {index} is not valid UTF-8") from exc
    else:
        values = list(elements)
    # np.array(values, dtype=object) would look inside equal-length values; fill instead.
    array = np.empty(count, dtype=object)
    array[:] = values
    return array.reshape(shape)


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def encode_tensor(array: np.ndarray) -> Any:
    """The wire ``Tensor`` of an array (at least one dimension: the item dimension).

    Fixed-width arrays travel little-endian in C order; object arrays are STRING when their
    first element is a ``str`` (each element encoded UTF-8), BYTES otherwise; numpy ``U`` and
    ``S`` arrays map to STRING and BYTES.

    Raises:
        TypeError: a dtype the contract does not have, or an element of the wrong type.
        ValueError: a 0-d array (no item dimension).
    """
    if array.ndim == 0:
        msg = "a tensor needs at least the item dimension (got a 0-d array)"
        raise ValueError(msg)
    dtype = dtype_of(array)
    shape = [int(d) for d in array.shape]
    wire = WIRE_OF_DTYPE[dtype]
    if dtype not in OBJECT_DTYPES:
        contiguous = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[dtype])
        return dagserve_thrift.Tensor(dtype=wire, shape=shape, data=contiguous.tobytes())
    items = array.ravel().tolist()
    if dtype == "string":
        if not all(isinstance(v, str) for v in items):
            msg = "a string tensor must hold only str elements"
            raise TypeError(msg)
        elements = [v.encode("utf-8") for v in items]
    else:
        if not all(isinstance(v, bytes | bytearray | memoryview) for v in items):
            msg = "a bytes tensor must hold only bytes elements"
            raise TypeError(msg)
        elements = [bytes(v) for v in items]
    return dagserve_thrift.Tensor(dtype=wire, shape=shape, elements=elements)


def decode_tensors(tensors: Mapping[str, Any] | None, where: str) -> dict[str, np.ndarray]:
    """Decode a ``map<string, Tensor>``; ``where`` is ``inputs`` or ``outputs``."""
    return {name: decode_tensor(t, f"{where}.{name}") for name, t in (tensors or {}).items()}


def encode_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Encode arrays into a ``map<string, Tensor>``."""
    return {name: encode_tensor(array) for name, array in arrays.items()}


# --- descriptions -------------------------------------------------------------------------


def _spec_to_wire(name: str, spec: TensorSpec) -> Any:
    return dagserve_thrift.TensorSpec(
        name=name,
        dtype=WIRE_OF_DTYPE[spec.dtype],
        shape=list(spec.shape),
        is_optional=spec.optional,
    )


def pipeline_to_wire(description: PipelineDescription) -> Any:
    """The wire ``PipelineInfo`` of a pipeline.

    Convention: an output whose spec no node declares (``None`` in the description) is left
    out of ``PipelineInfo.outputs``, because ``TensorSpec.dtype`` is required on the wire and
    any dtype we made up would be a lie.  Such an output still appears as an edge into
    ``$outputs`` and is still answered by ``infer``.
    """
    return dagserve_thrift.PipelineInfo(
        name=description.name,
        version=description.version,
        inputs=[_spec_to_wire(n, s) for n, s in description.inputs.items()],
        outputs=[_spec_to_wire(n, s) for n, s in description.outputs.items() if s is not None],
        nodes=list(description.nodes),
        edges=[
            dagserve_thrift.Edge(source=e.source, target=e.target, tensor=e.tensor)
            for e in description.edges
        ],
    )


def _spec_from_wire(spec: Any) -> TensorSpec:
    return TensorSpec(
        DTYPE_OF_WIRE[spec.dtype], tuple(spec.shape or ()), optional=bool(spec.is_optional)
    )


def pipeline_from_wire(info: Any) -> PipelineDescription:
    """A :class:`PipelineDescription` from a wire ``PipelineInfo`` (the clients' view)."""
    return PipelineDescription(
        name=info.name,
        version=info.version,
        inputs={s.name: _spec_from_wire(s) for s in info.inputs or []},
        outputs={s.name: _spec_from_wire(s) for s in info.outputs or []},
        nodes=list(info.nodes or []),
        edges=[EdgeDescription(e.source, e.target, e.tensor) for e in info.edges or []],
    )


def health_to_wire(report: HealthReport) -> Any:
    """The wire ``HealthStatus`` of a health report."""
    return dagserve_thrift.HealthStatus(
        live=report.live, ready=report.ready, details=dict(report.details)
    )


def health_from_wire(status: Any) -> HealthReport:
    """A :class:`HealthReport` from a wire ``HealthStatus``."""
    return HealthReport(
        live=bool(status.live), ready=bool(status.ready), details=dict(status.details or {})
    )


# --- messages -----------------------------------------------------------------------------


class _FrameReader:
    """A read-only "transport" over one received frame body.

    We decode through ``TCyBufferedTransport`` rather than ``TCyMemoryBuffer``: the memory
    buffer does not fail on a short read, so a truncated or forged frame decodes into
    uninitialised heap bytes, and a forged list length at the end of a frame builds tens of
    millions of garbage elements (measured: 6 s for 5e7, blocking the event loop).  The
    buffered transport raises ``TTransportException`` at the end of the frame, so every
    element costs at least one real byte.  Both decode a 600 KB request in ~110 us.
    """

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes | bytearray) -> None:
        self._data = data
        self._pos = 0

    def read(self, size: int) -> bytes | bytearray:
        if self._pos == 0 and size >= len(self._data):
            self._pos = len(self._data)
            return self._data  # the whole frame: no copy
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk


def message_reader(frame: bytes | bytearray) -> TCyBinaryProtocol:
    """A binary protocol that reads one message from a frame body (without its length).

    ``string`` fields decode to ``str`` (invalid UTF-8 raises), ``binary`` fields stay
    ``bytes``: thriftpy2 0.7.1 keeps its T_BINARY type apart from T_STRING and never
    decodes it, whatever ``decode_response`` says.
    """
    transport = TCyBufferedTransport(_FrameReader(frame), buf_size=max(len(frame), 1024))
    return TCyBinaryProtocol(
        transport, strict_read=True, strict_write=True, decode_response=True, strict_decode=True
    )


def encode_message(name: str, message_type: int, seqid: int, payload: TPayload) -> bytes:
    """One message (call, reply or exception) as a frame body, without the 4-byte length."""
    buffer = TCyMemoryBuffer()
    protocol = TCyBinaryProtocol(buffer, strict_read=True, strict_write=True)
    protocol.write_message_begin(name, message_type, seqid)
    protocol.write_struct(payload)
    protocol.write_message_end()
    return bytes(buffer.getvalue())


__all__ = [
    "DTYPE_OF_WIRE",
    "MAX_ELEMENTS",
    "MAX_NDIM",
    "WIRE_OF_DTYPE",
    "decode_tensor",
    "decode_tensors",
    "encode_message",
    "encode_tensor",
    "encode_tensors",
    "health_from_wire",
    "health_to_wire",
    "message_reader",
    "pipeline_from_wire",
    "pipeline_to_wire",
]
