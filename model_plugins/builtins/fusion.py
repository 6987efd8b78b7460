"""``concat_fusion`` and ``weighted_mean_fusion``: join several embeddings into one.

Both take any number of float32[D] inputs, under any names, and give ``embedding``.  They are
meant for nodes with ``join: available``, where an absent optional branch is simply missing
from the batch.  Bad params raise :class:`~model_plugins.errors.PluginLoadError` (at validation
and at load); width mismatches in a batch raise a plain ``ValueError``, which the engine wraps in
an ``InferenceError`` naming the node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from model_plugins.params import Params
from model_plugins.plugin import Batch, LoadContext, ModelPlugin, Signature
from model_plugins.specs import TensorSpec

#: below this L2 norm a vector is left as it is rather than divided (all-zero rows stay zero)
_EPSILON = 1e-12


def _positive_ints(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value.values())
    )


def _weights(value: object) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in value.values()
    )


def _width(spec: TensorSpec | None) -> int | None:
    """The fixed width D of a float32[D] spec, None when unknown or not of that form."""
    if spec is None or spec.dtype != "float32" or len(spec.shape) != 1 or spec.shape[0] == -1:
        return None
    return spec.shape[0]


def _rows(plugin: str, batch: Batch) -> tuple[dict[str, np.ndarray], int]:
    """The inputs as float32 [N, D] arrays, and N; ValueError unless all are [N, D_i]."""
    rows: dict[str, np.ndarray] = {}
    n_items: int | None = None
    for name, array in batch.items():
        if array.ndim != 2:
            msg = f"{plugin}: input {name!r} must be [N, D] (got shape {list(array.shape)})"
            raise ValueError(msg)
        if n_items is not None and array.shape[0] != n_items:
            msg = f"{plugin}: input {name!r} has {array.shape[0]} items, the others {n_items}"
            raise ValueError(msg)
        n_items = array.shape[0]
        rows[name] = np.asarray(array, dtype=np.float32)
    if n_items is None:
        msg = f"{plugin}: no input is present; there is nothing to fuse"
        raise ValueError(msg)
    return rows, n_items


def l2_normalize(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm; rows of (near) zero norm are left unchanged.

    >>> l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32))
    array([[0.6, 0.8],
           [0. , 0. ]], dtype=float32)
    """
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    scaled: np.ndarray = rows / np.maximum(norms, _EPSILON)
    return scaled.astype(np.float32, copy=False)


class ConcatFusion(ModelPlugin):
    """Concatenates float32[D_i] inputs into ``embedding``, float32[sum of D_i].

    The parts follow the order of the node's ``inputs:`` mapping.

    Params:

    * ``dims: {name: D}`` (optional): the width of each input.  With it the output width is
      fixed, ``sum(dims.values())``: an absent input is zero-filled in its slot, and the slots
      follow the order of ``dims`` (which must list the node's inputs in their order; a name
      in ``dims`` that is not an input is an always-zero slot).  Without it the output is the
      present inputs side by side, so its width changes when one is absent: with
      ``join: available``, give ``dims``.
    * ``normalize`` (default false): L2-normalise each part before concatenating (zero-filled
      parts stay zero).

    >>> import numpy as np
    >>> fusion = ConcatFusion()
    >>> params = {"dims": {"a": 2, "b": 1}}
    >>> fusion.load(LoadContext(node="fuse", plugin="concat_fusion", params=params))
    >>> fusion.predict({"b": np.ones((1, 1), np.float32)})["embedding"]
    array([[0., 0., 1.]], dtype=float32)
    """

    outputs: ClassVar[Mapping[str, TensorSpec]] = {"embedding": TensorSpec("float32", [-1])}
    #: cheap: the engine may run it in the event loop rather than in a thread
    _inline: ClassVar[bool] = True
    #: the ``params:`` keys it reads
    known_params: ClassVar[tuple[str, ...]] = ("dims", "normalize")

    dims: dict[str, int] | None
    normalize: bool

    @staticmethod
    def _parse(params: Params) -> tuple[dict[str, int] | None, bool]:
        must = "a mapping of each input name to a positive integer"
        dims = params.value("dims", None, ok=_positive_ints, must=must)
        return (dict(dims) if dims is not None else None), params.flag("normalize", False)

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """One float32[D] input per upstream tensor; ``embedding`` of the summed width.

        The width is fixed when ``dims`` is given (its sum), or when every upstream spec is a
        known float32[D]; otherwise it is -1 (any).

        >>> spec = TensorSpec("float32", [4])
        >>> ConcatFusion.signature({}, {"a": spec, "b": spec})[1]["embedding"].describe()
        'float32[8]'

        Raises:
            PluginLoadError: bad params, an input missing from ``dims``, or ``dims`` in
                another order than the inputs.
        """
        checked = Params(params, cls.known_params)
        dims, _ = cls._parse(checked)
        if dims is not None:
            missing = [name for name in upstream if name not in dims]
            if missing:
                checked.fail(f"params.dims gives no width for input(s) {', '.join(missing)}")
            order = [name for name in dims if name in upstream]
            if order != list(upstream):
                checked.fail(
                    "params.dims must list the inputs in the order of the node's inputs "
                    f"({', '.join(upstream)}; dims has {', '.join(order)})"
                )
            inputs = {name: TensorSpec("float32", [dims[name]]) for name in upstream}
            return inputs, {"embedding": TensorSpec("float32", [sum(dims.values())])}
        widths = [_width(spec) for spec in upstream.values()]
        inputs = {
            name: TensorSpec("float32", [width if width is not None else -1])
            for name, width in zip(upstream, widths, strict=True)
        }
        known = [w for w in widths if w is not None]
        total = sum(known) if upstream and len(known) == len(widths) else -1
        return inputs, {"embedding": TensorSpec("float32", [total])}

    def load(self, context: LoadContext) -> None:
        """Validate the node's params.

        Raises:
            PluginLoadError: bad ``dims`` or ``normalize``.
        """
        self.dims, self.normalize = self._parse(Params.of(context, self.known_params))

    def predict(self, batch: Batch) -> Batch:
        """``embedding``: the present inputs (and zeros for absent ones, with ``dims``).

        Raises:
            ValueError: inputs are not [N, D], disagree on N, are absent from ``dims`` or
                have another width than ``dims`` says.
        """
        rows, n_items = _rows("concat_fusion", batch)
        if self.normalize:
            rows = {name: l2_normalize(part) for name, part in rows.items()}
        if self.dims is None:
            parts = list(rows.values())
        else:
            extra = [name for name in rows if name not in self.dims]
            if extra:
                msg = f"concat_fusion: dims gives no width for input(s) {', '.join(extra)}"
                raise ValueError(msg)
            parts = []
            for name, width in self.dims.items():
                part = rows.get(name)
                if part is None:
                    part = np.zeros((n_items, width), dtype=np.float32)
                elif part.shape[1] != width:
                    msg = (
                        f"concat_fusion: input {name!r} has width {part.shape[1]} "
                        f"but dims says {width}"
                    )
                    raise ValueError(msg)
                parts.append(part)
        return {"embedding": np.concatenate(parts, axis=1)}


class WeightedMeanFusion(ModelPlugin):
    """The weighted mean of float32[D] inputs of one width D, as ``embedding`` float32[D].

    Params:

    * ``weights: {name: w}`` (optional): the weight of each input (default 1.0 each, any
      name not listed too); weights must be >= 0.  The mean is renormalised over the inputs
      that are present: ``sum(w_i * x_i) / sum(w_i)`` over present inputs only.
    * ``normalize`` (default true): L2-normalise the result.

    >>> import numpy as np
    >>> fusion = WeightedMeanFusion()
    >>> params = {"weights": {"a": 3.0, "b": 1.0}, "normalize": False}
    >>> fusion.load(LoadContext(node="fuse", plugin="weighted_mean_fusion", params=params))
    >>> fusion.predict({"a": np.ones((1, 2), np.float32), "b": np.zeros((1, 2), np.float32)})
    {'embedding': array([[0.75, 0.75]], dtype=float32)}
    """

    outputs: ClassVar[Mapping[str, TensorSpec]] = {"embedding": TensorSpec("float32", [-1])}
    #: cheap: the engine may run it in the event loop rather than in a thread
    _inline: ClassVar[bool] = True
    #: the ``params:`` keys it reads
    known_params: ClassVar[tuple[str, ...]] = ("weights", "normalize")

    weights: dict[str, float]
    normalize: bool

    @staticmethod
    def _parse(params: Params) -> tuple[dict[str, float], bool]:
        must = "a mapping of input names to numbers >= 0"
        weights = params.value("weights", {}, ok=_weights, must=must)
        normalize = params.flag("normalize", True)
        return {name: float(w) for name, w in weights.items()}, normalize

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """float32[D] inputs of one width, ``embedding`` float32[D] (-1 while D is unknown).

        >>> spec = TensorSpec("float32", [4])
        >>> WeightedMeanFusion.signature({}, {"a": spec, "b": None})[1]["embedding"].describe()
        'float32[4]'

        Raises:
            PluginLoadError: bad params.
            ValueError: upstream specs of different widths.
        """
        cls._parse(Params(params, cls.known_params))
        widths = {name: _width(spec) for name, spec in upstream.items()}
        known = {w for w in widths.values() if w is not None}
        if len(known) > 1:
            listed = ", ".join(f"{name}: {w}" for name, w in widths.items() if w is not None)
            msg = f"weighted_mean_fusion: inputs must share one width (got {listed})"
            raise ValueError(msg)
        width = known.pop() if known else -1
        inputs = {name: TensorSpec("float32", [width]) for name in upstream}
        return inputs, {"embedding": TensorSpec("float32", [width])}

    def load(self, context: LoadContext) -> None:
        """Validate the node's params.

        Raises:
            PluginLoadError: bad ``weights`` or ``normalize``.
        """
        self.weights, self.normalize = self._parse(Params.of(context, self.known_params))

    def predict(self, batch: Batch) -> Batch:
        """``embedding``: the weighted mean of the present inputs.

        Raises:
            ValueError: inputs are not [N, D], disagree on N or D, or the present inputs'
                weights sum to 0.
        """
        rows, n_items = _rows("weighted_mean_fusion", batch)
        widths = {name: part.shape[1] for name, part in rows.items()}
        if len(set(widths.values())) > 1:
            listed = ", ".join(f"{name}: {w}" for name, w in widths.items())
            msg = f"weighted_mean_fusion: inputs must share one width (got {listed})"
            raise ValueError(msg)
        total_weight = sum(self.weights.get(name, 1.0) for name in rows)
        if total_weight <= 0:
            present = ", ".join(rows)
            msg = f"weighted_mean_fusion: the weights of the present inputs ({present}) sum to 0"
            raise ValueError(msg)
        width = next(iter(widths.values()))
        mean = np.zeros((n_items, width), dtype=np.float32)
        for name, part in rows.items():
            mean += np.float32(self.weights.get(name, 1.0) / total_weight) * part
        return {"embedding": l2_normalize(mean) if self.normalize else mean}


__all__ = ["ConcatFusion", "WeightedMeanFusion", "l2_normalize"]
