"""The typed messages between the front process and a worker.

Each message travels in an envelope ``(correlation id, message)``; the worker answers each
with a :class:`Reply` of the same id.  Messages are small dataclasses; tensors inside them
travel out of band (``wire``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from model_plugins.errors import DagserveError, InferenceError, node_label
from model_plugins.plugin import Batch, LoadContext
from model_plugins.specs import TensorSpec


@dataclass(frozen=True)
class LoadModel:
    """Import the plugin and load ``instances`` copies of it under ``model_id``."""

    model_id: str
    plugin: str  # the reference as written: a built-in name or module:Class
    contexts: tuple[LoadContext, ...]


@dataclass(frozen=True)
class Loaded:
    """What a worker learnt from a loaded model.

    ``inputs`` / ``outputs`` are the specs the plugin stated on load (``loaded_inputs`` /
    ``loaded_outputs``), empty where it stated none: the pipeline already holds what its
    ``signature`` gives.
    """

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    framework: str | None
    seconds: float


@dataclass(frozen=True)
class Predict:
    """Run one batch on instance ``instance`` of the model (the parent's batcher chose it)."""

    model_id: str
    inputs: Batch
    instance: int = 0


@dataclass(frozen=True)
class GetSignature:
    """Import the plugin and call its ``signature(params, upstream)``; the reply is its value."""

    plugin: str
    params: dict[str, Any]
    upstream: dict[str, TensorSpec | None]


@dataclass(frozen=True)
class Unload:
    model_id: str


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class RemoteError:
    """An exception raised in a worker, as text: custom exception classes may not unpickle."""

    cls: str  # import path of the original class: "torch.OutOfMemoryError"
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> RemoteError:
        path = f"{type(exc).__module__}.{type(exc).__qualname__}"
        text = "".join(traceback.format_exception(exc))
        return cls(path, str(exc), text)

    def to_inference_error(self, node: str | None, plugin: str | None) -> InferenceError:
        """The error of a failed ``predict``, naming the node and the original class."""
        msg = f"{node_label(node, plugin)} failed: {self.cls}: {self.message}"
        return InferenceError(msg, node=node, plugin=plugin, cause=self.cls)

    def __str__(self) -> str:
        return f"{self.cls}: {self.message}"


@dataclass(frozen=True)
class Reply:
    id: int
    value: Any = None
    #: a DagserveError travels as itself (every one pickles); anything else as RemoteError
    error: DagserveError | RemoteError | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def exception(self, node: str | None, plugin: str | None) -> DagserveError | None:
        """The error the caller raises for this reply (None: it carries a value); a plugin's
        exception becomes an :class:`InferenceError` naming ``node`` and ``plugin``."""
        if isinstance(self.error, RemoteError):
            return self.error.to_inference_error(node, plugin)
        return self.error


__all__ = [
    "GetSignature",
    "LoadModel",
    "Loaded",
    "Ping",
    "Predict",
    "RemoteError",
    "Reply",
    "Shutdown",
    "Unload",
]
