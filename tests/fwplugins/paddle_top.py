"""A plugin module that imports Paddle at its top (after TensorFlow in one process: SIGSEGV)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import paddle

from model_plugins import ModelPlugin, TensorSpec


class PaddleTriple(ModelPlugin):
    framework = "paddle"
    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        return {"y": (paddle.to_tensor(batch["x"]) * 3).numpy().astype(np.float32)}
