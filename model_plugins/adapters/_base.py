"""What the adapters share: parameter checks, the model path, specs and safe casts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model_plugins.errors import InferenceError, InvalidRequest, PluginLoadError, node_label
from model_plugins.params import Params
from model_plugins.plugin import LoadContext, ModelPlugin, Signature
from model_plugins.specs import NUMPY_DTYPES, TensorSpec


class Adapter(ModelPlugin):
    """A plugin whose tensor specs come from the model file, known only once it is loaded.

    Before load, the node's inputs mirror what is wired into them and its outputs are what the
    node's ``outputs:`` declares.  Its ``load`` sets ``loaded_inputs`` / ``loaded_outputs`` to
    the specs the model file states, where it states them (None where it does not).
    """

    #: the ``params:`` keys the adapter understands; any other key is an error
    known_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.node: str | None = None
        self.reference: str | None = None
        self.where = "adapter"

    def read_params(self, context: LoadContext) -> Params:
        """Check the node's params against :attr:`known_params`; remember the node for errors."""
        params = Params.of(context, self.known_params)
        self.node, self.reference, self.where = context.node, context.plugin, params.where
        return params

    def invalid(self, message: str, field: str) -> InvalidRequest:
        """A request error naming the node."""
        return InvalidRequest(f"{self.where}: {message}", field=field)

    def failure(self, message: str) -> InferenceError:
        """A run-time error naming the node."""
        return InferenceError(f"{self.where}: {message}", node=self.node, plugin=self.reference)

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """Inputs mirror the wired tensors whose spec is known; outputs come from the node."""
        known = {name: spec for name, spec in upstream.items() if spec is not None}
        return known, {}


def model_path(context: LoadContext, what: str) -> Path:
    """The node's ``model:``, which must exist.

    Args:
        context: the load context.
        what: what the file is, for the messages (``"a TorchScript file"``).

    Raises:
        PluginLoadError: ``model:`` is not set, or names nothing on disk.
    """
    where = node_label(context.node, context.plugin)
    if context.model_path is None:
        msg = f"{where}: model: must name {what} (got nothing)"
        raise PluginLoadError(msg)
    path = Path(context.model_path)
    if not path.exists():
        msg = f"{where}: model file not found: {path.resolve()} (model: must name {what})"
        raise PluginLoadError(msg)
    return path


def cuda_index(device: str) -> int | None:
    """``cuda:N`` -> N; ``cpu`` -> None."""
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return int(index or 0)
    return None


def no_gpu(where: str, device: str, framework: str, why: str) -> PluginLoadError:
    """The error of a node placed on a GPU that its framework cannot use.

    Raised at load rather than letting the framework fall back to the CPU unannounced
    (TensorFlow's soft placement does) or fail later on the first batch.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")
    msg = (
        f"{where}: placed on {device}, but {framework} in this worker cannot use a GPU: {why} "
        f"(CUDA_VISIBLE_DEVICES={visible}); install a CUDA build of {framework} or set "
        "device: cpu on the node"
    )
    return PluginLoadError(msg)


def spec_from(dtype: str, dims: Sequence[int | None], what: str) -> TensorSpec:
    """The spec of one item of a batched tensor: drop the batch dimension, None -> -1.

    Raises:
        PluginLoadError: the tensor has no batch dimension or a dtype dagserve lacks.
    """
    if len(dims) == 0:
        msg = f"{what} is a scalar: an adapter needs a first (batch) dimension"
        raise PluginLoadError(msg)
    if dtype not in NUMPY_DTYPES:
        msg = f"{what} has dtype {dtype}, which dagserve does not carry"
        raise PluginLoadError(msg)
    return TensorSpec(dtype, [-1 if d is None or d < 0 else int(d) for d in dims[1:]])  # type: ignore[arg-type]


def cast_input(
    name: str, array: np.ndarray, target: np.dtype[Any], model: str, where: str
) -> np.ndarray:
    """``array`` as ``target`` when the cast loses nothing (int32 -> int64), else an error.

    Raises:
        InvalidRequest: the cast could lose values (int64 -> int32, float -> int).
    """
    if array.dtype == target:
        return array
    if array.dtype.kind != "O" and np.can_cast(array.dtype, target, casting="safe"):
        return array.astype(target)
    msg = (
        f"{where}: input {name!r} must be {target.name} for the {model} (got {array.dtype.name}); "
        "only casts that lose nothing are made"
    )
    raise InvalidRequest(msg, field=f"inputs.{name}.dtype")


__all__ = ["Adapter", "cast_input", "cuda_index", "model_path", "no_gpu", "spec_from"]
