"""Tiny numpy plugins the end-to-end tests serve."""

from __future__ import annotations

import os
import time
from typing import ClassVar

import numpy as np

from model_plugins import InvalidRequest, ModelPlugin, Partial, TensorSpec


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


class PartialNegative(ModelPlugin):
    """Fails alone each item whose first element is negative (a Partial); y = 2 x for the rest.

    Every item also learns its batch's size, how many items of its batch failed, and which
    call of its instance ran it (counted from 1).  params.seconds (default 0) sleeps per call.
    """

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {
        "y": TensorSpec("float32", [-1]),
        "batch": TensorSpec("int64", []),
        "failed": TensorSpec("int64", []),
        "call": TensorSpec("int64", []),
    }

    def load(self, context):
        self.seconds = float(context.params.get("seconds", 0.0))
        self.calls = 0

    def predict(self, batch):
        self.calls += 1
        time.sleep(self.seconds)
        x = batch["x"]
        n = len(x)
        bad = np.flatnonzero(x[:, 0] < 0)
        errors = {int(i): InvalidRequest(f"x[0] is {x[i, 0]:g}, must be >= 0") for i in bad}
        outputs = {
            "y": x * 2,
            "batch": np.full(n, n, np.int64),
            "failed": np.full(n, len(bad), np.int64),
            "call": np.full(n, self.calls, np.int64),
        }
        return Partial(outputs, errors=errors)


class WrongCount(ModelPlugin):
    """Breaks the batch contract: returns one item more than it got."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        x = batch["x"]
        return {"y": np.concatenate([x, x[:1]])}


class Sleep(ModelPlugin):
    """Sleeps params.seconds (default 0.2), passes x through, and says when it ran.

    ``start`` and ``end`` are ``time.monotonic()`` readings in the process that ran it; the
    clock is the machine's, so they compare across processes.
    """

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {
        "y": TensorSpec("float32", [-1]),
        "start": TensorSpec("float64", []),
        "end": TensorSpec("float64", []),
    }

    def load(self, context):
        self.seconds = float(context.params.get("seconds", 0.2))

    def predict(self, batch):
        start = time.monotonic()
        time.sleep(self.seconds)
        n = len(batch["x"])
        return {"y": batch["x"], "start": np.full(n, start), "end": np.full(n, time.monotonic())}


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


class BatchProbe(ModelPlugin):
    """Sleeps params.seconds (default 0.05) per call and tells each item its batch's size."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1]), "batch": TensorSpec("int64", [])}

    def load(self, context):
        self.seconds = float(context.params.get("seconds", 0.05))

    def predict(self, batch):
        time.sleep(self.seconds)
        n = len(batch["x"])
        return {"y": batch["x"] * 2, "batch": np.full(n, n, np.int64)}


class Weights(ModelPlugin):
    """y = x * w, w a float32 vector read from the node's ``model:`` file (.npy): a model
    whose file can change under a running server (lifecycle reloads, --watch)."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.w = np.load(context.model_path, allow_pickle=False).astype(np.float32)

    def predict(self, batch):
        return {"y": batch["x"] * self.w}


class TokenSum(ModelPlugin):
    """Variable-length int64 ids, padded by the batcher: per-token doubled ids and their sum."""

    inputs: ClassVar = {"ids": TensorSpec("int64", [-1])}
    outputs: ClassVar = {"tokens": TensorSpec("int64", [-1]), "total": TensorSpec("int64", [])}
    padding: ClassVar = {"ids": 0}
    padded_outputs: ClassVar = {"tokens": ("ids", 0)}

    def predict(self, batch):
        ids = batch["ids"]
        return {"tokens": ids * 2, "total": ids.sum(axis=1)}


class Env(ModelPlugin):
    """Answers, per item, the CUDA_VISIBLE_DEVICES its worker sees and the device it was given."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"visible": TensorSpec("string", []), "device": TensorSpec("string", [])}

    def load(self, context):
        self.device = context.device

    def predict(self, batch):
        n = len(batch["x"])
        visible = np.array([os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")] * n, dtype=object)
        return {"visible": visible, "device": np.array([self.device] * n, dtype=object)}


class GatedLoad(ModelPlugin):
    """``load`` waits until the file params.gate exists (at most 30 s): a model slow to load."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        from pathlib import Path

        gate = Path(context.params["gate"])
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.01)

    def predict(self, batch):
        return {"y": batch["x"]}


class Abort(ModelPlugin):
    """Kills its own process (os.abort: SIGABRT) on a negative item, as a crashing library would."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch):
        if (batch["x"] < 0).any():
            os.abort()
        return {"y": batch["x"]}


class Hog(ModelPlugin):
    """Keeps params.megabytes (default 300) of memory per call, as a leaking plugin would."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        self.megabytes = int(context.params.get("megabytes", 300))
        self.kept: list[np.ndarray] = []

    def predict(self, batch):
        self.kept.append(np.ones(self.megabytes * 1024 * 1024 // 8))  # touched: resident
        return {"y": batch["x"]}


class TorchScale(ModelPlugin):
    """y = x * params.factor (default 2), computed by PyTorch in its worker.

    params.seconds (default 0) sleeps that long per call first; an item whose first element
    equals params.poison aborts the process (os.abort: SIGABRT), as a crashing library would.
    """

    framework = "torch"
    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"y": TensorSpec("float32", [-1])}

    def load(self, context):
        import torch

        self.torch = torch
        self.factor = float(context.params.get("factor", 2.0))
        self.seconds = float(context.params.get("seconds", 0.0))
        self.poison = context.params.get("poison")

    def predict(self, batch):
        x = batch["x"]
        if self.poison is not None and (x[:, 0] == self.poison).any():
            os.abort()
        time.sleep(self.seconds)
        y = self.torch.from_numpy(np.array(x)) * self.factor  # a writable copy
        return {"y": y.numpy().astype(np.float32)}


class TorchScaleOnce(TorchScale):
    """TorchScale whose calls must not run twice: a worker lost under them fails them."""

    retry_on_worker_loss = False
