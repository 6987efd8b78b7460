"""The dagserve plugin SDK: everything a plugin author imports.

A plugin declares the spec of one item of each tensor, and maps a batch (each array's first
dimension is the items) to a batch of as many items:

>>> import numpy as np
>>> from model_plugins import Batch, LoadContext, ModelPlugin, Params, Signature, TensorSpec
>>> class Double(ModelPlugin):
...     inputs = {"x": TensorSpec("float32", [-1])}     # -1: any size
...     outputs = {"y": TensorSpec("float32", [-1])}
...     def predict(self, batch: Batch) -> Batch:
...         return {"y": batch["x"] * 2}

When the specs depend on the node's ``params:`` (or on what feeds it), override
``signature`` instead, and read the params with :class:`Params` there and in ``load``: a bad
value is then refused alike by ``dagserve validate``, ``dagserve serve`` (which call
``signature`` in a separate process, so that the plugin's imports never enter the server's)
and :class:`PluginHarness`:

>>> class Spread(ModelPlugin):
...     known_params = ("dim",)
...     @classmethod
...     def signature(cls, params, upstream) -> Signature:
...         dim = Params(params, cls.known_params).positive_int("dim", 4)
...         return {"x": TensorSpec("float32", [])}, {"y": TensorSpec("float32", [dim])}
...     def load(self, context: LoadContext) -> None:
...         self.dim = Params.of(context, self.known_params).positive_int("dim", 4)
...     def predict(self, batch: Batch) -> Batch:
...         return {"y": np.repeat(batch["x"][:, None], self.dim, axis=1)}
>>> with PluginHarness(Spread, params={"dim": 3}) as harness:
...     harness.predict({"x": [1.0, 2.0]})["y"].shape
(2, 3)

What a plugin may declare, and when each method runs, is on :class:`ModelPlugin`.  Importing
this package imports numpy and nothing heavier: no Pillow, no deep-learning framework
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
from model_plugins.params import Params
from model_plugins.partial import Partial
from model_plugins.plugin import Batch, LoadContext, ModelPlugin, Signature
from model_plugins.specs import TensorSpec

__all__ = [
    # writing a plugin
    "ModelPlugin",
    "TensorSpec",
    "LoadContext",
    "Batch",
    "Signature",
    "Params",
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
