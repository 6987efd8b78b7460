"""The record format of `dagserve stream` (engine/stream/records.py), without Flink or a
server: records -> request inputs checked against the pipeline's specs, outputs -> sink
records, and the dead-letter shape."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from engine.stream.caller import Outcome
from engine.stream.records import RecordError, RecordMapping, dead_letter, item_json
from model_plugins.specs import TensorSpec

SPECS = {
    "x": TensorSpec("float32", [3]),
    "ids": TensorSpec("int64", [-1]),
    "text": TensorSpec("string", []),
    "image": TensorSpec("bytes", [], optional=True),
}
PNG = b"\x89PNG\r\n\x1a\n\x00\x00"


def line(**fields: object) -> str:
    record = {"x": [1, 2, 3], "ids": [7, 8], "text": "hello", "id": "r1"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not ...})


def test_a_record_becomes_one_item_of_each_input() -> None:
    record, inputs = RecordMapping(SPECS).parse(line(image=base64.b64encode(PNG).decode()))
    assert record["id"] == "r1"
    assert inputs["x"].dtype == np.float32
    np.testing.assert_array_equal(inputs["x"], [[1, 2, 3]])
    assert inputs["ids"].dtype == np.int64
    assert inputs["ids"].shape == (1, 2)
    assert inputs["text"].tolist() == ["hello"]
    assert inputs["image"].tolist() == [PNG]


def test_an_optional_input_may_be_missing_or_null() -> None:
    assert "image" not in RecordMapping(SPECS).parse(line())[1]
    assert "image" not in RecordMapping(SPECS).parse(line(image=None))[1]


@pytest.mark.parametrize(
    ("text", "why", "field"),
    [
        ("{not json", "not JSON", None),
        ("[1, 2]", "not a JSON object: a list", None),
        (line(x=...), "required input 'x' missing", "x"),
        (line(x=[1, 2]), "shape [2] for a float32[3] input", "x"),
        (line(x=[[1, 2, 3]]), "shape [1, 3] for a float32[3] input", "x"),
        (line(x=[1, [2], 3]), "not a rectangular list", "x"),
        (line(x=["a", "b", "c"]), "text for a float32[3] input", "x"),
        (line(ids=[1.5, 2]), "float64 values for a int64[?] input", "ids"),
        (line(text=3), "a string input takes text, not int", "text"),
        (line(image="not base64!"), "bad base64", "image"),
        (line(image=12), "a bytes input takes base64 text", "image"),
    ],
)
def test_a_record_that_does_not_match_says_why(text: str, why: str, field: str | None) -> None:
    with pytest.raises(RecordError, match=re.escape(why)) as caught:
        RecordMapping(SPECS).parse(text)
    assert caught.value.field == field


def test_maps_rename_fields_both_ways() -> None:
    mapping = RecordMapping(
        {"x": TensorSpec("float32", [3])}, input_map={"values": "x"}, output_map={"y": "score"}
    )
    record, inputs = mapping.parse('{"values": [1, 2, 3], "id": 4}')
    np.testing.assert_array_equal(inputs["x"], [[1, 2, 3]])
    outputs = {"y": np.array([[0.5, 1.5]], np.float32), "label": np.array(["a"], object)}
    # the input's field is consumed, other fields pass through beside the outputs
    assert mapping.answer(record, outputs) == {"id": 4, "score": [0.5, 1.5], "label": "a"}
    with pytest.raises(ValueError, match="names no input of the pipeline: nope"):
        RecordMapping({"x": TensorSpec("float32", [3])}, input_map={"values": "nope"})


def test_outputs_become_json_values() -> None:
    assert item_json(np.array([[1, 2]], np.int32)) == [1, 2]
    assert item_json(np.array([2.5], np.float64)) == 2.5
    assert item_json(np.array([PNG], object)) == base64.b64encode(PNG).decode()
    assert item_json(np.array([["a", "b"]], object)) == ["a", "b"]


def test_a_dead_letter_carries_the_error_and_the_record_or_line() -> None:
    assert dead_letter("InferenceError", "boom", node="check", record={"id": 1}) == {
        "error": {"type": "InferenceError", "message": "boom", "node": "check", "field": None},
        "record": {"id": 1},
    }
    assert dead_letter("InvalidRecord", "not JSON", line="{x")["line"] == "{x"


@pytest.mark.parametrize("kind", ["answer", "dead", "blank"])
def test_an_operator_row_reads_back(kind: str) -> None:
    outcome = Outcome(kind, json.dumps({"text": "a\tb\nc"}), 3, "X" if kind == "dead" else "")  # type: ignore[arg-type]
    row = outcome.to_row()
    assert "\n" not in row
    assert Outcome.from_row(row) == outcome
    with pytest.raises(ValueError, match="not an operator row"):
        Outcome.from_row("other\t\t0\t{}")
