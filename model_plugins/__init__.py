"""The dagserve plugin SDK: everything a plugin author imports.

>>> from model_plugins import ModelPlugin, TensorSpec
>>> class Double(ModelPlugin):
...     inputs = {"x": TensorSpec("float32", [-1])}
...     outputs = {"y": TensorSpec("float32", [-1])}
...     def predict(self, batch):
...         return {"y": batch["x"] * 2}

Importing this package imports numpy and nothing heavier: no Pillow, no deep-learning framework
(built-in nodes and framework adapters are imported only when a pipeline names them).
"""

from model_plugins.errors import (
    BatchContractError,
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
    PluginError,
    PluginLoadError,
    PluginNotFound,
)
from model_plugins.harness import PluginHarness
from model_plugins.partial import Partial
from model_plugins.plugin import LoadContext, ModelPlugin
from model_plugins.specs import TensorSpec

__all__ = [
    # writing a plugin
    "ModelPlugin",
    "TensorSpec",
    "LoadContext",
    "Partial",
    # testing it
    "PluginHarness",
    # the errors, root first (tree in model_plugins.errors)
    "DagserveError",
    "InvalidRequest",
    "PipelineNotFound",
    "Overloaded",
    "DeadlineExceeded",
    "InferenceError",
    "BatchContractError",
    "PluginError",
    "PluginNotFound",
    "PluginLoadError",
]
