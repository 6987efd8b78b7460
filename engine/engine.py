"""The transport-neutral engine: served pipelines, their runners, and ``infer``.

The Thrift adapter (``engine.service``) calls :class:`Engine`; so do tests, without a socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dag.executor import Execution, NodeTiming, _Plan, execute, plan
from dag.pipeline import Pipeline
from dag.schema import NodeSpec, parse_ref
from engine import logs
from engine.batcher import Batcher, Padding
from engine.devices import DeviceInventory
from engine.metrics import Metrics, error_type, status_of
from engine.placement import Placement, PlacementRequest, place
from engine.runners.batched import BatchedNode, SharedModel
from engine.runners.local import InlineRunner, LocalRunner, NodeBinding, ThreadPoolRunner
from engine.runners.worker import WorkerRunner
from engine.tracing import start_request_span
from engine.types import (
    EdgeDescription,
    HealthReport,
    InferenceRequest,
    InferenceResult,
    PipelineDescription,
)
from engine.workers.pool import WorkerPool, worker_key
from model_plugins.contract import check_inputs
from model_plugins.errors import (
    DagserveError,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
    PluginLoadError,
)
from model_plugins.plugin import Batch, LoadContext, ModelPlugin
from model_plugins.registry import BUILTINS, resolve

logger = logging.getLogger(__name__)


#: items that may wait for a model node without `batching:` before requests are Overloaded
DEFAULT_MAX_QUEUE = 1024


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # "10" sorts after "9"; "1.10" after "1.9"; text parts compare as text.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_]", version))


Runner = LocalRunner | BatchedNode


@dataclass
class ServedPipeline:
    """A pipeline with its runners, ready to execute requests."""

    pipeline: Pipeline
    runners: dict[str, Runner]
    plan: _Plan
    description: PipelineDescription
    required_inputs: frozenset[str] = field(default_factory=frozenset)
    metrics: Metrics | None = None

    def observe_node(self, node: str, timing: NodeTiming, error: BaseException | None) -> None:
        if self.metrics is None:
            return
        name = self.pipeline.name
        self.metrics.node_seconds.labels(name, node).observe(timing.end - timing.start)
        if error is not None:
            self.metrics.node_errors.labels(name, node, error_type(error)).inc()


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
    ) -> None:
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
        #: identity of a loaded model -> the model and its batcher, shared by every node using it
        self.models: dict[tuple[Any, ...], SharedModel] = {}
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        # Place every model before loading any: a pipeline that does not fit is refused
        # at startup, with what each device has left.
        self.placement, model_ids = plan_placement(
            self._pending, self.inventory, reserve_mb=self.gpu_reserve_mb
        )
        for line in self.placement.describe():
            logger.info("placement: %s", line)
        try:
            for pipeline in self._pending:
                known = set(self.models)
                served = _serve(
                    pipeline, self._pool, self.workers, self.models, self.placement, model_ids,
                    self.metrics,
                )  # fmt: skip
                # Register before loading, so that aclose() unloads a half-started pipeline.
                self._served[pipeline.name][pipeline.version] = served
                for name, runner in served.runners.items():
                    if not isinstance(runner, BatchedNode):  # shared models start below, once
                        await _start_runner(pipeline, name, runner)
                for key, shared in self.models.items():
                    if key not in known:
                        await _start_model(pipeline, shared)
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
        for shared in self.models.values():
            await shared.aclose()
        await self.workers.aclose()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the service -------------------------------------------------------------------

    def find(self, name: str, version: str | None = None) -> ServedPipeline:
        versions = self._served.get(name)
        if not versions:
            raise PipelineNotFound(name, None, list(self._served))
        if version is None:
            return versions[max(versions, key=_version_key)]
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
            inflight = self.metrics.inflight.labels(pipeline)
            inflight.inc()
            self.inflight += 1
            try:
                execution = await self.execute(served, request)
            finally:
                inflight.dec()
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
                self.metrics.requests.labels(pipeline, version, status_of(error)).inc()
            if pipeline:
                self.metrics.request_seconds.labels(pipeline, version).observe(seconds)
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
        fields: dict[str, Any] = {"pipeline": request.pipeline, "ms": round(seconds * 1000, 3)}
        if isinstance(error, InferenceError):
            fields.update(node=error.node, plugin=error.plugin, cause=error.cause)
            logger.warning("request failed: %s", error.message, extra=fields)
        elif isinstance(error, DagserveError):
            logger.info("request refused: %s: %s", type(error).__name__, error, extra=fields)
        elif error is not None and not isinstance(error, asyncio.CancelledError):
            logger.error("request failed", exc_info=error, extra=fields)
        elif (
            execution is not None
            and self.slow_request_ms is not None
            and seconds * 1000 >= self.slow_request_ms
        ):
            nodes = execution.node_latency_us
            breakdown = ", ".join(f"{n} {us / 1000:.2f} ms" for n, us in nodes.items())
            fields["node_ms"] = {n: round(us / 1000, 3) for n, us in nodes.items()}
            logger.warning("slow request: %.1f ms (%s)", seconds * 1000, breakdown, extra=fields)
        else:
            logger.debug("request served", extra=fields)

    async def execute(self, served: ServedPipeline, request: InferenceRequest) -> Execution:
        """Check ``request`` against the pipeline's signature and run it."""
        _check_request(served, request)
        deadline = None
        if request.timeout_ms is not None:
            if request.timeout_ms <= 0:
                msg = f"timeout_ms must be > 0 (got {request.timeout_ms})"
                raise InvalidRequest(msg, field="timeout_ms")
            deadline = asyncio.get_running_loop().time() + request.timeout_ms / 1000.0
        return await execute(
            served.pipeline.spec,
            request.inputs,
            served.runners,
            deadline=deadline,
            wanted=request.outputs,
            execution_plan=served.plan,
            observer=served.observe_node,
        )

    def list_pipelines(self) -> list[PipelineDescription]:
        return [
            served.description
            for _, versions in sorted(self._served.items())
            for _, served in sorted(versions.items(), key=lambda kv: _version_key(kv[0]))
        ]

    def describe(self, name: str) -> PipelineDescription:
        return self.find(name).description

    def health(self) -> HealthReport:
        details = {
            f"pipeline.{name}:{version}": "ready" if self.ready else "loading"
            for name, versions in self._served.items()
            for version in versions
        }
        details["pipelines"] = str(sum(len(v) for v in self._served.values()))
        if self.placement is not None:
            details.update(self.placement.details())
        for shared in self.models.values():
            batching = shared.batcher.statistics()
            details[f"model.{shared.model_id}"] = (
                f"nodes={','.join(shared.nodes)} queued={batching.queued_items} "
                f"batches={batching.batches} mean_batch={batching.mean_batch_size:.2f} "
                f"deadline_dropped={batching.deadline_dropped} rejected={batching.rejected}"
            )
        for worker, stats in self.workers.statistics().items():
            details[f"worker.{worker}"] = (
                f"pid={stats['pid']} ready={stats['ready']} restarts={stats['restarts']} "
                f"models={','.join(stats['models'])}"  # type: ignore[arg-type]
            )
        return HealthReport(live=True, ready=self.ready, details=details)


async def _start_runner(pipeline: Pipeline, name: str, runner: LocalRunner) -> None:
    node = pipeline.spec.nodes[name]
    try:
        await runner.start()
    except Exception as exc:
        raise _load_failed(pipeline.name, name, node.plugin, "", exc) from exc


async def _start_model(pipeline: Pipeline, shared: SharedModel) -> None:
    b = shared.runner.binding
    try:
        await shared.start()
    except Exception as exc:
        where = f" in worker {shared.runner.key.name}"
        raise _load_failed(b.pipeline, b.node, b.plugin, where, exc) from exc


def _load_failed(pipeline: str, node: str, plugin: str, where: str, exc: Exception) -> Exception:
    cause = exc.message if isinstance(exc, DagserveError) else f"{type(exc).__name__}: {exc}"
    msg = f"pipeline {pipeline!r}: node {node!r} (plugin {plugin!r}) failed to load{where}: {cause}"
    return PluginLoadError(msg)


def _where(runner: Runner) -> str:
    if isinstance(runner, BatchedNode):
        shared = runner.shared
        return f"worker {runner.key.name}, model {shared.model_id}"
    return runner.kind


def runner_kind(node: NodeSpec, plugin_class: type[ModelPlugin]) -> str:
    """Where a node runs: ``inline``, ``thread`` or ``worker`` (see ``NodeSpec.runner``)."""
    if node.runner != "auto":
        return node.runner
    if node.plugin in BUILTINS and framework_of(node, plugin_class) is None:
        return "inline" if getattr(plugin_class, "inline", False) else "thread"
    return "worker"


def framework_of(node: NodeSpec, plugin_class: type[ModelPlugin]) -> str | None:
    """The node's framework: its ``framework:`` key, else what the plugin declares."""
    if node.framework is not None:
        return None if node.framework == "numpy" else node.framework
    return plugin_class.framework


def _in_process_class(
    pipeline: Pipeline, name: str, node: NodeSpec, plugin_class: type[ModelPlugin]
) -> type[ModelPlugin]:
    """The real plugin class, for a node that asked to run in the front process."""
    framework = framework_of(node, plugin_class)
    if framework is not None:
        msg = (
            f"pipeline {pipeline.name!r}: node {name!r} asks for runner {node.runner!r}, but its "
            f"plugin runs on {framework}, and the front process never imports a framework: "
            "use runner: worker (or leave runner: auto)"
        )
        raise PluginLoadError(msg)
    if getattr(plugin_class, "inspected", False):
        # The user chose to run this plugin in the front process: import it here.
        return resolve(node.plugin)
    return plugin_class


def model_identity(
    node: NodeSpec, model_path: Path | None, device: str, framework: str | None
) -> tuple[Any, ...]:
    """Nodes whose model is the same thing: loaded once, batched once."""
    batching = node.batching.model_dump_json() if node.batching else None
    params = json.dumps(node.params, sort_keys=True, default=str)
    return (node.plugin, str(model_path), params, device, framework, node.instances, batching)


def _batcher(
    node: NodeSpec, plugin_class: type[ModelPlugin], runner: WorkerRunner, name: str
) -> Batcher:
    async def call(batch: Batch) -> Batch:
        return await runner.run(batch, deadline=None)

    padding = Padding(dict(plugin_class.padding), dict(plugin_class.padded_outputs))
    if node.batching is None:  # no merging of requests; still bounded and deadline-aware
        return Batcher(
            call, max_batch_size=None, max_queue=DEFAULT_MAX_QUEUE, instances=node.instances,
            name=name,
        )  # fmt: skip
    return Batcher(
        call,
        max_batch_size=node.batching.max_batch_size,
        max_delay_s=node.batching.max_delay_s,
        max_queue=node.batching.max_queue,
        max_queue_delay_s=(
            node.batching.max_queue_delay_ms / 1000 if node.batching.max_queue_delay_ms else None
        ),
        instances=node.instances,
        padding=padding,
        ragged=plugin_class.ragged,
        name=name,
    )


@dataclass(frozen=True)
class _ModelNode:
    """A worker node as placement and sharing see it."""

    pipeline: Pipeline
    name: str
    node: NodeSpec
    plugin_class: type[ModelPlugin]
    model_path: Path | None
    framework: str | None

    @property
    def identity(self) -> tuple[Any, ...]:
        return model_identity(self.node, self.model_path, self.node.device, self.framework)


def _model_nodes(pipeline: Pipeline) -> list[_ModelNode]:
    base = _base(pipeline)
    found = []
    for name, node in pipeline.spec.nodes.items():
        plugin_class = pipeline.plugin_classes[name]
        if runner_kind(node, plugin_class) == "worker":
            model_path = (base / node.model).resolve() if node.model is not None else None
            framework = framework_of(node, plugin_class)
            found.append(_ModelNode(pipeline, name, node, plugin_class, model_path, framework))
    return found


def _base(pipeline: Pipeline) -> Path:
    return pipeline.path.parent.resolve() if pipeline.path else Path.cwd()


def plan_placement(
    pipelines: Iterable[Pipeline], inventory: DeviceInventory, *, reserve_mb: int = 0
) -> tuple[Placement, dict[tuple[Any, ...], str]]:
    """Place every model of ``pipelines``; return the placement and each model's id.

    Nodes that name the same model (plugin, model file, params, device request, batching) are
    one model: placed once, loaded once, batched once.  Its id is ``pipeline/node`` of its
    first user.

    Raises:
        PlacementError: a model does not fit; the message says what each device has left.
    """
    ids: dict[tuple[Any, ...], str] = {}
    requests = []
    for pipeline in pipelines:
        for m in _model_nodes(pipeline):
            model_id = ids.setdefault(m.identity, f"{pipeline.name}/{m.name}")
            requests.append(
                PlacementRequest(
                    model_id=model_id,
                    pipeline=pipeline.name,
                    node=m.name,
                    device=m.node.device,
                    gpu_memory_mb=m.node.gpu_memory_mb,
                    gpu_share=m.node.gpu_share,
                    framework=m.framework,
                )
            )
    return place(requests, inventory, reserve_mb=reserve_mb), ids


def _serve(
    pipeline: Pipeline,
    pool: ThreadPoolExecutor,
    workers: WorkerPool,
    models: dict[tuple[Any, ...], SharedModel],
    placement: Placement,
    model_ids: dict[tuple[Any, ...], str],
    metrics: Metrics,
) -> ServedPipeline:
    runners: dict[str, Runner] = {}
    base = _base(pipeline)
    model_nodes = {m.name: m for m in _model_nodes(pipeline)}
    for name, node in pipeline.spec.nodes.items():
        plugin_class = pipeline.plugin_classes[name]
        model_node = model_nodes.get(name)
        if model_node is None:
            plugin_class = _in_process_class(pipeline, name, node, plugin_class)
            device = "cpu"
            model_path = (base / node.model).resolve() if node.model is not None else None
        else:
            device = placement.device_of(model_ids[model_node.identity])
            model_path = model_node.model_path
        contexts = tuple(
            LoadContext(
                node=name,
                plugin=node.plugin,
                model_path=model_path,
                device=device,
                params=node.params,
                pipeline_dir=base,
                instance=i,
            )
            for i in range(node.instances)
        )
        binding = NodeBinding(
            pipeline=pipeline.name,
            node=name,
            plugin=node.plugin,
            plugin_class=plugin_class,
            outputs=pipeline.node_signatures[name][1],
            contexts=contexts,
        )
        if model_node is not None:
            identity = model_node.identity
            shared = models.get(identity)
            if shared is None:
                model_id = model_ids[identity]
                key = worker_key(model_node.framework, device)
                timeout_s = node.timeout_ms / 1000 if node.timeout_ms else None
                worker = WorkerRunner(binding, workers, key, timeout_s)
                batcher = _batcher(node, plugin_class, worker, f"model {model_id!r}")
                batcher.on_batch = metrics.batch_observer(model_id)
                shared = models[identity] = SharedModel(model_id, worker, batcher, [])
            shared.nodes.append(f"{pipeline.name}/{name}")
            runners[name] = BatchedNode(shared, pipeline.name, name, node.plugin)
        elif runner_kind(node, plugin_class) == "inline":
            runners[name] = InlineRunner(binding)
        else:
            runners[name] = ThreadPoolRunner(binding, pool)
    required = frozenset(n for n, s in pipeline.input_specs.items() if not s.optional)
    return ServedPipeline(
        pipeline, runners, plan(pipeline.spec), describe(pipeline), required, metrics
    )


def _check_request(served: ServedPipeline, request: InferenceRequest) -> None:
    specs = served.pipeline.input_specs
    for name in request.inputs:
        if name not in specs:
            msg = (
                f"pipeline {served.pipeline.name!r} has no input {name!r} "
                f"(inputs: {', '.join(specs)})"
            )
            raise InvalidRequest(msg, field=f"inputs.{name}")
    for name in served.required_inputs - request.inputs.keys():
        msg = f"required input {name!r} is missing ({specs[name].describe()} per item)"
        raise InvalidRequest(msg, field=f"inputs.{name}")
    if not request.inputs:
        msg = "the request carries no inputs"
        raise InvalidRequest(msg, field="inputs")
    # dtypes, item shapes, and the same number of items in every input
    check_inputs({n: specs[n] for n in request.inputs}, request.inputs, where="inputs")
    for name, array in request.inputs.items():
        declared = served.pipeline.spec.inputs[name]
        if not declared.allow_nan and array.dtype.kind == "f":
            bad = np.isnan(array.reshape(len(array), -1)).any(axis=1) if array.size else []
            items = [int(i) for i in np.flatnonzero(bad)]
            if items:
                msg = (
                    f"input {name!r} holds NaN in item(s) {items[:10]}, which the pipeline "
                    "does not allow (allow_nan: false)"
                )
                raise InvalidRequest(msg, field=f"inputs.{name}")
    if request.outputs is not None:
        unknown = [o for o in request.outputs if o not in served.pipeline.spec.outputs]
        if unknown:
            known = ", ".join(served.pipeline.spec.outputs)
            msg = f"unknown outputs requested: {', '.join(unknown)} (outputs: {known})"
            raise InvalidRequest(msg, field="outputs")


def describe(pipeline: Pipeline) -> PipelineDescription:
    """The wire-neutral description of a pipeline (its signature and its graph)."""
    edges: list[EdgeDescription] = []
    for name, node in pipeline.spec.nodes.items():
        for text in node.inputs.values():
            ref = parse_ref(text)
            tensor = ref.name if ref.is_input else str(ref)
            edges.append(EdgeDescription(ref.source, name, tensor))
    for text in pipeline.spec.outputs.values():
        ref = parse_ref(text)
        edges.append(
            EdgeDescription(ref.source, "$outputs", ref.name if ref.is_input else str(ref))
        )
    return PipelineDescription(
        name=pipeline.name,
        version=pipeline.version,
        inputs=dict(pipeline.input_specs),
        outputs=dict(pipeline.output_specs),
        nodes=list(pipeline.spec.nodes),
        edges=edges,
    )


__all__ = ["Engine", "ServedPipeline", "describe"]
