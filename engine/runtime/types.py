"""Transport-neutral request, result and health objects (a pipeline's description is
``dag.pipeline.PipelineDescription``).

The Thrift adapter (``engine.transport.handler``) converts the wire structs to and from these; the
engine and everything under it never see a Thrift struct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model_plugins.errors import InvalidRequest


@dataclass
class InferenceRequest:
    """One call of ``infer``, decoded (the IDL's ``InferRequest``; the one name inside)."""

    pipeline: str
    inputs: dict[str, np.ndarray]
    request_id: str
    version: str | None = None
    timeout_ms: int | None = None
    #: the outputs the caller wants; None = all declared outputs
    outputs: list[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The one check of timeout_ms, wherever the request comes from (the wire, or code).
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            msg = f"timeout_ms must be > 0 (got {self.timeout_ms})"
            raise InvalidRequest(msg, field="timeout_ms")


@dataclass
class InferenceResult:
    """The answer to one :class:`InferenceRequest` (the IDL's ``InferResponse``): what
    ``Engine.infer`` returns, and what the clients of ``engine.transport.client`` return."""

    request_id: str
    outputs: dict[str, np.ndarray]
    version: str
    #: wall time of each node that ran, in microseconds (skipped nodes are absent)
    node_latency_us: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class HealthReport:
    live: bool
    ready: bool
    details: dict[str, str] = field(default_factory=dict)


__all__ = [
    "HealthReport",
    "InferenceRequest",
    "InferenceResult",
]
