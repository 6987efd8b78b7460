"""The quickstart's custom plugin: a few lines of numpy behind the plugin SDK."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from model_plugins import ModelPlugin, TensorSpec


class ColorStats(ModelPlugin):
    """Mean and standard deviation of each colour channel of CHW images in [0, 1]."""

    inputs: ClassVar = {"pixels": TensorSpec("float32", [3, -1, -1])}
    outputs: ClassVar = {"stats": TensorSpec("float32", [6])}

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        pixels = batch["pixels"]  # N x 3 x H x W
        mean = pixels.mean(axis=(2, 3))
        std = pixels.std(axis=(2, 3))
        return {"stats": np.concatenate([mean, std], axis=1).astype(np.float32)}
