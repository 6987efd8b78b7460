"""Refuse a Thrift call, before it is decoded, unless its decode is bounded by its length.

The defect (thriftpy2 0.7.1, its Cython ``cybin.c_skip`` and its pure-Python
``binary.skip`` alike): to skip a list, set or map, thriftpy2 reads the element type and
the size from the wire, then loops ``size`` times skipping one element each time.  When
the element type is not a real wire type (0 = STOP, 1 = VOID, 5, 7, 9, 16..255, or a
negative byte), skipping one element reads nothing, so the loop spins up to 2**31 times
without consuming a byte; a map with two such types spins twice as long.  Nine bytes (an
unknown field of type map, key type 0, value type 0, size 0x7fffffff) keep the Cython
decoder busy for about 20 s, and the decoder runs on the server's event loop: nobody is
answered meanwhile.  The frame limit does not help, since the loop reads nothing.
Decoding, not only skipping, takes that path: thriftpy2 skips every field the IDL does
not declare and every container whose element types differ from the IDL's.  The finding,
with a patch for thriftpy2, is in ``docs/upstream/thriftpy2-skip-dos.md``.

The rule: :func:`check_call` walks the binary-protocol message of one frame body (the
message header, then the arguments struct, along the IDL where thriftpy2 will decode and
along the wire where it will skip) and raises :class:`FrameRejected`, naming what is wrong
and where, unless:

- every field type and container element type is a wire type: BOOL=2, BYTE=3, DOUBLE=4,
  I16=6, I32=8, I64=10, STRING=11, STRUCT=12, MAP=13, SET=14, LIST=15 (so no element is
  zero bytes wide);
- every container size is >= 0 and ``size * (smallest encoding of one element)`` fits in
  the bytes left in the frame; every string length is >= 0 and fits too;
- structs and containers nest at most :data:`MAX_DEPTH` deep, the arguments struct being
  the first level (thriftpy2's own bound: it raises ``RecursionError`` beyond);
- nothing that the IDL declares as another type arrives as a string: thriftpy2 reads a
  map's string-typed keys or values, and its pure-Python decoder a string-typed field, *as
  the IDL's type*, i.e. from bytes that a walk along the wire would not have checked;
- at most :data:`MAX_SKIPPED_VALUES` values are skipped (fields the IDL does not declare,
  or declares with another type, and the elements of containers skipped whole): thriftpy2
  skips them in C, this walk in Python, about 20 times slower.

A frame that passes decodes exactly as before, and every value that the decoder then reads
or skips consumes at least one byte: its decode costs time proportional to its length.
The walk costs O(fields + elements) in Python but skips strings and fixed-width containers
in O(1), so the megabyte tensors of our IDL (``binary`` fields) cost nothing extra:
``python -m benchmarks.decode_guard`` measures it.

Two walks do the work.  The fast one is what every request pays: no messages, each IDL
struct compiled once, bounds left to the reads that raise.  When it refuses, the careful
one walks again to say what and where.  Both must refuse exactly the same frames (the
tests fuzz them side by side).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from itertools import repeat
from typing import Any

#: deepest nesting of structs and containers accepted, the arguments struct included
MAX_DEPTH = 64
#: most values that one frame may have thriftpy2 skip (see the module's docstring)
MAX_SKIPPED_VALUES = 16384

STOP, BOOL, BYTE, DOUBLE, I16, I32, I64 = 0, 2, 3, 4, 6, 8, 10
STRING, STRUCT, MAP, SET, LIST = 11, 12, 13, 14, 15
#: thriftpy2's spec type for ``binary``; never on the wire (it sends STRING)
_SPEC_BINARY = 18

#: the wire types, and the fewest bytes that encode one value of each (a struct: its STOP)
MIN_WIDTH: dict[int, int] = {
    BOOL: 1, BYTE: 1, DOUBLE: 8, I16: 2, I32: 4, I64: 8,
    STRING: 4, STRUCT: 1, MAP: 6, SET: 5, LIST: 5,
}  # fmt: skip
#: the fixed-width wire types and their width
FIXED_WIDTH: dict[int, int] = {BOOL: 1, BYTE: 1, DOUBLE: 8, I16: 2, I32: 4, I64: 8}
_TYPE_NAMES = {
    BOOL: "bool", BYTE: "byte", DOUBLE: "double", I16: "i16", I32: "i32", I64: "i64",
    STRING: "string", STRUCT: "struct", MAP: "map", SET: "set", LIST: "list",
    _SPEC_BINARY: "binary",
}  # fmt: skip
_VERSION_MASK = -65536
_VERSION_1 = -2147418112

_I16: Callable[[Any, int], tuple[int]] = struct.Struct("!h").unpack_from
_I32: Callable[[Any, int], tuple[int]] = struct.Struct("!i").unpack_from
_LIST_HEADER: Callable[[Any, int], tuple[int, int]] = struct.Struct("!Bi").unpack_from
_MAP_HEADER: Callable[[Any, int], tuple[int, int, int]] = struct.Struct("!BBi").unpack_from
_MESSAGE_HEADER: Callable[[Any], tuple[int, int]] = struct.Struct("!ii").unpack_from


class FrameRejected(ValueError):
    """A frame whose decode would not be bounded by its length, or that cannot decode.

    ``str()`` reads like ``list at field 1 (request) > field 2 (inputs) > map value of key
    'x' > field 9: element type 0 is not a wire type (byte 55)``.

    Attributes:
        what: the value at fault (``list``, ``map``, ``string``, ``value``, ``message``...).
        reason: what is wrong with it.
        offset: where in the frame body it starts.
        path: the fields and elements that lead to it, outermost first.
    """

    def __init__(self, offset: int, what: str, reason: str) -> None:
        self.offset = offset
        self.what = what
        self.reason = reason
        self._inner_first: list[str] = []
        super().__init__(offset, what, reason)

    @property
    def path(self) -> list[str]:
        return self._inner_first[::-1]

    def __str__(self) -> str:
        where = " > ".join(self.path) or "the top level"
        return f"{self.what} at {where}: {self.reason} (byte {self.offset})"


def type_name(ttype: int) -> str:
    """``"list"`` for 15, ``"type 7"`` for a byte that is no wire type."""
    return _TYPE_NAMES.get(ttype, f"type {ttype}")


def check_call(frame: bytes | bytearray | memoryview, args_class: Any) -> None:
    """Check one message frame body (without its 4-byte length) before it is decoded.

    ``args_class`` is the thriftpy2 class of the called method's arguments
    (``InferenceService.infer_args``); the header must be a strict binary-protocol one.

    Raises:
        FrameRejected: the frame breaks the rule above; nothing has been decoded.
    """
    if not isinstance(frame, bytes):
        frame = bytes(frame)  # the fast walk keys a dict with slices of it
    end = len(frame)
    if end < 8:
        raise FrameRejected(0, "message", "the frame is shorter than a message header")
    version, name_size = _MESSAGE_HEADER(frame)
    if version >= 0 or version & _VERSION_MASK != _VERSION_1:
        raise FrameRejected(0, "message", "no strict binary-protocol version header")
    if name_size < 0 or name_size + 12 > end:
        raise FrameRejected(
            4, "message", f"a method name of {name_size} bytes does not fit in the frame"
        )
    compiled = _COMPILED.get(args_class) or _compiled(args_class)
    try:
        _fast_struct(
            compiled.by_header, compiled.declared, frame, 12 + name_size, end, 1,
            [MAX_SKIPPED_VALUES],
        )  # fmt: skip
    except (_Refused, IndexError, struct.error):
        check_struct(frame, 12 + name_size, args_class)  # raises, saying why


def check_struct(frame: bytes | bytearray | memoryview, offset: int, struct_class: Any) -> int:
    """Check one struct of ``struct_class`` that starts at ``offset``; return where it ends.

    The struct is the first nesting level.

    Raises:
        FrameRejected: see :func:`check_call`.
    """
    if not isinstance(frame, bytes):
        frame = bytes(frame)
    compiled = _compiled(struct_class)
    try:
        return _fast_struct(
            compiled.by_header, compiled.declared, frame, offset, len(frame), 1,
            [MAX_SKIPPED_VALUES],
        )  # fmt: skip
    except (_Refused, IndexError, struct.error):
        pass
    # The fast walk only says no; the careful one says why.
    _struct(frame, offset, len(frame), struct_class.thrift_spec, 1, [MAX_SKIPPED_VALUES])
    raise FrameRejected(offset, "message", "malformed (found by the fast walk only)")


# --- the fast walk ------------------------------------------------------------------------
# Each function takes (frame, pos, end, depth, left) and returns the offset just past its
# value; ``left`` is a one-item list: the values that may still be skipped.  Bounds are left
# to the reads (frame[pos], unpack_from), which raise, wherever a later read is sure to come.
# An IDL struct compiles once into a table keyed by the 3 bytes of a field header (type,
# id) as the IDL declares it: an expected field costs one slice and one dict lookup.

_Walk = Callable[[Any, int, int, int, list[int]], int]


class _Refused(Exception):
    """The fast walk found a fault (the careful walk then names it)."""


class _Compiled:
    """One IDL struct: what each expected field header leads to, and the declared types.

    ``by_header`` maps a field header to a fixed width (> 0), to 0 for a string, or to the
    walk of a struct or container; ``declared`` maps a field id to its declared wire type.
    """

    __slots__ = ("by_header", "declared")

    def __init__(self) -> None:
        self.by_header: dict[bytes, int | _Walk] = {}
        self.declared: dict[int, int] = {}


_COMPILED: dict[Any, _Compiled] = {}
_NO_FIELDS = _Compiled()


def _compiled(struct_class: Any) -> _Compiled:
    compiled = _COMPILED.get(struct_class)
    if compiled is None:
        # registered before its fields are compiled: a struct may contain itself
        compiled = _COMPILED[struct_class] = _Compiled()
        for fid, field in struct_class.thrift_spec.items():
            wire = compiled.declared[fid] = _wire(field[0])
            if wire not in MIN_WIDTH:
                continue  # no field on the wire can match it
            walk = _walk(wire, field[2] if len(field) > 3 else None)
            compiled.by_header[bytes((wire,)) + fid.to_bytes(2, "big", signed=True)] = (
                walk if walk is not None else 0 if wire == STRING else FIXED_WIDTH[wire]
            )
    return compiled


def _wire(declared: int) -> int:
    return STRING if declared == _SPEC_BINARY else declared


def _split(spec: Any) -> tuple[int, Any]:
    """A container spec's (type, spec) of its elements, keys or values."""
    return (_wire(spec), None) if isinstance(spec, int) else (_wire(spec[0]), spec[1])


def _walk(declared: int, spec: Any) -> _Walk | None:
    """The fast walk of a struct or container as the IDL declares it; None for the others."""
    if declared == STRUCT:
        compiled = _compiled(spec)
        return functools.partial(_fast_struct, compiled.by_header, compiled.declared)
    if declared in (LIST, SET):
        etype, espec = _split(spec)
        return functools.partial(_fast_list, etype, _walk(etype, espec))
    if declared == MAP:
        (ktype, kspec), (vtype, vspec) = _split(spec[0]), _split(spec[1])
        return functools.partial(_fast_map, ktype, _walk(ktype, kspec), vtype, _walk(vtype, vspec))
    return None


def _fast_struct(
    by_header: dict[bytes, int | _Walk], declared: dict[int, int],
    frame: Any, pos: int, end: int, depth: int, left: list[int],
) -> int:  # fmt: skip
    if depth > MAX_DEPTH:
        raise _Refused
    depth += 1
    get = by_header.get
    while True:
        action = get(frame[pos : pos + 3])
        if action is None:  # STOP, or a field the IDL does not declare with this type
            ftype = frame[pos]
            if ftype == STOP:
                return pos + 1
            if ftype == STRING and _I16(frame, pos + 1)[0] in declared:
                raise _Refused  # a string where the IDL declares another type
            left[0] -= 1
            if left[0] < 0:
                raise _Refused
            pos = _fast_skip(frame, pos + 3, end, ftype, depth, left)
        elif action.__class__ is int:
            pos += 3
            if action:
                pos += action
            else:
                size = _I32(frame, pos)[0]
                if size < 0:
                    raise _Refused
                pos += 4 + size
                if pos > end:
                    raise _Refused
        else:
            pos = action(frame, pos + 3, end, depth, left)  # type: ignore[operator]


def _fast_skip(frame: Any, pos: int, end: int, ttype: int, depth: int, left: list[int]) -> int:
    width = FIXED_WIDTH.get(ttype)
    if width is not None:
        return pos + width
    if ttype == STRING:
        size = _I32(frame, pos)[0]
        if size < 0 or pos + 4 + size > end:
            raise _Refused
        return pos + 4 + size
    if ttype == STRUCT:
        return _fast_struct(_NO_FIELDS.by_header, _NO_FIELDS.declared, frame, pos, end, depth, left)
    if ttype in (LIST, SET):
        return _fast_list(-1, None, frame, pos, end, depth, left)
    if ttype == MAP:
        return _fast_map(-1, None, -1, None, frame, pos, end, depth, left)
    raise _Refused


def _fast_list(
    declared: int, walk: _Walk | None, frame: Any, pos: int, end: int, depth: int, left: list[int]
) -> int:
    """A list or set whose IDL element type is ``declared`` (-1: none, it is skipped)."""
    if depth > MAX_DEPTH:
        raise _Refused
    etype, size = _LIST_HEADER(frame, pos)
    pos += 5
    width = MIN_WIDTH.get(etype)
    if width is None or size < 0 or size * width > end - pos:
        raise _Refused
    if etype in FIXED_WIDTH:
        return pos + size * width
    if etype != declared:  # thriftpy2 skips every element
        left[0] -= size
        if left[0] < 0:
            raise _Refused
    depth += 1
    if etype == STRING:
        unpack = _I32
        for _ in repeat(None, size):
            (length,) = unpack(frame, pos)
            if length < 0:
                raise _Refused
            pos += 4 + length
        if pos > end:
            raise _Refused
    elif etype == declared and walk is not None:
        for _ in repeat(None, size):
            pos = walk(frame, pos, end, depth, left)
    else:
        for _ in repeat(None, size):
            pos = _fast_skip(frame, pos, end, etype, depth, left)
    return pos


def _fast_map(
    kdeclared: int, kwalk: _Walk | None, vdeclared: int, vwalk: _Walk | None,
    frame: Any, pos: int, end: int, depth: int, left: list[int],
) -> int:  # fmt: skip
    """A map whose IDL key and value types are ``kdeclared``, ``vdeclared`` (-1: skipped)."""
    if depth > MAX_DEPTH:
        raise _Refused
    ktype, vtype, size = _MAP_HEADER(frame, pos)
    pos += 6
    kwidth = MIN_WIDTH.get(ktype)
    vwidth = MIN_WIDTH.get(vtype)
    if kwidth is None or vwidth is None or size < 0 or size * (kwidth + vwidth) > end - pos:
        raise _Refused
    if ktype in FIXED_WIDTH and vtype in FIXED_WIDTH:
        return pos + size * (kwidth + vwidth)
    if kdeclared != -1 and (
        (ktype == STRING and kdeclared != STRING) or (vtype == STRING and vdeclared != STRING)
    ):
        raise _Refused  # thriftpy2 would read the strings as the IDL's type
    if ktype != kdeclared or vtype != vdeclared:  # thriftpy2 skips every entry
        kwalk = vwalk = None
        left[0] -= size
        if left[0] < 0:
            raise _Refused
    depth += 1
    unpack = _I32
    if ktype == STRING and vtype == STRING:
        for _ in repeat(None, 2 * size):
            (length,) = unpack(frame, pos)
            if length < 0:
                raise _Refused
            pos += 4 + length
    elif ktype == STRING and vwalk is not None:
        for _ in repeat(None, size):
            (length,) = unpack(frame, pos)
            if length < 0:
                raise _Refused
            pos = vwalk(frame, pos + 4 + length, end, depth, left)
    else:
        for _ in repeat(None, size):
            if kwalk is None:
                pos = _fast_skip(frame, pos, end, ktype, depth, left)
            else:
                pos = kwalk(frame, pos, end, depth, left)
            if vwalk is None:
                pos = _fast_skip(frame, pos, end, vtype, depth, left)
            else:
                pos = vwalk(frame, pos, end, depth, left)
    if pos > end:
        raise _Refused
    return pos


# --- the careful walk ---------------------------------------------------------------------
# The same walk, read plainly, with a message for every refusal.  ``spec`` None means the
# value is skipped (thriftpy2 follows the wire alone).  A failure collects its path on the
# way out (``_inner_first``).


def _truncated(offset: int, what: str) -> FrameRejected:
    return FrameRejected(offset, what, "the frame ends inside it")


def _too_deep(offset: int, what: str) -> FrameRejected:
    return FrameRejected(offset, what, f"nested more than {MAX_DEPTH} deep")


def _not_wire_type(offset: int, what: str, role: str, ttype: int) -> FrameRejected:
    return FrameRejected(offset, what, f"{role} {ttype} is not a wire type")


def _charge(what: str, count: int, offset: int, left: list[int]) -> None:
    left[0] -= count
    if left[0] < 0:
        raise FrameRejected(
            offset,
            what,
            f"more than {MAX_SKIPPED_VALUES} values that the IDL does not declare "
            "(unknown fields, or fields and elements of another type)",
        )


def _check_size(what: str, size: int, width: int, start: int, pos: int, end: int) -> None:
    if size < 0:
        raise FrameRejected(start, what, f"negative size {size}")
    if size * width > end - pos:
        raise FrameRejected(
            start,
            what,
            f"{size} elements need at least {size * width} bytes, the frame has {end - pos} left",
        )


def _string(frame: Any, pos: int, end: int) -> int:
    if pos + 4 > end:
        raise _truncated(pos, "string")
    size = _I32(frame, pos)[0]
    if size < 0:
        raise FrameRejected(pos, "string", f"negative length {size}")
    if size > end - pos - 4:
        raise FrameRejected(
            pos, "string", f"length {size} but the frame has {end - pos - 4} bytes left"
        )
    return pos + 4 + size


def _value(
    frame: Any, pos: int, end: int, ttype: int, spec: Any, depth: int, left: list[int]
) -> int:
    """A value of wire type ``ttype``; ``spec``: the IDL's struct class or container spec."""
    width = FIXED_WIDTH.get(ttype)
    if width is not None:
        if pos + width > end:
            raise _truncated(pos, type_name(ttype))
        return pos + width
    if ttype == STRING:
        return _string(frame, pos, end)
    if ttype == STRUCT:
        return _struct(frame, pos, end, None if spec is None else spec.thrift_spec, depth, left)
    if ttype in (LIST, SET):
        return _list(frame, pos, end, ttype, spec, depth, left)
    if ttype == MAP:
        return _map(frame, pos, end, spec, depth, left)
    raise _not_wire_type(pos, "value", "type", ttype)  # the callers checked already


def _struct(
    frame: Any, pos: int, end: int, spec: dict[int, tuple[Any, ...]] | None, depth: int,
    left: list[int],
) -> int:  # fmt: skip
    if depth > MAX_DEPTH:
        raise _too_deep(pos, "struct")
    depth += 1
    while True:
        if pos >= end:
            raise _truncated(pos, "struct")
        ftype = frame[pos]
        if ftype == STOP:
            return pos + 1
        if pos + 3 > end:
            raise _truncated(pos, "field header")
        start = pos
        pos += 3
        field = spec.get(_I16(frame, start + 1)[0]) if spec is not None else None
        try:
            if ftype not in MIN_WIDTH:
                raise _not_wire_type(start, "value", "type", ftype)
            if field is not None and ftype == _wire(field[0]):
                pos = _value(frame, pos, end, ftype, field[2] if len(field) > 3 else None,
                             depth, left)  # fmt: skip
            elif field is not None and ftype == STRING:
                raise FrameRejected(
                    start, "value", f"a string where the IDL declares {type_name(field[0])}"
                )
            else:  # thriftpy2 skips it
                _charge("value", 1, start, left)
                pos = _value(frame, pos, end, ftype, None, depth, left)
        except FrameRejected as exc:
            fid = _I16(frame, start + 1)[0]
            exc._inner_first.append(f"field {fid}" + (f" ({field[1]})" if field else ""))
            raise


def _list(
    frame: Any, pos: int, end: int, ttype: int, spec: Any, depth: int, left: list[int]
) -> int:
    what = type_name(ttype)
    if depth > MAX_DEPTH:
        raise _too_deep(pos, what)
    if pos + 5 > end:
        raise _truncated(pos, what)
    start = pos
    etype, size = _LIST_HEADER(frame, pos)
    pos += 5
    width = MIN_WIDTH.get(etype)
    if width is None:
        raise _not_wire_type(start, what, "element type", etype)
    _check_size(what, size, width, start, pos, end)
    if etype in FIXED_WIDTH:
        return pos + size * width
    element_spec = None
    if spec is not None:
        declared, element_spec = _split(spec)
        if etype != declared:
            spec = None
    if spec is None:  # thriftpy2 skips every element
        _charge(what, size, start, left)
    depth += 1
    index = 0
    try:
        for index in range(size):  # noqa: B007 - the except clause reads it
            pos = _value(frame, pos, end, etype, element_spec, depth, left)
    except FrameRejected as exc:
        exc._inner_first.append(f"{what} element {index}")
        raise
    return pos


def _map(frame: Any, pos: int, end: int, spec: Any, depth: int, left: list[int]) -> int:
    if depth > MAX_DEPTH:
        raise _too_deep(pos, "map")
    if pos + 6 > end:
        raise _truncated(pos, "map")
    start = pos
    ktype, vtype, size = _MAP_HEADER(frame, pos)
    pos += 6
    kwidth = MIN_WIDTH.get(ktype)
    if kwidth is None:
        raise _not_wire_type(start, "map", "key type", ktype)
    vwidth = MIN_WIDTH.get(vtype)
    if vwidth is None:
        raise _not_wire_type(start, "map", "value type", vtype)
    _check_size("map", size, kwidth + vwidth, start, pos, end)
    if ktype in FIXED_WIDTH and vtype in FIXED_WIDTH:
        return pos + size * (kwidth + vwidth)
    kspec = vspec = None
    if spec is not None:
        (kdeclared, kspec), (vdeclared, vspec) = _split(spec[0]), _split(spec[1])
        # thriftpy2 reads string-typed keys or values as the IDL's type, whatever it is
        for role, wire, declared in (("key", ktype, kdeclared), ("value", vtype, vdeclared)):
            if wire == STRING and declared != STRING:
                reason = f"{role}s are strings where the IDL declares {type_name(declared)}"
                raise FrameRejected(start, "map", reason)
        if ktype != kdeclared or vtype != vdeclared:
            spec = kspec = vspec = None
    if spec is None:  # thriftpy2 skips every entry
        _charge("map", size, start, left)
    depth += 1
    index = 0
    key_at = value_at = -1
    try:
        for index in range(size):  # noqa: B007 - the except clause reads it
            key_at = pos
            pos = _value(frame, pos, end, ktype, kspec, depth, left)
            value_at = pos
            pos = _value(frame, pos, end, vtype, vspec, depth, left)
    except FrameRejected as exc:
        exc._inner_first.append(_entry_name(frame, index, key_at, ktype, value_at > key_at))
        raise
    return pos


def _entry_name(frame: Any, index: int, key_at: int, ktype: int, in_value: bool) -> str:
    """``map value of key 'image'`` where the key is a (checked) string, else by index."""
    if in_value and ktype == STRING:
        size = _I32(frame, key_at)[0]
        key = bytes(frame[key_at + 4 : key_at + 4 + min(size, 64)])
        return f"map value of key {key.decode('utf-8', 'replace')!r}"
    return f"map {'value' if in_value else 'key'} of entry {index}"


__all__ = [
    "FIXED_WIDTH",
    "MAX_DEPTH",
    "MAX_SKIPPED_VALUES",
    "MIN_WIDTH",
    "FrameRejected",
    "check_call",
    "check_struct",
    "type_name",
]
