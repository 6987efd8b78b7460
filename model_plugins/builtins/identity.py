"""``identity``: every input comes out unchanged, under the same name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from model_plugins.plugin import Batch, ModelPlugin, Signature
from model_plugins.specs import TensorSpec


class Identity(ModelPlugin):
    """Passes every input through under the same name (no copy).

    Useful to rename a tensor, to expose an intermediate result as a pipeline output, or as a
    placeholder node while a pipeline is being built.

    >>> import numpy as np
    >>> Identity().predict({"x": np.arange(3)})["x"]
    array([0, 1, 2])
    """

    #: cheap: the engine may run it in the event loop rather than in a thread
    _inline: ClassVar[bool] = True

    @classmethod
    def signature(
        cls, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """Inputs and outputs both mirror ``upstream``, name for name.

        A spec cannot be made up for an upstream tensor whose spec is unknown (None), so
        such a name is left out of both dicts: the node declares nothing for it, and the
        validator has nothing to compare along that edge.

        >>> inputs, outputs = Identity.signature({}, {"x": TensorSpec("float32", [3]), "y": None})
        >>> list(inputs), outputs["x"].describe()
        (['x'], 'float32[3]')
        """
        known = {name: spec for name, spec in upstream.items() if spec is not None}
        return dict(known), dict(known)

    def predict(self, batch: Batch) -> Batch:
        """Return the batch's arrays under the same names."""
        return dict(batch)


__all__ = ["Identity"]
