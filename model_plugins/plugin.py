"""The plugin interface: what a model author writes.

A plugin is a class with two declarations and two methods::

    class MiniLMEncoder(ModelPlugin):
        inputs = {"text": TensorSpec("string", [])}
        outputs = {"embedding": TensorSpec("float32", [384])}

        def load(self, context): ...
        def predict(self, batch): ...
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from model_plugins.partial import Partial
from model_plugins.specs import TensorSpec

Framework = Literal["torch", "tensorflow", "paddle"]

#: what ``predict`` takes and returns: tensor name -> array whose first dimension is the item
Batch = dict[str, np.ndarray]
#: what ``signature`` returns: ``(inputs, outputs)``, tensor name -> spec of one item
Signature = tuple[dict[str, TensorSpec], dict[str, TensorSpec]]


@dataclass(frozen=True)
class LoadContext:
    """Everything a plugin's ``load`` may need, fixed for the life of the loaded model.

    Attributes:
        node: the pipeline node this instance serves.
        plugin: the plugin reference as written in the pipeline (``identity``, ``pkg.mod:Class``).
        model_path: ``model:`` of the node, resolved against the pipeline file's folder, or None.
        device: where to run, as this process sees it: ``cpu`` or ``cuda:N``.  A model worker
            is started with ``CUDA_VISIBLE_DEVICES`` set to the one card placement gave it,
            so a model placed on any card is told ``cuda:0``; the card's physical index
            (NVML's numbering) appears in the placement log, ``health`` and metrics.
        params: ``params:`` of the node, as written in the YAML.
        pipeline_dir: the folder of the pipeline file (for relative paths inside ``params``).
        instance: which of the node's ``instances`` this is, from 0.
    """

    node: str
    plugin: str
    model_path: Path | None = None
    device: str = "cpu"
    params: Mapping[str, Any] = field(default_factory=dict)
    pipeline_dir: Path = field(default_factory=Path.cwd)
    instance: int = 0


class ModelPlugin:
    """Base class of every node that a pipeline runs.

    What dagserve reads from a plugin is exactly what is listed below; the names of this
    class that start with ``_`` are dagserve's own, not for plugins to set.

    **Declarations** (class attributes):

    * ``inputs`` / ``outputs``: tensor name -> :class:`TensorSpec` of one item.  The engine
      checks what it hands to ``predict`` and what ``predict`` returns against them.  When the
      specs depend on the node's ``params:`` or on what feeds it, override :meth:`signature`
      instead: ``dagserve validate``, ``dagserve serve`` and :class:`PluginHarness` all call it
      (the server in a separate process, so that a plugin's imports never enter its own).
    * ``framework``: ``"torch"``, ``"tensorflow"``, ``"paddle"`` or None for plain numpy.
      It decides which worker process hosts the plugin; a node's ``framework:`` overrides it.
    * Variable-length inputs under dynamic batching.  By default only items of the same
      shape share a batch.  ``padding`` (input name -> pad value) lets items of different
      shapes share one: those inputs are padded at the end of each dimension to the largest
      item.  ``padded_outputs`` (output name -> (input name, dimension)) says which output
      dimension follows a padded input's dimension; it is cut back to each item's length.
      ``ragged = True`` hands ``predict`` lists of per-item arrays instead.
    * ``retry_on_worker_loss`` (default True): models of one framework and device share a
      worker process, so another model's crash (a segfault, an abort, an OOM kill) can end
      the worker while a call of this one is in flight on it.  Such a call, which did not
      cause the crash (it was waiting, or running on another thread than the one that
      crashed), is sent again to the replacement worker, within the request's deadline:
      ``predict`` is assumed free of side effects, so running it twice is harmless.
      Declare ``retry_on_worker_loss = False`` when it is not (it calls out, or counts): the
      call then fails with ``InferenceError``.  The call that crashed the worker is never
      sent again.

    **Stated on load** (instance attributes, set in :meth:`load`): ``loaded_inputs`` /
    ``loaded_outputs``, for a plugin that learns its specs only from the model file (the
    framework adapters do).  Left None, the declarations above stand; set, the worker reports
    them and the server checks them against the pipeline (and adopts output specs where the
    pipeline declares none), as :meth:`PluginHarness.declared` shows.

    **Lifecycle**: the engine creates the object with no arguments, calls :meth:`load` once,
    then :meth:`predict` once per batch, possibly from several threads at once when the node
    has ``instances`` > 1 and the plugin is thread-safe, and :meth:`unload` at shutdown.
    Plugin objects are never modified by the engine.
    """

    inputs: ClassVar[Mapping[str, TensorSpec]] = {}
    outputs: ClassVar[Mapping[str, TensorSpec]] = {}
    framework: ClassVar[Framework | None] = None
    padding: ClassVar[Mapping[str, Any]] = {}
    padded_outputs: ClassVar[Mapping[str, tuple[str, int]]] = {}
    ragged: ClassVar[bool] = False
    retry_on_worker_loss: ClassVar[bool] = True
    loaded_inputs: dict[str, TensorSpec] | None = None
    loaded_outputs: dict[str, TensorSpec] | None = None
    #: dagserve's own: a built-in cheap enough to run in the event loop under ``runner: auto``
    _inline: ClassVar[bool] = False

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """The node's input and output specs, before anything is loaded.

        **Override this** when the specs depend on ``params`` or on what feeds the node
        (``identity`` mirrors its inputs; ``concat_fusion`` sums their widths).  It runs at
        validation time, in a process that never loads the model: it must not load one.  Read
        ``params`` with :class:`~model_plugins.Params`, as ``load`` does, so that a bad value is
        refused alike at validation and at load.  The server calls it in its inspector
        process, once per node, with the specs the pipeline wires into that node.

        Args:
            params: the node's ``params:``.
            upstream: the spec of each tensor wired into the node, None where unknown.

        Returns:
            ``(inputs, outputs)``: by default the class's declarations.
        """
        return dict(cls.inputs), dict(cls.outputs)

    def load(self, context: LoadContext) -> None:
        """Load the model: runs once per instance, in the process that will predict.

        **Override this** to read weights from ``context.model_path`` and move them to
        ``context.device``.  Raise on failure (any exception); do not return a flag.
        """

    def predict(self, batch: Batch) -> Batch | Partial:
        """Run the model on one batch.

        **Override this.**  ``batch`` maps each input name to an array whose first dimension
        is the item dimension (N items, possibly from several requests).  Return a dict of
        every declared output, each with the same N along the first dimension, in the same
        item order.  Optional inputs that are absent are missing from ``batch``.

        When some items fail on their own (a bad value), return
        ``Partial(outputs, errors={index: InvalidRequest("...")})``: ``outputs`` still holds a
        row for every item (those of failed items are ignored), and each error fails only the
        request that owns that item, naming its index within the request; the batch's other
        requests get their results and nothing runs again.  Raise when the whole batch fails
        (then the batch is split by request and run again to find the requests that fail).
        """
        msg = f"{type(self).__name__} does not implement predict()"
        raise NotImplementedError(msg)

    def unload(self) -> None:
        """Free what :meth:`load` took; runs once at shutdown.  Optional."""


def overrides_signature(plugin_class: type[ModelPlugin]) -> bool:
    """Whether the plugin works its specs out itself (``identity``, the fusions, adapters)
    rather than declaring them as class attributes."""
    own = getattr(plugin_class.signature, "__func__", None)
    return own is not ModelPlugin.signature.__func__  # type: ignore[attr-defined]


__all__ = ["Batch", "Framework", "LoadContext", "ModelPlugin", "Signature", "overrides_signature"]
