"""The runner interface: how the executor hands a node its inputs.

``dag`` knows no transport and no process.  It drives each node through a :class:`Runner`,
which ``engine`` implements: inline in the event loop, in a thread pool, or through a model's
batcher to a worker process.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from model_plugins.plugin import Batch


@runtime_checkable
class Runner(Protocol):
    """Runs one node on one request's items."""

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        """Run the node on ``inputs`` (the request's items) and return its outputs.

        Args:
            inputs: input name -> array; the first dimension is the item dimension.
            deadline: the request's deadline on the loop's clock (``loop.time()``), or None.

        Raises:
            DagserveError: ``InferenceError`` naming the node on failure,
                ``DeadlineExceeded`` when the deadline passes first, ``Overloaded`` when full.
        """
        ...


__all__ = ["Runner"]
