"""Warm-up: requests a pipeline version runs before it takes traffic (``warmup:`` in YAML).

A model's first calls are slow (lazy initialisation, kernel selection, allocator growth,
a JIT); warm-up pays them before a real request could.  A pipeline's ``warmup:`` runs its
samples through the whole pipeline, every node, and every variant of a node with variants
(each variant is a model of its own); a node's ``warmup:`` runs its samples through that node
alone (and each of its variants).  Samples are ``{samples: N}``, generated from the declared
input specs, or ``{file: x.npz}``, one array per input, relative to the pipeline file.  Each
sample is a request of one item.

A warm-up request that fails stops the version from serving: :func:`warm_up` raises a
``PluginLoadError`` naming the node (``node@variant`` for a variant) and the cause.
Warm-up requests are not counted in the request and node metrics (their batches are, in the
model's batcher metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dag.executor import execute
from dag.pipeline import Pipeline
from dag.schema import WarmupSpec, variant_label
from engine.runtime.assembly import NodeRunner, ServedPipeline
from engine.runtime.variants import ArmRunner, VariantRunner
from model_plugins.contract import check_inputs
from model_plugins.errors import DagserveError, PluginLoadError
from model_plugins.plugin import Batch
from model_plugins.specs import NUMPY_DTYPES, TensorSpec

logger = logging.getLogger(__name__)

#: one warm-up request may take this long (a first call may compile or tune kernels)
WARMUP_TIMEOUT_S = 300.0

#: what generated samples of the object dtypes hold
_GENERATED = {"string": "warmup", "bytes": b"warmup"}


@dataclass(frozen=True)
class WarmupReport:
    """What :func:`warm_up` ran: requests through the whole pipeline, and through single
    nodes (one count per arm: a node with two variants run on 4 samples counts 12)."""

    pipeline_requests: int
    node_requests: int
    seconds: float


async def warm_up(served: ServedPipeline, *, timeout_s: float = WARMUP_TIMEOUT_S) -> WarmupReport:
    """Run the ``warmup:`` samples of ``served``'s pipeline and nodes; log how long it took.

    Call it once the version's models have loaded, before it takes traffic.  A pipeline
    that declares no warm-up runs nothing.

    Args:
        served: the pipeline version, its runners started.
        timeout_s: the time each warm-up request may take.

    Raises:
        PluginLoadError: a warm-up file cannot be read or does not fit the specs, or a
            warm-up request failed; the message names the pipeline, the node and the cause.
    """
    pipeline = served.pipeline
    base = pipeline.path.parent if pipeline.path is not None else Path.cwd()
    started = time.perf_counter()
    loop = asyncio.get_running_loop()
    whole = 0
    if pipeline.spec.warmup is not None:
        samples = _samples(pipeline.spec.warmup, pipeline.input_specs, base, _what(served))
        failed: list[str] = []
        runners = {name: _EveryArm(name, runner, failed) for name, runner in served.runners.items()}
        for index, sample in enumerate(samples):
            try:
                pipeline.check_request(sample)
                await execute(pipeline.plan, sample, runners, deadline=loop.time() + timeout_s)
            except Exception as exc:
                where = failed[0] if failed else getattr(exc, "node", None)
                raise _failed(served, where, index, len(samples), exc) from exc
            whole += 1
    single = 0
    for name, runner in served.runners.items():
        node = pipeline.spec.nodes[name]
        specs = pipeline.node_signatures[name][0]
        wired = {local: specs[local] for local in node.inputs if local in specs}
        for variant, arm in _arms(runner).items():
            warmup = (node if variant is None else node.variant(variant)).warmup
            if warmup is None:
                continue
            label = variant_label(name, variant)
            what = f"{_what(served)}: node {label!r}"
            samples = _samples(warmup, wired, base, what)
            for index, sample in enumerate(samples):
                try:
                    check_inputs(specs, sample, where=f"node {label!r}")
                    await arm.run(sample, deadline=loop.time() + timeout_s)
                except Exception as exc:
                    raise _failed(served, label, index, len(samples), exc) from exc
                single += 1
    seconds = time.perf_counter() - started
    if whole or single:
        logger.info(
            "%s: warmed up in %.1f ms (%d requests through the pipeline, %d through nodes)",
            _what(served), seconds * 1000, whole, single,
        )  # fmt: skip
    return WarmupReport(whole, single, seconds)


def declares_warmup(pipeline: Pipeline) -> bool:
    """Whether :func:`warm_up` runs anything for ``pipeline``: the pipeline, a node or a
    node's variant (which takes its node's unless it sets its own) declares ``warmup:``."""
    return pipeline.spec.warmup is not None or any(
        spec.warmup is not None
        for node in pipeline.spec.nodes.values()
        for spec in [node, *(node.variant(name) for name in node.variants)]
    )


class _EveryArm:
    """A node's runner during a pipeline's warm-up: every arm of a node with variants runs
    (the node's answer goes on), and the label of an arm that fails is noted."""

    def __init__(self, node: str, runner: NodeRunner, failed: list[str]) -> None:
        self.node = node
        self.arms = _arms(runner)
        self.failed = failed

    async def run(self, inputs: Batch, *, deadline: float | None) -> Batch:
        answer: Batch = {}
        for variant, arm in self.arms.items():
            try:
                outputs = await arm.run(dict(inputs), deadline=deadline)
            except Exception:
                self.failed.append(variant_label(self.node, variant))
                raise
            if variant is None:
                answer = outputs
        return answer


def _arms(runner: NodeRunner) -> dict[str | None, ArmRunner]:
    if isinstance(runner, VariantRunner):
        return runner.arms
    return {None: runner}


def _samples(
    warmup: WarmupSpec, specs: Mapping[str, TensorSpec], base: Path, what: str
) -> list[Batch]:
    """The warm-up requests, one item each."""
    if warmup.samples is not None:
        return [{n: _generated(spec) for n, spec in specs.items()} for _ in range(warmup.samples)]
    assert warmup.file is not None
    return _from_file(base / warmup.file, specs, what)


def _generated(spec: TensorSpec) -> np.ndarray:
    """One item of ones (True, ``"warmup"``, ``b"warmup"``); -1 dimensions of size 1."""
    shape = (1, *(1 if d == -1 else d for d in spec.shape))
    if spec.dtype in _GENERATED:
        return np.full(shape, _GENERATED[spec.dtype], dtype=object)
    return np.ones(shape, dtype=NUMPY_DTYPES[spec.dtype])


def _from_file(path: Path, specs: Mapping[str, TensorSpec], what: str) -> list[Batch]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:  # missing, not an npz, object arrays (pickles)
        msg = f"{what}: warm-up file {str(path)!r} cannot be read: {exc}"
        raise PluginLoadError(msg) from exc
    unknown = sorted(arrays.keys() - specs.keys())
    missing = sorted(n for n, s in specs.items() if not s.optional and n not in arrays)
    counts = {len(a) if a.ndim else 0 for a in arrays.values()}
    problem = None
    if unknown:
        problem = f"arrays {unknown} are not inputs (inputs: {', '.join(specs)})"
    elif missing:
        problem = f"inputs {missing} have no array"
    elif len(counts) != 1 or 0 in counts:
        problem = "its arrays must have the same number of samples (first dimension), at least 1"
    if problem is not None:
        msg = f"{what}: warm-up file {str(path)!r}: {problem}"
        raise PluginLoadError(msg)
    converted = {name: _as_input(array, specs[name]) for name, array in arrays.items()}
    (count,) = counts
    return [{name: a[i : i + 1] for name, a in converted.items()} for i in range(count)]


def _as_input(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """An array of the file as requests carry it: text as objects, numbers in the spec's
    dtype where nothing changes kind (an npz written from float64 lists warms float32)."""
    if array.dtype.kind in "US":
        return array.astype(object)
    target = NUMPY_DTYPES.get(spec.dtype)
    if target is not None and np.can_cast(array.dtype, target, casting="same_kind"):
        return array.astype(target)
    return array


def _what(served: ServedPipeline) -> str:
    return f"pipeline {served.pipeline.name!r} version {served.pipeline.version!r}"


def _failed(
    served: ServedPipeline, node: str | None, index: int, count: int, exc: Exception
) -> PluginLoadError:
    cause = exc.message if isinstance(exc, DagserveError) else f"{type(exc).__name__}: {exc}"
    at = f" at node {node!r}" if node else ""
    msg = f"{_what(served)}: warm-up request {index + 1} of {count} failed{at}: {cause}"
    return PluginLoadError(msg)


__all__ = ["WARMUP_TIMEOUT_S", "WarmupReport", "declares_warmup", "warm_up"]
