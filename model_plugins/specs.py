"""Tensor specs: the dtype and the per-item shape of one named tensor.

A spec describes ONE item: the first (item) dimension of every tensor is implied.
``-1`` in a shape means "any size".  STRING and BYTES tensors are numpy object arrays
holding ``str`` and ``bytes`` respectively.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

DType = Literal[
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "string", "bytes",
]  # fmt: skip

#: every dtype name of the wire contract, in IDL enum order
DTYPES: tuple[DType, ...] = (
    "bool", "uint8", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64", "string", "bytes",
)  # fmt: skip

#: dtypes whose elements are variable-length and travel as a list of byte strings
OBJECT_DTYPES = frozenset({"string", "bytes"})

#: numpy dtype of each fixed-width dtype, little-endian as on the wire
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(name).newbyteorder("<") for name in DTYPES if name not in OBJECT_DTYPES
}

#: numpy dtype, in either byte order -> its dtype name: :func:`dtype_of` on every tensor of
#: every request is a dict lookup (numpy's ``dtype.name`` is computed in Python, ~3 us)
_NAME_OF_NUMPY: dict[np.dtype[Any], DType] = {
    numpy: name  # type: ignore[misc]
    for name, little in NUMPY_DTYPES.items()
    for numpy in (little, little.newbyteorder(">"))
}


def dtype_of(array: np.ndarray) -> DType:
    """The contract dtype of a numpy array.

    Object arrays are ``string`` when their first element is a ``str`` (or when empty),
    ``bytes`` otherwise; numpy ``U``/``S`` arrays map to ``string``/``bytes``.

    >>> dtype_of(np.zeros(2, dtype=np.float32))
    'float32'
    >>> dtype_of(np.array([b"x"], dtype=object))
    'bytes'
    """
    known = _NAME_OF_NUMPY.get(array.dtype)
    if known is not None:
        return known
    kind = array.dtype.kind
    if kind == "U":
        return "string"
    if kind == "S":
        return "bytes"
    if kind == "O":
        first = next(iter(array.flat), "")
        return "bytes" if isinstance(first, (bytes, bytearray, memoryview)) else "string"
    name = array.dtype.newbyteorder("=").name
    if name not in NUMPY_DTYPES:
        msg = f"numpy dtype {array.dtype} has no dagserve dtype (supported: {', '.join(DTYPES)})"
        raise TypeError(msg)
    return name  # type: ignore[return-value]


def as_array(value: object, spec: TensorSpec | None = None) -> np.ndarray:
    """``value`` as an array of items: arrays pass through, (nested) lists become arrays.

    A list of ``str`` or ``bytes`` becomes an object array (numpy's fixed-width ``S`` dtype
    would strip trailing NULs).  With a ``spec``, numbers are cast to its dtype where nothing
    changes kind (ints -> float32, float64 -> float32), and ints to another int dtype where
    every value fits; a list of floats for an int tensor stays float, for the dtype check to
    refuse.

    >>> as_array([[1, 2]], TensorSpec("float32", [2])).dtype.name
    'float32'
    >>> as_array(["a", "b"]).dtype.name
    'object'

    Raises:
        ValueError: the list is ragged (its rows differ in length).
    """
    if isinstance(value, np.ndarray):
        return value
    if spec is not None and spec.dtype in OBJECT_DTYPES:
        return np.array(value, dtype=object)
    try:
        array = np.array(value)
    except ValueError as exc:  # ragged nesting: numpy refuses to guess
        msg = f"not a rectangular list: {exc}"
        raise ValueError(msg) from exc
    if array.dtype.kind in "US":
        return np.array(value, dtype=object)
    if spec is not None:
        target = NUMPY_DTYPES[spec.dtype]
        if np.can_cast(array.dtype, target, casting="same_kind"):
            return array.astype(target)
        if array.dtype.kind in "iu" and target.kind in "iu":  # ints for uint8: when all fit
            cast = array.astype(target)
            if np.array_equal(cast, array):
                return cast
    return array


@dataclass(frozen=True)
class TensorSpec:
    """The dtype and per-item shape of one tensor.

    Args:
        dtype: one of :data:`DTYPES`.
        shape: the shape of ONE item (the item dimension is implied); ``-1`` = any size.
        optional: a pipeline input that a request may leave out.

    >>> TensorSpec("float32", [3, -1]).accepts_item_shape((3, 7))
    True
    >>> TensorSpec("float32", [384]).accepts_item_shape((512,))
    False
    """

    dtype: DType
    shape: Sequence[int] = field(default=())
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            msg = f"dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})"
            raise ValueError(msg)
        shape = tuple(int(d) for d in self.shape)
        if any(d < -1 for d in shape):
            msg = f"shape dimensions must be >= 0 or -1 for any size (got {list(shape)})"
            raise ValueError(msg)
        object.__setattr__(self, "shape", shape)

    def accepts_item_shape(self, item_shape: Sequence[int]) -> bool:
        """Whether one item of this shape fits the spec."""
        if item_shape == self.shape:  # numpy's shapes are tuples, as ours
            return True
        if len(item_shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, item_shape, strict=True))

    def compatible_with(self, other: TensorSpec) -> bool:
        """Whether a tensor produced as ``self`` can feed an input declared as ``other``."""
        if self.dtype != other.dtype or len(self.shape) != len(other.shape):
            return False
        return all(a == b or -1 in (a, b) for a, b in zip(self.shape, other.shape, strict=True))

    def describe(self) -> str:
        """A short text: ``float32[3, 224, 224]``."""
        dims = ", ".join("?" if d == -1 else str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


__all__ = [
    "DTYPES",
    "NUMPY_DTYPES",
    "OBJECT_DTYPES",
    "DType",
    "TensorSpec",
    "as_array",
    "dtype_of",
]
