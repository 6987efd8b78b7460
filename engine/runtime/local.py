"""Runners that execute a plugin inside the front process.

Both keep ``instances`` loaded copies of the plugin and hand each call one free copy, so a
node never runs more than ``instances`` calls at once.  They check the batch contract on
every call and turn a plugin's exception into an ``InferenceError`` naming the node; a
``Partial`` that fails items fails the request with the error of its first failed item.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from engine.observability.tracing import start_node_span
from engine.runtime.naming import item_error, node_error
from model_plugins._host.messages import RemoteError
from model_plugins.contract import check_result
from model_plugins.errors import DagserveError
from model_plugins.partial import Partial
from model_plugins.plugin import Batch, LoadContext, ModelPlugin
from model_plugins.specs import TensorSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeBinding:
    """What a runner needs to know about the node it serves."""

    pipeline: str
    node: str
    plugin: str
    plugin_class: type[ModelPlugin]
    outputs: dict[str, TensorSpec]
    contexts: tuple[LoadContext, ...]  # one per instance


class LocalRunner:
    """Base of the in-process runners; subclasses decide where ``predict`` is called."""

    kind = "local"

    def __init__(self, binding: NodeBinding, pool: Executor | None = None) -> None:
        self.binding = binding
        self._pool = pool
        self._idle: asyncio.Queue[ModelPlugin] | None = None
        self._loaded: list[ModelPlugin] = []

    async def start(self) -> None:
        """Load every instance (in the thread pool, so slow loads do not block the loop)."""
        loop = asyncio.get_running_loop()
        self._idle = asyncio.Queue()
        for context in self.binding.contexts:
            plugin = self.binding.plugin_class()
            await loop.run_in_executor(self._pool, plugin.load, context)
            self._loaded.append(plugin)
            self._idle.put_nowait(plugin)

    async def aclose(self) -> None:
        for plugin in self._loaded:
            try:
                plugin.unload()
            except Exception:
                logger.exception("unloading node %r failed", self.binding.node)
        self._loaded.clear()

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        assert self._idle is not None, "runner used before start()"
        try:
            plugin = self._idle.get_nowait()  # most often one is free: no coroutine to make
        except asyncio.QueueEmpty:
            plugin = await self._idle.get()
        try:
            with start_node_span(self.binding.pipeline, self.binding.node):
                outputs = await self._call(plugin.predict, inputs)
        except DagserveError as exc:
            named = node_error(exc, self.binding.node, self.binding.plugin)
            if named is exc:
                raise
            raise named from exc
        except Exception as exc:
            b = self.binding
            logger.debug("node %r raised", b.node, exc_info=True)
            # the words of an exception raised in a worker
            raise RemoteError.from_exception(exc).to_inference_error(b.node, b.plugin) from exc
        finally:
            self._idle.put_nowait(plugin)
        b = self.binding
        n_items = len(next(iter(inputs.values()))) if inputs else None
        result = check_result(b.outputs, outputs, n_items, plugin=b.plugin, node=b.node)
        if not isinstance(result, Partial):
            return result
        if result.errors:  # the batch is this request's items alone
            first = min(result.errors)
            raise node_error(item_error(result.errors[first], first), b.node, b.plugin)
        return result.outputs

    async def _call(
        self, predict: Callable[[Batch], Batch | Partial], inputs: Batch
    ) -> Batch | Partial:
        raise NotImplementedError


class InlineRunner(LocalRunner):
    """Calls ``predict`` in the event loop: for cheap numpy ops (identity, fusion)."""

    kind = "inline"

    async def _call(
        self, predict: Callable[[Batch], Batch | Partial], inputs: Batch
    ) -> Batch | Partial:
        return predict(inputs)


class ThreadPoolRunner(LocalRunner):
    """Calls ``predict`` in a thread pool: for GIL-releasing CPU work (decoding, numpy)."""

    kind = "thread"

    async def _call(
        self, predict: Callable[[Batch], Batch | Partial], inputs: Batch
    ) -> Batch | Partial:
        return await asyncio.get_running_loop().run_in_executor(self._pool, predict, inputs)


__all__ = ["InlineRunner", "LocalRunner", "NodeBinding", "ThreadPoolRunner"]
