"""The exceptions of dagserve, in one tree rooted in the lowest layer that raises.

::

    DagserveError                    root of every error dagserve raises on purpose
    ├── InvalidRequest (ValueError)      the request is malformed: wrong dtype, shape, missing input
    ├── PipelineNotFound (LookupError)   no pipeline (or version) of that name is served
    ├── Overloaded                       too much in flight; retry after ``retry_after_ms``
    ├── DeadlineExceeded (TimeoutError)  the request's ``timeout_ms`` ran out
    ├── InferenceError                   a node failed while running; names the node
    │   └── BatchContractError           a plugin returned a different number of items than it got
    ├── PluginError                      a plugin cannot be found, inspected or loaded
    │   ├── PluginNotFound (LookupError)
    │   └── PluginLoadError
    └── (dag.errors.PipelineError, engine.errors.ConfigError: branches of the upper layers)

The first five mirror the exceptions of the IDL one to one; ``engine`` maps them to the wire
in one place.  Every class pickles with its fields intact (errors cross process boundaries).
"""

from __future__ import annotations

from typing import Any


def rebuild(cls: type[DagserveError], message: str, fields: dict[str, Any]) -> DagserveError:
    """An error of class ``cls`` with ``message`` and ``fields``, built without its constructor.

    Unpickling uses it (a subclass's constructor may compose its message from domain
    arguments, as :class:`PipelineNotFound` does), and so does whatever rebuilds an error from
    a message that travelled alone (the wire carries only the composed text).
    """
    error = cls.__new__(cls)
    DagserveError.__init__(error, message)
    error.__dict__.update(fields)
    return error


def node_label(node: str | None, plugin: str | None) -> str:
    """How messages name a node: ``node 'x' (plugin 'y')``, or whichever of the two is known.

    >>> node_label("embed", "torchscript"), node_label(None, "identity")
    ("node 'embed' (plugin 'torchscript')", "plugin 'identity'")
    """
    if node and plugin:
        return f"node {node!r} (plugin {plugin!r})"
    if node:
        return f"node {node!r}"
    return f"plugin {plugin!r}"


class DagserveError(Exception):
    """Root of the tree: ``except DagserveError`` catches every error dagserve raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        fields = {k: v for k, v in self.__dict__.items() if k != "message"}
        return (rebuild, (type(self), self.message, fields))


class InvalidRequest(DagserveError, ValueError):
    """The request is malformed; ``field`` names where (``inputs.image.shape``)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PipelineNotFound(DagserveError, LookupError):
    """No pipeline of that name (or that version) is served."""

    def __init__(
        self, name: str, version: str | None = None, known: list[str] | None = None
    ) -> None:
        what = f"pipeline {name!r}" + (f" version {version!r}" if version else "")
        hint = f"; served: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"{what} is not served{hint}")
        self.pipeline = name
        self.version = version


class Overloaded(DagserveError):
    """Too much work in flight; the caller should retry after ``retry_after_ms``."""

    def __init__(self, message: str, retry_after_ms: int = 100) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(DagserveError, TimeoutError):
    """The request's deadline passed before its answer was ready."""


class InferenceError(DagserveError):
    """A node failed while running; ``node`` and ``plugin`` say which."""

    def __init__(
        self,
        message: str,
        node: str | None = None,
        plugin: str | None = None,
        cause: str | None = None,
    ) -> None:
        super().__init__(message)
        self.node = node
        self.plugin = plugin
        #: the import path of the original exception's class, when it came from a plugin
        self.cause = cause


class BatchContractError(InferenceError):
    """A plugin's outputs do not hold one item per input item."""

    def __init__(
        self, plugin: str, output: str, expected: int, actual: int, node: str | None = None
    ) -> None:
        super().__init__(
            f"{node_label(node, plugin)} broke the batch contract: the batch has {expected} "
            f"items but output {output!r} has {actual}",
            node=node,
            plugin=plugin,
        )
        self.expected = expected
        self.actual = actual


class PluginError(DagserveError):
    """A plugin cannot be found, inspected or loaded."""


class PluginNotFound(PluginError, LookupError):
    """A plugin reference resolves to nothing: not built in, not an entry point, not importable."""


class PluginLoadError(PluginError):
    """A plugin was found but its ``load`` (or its import) failed."""


__all__ = [
    "BatchContractError",
    "DagserveError",
    "DeadlineExceeded",
    "InferenceError",
    "InvalidRequest",
    "Overloaded",
    "PipelineNotFound",
    "PluginError",
    "PluginLoadError",
    "PluginNotFound",
    "node_label",
    "rebuild",
]
