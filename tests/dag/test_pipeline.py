"""dag/pipeline.py: what a loaded pipeline owns (plan, description) and its request checks."""

from __future__ import annotations

import numpy as np
import pytest

from dag.pipeline import EdgeDescription, Pipeline
from dag.schema import PipelineSpec, Ref
from model_plugins.errors import InvalidRequest

SPEC = {
    "name": "p",
    "version": "2",
    "inputs": {
        "x": {"dtype": "float32", "shape": [2], "allow_nan": False},
        "opt": {"dtype": "float32", "shape": [2], "optional": True},
    },
    "nodes": {
        "b": {
            "plugin": "identity",
            "inputs": {"x": "a.x", "o": "$inputs.opt"},
            "join": "available",
        },
        "a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}},
    },
    "outputs": {"y": "b.x", "raw": "$inputs.x"},
}


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline.from_spec(PipelineSpec.model_validate(SPEC))


def test_the_plan_is_read_off_the_graph_in_the_order_written(pipeline: Pipeline) -> None:
    plan = pipeline.plan
    assert plan.spec is pipeline.spec
    assert list(plan.refs["b"].items()) == [("x", Ref("a", "x")), ("o", Ref("$inputs", "opt"))]
    assert plan.upstream == {"a": frozenset(), "b": frozenset({"a"})}
    assert plan.outputs == {"y": Ref("b", "x"), "raw": Ref("$inputs", "x")}
    assert pipeline.plan is plan  # worked out once


def test_the_description_lists_every_edge(pipeline: Pipeline) -> None:
    description = pipeline.description
    assert (description.name, description.version) == ("p", "2")
    assert description.nodes == ["b", "a"]
    assert list(description.inputs) == ["x", "opt"]
    assert description.outputs["y"] is not None
    assert description.edges == [
        EdgeDescription("a", "b", "a.x"),
        EdgeDescription("$inputs", "b", "opt"),
        EdgeDescription("$inputs", "a", "x"),
        EdgeDescription("b", "$outputs", "b.x"),
        EdgeDescription("$inputs", "$outputs", "x"),
    ]


def test_a_good_request_passes(pipeline: Pipeline) -> None:
    pipeline.check_request({"x": np.zeros((3, 2), np.float32)}, ["y"])
    assert pipeline.required_inputs == {"x"}


@pytest.mark.parametrize(
    ("inputs", "outputs", "field", "words"),
    [
        ({"z": np.zeros((1, 2), np.float32)}, None, "inputs.z", "has no input 'z'"),
        ({"opt": np.zeros((1, 2), np.float32)}, None, "inputs.x", "required input 'x'"),
        ({"x": np.zeros((1, 3), np.float32)}, None, "inputs.x", "shape"),
        ({"x": np.array([[0, np.nan]], np.float32)}, None, "inputs.x", "NaN in item(s) [0]"),
        ({"x": np.zeros((1, 2), np.float32)}, ["y", "w"], "outputs", "unknown outputs"),
    ],
)
def test_a_bad_request_is_refused_naming_the_field(
    pipeline: Pipeline, inputs, outputs, field: str, words: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        pipeline.check_request(inputs, outputs)
    assert info.value.field.startswith(field)
    assert words in info.value.message
