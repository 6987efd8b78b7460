"""The runner of model nodes: the plugin lives in a worker process of its framework."""

from __future__ import annotations

import asyncio

from engine.runners.local import NodeBinding
from engine.workers.pool import WorkerKey, WorkerPool
from model_plugins.contract import check_outputs
from model_plugins.plugin import Batch


class WorkerRunner:
    """Hands a node's items to the model loaded in its worker.

    At most ``instances`` calls are in flight for one node: the worker holds that many loaded
    copies and runs one call on each at a time.
    """

    kind = "worker"

    def __init__(self, binding: NodeBinding, pool: WorkerPool, key: WorkerKey) -> None:
        self.binding = binding
        self.pool = pool
        self.key = key
        self.model_id = f"{binding.pipeline}/{binding.node}"
        self._slots = asyncio.Semaphore(len(binding.contexts))

    async def start(self) -> None:
        loaded = await self.pool.load(
            self.key, self.model_id, self.binding.plugin, self.binding.contexts
        )
        self.loaded = loaded

    async def aclose(self) -> None:
        """The pool stops the workers; nothing to do per node."""

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        b = self.binding
        async with self._slots:
            outputs = await self.pool.predict(
                self.key, self.model_id, inputs, node=b.node, plugin=b.plugin, deadline=deadline
            )
        n_items = len(next(iter(inputs.values()))) if inputs else None
        return check_outputs(b.outputs, outputs, n_items, plugin=b.plugin, node=b.node)


__all__ = ["WorkerRunner"]
