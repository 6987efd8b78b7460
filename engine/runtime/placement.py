"""Model placement: which device each model node runs on, packed by GPU memory AND compute share.

:func:`place` takes plain :class:`PlacementRequest` values (the engine builds them from the
pipelines' nodes) and a :class:`~engine.runtime.devices.DeviceInventory`, and returns a
:class:`Placement`, or raises :class:`PlacementError` listing every node that does not fit.

Rules
-----
* ``device: cpu`` runs on the CPU, which is not budgeted.
* ``device: cuda:N`` runs on exactly that card if its memory and share have room, else it is
  refused.  It must give ``gpu_memory_mb``; ``0`` opts out of memory accounting on purpose.
* ``device: auto`` runs on a GPU when the inventory has one, the node gives ``gpu_memory_mb``
  and its framework can use a GPU (not None, not ``numpy``); otherwise on the CPU.  An ``auto``
  node that asked for GPU memory but fits no card is refused, not sent to the CPU: a silent
  fallback would make it tens of times slower without anyone having chosen that.
* A card takes a model only if its memory left >= ``gpu_memory_mb`` and its share left >=
  ``gpu_share``, and its share is not already spoken for (left > 0): once the shares on a card
  reach 1.0, it takes no more models even if its memory has room.
* The memory a card can commit is its total, minus what is in use at startup (NVML's used
  memory: other processes, the CUDA context of a previous server), minus ``reserve_mb``.
* The same ``model_id`` requested by several nodes (pipelines sharing a model) is placed once;
  its budget is the largest of what those nodes ask.

Defaults
--------
``gpu_share`` omitted counts as 0: no compute is reserved, and models on one card share it by
time-slicing, which is what Triton does with every GPU instance and what CUDA does anyway.
Reserving compute is opt-in, as Ray's fractional ``num_gpus`` is; ``gpu_share: 1.0`` gives a
model a card of its own.  ``gpu_memory_mb`` has no default because memory is the resource whose
over-commit crashes (a CUDA out-of-memory error hits every model on the card, not only the
newcomer): placement cannot keep its promise for a model of unknown size, so ``auto`` without it
stays on the CPU and ``cuda:N`` without it is refused with a message that says what to add.

Packing
-------
Best fit decreasing, deterministic: nodes pinned to a card are placed first; then ``auto`` nodes,
largest ``gpu_memory_mb`` first (then largest share, then ``model_id``), each on the card that
leaves the least memory after it (then the least share, then the lowest index).  Packing the
tightest card first keeps the large holes for the large models; with every request known up
front, decreasing best fit is the classic bin-packing heuristic, and the same requests on the
same inventory always give the same placement.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.runtime.devices import DeviceInventory, GpuInfo
from model_plugins.errors import DagserveError

if TYPE_CHECKING:
    from engine.runtime.ray_placement import ActorRequest

#: tolerance on summed shares, so that 0.1 + 0.2 + 0.7 still fits a card
_EPS = 1e-9

#: frameworks that cannot use a GPU: their ``auto`` nodes run on the CPU
CPU_FRAMEWORKS: frozenset[str | None] = frozenset({None, "numpy"})

#: ``cuda:<index>``, the only GPU device string a node may give
_CUDA = re.compile(r"cuda:(\d+)")


class PlacementError(DagserveError):
    """Some model nodes do not fit on the devices; the message lists every one of them.

    Each problem names the node(s) and pipeline, what they asked for, and what every GPU had
    left when it was tried, e.g. ``pipeline 'p' node 'big': needs 30000 MB and share 0.5 on
    auto; left: cuda:0 12000 MB share 0.25, cuda:1 8000 MB share 1``.

    Args:
        problems: one line per node (or shared model) that cannot be placed.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"cannot place a model: {self.problems[0]}"
        else:
            lines = "".join(f"\n  - {problem}" for problem in self.problems)
            message = f"cannot place {len(self.problems)} models:{lines}"
        super().__init__(message)


@dataclass(frozen=True)
class PlacementRequest:
    """What one model node asks for (plain data, built from a pipeline's node).

    Raises:
        ValueError: ``device`` is not ``auto``, ``cpu`` or ``cuda:N``, ``gpu_memory_mb`` is
            negative, or ``gpu_share`` is outside (0, 1].
    """

    model_id: str
    """Identity of the model: nodes with the same id share one loaded model."""
    pipeline: str
    """Name of the pipeline the node belongs to, for messages."""
    node: str
    """Name of the node in its pipeline, for messages."""
    device: str = "auto"
    """``auto``, ``cpu`` or ``cuda:N``."""
    gpu_memory_mb: int | None = None
    """GPU memory the model needs, in MiB; None: unknown (see the module's defaults)."""
    gpu_share: float | None = None
    """Fraction of a card's compute reserved for the model, in (0, 1]; None counts as 0."""
    framework: str | None = None
    """Framework of the plugin (``torchscript``, ``onnx``, ``numpy``); None for plain Python."""
    ray_resources: tuple[tuple[str, float], ...] = ()
    """Custom Ray resources of the node (sorted), for ``engine.runtime.ray_placement``; local
    placement ignores them."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu") and not _CUDA.fullmatch(self.device):
            msg = f"device must be 'auto', 'cpu' or 'cuda:N' (got {self.device!r})"
            raise ValueError(msg)
        if self.gpu_memory_mb is not None and self.gpu_memory_mb < 0:
            msg = f"gpu_memory_mb must be >= 0 (got {self.gpu_memory_mb})"
            raise ValueError(msg)
        if self.gpu_share is not None and not 0 < self.gpu_share <= 1:
            msg = f"gpu_share must be in (0, 1] (got {self.gpu_share})"
            raise ValueError(msg)


@dataclass(frozen=True)
class Assignment:
    """Where one model runs, and what it commits there."""

    model_id: str
    """The model."""
    device: str
    """``cpu`` or ``cuda:N``."""
    memory_mb: int
    """GPU memory committed (0 on the CPU)."""
    share: float
    """Compute share committed (0 on the CPU)."""
    nodes: tuple[tuple[str, str], ...]
    """Every ``(pipeline, node)`` that uses this model."""


@dataclass(frozen=True)
class DeviceBudget:
    """What one device has committed and what it has left."""

    device: str
    """``cpu`` or ``cuda:N``."""
    name: str
    """Product name of the card, ``cpu`` for the CPU."""
    models: tuple[str, ...]
    """Model ids placed here, sorted."""
    memory_capacity_mb: int | None = None
    """Memory placement may commit (total - used at startup - reserve); None on the CPU."""
    memory_committed_mb: int = 0
    """Memory committed to the models placed here."""
    share_committed: float = 0.0
    """Compute share committed to the models placed here (at most 1)."""

    @property
    def memory_left_mb(self) -> int | None:
        """Memory still committable; None on the CPU (not budgeted)."""
        if self.memory_capacity_mb is None:
            return None
        return self.memory_capacity_mb - self.memory_committed_mb

    @property
    def share_left(self) -> float:
        """Compute share still free (0 once spoken for)."""
        return max(0.0, 1.0 - self.share_committed)


@dataclass(frozen=True)
class Placement:
    """The outcome of :func:`place`: a device per model, and the budgets of every device."""

    assignments: tuple[Assignment, ...]
    """One per model, sorted by ``model_id``."""
    budgets: Mapping[str, DeviceBudget]
    """Per device: the cards by index, then ``cpu``; empty cards included."""
    models: Mapping[str, str] = field(init=False)
    """``model_id`` -> device."""
    nodes: Mapping[tuple[str, str], str] = field(init=False)
    """``(pipeline, node)`` -> device."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", {a.model_id: a.device for a in self.assignments})
        object.__setattr__(
            self,
            "nodes",
            {node: a.device for a in self.assignments for node in a.nodes},
        )

    def device_of(self, model_id: str) -> str:
        """The device of a model.

        Raises:
            KeyError: the model was not placed.
        """
        return self.models[model_id]

    def actor_of(self, model_id: str) -> ActorRequest | None:
        """The Ray actor that hosts a model; None: a local worker (see ``RayPlacement``)."""
        return None

    def log_lines(self) -> list[str]:
        """Lines for the startup log: one per device, then one per model placed there."""
        lines: list[str] = []
        for budget in self.budgets.values():
            if budget.memory_capacity_mb is None:
                lines.append(f"{budget.device}: {_count(budget.models)}")
            else:
                lines.append(
                    f"{budget.device} ({budget.name}): {_count(budget.models)}, "
                    f"memory {budget.memory_committed_mb}/{budget.memory_capacity_mb} MB, "
                    f"share {budget.share_committed:.2f}/1.00"
                )
            for assignment in self.assignments:
                if assignment.device == budget.device:
                    lines.append(f"  {assignment.model_id} ({_nodes(assignment.nodes)})")
        return lines

    def details(self) -> dict[str, str]:
        """Entries for the ``details`` of the ``health`` RPC, one per device.

        e.g. ``{"placement.cuda:0": "models=3 memory=9000/16000MB share=0.75/1.00"}``.
        """
        details: dict[str, str] = {}
        for budget in self.budgets.values():
            text = f"models={len(budget.models)}"
            if budget.memory_capacity_mb is not None:
                text += (
                    f" memory={budget.memory_committed_mb}/{budget.memory_capacity_mb}MB"
                    f" share={budget.share_committed:.2f}/1.00"
                )
            details[f"placement.{budget.device}"] = text
        return details


def place(
    requests: Iterable[PlacementRequest],
    inventory: DeviceInventory,
    *,
    reserve_mb: int = 0,
) -> Placement:
    """Decide the device of every model, without over-committing any card's memory or share.

    The rules, defaults and packing order are those of this module's docstring.

    Args:
        requests: one per model node; nodes sharing a ``model_id`` are placed once.
        inventory: the devices, read at startup (before any model is loaded).
        reserve_mb: memory kept free on each card (CUDA context, allocator slack).

    Returns:
        The placement.

    Raises:
        PlacementError: one or more models do not fit; the message lists them all.
        ValueError: ``reserve_mb`` is negative.
    """
    if reserve_mb < 0:
        msg = f"reserve_mb must be >= 0 (got {reserve_mb})"
        raise ValueError(msg)
    cards = {gpu.index: _Card(gpu, reserve_mb) for gpu in inventory.gpus}
    problems: list[str] = []
    models = _merge(requests, problems)

    pinned: list[_Model] = []
    auto: list[_Model] = []
    assignments: list[Assignment] = []
    for model in models:
        if model.device == "cpu" or (
            model.device == "auto"
            and (not cards or model.memory_mb is None or model.framework in CPU_FRAMEWORKS)
        ):
            assignments.append(model.assign("cpu"))
        elif model.device == "auto":
            auto.append(model)
        else:
            pinned.append(model)

    for model in sorted(pinned, key=lambda m: (_index(m.device), m.model_id)):
        card = cards.get(_index(model.device))
        if card is None:
            problems.append(_absent(model, inventory))
        elif model.memory_mb is None:
            problems.append(
                f"{model.who()}: asks for {model.device} without gpu_memory_mb; give the GPU "
                "memory the model needs (0 to leave it out of the memory budget)"
            )
        elif card.fits(model):
            assignments.append(card.take(model))
        else:
            problems.append(f"{model.who()}: {model.needs()}; left: {_left(cards)}")

    # best fit decreasing: largest first, each on the tightest card that still takes it
    for model in sorted(auto, key=lambda m: (-(m.memory_mb or 0), -m.share, m.model_id)):
        fitting = [card for card in cards.values() if card.fits(model)]
        if not fitting:
            problems.append(f"{model.who()}: {model.needs()}; left: {_left(cards)}")
            continue
        best = min(fitting, key=lambda card: card.slack_after(model))
        assignments.append(best.take(model))

    if problems:
        raise PlacementError(problems)
    cpu_models = tuple(sorted(a.model_id for a in assignments if a.device == "cpu"))
    budgets = {card.gpu.device: card.budget() for card in cards.values()}
    budgets["cpu"] = DeviceBudget(device="cpu", name="cpu", models=cpu_models)
    return Placement(
        assignments=tuple(sorted(assignments, key=lambda a: a.model_id)), budgets=budgets
    )


# -- internals --------------------------------------------------------------------------------


@dataclass
class _Model:
    """One model to place: the merged requests of every node that uses it."""

    model_id: str
    nodes: list[tuple[str, str]]
    device: str
    memory_mb: int | None
    share: float
    framework: str | None

    def who(self) -> str:
        return _nodes(tuple(self.nodes)) + (
            f" (model '{self.model_id}')" if len(self.nodes) > 1 else ""
        )

    def needs(self) -> str:
        memory = "unknown memory" if self.memory_mb is None else f"{self.memory_mb} MB"
        return f"needs {memory} and share {_share(self.share)} on {self.device}"

    def assign(self, device: str, *, budgeted: bool = False) -> Assignment:
        return Assignment(
            model_id=self.model_id,
            device=device,
            memory_mb=(self.memory_mb or 0) if budgeted else 0,
            share=self.share if budgeted else 0.0,
            nodes=tuple(self.nodes),
        )


class _Card:
    """A GPU's budgets while packing."""

    def __init__(self, gpu: GpuInfo, reserve_mb: int) -> None:
        self.gpu = gpu
        self.capacity_mb = max(0, gpu.memory_total_mb - gpu.memory_used_mb - reserve_mb)
        self.memory_mb = 0
        self.share = 0.0
        self.models: list[str] = []

    @property
    def memory_left_mb(self) -> int:
        return self.capacity_mb - self.memory_mb

    @property
    def share_left(self) -> float:
        return max(0.0, 1.0 - self.share)

    def fits(self, model: _Model) -> bool:
        memory = model.memory_mb or 0
        return (
            memory <= self.memory_left_mb
            and model.share <= self.share_left + _EPS
            and self.share_left > _EPS  # compute spoken for: no more models, even share-0 ones
        )

    def slack_after(self, model: _Model) -> tuple[int, float, int]:
        return (
            self.memory_left_mb - (model.memory_mb or 0),
            self.share_left - model.share,
            self.gpu.index,
        )

    def take(self, model: _Model) -> Assignment:
        self.memory_mb += model.memory_mb or 0
        self.share += model.share
        self.models.append(model.model_id)
        return model.assign(self.gpu.device, budgeted=True)

    def budget(self) -> DeviceBudget:
        return DeviceBudget(
            device=self.gpu.device,
            name=self.gpu.name,
            models=tuple(sorted(self.models)),
            memory_capacity_mb=self.capacity_mb,
            memory_committed_mb=self.memory_mb,
            share_committed=min(1.0, self.share),
        )

    def left(self) -> str:
        return f"{self.gpu.device} {self.memory_left_mb} MB share {_share(self.share_left)}"


def _merge(requests: Iterable[PlacementRequest], problems: list[str]) -> list[_Model]:
    """One :class:`_Model` per model id; a model pinned to two different devices is a problem."""
    grouped: dict[str, list[PlacementRequest]] = {}
    for request in sorted(requests, key=lambda r: (r.model_id, r.pipeline, r.node)):
        grouped.setdefault(request.model_id, []).append(request)
    models: list[_Model] = []
    for model_id, group in grouped.items():
        nodes = [(r.pipeline, r.node) for r in group]
        pinned = sorted({r.device for r in group if r.device != "auto"})
        if len(pinned) > 1:
            asked = ", ".join(f"{_nodes(((r.pipeline, r.node),))} on {r.device}" for r in group)
            problems.append(
                f"model '{model_id}' is shared but asked for on different devices: {asked}"
            )
            continue
        memories = [r.gpu_memory_mb for r in group if r.gpu_memory_mb is not None]
        shares = [r.gpu_share for r in group if r.gpu_share is not None]
        models.append(
            _Model(
                model_id=model_id,
                nodes=nodes,
                device=pinned[0] if pinned else "auto",
                memory_mb=max(memories) if memories else None,
                share=max(shares) if shares else 0.0,
                framework=next((r.framework for r in group if r.framework is not None), None),
            )
        )
    return models


def _absent(model: _Model, inventory: DeviceInventory) -> str:
    if not inventory.has_gpu:
        return f"{model.who()}: asks for {model.device}, but there is no GPU ({inventory.source})"
    have = ", ".join(gpu.device for gpu in inventory.gpus)
    return f"{model.who()}: asks for {model.device}, which is not in the inventory (GPUs: {have})"


def _left(cards: Mapping[int, _Card]) -> str:
    return ", ".join(card.left() for card in cards.values()) or "no GPU"


def _index(device: str) -> int:
    return int(device.partition(":")[2])


def _nodes(nodes: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"pipeline '{pipeline}' node '{node}'" for pipeline, node in nodes)


def _share(share: float) -> str:
    return f"{round(share, 6):g}"


def _count(models: Sequence[str]) -> str:
    return f"{len(models)} model" + ("" if len(models) == 1 else "s")
