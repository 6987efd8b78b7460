"""Errors of loading, validating and drawing a pipeline.

::

    DagserveError                     (model_plugins.errors)
    ├── PipelineError                 one problem of a pipeline file, at a place
    ├── PipelineInvalid               every problem of one or more files, raised together
    └── RenderError (RuntimeError)    the picture of a pipeline cannot be drawn

A :class:`PipelineError` is also how a *warning* travels (``severity="warning"``): the same
place, the same text, nothing raised.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from model_plugins.errors import DagserveError

Severity = Literal["error", "warning"]


class PipelineError(DagserveError):
    """One problem of a pipeline, with the place it was found.

    Args:
        message: what is wrong, in the form "what must be what (got value)".
        file: the pipeline file, when it came from one.
        line: the 1-based line in ``file``.
        node: the node the problem belongs to.
        severity: ``"error"``, or ``"warning"`` for something that does not stop loading.

    >>> str(PipelineError("must be >= 1 (got 0)", file="p.yaml", line=7, node="embed"))
    "p.yaml:7: node 'embed': must be >= 1 (got 0)"
    >>> print(PipelineError("input 'text' is not used", line=3, severity="warning"))
    3: warning: input 'text' is not used
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        node: str | None = None,
        severity: Severity = "error",
    ) -> None:
        super().__init__(message)
        self.file = file
        self.line = line
        self.node = node
        self.severity: Severity = severity

    @property
    def is_warning(self) -> bool:
        return self.severity == "warning"

    def __str__(self) -> str:
        place = ":".join(str(part) for part in (self.file, self.line) if part is not None)
        parts = [place] if place else []
        if self.is_warning:
            parts.append("warning")
        if self.node is not None:
            parts.append(f"node {self.node!r}")
        parts.append(self.message)
        return ": ".join(parts)

    def __repr__(self) -> str:
        return (
            f"PipelineError({self.message!r}, file={self.file!r}, line={self.line!r}, "
            f"node={self.node!r}, severity={self.severity!r})"
        )


class PipelineInvalid(DagserveError):
    """A pipeline cannot be loaded; ``errors`` holds every problem found, in file order.

    >>> error = PipelineInvalid([PipelineError("a", line=1), PipelineError("b", line=2)])
    >>> print(error)
    1: a
    2: b
    """

    def __init__(self, errors: Iterable[PipelineError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors) or "invalid pipeline")

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors) or self.message


class RenderError(DagserveError, RuntimeError):
    """The picture of a pipeline cannot be drawn (``dot`` missing or failing)."""


__all__ = ["PipelineError", "PipelineInvalid", "RenderError", "Severity"]
