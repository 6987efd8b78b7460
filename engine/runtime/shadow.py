"""Comparing what a shadow produced with what was served.

A shadow (a pipeline version, ``engine.runtime.lifecycle``, or a node's variant,
``engine.runtime.variants``) gets a copy of the inputs that another answered; its outputs are
compared with the served ones here, the same way for both, so that their ``*_mismatches``
metrics mean the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

#: shadow outputs equal the served ones within numpy.allclose's defaults
SHADOW_RTOL = 1e-5
SHADOW_ATOL = 1e-8


def compare_outputs(
    served: Mapping[str, np.ndarray], shadow: Mapping[str, np.ndarray]
) -> tuple[float, bool]:
    """How far a shadow's outputs are from the served ones.

    Returns:
        The largest absolute difference over numeric outputs of equal dtype and shape (NaNs
        left out), and whether they match: the same names, dtypes and shapes, numbers within
        ``numpy.allclose``'s tolerances (NaN equal to NaN), everything else equal.

    >>> compare_outputs({"y": np.array([1.0, 2.0])}, {"y": np.array([1.0, 2.5])})
    (0.5, False)
    >>> compare_outputs({"t": np.array(["a"], dtype=object)}, {"t": np.array(["a"], dtype=object)})
    (0.0, True)
    """
    same = served.keys() == shadow.keys()
    worst = 0.0
    for name, a in served.items():
        b = shadow.get(name)
        if b is None:
            continue
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            same = False
            continue
        if a.dtype.kind in "biuf":
            if a.size:
                diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
                diff = diff[~np.isnan(diff)]
                if diff.size:
                    worst = max(worst, float(diff.max()))
                if not np.allclose(a, b, rtol=SHADOW_RTOL, atol=SHADOW_ATOL, equal_nan=True):
                    same = False
        elif not np.array_equal(a, b):
            same = False
    return worst, same


__all__ = ["SHADOW_ATOL", "SHADOW_RTOL", "compare_outputs"]
