"""Learn what a plugin declares without importing it in the front process.

A ``module:Class`` plugin may ``import torch`` (or tensorflow, or paddle) at its top, and the
front process never imports a framework.  The inspector imports such plugins in a spawned
process and sends back what they declare: framework, input and output specs, batching hints.

A plugin whose specs depend on its node (it overrides ``signature``) is asked per node: the
validator calls the stand-in class's ``signature(params, upstream)`` in topological order, and
the stand-in forwards the call to the inspector process, which runs the plugin's own method.
So the process stays alive while pipelines load (:class:`InspectingResolver` is a context
manager), and ``dagserve serve``, ``dagserve validate`` and ``PluginHarness`` judge a
pipeline by the same code.

All references are inspected in one process first.  If that process dies (``import
tensorflow`` then ``import paddle`` in one process is a segmentation fault), each reference is
inspected again in a process of its own, so one bad combination cannot hide the others.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import pickle
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

from model_plugins._host.messages import RemoteError
from model_plugins.errors import DagserveError, PluginError, PluginLoadError
from model_plugins.plugin import ModelPlugin, Signature, overrides_signature
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
    #: the class overrides ``signature``: its specs are asked for per node
    own_signature: bool = False


# -- the inspector process ------------------------------------------------------------------


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
        overrides_signature(cls),
    )


def _signature(
    reference: str, params: dict[str, Any], upstream: dict[str, TensorSpec | None]
) -> Signature | BaseException | RemoteError:
    """The plugin's own ``signature``, or what it raised, in a form the front can unpickle."""
    try:
        inputs, outputs = resolve(reference).signature(params, upstream)
        return dict(inputs), dict(outputs)
    except Exception as exc:
        # Only what unpickles without importing the plugin's module may cross: the SDK's
        # errors and the built-in exceptions; anything else travels as text.
        home = type(exc).__module__.partition(".")[0]
        if home in ("builtins", "model_plugins") and _pickles(exc):
            return exc
        return RemoteError.from_exception(exc)


def _pickles(value: object) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def _serve(sys_path: list[str], conn: multiprocessing.connection.Connection) -> None:
    """The target of the inspector process: answer requests until told to stop."""
    import os
    import sys

    os.dup2(2, 1)  # a plugin that prints at import must not garble anything
    sys.stdout = sys.stderr
    sys.path[:0] = [p for p in sys_path if p not in sys.path]
    try:
        while True:
            try:
                request = conn.recv()
            except EOFError:
                break
            if request is None:
                break
            if request[0] == "describe":
                conn.send({ref: _describe(ref) for ref in request[1]})
            else:
                conn.send(_signature(*request[1:]))
    finally:
        conn.close()


class _Process:
    """One inspector process and the pipe to it: one request, one answer, in turn."""

    def __init__(self, sys_path: list[str]) -> None:
        self.conn, child = _SPAWN.Pipe()
        self.process = _SPAWN.Process(
            target=_serve, args=(sys_path, child), name="dagserve-inspector", daemon=True
        )
        self.process.start()
        child.close()  # so that the process's death reads as end-of-file here

    def ask(self, request: tuple[Any, ...], timeout_s: float) -> Any:
        """The answer, or None when the process died or did not answer in time (it is then
        stopped)."""
        try:
            self.conn.send(request)
            if self.conn.poll(timeout_s):
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        self.close()
        return None

    @property
    def alive(self) -> bool:
        return not self.conn.closed and self.process.is_alive()

    def close(self) -> None:
        if not self.conn.closed:
            with contextlib.suppress(OSError):  # it is gone already
                self.conn.send(None)
            self.conn.close()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# -- the front's side -------------------------------------------------------------------------


class InspectedPlugin(ModelPlugin):
    """Base of the stand-in classes: a plugin's declarations, for validation in the front.

    ``plugin_class.signature`` of a plugin that overrides it runs the plugin's own method in
    the inspector process, while the resolver that made the class is open.
    """

    #: the plugin reference it stands for
    reference: ClassVar[str] = ""


def proxy_class(
    description: PluginDescription, resolver: InspectingResolver | None = None
) -> type[InspectedPlugin]:
    """A stand-in class that carries a plugin's declarations, for validation in the front.

    With ``resolver``, a plugin that overrides ``signature`` gets a stand-in whose
    ``signature`` asks the resolver's inspector process.
    """
    name = description.reference.rpartition(":")[2].rpartition(".")[2] or "Plugin"
    attributes: dict[str, Any] = {
        "inputs": description.inputs,
        "outputs": description.outputs,
        "framework": description.framework,
        "reference": description.reference,
        "padding": description.padding or {},
        "padded_outputs": description.padded_outputs or {},
        "ragged": description.ragged,
        "retry_on_worker_loss": description.retry_on_worker_loss,
        "__doc__": description.doc,
        "__module__": "engine.runtime.inspector.inspected",
    }
    if description.own_signature and resolver is not None:
        reference = description.reference

        def signature(
            cls: type[ModelPlugin],
            params: Mapping[str, Any],
            upstream: Mapping[str, TensorSpec | None],
        ) -> Signature:
            return resolver.signature(reference, params, upstream)

        attributes["signature"] = classmethod(signature)
    return type(name, (InspectedPlugin,), attributes)


def needs_inspection(reference: str) -> bool:
    """Built-ins import in the front process (numpy only); everything else is inspected."""
    return reference not in BUILTINS


class InspectingResolver:
    """A resolver for ``dag.load_pipeline`` that never imports non-built-in plugins here.

    Call :meth:`prefetch` with every reference first, so that all are inspected in one process;
    a reference that was not prefetched is inspected on its own when asked for.  Use it as a
    context manager around the loading: the inspector processes that hold a plugin with its
    own ``signature`` stay alive until it closes, to answer that method per node.

    Args:
        sys_path: folders to put on the inspector's ``sys.path`` first (pipeline folders).
        timeout_s: how long one inspector process may take to answer (imports included).
    """

    def __init__(self, *, sys_path: Iterable[str] = (), timeout_s: float = 300.0) -> None:
        self.sys_path = list(sys_path)
        self.timeout_s = timeout_s
        self.known: dict[str, PluginDescription | DagserveError] = {}
        self._hosts: dict[str, _Process] = {}  # reference with its own signature -> its process
        self._closed = False

    def prefetch(self, references: Iterable[str]) -> None:
        """Inspect the references that need it and are not yet known, all in one process if
        they can share one."""
        self.inspect(r for r in references if needs_inspection(r))

    def inspect(self, references: Iterable[str]) -> None:
        """Inspect each reference not yet known (built-ins too), in the order given."""
        todo = [r for r in dict.fromkeys(references) if r not in self.known]
        if not todo:
            return
        shared = _Process(self.sys_path)
        answer = shared.ask(("describe", todo), self.timeout_s)
        if answer is not None:
            self._adopt(shared, answer)
            return
        if len(todo) > 1:
            logger.warning(
                "the inspector process for %d plugins ended with exit code %s (two frameworks "
                "that crash when imported together?); inspecting each plugin on its own",
                len(todo),
                shared.process.exitcode,
            )
        for reference in todo:
            self._inspect_alone(reference)

    def _inspect_alone(self, reference: str) -> _Process | None:
        single = _Process(self.sys_path)
        answer = single.ask(("describe", [reference]), self.timeout_s)
        if answer is None:
            msg = f'plugin "{reference}": the process importing it crashed or timed out'
            self.known[reference] = PluginLoadError(msg)
            return None
        self._adopt(single, answer)
        return self._hosts.get(reference)

    def _adopt(
        self, process: _Process, answer: dict[str, PluginDescription | DagserveError]
    ) -> None:
        """Keep ``process`` for the references of ``answer`` that have their own signature."""
        self.known.update(answer)
        keep = [
            ref
            for ref, found in answer.items()
            if isinstance(found, PluginDescription) and found.own_signature
        ]
        for reference in keep:
            self._hosts[reference] = process
        if not keep:
            process.close()

    def signature(
        self, reference: str, params: Mapping[str, Any], upstream: Mapping[str, TensorSpec | None]
    ) -> Signature:
        """Run the plugin's own ``signature`` in the inspector process that imported it.

        Raises:
            PluginError: the resolver is closed.
            PluginLoadError: the process died or timed out while running it.
            Exception: what the plugin's ``signature`` raised (a class of the plugin's own
                arrives as :class:`PluginLoadError` naming it).
        """
        if self._closed:
            msg = f'plugin "{reference}": signature() asked after the inspector closed'
            raise PluginError(msg)
        request = ("signature", reference, dict(params), dict(upstream))
        host = self._hosts.get(reference)
        answer = host.ask(request, self.timeout_s) if host is not None and host.alive else None
        if answer is None:
            # Another plugin in that process may have killed it: try once in a process alone.
            self._forget(host)
            single = self._inspect_alone(reference)
            answer = single.ask(request, self.timeout_s) if single is not None else None
        if answer is None:
            msg = f'plugin "{reference}": the inspector process crashed or timed out in signature()'
            raise PluginLoadError(msg)
        if isinstance(answer, RemoteError):
            raise PluginLoadError(str(answer))
        if isinstance(answer, BaseException):
            raise answer
        inputs, outputs = answer
        return inputs, outputs

    def _forget(self, host: _Process | None) -> None:
        if host is None:
            return
        host.close()
        self._hosts = {ref: p for ref, p in self._hosts.items() if p is not host}

    def __call__(self, reference: str) -> type[ModelPlugin]:
        if not needs_inspection(reference):
            return resolve(reference)
        if reference not in self.known:
            self.prefetch([reference])
        found = self.known[reference]
        if isinstance(found, DagserveError):
            raise found
        return proxy_class(found, self)

    def close(self) -> None:
        """Stop the inspector processes; a stand-in's ``signature`` no longer answers."""
        self._closed = True
        for process in set(self._hosts.values()):
            process.close()
        self._hosts.clear()

    def __enter__(self) -> InspectingResolver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


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
    with InspectingResolver(sys_path=sys_path, timeout_s=timeout_s) as resolver:
        resolver.inspect(references)
        return dict(resolver.known)


__all__ = [
    "InspectedPlugin",
    "InspectingResolver",
    "PluginDescription",
    "inspect_plugins",
    "proxy_class",
]
