"""The runner interface: how the executor hands a node its inputs.

``dag`` knows no transport and no process.  It drives each node through a :class:`Runner`,
which ``engine`` implements: inline in the event loop, in a thread pool, or through a model's
batcher to a worker process.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
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


@dataclass
class VariantScope:
    """What the nodes with variants see of the request they run (:data:`variant_scope`).

    Attributes:
        key: the request's sticky key (the value of the sticky header), or None: a runner
            that picks among variants picks by its hash, so one key keeps one variant.
        ran: node -> the variant that ran it, filled by those runners; the executor reads it
            into each node's timing (nodes that ran as themselves are absent).
    """

    key: str | None = None
    ran: dict[str, str] = field(default_factory=dict)


#: set by the executor around a request whose pipeline has nodes with variants (None
#: otherwise); the runners of such nodes read the key and say which variant they ran.  One
#: object per request, shared by every node's task (a task copies the context, not the scope).
variant_scope: ContextVar[VariantScope | None] = ContextVar("dagserve_variant_scope", default=None)


__all__ = ["Runner", "VariantScope", "variant_scope"]
