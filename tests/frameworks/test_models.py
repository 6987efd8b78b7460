"""The cases the framework tests compare against: a file without them is an error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.frameworks.models import load_cases, save_cases


def test_cases_come_back_in_order(tmp_path: Path) -> None:
    cases = [({"x": np.full((b, 2), b, np.float32)}, {"y": np.full((b,), b)}) for b in (1, 3)]
    save_cases(tmp_path / "c.npz", cases)
    loaded = load_cases(tmp_path / "c.npz")
    assert [(i["x"].shape, o["y"].tolist()) for i, o in loaded] == [
        ((1, 2), [1]),
        ((3, 2), [3] * 3),
    ]


def test_no_cases_is_an_error_not_an_empty_loop(tmp_path: Path) -> None:
    save_cases(tmp_path / "none.npz", [])
    with pytest.raises(ValueError, match="0 cases"):
        load_cases(tmp_path / "none.npz")
    np.savez(tmp_path / "empty.npz")  # not even a count
    with pytest.raises(ValueError, match="0 cases"):
        load_cases(tmp_path / "empty.npz")


def test_a_missing_case_is_an_error(tmp_path: Path) -> None:
    x = np.zeros((1, 2), np.float32)
    np.savez(tmp_path / "gap.npz", count=np.int64(2), **{"0.in.x": x, "0.out.y": x})
    with pytest.raises(ValueError, match=r"1 cases .* expected 2"):
        load_cases(tmp_path / "gap.npz")
    np.savez(tmp_path / "half.npz", count=np.int64(1), **{"0.in.x": x})
    with pytest.raises(ValueError, match="without inputs or without outputs"):
        load_cases(tmp_path / "half.npz")
