"""Learn what a plugin declares without importing it in the front process.

A ``module:Class`` plugin may ``import torch`` (or tensorflow, or paddle) at its top, and the
front process never imports a framework.  The inspector imports such plugins in a short-lived
spawned process and sends back what they declare: framework, input and output specs.

All references are inspected in one process first.  If that process dies (``import
tensorflow`` then ``import paddle`` in one process is a segmentation fault), each reference is
inspected again in a process of its own, so one bad combination cannot hide the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from model_plugins.errors import DagserveError, PluginLoadError
from model_plugins.plugin import ModelPlugin
from model_plugins.registry import BUILTINS, resolve
from model_plugins.specs import TensorSpec

logger = logging.getLogger(__name__)

_SPAWN = multiprocessing.get_context("spawn")


@dataclass(frozen=True)
class PluginDescription:
    """What a plugin class declares, read in another process."""

    reference: str
    framework: str | None
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    doc: str = ""
    padding: dict[str, Any] | None = None
    padded_outputs: dict[str, tuple[str, int]] | None = None
    ragged: bool = False
    retry_on_worker_loss: bool = True


def _describe(reference: str) -> PluginDescription | DagserveError:
    try:
        cls = resolve(reference)
    except DagserveError as exc:
        return exc
    return PluginDescription(
        reference,
        cls.framework,
        dict(cls.inputs),
        dict(cls.outputs),
        (cls.__doc__ or "").strip().split("\n")[0],
        dict(cls.padding),
        dict(cls.padded_outputs),
        cls.ragged,
        cls.retry_on_worker_loss,
    )


def _inspect_child(references: list[str], conn: multiprocessing.connection.Connection) -> None:
    import os
    import sys

    os.dup2(2, 1)  # a plugin that prints at import must not garble anything
    sys.stdout = sys.stderr
    conn.send({ref: _describe(ref) for ref in references})
    conn.close()


def _run(references: list[str], timeout_s: float, sys_path: list[str]) -> dict[str, Any] | None:
    receiver, sender = _SPAWN.Pipe(duplex=False)
    process = _SPAWN.Process(
        target=_with_path, args=(sys_path, references, sender), name="dagserve-inspector"
    )
    process.start()
    sender.close()
    try:
        if receiver.poll(timeout_s):
            answer: dict[str, Any] = receiver.recv()
            return answer
        return None
    except EOFError:
        return None
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
        receiver.close()
        if process.exitcode not in (0, None) and len(references) > 1:
            logger.warning(
                "the inspector process for %d plugins ended with exit code %s (two frameworks "
                "that crash when imported together?); inspecting each plugin on its own",
                len(references),
                process.exitcode,
            )


def _with_path(sys_path: list[str], references: list[str], conn: Any) -> None:
    import sys

    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    _inspect_child(references, conn)


def inspect_plugins(
    references: Iterable[str], *, timeout_s: float = 300.0, sys_path: Iterable[str] = ()
) -> dict[str, PluginDescription | DagserveError]:
    """Describe each plugin reference, importing it in a spawned process.

    Args:
        references: ``module:Class`` references (or entry-point names).
        timeout_s: how long one inspector process may take.
        sys_path: folders to put on the child's ``sys.path`` first (pipeline folders).

    Returns:
        reference -> its description, or the error that resolving it raised.
    """
    todo = list(dict.fromkeys(references))
    if not todo:
        return {}
    path = list(sys_path)
    answer = _run(todo, timeout_s, path)
    if answer is not None:
        return answer
    results: dict[str, PluginDescription | DagserveError] = {}
    for reference in todo:
        single = _run([reference], timeout_s, path)
        if single is None:
            msg = f'plugin "{reference}": the process importing it crashed or timed out'
            results[reference] = PluginLoadError(msg)
        else:
            results.update(single)
    return results


def needs_inspection(reference: str) -> bool:
    """Built-ins import in the front process (numpy only); everything else is inspected."""
    return reference not in BUILTINS


def proxy_class(description: PluginDescription) -> type[ModelPlugin]:
    """A stand-in class that carries a plugin's declarations, for validation in the front."""
    name = description.reference.rpartition(":")[2].rpartition(".")[2] or "Plugin"
    attributes = {
        "inputs": description.inputs,
        "outputs": description.outputs,
        "framework": description.framework,
        "reference": description.reference,
        "inspected": True,
        "padding": description.padding or {},
        "padded_outputs": description.padded_outputs or {},
        "ragged": description.ragged,
        "retry_on_worker_loss": description.retry_on_worker_loss,
        "__doc__": description.doc,
        "__module__": "engine.runtime.inspector.inspected",
    }
    return type(name, (ModelPlugin,), attributes)


class InspectingResolver:
    """A resolver for ``dag.load_pipeline`` that never imports non-built-in plugins here.

    Call :meth:`prefetch` with every reference first, so that all are inspected in one process;
    a reference that was not prefetched is inspected on its own when asked for.
    """

    def __init__(self, *, sys_path: Iterable[str] = ()) -> None:
        self.sys_path = list(sys_path)
        self._known: dict[str, PluginDescription | DagserveError] = {}

    def prefetch(self, references: Iterable[str]) -> None:
        todo = [r for r in set(references) if needs_inspection(r) and r not in self._known]
        self._known.update(inspect_plugins(todo, sys_path=self.sys_path))

    def __call__(self, reference: str) -> type[ModelPlugin]:
        if not needs_inspection(reference):
            return resolve(reference)
        if reference not in self._known:
            self.prefetch([reference])
        found = self._known[reference]
        if isinstance(found, DagserveError):
            raise found
        return proxy_class(found)


Resolver = Callable[[str], type[ModelPlugin]]

__all__ = ["InspectingResolver", "PluginDescription", "inspect_plugins", "proxy_class"]
