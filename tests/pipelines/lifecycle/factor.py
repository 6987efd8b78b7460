"""A numpy model whose "weights" are a number in a text file: y = x * that number.

Two versions of a pipeline differ by their file, and a rewritten file is a new model, so the
lifecycle tests can tell which version (and which load of it) answered each request; a file
that holds no number fails to load.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from model_plugins import ModelPlugin, TensorSpec


class Factor(ModelPlugin):
    """y = x * float(model file)."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.factor = np.float32(float(Path(context.model_path).read_text(encoding="utf-8")))

    def predict(self, batch):
        return {"y": (batch["x"] * self.factor).astype(np.float32)}
