"""A ResNet-18 in plain PyTorch (no torchvision), and a plugin that serves it.

The architecture of He et al. (2015), 11.7 M parameters, random weights from a fixed seed:
what matters for the benchmarks is the cost of the forward pass, not what it recognises.
``examples/post_understanding/build_models.py`` writes the same trunk out again: an example
stands alone.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from model_plugins import LoadContext, ModelPlugin, TensorSpec


def build_resnet18(num_classes: int = 1000, seed: int = 0) -> Any:
    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: Any) -> Any:
            identity = x if self.down is None else self.down(x)
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + identity)

    layers: list[nn.Module] = [
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
    ]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers).eval()


class ResNet18(ModelPlugin):
    """ResNet-18 logits for CHW float32 images."""

    framework = "torch"
    inputs: ClassVar = {"pixels": TensorSpec("float32", [3, 224, 224])}
    outputs: ClassVar = {"logits": TensorSpec("float32", [1000])}

    def load(self, context: LoadContext) -> None:
        import torch

        torch.set_num_threads(int(context.params.get("threads", torch.get_num_threads())))
        self.torch = torch
        self.model = build_resnet18()

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.inference_mode():
            pixels = self.torch.from_numpy(np.array(batch["pixels"], copy=True))
            return {"logits": self.model(pixels).numpy()}
