"""Test a plugin without a server: load it, feed it batches, check what it returns.

>>> import numpy as np
>>> from model_plugins.builtins.identity import Identity
>>> with PluginHarness(Identity) as harness:
...     out = harness.predict({"x": [[1.0, 2.0], [3.0, 4.0]]})
>>> out["x"].shape
(2, 2)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from model_plugins.contract import check_inputs, check_outputs
from model_plugins.errors import InvalidRequest
from model_plugins.plugin import Batch, LoadContext, ModelPlugin
from model_plugins.specs import NUMPY_DTYPES, OBJECT_DTYPES, TensorSpec, dtype_of


def _to_array(name: str, value: object, spec: TensorSpec | None) -> np.ndarray:
    """Turn a list (or tuple) into an array of the declared dtype; pass arrays through."""
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, (list, tuple)):
        msg = f"input {name!r} must be a numpy array or a list (got {type(value).__name__})"
        raise InvalidRequest(msg, field=f"inputs.{name}")
    if spec is not None and spec.dtype in OBJECT_DTYPES:
        return np.array(value, dtype=object)
    try:
        array = np.array(value)
    except ValueError as exc:  # ragged nesting: numpy refuses to guess
        msg = f"input {name!r} is not a rectangular list: {exc}"
        raise InvalidRequest(msg, field=f"inputs.{name}") from exc
    if array.dtype.kind in "US":
        return np.array(value, dtype=object)
    if spec is not None:
        target = NUMPY_DTYPES[spec.dtype]
        # Cast only where nothing is lost in kind (ints -> float32, float64 -> float32);
        # a list of floats for an int input stays float and fails the dtype check.
        if np.can_cast(array.dtype, target, casting="same_kind"):
            return array.astype(target)
    return array


class PluginHarness:
    """Runs one plugin in this process the way the engine would, checking the batch contract.

    The harness builds the :class:`LoadContext` the engine would build, converts list inputs
    to numpy, checks inputs against the plugin's input specs, calls ``predict`` and checks that
    every declared output is there with its dtype, item shape and one item per input item.
    Exceptions that ``load`` or ``predict`` raise reach the caller unchanged.

    The specs come from the plugin's ``signature(params, upstream)``.  ``upstream`` is what the
    pipeline would wire into the node; by default the harness derives it from each batch (the
    dtype and item shape of each array it is given).

    Args:
        plugin: a :class:`ModelPlugin` subclass (created with no arguments) or an instance.
        params: the node's ``params:``.
        model_path: the node's ``model:`` (a file or folder).
        device: ``cpu`` or ``cuda:N``.
        node: the node name the plugin sees in its context and the errors name.
        upstream: the specs wired into the node (None where unknown), as the pipeline would
            give them, instead of deriving them from each batch.
        join: ``all`` requires every non-optional input; ``available`` (as a node with
            ``join: available``) lets inputs be absent.

    Example::

        with PluginHarness(MiniLMEncoder, model_path="models/minilm") as harness:
            out = harness.predict({"text": ["a post", "another post"]})
        assert out["embedding"].shape == (2, 384)
    """

    def __init__(
        self,
        plugin: type[ModelPlugin] | ModelPlugin,
        *,
        params: Mapping[str, Any] | None = None,
        model_path: str | Path | None = None,
        device: str = "cpu",
        node: str = "harness",
        upstream: Mapping[str, TensorSpec | None] | None = None,
        join: Literal["all", "available"] = "all",
    ) -> None:
        self.plugin: ModelPlugin = plugin() if isinstance(plugin, type) else plugin
        cls = type(self.plugin)
        #: the plugin reference that errors name: ``module:Class``
        self.reference = f"{cls.__module__}:{cls.__qualname__}"
        self.context = LoadContext(
            node=node,
            plugin=self.reference,
            model_path=Path(model_path) if model_path is not None else None,
            device=device,
            params=dict(params or {}),
        )
        self.upstream = dict(upstream) if upstream is not None else None
        self.join = join
        self.loaded = False

    def signature(
        self, upstream: Mapping[str, TensorSpec | None] | None = None
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """The plugin's ``(inputs, outputs)`` specs for this harness's params.

        Args:
            upstream: the wired specs; defaults to the ``upstream`` given to the harness, or
                nothing known.
        """
        if upstream is None:
            upstream = self.upstream or {}
        return type(self.plugin).signature(self.context.params, upstream)

    def load(self) -> None:
        """Call the plugin's ``load`` with the harness's context, as the engine does once."""
        self.plugin.load(self.context)
        self.loaded = True

    def predict(self, batch: Mapping[str, Any], *, n_items: int | None = None) -> Batch:
        """Check ``batch``, run ``predict`` on it, check and return the outputs.

        Args:
            batch: input name -> numpy array or (nested) list; the first dimension is items.
            n_items: the number of items, needed only when ``batch`` is empty.

        Returns:
            The plugin's outputs, checked.

        Raises:
            RuntimeError: :meth:`load` has not run.
            InvalidRequest: the batch does not fit the input specs.
            BatchContractError: an output does not hold one item per input item.
            InferenceError: an output is missing or has the wrong dtype or item shape.
        """
        if not self.loaded:
            msg = "call load() first, or use the harness as a context manager"
            raise RuntimeError(msg)
        where = f"node {self.context.node!r} (plugin {self.reference!r})"
        # the declared dtypes, to convert lists with, before the arrays tell what they are
        declared, _ = self.signature(self.upstream or {name: None for name in batch})
        arrays: Batch = {
            name: _to_array(name, value, declared.get(name)) for name, value in batch.items()
        }
        if self.upstream is not None:
            inputs, outputs = self.signature(self.upstream)
        else:
            try:
                seen = {name: TensorSpec(dtype_of(a), a.shape[1:]) for name, a in arrays.items()}
            except TypeError as exc:
                msg = f"{where}: {exc}"
                raise InvalidRequest(msg, field="inputs") from exc
            inputs, outputs = self.signature(seen)
        found = check_inputs(inputs, arrays, where=where, partial=self.join == "available")
        expected = found if found is not None else n_items
        if expected is None:
            msg = "the batch is empty: pass n_items to say how many items the outputs must have"
            raise ValueError(msg)
        result = self.plugin.predict(arrays)
        return check_outputs(
            outputs, result, expected, plugin=self.reference, node=self.context.node
        )

    def unload(self) -> None:
        """Call the plugin's ``unload`` (once, if it was loaded)."""
        if self.loaded:
            self.loaded = False
            self.plugin.unload()

    def __enter__(self) -> PluginHarness:
        self.load()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.unload()


__all__ = ["PluginHarness"]
