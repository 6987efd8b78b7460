"""A batch whose items did not all succeed: ``predict`` fails some items and answers the rest.

>>> import numpy as np
>>> from model_plugins import InvalidRequest, Partial
>>> x = np.array([[1.0], [-2.0], [3.0]], np.float32)
>>> result = Partial({"y": np.sqrt(np.abs(x))}, errors={1: InvalidRequest("x is negative")})
>>> sorted(result.errors)
[1]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model_plugins.errors import DagserveError


@dataclass(frozen=True)
class Partial:
    """What ``predict`` returns when some items of the batch failed on their own.

    The batch may hold items of several requests.  Each error reaches only the request that
    owns the failed item (naming the item's index within that request); the other requests get
    their rows, and nothing runs again.  Raise instead when the whole batch failed.

    Attributes:
        outputs: a row for every item of the batch, as ``predict`` returns normally; the rows
            of failed items are never read (fill them with anything of the right dtype).
        errors: index of an item in the batch -> its error, a :class:`DagserveError` such as
            :class:`InvalidRequest` (the item is bad) or :class:`InferenceError`.
    """

    outputs: dict[str, np.ndarray]
    errors: dict[int, DagserveError] = field(default_factory=dict)


__all__ = ["Partial"]
