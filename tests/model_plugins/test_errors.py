"""Every error of the SDK crosses a process boundary intact (errors pickle with their fields)."""

from __future__ import annotations

import pickle

import pytest

from model_plugins import errors
from model_plugins.errors import (
    BatchContractError,
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
    PluginError,
    PluginLoadError,
    PluginNotFound,
)

CASES: list[DagserveError] = [
    DagserveError("root"),
    InvalidRequest("bad shape", field="inputs.image.shape"),
    PipelineNotFound("tags", version="2", known=["caption", "tags"]),
    Overloaded("queue full", retry_after_ms=250),
    DeadlineExceeded("timeout_ms 50 ran out"),
    InferenceError("boom", node="embed", plugin="torchscript", cause="builtins.ValueError"),
    BatchContractError("pkg.mod:Bad", "embedding", expected=4, actual=3, node="embed"),
    PluginError("cannot inspect"),
    PluginNotFound("unknown plugin"),
    PluginLoadError("load failed"),
]


def test_cases_cover_every_error_class() -> None:
    defined = {
        value
        for value in vars(errors).values()
        if isinstance(value, type)
        and issubclass(value, DagserveError)
        and value.__module__ == errors.__name__
    }
    assert {type(case) for case in CASES} == defined


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_error_pickles_round_trip(error: DagserveError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)


def test_fields_survive_pickling() -> None:
    copy = pickle.loads(pickle.dumps(CASES[6]))
    assert (copy.expected, copy.actual, copy.node, copy.plugin) == (4, 3, "embed", "pkg.mod:Bad")
    assert "4 items" in str(copy)
    assert "has 3" in str(copy)
