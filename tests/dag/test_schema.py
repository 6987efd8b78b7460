"""dag/schema.py: what the batching settings accept, as the loader reports it."""

from __future__ import annotations

import pytest

from dag.errors import PipelineInvalid
from dag.loader import parse_spec

PIPELINE = """\
name: p
inputs:
  x: {{dtype: float32, shape: [2]}}
nodes:
  a:
    plugin: identity
    inputs: {{x: $inputs.x}}
    batching: {batching}
outputs:
  y: a.x
"""


def test_preferred_batch_sizes_are_read():
    spec, _ = parse_spec(
        PIPELINE.format(batching="{max_batch_size: 16, preferred_batch_sizes: [8, 16]}")
    )
    assert spec.nodes["a"].batching.preferred_batch_sizes == [8, 16]
    spec, _ = parse_spec(PIPELINE.format(batching="{max_batch_size: 16}"))
    assert spec.nodes["a"].batching.preferred_batch_sizes is None  # the batcher learns


@pytest.mark.parametrize("sizes", ["[8, 32]", "[0, 8]", "[]"])
def test_preferred_batch_sizes_must_be_positive_and_at_most_max_batch_size(sizes):
    text = PIPELINE.format(batching=f"{{max_batch_size: 16, preferred_batch_sizes: {sizes}}}")
    with pytest.raises(PipelineInvalid) as caught:
        parse_spec(text, file="p.yaml")
    (error,) = caught.value.errors
    assert (error.line, error.node) == (8, "a")
    assert error.message == (
        f"batching.preferred_batch_sizes: must be sizes from 1 to max_batch_size 16 (got {sizes})"
    )
