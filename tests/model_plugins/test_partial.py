"""Partial: a batch whose items did not all succeed crosses processes and is checked."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from model_plugins import InferenceError, InvalidRequest, Partial, TensorSpec
from model_plugins.contract import check_result

SPECS = {"y": TensorSpec("float32", [1])}
Y = np.zeros((3, 1), np.float32)


def test_a_partial_pickles_with_its_errors():
    shared = InvalidRequest("bad value", field="inputs.x")
    result = Partial({"y": Y}, errors={0: shared, 2: shared, 1: InferenceError("oom", node="n")})
    again = pickle.loads(pickle.dumps(result, protocol=5))
    np.testing.assert_array_equal(again.outputs["y"], Y)
    assert isinstance(again.errors[0], InvalidRequest)
    assert again.errors[0].field == "inputs.x"
    assert again.errors[1].node == "n"


def test_a_checked_partial_keys_its_errors_by_int():
    checked = check_result(
        SPECS, Partial({"y": Y}, {np.int64(2): InvalidRequest("x")}), 3, plugin="p"
    )
    assert isinstance(checked, Partial)
    assert list(checked.errors) == [2]
    assert type(next(iter(checked.errors))) is int


@pytest.mark.parametrize(
    ("errors", "message"),
    [
        ({3: InvalidRequest("x")}, "plugin 'p': Partial.errors names item 3, but the batch has 3"),
        ({-1: InvalidRequest("x")}, "names item -1"),
        ({True: InvalidRequest("x")}, "must be keyed by item index (got True)"),
        ({"0": InvalidRequest("x")}, "must be keyed by item index (got '0')"),
        ({0: ValueError("x")}, "the error of item 0 must be a DagserveError"),
    ],
)
def test_a_partial_that_breaks_the_contract_fails_the_batch(errors, message):
    with pytest.raises(InferenceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_result(SPECS, Partial({"y": Y}, errors), 3, plugin="p")


def test_a_partial_still_holds_a_row_for_every_item():
    with pytest.raises(InferenceError, match="the batch has 3 items but output 'y' has 2"):
        check_result(SPECS, Partial({"y": Y[:2]}, {1: InvalidRequest("x")}), 3, plugin="p")
