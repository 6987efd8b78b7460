"""Builders of small real models for the adapter tests, one framework per process.

Each builder exports a model with fixed weights into a folder and saves, next to it, fixed
inputs and the framework's own outputs on them (``<model>.npz``, read with :func:`load_cases`).
The pytest process never imports a framework (TensorFlow then Paddle in one process crashes),
so run a builder in a child process::

    python -m tests.frameworks.models torchscript OUT_DIR

Models:

* MLP: Linear 8 -> 4, then ReLU; input ``x`` float32 [B, 8].
* Seq: Embedding(100, 6), mean over the sequence, Linear 6 -> 3; input ``ids`` [B, L].
* Pair (TorchScript): inputs ``a``, ``b`` float32 [B, 8]; returns the tuple (a + b, a * b).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: batch sizes of the MLP cases
BATCHES = (1, 3, 7)
#: (batch, length) of the Seq cases: the length changes between calls
SEQ_SHAPES = ((1, 5), (3, 5), (2, 11), (4, 2))

Case = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]


def save_cases(path: Path, cases: list[Case]) -> None:
    """Save ``[(inputs, outputs), ...]`` as one .npz, with their count."""
    arrays: dict[str, Any] = {"count": np.int64(len(cases))}
    for index, (inputs, outputs) in enumerate(cases):
        arrays.update({f"{index}.in.{name}": value for name, value in inputs.items()})
        arrays.update({f"{index}.out.{name}": value for name, value in outputs.items()})
    np.savez(path, **arrays)


def load_cases(path: Path) -> list[Case]:
    """Read what :func:`save_cases` wrote: all of its cases, each with inputs and outputs.

    A file with no case, or with fewer than it says, is an error: a test that loops over the
    cases would otherwise pass without comparing anything.
    """
    cases: dict[int, Case] = {}
    with np.load(path) as data:
        count = int(data["count"]) if "count" in data.files else None
        for key in data.files:
            if key == "count":
                continue
            index, side, name = key.split(".", 2)
            inputs, outputs = cases.setdefault(int(index), ({}, {}))
            (inputs if side == "in" else outputs)[name] = data[key]
    if not cases or count != len(cases) or sorted(cases) != list(range(len(cases))):
        msg = f"{path}: {len(cases)} cases (indices {sorted(cases)}), expected {count}"
        raise ValueError(msg)
    if not all(inputs and outputs for inputs, outputs in cases.values()):
        msg = f"{path}: a case without inputs or without outputs"
        raise ValueError(msg)
    return [cases[i] for i in sorted(cases)]


def _mlp_inputs() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((b, 8)).astype(np.float32)} for b in BATCHES]


def _seq_inputs(dtype: type) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    return [{"ids": rng.integers(0, 100, size=shape).astype(dtype)} for shape in SEQ_SHAPES]


# -- PyTorch ---------------------------------------------------------------------------------


def make_mlp(in_features: int = 8, out_features: int = 4) -> Any:
    """The MLP as an ``nn.Module`` with random weights (the ``torch`` adapter's factory)."""
    import torch

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(in_features, out_features)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.linear(x))

    return MLP()


def build_torchscript(out: Path) -> None:
    """``mlp.pt`` (traced MLP) and ``pair.pt`` (scripted two inputs, tuple output)."""
    import torch

    class Pair(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a * b

    torch.manual_seed(0)
    mlp = make_mlp().eval()
    traced = torch.jit.trace(mlp, torch.zeros(2, 8))  # type: ignore[no-untyped-call]
    torch.jit.save(traced, str(out / "mlp.pt"))
    with torch.inference_mode():
        cases = [(i, {"y": mlp(torch.from_numpy(i["x"])).numpy()}) for i in _mlp_inputs()]
    save_cases(out / "mlp.npz", cases)

    torch.jit.save(torch.jit.script(Pair()), str(out / "pair.pt"))
    pair_cases = []
    for inputs in _mlp_inputs():
        a = torch.from_numpy(inputs["x"])
        b = a.flip(0) + 1
        pair_cases.append(
            ({"a": a.numpy(), "b": b.numpy()}, {"sum": (a + b).numpy(), "product": (a * b).numpy()})
        )
    save_cases(out / "pair.npz", pair_cases)


def build_torch(out: Path) -> None:
    """``mlp_state.pt``: the state_dict of :func:`make_mlp`'s module."""
    import torch

    torch.manual_seed(0)
    mlp = make_mlp().eval()
    torch.save(mlp.state_dict(), out / "mlp_state.pt")
    with torch.inference_mode():
        cases = [(i, {"y": mlp(torch.from_numpy(i["x"])).numpy()}) for i in _mlp_inputs()]
    save_cases(out / "mlp.npz", cases)


# -- TensorFlow ------------------------------------------------------------------------------


def build_tensorflow(out: Path) -> None:
    """``saved_model/`` with two signatures: ``serving_default`` (MLP) and ``seq`` (int32 ids)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    rng = np.random.default_rng(0)

    class Models(tf.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.w = tf.Variable(rng.standard_normal((8, 4)).astype(np.float32))
            self.b = tf.Variable(rng.standard_normal(4).astype(np.float32))
            self.table = tf.Variable(rng.standard_normal((100, 6)).astype(np.float32))
            self.w2 = tf.Variable(rng.standard_normal((6, 3)).astype(np.float32))
            self.b2 = tf.Variable(rng.standard_normal(3).astype(np.float32))

        @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32, name="x")])  # type: ignore[untyped-decorator]
        def mlp(self, x: Any) -> dict[str, Any]:
            return {"y": tf.nn.relu(tf.matmul(x, self.w) + self.b)}

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="ids")])  # type: ignore[untyped-decorator]
        def seq(self, ids: Any) -> dict[str, Any]:
            pooled = tf.reduce_mean(tf.gather(self.table, ids), axis=1)
            return {"scores": tf.matmul(pooled, self.w2) + self.b2}

    models = Models()
    signatures = {"serving_default": models.mlp, "seq": models.seq}
    tf.saved_model.save(models, str(out / "saved_model"), signatures=signatures)
    mlp = [(i, {"y": models.mlp(tf.constant(i["x"]))["y"].numpy()}) for i in _mlp_inputs()]
    save_cases(out / "mlp.npz", mlp)
    seq = [
        (i, {"scores": models.seq(tf.constant(i["ids"]))["scores"].numpy()})
        for i in _seq_inputs(np.int32)
    ]
    save_cases(out / "seq.npz", seq)


# -- Paddle ----------------------------------------------------------------------------------


def build_paddle(out: Path) -> None:
    """``mlp/inference.{json,pdiparams}`` and ``seq/...`` (int64 ids), by ``paddle.jit.save``."""
    import paddle

    class MLP(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.linear = paddle.nn.Linear(8, 4)

        def forward(self, x: Any) -> Any:
            return paddle.nn.functional.relu(self.linear(x))

    class Seq(paddle.nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = paddle.nn.Embedding(100, 6)
            self.linear = paddle.nn.Linear(6, 3)

        def forward(self, ids: Any) -> Any:
            return self.linear(self.embedding(ids).mean(axis=1))

    paddle.seed(0)
    spec = paddle.static.InputSpec
    mlp, seq = MLP(), Seq()
    mlp.eval()
    seq.eval()
    with paddle.no_grad():
        mlp_cases = [(i, {"y": mlp(paddle.to_tensor(i["x"])).numpy()}) for i in _mlp_inputs()]
        seq_inputs = _seq_inputs(np.int64)
        seq_cases = [(i, {"scores": seq(paddle.to_tensor(i["ids"])).numpy()}) for i in seq_inputs]
    paddle.jit.save(
        mlp, str(out / "mlp" / "inference"), input_spec=[spec([None, 8], "float32", "x")]
    )
    paddle.jit.save(
        seq, str(out / "seq" / "inference"), input_spec=[spec([None, None], "int64", "ids")]
    )
    save_cases(out / "mlp.npz", mlp_cases)
    save_cases(out / "seq.npz", seq_cases)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "torchscript": build_torchscript,
    "torch": build_torch,
    "tensorflow": build_tensorflow,
    "paddle": build_paddle,
}


def main(argv: list[str]) -> None:
    which, out = argv
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    BUILDERS[which](folder)


if __name__ == "__main__":
    main(sys.argv[1:])
