"""The transport-neutral engine: served pipelines, their runners, and ``infer``.

The Thrift adapter (``engine.transport.handler``) calls :class:`Engine`; so do tests, without
a socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dag.executor import Execution, execute
from dag.pipeline import Pipeline, PipelineDescription
from engine.observability import logs
from engine.observability.metrics import Metrics, status_of
from engine.observability.tracing import start_request_span
from engine.runtime.assembly import (
    ModelSource,
    NodeRunner,
    ServedPipeline,
    plan_placement,
    serve_pipeline,
)
from engine.runtime.devices import DeviceInventory
from engine.runtime.local import LocalRunner
from engine.runtime.model import Model, ModelRunner
from engine.runtime.placement import Placement
from engine.runtime.types import (
    HealthReport,
    InferenceRequest,
    InferenceResult,
)
from engine.runtime.workers.pool import WorkerPool
from model_plugins.errors import (
    DagserveError,
    InferenceError,
    Overloaded,
    PipelineNotFound,
    PluginLoadError,
    node_label,
)

logger = logging.getLogger(__name__)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # "10" sorts after "9"; "1.10" after "1.9"; text parts compare as text.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_]", version))


class Engine:
    """Serves a set of pipelines.

    Lifecycle: ``await start()`` loads every node's plugin, in the front process or in the
    worker of its framework and device (a failure stops startup with the node, the plugin and
    the plugin's own message); ``await aclose()`` unloads them and stops the workers.
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
    ) -> None:
        self._served: dict[str, dict[str, ServedPipeline]] = {}
        #: name -> its latest version among those served
        self._latest: dict[str, str] = {}
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
            for pipeline in self._pending:
                known = set(self.models)
                served = serve_pipeline(
                    pipeline, self._pool, self.workers, self.models, self.placement, model_ids,
                    self.metrics,
                    new_model=self.model_source.new_model if self.model_source else None,
                )  # fmt: skip
                # Register before loading, so that aclose() unloads a half-started pipeline.
                self._served[pipeline.name][pipeline.version] = served
                self._latest.pop(pipeline.name, None)
                for name, runner in served.runners.items():
                    if not isinstance(runner, ModelRunner):  # models start below, once
                        await _start_runner(pipeline, name, runner)
                for key, model in self.models.items():
                    if key not in known:
                        await _start_model(model)
                logger.info(
                    "serving pipeline %s version %s: %s",
                    pipeline.name,
                    pipeline.version,
                    ", ".join(f"{n} [{_where(r)}]" for n, r in served.runners.items()),
                )
        except BaseException:
            await self.aclose()
            raise
        self._pending.clear()
        self.ready = True

    async def aclose(self) -> None:
        self.ready = False
        for versions in self._served.values():
            for served in versions.values():
                for runner in served.runners.values():
                    await runner.aclose()
        for model in self.models.values():
            await model.aclose()
        await self.workers.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the service -------------------------------------------------------------------

    def find(self, name: str, version: str | None = None) -> ServedPipeline:
        versions = self._served.get(name)
        if not versions:
            raise PipelineNotFound(name, None, list(self._served))
        if version is None:
            latest = self._latest.get(name)
            if latest not in versions:  # worked out once per set of versions
                latest = self._latest[name] = max(versions, key=_version_key)
            return versions[latest]
        if version not in versions:
            raise PipelineNotFound(name, version, [f"{name}:{v}" for v in versions])
        return versions[version]

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
        try:
            served = self.find(request.pipeline, request.version)
            pipeline, version = served.pipeline.name, served.pipeline.version
            if self.max_inflight is not None and self.inflight >= self.max_inflight:
                msg = f"{self.inflight} requests in flight (max_inflight {self.max_inflight})"
                raise Overloaded(msg, retry_after_ms=10)
            self.metrics.inflight.inc(pipeline)
            self.inflight += 1
            try:
                execution = await self.execute(served, request)
            finally:
                self.metrics.inflight.dec(pipeline)
                self.inflight -= 1
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
            logs.trace_id.reset(trace_token)
            logs.request_id.reset(token)
            if error is None:
                span.__exit__(None, None, None)
            else:
                span.__exit__(type(error), error, error.__traceback__)

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
        return await execute(
            served.pipeline.plan,
            request.inputs,
            served.runners,
            deadline=deadline,
            wanted=request.outputs,
            observer=served.observe_node,
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
        for model in self.models.values():
            batching = model.statistics()
            details[f"model.{model.model_id}"] = (
                f"nodes={','.join(model.nodes)} queued={batching.queued_items} "
                f"batches={batching.batches} mean_batch={batching.mean_batch_size:.2f} "
                f"deadline_dropped={batching.deadline_dropped} rejected={batching.rejected}"
            )
        for worker, stats in self.workers.statistics().items():
            crashes = sum(stats["crashes"].values())  # type: ignore[attr-defined]
            details[f"worker.{worker}"] = (
                f"pid={stats['pid']} ready={stats['ready']} restarts={stats['restarts']} "
                f"crashes={crashes} retried={stats['retried']} "
                f"models={','.join(stats['models'])}"  # type: ignore[arg-type]
                f" quarantined={','.join(stats['quarantined'])}"  # type: ignore[arg-type]
            )
        # A quarantined model's requests fail at once: say so, and why.
        for model_id, reason in self.workers.quarantined().items():
            details[f"quarantined.{model_id}"] = reason
        return HealthReport(live=True, ready=self.ready, details=details)


async def _start_runner(pipeline: Pipeline, name: str, runner: LocalRunner) -> None:
    node = pipeline.spec.nodes[name]
    try:
        await runner.start()
    except Exception as exc:
        raise _load_failed(pipeline.name, name, node.plugin, "", exc) from exc


async def _start_model(model: Model) -> None:
    b = model.binding
    try:
        await model.start()
    except Exception as exc:
        where = f" in worker {model.key.name}"
        raise _load_failed(b.pipeline, b.node, b.plugin, where, exc) from exc


def _load_failed(pipeline: str, node: str, plugin: str, where: str, exc: Exception) -> Exception:
    cause = exc.message if isinstance(exc, DagserveError) else f"{type(exc).__name__}: {exc}"
    msg = f"pipeline {pipeline!r}: {node_label(node, plugin)} failed to load{where}: {cause}"
    return PluginLoadError(msg)


def _where(runner: NodeRunner) -> str:
    if isinstance(runner, ModelRunner):
        return f"worker {runner.model.key.name}, model {runner.model.model_id}"
    return runner.kind


__all__ = ["Engine"]
