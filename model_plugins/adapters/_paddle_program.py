"""Read the declared feeds and fetches of a Paddle PIR program (``inference.json``).

The predictor reports input names but no dtypes or shapes, so they are read from the program:
each ``1.data`` op holds its ``name``, ``dtype`` and ``shape`` attributes, and each ``1.fetch``
op its ``name`` and the type of its result.  This is the layout Paddle 3.3 writes; anything
unexpected makes :func:`program_specs` give up (None) rather than guess.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from model_plugins.specs import NUMPY_DTYPES

#: PIR dense-tensor type tags -> dtype names
_TYPE_TAGS = {
    "0.t_bool": "bool",
    "0.t_ui8": "uint8",
    "0.t_i8": "int8",
    "0.t_i16": "int16",
    "0.t_i32": "int32",
    "0.t_i64": "int64",
    "0.t_f16": "float16",
    "0.t_f32": "float32",
    "0.t_f64": "float64",
}

#: name -> (dtype, full shape with -1 for unknown sizes)
Declared = dict[str, tuple[str, list[int]]]


def program_specs(path: Path) -> tuple[Declared, Declared] | None:
    """``(feeds, fetches)`` declared by a PIR program file, or None if it cannot be read."""
    try:
        program = json.loads(path.read_text())
        if program["base_code"]["magic"] != "pir":
            return None
        feeds: Declared = {}
        fetches: Declared = {}
        for op in _ops(program["program"]):
            if op.get("#") == "1.data":
                attrs = {a["N"]: a["AT"]["D"] for a in op["A"]}
                feeds[attrs["name"]] = (str(attrs["dtype"]), [int(d) for d in attrs["shape"]])
            elif op.get("#") == "1.fetch":
                attrs = {a["N"]: a["AT"]["D"] for a in op["A"]}
                tag, shape = op["O"][0]["TT"]["D"][:2]
                fetches[attrs["name"]] = (_TYPE_TAGS.get(tag["#"], tag["#"]), list(shape))
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    known = all(dtype in NUMPY_DTYPES for dtype, _ in [*feeds.values(), *fetches.values()])
    return (feeds, fetches) if known and feeds else None


def _ops(node: Any) -> Iterator[dict[str, Any]]:
    """Every op of every block of every region, nested ones included."""
    for region in node.get("regions", []):
        for block in region.get("blocks", []):
            for op in block.get("ops", []):
                yield op
                yield from _ops(op)


__all__ = ["program_specs"]
