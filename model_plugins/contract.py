"""The batch contract, checked: what goes into ``predict`` and what must come out.

A batch maps each tensor name to a numpy array whose first dimension is the item dimension;
every input and every output of one call holds the same number of items N.  These functions
check that, and the declared dtype and per-item shape of each tensor.  The engine calls them
around every node; :class:`~model_plugins.harness.PluginHarness` calls them in tests.

>>> from model_plugins.specs import TensorSpec
>>> specs = {"x": TensorSpec("float32", [2])}
>>> check_inputs(specs, {"x": np.zeros((3, 2), np.float32)}, where="node 'n'")
3
>>> try:
...     check_outputs(specs, {"x": np.zeros((2, 2), np.float32)}, 3, plugin="p")
... except BatchContractError as exc:
...     (exc.expected, exc.actual)
(3, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from model_plugins.errors import (
    BatchContractError,
    DagserveError,
    InferenceError,
    InvalidRequest,
    node_label,
)
from model_plugins.partial import Partial
from model_plugins.plugin import Batch
from model_plugins.specs import OBJECT_DTYPES, TensorSpec, dtype_of

#: the Python types an element of each object dtype may have
_ELEMENT_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "bytes": (bytes, bytearray, memoryview),
}


def _dtype_problem(spec: TensorSpec, array: np.ndarray) -> str | None:
    """Why ``array`` does not hold ``spec.dtype``, or None when it does."""
    try:
        got = dtype_of(array)
    except TypeError as exc:
        return str(exc)
    if got != spec.dtype:
        return f"must be {spec.dtype} (got {got})"
    if spec.dtype in OBJECT_DTYPES and array.dtype.kind == "O":
        # dtype_of looks at the first element only; one stray element must not slip through.
        allowed = _ELEMENT_TYPES[spec.dtype]
        for index, element in enumerate(array.flat):
            if not isinstance(element, allowed):
                return f"must hold {spec.dtype} (element {index} is {type(element).__name__})"
    return None


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_inputs(
    specs: Mapping[str, TensorSpec],
    batch: Mapping[str, Any],
    *,
    where: str,
    partial: bool = False,
) -> int | None:
    """Check a batch against the input specs of a node, before ``predict`` sees it.

    Args:
        specs: input name -> spec of one item, as the plugin's ``signature`` gives them.
        batch: input name -> numpy array, first dimension = items.
        where: who receives the batch, for the messages (``"node 'decode'"``).
        partial: accept absent inputs even when not optional (a node with ``join: available``).

    Returns:
        The number of items N shared by every input, or None for an empty batch.

    Raises:
        InvalidRequest: an input is unexpected, missing, not an array, of the wrong dtype or
            item shape, or the inputs disagree on N.  ``field`` is ``inputs.NAME[.dtype|.shape]``.
    """
    for name in batch:
        if name not in specs:
            declared = ", ".join(specs) or "none"
            msg = f"{where}: unexpected input {name!r} (declared: {declared})"
            raise InvalidRequest(msg, field=f"inputs.{name}")
    if not partial:
        for name, spec in specs.items():
            if name not in batch and not spec.optional:
                msg = f"{where}: required input {name!r} ({spec.describe()}) is missing"
                raise InvalidRequest(msg, field=f"inputs.{name}")
    n_items: int | None = None
    first: str | None = None
    for name, array in batch.items():
        spec = specs[name]
        if not isinstance(array, np.ndarray):
            msg = f"{where}: input {name!r} must be a numpy array (got {type(array).__name__})"
            raise InvalidRequest(msg, field=f"inputs.{name}")
        problem = _dtype_problem(spec, array)
        if problem is not None:
            msg = f"{where}: input {name!r} {problem}"
            raise InvalidRequest(msg, field=f"inputs.{name}.dtype")
        if array.ndim == 0:
            msg = f"{where}: input {name!r} is a scalar; its first dimension must be the items"
            raise InvalidRequest(msg, field=f"inputs.{name}.shape")
        if not spec.accepts_item_shape(array.shape[1:]):
            msg = (
                f"{where}: input {name!r} must have items of shape {spec.describe()} "
                f"(got items of shape {_shape_text(array.shape[1:])})"
            )
            raise InvalidRequest(msg, field=f"inputs.{name}.shape")
        if n_items is None:
            n_items, first = array.shape[0], name
        elif array.shape[0] != n_items:
            msg = (
                f"{where}: inputs disagree on the number of items: "
                f"{first!r} has {n_items}, {name!r} has {array.shape[0]}"
            )
            raise InvalidRequest(msg, field=f"inputs.{name}.shape")
    return n_items


def check_outputs(
    specs: Mapping[str, TensorSpec],
    outputs: object,
    n_items: int | None,
    *,
    plugin: str,
    node: str | None = None,
) -> Batch:
    """Check what ``predict`` returned against the output specs and the batch contract.

    Every declared output must be present (unless its spec is optional), be a numpy array of
    the declared dtype and item shape, and hold exactly ``n_items`` items.  Outputs that are not
    declared are returned unchecked, except that arrays among them must also hold ``n_items``
    (the batcher splits every array it gets back).

    Args:
        specs: output name -> spec of one item.
        outputs: what ``predict`` returned.
        n_items: N, the number of items of the batch that went in (None: a node without
            inputs, whose outputs may hold any number of items).
        plugin: the plugin reference, for the messages.
        node: the pipeline node, for the messages, when there is one.

    Returns:
        ``outputs`` as a dict.

    Raises:
        BatchContractError: an output holds a different number of items than the batch.
        InferenceError: the result is not a dict, or an output is missing or has the wrong
            dtype or item shape.
    """

    def fail(message: str) -> InferenceError:
        where = node_label(node, plugin)
        return InferenceError(f"{where}: {message}", node=node, plugin=plugin)

    if not isinstance(outputs, Mapping):
        msg = f"predict() must return a dict of arrays (got {type(outputs).__name__})"
        raise fail(msg)
    result: Batch = dict(outputs)
    for name, spec in specs.items():
        if name not in result:
            if spec.optional:
                continue
            returned = ", ".join(map(repr, result)) or "nothing"
            msg = f"predict() did not return output {name!r} (returned {returned})"
            raise fail(msg)
        array = result[name]
        if not isinstance(array, np.ndarray):
            msg = f"output {name!r} must be a numpy array (got {type(array).__name__})"
            raise fail(msg)
        problem = _dtype_problem(spec, array)
        if problem is not None:
            msg = f"output {name!r} {problem}"
            raise fail(msg)
    for name, array in result.items():
        if not isinstance(array, np.ndarray):
            continue
        if array.ndim == 0:
            msg = f"output {name!r} is a scalar; its first dimension must be the items"
            raise fail(msg)
        if n_items is not None and array.shape[0] != n_items:
            raise BatchContractError(plugin, name, n_items, array.shape[0], node=node)
    for name, spec in specs.items():
        if name in result and not spec.accepts_item_shape(result[name].shape[1:]):
            msg = (
                f"output {name!r} must have items of shape {spec.describe()} "
                f"(got items of shape {_shape_text(result[name].shape[1:])})"
            )
            raise fail(msg)
    return result


def check_result(
    specs: Mapping[str, TensorSpec],
    result: object,
    n_items: int | None,
    *,
    plugin: str,
    node: str | None = None,
) -> Batch | Partial:
    """:func:`check_outputs` for anything ``predict`` may return, a :class:`Partial` included.

    A ``Partial`` still holds a row for every item, and each of its errors must be a
    :class:`DagserveError` for an item in ``range(n_items)``.

    Returns:
        ``result`` checked: a dict, or a ``Partial`` whose errors are keyed by ``int``.

    Raises:
        BatchContractError, InferenceError: as :func:`check_outputs`, or a ``Partial``'s
            errors are not a mapping of item indices to ``DagserveError``.
    """
    if not isinstance(result, Partial):
        return check_outputs(specs, result, n_items, plugin=plugin, node=node)
    outputs = check_outputs(specs, result.outputs, n_items, plugin=plugin, node=node)
    where = node_label(node, plugin)
    if not isinstance(result.errors, Mapping):
        msg = f"{where}: Partial.errors must be a dict (got {type(result.errors).__name__})"
        raise InferenceError(msg, node=node, plugin=plugin)
    errors: dict[int, DagserveError] = {}
    for index, error in result.errors.items():
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            msg = f"{where}: Partial.errors must be keyed by item index (got {index!r})"
            raise InferenceError(msg, node=node, plugin=plugin)
        if index < 0 or (n_items is not None and index >= n_items):
            msg = f"{where}: Partial.errors names item {index}, but the batch has {n_items} items"
            raise InferenceError(msg, node=node, plugin=plugin)
        if not isinstance(error, DagserveError):
            msg = (
                f"{where}: the error of item {index} must be a DagserveError such as "
                f"InvalidRequest or InferenceError (got {type(error).__name__}: {error})"
            )
            raise InferenceError(msg, node=node, plugin=plugin)
        errors[int(index)] = error
    return Partial(outputs, errors)


__all__ = ["check_inputs", "check_outputs", "check_result"]
