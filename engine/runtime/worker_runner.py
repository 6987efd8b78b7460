"""The runner of model nodes: the plugin lives in a worker process of its framework."""

from __future__ import annotations

import asyncio

from engine.runtime.local import NodeBinding
from engine.runtime.workers.pool import WorkerKey, WorkerPool
from model_plugins.contract import check_outputs
from model_plugins.errors import PluginLoadError
from model_plugins.plugin import Batch


class WorkerRunner:
    """Hands a node's items to the model loaded in its worker.

    At most ``instances`` calls are in flight for one node: the worker holds that many loaded
    copies and runs one call on each at a time.  A call that was in flight on a worker that
    another model crashed is sent again to the replacement, unless the plugin declares
    ``retry_on_worker_loss = False`` (see ``WorkerPool.predict``).
    """

    kind = "worker"

    def __init__(
        self,
        binding: NodeBinding,
        pool: WorkerPool,
        key: WorkerKey,
        timeout_s: float | None = None,
    ) -> None:
        self.binding = binding
        self.pool = pool
        self.key = key
        #: a call that runs longer has hung its instance: the worker is replaced
        self.timeout_s = timeout_s
        self.model_id = f"{binding.pipeline}/{binding.node}"
        self.retry = bool(getattr(binding.plugin_class, "retry_on_worker_loss", True))
        self._slots = asyncio.Semaphore(len(binding.contexts))
        self.outputs = dict(binding.outputs)

    async def start(self) -> None:
        b = self.binding
        loaded = await self.pool.load(self.key, self.model_id, b.plugin, b.contexts)
        # An adapter learns its specs from the model file: check them against what the
        # pipeline declares, and adopt them where the pipeline declares nothing.
        outputs = dict(b.outputs)
        for name, spec in loaded.outputs.items():
            declared = outputs.get(name)
            if declared is None:
                outputs[name] = spec
            elif not spec.compatible_with(declared):
                msg = (
                    f"the model gives output {name!r} as {spec.describe()}, "
                    f"but the pipeline declares {declared.describe()}"
                )
                raise PluginLoadError(msg)
        self.outputs = outputs

    async def aclose(self) -> None:
        """The pool stops the workers; nothing to do per node."""

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        b = self.binding
        async with self._slots:
            # A call that runs past timeout_s has hung its instance: the pool fails it and
            # replaces the worker.  The timeout bounds each attempt, not a wait for a restart.
            outputs = await self.pool.predict(
                self.key, self.model_id, inputs, node=b.node, plugin=b.plugin,
                deadline=deadline, timeout_s=self.timeout_s, retry=self.retry,
            )  # fmt: skip
        n_items = len(next(iter(inputs.values()))) if inputs else None
        return check_outputs(self.outputs, outputs, n_items, plugin=b.plugin, node=b.node)


__all__ = ["WorkerRunner"]
