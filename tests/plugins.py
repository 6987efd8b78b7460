"""Tiny numpy plugins the end-to-end tests serve."""

from __future__ import annotations

import os
import time
from typing import ClassVar

import numpy as np

from model_plugins import ModelPlugin, TensorSpec


class Scale(ModelPlugin):
    """y = x * factor (params.factor, default 2)."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.factor = float(context.params.get("factor", 2.0))

    def predict(self, batch):
        return {"y": (batch["x"] * self.factor).astype(np.float32)}


class FailOnNegative(ModelPlugin):
    """Raises when any item's first element is negative; else passes x through."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        if (batch["x"][:, 0] < 0).any():
            raise ValueError("negative input is not allowed")
        return {"y": batch["x"]}


class WrongCount(ModelPlugin):
    """Breaks the batch contract: returns one item more than it got."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        x = batch["x"]
        return {"y": np.concatenate([x, x[:1]])}


class Sleep(ModelPlugin):
    """Sleeps params.seconds (default 0.2), then passes x through."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.seconds = float(context.params.get("seconds", 0.2))

    def predict(self, batch):
        time.sleep(self.seconds)
        return {"y": batch["x"]}


class Pid(ModelPlugin):
    """Answers the pid of the process that runs it, once per item."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"pid": TensorSpec("int64", [])}

    def predict(self, batch):
        return {"pid": np.full(len(batch["x"]), os.getpid(), np.int64)}


class FailToLoad(ModelPlugin):
    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        raise RuntimeError("weights file is corrupt")
