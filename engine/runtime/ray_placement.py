"""Placement on a Ray cluster: which models share an actor, and what each actor asks Ray for.

With ``ray:`` in the server config the cluster's GPUs are not this machine's, so the local
placement (NVML cards, memory budgets, :mod:`engine.runtime.placement`) is not used: Ray places
each actor on a node that has what it asks for.  This module only groups models into actors:

* A model runs on a GPU when it asks for ``cuda:N`` (the index means nothing on a cluster and
  is ignored), or for ``auto`` with ``gpu_memory_mb`` and a framework that can use one (the
  same rule as locally); otherwise on the CPU.
* Models share an actor when their framework, device kind (CPU or GPU) and ``ray_resources``
  are equal and, on a GPU, their summed ``gpu_share`` fits one GPU (first fit, largest share
  first, then model id: deterministic).  Otherwise they get actors of their own.
* An actor asks for ``num_cpus`` (``ray.num_cpus``), ``num_gpus`` = the summed ``gpu_share``
  of its models (a GPU model without ``gpu_share`` counts as a whole GPU: Ray gives a GPU only
  to an actor that asks for a share of one), ``memory`` = their summed ``gpu_memory_mb`` (Ray
  2.60 has no GPU-memory resource: its logical ``memory`` is the nearest request, so that a
  node without that much left is not chosen; it does not bound the card's memory), and the
  models' ``ray_resources`` (equal within an actor).

Each actor is a :class:`ActorRequest`, carried by the :class:`~engine.runtime.workers.pool.
WorkerKey` of its models, from which the Ray backend builds the actor's options.  Nothing here
imports Ray.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.runtime.devices import DeviceInventory
from engine.runtime.placement import (
    CPU_FRAMEWORKS,
    Assignment,
    DeviceBudget,
    Placement,
    PlacementError,
    PlacementRequest,
)

#: tolerance on summed shares, so that 0.1 + 0.2 + 0.7 still fits a GPU
_EPS = 1e-9
#: the device a Ray actor's plugins are given: Ray sets CUDA_VISIBLE_DEVICES to its GPU
RAY_GPU = "cuda:0"

#: custom Ray resources of a node, as a sorted tuple (hashable, comparable)
Resources = tuple[tuple[str, float], ...]


class RayInventory(DeviceInventory):
    """The engine's inventory with ``ray:``: no GPU of this machine is placed on (the cluster's
    are Ray's to place), and plans go through :func:`place_on_ray`.

    Args:
        num_cpus: CPUs each actor asks for.
    """

    def __init__(self, num_cpus: float = 1.0) -> None:
        super().__init__((), source="a Ray cluster")
        self.num_cpus = num_cpus


@dataclass(frozen=True, order=True)
class ActorRequest:
    """What one worker actor asks Ray for."""

    index: int
    """Which actor of the server (names it: ``torch@cuda:0#ray1``)."""
    num_gpus: float = 0.0
    """The summed ``gpu_share`` of its models (0 on the CPU)."""
    memory_mb: int = 0
    """The summed ``gpu_memory_mb`` of its models, asked as Ray's logical ``memory``."""
    resources: Resources = ()
    """The custom resources its models name (``ray_resources``)."""
    num_cpus: float = 1.0
    """CPUs of the actor (``ray.num_cpus``)."""

    def options(self) -> dict[str, object]:
        """The resource options of ``ActorClass.options``."""
        options: dict[str, object] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb:
            options["memory"] = self.memory_mb * 1024 * 1024
        if self.resources:
            options["resources"] = dict(self.resources)
        return options

    def describe(self) -> str:
        """``num_cpus=1 num_gpus=0.5 memory=2000MB zone_b=1``, for logs and errors."""
        text = f"num_cpus={self.num_cpus:g} num_gpus={self.num_gpus:g}"
        if self.memory_mb:
            text += f" memory={self.memory_mb}MB"
        return text + "".join(f" {name}={amount:g}" for name, amount in self.resources)


@dataclass(frozen=True)
class RayPlacement(Placement):
    """A placement whose models run in Ray actors: :meth:`actor_of` gives each one's request."""

    actors: Mapping[str, ActorRequest] = field(default_factory=dict)
    """``model_id`` -> the actor that hosts it."""

    def actor_of(self, model_id: str) -> ActorRequest | None:
        return self.actors.get(model_id)

    def log_lines(self) -> list[str]:
        lines: list[str] = []
        for request in sorted(set(self.actors.values())):
            models = sorted(m for m, a in self.actors.items() if a == request)
            lines.append(f"Ray actor #ray{request.index} ({request.describe()}): {models}")
        return lines

    def details(self) -> dict[str, str]:
        return {
            f"placement.ray{request.index}": request.describe()
            for request in sorted(set(self.actors.values()))
        }


def place_on_ray(
    requests: Iterable[PlacementRequest],
    *,
    num_cpus: float = 1.0,
    current: Placement | None = None,
    keep: Iterable[str] = (),
) -> RayPlacement:
    """Group the models of ``requests`` into actors (the module's rules).

    Args:
        num_cpus: CPUs each actor asks for.
        current, keep: the placement serving and the ids of its models that stay loaded:
            they keep their actors; new models get new actors (an actor's request cannot grow).

    Raises:
        PlacementError: a node's ``ray_resources`` differ from another node's of the same model.
    """
    kept = set(keep)
    actors: dict[str, ActorRequest] = {}
    assignments: dict[str, Assignment] = {}
    if isinstance(current, RayPlacement):
        for a in current.assignments:
            if a.model_id in kept and a.model_id in current.actors:
                actors[a.model_id] = current.actors[a.model_id]
                assignments[a.model_id] = a
    # past every actor of ``current``, kept or not: one that is leaving (a reload places the
    # new version beside the old) still runs, and two actors must not share a name
    serving = current.actors.values() if isinstance(current, RayPlacement) else ()
    next_index = max((a.index + 1 for a in serving), default=0)

    problems: list[str] = []
    merged = _merge([r for r in requests if r.model_id not in actors], problems)
    if problems:
        raise PlacementError(problems)
    groups: dict[tuple[str | None, bool, Resources], list[list[_RayModel]]] = {}
    order = sorted(merged.values(), key=lambda m: (-m.share, m.model_id))
    for model in order:
        bins = groups.setdefault((model.framework, model.gpu, model.resources), [])
        for members in bins:
            if not model.gpu or sum(m.share for m in members) + model.share <= 1 + _EPS:
                members.append(model)
                break
        else:
            bins.append([model])
    for _, bins in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        for members in bins:
            gpu = members[0].gpu
            request = ActorRequest(
                index=next_index,
                num_gpus=round(sum(m.share for m in members), 6) if gpu else 0.0,
                memory_mb=sum(m.memory_mb for m in members),
                resources=members[0].resources,
                num_cpus=num_cpus,
            )
            next_index += 1
            for model in members:
                actors[model.model_id] = request
                assignments[model.model_id] = Assignment(
                    model_id=model.model_id,
                    device=RAY_GPU if gpu else "cpu",
                    memory_mb=model.memory_mb,
                    share=model.share if gpu else 0.0,
                    nodes=tuple(model.nodes),
                )
    budgets = {"cpu": DeviceBudget(device="cpu", name="cpu", models=tuple(sorted(assignments)))}
    return RayPlacement(
        assignments=tuple(assignments[m] for m in sorted(assignments)),
        budgets=budgets,
        actors=actors,
    )


@dataclass
class _RayModel:
    model_id: str
    framework: str | None
    gpu: bool
    share: float
    memory_mb: int
    resources: Resources
    nodes: list[tuple[str, str]]


def _merge(requests: Sequence[PlacementRequest], problems: list[str]) -> dict[str, _RayModel]:
    """One entry per model id; its budget is the largest any of its nodes asks."""
    models: dict[str, _RayModel] = {}
    for r in requests:
        gpu = r.device.startswith("cuda:") or (
            r.device == "auto" and r.gpu_memory_mb is not None and r.framework not in CPU_FRAMEWORKS
        )
        share = (r.gpu_share or 1.0) if gpu else 0.0
        model = models.get(r.model_id)
        if model is None:
            models[r.model_id] = _RayModel(
                r.model_id, r.framework, gpu, share, (r.gpu_memory_mb or 0) if gpu else 0,
                r.ray_resources, [(r.pipeline, r.node)],
            )  # fmt: skip
            continue
        if model.resources != r.ray_resources:
            problems.append(
                f"pipeline {r.pipeline!r} node {r.node!r}: ray_resources {dict(r.ray_resources)} "
                f"differ from those of another node of model {r.model_id} "
                f"({dict(model.resources)})"
            )
        model.gpu = model.gpu or gpu
        model.share = max(model.share, share)
        model.memory_mb = max(model.memory_mb, (r.gpu_memory_mb or 0) if model.gpu else 0)
        model.nodes.append((r.pipeline, r.node))
    return models


__all__ = ["RAY_GPU", "ActorRequest", "RayInventory", "RayPlacement", "place_on_ray"]
