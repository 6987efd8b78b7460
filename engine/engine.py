"""The transport-neutral engine: served pipelines, their runners, and ``infer``.

The Thrift adapter (``engine.service``) calls :class:`Engine`; so do tests, without a socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dag.executor import Execution, _Plan, execute, plan
from dag.pipeline import Pipeline
from dag.schema import parse_ref
from engine.runners.local import InlineRunner, LocalRunner, NodeBinding, ThreadPoolRunner
from engine.types import (
    EdgeDescription,
    HealthReport,
    InferenceRequest,
    InferenceResult,
    PipelineDescription,
)
from model_plugins.contract import check_inputs
from model_plugins.errors import InvalidRequest, PipelineNotFound, PluginLoadError
from model_plugins.plugin import LoadContext

logger = logging.getLogger(__name__)


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    # "10" sorts after "9"; "1.10" after "1.9"; text parts compare as text.
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_]", version))


@dataclass
class ServedPipeline:
    """A pipeline with its runners, ready to execute requests."""

    pipeline: Pipeline
    runners: dict[str, LocalRunner]
    plan: _Plan
    description: PipelineDescription
    required_inputs: frozenset[str] = field(default_factory=frozenset)


class Engine:
    """Serves a set of pipelines.

    Lifecycle: ``await start()`` loads every node's plugin (a failure stops startup with
    the node, the plugin and the plugin's own message); ``await aclose()`` unloads them.
    """

    def __init__(self, pipelines: Iterable[Pipeline], *, thread_pool_size: int = 8) -> None:
        self._served: dict[str, dict[str, ServedPipeline]] = {}
        self._pending = list(pipelines)
        for p in self._pending:
            if p.version in self._served.get(p.name, {}):
                msg = f"pipeline {p.name!r} version {p.version!r} is defined twice"
                raise ValueError(msg)
            self._served.setdefault(p.name, {})
        self._pool = ThreadPoolExecutor(thread_pool_size, thread_name_prefix="dagserve-node")
        self.ready = False

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for pipeline in self._pending:
            served = _serve(pipeline, self._pool)
            for name, runner in served.runners.items():
                try:
                    await runner.start(self._pool)
                except Exception as exc:
                    await self._close_runners()
                    await _close_served(served)
                    node = pipeline.spec.nodes[name]
                    msg = (
                        f"pipeline {pipeline.name!r}: node {name!r} (plugin {node.plugin!r}) "
                        f"failed to load: {type(exc).__name__}: {exc}"
                    )
                    raise PluginLoadError(msg) from exc
            self._served[pipeline.name][pipeline.version] = served
            logger.info(
                "serving pipeline %s version %s: %s",
                pipeline.name,
                pipeline.version,
                ", ".join(f"{n}[{r.kind}]" for n, r in served.runners.items()),
            )
        self._pending.clear()
        self.ready = True

    async def aclose(self) -> None:
        self.ready = False
        await self._close_runners()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _close_runners(self) -> None:
        for versions in self._served.values():
            for served in versions.values():
                await _close_served(served)

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
        served = self.find(request.pipeline, request.version)
        execution = await self.execute(served, request)
        return InferenceResult(
            request_id=request.request_id,
            outputs=execution.outputs,
            version=served.pipeline.version,
            node_latency_us=execution.node_latency_us,
        )

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
            f"pipeline.{name}:{version}": "ready"
            for name, versions in self._served.items()
            for version in versions
        }
        details["pipelines"] = str(sum(len(v) for v in self._served.values()))
        return HealthReport(live=True, ready=self.ready, details=details)


async def _close_served(served: ServedPipeline) -> None:
    for runner in served.runners.values():
        await runner.aclose()


def _serve(pipeline: Pipeline, pool: ThreadPoolExecutor) -> ServedPipeline:
    runners: dict[str, LocalRunner] = {}
    base = pipeline.path.parent if pipeline.path else None
    for name, node in pipeline.spec.nodes.items():
        plugin_class = pipeline.plugin_classes[name]
        model_path = None
        if node.model is not None:
            model_path = (base / node.model) if base else None
            model_path = model_path.resolve() if model_path else None
        device = "cpu" if node.device == "auto" else node.device
        contexts = tuple(
            LoadContext(
                node=name,
                plugin=node.plugin,
                model_path=model_path,
                device=device,
                params=node.params,
                pipeline_dir=base or Path.cwd(),
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
        inline = node.runner == "inline" or (
            node.runner == "auto" and bool(getattr(plugin_class, "inline", False))
        )
        runners[name] = InlineRunner(binding) if inline else ThreadPoolRunner(binding, pool)
    required = frozenset(n for n, s in pipeline.input_specs.items() if not s.optional)
    return ServedPipeline(pipeline, runners, plan(pipeline.spec), describe(pipeline), required)


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
    check_inputs({n: specs[n] for n in request.inputs}, request.inputs, where="inputs")
    counts = {name: len(array) for name, array in request.inputs.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{n}: {c}" for n, c in counts.items())
        msg = f"every input must carry the same number of items (first dimension); got {listed}"
        raise InvalidRequest(msg, field="inputs")
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
