"""How a validated pipeline becomes something that serves: its runners, its shared models,
their batchers and their devices."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dag.executor import NodeTiming
from dag.pipeline import Pipeline
from dag.schema import NodeSpec, variant_label
from engine.observability.metrics import Metrics, error_type
from engine.runtime.devices import DeviceInventory
from engine.runtime.inspector import InspectedPlugin
from engine.runtime.local import InlineRunner, LocalRunner, NodeBinding, ThreadPoolRunner
from engine.runtime.model import Model, ModelRunner
from engine.runtime.placement import Placement, PlacementRequest, place
from engine.runtime.ray_placement import RayInventory, place_on_ray
from engine.runtime.registry import resolver
from engine.runtime.remote import RemoteRunner
from engine.runtime.variants import VariantRunner, node_arms, with_variants
from engine.runtime.workers.pool import WorkerKey, WorkerPool, worker_key
from model_plugins.errors import PluginLoadError
from model_plugins.plugin import LoadContext, ModelPlugin
from model_plugins.registry import BUILTINS, resolve

logger = logging.getLogger(__name__)


#: the engine's runners of a node (each implements ``dag.runner.Runner``)
NodeRunner = LocalRunner | ModelRunner | VariantRunner

#: makes the model of a worker node: ``(model_id, binding, node, key) -> Model``
NewModel = Callable[[str, NodeBinding, NodeSpec, WorkerKey], Model]


class ModelSource(Protocol):
    """Where an engine's models come from, when not from its own workers.

    A front process other than the first (``engine.fronts``) places nothing and batches
    nothing: it takes the placement and model ids of the first front, and its models forward
    their items to that front's batchers (``engine.runtime.relay``).
    """

    def plan(self, pipelines: Iterable[Pipeline]) -> tuple[Placement, dict[tuple[Any, ...], str]]:
        """The placement and the model ids, as :func:`plan_placement` returns them."""
        ...

    def new_model(
        self, model_id: str, binding: NodeBinding, node: NodeSpec, key: WorkerKey
    ) -> Model:
        """The model of ``model_id``, made for the first node that names it."""
        ...


@dataclass
class ServedPipeline:
    """A pipeline with its runners, ready to execute requests."""

    pipeline: Pipeline
    runners: dict[str, NodeRunner]
    metrics: Metrics | None = None
    #: requests executing on it now (``Engine.infer``): a version retired waits for them
    inflight: int = 0
    #: set while its models are swapped in place (``Lifecycle.reload(in_place=True)``):
    #: requests wait for it, then find the version again
    paused: asyncio.Event | None = None

    def observe_node(self, node: str, timing: NodeTiming, error: BaseException | None) -> None:
        if self.metrics is None:
            return
        name = self.pipeline.name
        if timing.variant is not None:  # a variant ran it: its label is node@variant
            node = variant_label(node, timing.variant)
        self.metrics.node_seconds.observe(timing.end - timing.start, name, node)
        if error is not None:
            self.metrics.node_errors.inc(name, node, error_type(error))


def runner_kind(node: NodeSpec, plugin_class: type[ModelPlugin]) -> str:
    """Where a node runs: ``inline``, ``thread`` or ``worker`` (see ``NodeSpec.runner``)."""
    if node.runner != "auto":
        return node.runner
    if node.plugin in BUILTINS and framework_of(node, plugin_class) is None:
        return "inline" if plugin_class._inline else "thread"
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
    if issubclass(plugin_class, InspectedPlugin):
        # The user chose to run this plugin in the front process: import it here.
        return resolve(node.plugin)
    return plugin_class


def model_identity(
    node: NodeSpec, model_path: Path | None, device: str, framework: str | None
) -> tuple[Any, ...]:
    """Nodes whose model is the same thing: loaded once, batched once.

    Everything the :class:`Model` takes from its first user is in it: a node with another
    ``timeout_ms`` (the worker-kill timeout of its calls) gets a model of its own.  So is the
    model file as it is on disk (:func:`file_stamp`): a file rewritten under the same path is
    another model, which a reload loads beside the one serving.
    """
    batching = node.batching.model_dump_json() if node.batching else None
    params = json.dumps(node.params, sort_keys=True, default=str)
    return (
        node.plugin, str(model_path), params, device, framework, node.instances, batching,
        node.timeout_ms, file_stamp(model_path), ray_resources(node),
    )  # fmt: skip


def ray_resources(node: NodeSpec) -> tuple[tuple[str, float], ...]:
    """The node's ``ray_resources``, sorted (hashable)."""
    return tuple(sorted(node.ray_resources.items()))


#: files up to this size are told apart by their content, larger ones by size and mtime
_HASHED_BYTES = 1 << 20
#: a model folder is stamped by at most this many of its files
_STAMPED_FILES = 10_000


def file_stamp(path: Path | None) -> tuple[Any, ...] | None:
    """What tells a model file (or folder) apart from itself rewritten: size and mtime of
    each file, and the content hash of small ones (a rewrite within the mtime's resolution).
    None: no such path (the plugin may not read one)."""
    if path is None:
        return None
    try:
        if not path.is_dir():
            return _stamp_one(path)
        walked = (os.path.join(root, n) for root, _, names in os.walk(path) for n in names)
        files = sorted(itertools.islice(walked, _STAMPED_FILES))
        return tuple((os.path.relpath(f, path), _stamp_one(Path(f))) for f in files)
    except OSError:
        return None


def _stamp_one(path: Path) -> tuple[Any, ...]:
    stat = path.stat()
    digest = None
    if stat.st_size <= _HASHED_BYTES:
        digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
    return (stat.st_size, stat.st_mtime_ns, digest)


@dataclass(frozen=True)
class _ModelNode:
    """A worker node as placement and sharing see it."""

    pipeline: Pipeline
    name: str
    node: NodeSpec
    plugin_class: type[ModelPlugin]
    model_path: Path | None
    framework: str | None

    @functools.cached_property
    def identity(self) -> tuple[Any, ...]:
        return model_identity(self.node, self.model_path, self.node.device, self.framework)


def _model_nodes(pipeline: Pipeline) -> list[_ModelNode]:
    found = []
    # each variant of a node is a model of its own (or shares one), named node@variant
    for name, _, _, node, plugin_class in node_arms(pipeline):
        if runner_kind(node, plugin_class) == "worker":
            model_path = _model_path(pipeline, node)
            framework = framework_of(node, plugin_class)
            found.append(_ModelNode(pipeline, name, node, plugin_class, model_path, framework))
    return found


def _model_path(pipeline: Pipeline, node: NodeSpec) -> Path | None:
    """The local path of the node's ``model:``: a file beside the YAML, or the local copy of
    a registry model or URI (``engine.runtime.registry``: resolved once per pipeline read)."""
    return resolver().model_path(pipeline, node.model) if node.model is not None else None


def _base(pipeline: Pipeline) -> Path:
    return pipeline.path.parent.resolve() if pipeline.path else Path.cwd()


def plan_placement(
    pipelines: Iterable[Pipeline],
    inventory: DeviceInventory,
    *,
    reserve_mb: int = 0,
    current: Placement | None = None,
    loaded: Mapping[tuple[Any, ...], str] | None = None,
) -> tuple[Placement, dict[tuple[Any, ...], str]]:
    """Place every model of ``pipelines``; return the placement and each model's id.

    Nodes that name the same model (plugin, model file, params, device request, instances,
    batching, timeout_ms: :func:`model_identity`) are one model: placed once, loaded once,
    batched once.  Its id is ``pipeline/node`` of its first user, or, when another model has
    that id, ``pipeline:version/node`` (then with ``#2``, ``#3``...).

    ``current`` and ``loaded`` (identity -> id of each model loaded) place pipelines beside
    those serving (``engine.runtime.lifecycle``): a loaded model keeps its device and its
    budget, and a new one gets an id that no loaded one has.  Only the models of ``current``
    that are in ``loaded`` stay placed: with no pipelines, that frees the others' budgets.

    With a :class:`RayInventory` (``ray:`` in the server config) the models are grouped into
    Ray actors instead (:func:`place_on_ray`); Ray places the actors.

    Raises:
        PlacementError: a model does not fit; the message says what each device has left.
    """
    ids: dict[tuple[Any, ...], str] = dict(loaded or {})
    taken = set(ids.values())
    requests = []
    ray = isinstance(inventory, RayInventory)
    kept = set(taken)  # on Ray, the loaded models keep their actors
    for a in current.assignments if current is not None and not ray else ():
        if a.model_id not in taken:
            continue
        on_gpu = a.device != "cpu"
        for pipeline_name, node_name in a.nodes:
            requests.append(
                PlacementRequest(
                    model_id=a.model_id, pipeline=pipeline_name, node=node_name,
                    device=a.device, gpu_memory_mb=a.memory_mb if on_gpu else None,
                    gpu_share=(a.share or None) if on_gpu else None,
                )
            )  # fmt: skip
    for pipeline in pipelines:
        for m in _model_nodes(pipeline):
            model_id = ids.get(m.identity)
            if model_id is None:
                model_id = ids[m.identity] = _free_id(pipeline, m.name, taken)
            requests.append(
                PlacementRequest(
                    model_id=model_id,
                    pipeline=pipeline.name,
                    node=m.name,
                    device=m.node.device,
                    gpu_memory_mb=m.node.gpu_memory_mb,
                    gpu_share=m.node.gpu_share,
                    framework=m.framework,
                    ray_resources=ray_resources(m.node),
                )
            )
    if isinstance(inventory, RayInventory):
        ray_placement = place_on_ray(
            requests, num_cpus=inventory.num_cpus, current=current, keep=kept
        )
        return ray_placement, ids
    return place(requests, inventory, reserve_mb=reserve_mb), ids


def _free_id(pipeline: Pipeline, node: str, taken: set[str]) -> str:
    versioned = f"{pipeline.name}:{pipeline.version}/{node}"
    for model_id in (f"{pipeline.name}/{node}", versioned):
        if model_id not in taken:
            taken.add(model_id)
            return model_id
    n = 2
    while f"{versioned}#{n}" in taken:
        n += 1
    taken.add(f"{versioned}#{n}")
    return f"{versioned}#{n}"


def serve_pipeline(
    pipeline: Pipeline,
    pool: ThreadPoolExecutor,
    workers: WorkerPool,
    models: dict[tuple[Any, ...], Model],
    placement: Placement,
    model_ids: dict[tuple[Any, ...], str],
    metrics: Metrics,
    *,
    new_model: NewModel | None = None,
) -> ServedPipeline:
    """The runners of ``pipeline``'s nodes; its worker nodes share ``models`` by identity.

    ``new_model`` makes a model the first time one is named (``ModelSource.new_model``); by
    default a :class:`Model` batched in this process and run in ``workers``.
    """
    runners: dict[str, NodeRunner] = {}
    base = _base(pipeline)
    model_nodes = {m.name: m for m in _model_nodes(pipeline)}
    for name, of_node, _, node, plugin_class in node_arms(pipeline):
        model_node = model_nodes.get(name)
        if model_node is None:
            plugin_class = _in_process_class(pipeline, name, node, plugin_class)
            device = "cpu"
            model_path = _model_path(pipeline, node)
        else:
            if model_node.identity not in model_ids:  # its file was rewritten since placed
                msg = f"pipeline {pipeline.name!r}: node {name!r}: model file changed while loading"
                raise PluginLoadError(msg)
            device = placement.device_of(model_ids[model_node.identity])
            model_path = model_node.model_path
        # A worker sees only its own card, as cuda:0: tell the plugin that one.  On Ray, the
        # key names the model's actor too.
        actor = placement.actor_of(model_ids[model_node.identity]) if model_node else None
        key = worker_key(model_node.framework if model_node else None, device, actor)
        contexts = tuple(
            LoadContext(
                node=name,
                plugin=node.plugin,
                model_path=model_path,
                device=key.visible_device,
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
            outputs=pipeline.node_signatures[of_node][1],
            contexts=contexts,
        )
        if model_node is not None:
            identity = model_node.identity
            model = models.get(identity)
            if model is None:
                model_id = model_ids[identity]
                if new_model is not None:
                    model = models[identity] = new_model(model_id, binding, node, key)
                else:
                    model = models[identity] = Model(
                        model_id, binding, node, workers, key,
                        on_batch=metrics.batch_observer(model_id),
                    )  # fmt: skip
            runners[name] = model.runner(pipeline.name, name)
        elif node.plugin == "remote":
            runners[name] = RemoteRunner(binding, node.params)
        elif runner_kind(node, plugin_class) == "inline":
            runners[name] = InlineRunner(binding)
        else:
            runners[name] = ThreadPoolRunner(binding, pool)
    # a node with variants answers through a VariantRunner over its arms' runners
    return ServedPipeline(pipeline, with_variants(pipeline, runners, metrics), metrics)


__all__ = [
    "ModelSource",
    "NewModel",
    "NodeRunner",
    "ServedPipeline",
    "plan_placement",
    "serve_pipeline",
]
