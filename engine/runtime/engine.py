"""The transport-neutral engine: served pipelines, their runners, and ``infer``.

The Thrift adapter (``engine.transport.handler``) calls :class:`Engine`; so do tests, without
a socket.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dag.executor import Execution, execute
from dag.pipeline import Pipeline, PipelineDescription
from engine.observability import logs
from engine.observability.metrics import Metrics, status_of
from engine.observability.tracing import request_trace, start_request_span
from engine.runtime.assembly import (
    ModelSource,
    ServedPipeline,
    plan_placement,
)
from engine.runtime.devices import DeviceInventory
from engine.runtime.lifecycle import Lifecycle
from engine.runtime.lifecycle import version_key as _version_key
from engine.runtime.model import Model
from engine.runtime.placement import Placement
from engine.runtime.registry import resolver
from engine.runtime.types import (
    HealthReport,
    InferenceRequest,
    InferenceResult,
)
from engine.runtime.workers.pool import WorkerPool
from model_plugins.errors import (
    DagserveError,
    DeadlineExceeded,
    InferenceError,
    Overloaded,
    PipelineNotFound,
)

logger = logging.getLogger(__name__)


class Engine:
    """Serves a set of pipelines.

    Lifecycle: ``await start()`` loads every node's plugin, in the front process or in the
    worker of its framework and device (a failure stops startup with the node, the plugin and
    the plugin's own message); ``await aclose()`` unloads them and stops the workers.  While
    it serves, :attr:`lifecycle` loads, routes, mirrors, reloads and unloads versions
    (``engine.runtime.lifecycle``); ``state_file`` keeps its changes across restarts.
    """

    def __init__(
        self,
        pipelines: Iterable[Pipeline],
        *,
        thread_pool_size: int = 8,
        workers: WorkerPool | None = None,
        inventory: DeviceInventory | None = None,
        gpu_reserve_mb: int = 0,
        metrics: Metrics | None = None,
        slow_request_ms: float | None = None,
        max_inflight: int | None = None,
        model_source: ModelSource | None = None,
        state_file: Path | None = None,
        drain_timeout_s: float = 10.0,
    ) -> None:
        #: name -> version -> the ready versions (routed through ``lifecycle.routes``)
        self._served: dict[str, dict[str, ServedPipeline]] = {}
        self._pending = list(pipelines)
        seen: set[tuple[str, str]] = set()
        for p in self._pending:
            if (p.name, p.version) in seen:
                msg = f"pipeline {p.name!r} version {p.version!r} is defined twice"
                raise ValueError(msg)
            seen.add((p.name, p.version))
            self._served.setdefault(p.name, {})
        self._pool = ThreadPoolExecutor(thread_pool_size, thread_name_prefix="dagserve-node")
        self.workers = workers or WorkerPool()
        self.inventory = inventory or DeviceInventory.from_nvml()
        self.gpu_reserve_mb = gpu_reserve_mb
        self.metrics = metrics or Metrics()
        self.slow_request_ms = slow_request_ms
        self.max_inflight = max_inflight
        self.inflight = 0
        self.placement: Placement | None = None
        #: identity of a loaded model -> the model (and its batcher), shared by every node using it
        self.models: dict[tuple[Any, ...], Model] = {}
        #: None: this engine places its models and batches them for its workers
        self.model_source = model_source
        self.lifecycle = Lifecycle(self, state_file=state_file, drain_timeout_s=drain_timeout_s)
        self._routes = self.lifecycle.routes
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        # Place every model before loading any: a pipeline that does not fit is refused
        # at startup, with what each device has left.
        if self.model_source is not None:
            self.placement, model_ids = self.model_source.plan(self._pending)
        else:
            self.placement, model_ids = plan_placement(
                self._pending, self.inventory, reserve_mb=self.gpu_reserve_mb
            )
        for line in self.placement.log_lines():
            logger.info("placement: %s", line)
        try:
            # The same path as a version loaded at runtime; then the state file is restored.
            await self.lifecycle.start(self._pending, self.placement, model_ids)
        except BaseException:
            await self.aclose()
            raise
        self._pending.clear()
        if self.model_source is None:  # the cache keeps what this server serves, no more
            await asyncio.to_thread(resolver().clean)
        self.ready = True

    async def aclose(self) -> None:
        self.ready = False
        await self.lifecycle.aclose()
        for versions in self._served.values():
            for served in versions.values():
                for runner in served.runners.values():
                    await runner.aclose()
        for runner in self.lifecycle.runners():  # versions draining or loading
            await runner.aclose()
        for model in self.models.values():
            await model.aclose()
        await self.workers.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the service -------------------------------------------------------------------

    def find(
        self, name: str, version: str | None = None, headers: Mapping[str, str] | None = None
    ) -> ServedPipeline:
        """The version that serves a request: the one it names, else one picked by the name's
        traffic weights (by the sticky header's hash when the name has one and the request
        carries it); see ``engine.runtime.lifecycle``."""
        route = self._routes.get(name)
        if route is None:
            raise PipelineNotFound(name, None, list(self._routes))
        if version is None:
            return route.pick(headers)
        served = route.versions.get(version)
        if served is None:
            raise PipelineNotFound(name, version, [f"{name}:{v}" for v in route.versions])
        return served

    async def infer(self, request: InferenceRequest) -> InferenceResult:
        """Serve one request: find its pipeline, run it, and count and log what happened."""
        started = time.perf_counter()
        token = logs.request_id.set(request.request_id)
        pipeline, version = "", ""  # unknown pipelines are counted under "": bounded labels
        execution: Execution | None = None
        error: BaseException | None = None
        # A W3C traceparent in the headers is continued: as an OpenTelemetry span when the SDK
        # is installed, and in any case as the trace_id of this request's log lines.
        span = start_request_span(request.pipeline, request.headers)
        trace = span.__enter__()
        trace_token = logs.trace_id.set(trace.trace_id if trace else None)
        request_trace_token = request_trace.set(trace)
        try:
            served = self.find(request.pipeline, request.version, request.headers)
            if served.paused is not None and not served.paused.is_set():
                served = await self._after_pause(served, request)
            pipeline, version = served.pipeline.name, served.pipeline.version
            if self.max_inflight is not None and self.inflight >= self.max_inflight:
                msg = f"{self.inflight} requests in flight (max_inflight {self.max_inflight})"
                raise Overloaded(msg, retry_after_ms=10)
            self.metrics.inflight.inc(pipeline)
            self.inflight += 1
            served.inflight += 1  # a version retired waits for it
            try:
                execution = await self.execute(served, request)
            finally:
                self.metrics.inflight.dec(pipeline)
                self.inflight -= 1
                served.inflight -= 1
            lifecycle = self.lifecycle
            if lifecycle.shadows:
                lifecycle.mirror(served, request, execution.outputs)
            return InferenceResult(
                request_id=request.request_id,
                outputs=execution.outputs,
                version=version,
                node_latency_us=execution.node_latency_us,
            )
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            if not isinstance(error, asyncio.CancelledError):
                self.metrics.requests.inc(pipeline, version, status_of(error))
            if pipeline:
                self.metrics.request_seconds.observe(seconds, pipeline, version)
            self._log_request(request, pipeline, seconds, execution, error)
            request_trace.reset(request_trace_token)
            logs.trace_id.reset(trace_token)
            logs.request_id.reset(token)
            if error is None:
                span.__exit__(None, None, None)
            else:
                span.__exit__(type(error), error, error.__traceback__)

    async def _after_pause(
        self, served: ServedPipeline, request: InferenceRequest
    ) -> ServedPipeline:
        """Wait while the version's models are swapped in place, then find it again."""
        assert served.paused is not None
        loop = asyncio.get_running_loop()
        when = None if request.timeout_ms is None else loop.time() + request.timeout_ms / 1000
        try:
            async with asyncio.timeout_at(when):
                await served.paused.wait()
        except TimeoutError:
            msg = f"deadline exceeded while pipeline {request.pipeline!r} was being reloaded"
            raise DeadlineExceeded(msg) from None
        return self.find(request.pipeline, request.version, request.headers)

    def _log_request(
        self,
        request: InferenceRequest,
        pipeline: str,
        seconds: float,
        execution: Execution | None,
        error: BaseException | None,
    ) -> None:
        ms = seconds * 1000
        slow_ms = self.slow_request_ms
        slow = execution is not None and slow_ms is not None and ms >= slow_ms
        if (error is None and not slow) or isinstance(error, asyncio.CancelledError):
            # served in time, or cancelled: a debug line, most often off (then nothing is built)
            if logger.isEnabledFor(logging.DEBUG):
                served = {"pipeline": request.pipeline, "ms": round(ms, 3)}
                logger.debug("request served", extra=served)
            return
        fields: dict[str, Any] = {"pipeline": request.pipeline, "ms": round(ms, 3)}
        if isinstance(error, InferenceError):
            fields.update(node=error.node, plugin=error.plugin, cause=error.cause)
            logger.warning("request failed: %s", error.message, extra=fields)
        elif isinstance(error, DagserveError):
            logger.info("request refused: %s: %s", type(error).__name__, error, extra=fields)
        elif error is not None:
            logger.error("request failed", exc_info=error, extra=fields)
        elif execution is not None:  # slow
            nodes = execution.node_latency_us
            breakdown = ", ".join(f"{n} {us / 1000:.2f} ms" for n, us in nodes.items())
            fields["node_ms"] = {n: round(us / 1000, 3) for n, us in nodes.items()}
            logger.warning("slow request: %.1f ms (%s)", ms, breakdown, extra=fields)

    async def execute(self, served: ServedPipeline, request: InferenceRequest) -> Execution:
        """Check ``request`` against the pipeline's signature and run it."""
        served.pipeline.check_request(request.inputs, request.outputs)
        deadline = None
        if request.timeout_ms is not None:  # > 0: InferenceRequest checks it
            deadline = asyncio.get_running_loop().time() + request.timeout_ms / 1000.0
        key = None
        if served.pipeline.plan.variant_nodes:  # variants pick by the name's sticky header
            route = self._routes.get(served.pipeline.name)
            if route is not None and route.sticky is not None:
                key = request.headers.get(route.sticky)
        return await execute(
            served.pipeline.plan,
            request.inputs,
            served.runners,
            deadline=deadline,
            wanted=request.outputs,
            observer=served.observe_node,
            request_key=key,
        )

    def list_pipelines(self) -> list[PipelineDescription]:
        return [
            served.pipeline.description
            for _, versions in sorted(self._served.items())
            for _, served in sorted(versions.items(), key=lambda kv: _version_key(kv[0]))
        ]

    def describe(self, name: str) -> PipelineDescription:
        return self.find(name).pipeline.description

    def health(self) -> HealthReport:
        details = {
            f"pipeline.{name}:{version}": "ready" if self.ready else "loading"
            for name, versions in self._served.items()
            for version in versions
        }
        details["pipelines"] = str(sum(len(v) for v in self._served.values()))
        if self.placement is not None:
            details.update(self.placement.details())
        # the registry version each models:/ (or URI) model of a version resolved to
        served = (s.pipeline for versions in self._served.values() for s in versions.values())
        details.update(resolver().details(served))
        for model in self.models.values():
            batching = model.statistics()
            details[f"model.{model.model_id}"] = (
                f"nodes={','.join(model.nodes)} queued={batching.queued_items} "
                f"batches={batching.batches} mean_batch={batching.mean_batch_size:.2f} "
                f"deadline_dropped={batching.deadline_dropped} rejected={batching.rejected}"
            )
        for worker, stats in self.workers.statistics().items():
            crashes = sum(stats["crashes"].values())  # type: ignore[attr-defined]
            # on a Ray cluster, the node that holds the worker's models
            where = (
                f"ray_node={stats['ray_node']} ray_ip={stats['ray_ip']} "
                if "ray_node" in stats
                else ""
            )
            details[f"worker.{worker}"] = (
                f"{where}pid={stats['pid']} ready={stats['ready']} restarts={stats['restarts']} "
                f"crashes={crashes} retried={stats['retried']} "
                f"models={','.join(stats['models'])}"  # type: ignore[arg-type]
                f" quarantined={','.join(stats['quarantined'])}"  # type: ignore[arg-type]
            )
        # A quarantined model's requests fail at once: say so, and why.
        for model_id, reason in self.workers.quarantined().items():
            details[f"quarantined.{model_id}"] = reason
        return HealthReport(live=True, ready=self.ready, details=details)


__all__ = ["Engine"]
