"""The pipeline YAML as strict, typed models.

Every model forbids unknown keys, so a typo (``max_batch_szie``) is an error with a line
number, not a silently ignored setting.  The models are declarative and pickle; resolving
plugins happens later (``dag.graph``).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from model_plugins.specs import DType, TensorSpec

#: names of pipelines, nodes and tensors: identifiers, dashes allowed in pipeline names
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
PIPELINE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

#: the prefix of a reference to a pipeline input
INPUTS_PREFIX = "$inputs"

#: joins a node and its variant where a variant is named (``image_embed@candidate``): in
#: metrics, per-node latencies, model ids and errors; never part of a node or variant name
VARIANT_SEPARATOR = "@"

#: the percent of a node's requests that its variants' weights share out
ALL_WEIGHT = 100.0

#: items that may wait for a model node before requests are Overloaded: ``max_queue``'s
#: default, and the bound of a node without ``batching:``
DEFAULT_MAX_QUEUE = 1024

_REF = re.compile(r"^(\$inputs|[A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_DEVICE = re.compile(r"^(auto|cpu|cuda:\d+)$")


def _check_device(value: str) -> str:
    if not _DEVICE.match(value):
        msg = f"must be auto, cpu or cuda:N (got {value!r})"
        raise ValueError(msg)
    return value


#: resources Ray asks for through options of their own (num_cpus, num_gpus, memory), or that
#: it keeps for itself: not custom resources
_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "memory", "object_store_memory"})


def _check_ray_resources(value: dict[str, float]) -> dict[str, float]:
    for name in value:
        if name in _RAY_BUILTIN_RESOURCES or name.startswith("node:"):
            msg = (
                f"{name!r} is not a custom Ray resource (CPUs, GPUs and memory follow from the "
                "node's device, gpu_share and gpu_memory_mb)"
            )
            raise ValueError(msg)
    return value


#: a registry model: models:/NAME/VERSION or models:/NAME@ALIAS, then a path inside it
_MODELS_URI = re.compile(r"^models:/[^/@]+(/\d+|@[A-Za-z0-9_\-]+)(/.+)?$")


def _check_model(value: str | None) -> str | None:
    """Syntax only: ``validate`` never asks the registry (engine.runtime.registry resolves)."""
    if value is not None and value.startswith("models:") and not _MODELS_URI.match(value):
        msg = f"must be models:/NAME/VERSION or models:/NAME@ALIAS[/path] (got {value!r})"
        raise ValueError(msg)
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class TensorDecl(_Strict):
    """A tensor declared in YAML: a pipeline input, or a node output an adapter cannot read."""

    dtype: DType
    """One of bool, uint8, int8, int16, int32, int64, float16, float32, float64, string, bytes."""
    shape: list[int] = Field(default_factory=list)
    """The shape of ONE item (the item dimension is implied); -1 = any size."""
    optional: bool = False
    """A pipeline input that a request may leave out; nodes that need it are then skipped."""
    allow_nan: bool = True
    """``false``: a request whose (floating-point) input holds a NaN is refused, naming it."""

    def to_spec(self) -> TensorSpec:
        return TensorSpec(self.dtype, self.shape, self.optional)


class BatchingConfig(_Strict):
    """Dynamic batching of a model node: the engine's batcher merges requests' items."""

    max_batch_size: int = Field(8, ge=1)
    """The most items one call of ``predict`` gets."""
    max_delay_ms: float = Field(0.0, ge=0)
    """How long the first waiting item may be held to grow a batch; 0 = never wait."""
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=1)
    """Items that may wait; past it requests are answered Overloaded."""
    max_queue_delay_ms: float | None = Field(None, gt=0)
    """Refuse (Overloaded) a request expected to wait longer than this, judged from the queue
    ahead of it and recent batch times: accepted requests keep their latency under overload."""
    preferred_batch_sizes: list[int] | None = None
    """Batches take the largest of these sizes that the waiting items fill, else all of them;
    absent = the batcher learns the size of the model's best throughput."""

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _check_preferred(cls, value: list[int] | None, info: ValidationInfo) -> list[int] | None:
        limit = info.data.get("max_batch_size")
        if value is not None and (
            not value or any(size < 1 or (limit and size > limit) for size in value)
        ):
            msg = f"must be sizes from 1 to max_batch_size {limit} (got {value})"
            raise ValueError(msg)
        return value

    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000.0


class WarmupSpec(_Strict):
    """Requests run before a version takes traffic, so the first real one meets no cold start.

    Exactly one of ``samples`` and ``file``.  Each sample is a request of one item.
    """

    samples: int | None = Field(None, ge=1, le=1000)
    """Generate this many requests from the declared input specs: ones of each dtype (True
    for bool, ``"warmup"`` for string, ``b"warmup"`` for bytes), -1 dimensions of size 1."""
    file: str | None = Field(None, min_length=1)
    """An ``.npz`` file, relative to the pipeline file: one array per input name, the first
    dimension the samples."""

    @model_validator(mode="after")
    def _one_source(self) -> WarmupSpec:
        if (self.samples is None) == (self.file is None):
            msg = "give exactly one of samples and file (got " + (
                "both)" if self.samples is not None else "neither)"
            )
            raise ValueError(msg)
        return self


class NodeSpec(_Strict):
    """One node of the DAG."""

    plugin: str = Field(min_length=1)
    """A built-in name (``identity``), a ``dagserve.plugins`` entry point, or ``module:Class``."""
    model: Annotated[str | None, AfterValidator(_check_model)] = None
    """The model file or folder, relative to the pipeline file; or ``models:/NAME/VERSION``,
    ``models:/NAME@ALIAS`` (an MLflow registry, a path inside the version may follow), or a
    URI (``s3://``, ``gs://``, ``https://``), downloaded once into the server's model cache."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Plugin input name -> reference: ``$inputs.NAME`` or ``NODE.OUTPUT``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Free parameters handed to the plugin's ``load`` (``LoadContext.params``)."""
    outputs: dict[str, TensorDecl] | None = None
    """Output specs, for plugins that cannot declare them themselves (framework adapters)."""
    join: Literal["all", "available"] = "all"
    """``all``: skip the node when a wired input is absent; ``available``: run on what is there."""
    device: Annotated[str, AfterValidator(_check_device)] = "auto"
    """``auto``, ``cpu`` or ``cuda:N``."""
    instances: int = Field(1, ge=1)
    """Concurrent executions of this node's model."""
    framework: Literal["torch", "tensorflow", "paddle", "numpy"] | None = None
    """Overrides the framework the plugin declares (which worker hosts it)."""
    runner: Literal["auto", "inline", "thread", "worker"] = "auto"
    """Where the node runs: ``worker`` in the worker process of its framework and device;
    ``inline`` in the front process's event loop (cheap ops); ``thread`` in the front
    process's thread pool.  ``auto``: built-in numpy nodes run in the front process (inline
    when cheap), every other plugin in a worker."""
    batching: BatchingConfig | None = None
    """Dynamic batching across requests; absent = one request's items per call."""
    gpu_memory_mb: int | None = Field(None, ge=1)
    """GPU memory the model needs; placement never over-commits a card's memory."""
    gpu_share: float | None = Field(None, gt=0, le=1)
    """The fraction of a GPU's compute the model needs; placement never over-commits it."""
    ray_resources: Annotated[
        dict[str, Annotated[float, Field(gt=0)]], AfterValidator(_check_ray_resources)
    ] = Field(default_factory=dict)
    """Custom Ray resources the worker actor of this model asks for (``{zone_b: 1}`` pins it to
    the nodes that have ``zone_b``); used only by a server with ``ray:`` in its config (a
    server without it logs a warning and ignores them)."""
    timeout_ms: float | None = Field(None, gt=0)
    """A per-node time limit, on top of the request's deadline."""
    warmup: WarmupSpec | None = None
    """Requests run through this node alone (each of its variants too) before the version
    takes traffic; generated ones come from the node's input specs."""
    variants: dict[str, VariantSpec] = Field(default_factory=dict)
    """Other versions of this node inside the pipeline, for canary (``weight``: percent of
    the node's requests) and shadow (``shadow: true``: mirrored, compared, never answers).
    Each overrides any key of the node but ``inputs`` and ``variants``; its specs must be
    the node's.  The node itself takes the weight the variants leave."""

    @field_validator("variants")
    @classmethod
    def _check_variants(cls, value: dict[str, VariantSpec]) -> dict[str, VariantSpec]:
        shadows = [name for name, variant in value.items() if variant.shadow]
        if len(shadows) > 1:
            msg = f"at most one variant may be shadow (got {', '.join(shadows)})"
            raise ValueError(msg)
        total = sum(variant.weight for variant in value.values())
        if total > ALL_WEIGHT:
            msg = f"the weights must add up to at most {ALL_WEIGHT:g} percent (got {total:g})"
            raise ValueError(msg)
        return value

    def variant(self, name: str) -> NodeSpec:
        """The node as its variant ``name`` runs it: the node's keys, the variant's over them."""
        variant = self.variants[name]
        overrides = {key: getattr(variant, key) for key in variant.overrides}
        return self.model_copy(update={**overrides, "variants": {}})


#: node keys a variant cannot override
_NOT_OVERRIDDEN = frozenset({"inputs", "variants"})


class VariantBase(_Strict):
    """One variant of a node: its share of the node's requests, or its role as the node's
    shadow; :data:`VariantSpec` adds the node keys it may override."""

    weight: float = Field(0.0, ge=0, le=ALL_WEIGHT)
    """The percent of the node's requests it answers (the node keeps what its variants leave)."""
    shadow: bool = False
    """It gets a copy of the node's inputs after the node answered, and never answers."""

    @model_validator(mode="before")
    @classmethod
    def _no_inputs(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in sorted(_NOT_OVERRIDDEN & data.keys()):
                msg = f"a variant overrides any node key but inputs and variants (got {key!r})"
                raise ValueError(msg)
        return data

    @model_validator(mode="after")
    def _shadow_has_no_weight(self) -> VariantBase:
        if self.shadow and self.weight:
            msg = f"a shadow variant never answers: its weight must be 0 (got {self.weight:g})"
            raise ValueError(msg)
        return self

    @property
    def overrides(self) -> list[str]:
        """The node keys this variant sets."""
        return [key for key in self.model_fields_set if key not in VariantBase.model_fields]


def _variant_spec() -> type[VariantBase]:
    """:class:`VariantBase` with every key of :class:`NodeSpec` but ``inputs`` and
    ``variants``, each optional (absent: the node's), made from NodeSpec's own fields (their
    constraints and validators included), so that a key added to a node can be overridden by a
    variant at once."""
    fields: dict[str, Any] = {}
    for name, info in NodeSpec.model_fields.items():
        if name in _NOT_OVERRIDDEN:
            continue
        copied = copy.copy(info)
        copied.default, copied.default_factory = None, None
        fields[name] = (info.annotation | None, copied)  # type: ignore[operator]
    model: type[VariantBase] = create_model(
        "VariantSpec", __base__=VariantBase, __module__=__name__, **fields
    )
    return model


if TYPE_CHECKING:  # the keys it overrides are read through NodeSpec.variant()
    VariantSpec = VariantBase
else:
    VariantSpec = _variant_spec()
NodeSpec.model_rebuild()


class PipelineSpec(_Strict):
    """A whole pipeline file."""

    name: str = Field(pattern=PIPELINE_NAME_PATTERN)
    """What requests name in ``InferRequest.pipeline``."""
    version: str = "1"
    """Several versions of one name may be served; a request may pin one."""
    description: str = ""
    inputs: dict[str, TensorDecl]
    """The pipeline's signature: what a request carries."""
    nodes: dict[str, NodeSpec] = Field(min_length=1)
    outputs: dict[str, str] = Field(min_length=1)
    """Output name -> reference (``NODE.OUTPUT`` or ``$inputs.NAME``)."""
    warmup: WarmupSpec | None = None
    """Requests run through the whole pipeline (every variant of every node) before the
    version takes traffic; generated ones come from the pipeline's input specs."""

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version: 1` in YAML is an int; a version is a label, so take it as text.
        return (
            str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        )


def variant_label(node: str, variant: str | None) -> str:
    """``node``, or ``node@variant`` where a variant ran.

    >>> variant_label("image_embed", "candidate"), variant_label("image_embed", None)
    ('image_embed@candidate', 'image_embed')
    """
    return node if variant is None else f"{node}{VARIANT_SEPARATOR}{variant}"


@dataclass(frozen=True)
class Ref:
    """A parsed reference: ``source`` is ``$inputs`` or a node name."""

    source: str
    name: str

    @property
    def is_input(self) -> bool:
        return self.source == INPUTS_PREFIX

    def __str__(self) -> str:
        return f"{self.source}.{self.name}"


def parse_ref(text: str) -> Ref:
    """Parse ``$inputs.NAME`` or ``NODE.OUTPUT``.

    >>> parse_ref("$inputs.image")
    Ref(source='$inputs', name='image')
    >>> parse_ref("decode.pixels").source
    'decode'

    Raises:
        ValueError: when the text is not of either form.
    """
    match = _REF.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        msg = f"a reference must be $inputs.NAME or NODE.OUTPUT (got {text!r})"
        raise ValueError(msg)
    return Ref(match.group(1), match.group(2))


__all__ = [
    "ALL_WEIGHT",
    "DEFAULT_MAX_QUEUE",
    "INPUTS_PREFIX",
    "VARIANT_SEPARATOR",
    "BatchingConfig",
    "NodeSpec",
    "PipelineSpec",
    "Ref",
    "TensorDecl",
    "VariantBase",
    "VariantSpec",
    "WarmupSpec",
    "parse_ref",
    "variant_label",
]
