"""``tensorflow``: one signature of a TensorFlow SavedModel."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import numpy as np

from model_plugins.adapters._base import (
    Adapter,
    cast_input,
    cuda_index,
    model_path,
    no_gpu,
    spec_from,
)
from model_plugins.errors import PluginLoadError
from model_plugins.params import Params
from model_plugins.plugin import Batch, LoadContext
from model_plugins.specs import TensorSpec

#: the signature served when ``params.signature`` is absent
DEFAULT_SIGNATURE = "serving_default"


class SavedModelAdapter(Adapter):
    """Serves one signature of a TensorFlow SavedModel (``tf.saved_model.save``, Keras ``export``).

    The node::

        score:
          plugin: tensorflow
          model: models/scorer               # the SavedModel folder (saved_model.pb, variables/)
          inputs: {ids: $inputs.ids}         # signature input name -> reference
          params:
            signature: serving_default       # the default
            output_map: {scores: output_0}   # optional: node-side name -> signature name

    The signature states its inputs and outputs, so ``outputs:`` may be left out of the node:
    the adapter reports them after load (``loaded_inputs`` / ``loaded_outputs``), the batch
    dimension dropped and unknown sizes as -1.  Inputs are passed by keyword.  An input whose
    dtype differs from the signature's is cast when nothing can be lost (int32 -> int64,
    float16 -> float32); any other mismatch (int64 into int32) is an ``InvalidRequest``.
    ``tf.string`` inputs take ``string`` tensors; ``tf.string`` outputs are ``bytes``.

    Params:
        signature (str): the signature to serve (default ``serving_default``).
        input_map (dict[str, str]): node-side input name -> signature input name.
        output_map (dict[str, str]): node-side output name -> signature output name.

    A name absent from a map is the same on both sides.  The model runs under
    ``tf.device("/GPU:N")`` for ``cuda:N``, else ``/CPU:0``.
    """

    framework = "tensorflow"
    known_params: ClassVar[tuple[str, ...]] = ("signature", "input_map", "output_map")

    def __init__(self) -> None:
        super().__init__()
        self.function: Any = None
        self.root: Any = None  # the loaded object: the signature's variables live while it does
        self.device = "/CPU:0"
        self.input_dtypes: dict[str, np.dtype[Any] | None] = {}  # node name -> numpy dtype
        self.to_signature: dict[str, str] = {}  # node input name -> signature input name
        self.from_signature: dict[str, str] = {}  # signature output name -> node output name

    def load(self, context: LoadContext) -> None:
        """Load the SavedModel, pick the signature and read its input and output specs."""
        params = self.read_params(context)
        name = params.string("signature") or DEFAULT_SIGNATURE
        input_map = params.mapping("input_map")
        output_map = params.mapping("output_map")
        path = model_path(context, "a SavedModel folder (with saved_model.pb)")
        if not (path / "saved_model.pb").is_file():
            params.fail(f"model: must be a SavedModel folder with saved_model.pb (got {path})")
        index = cuda_index(context.device)
        self.device = f"/GPU:{index}" if index is not None else "/CPU:0"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if index is not None and not tf.config.list_physical_devices("GPU"):
            why = "tf.config.list_physical_devices('GPU') is empty"
            raise no_gpu(params.where, context.device, "TensorFlow", why)
        with tf.device(self.device):
            try:
                self.root = tf.saved_model.load(str(path))
            except (OSError, ValueError, tf.errors.OpError) as exc:
                msg = f"{params.where}: tf.saved_model.load({str(path)!r}) failed: {exc}"
                raise PluginLoadError(msg) from exc
        signatures = self.root.signatures
        if name not in signatures:
            params.fail(
                f"params.signature must be one of {', '.join(sorted(signatures)) or 'nothing'} "
                f"(got {name!r})"
            )
        self.function = signatures[name]
        _, inputs = self.function.structured_input_signature
        outputs = self.function.structured_outputs
        self.to_signature, self.loaded_inputs = _side(inputs, input_map, "input", params)
        from_node, self.loaded_outputs = _side(outputs, output_map, "output", params)
        self.from_signature = {sig: node for node, sig in from_node.items()}
        self.input_dtypes = {
            node: None if inputs[sig].dtype == tf.string else np.dtype(inputs[sig].dtype.name)
            for node, sig in self.to_signature.items()
        }

    def predict(self, batch: Batch) -> Batch:
        """Call the signature with the inputs by keyword; name its outputs node-side."""
        import tensorflow as tf

        if self.function is None:
            msg = "the model is not loaded"
            raise self.failure(msg)
        kwargs = {}
        for name, array in batch.items():
            if name not in self.to_signature:
                msg = (
                    f"unexpected input {name!r} (the signature takes: "
                    f"{', '.join(self.to_signature)})"
                )
                raise self.invalid(msg, field=f"inputs.{name}")
            target = self.input_dtypes[name]
            value = (
                array
                if target is None
                else cast_input(name, array, target, "signature", self.where)
            )
            kwargs[self.to_signature[name]] = tf.constant(value)
        missing = [name for name in self.to_signature if name not in batch]
        if missing:
            takes = ", ".join(self.to_signature)
            msg = f"input {missing[0]!r} is missing (the signature takes all of: {takes})"
            raise self.invalid(msg, field=f"inputs.{missing[0]}")
        with tf.device(self.device):
            result = self.function(**kwargs)
        return {self.from_signature[key]: value.numpy() for key, value in result.items()}

    def unload(self) -> None:
        """Drop the model."""
        self.function = self.root = None


def _side(
    specs: Any, renames: dict[str, str], what: str, params: Params
) -> tuple[dict[str, str], dict[str, TensorSpec]]:
    """``(node name -> signature name, node name -> spec)`` for a signature's inputs or outputs."""
    if not isinstance(specs, dict):
        params.fail(f"the signature's {what}s must be named (got {type(specs).__name__})")
    by_signature = {sig: node for node, sig in renames.items()}
    for node, sig in renames.items():
        if sig not in specs:
            params.fail(
                f"params.{what}_map: {node!r} must name a signature {what} "
                f"({', '.join(specs)}) (got {sig!r})"
            )
    names: dict[str, str] = {}
    found: dict[str, TensorSpec] = {}
    for sig, spec in specs.items():
        local = by_signature.get(sig, str(sig))
        names[local] = sig
        dtype = spec.dtype.name
        if dtype == "string":  # TF takes str or bytes, and gives bytes back
            dtype = "string" if what == "input" else "bytes"
        if spec.shape.rank is None:
            params.fail(f"signature {what} {sig!r} must have a known rank (got an unknown shape)")
        found[local] = spec_from(dtype, spec.shape.as_list(), f"{params.where}: {what} {sig!r}")
    return names, found


__all__ = ["DEFAULT_SIGNATURE", "SavedModelAdapter"]
