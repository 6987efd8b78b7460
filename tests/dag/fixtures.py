"""Tiny numpy plugins for pipeline tests, named as ``tests.dag.fixtures:Class`` in YAML."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from model_plugins.plugin import Batch, ModelPlugin
from model_plugins.specs import TensorSpec


class Decode(ModelPlugin):
    """bytes -> float32[3, 4, 4] pixels (all zeros)."""

    inputs: ClassVar[Mapping[str, TensorSpec]] = {"data": TensorSpec("bytes", [])}
    outputs: ClassVar[Mapping[str, TensorSpec]] = {"pixels": TensorSpec("float32", [3, 4, 4])}

    def predict(self, batch: Batch) -> Batch:
        return {"pixels": np.zeros((len(batch["data"]), 3, 4, 4), dtype=np.float32)}


class Embed(ModelPlugin):
    """float32[3, 4, 4] pixels -> float32[8] embedding (the mean of each pixel row)."""

    inputs: ClassVar[Mapping[str, TensorSpec]] = {"pixels": TensorSpec("float32", [3, 4, 4])}
    outputs: ClassVar[Mapping[str, TensorSpec]] = {"embedding": TensorSpec("float32", [8])}

    def predict(self, batch: Batch) -> Batch:
        pixels = batch["pixels"]
        return {"embedding": np.resize(pixels.mean(axis=(1, 2)), (len(pixels), 8))}


class TextEmbed(ModelPlugin):
    """string -> float32[8] embedding (the text's length, repeated)."""

    inputs: ClassVar[Mapping[str, TensorSpec]] = {"text": TensorSpec("string", [])}
    outputs: ClassVar[Mapping[str, TensorSpec]] = {"embedding": TensorSpec("float32", [8])}

    def predict(self, batch: Batch) -> Batch:
        lengths = np.array([len(t) for t in batch["text"]], dtype=np.float32)
        return {"embedding": np.repeat(lengths[:, None], 8, axis=1)}


class Fuse(ModelPlugin):
    """Optional float32[8] ``image`` and ``text`` -> their sum, float32[8]."""

    inputs: ClassVar[Mapping[str, TensorSpec]] = {
        "image": TensorSpec("float32", [8], optional=True),
        "text": TensorSpec("float32", [8], optional=True),
    }
    outputs: ClassVar[Mapping[str, TensorSpec]] = {"embedding": TensorSpec("float32", [8])}

    def predict(self, batch: Batch) -> Batch:
        return {"embedding": sum(batch.values())}  # type: ignore[dict-item]


class Scale(ModelPlugin):
    """float32[-1] ``x`` (required) and an optional ``factor`` -> float32[-1] ``y``."""

    inputs: ClassVar[Mapping[str, TensorSpec]] = {
        "x": TensorSpec("float32", [-1]),
        "factor": TensorSpec("float32", [], optional=True),
    }
    outputs: ClassVar[Mapping[str, TensorSpec]] = {"y": TensorSpec("float32", [-1])}

    def predict(self, batch: Batch) -> Batch:
        factor = batch.get("factor", np.ones(len(batch["x"]), dtype=np.float32))
        return {"y": batch["x"] * factor[:, None]}


class Mirror(ModelPlugin):
    """Like ``identity``: every input comes out under its name, with the spec fed to it."""

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        known = {name: spec for name, spec in upstream.items() if spec is not None}
        return dict(known), dict(known)

    def predict(self, batch: Batch) -> Batch:
        return dict(batch)


class Opaque(ModelPlugin):
    """Declares nothing, like a framework adapter: its specs come from the YAML, or not at all."""

    def predict(self, batch: Batch) -> Batch:
        return dict(batch)


class BadSignature(ModelPlugin):
    """Its ``signature`` raises, as a buggy plugin's might."""

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        msg = "needs params.width"
        raise KeyError(msg)


class NotAPlugin:
    """A class that is no ModelPlugin."""
