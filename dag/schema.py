"""The pipeline YAML as strict, typed models.

Every model forbids unknown keys, so a typo (``max_batch_szie``) is an error with a line
number, not a silently ignored setting.  The models are declarative and pickle; resolving
plugins happens later (``dag.graph``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from model_plugins.specs import DType, TensorSpec

#: names of pipelines, nodes and tensors: identifiers, dashes allowed in pipeline names
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
PIPELINE_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.-]*$"

#: the prefix of a reference to a pipeline input
INPUTS_PREFIX = "$inputs"

#: items that may wait for a model node before requests are Overloaded: ``max_queue``'s
#: default, and the bound of a node without ``batching:``
DEFAULT_MAX_QUEUE = 1024

_REF = re.compile(r"^(\$inputs|[A-Za-z_][A-Za-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_DEVICE = re.compile(r"^(auto|cpu|cuda:\d+)$")


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


class NodeSpec(_Strict):
    """One node of the DAG."""

    plugin: str = Field(min_length=1)
    """A built-in name (``identity``), a ``dagserve.plugins`` entry point, or ``module:Class``."""
    model: str | None = None
    """The model file or folder, relative to the pipeline file."""
    inputs: dict[str, str] = Field(default_factory=dict)
    """Plugin input name -> reference: ``$inputs.NAME`` or ``NODE.OUTPUT``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Free parameters handed to the plugin's ``load`` (``LoadContext.params``)."""
    outputs: dict[str, TensorDecl] | None = None
    """Output specs, for plugins that cannot declare them themselves (framework adapters)."""
    join: Literal["all", "available"] = "all"
    """``all``: skip the node when a wired input is absent; ``available``: run on what is there."""
    device: str = "auto"
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
    timeout_ms: float | None = Field(None, gt=0)
    """A per-node time limit, on top of the request's deadline."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE.match(value):
            msg = f"must be auto, cpu or cuda:N (got {value!r})"
            raise ValueError(msg)
        return value


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

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version: 1` in YAML is an int; a version is a label, so take it as text.
        return (
            str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        )


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
    "DEFAULT_MAX_QUEUE",
    "INPUTS_PREFIX",
    "BatchingConfig",
    "NodeSpec",
    "PipelineSpec",
    "Ref",
    "TensorDecl",
    "parse_ref",
]
