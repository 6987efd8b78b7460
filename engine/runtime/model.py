"""Model nodes behind a batcher: one shared model, many nodes (and pipelines) feeding it."""

from __future__ import annotations

from dataclasses import dataclass

from engine.observability.tracing import start_node_span
from engine.runtime.batcher import Batcher
from engine.runtime.worker_runner import WorkerRunner
from engine.runtime.workers.pool import WorkerKey
from model_plugins.errors import InferenceError
from model_plugins.plugin import Batch
from model_plugins.specs import TensorSpec


@dataclass
class SharedModel:
    """One loaded model and its batcher; every node that names the same model uses it."""

    model_id: str
    runner: WorkerRunner
    batcher: Batcher
    nodes: list[str]  # "pipeline/node" of each user

    async def start(self) -> None:
        await self.runner.start()

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.runner.aclose()


class BatchedNode:
    """The runner of one node whose model is shared: its items go through the batcher."""

    kind = "worker"

    def __init__(self, shared: SharedModel, pipeline: str, node: str, plugin: str) -> None:
        self.shared = shared
        self.pipeline = pipeline
        self.node = node
        self.plugin = plugin

    @property
    def key(self) -> WorkerKey:
        return self.shared.runner.key

    @property
    def outputs(self) -> dict[str, TensorSpec]:
        return self.shared.runner.outputs

    async def start(self) -> None:
        """The engine starts each shared model once."""

    async def aclose(self) -> None:
        """The engine closes each shared model once."""

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        try:
            with start_node_span(self.pipeline, self.node, model=self.shared.model_id):
                return await self.shared.batcher.submit(inputs, deadline=deadline)
        except InferenceError as exc:
            # The model may serve several nodes: name the one this request went through.
            if exc.node != self.node:
                message = exc.message
                if exc.node:
                    message = message.replace(f"node {exc.node!r}", f"node {self.node!r}", 1)
                raise InferenceError(
                    message,
                    node=self.node,
                    plugin=exc.plugin or self.plugin,
                    cause=exc.cause,
                ) from exc
            raise


__all__ = ["BatchedNode", "SharedModel"]
