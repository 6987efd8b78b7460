"""A plugin module that imports TensorFlow at its top, as real plugin modules do."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import tensorflow as tf

from model_plugins import ModelPlugin, TensorSpec


class TfDouble(ModelPlugin):
    framework = "tensorflow"
    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        return {"y": (tf.constant(batch["x"]) * 2).numpy().astype(np.float32)}
