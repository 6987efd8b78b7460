"""The example's stream of posts (``make_stream.py``) and the checks of ``make stream-demo``.

No server and no Flink here (``make stream-demo`` runs both; ``benchmarks.flink_stream`` too):
the stream is checked against the pipeline's declared inputs with the job's own record parser,
and the demo's summary is shown to fail on what it must catch.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from engine.stream.records import RecordError, RecordMapping
from model_plugins.specs import TensorSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "post_understanding"
TOPICS = ["food", "sport", "travel", "tech", "pets", "music"]


@pytest.fixture(scope="module")
def modules() -> dict[str, ModuleType]:
    """make_stream and stream_demo, imported as the scripts import their siblings."""
    import sys

    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_stream
        import stream_demo
    finally:
        sys.path.remove(str(EXAMPLE))
    return {"make_stream": make_stream, "stream_demo": stream_demo}


@pytest.fixture(scope="module")
def stream(modules: dict[str, ModuleType]) -> list[str]:
    return list(modules["make_stream"].lines())


def pipeline_inputs() -> dict[str, TensorSpec]:
    declared = yaml.safe_load((EXAMPLE / "pipeline.yaml").read_text())["inputs"]
    return {name: TensorSpec(**spec) for name, spec in declared.items()}


def test_the_stream_is_the_same_every_time_and_mixes_the_kinds_of_post(modules, stream):
    assert modules["make_stream"].lines() == stream
    mapping = RecordMapping(pipeline_inputs())
    invalid = {bad.line for bad in modules["make_stream"].INVALID_LINES}
    kinds: dict[str, int] = {}
    ids = []
    for line in stream:
        if line in invalid:
            continue
        record, inputs = mapping.parse(line)  # every other line is a record of the pipeline
        ids.append(record["id"])
        kind = "+".join(sorted(inputs))
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(ids) == len(set(ids)) == 311  # the 11 samples and 300 random posts
    assert set(kinds) == {"image", "text", "image+text"}
    assert min(kinds.values()) > 50
    assert sum(line in invalid for line in stream) == len(invalid) == 4


def test_three_invalid_lines_are_refused_by_the_job_and_one_by_the_server(modules):
    mapping = RecordMapping(pipeline_inputs())
    refused, sent = [], []
    for bad in modules["make_stream"].INVALID_LINES:
        try:
            mapping.parse(bad.line)
        except RecordError as exc:
            refused.append(exc.message)
        else:
            sent.append(json.loads(bad.line)["id"])
    assert len(refused) == 3
    assert sent == ["bad-image-bytes"]  # valid base64 of no image: the decode node refuses it


def answer(record_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": record_id, "embedding": [0.0] * 896, **fields}


def letter(kind: str, record_id: str) -> dict[str, Any]:
    return {"error": {"type": kind, "message": "m", "node": None}, "record": {"id": record_id}}


def test_the_demo_summary_fails_on_a_lost_a_doubled_or_a_dead_lettered_post(
    modules, monkeypatch, capsys
):
    demo = modules["stream_demo"]
    monkeypatch.setattr(demo, "load_topics", lambda: TOPICS)
    tags = {"tag_probabilities": [0.1, 0.5, 0.1, 0.1, 0.1, 0.1], "spam_probability": 0.9}
    sink = [answer("a", text_embedding=[0.0], **tags), answer("b", image_embedding=[0.0])]
    dead = [letter("InvalidRecord", f"bad-{i}") for i in range(4)]
    assert demo.summarise(sink, dead, ["a", "b"]) == []
    printed = capsys.readouterr().out
    assert "sport 1" in printed
    assert "spam (p >= 0.5): 1 of 1" in printed

    problems = demo.summarise(
        [sink[0], sink[0]], [*dead[:3], letter("Overloaded", "b")], ["a", "b"]
    )
    assert problems == [
        "answered more than once: a",
        "1 valid posts not in the sink: b",
        "valid posts dead-lettered: b",
    ]
    no_embedding = {"id": "b", "image_embedding": [0.0]}
    assert demo.summarise([sink[0], no_embedding], dead, ["a", "b"]) == [
        "a sink record without the 896-wide fused embedding"
    ]
