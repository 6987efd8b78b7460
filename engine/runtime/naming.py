"""How an error names where it happened, built where that is known.

A model shared by several nodes runs batches that hold items of several requests, so what its
worker raises names neither a node nor a request: each node's runner names its node
(:func:`node_error`), and the batcher names the failed item within the request that owns it
(:func:`item_error`).  Both build a copy, since one error object may reach many requests.
"""

from __future__ import annotations

from typing import Any

from model_plugins.errors import DagserveError, InferenceError, InvalidRequest, rebuild


def reworded(error: DagserveError, message: str, **fields: Any) -> DagserveError:
    """A copy of ``error``: same class and fields, but ``message`` and ``fields`` replaced."""
    kept = {k: v for k, v in error.__dict__.items() if k != "message"}
    return rebuild(type(error), message, kept | fields)


def node_error(error: DagserveError, node: str, plugin: str) -> DagserveError:
    """``error`` as the request that went through ``node`` sees it.

    An ``InferenceError`` that names no node gets this one (field and message); an
    ``InvalidRequest`` says which node refused the input.  Other errors are returned as they
    are: they already say what they are about (a model's queue, a deadline).
    """
    if isinstance(error, InferenceError) and error.node is None:
        return reworded(
            error, f"node {node!r}: {error.message}", node=node, plugin=error.plugin or plugin
        )
    if isinstance(error, InvalidRequest):
        return reworded(error, f"node {node!r}: {error.message}", field=error.field or node)
    return error


def item_error(error: DagserveError, index: int) -> DagserveError:
    """The error of one failed item, naming its ``index`` within the request that owns it."""
    return reworded(error, f"item {index}: {error.message}")


__all__ = ["item_error", "node_error", "reworded"]
