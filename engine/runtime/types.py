"""Transport-neutral request, result and description objects.

The Thrift adapter (``engine.transport.handler``) converts the wire structs to and from these; the
engine and everything under it never see a Thrift struct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model_plugins.specs import TensorSpec


@dataclass
class InferenceRequest:
    """One call of ``infer``, decoded."""

    pipeline: str
    inputs: dict[str, np.ndarray]
    request_id: str
    version: str | None = None
    timeout_ms: int | None = None
    #: the outputs the caller wants; None = all declared outputs
    outputs: list[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class InferenceResult:
    """The answer to one :class:`InferenceRequest`."""

    request_id: str
    outputs: dict[str, np.ndarray]
    version: str
    #: wall time of each node that ran, in microseconds (skipped nodes are absent)
    node_latency_us: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EdgeDescription:
    source: str  # "$inputs" or a node
    target: str  # a node or "$outputs"
    tensor: str  # "NAME" for pipeline inputs, "NODE.OUTPUT" otherwise


@dataclass(frozen=True)
class PipelineDescription:
    """What ``describe`` and ``list_pipelines`` answer about one served pipeline."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    #: None where no end declares the output's spec
    outputs: dict[str, TensorSpec | None]
    nodes: list[str]
    edges: list[EdgeDescription]


@dataclass(frozen=True)
class HealthReport:
    live: bool
    ready: bool
    details: dict[str, str] = field(default_factory=dict)


__all__ = [
    "EdgeDescription",
    "HealthReport",
    "InferenceRequest",
    "InferenceResult",
    "PipelineDescription",
]
