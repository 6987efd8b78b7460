"""A torch plugin that says where its batch ran: the device of its tensors and the card's name."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from model_plugins import LoadContext, ModelPlugin, TensorSpec
from model_plugins.plugin import Batch


class CudaProbe(ModelPlugin):
    """``y = 2 x + 1`` computed on the node's device; per item, that device, the card and the
    size of the batch it came in."""

    framework = "torch"
    inputs: ClassVar = {"x": TensorSpec("float32", [4])}
    outputs: ClassVar = {
        "y": TensorSpec("float32", [4]),
        "device": TensorSpec("string", []),
        "card": TensorSpec("string", []),
        "batch": TensorSpec("int64", []),
    }

    def load(self, context: LoadContext) -> None:
        import torch

        self.device = torch.device(context.device)
        torch.zeros(1, device=self.device)  # fails here, not on the first batch

    def predict(self, batch: Batch) -> Batch:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch["x"])).to(self.device)
        y = x * 2 + 1
        n = len(x)
        card = torch.cuda.get_device_name(y.device) if y.is_cuda else "cpu"
        return {
            "y": y.cpu().numpy(),
            "device": np.array([str(y.device)] * n, dtype=object),
            "card": np.array([card] * n, dtype=object),
            "batch": np.full(n, n, dtype=np.int64),
        }
