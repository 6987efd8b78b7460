"""Model lifecycle: pipeline versions loaded, routed, mirrored, reloaded and retired while the
server answers, without failing a request.

A version is *loading* while its models load and warm up, *ready* once it takes requests,
*draining* while the requests it had in flight finish after it was retired or replaced, and
*failed* (with why) when a load refused it; a failed load changes nothing that serves.

Routing (:class:`Route`, read by ``Engine.find`` on every request): a request that names a
version gets that version; one that names none is split by the name's weights, at random, or,
with a sticky header, by a hash of that header's value, so that one user stays on one version
while the weights stay.  The first version of a name takes all its traffic; a later one takes
none until :meth:`Lifecycle.set_traffic` gives it some: promotion is explicit, as in KServe's
canary rollout.  When several versions of a name are served from startup, the latest (by
version number) takes all.

A *shadow* version gets a copy of each request that another version answered, after the
answer, in a task of its own that nothing waits for; its outputs are compared with the
served ones (``dagserve_shadow_*`` metrics).  At most ``max_shadow_inflight`` copies run at
once; past that, copies are dropped and counted.

``reload`` is blue/green: the version's YAML and model files are read again, the models that
changed (their identity includes the model file's size, mtime and, for small files, content)
load and warm up beside the old ones, traffic moves at once, and the old models unload once
their requests have drained.  A GPU that cannot hold both refuses the reload, saying what is
missing, unless ``in_place`` accepts a pause: the version's requests then wait while its old
models unload and the new ones load.

``unload`` stops routing to a version (refused while it takes all the traffic of a name that
has other versions: move the traffic first), waits for its requests in flight (at most
``drain_timeout_s``), then unloads the models no other version uses.

Every change is written to ``state_file`` (weights, shadow, sticky header, and the YAML of
each version loaded at runtime), and restored at startup: a restart does not undo a rollout.
Restore is forgiving: a version that no longer loads is logged and skipped.

Every method runs on the engine's event loop; changes are serialised by one lock.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dag.pipeline import Pipeline
from engine.errors import LifecycleError, RegistryError
from engine.runtime.assembly import NodeRunner, ServedPipeline, plan_placement, serve_pipeline
from engine.runtime.loading import load_for_serving
from engine.runtime.local import LocalRunner
from engine.runtime.model import Model, ModelRunner
from engine.runtime.placement import Placement, PlacementError
from engine.runtime.registry import resolver
from engine.runtime.shadow import compare_outputs
from engine.runtime.types import InferenceRequest
from engine.runtime.variants import VariantRunner, sticky_point
from engine.runtime.variants import set_variant_weights as set_node_variant_weights
from engine.runtime.warmup import declares_warmup, warm_up
from model_plugins.errors import DagserveError, PipelineNotFound, PluginLoadError, node_label
from model_plugins.specs import NUMPY_DTYPES, OBJECT_DTYPES

if TYPE_CHECKING:
    from engine.runtime.engine import Engine

logger = logging.getLogger(__name__)

#: the state file's layout; a file of another format is ignored (logged)
STATE_FORMAT = 1

#: a mirrored copy has this long to finish on the shadow (past it, it counts as a mismatch)
SHADOW_TIMEOUT_S = 30.0


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of versions: "10" after "9", "1.10" after "1.9"; text parts compare as text."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-_]", version))


@dataclass(frozen=True)
class PeerState:
    """What another front process of the server needs to serve as this one does
    (``engine.fronts``): the versions and the models they use, the routes, the variant weights.
    """

    versions: dict[tuple[str, str], VersionState]
    """(name, version) -> its state (``path``, ``models`` and ``variants`` are what count)."""
    routes: dict[str, tuple[dict[str, float], str | None, str | None]]
    """Name -> (weights, shadow version, sticky header)."""


@dataclass(frozen=True)
class VersionState:
    """One version of a pipeline, as the admin API lists it."""

    pipeline: str
    version: str
    state: str
    """``loading``, ``ready``, ``draining`` or ``failed``."""
    why: str = ""
    """For ``failed``: the error message."""
    weight: float = 0.0
    """Share of the requests that name no version (a name's weights sum to 1, or are all 0)."""
    shadow: bool = False
    """This version receives mirrored copies."""
    sticky_header: str | None = None
    inflight: int = 0
    path: str | None = None
    """The YAML it came from."""
    models: tuple[str, ...] = ()
    """Ids of the models it uses."""
    variants: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    """Node -> its variants that may answer -> weight (percent); the node answers the rest."""
    variant_shadows: Mapping[str, str] = field(default_factory=dict)
    """Node -> its shadow variant."""


class Route:
    """How the requests for one pipeline name reach its versions; rebuilt on every change.

    ``versions`` is the engine's own dict of the ready versions of the name (a request that
    names a version looks it up there); ``choices`` are those with weight, with ``bounds``
    their cumulative weights (the last is infinite, so that rounding never runs off the end).
    """

    __slots__ = ("bounds", "choices", "name", "only", "sticky", "versions")

    def __init__(
        self,
        name: str,
        versions: dict[str, ServedPipeline],
        weights: Mapping[str, float],
        sticky: str | None,
    ) -> None:
        self.name = name
        self.versions = versions
        ordered = sorted((v for v, w in weights.items() if w > 0), key=version_key)
        self.choices = tuple(versions[v] for v in ordered)
        total = sum(weights[v] for v in ordered)
        running = 0.0
        bounds = []
        for v in ordered:
            running += weights[v] / total
            bounds.append(running)
        if bounds:
            bounds[-1] = math.inf
        self.bounds = tuple(bounds)
        self.only = self.choices[0] if len(self.choices) == 1 else None
        self.sticky = sticky

    def pick(self, headers: Mapping[str, str] | None) -> ServedPipeline:
        """The version for a request that names none."""
        only = self.only
        if only is not None:
            return only
        if not self.choices:  # weights all 0: only requests that name a version are served
            raise PipelineNotFound(self.name, None, [f"{self.name}:{v}" for v in self.versions])
        value = headers.get(self.sticky) if headers and self.sticky is not None else None
        point = random.random() if value is None else sticky_point(value)
        return self.choices[bisect.bisect_right(self.bounds, point)]


class Lifecycle:
    """The versions of an engine's pipelines, and the changes made to them while it serves.

    Args:
        engine: the engine whose ``find`` reads :attr:`routes`.
        state_file: where weights, shadow, sticky header and runtime loads are kept.
        drain_timeout_s: how long a retired version's requests may take to finish before its
            models unload anyway (those requests then fail).
        max_shadow_inflight: copies mirrored at once, over all shadows; more are dropped.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        state_file: Path | None = None,
        drain_timeout_s: float = 10.0,
        max_shadow_inflight: int = 64,
    ) -> None:
        self.engine = engine
        self.state_file = state_file
        self.drain_timeout_s = drain_timeout_s
        self.max_shadow_inflight = max_shadow_inflight
        #: name -> its route; ``Engine.find`` reads it
        self.routes: dict[str, Route] = {}
        #: name -> its shadow version; ``Engine.infer`` mirrors when it is not empty
        self.shadows: dict[str, ServedPipeline] = {}
        self._weights: dict[str, dict[str, float]] = {}
        self._sticky: dict[str, str] = {}
        self._shadow_version: dict[str, str] = {}
        #: (name, version) -> the YAML of a version loaded through :meth:`load`
        self._runtime: dict[tuple[str, str], Path] = {}
        #: (name, version) -> why its last load failed, and its file
        self._failed: dict[tuple[str, str], tuple[str, Path | None]] = {}
        #: versions whose models are loading (not routed yet)
        self._loading: dict[tuple[str, str], Path | None] = {}
        #: versions retired or replaced, still finishing their requests
        self._draining: list[ServedPipeline] = []
        #: versions being built (their models count as in use)
        self._building: list[ServedPipeline] = []
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_inflight = 0
        self._lock = asyncio.Lock()
        #: with several front processes: brings the others to this one's versions and routes
        #: (``RelayServer.sync``), called once a change is made and before a version retires,
        #: so that no front still routes to a model that unloads
        self.on_change: Callable[[], Awaitable[None]] | None = None
        # the registry versions that aliases resolved to before a restart serve again
        resolver().pins.update(_read_pins(state_file))

    # -- what the admin API calls -------------------------------------------------------

    def versions(self) -> list[VersionState]:
        """Every version: ready ones, then loading, draining and failed ones."""
        served = self.engine._served
        states = []
        for name in sorted(served):
            weights = self._weights.get(name, {})
            for version in sorted(served[name], key=version_key):
                s = served[name][version]
                states.append(self._state(s, "ready", weight=weights.get(version, 0.0)))
        for (name, version), path in self._loading.items():
            states.append(VersionState(name, version, "loading", path=_text(path)))
        for s in self._draining:
            states.append(self._state(s, "draining"))
        for (name, version), (why, path) in self._failed.items():
            if version not in served.get(name, {}):
                states.append(VersionState(name, version, "failed", why=why, path=_text(path)))
        return states

    async def load(self, path: Path) -> VersionState:
        """Load the pipeline version in YAML ``path`` beside those serving.

        The first version of a name takes all its traffic; a later one none until
        :meth:`set_traffic`.

        Raises:
            LifecycleError: the file does not validate, the version is already served, its
                models do not fit or fail to load or warm up (the message carries the cause);
                nothing changed.
        """
        async with self._lock:
            served = await self._load(Path(path))
            self._save()
            await self._tell_peers()
            return self._state(served, "ready")

    async def set_traffic(
        self,
        name: str,
        weights: Mapping[str, float],
        *,
        shadow: str | None = None,
        sticky_header: str | None = None,
    ) -> list[VersionState]:
        """Split the requests for ``name`` that name no version.

        Args:
            weights: version -> weight (>= 0, normalised to sum 1; at least one > 0); versions
                not named get 0.  Empty: the weights stay as they are.
            shadow: a ready version that gets a copy of each request the others answer; None:
                no shadow.
            sticky_header: a request header whose value picks the version (by hash), so that
                one value stays on one version while the weights stay; None: at random.

        Raises:
            LifecycleError: unknown name or version, a version not ready, a bad weight.
        """
        async with self._lock:
            versions = self.engine._served.get(name)
            if not versions:
                msg = f"pipeline {name!r} is not served{self._names_hint()}"
                raise LifecycleError(msg)
            for version in [*weights, *([shadow] if shadow is not None else [])]:
                if version not in versions:
                    ready = ", ".join(sorted(versions, key=version_key))
                    msg = f"pipeline {name!r} has no ready version {version!r} (ready: {ready})"
                    raise LifecycleError(msg)
            if weights:
                bad = {v: w for v, w in weights.items() if not (w >= 0 and math.isfinite(w))}
                if bad:
                    msg = f"weights must be finite and >= 0 (got {bad})"
                    raise LifecycleError(msg)
                total = sum(weights.values())
                if total <= 0:
                    msg = f"pipeline {name!r}: at least one weight must be > 0"
                    raise LifecycleError(msg)
            new = {v: w / total for v, w in weights.items() if w > 0} if weights else None
            if shadow is not None and (new or self._weights.get(name, {})).get(shadow, 0) > 0:
                msg = f"pipeline {name!r} version {shadow!r} takes traffic: a shadow never answers"
                raise LifecycleError(msg)
            if new is not None:
                self._weights[name] = new
            _set(self._shadow_version, name, shadow)
            _set(self._sticky, name, sticky_header or None)
            self._route(name)
            self._save()
            await self._tell_peers()
            logger.info(
                "pipeline %s: weights %s, shadow %s, sticky header %s",
                name, self._weights.get(name), shadow, sticky_header,
            )  # fmt: skip
            return [s for s in self.versions() if s.pipeline == name]

    async def reload(self, name: str, version: str, *, in_place: bool = False) -> VersionState:
        """Read the version's YAML and model files again and swap them in blue/green.

        The models that changed load and warm up beside the old ones; traffic moves to the new
        ones at once; the old ones unload once their requests drained.  With ``in_place``, the
        version's old models unload first (its requests wait meanwhile): for a GPU that cannot
        hold both.

        Raises:
            LifecycleError: unknown version, the file no longer validates or names another
                version, the new models do not fit beside the old ones (what is missing), or
                fail to load; the old version keeps serving.
        """
        async with self._lock:
            versions = self.engine._served.get(name, {})
            old = versions.get(version)
            if old is None:
                msg = f"pipeline {name!r} has no ready version {version!r}"
                raise LifecycleError(msg)
            if old.pipeline.path is None:
                msg = f"pipeline {name!r} version {version!r} has no file to read again"
                raise LifecycleError(msg)
            if in_place and self.on_change is not None:
                # The other fronts would send items to the old models while they are gone.
                msg = "an in-place reload needs front_processes: 1; reload beside the old one"
                raise LifecycleError(msg)
            # models:/NAME@ALIAS is asked again: a moved alias is a new model, swapped in
            pins = resolver().unpin(name, version)
            try:
                pipeline = await self._read(old.pipeline.path, expect=(name, version))
            except BaseException:
                resolver().pins.update(pins)
                raise
            try:
                if in_place:
                    new = await self._reload_in_place(old, pipeline)
                else:
                    new = await self._reload_beside(old, pipeline)
            except LifecycleError:
                resolver().pins.update(pins)
                raise
            except DagserveError as exc:
                resolver().pins.update(pins)
                keeps = "" if version in versions else " and the version is no longer served"
                msg = f"pipeline {name!r} version {version!r}: reload failed{keeps}: {exc}"
                raise LifecycleError(msg) from exc
            finally:
                self._save()
            return self._state(new, "ready")

    async def unload(self, name: str, version: str) -> None:
        """Stop routing to the version, drain its requests in flight, unload its models (those
        another version uses stay).  A failed version is forgotten.

        Refused while the version takes all the traffic of a name with other versions (give it
        to them first); the only version of a name may go (the name is then not served).  The
        weights of the other versions keep their proportions.

        Raises:
            LifecycleError: unknown version, or it takes all the traffic.
        """
        async with self._lock:
            key = (name, version)
            versions = self.engine._served.get(name, {})
            served = versions.get(version)
            if served is None:
                if self._failed.pop(key, None) is not None:
                    self._runtime.pop(key, None)
                    self._save()
                    return
                msg = f"pipeline {name!r} has no ready version {version!r}"
                raise LifecycleError(msg)
            weights = self._weights.get(name, {})
            others = {v: w for v, w in weights.items() if v != version}
            if weights.get(version, 0.0) > 0 and len(versions) > 1 and sum(others.values()) <= 0:
                msg = (
                    f"pipeline {name!r} version {version!r} takes all the requests that name "
                    "no version: give them to another version (traffic) before unloading it"
                )
                raise LifecycleError(msg)
            del versions[version]
            total = sum(others.values())
            self._weights[name] = {v: w / total for v, w in others.items()} if total else {}
            if self._shadow_version.get(name) == version:
                del self._shadow_version[name]
            if not versions:
                self._weights.pop(name, None)
                self._sticky.pop(name, None)
            self._runtime.pop(key, None)
            resolver().unpin(name, version)  # loaded again, it asks its aliases again
            self._route(name)
            self._save()
            logger.info("pipeline %s version %s: unloading (draining first)", name, version)
            await self._retire(served)

    async def set_variant_weights(
        self, name: str, version: str, node: str, weights: dict[str, float]
    ) -> VersionState:
        """Weights (percent) of a node's variants in one ready version; variants not named
        keep theirs, the node takes what they leave (``VariantRunner.set_weights``).

        Raises:
            LifecycleError: unknown version or node, a node without variants, an unknown
                variant, the shadow given weight, or weights over 100; nothing changes.
        """
        async with self._lock:  # not onto a runner that a reload is replacing
            served = self.engine._served.get(name, {}).get(version)
            if served is None:
                msg = f"pipeline {name!r} has no ready version {version!r}"
                raise LifecycleError(msg)
            try:
                set_node_variant_weights(served.runners, node, weights)
            except ValueError as exc:
                msg = f"pipeline {name!r} version {version!r}: {exc}"
                raise LifecycleError(msg) from exc
            logger.info(
                "pipeline %s version %s node %s: variant weights %s", name, version, node, weights
            )
            await self._tell_peers()
            weight = self._weights.get(name, {}).get(version, 0.0)
            return self._state(served, "ready", weight=weight)

    # -- several front processes -------------------------------------------------------

    def peer_state(self) -> PeerState:
        """This front's versions and routes, for the others to :meth:`follow`."""
        versions = {
            (name, version): self._state(served, "ready")
            for name, served_versions in self.engine._served.items()
            for version, served in served_versions.items()
        }
        routes = {
            name: (dict(self._weights.get(name, {})), self._shadow_version.get(name),
                   self._sticky.get(name))
            for name in self.engine._served
        }  # fmt: skip
        return PeerState(versions, routes)

    async def follow(self, state: PeerState) -> None:
        """Serve ``state`` (the first front's): load and reload what differs, take its routes,
        then unload what it no longer serves, each as the admin calls do it (an unload drains
        this front's requests before it returns)."""
        served = self.engine._served
        for (name, version), want in state.versions.items():
            have = served.get(name, {}).get(version)
            if have is None:
                if want.path is None:
                    logger.error("pipeline %s version %s: no file to load it from", name, version)
                    continue
                await self.load(Path(want.path))
            elif tuple(sorted({m.model_id for m in _models(have)})) != tuple(sorted(want.models)):
                await self.reload(name, version)
        for name, (weights, shadow, sticky) in state.routes.items():
            if served.get(name) and weights:
                await self.set_traffic(name, weights, shadow=shadow, sticky_header=sticky)
        for name in list(served):
            for version in list(served.get(name, {})):
                if (name, version) not in state.versions:
                    await self.unload(name, version)
        for (name, version), want in state.versions.items():
            have_state = self._state(served[name][version], "ready")
            for node, split in want.variants.items():
                if dict(have_state.variants.get(node, {})) != dict(split):
                    await self.set_variant_weights(name, version, node, dict(split))

    async def _tell_peers(self) -> None:
        if self.on_change is None:
            return
        try:
            await self.on_change()
        except Exception:  # the change stands here; a front that did not follow says why
            logger.exception("the other front processes did not all follow the change")

    # -- startup, restore, shutdown -----------------------------------------------------

    async def start(
        self,
        pipelines: list[Pipeline],
        placement: Placement,
        model_ids: dict[tuple[Any, ...], str],
    ) -> None:
        """Serve the startup pipelines (placed together by the engine); the latest version of
        each name takes all its traffic; then restore the state file."""
        for pipeline in pipelines:
            self._loading[(pipeline.name, pipeline.version)] = pipeline.path
            try:
                served = await self._bring_up(pipeline, placement, model_ids)
            finally:
                del self._loading[(pipeline.name, pipeline.version)]
            self.engine._served.setdefault(pipeline.name, {})[pipeline.version] = served
            _log_serving(served)
        for name, versions in self.engine._served.items():
            if versions:
                self._weights[name] = {max(versions, key=version_key): 1.0}
                self._route(name)
        await self._restore()
        if resolver().pins:  # the versions the aliases resolved to now survive a restart
            self._save()

    async def aclose(self) -> None:
        """Cancel the shadow copies in flight."""
        for task in list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)

    def runners(self) -> Iterable[NodeRunner]:
        """The runners of versions not among the engine's ready ones (to close at shutdown)."""
        for served in [*self._draining, *self._building]:
            yield from served.runners.values()

    # -- shadow ---------------------------------------------------------------------------

    def mirror(
        self, served: ServedPipeline, request: InferenceRequest, outputs: dict[str, np.ndarray]
    ) -> None:
        """Send a copy of an answered request to its name's shadow, in a task nothing awaits."""
        shadow = self.shadows.get(served.pipeline.name)
        if shadow is None or shadow is served:
            return
        labels = (shadow.pipeline.name, shadow.pipeline.version)
        if self._shadow_inflight >= self.max_shadow_inflight:
            self.engine.metrics.shadow_dropped.inc(*labels)
            return
        self._shadow_inflight += 1
        shadow.inflight += 1
        task = asyncio.get_running_loop().create_task(self._shadow(shadow, request, outputs))

        def done(task: asyncio.Task[None]) -> None:
            self._shadow_tasks.discard(task)
            self._shadow_inflight -= 1
            shadow.inflight -= 1

        self._shadow_tasks.add(task)
        task.add_done_callback(done)

    async def _shadow(
        self, shadow: ServedPipeline, request: InferenceRequest, served: dict[str, np.ndarray]
    ) -> None:
        metrics = self.engine.metrics
        labels = (shadow.pipeline.name, shadow.pipeline.version)
        metrics.shadow_requests.inc(*labels)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(SHADOW_TIMEOUT_S):  # besides the request's own deadline
                execution = await self.engine.execute(shadow, request)
        except Exception as exc:
            metrics.shadow_seconds.observe(time.perf_counter() - started, *labels)
            metrics.shadow_mismatches.inc(*labels)
            logger.debug("shadow %s:%s failed: %s", *labels, exc)
            return
        metrics.shadow_seconds.observe(time.perf_counter() - started, *labels)
        difference, same = compare_outputs(served, execution.outputs)
        if not same:
            metrics.shadow_mismatches.inc(*labels)
        if difference > metrics.shadow_max_abs_difference.get(*labels):
            metrics.shadow_max_abs_difference.set(difference, *labels)

    # -- loading ----------------------------------------------------------------------------

    async def _read(self, path: Path, *, expect: tuple[str, str] | None = None) -> Pipeline:
        """Validate one pipeline file (in a thread: plugins are inspected in a process)."""
        try:
            pipelines, errors = await asyncio.to_thread(load_for_serving, [path])
            if pipelines and not errors:
                # models:/ and s3:// models resolve and download here, off the event loop
                await asyncio.to_thread(resolver().prepare, pipelines[0])
        except RegistryError as exc:
            msg = f"{path}: {exc.message}"
            raise LifecycleError(msg) from exc
        except Exception as exc:  # an inspector that could not start, a file gone
            msg = f"{path}: cannot load: {type(exc).__name__}: {exc}"
            raise LifecycleError(msg) from exc
        if errors or not pipelines:
            why = "; ".join(str(e) for e in errors) or "no pipeline in it"
            msg = f"{path}: invalid pipeline: {why}"
            raise LifecycleError(msg)
        pipeline = pipelines[0]
        if expect is not None and (pipeline.name, pipeline.version) != expect:
            msg = (
                f"{path} now defines pipeline {pipeline.name!r} version {pipeline.version!r}, "
                f"not {expect[0]!r} version {expect[1]!r}: load it as a new version instead"
            )
            raise LifecycleError(msg)
        return pipeline

    async def _load(self, path: Path) -> ServedPipeline:
        pipeline = await self._read(path)
        name, version = key = (pipeline.name, pipeline.version)
        if version in self.engine._served.get(name, {}) or key in self._loading:
            msg = f"pipeline {name!r} version {version!r} is already served: reload it instead"
            raise LifecycleError(msg)
        self._loading[key] = path
        try:
            placement, model_ids = self._plan([pipeline])
            served = await self._bring_up(pipeline, placement, model_ids)
            await self._warm_up(served)
        except DagserveError as exc:
            self._failed[key] = (exc.message, path)
            if isinstance(exc, LifecycleError):
                raise
            raise LifecycleError(exc.message) from exc
        finally:
            del self._loading[key]
        self._failed.pop(key, None)
        self.engine.placement = placement
        versions = self.engine._served.setdefault(name, {})
        versions[version] = served
        if not any(w > 0 for w in self._weights.get(name, {}).values()):
            self._weights[name] = {version: 1.0}  # the first version of a name takes it all
        self._runtime[key] = path
        self._route(name)
        _log_serving(served)
        return served

    def _plan(
        self, pipelines: list[Pipeline], *, without: Iterable[Model] = ()
    ) -> tuple[Placement, dict[tuple[Any, ...], str]]:
        """Place ``pipelines`` beside the models loaded (but ``without``)."""
        engine = self.engine
        if engine.model_source is not None:
            return engine.model_source.plan(pipelines)
        leaving = {id(m) for m in without}
        loaded = {i: m.model_id for i, m in engine.models.items() if id(m) not in leaving}
        try:
            return plan_placement(
                pipelines, engine.inventory, reserve_mb=engine.gpu_reserve_mb,
                current=engine.placement, loaded=loaded,
            )  # fmt: skip
        except PlacementError as exc:
            raise LifecycleError(exc.message) from exc

    async def _bring_up(
        self, pipeline: Pipeline, placement: Placement, model_ids: dict[tuple[Any, ...], str]
    ) -> ServedPipeline:
        """Build the pipeline's runners and load what is new; on failure, unload it again.

        Raises:
            PluginLoadError: a node failed to load (its message names it and the cause).
        """
        engine = self.engine
        before = set(engine.models)
        served: ServedPipeline | None = None
        try:
            served = serve_pipeline(
                pipeline, engine._pool, engine.workers, engine.models, placement, model_ids,
                engine.metrics,
                new_model=engine.model_source.new_model if engine.model_source else None,
            )  # fmt: skip
            self._building.append(served)
            for node, runner in served.runners.items():
                if not isinstance(runner, ModelRunner):  # models start below, once
                    await _start_runner(pipeline, node, runner)
            for identity, model in list(engine.models.items()):
                if identity not in before:
                    await _start_model(model)
            await warm_up(served)  # its warmup: samples, before it takes traffic
        except BaseException:
            _discard(self._building, served)
            await self._release([served] if served else [], also=set(engine.models) - before)
            raise
        _discard(self._building, served)
        return served

    async def _warm_up(self, served: ServedPipeline) -> None:
        """For a version loaded or reloaded at runtime that declares no ``warmup:`` anywhere
        (pipeline, node or variant; those ran in ``_bring_up``, and a second, unasked request
        would run through models that a plugin counting its calls, or a stateful one, sees):
        one request of zeros (one item; -1 dimensions of size 1), so that the first real one
        meets no cold start.  A pipeline that refuses zeros is not failed for it (logged); on
        a failure that is not the request's, its models are unloaded again."""
        pipeline = served.pipeline
        if declares_warmup(pipeline):
            return
        inputs = {}
        for name, spec in pipeline.input_specs.items():
            if spec.optional:
                continue
            shape = (1, *(1 if d == -1 else d for d in spec.shape))
            if spec.dtype in OBJECT_DTYPES:
                empty: Any = "" if spec.dtype == "string" else b""
                inputs[name] = np.full(shape, empty, dtype=object)
            else:
                inputs[name] = np.zeros(shape, dtype=NUMPY_DTYPES[spec.dtype])
        request = InferenceRequest(pipeline.name, inputs, f"warmup-{pipeline.name}")
        try:
            await self.engine.execute(served, request)
        except DagserveError as exc:
            logger.info("pipeline %s: warm-up with zeros refused: %s", pipeline.name, exc)
        except BaseException:
            await self._release([served])
            raise

    # -- reload -----------------------------------------------------------------------------

    async def _reload_beside(self, old: ServedPipeline, pipeline: Pipeline) -> ServedPipeline:
        name, version = pipeline.name, pipeline.version
        try:
            placement, model_ids = self._plan([pipeline])
        except LifecycleError as exc:
            msg = (
                f"pipeline {name!r} version {version!r}: the new models do not fit beside the "
                f"old ones: {exc.message}; reload in place to unload the old ones first "
                "(its requests pause meanwhile)"
            )
            raise LifecycleError(msg) from exc
        new = await self._bring_up(pipeline, placement, model_ids)
        await self._warm_up(new)
        self.engine.placement = placement
        self._swap(old, new)
        await self._retire(old)
        return new

    async def _reload_in_place(self, old: ServedPipeline, pipeline: Pipeline) -> ServedPipeline:
        """Pause the version, unload its own models, load the new ones, resume.

        If the new ones fail to load, the old pipeline is loaded again; if even that fails,
        the version is retired (failed) and its paused requests find another version or none.
        """
        name, version = pipeline.name, pipeline.version
        leaving = self._only_used_by(old)
        placement, model_ids = self._plan([pipeline], without=leaving)  # refuses what never fits
        old.paused = asyncio.Event()
        try:
            await self._drain(old)
            versions = self.engine._served[name]
            # unload the old models: the version keeps its place, its requests wait
            await self._release([old])
            try:
                new = await self._bring_up(pipeline, placement, model_ids)
                await self._warm_up(new)
            except DagserveError as exc:
                logger.error("pipeline %s:%s: reload in place failed: %s", name, version, exc)
                try:
                    placement, model_ids = self._plan([old.pipeline])
                    back = await self._bring_up(old.pipeline, placement, model_ids)
                except DagserveError as again:
                    why = f"{exc.message}; then the old: {again}"
                    self._failed[(name, version)] = (why, old.pipeline.path)
                    del versions[version]
                    self._forget(name, version)
                    raise exc from None
                self.engine.placement = placement
                versions[version] = back
                self._route(name)
                raise
            self.engine.placement = placement
            versions[version] = new
            self._route(name)
            _log_serving(new)
            return new
        finally:
            old.paused.set()

    def _swap(self, old: ServedPipeline, new: ServedPipeline) -> None:
        name, version = new.pipeline.name, new.pipeline.version
        self.engine._served[name][version] = new
        self._route(name)
        logger.info("pipeline %s version %s: reloaded; the old one drains", name, version)
        _log_serving(new)

    # -- retiring ---------------------------------------------------------------------------

    async def _retire(self, served: ServedPipeline) -> None:
        """Wait for a version no longer routed to finish its requests, then unload it."""
        self._draining.append(served)
        try:
            await self._tell_peers()  # the other fronts drain theirs first
            await self._drain(served)
        finally:
            _discard(self._draining, served)
            await self._release([served])

    async def _drain(self, served: ServedPipeline) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while served.inflight > 0:
            if loop.time() >= deadline:
                logger.warning(
                    "pipeline %s version %s: %d requests still in flight after %.0f s; "
                    "unloading it anyway", served.pipeline.name, served.pipeline.version,
                    served.inflight, self.drain_timeout_s,
                )  # fmt: skip
                return
            await asyncio.sleep(0.01)

    def _only_used_by(self, served: ServedPipeline) -> list[Model]:
        """Models of ``served`` that no other live version uses."""
        others = {id(m) for s in self._live() if s is not served for m in _models(s)}
        return [m for m in _models(served) if id(m) not in others]

    def _live(self) -> Iterable[ServedPipeline]:
        for versions in self.engine._served.values():
            yield from versions.values()
        yield from self._draining
        yield from self._building

    async def _release(
        self, retired: list[ServedPipeline], *, also: Iterable[tuple[Any, ...]] = ()
    ) -> None:
        """Close ``retired``'s own runners and unload the models (theirs, and those of
        identity ``also``) that no live version uses; shared ones stay."""
        engine = self.engine
        candidates = {id(m) for s in retired for m in _models(s)}
        for served in retired:
            for runner in _leaves(served.runners.values()):
                if isinstance(runner, ModelRunner):
                    user = f"{runner.pipeline}/{runner.node}"
                    if user in runner.model.nodes:
                        runner.model.nodes.remove(user)
            for runner in served.runners.values():
                if not isinstance(runner, ModelRunner):  # a node's variants close their arms
                    await runner.aclose()
        leaving = {id(s) for s in retired}
        used = {id(m) for s in self._live() if id(s) not in leaving for m in _models(s)}
        also = set(also)
        gone = []
        for identity, model in list(engine.models.items()):
            if (id(model) in candidates or identity in also) and id(model) not in used:
                del engine.models[identity]
                gone.append(model)
        for model in gone:
            await model.aclose()
            if engine.model_source is None:
                try:
                    await engine.workers.unload(model.key, model.model_id)
                except (DagserveError, OSError) as exc:
                    logger.warning("model %s: unloading failed: %s", model.model_id, exc)
            logger.info("model %s unloaded from %s", model.model_id, model.key.name)
        if gone and engine.model_source is None and engine.placement is not None:
            loaded = {i: m.model_id for i, m in engine.models.items()}
            engine.placement, _ = plan_placement(
                [], engine.inventory, reserve_mb=engine.gpu_reserve_mb,
                current=engine.placement, loaded=loaded,
            )  # fmt: skip

    # -- routing ----------------------------------------------------------------------------

    def _route(self, name: str) -> None:
        """Rebuild the route (and shadow) of ``name`` from its ready versions and weights."""
        versions = self.engine._served.get(name)
        if not versions:
            self.routes.pop(name, None)
            self.shadows.pop(name, None)
            self._forget_name(name)
            return
        weights = {v: w for v, w in self._weights.get(name, {}).items() if v in versions}
        self.routes[name] = Route(name, versions, weights, self._sticky.get(name))
        shadow = self._shadow_version.get(name)
        if shadow in versions:
            self.shadows[name] = versions[shadow]
        else:
            self.shadows.pop(name, None)

    def _forget(self, name: str, version: str) -> None:
        weights = self._weights.get(name, {})
        weights.pop(version, None)
        if self._shadow_version.get(name) == version:
            del self._shadow_version[name]
        self._route(name)

    def _forget_name(self, name: str) -> None:
        self._weights.pop(name, None)
        self._sticky.pop(name, None)
        self._shadow_version.pop(name, None)

    def _state(self, served: ServedPipeline, state: str, *, weight: float = 0.0) -> VersionState:
        name, version = served.pipeline.name, served.pipeline.version
        splits = {n: r for n, r in served.runners.items() if isinstance(r, VariantRunner)}
        return VersionState(
            pipeline=name,
            version=version,
            state=state,
            weight=weight,
            shadow=state == "ready" and self._shadow_version.get(name) == version,
            sticky_header=self._sticky.get(name),
            inflight=served.inflight,
            path=_text(served.pipeline.path),
            models=tuple(sorted({m.model_id for m in _models(served)})),
            variants={n: dict(r.weights) for n, r in splits.items()},
            variant_shadows={n: r.shadow for n, r in splits.items() if r.shadow},
        )

    def _names_hint(self) -> str:
        names = sorted(n for n, v in self.engine._served.items() if v)
        return f" (served: {', '.join(names)})" if names else ""

    # -- the state file ---------------------------------------------------------------------

    def _save(self) -> None:
        """Write the state file (a temporary file, then an atomic rename)."""
        if self.state_file is None:
            return
        pipelines: dict[str, Any] = {}
        for name, versions in sorted(self.engine._served.items()):
            if not versions:
                continue
            pipelines[name] = {
                "weights": self._weights.get(name, {}),
                "shadow": self._shadow_version.get(name),
                "sticky_header": self._sticky.get(name),
                "loaded": {},
                # version -> models:/ URI -> the registry version it resolved to
                "models": _pins_of(name, versions),
            }
        for (name, version), path in sorted(self._runtime.items()):
            entry = pipelines.setdefault(
                name, {"weights": {}, "shadow": None, "sticky_header": None, "loaded": {}}
            )
            entry["loaded"][version] = os.path.abspath(path)
        text = json.dumps({"format": STATE_FORMAT, "pipelines": pipelines}, indent=2)
        path = self.state_file
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary.write_text(text + "\n", encoding="utf-8")
            os.replace(temporary, path)
        except OSError as exc:
            # The change is made and serves; only its memory across a restart is lost.
            logger.error("cannot write the lifecycle state to %s: %s", path, exc)

    async def _restore(self) -> None:
        """Load the versions the state file names, then apply its weights, shadow and sticky
        header; whatever no longer applies is logged and skipped."""
        path = self.state_file
        if path is None or not path.exists():
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != STATE_FORMAT:
                msg = f"format {data.get('format')!r}, expected {STATE_FORMAT}"
                raise ValueError(msg)
            pipelines = dict(data["pipelines"])
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            logger.error("lifecycle state %s ignored: %s", path, exc)
            return
        for name, entry in pipelines.items():
            for version, yaml_path in dict(entry.get("loaded") or {}).items():
                if version in self.engine._served.get(name, {}):
                    self._runtime[(name, version)] = Path(yaml_path)
                    continue
                try:
                    served = await self._load(Path(yaml_path))
                except LifecycleError as exc:
                    # kept (listed as failed, and in the state file) until unloaded
                    logger.error("lifecycle state: %s:%s not restored: %s", name, version, exc)
                    self._failed[(name, version)] = (exc.message, Path(yaml_path))
                    self._runtime[(name, version)] = Path(yaml_path)
                    continue
                if (served.pipeline.name, served.pipeline.version) != (name, version):
                    logger.warning(
                        "lifecycle state: %s now holds %s:%s (was %s:%s)", yaml_path,
                        served.pipeline.name, served.pipeline.version, name, version,
                    )  # fmt: skip
            versions = self.engine._served.get(name)
            if not versions:
                continue
            weights = {
                v: float(w)
                for v, w in dict(entry.get("weights") or {}).items()
                if v in versions and float(w) > 0
            }
            total = sum(weights.values())
            if total > 0:
                self._weights[name] = {v: w / total for v, w in weights.items()}
            shadow = entry.get("shadow")
            if shadow in versions:
                self._shadow_version[name] = shadow
            sticky = entry.get("sticky_header")
            if isinstance(sticky, str) and sticky:
                self._sticky[name] = sticky
            self._route(name)
            logger.info(
                "lifecycle state restored for %s: weights %s, shadow %s, sticky header %s",
                name, self._weights.get(name), self._shadow_version.get(name),
                self._sticky.get(name),
            )  # fmt: skip


def _pins_of(name: str, versions: Iterable[str]) -> dict[str, dict[str, str]]:
    pins: dict[str, dict[str, str]] = {}
    served = set(versions)
    for (pipeline, version, uri), pinned in sorted(resolver().pins.items()):
        if pipeline == name and version in served:
            pins.setdefault(version, {})[uri] = pinned
    return pins


def _read_pins(path: Path | None) -> dict[tuple[str, str, str], str]:
    """The registry versions the state file pinned (none if it is missing or unreadable:
    :meth:`Lifecycle._restore` logs why)."""
    if path is None:
        return {}
    try:
        pipelines = json.loads(path.read_text(encoding="utf-8"))["pipelines"]
        return {
            (name, str(version), str(uri)): str(pinned)
            for name, entry in pipelines.items()
            for version, uris in dict(entry.get("models") or {}).items()
            for uri, pinned in dict(uris).items()
        }
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {}


def _models(served: ServedPipeline) -> list[Model]:
    """The models a version uses, its nodes' variants included."""
    found: dict[int, Model] = {}
    for runner in _leaves(served.runners.values()):
        if isinstance(runner, ModelRunner):
            found.setdefault(id(runner.model), runner.model)
    return list(found.values())


def _leaves(runners: Iterable[Any]) -> Iterator[Any]:
    """The runners, with a node's variants (``engine.runtime.variants``) opened into theirs."""
    for runner in runners:
        arms = getattr(runner, "arms", None)
        if isinstance(arms, Mapping):
            yield from _leaves(arms.values())
        else:
            yield runner


def _discard(items: list[ServedPipeline], item: ServedPipeline | None) -> None:
    """Remove ``item`` itself (not an equal one) from ``items``, if there."""
    for i, other in enumerate(items):
        if other is item:
            del items[i]
            return


def _set(mapping: dict[str, str], key: str, value: str | None) -> None:
    if value is None:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _log_serving(served: ServedPipeline) -> None:
    logger.info(
        "serving pipeline %s version %s: %s",
        served.pipeline.name,
        served.pipeline.version,
        ", ".join(f"{n} [{_where(r)}]" for n, r in served.runners.items()),
    )


async def _start_runner(pipeline: Pipeline, name: str, runner: LocalRunner | VariantRunner) -> None:
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


__all__ = ["Lifecycle", "Route", "VersionState", "version_key"]
