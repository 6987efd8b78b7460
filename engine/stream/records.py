"""Stream records <-> pipeline inputs and outputs, and the dead letters of records that fail.

A record is one JSON object per line.  Each pipeline input is one field holding ONE item
(the item dimension is implied, as in the pipeline's specs): a (nested) list or a number for
fixed-width dtypes, a string for STRING, base64 text for BYTES.  ``input_map`` renames record
fields to pipeline inputs (identity by default).  Every other field passes through to the
answer, beside the outputs (``output_map`` renames those; arrays become nested lists, BYTES
base64 text), so that an ``id`` or a timestamp reaches the sink with the answer.

A record that cannot become a request (not JSON, not an object, a required input missing, a
wrong shape or dtype, bad base64) raises :class:`RecordError` before anything is sent: the
server's signature, fetched once with ``describe``, is checked here.  :func:`dead_letter` is
the one shape of every failed record::

    {"error": {"type": "...", "message": "...", "node": "..."|null, "field": "..."|null},
     "record": {...}}

with ``"line": "..."`` instead of ``"record"`` when the line was not a JSON object.  ``node``
names the pipeline node that failed (``InferenceError``), ``field`` the record field
(``InvalidRecord``) or request field (``InvalidRequest``: ``inputs.x``) at fault.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from model_plugins.specs import TensorSpec, as_array, dtype_of

#: the ``error.type`` of a record refused before it was sent (the others are the names of the
#: errors a server answered: ``InvalidRequest``, ``InferenceError``, ``DeadlineExceeded`` ...)
INVALID_RECORD = "InvalidRecord"


class RecordError(Exception):
    """A line that cannot become a request: ``message`` says why, ``field`` names the record
    field at fault (None for the line as a whole)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


@dataclass(frozen=True)
class RecordMapping:
    """How records map to one pipeline: its input specs (from ``describe``), and the renames.

    Args:
        inputs: pipeline input -> its spec.
        input_map: record field -> pipeline input; fields not named map to the input of the
            same name.
        output_map: pipeline output -> record field; outputs not named keep their name.
    """

    inputs: Mapping[str, TensorSpec]
    input_map: Mapping[str, str] = field(default_factory=dict)
    output_map: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.input_map.values()) - set(self.inputs))
        if unknown:
            msg = f"input_map names no input of the pipeline: {', '.join(unknown)}"
            raise ValueError(msg)

    def field_of(self, name: str) -> str:
        """The record field that carries pipeline input ``name``."""
        for record_field, input_name in self.input_map.items():
            if input_name == name:
                return record_field
        return name

    def parse(self, line: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The record of one line, and its request inputs (batches of one item).

        Raises:
            RecordError: the line is not a JSON object, or does not match the signature.
        """
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            msg = f"not JSON: {exc}"
            raise RecordError(msg) from exc
        if not isinstance(record, dict):
            msg = f"not a JSON object: a {type(record).__name__}"
            raise RecordError(msg)
        return record, self.inputs_of(record)

    def inputs_of(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request inputs of a parsed record; raises :class:`RecordError`."""
        inputs: dict[str, np.ndarray] = {}
        for name, spec in self.inputs.items():
            record_field = self.field_of(name)
            if record_field not in record or record[record_field] is None:
                if spec.optional:
                    continue
                msg = f"required input {name!r} missing (field {record_field!r})"
                raise RecordError(msg, record_field)
            inputs[name] = item_array(record[record_field], spec, record_field)
        return inputs

    def answer(
        self, record: Mapping[str, Any], outputs: Mapping[str, np.ndarray]
    ) -> dict[str, Any]:
        """The sink record: the record's fields that are no pipeline input, then the outputs
        (item 0 of each, as JSON values) under their mapped names."""
        consumed = {self.field_of(name) for name in self.inputs}
        answer = {key: value for key, value in record.items() if key not in consumed}
        for name, array in outputs.items():
            answer[self.output_map.get(name, name)] = item_json(array)
        return answer


def item_array(value: Any, spec: TensorSpec, where: str) -> np.ndarray:
    """One item of ``spec`` from its JSON value, as a batch of one; raises :class:`RecordError`
    naming the field (``where``) on a wrong type, dtype, shape or bad base64."""
    if spec.dtype == "bytes":
        item = _bytes_item(value, where)
    elif spec.dtype == "string":
        item = _checked_strings(value, where)
    else:
        item = value
        if _has_strings(value):
            msg = f"field {where!r}: text for a {spec.describe()} input"
            raise RecordError(msg, where)
    try:
        array = as_array([item], spec)
    except ValueError as exc:
        msg = f"field {where!r}: {exc}"
        raise RecordError(msg, where) from exc
    try:
        got = dtype_of(array)
    except TypeError:
        got = None
    if got != spec.dtype:
        msg = f"field {where!r}: {array.dtype} values for a {spec.describe()} input"
        raise RecordError(msg, where)
    if not spec.accepts_item_shape(array.shape[1:]):
        msg = f"field {where!r}: shape {list(array.shape[1:])} for a {spec.describe()} input"
        raise RecordError(msg, where)
    return array


def _leaves(value: Any, convert: Callable[[str], Any], kind: str, where: str) -> Any:
    """``value``'s nested lists with every leaf, which must be text, passed to ``convert``."""
    if isinstance(value, list):
        return [_leaves(element, convert, kind, where) for element in value]
    if not isinstance(value, str):
        msg = f"field {where!r}: a {kind} input takes {_TEXT[kind]}, not {type(value).__name__}"
        raise RecordError(msg, where)
    return convert(value)


#: what a leaf of each text-carried kind of input is, for the messages
_TEXT = {"bytes": "base64 text", "string": "text"}


def _bytes_item(value: Any, where: str) -> Any:
    def decode(text: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            msg = f"field {where!r}: bad base64: {exc}"
            raise RecordError(msg, where) from exc

    return _leaves(value, decode, "bytes", where)


def _checked_strings(value: Any, where: str) -> Any:
    return _leaves(value, str, "string", where)


def _has_strings(value: Any) -> bool:
    if isinstance(value, list):
        return any(_has_strings(element) for element in value)
    return isinstance(value, str)


def item_json(array: np.ndarray) -> Any:
    """Item 0 of an output batch as a JSON value: nested lists of numbers, strings as they
    are, bytes as base64 text."""
    item = array[0] if array.ndim > 0 else array
    if array.dtype == object:
        return _object_json(np.asarray(item, dtype=object).tolist())
    return np.asarray(item).tolist()


def _object_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_object_json(element) for element in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def dead_letter(
    error_type: str,
    message: str,
    *,
    node: str | None = None,
    field: str | None = None,
    record: Any = None,
    line: str | None = None,
) -> dict[str, Any]:
    """The dead-letter record of a failed line: the error, and the record (or the raw line
    when it was no JSON object)."""
    error = {"type": error_type, "message": message, "node": node, "field": field}
    letter: dict[str, Any] = {"error": error}
    if record is not None:
        letter["record"] = record
    else:
        letter["line"] = line
    return letter


__all__ = [
    "INVALID_RECORD",
    "RecordError",
    "RecordMapping",
    "dead_letter",
    "item_array",
    "item_json",
]
