"""The runner of model nodes: the plugin lives in a worker process of its framework."""

from __future__ import annotations

import asyncio

from engine.runners.local import NodeBinding
from engine.workers.pool import WorkerKey, WorkerPool
from model_plugins.contract import check_outputs
from model_plugins.errors import InferenceError, PluginLoadError
from model_plugins.plugin import Batch


class WorkerRunner:
    """Hands a node's items to the model loaded in its worker.

    At most ``instances`` calls are in flight for one node: the worker holds that many loaded
    copies and runs one call on each at a time.
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
            call = self.pool.predict(
                self.key, self.model_id, inputs, node=b.node, plugin=b.plugin, deadline=deadline
            )
            if self.timeout_s is None:
                outputs = await call
            else:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        outputs = await call
                except TimeoutError:
                    # The call cannot be interrupted inside the worker and holds an instance:
                    # replace the worker (its models are loaded again) rather than let every
                    # later call queue behind a hung one.
                    why = f"node {b.node!r} ran past its timeout_ms ({self.timeout_s * 1000:g} ms)"
                    self.pool.replace(self.key, why)
                    msg = f"{why}; its worker {self.key.name} is being replaced"
                    raise InferenceError(msg, node=b.node, plugin=b.plugin) from None
        n_items = len(next(iter(inputs.values()))) if inputs else None
        return check_outputs(self.outputs, outputs, n_items, plugin=b.plugin, node=b.node)


__all__ = ["WorkerRunner"]
