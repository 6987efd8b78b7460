"""Numpy plugins of the node-variant and warm-up tests (tests/pipelines/variants/)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from model_plugins import ModelPlugin, TensorSpec


class Tag(ModelPlugin):
    """y = x * params.factor (default 1): each answer says which variant produced it.

    An item whose first element is below params.fail_below (absent: never) fails the call.
    """

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.factor = float(context.params.get("factor", 1.0))
        self.fail_below = context.params.get("fail_below")

    def predict(self, batch):
        x = batch["x"]
        if self.fail_below is not None and (x[:, 0] < self.fail_below).any():
            raise ValueError(f"x[0] below {self.fail_below} is refused")
        return {"y": (x * self.factor).astype(np.float32)}


class WideTag(Tag):
    """Tag with another output spec (float64): a variant of a Tag node that does not fit."""

    outputs: ClassVar = {"y": TensorSpec("float64", [-1])}

    def predict(self, batch):
        return {"y": batch["x"].astype(np.float64) * self.factor}


class Counted(Tag):
    """Tag that also answers, per item, which call of its instance this was (from 1): the
    first real request after N warm-up requests reads N + 1."""

    outputs: ClassVar = {"y": TensorSpec("float32", [-1]), "call": TensorSpec("int64", [])}

    def load(self, context):
        super().load(context)
        self.calls = 0

    def predict(self, batch):
        self.calls += 1
        y = super().predict(batch)["y"]
        return {"y": y, "call": np.full(len(y), self.calls, np.int64)}
