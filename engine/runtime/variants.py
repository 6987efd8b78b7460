"""Node variants: canary and shadow of one model inside a pipeline (``variants:`` of a node).

Each variant is an *arm* of its node: the node's spec with the variant's keys over it
(``NodeSpec.variant``), served like any node (placed, shared by model identity, batched),
named ``node@variant`` in model ids, errors, metrics and per-node latencies.  The node's
runner becomes a :class:`VariantRunner`, which per request

* picks the arm that answers, by weight (percent; the node itself takes what its variants
  leave): at random, or, when the request carries a sticky key, by the key's hash, so that
  one key stays on one arm while the weights stay;
* runs it, and records the choice in the request's :class:`~dag.runner.VariantScope` (the
  executor keys the node's latency ``node@variant``);
* after the answer, mirrors a copy of the node's inputs to the shadow variant in a task that
  nothing awaits, bounded in number, and compares what the shadow produced with what was
  served (``dagserve_variant_shadow_*`` metrics).  The shadow never answers, never delays a
  reply and never changes one.

Weights change at run time with :meth:`VariantRunner.set_weights`
(``Lifecycle.set_variant_weights`` through the admin API).
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Mapping
from typing import NamedTuple

import numpy as np

from dag.pipeline import Pipeline
from dag.runner import variant_scope
from dag.schema import ALL_WEIGHT, NodeSpec, variant_label
from engine.observability.metrics import Metrics, error_type
from engine.runtime.local import LocalRunner
from engine.runtime.model import ModelRunner
from engine.runtime.shadow import compare_outputs
from model_plugins.errors import DagserveError, PluginLoadError
from model_plugins.plugin import Batch, ModelPlugin

#: a runner of one arm (what ``engine.runtime.assembly`` makes of a node without variants)
ArmRunner = LocalRunner | ModelRunner

logger = logging.getLogger(__name__)

#: mirrored copies that may run at once on one node's shadow; past it, copies are dropped
MAX_SHADOW_INFLIGHT = 64
#: a mirrored copy has this long to finish on the shadow (it has no request deadline)
SHADOW_TIMEOUT_S = 30.0

_TWO_64 = float(2**64)


class Arm(NamedTuple):
    """A node as it is served: itself (``variant`` None) or one of its variants."""

    label: str  # ``node`` or ``node@variant``
    node: str
    variant: str | None
    spec: NodeSpec  # the node's spec, the variant's keys over it
    plugin_class: type[ModelPlugin]


def node_arms(pipeline: Pipeline) -> Iterator[Arm]:
    """Every node of ``pipeline`` and, after each, its variants, in file order."""
    for name, node in pipeline.spec.nodes.items():
        yield Arm(name, name, None, node, pipeline.plugin_classes[name])
        classes = pipeline.variant_classes.get(name, {})
        for variant in node.variants:
            spec = node.variant(variant)
            yield Arm(variant_label(name, variant), name, variant, spec, classes[variant])


def sticky_point(key: str) -> float:
    """Where ``key`` falls in [0, 1): the same key, the same point, in every process.

    >>> sticky_point("user-7") == sticky_point("user-7")
    True
    """
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _TWO_64


class VariantRunner:
    """The runner of a node with variants: one of its arms answers each request.

    Args:
        pipeline: the pipeline's name (metrics).
        node: the node's name.
        arms: variant -> its runner; None -> the node's own.
        weights: each variant that may answer -> its weight in percent (sum <= 100).
        shadow: the variant that gets mirrored copies, if any.
        metrics: where shadow comparisons are counted (None: nowhere).
        max_shadow_inflight: mirrored copies that may run at once.
    """

    kind = "variants"

    def __init__(
        self,
        pipeline: str,
        node: str,
        arms: Mapping[str | None, ArmRunner],
        weights: Mapping[str, float],
        *,
        shadow: str | None = None,
        metrics: Metrics | None = None,
        max_shadow_inflight: int = MAX_SHADOW_INFLIGHT,
    ) -> None:
        self.pipeline = pipeline
        self.node = node
        self.arms = dict(arms)
        self.shadow = shadow
        self.metrics = metrics
        self.max_shadow_inflight = max_shadow_inflight
        self.weights: dict[str, float] = {}
        #: the variants that may answer, and their cumulative weights
        self._choices: tuple[str, ...] = ()
        self._bounds: tuple[float, ...] = ()
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self.set_weights(dict(weights))

    # -- choosing -----------------------------------------------------------------------

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Change the weights (percent) of the variants named; the others keep theirs, the
        node takes what they all leave.  Requests already running keep their choice.

        Raises:
            ValueError: an unknown variant, the shadow given weight, a weight not from 0 to
                100, or weights adding up to more than 100; nothing changes.
        """
        variants = [v for v in self.arms if v is not None and v != self.shadow]
        for variant, weight in weights.items():
            if variant not in variants:
                if variant == self.shadow:
                    why = "is the shadow: it never answers, so it takes no weight"
                else:
                    known = ", ".join(variants) or "none"
                    why = f"is not one of its variants (variants that take weight: {known})"
                msg = f"node {self.node!r}: variant {variant!r} {why}"
                raise ValueError(msg)
            if not (isinstance(weight, int | float) and 0 <= weight <= ALL_WEIGHT):
                msg = (
                    f"node {self.node!r}: variant {variant!r}: a weight is a percent from 0 "
                    f"to {ALL_WEIGHT:g} (got {weight!r})"
                )
                raise ValueError(msg)
        merged = {v: float(weights.get(v, self.weights.get(v, 0.0))) for v in variants}
        total = sum(merged.values())
        if total > ALL_WEIGHT + 1e-9:
            msg = (
                f"node {self.node!r}: the variants' weights must add up to at most "
                f"{ALL_WEIGHT:g} percent (got {total:g}: {merged})"
            )
            raise ValueError(msg)
        self.weights = merged
        choices = [v for v in variants if merged[v] > 0]
        bounds = list(np.cumsum([merged[v] for v in choices]))
        if bounds and math.isclose(total, ALL_WEIGHT):
            bounds[-1] = math.inf  # all to the variants: rounding never reaches the node
        self._choices, self._bounds = tuple(choices), tuple(float(b) for b in bounds)

    def choose(self, request_key: str | None) -> str | None:
        """The variant that answers a request (None: the node itself).

        Args:
            request_key: the request's sticky key; None picks at random by weight.
        """
        if not self._choices:
            return None
        if request_key is None:
            point = random.random() * ALL_WEIGHT  # a traffic split, not a secret
        else:
            point = sticky_point(request_key) * ALL_WEIGHT
        index = bisect.bisect_right(self._bounds, point)
        return self._choices[index] if index < len(self._choices) else None

    # -- running ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the arms that run in the front process (models load with the engine's)."""
        for variant, runner in self.arms.items():
            if not isinstance(runner, LocalRunner):
                continue
            try:
                await runner.start()
            except Exception as exc:
                if variant is None:
                    raise
                why = exc.message if isinstance(exc, DagserveError) else f"{exc!r}"
                msg = f"variant {variant_label(self.node, variant)!r}: {why}"
                raise PluginLoadError(msg) from exc

    async def aclose(self) -> None:
        """Cancel the mirrored copies in flight and unload the arms in the front process."""
        for task in list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        for runner in self.arms.values():
            await runner.aclose()

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        scope = variant_scope.get()
        variant = self.choose(scope.key if scope is not None else None)
        if variant is not None and scope is not None:
            scope.ran[self.node] = variant
        outputs = await self.arms[variant].run(inputs, deadline=deadline)
        if self.shadow is not None:
            self._mirror(inputs, outputs)
        return outputs

    # -- the shadow ---------------------------------------------------------------------

    def _mirror(self, inputs: Batch, served: Batch) -> None:
        """Start a copy of this request's node on the shadow, unless too many run."""
        shadow = self.shadow
        assert shadow is not None
        if len(self._shadow_tasks) >= self.max_shadow_inflight:
            if self.metrics is not None:
                self.metrics.variant_shadow_dropped.inc(self.pipeline, self.node, shadow)
            return
        # Copies: a plugin in the front process may write into its inputs, and the served
        # outputs go on to the nodes downstream while the shadow runs.
        inputs = {name: np.array(value, copy=True) for name, value in inputs.items()}
        served = {name: np.array(value, copy=True) for name, value in served.items()}
        task = asyncio.get_running_loop().create_task(
            self._shadow(shadow, inputs, served),
            name=f"dagserve-shadow-{self.pipeline}-{variant_label(self.node, shadow)}",
        )
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(self, shadow: str, inputs: Batch, served: Batch) -> None:
        metrics = self.metrics
        labels = (self.pipeline, self.node, shadow)
        started = time.perf_counter()
        deadline = asyncio.get_running_loop().time() + SHADOW_TIMEOUT_S
        try:
            async with asyncio.timeout_at(deadline):
                produced = await self.arms[shadow].run(inputs, deadline=deadline)
        except Exception as exc:  # anything the shadow does is only counted
            logger.debug("shadow %s of %s failed: %s", shadow, self.node, exc)
            if metrics is not None:
                metrics.variant_shadow_requests.inc(*labels)
                metrics.variant_shadow_seconds.observe(time.perf_counter() - started, *labels)
                metrics.variant_shadow_mismatches.inc(*labels)
                label = variant_label(self.node, shadow)
                metrics.node_errors.inc(self.pipeline, label, error_type(exc))
            return
        if metrics is None:
            return
        metrics.variant_shadow_requests.inc(*labels)
        metrics.variant_shadow_seconds.observe(time.perf_counter() - started, *labels)
        difference, same = compare_outputs(served, produced)
        if not same:
            metrics.variant_shadow_mismatches.inc(*labels)
        if difference > metrics.variant_shadow_max_abs_difference.get(*labels):
            metrics.variant_shadow_max_abs_difference.set(difference, *labels)

    def shadow_inflight(self) -> int:
        """Mirrored copies running now."""
        return len(self._shadow_tasks)


def with_variants(
    pipeline: Pipeline, runners: Mapping[str, ArmRunner | VariantRunner], metrics: Metrics | None
) -> dict[str, ArmRunner | VariantRunner]:
    """The runners of ``pipeline``'s nodes, from those of its arms (keyed by label): each
    node with variants gets a :class:`VariantRunner` over its arms' runners."""
    served: dict[str, ArmRunner | VariantRunner] = {}
    for name, node in pipeline.spec.nodes.items():
        if not node.variants:
            served[name] = runners[name]
            continue
        arms: dict[str | None, ArmRunner] = {}
        for variant in (None, *node.variants):
            arm = runners[variant_label(name, variant)]
            assert not isinstance(arm, VariantRunner), "an arm is a node's own runner"
            arms[variant] = arm
        shadow = next((v for v, spec in node.variants.items() if spec.shadow), None)
        weights = {v: spec.weight for v, spec in node.variants.items() if not spec.shadow}
        served[name] = VariantRunner(
            pipeline.name, name, arms, weights, shadow=shadow, metrics=metrics
        )
    return served


def set_variant_weights(
    runners: Mapping[str, object], node: str, weights: Mapping[str, float]
) -> dict[str, float]:
    """Change the weights of ``node``'s variants in a served pipeline's ``runners``; return
    them all (see :meth:`VariantRunner.set_weights`).

    Raises:
        ValueError: no such node, a node without variants, or weights it refuses.
    """
    runner = runners.get(node)
    if runner is None:
        msg = f"no node {node!r} (nodes: {', '.join(runners)})"
        raise ValueError(msg)
    if not isinstance(runner, VariantRunner):
        some = ", ".join(n for n, r in runners.items() if isinstance(r, VariantRunner)) or "none"
        msg = f"node {node!r} has no variants (nodes with variants: {some})"
        raise ValueError(msg)
    runner.set_weights(weights)
    return dict(runner.weights)


__all__ = [
    "MAX_SHADOW_INFLIGHT",
    "SHADOW_TIMEOUT_S",
    "Arm",
    "VariantRunner",
    "node_arms",
    "set_variant_weights",
    "sticky_point",
    "with_variants",
]
