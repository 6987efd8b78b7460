"""A loaded model behind its batcher: one object per model, whichever nodes use it.

A :class:`Model` owns everything about one model that runs in a worker process: its identity
(``model_id``, the worker that hosts it, the nodes that use it), its batcher, the worker calls
that run its batches, the batch contract checked on what they return, and its statistics.
Nodes that name the same model (``assembly.model_identity``), in one pipeline or several,
share one ``Model``: it is loaded once and batched once.  Each such node reaches it through a
:class:`ModelRunner`, the DAG's runner of that node, which names the node in spans and errors.
"""

from __future__ import annotations

from collections.abc import Callable

from dag.schema import DEFAULT_MAX_QUEUE, NodeSpec
from engine.observability.tracing import start_node_span
from engine.runtime.batcher import BatchCall, Batcher, BatcherStatistics, Padding
from engine.runtime.local import NodeBinding
from engine.runtime.naming import node_error
from engine.runtime.workers.pool import WorkerKey, WorkerPool
from model_plugins.contract import check_result
from model_plugins.errors import DagserveError, PluginLoadError
from model_plugins.partial import Partial
from model_plugins.plugin import Batch


class Model:
    """One model loaded in the worker of ``key``, and the batcher in front of it.

    Args:
        model_id: ``pipeline/node`` of its first user; names it in the worker, in placement,
            health and metrics.
        binding: its first user's node: what the worker loads (plugin, one context per
            instance) and the outputs the pipeline declares.
        node: its first user's spec: ``instances``, ``batching`` and ``timeout_ms`` (equal
            for every user: they are part of the model's identity).
        on_batch: the batcher's metrics hook.

    ``instances`` is enforced by the batcher alone: it runs at most that many batches at once
    and tells each call which instance is free.  A call that was in flight on a worker that
    another model crashed is sent again to the replacement, unless the plugin declares
    ``retry_on_worker_loss = False`` (see ``WorkerPool.predict``).
    """

    def __init__(
        self,
        model_id: str,
        binding: NodeBinding,
        node: NodeSpec,
        workers: WorkerPool,
        key: WorkerKey,
        *,
        on_batch: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.key = key
        self.binding = binding
        #: ``pipeline/node`` of each node that uses the model
        self.nodes: list[str] = []
        #: what the pipeline declares, completed at load by what the model reports
        self.outputs = dict(binding.outputs)
        #: a call that runs longer has hung its instance: the worker is replaced
        self.timeout_s = node.timeout_ms / 1000 if node.timeout_ms else None
        self._workers = workers
        self._retry = binding.plugin_class.retry_on_worker_loss
        self.batcher = _batcher(node, binding, self._call, f"model {model_id!r}")
        self.batcher.on_batch = on_batch

    @property
    def plugin(self) -> str:
        return self.binding.plugin

    def runner(self, pipeline: str, node: str) -> ModelRunner:
        """The runner of one more node that uses this model."""
        self.nodes.append(f"{pipeline}/{node}")
        return ModelRunner(self, pipeline, node)

    async def start(self) -> None:
        """Load the model into its worker (started on first use)."""
        b = self.binding
        loaded = await self._workers.load(self.key, self.model_id, b.plugin, b.contexts)
        # An adapter learns its specs from the model file: check them against what the
        # pipeline declares, and adopt them where the pipeline declares nothing.
        for name, spec in loaded.outputs.items():
            declared = self.outputs.get(name)
            if declared is None:
                self.outputs[name] = spec
            elif not spec.compatible_with(declared):
                msg = (
                    f"the model gives output {name!r} as {spec.describe()}, "
                    f"but the pipeline declares {declared.describe()}"
                )
                raise PluginLoadError(msg)

    async def aclose(self) -> None:
        """Fail what waits and let running batches end; the pool stops the workers."""
        await self.batcher.aclose()

    async def submit(self, inputs: Batch, *, deadline: float | None) -> Batch:
        """One request's items, batched with others; see :meth:`Batcher.submit`."""
        return await self.batcher.submit(inputs, deadline=deadline)

    def statistics(self) -> BatcherStatistics:
        return self.batcher.statistics()

    async def _call(
        self, inputs: Batch, *, instance: int, deadline: float | None
    ) -> Batch | Partial:
        """Run one batch on ``instance`` in the worker, and check what comes back (once)."""
        # No node here: the batch may hold items of several nodes, each names its own.
        # A call that runs past timeout_s has hung its instance: the pool fails it and
        # replaces the worker.  The timeout bounds each attempt, not a wait for a restart.
        result = await self._workers.predict(
            self.key, self.model_id, inputs, instance=instance, plugin=self.plugin,
            deadline=deadline, timeout_s=self.timeout_s, retry=self._retry,
        )  # fmt: skip
        n_items = len(next(iter(inputs.values()))) if inputs else None
        return check_result(self.outputs, result, n_items, plugin=self.plugin)


class ModelRunner:
    """The DAG's runner of a node whose model runs in a worker: its items go to the model."""

    def __init__(self, model: Model, pipeline: str, node: str) -> None:
        self.model = model
        self.pipeline = pipeline
        self.node = node

    async def aclose(self) -> None:
        """The engine closes each model once."""

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        model = self.model
        try:
            with start_node_span(self.pipeline, self.node, model=model.model_id):
                return await model.submit(inputs, deadline=deadline)
        except DagserveError as exc:
            # The model may serve several nodes: name the one this request went through.
            named = node_error(exc, self.node, model.plugin)
            if named is exc:
                raise
            raise named from exc


def _batcher(node: NodeSpec, binding: NodeBinding, call: BatchCall, name: str) -> Batcher:
    plugin_class = binding.plugin_class
    padding = Padding(dict(plugin_class.padding), dict(plugin_class.padded_outputs))
    if node.batching is None:  # no merging of requests; still bounded and deadline-aware
        return Batcher(
            call, max_batch_size=None, max_queue=DEFAULT_MAX_QUEUE, instances=node.instances,
            name=name,
        )  # fmt: skip
    batching = node.batching
    return Batcher(
        call,
        max_batch_size=batching.max_batch_size,
        max_delay_s=batching.max_delay_s,
        max_queue=batching.max_queue,
        max_queue_delay_s=(
            batching.max_queue_delay_ms / 1000 if batching.max_queue_delay_ms else None
        ),
        instances=node.instances,
        padding=padding,
        ragged=plugin_class.ragged,
        name=name,
        preferred_batch_sizes=batching.preferred_batch_sizes or (),
    )


__all__ = ["Model", "ModelRunner"]
