"""Test a plugin without a server: load it, feed it batches, check what it returns.

With ``isolated=True`` the plugin lives in a worker process that runs the server's own worker
code (``model_plugins._host``): a plugin that imports a deep-learning framework never enters
the test's process, and the harness tests what the server runs.

>>> import numpy as np
>>> from model_plugins.builtins.identity import Identity
>>> with PluginHarness(Identity) as harness:
...     out = harness.predict({"x": [[1.0, 2.0], [3.0, 4.0]]})
>>> out["x"].shape
(2, 2)
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import signal
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from model_plugins._host import wire
from model_plugins._host.main import worker_entry
from model_plugins._host.messages import (
    GetSignature,
    Loaded,
    LoadModel,
    Predict,
    RemoteError,
    Reply,
    Shutdown,
    Unload,
)
from model_plugins._host.postmortem import FlightRecord
from model_plugins.contract import check_inputs, check_result
from model_plugins.errors import (
    DagserveError,
    InferenceError,
    InvalidRequest,
    PluginError,
    PluginLoadError,
    node_label,
    rebuild,
)
from model_plugins.partial import Partial
from model_plugins.plugin import Batch, LoadContext, ModelPlugin, Signature, overrides_signature
from model_plugins.specs import TensorSpec, as_array, dtype_of
from model_plugins.wiring import wiring_problems

# The worker starts as the server's do: spawned, so that nothing of the caller is inherited.
_SPAWN = multiprocessing.get_context("spawn")


class PluginHarness:
    """Runs one plugin the way the engine would, checking the batch contract.

    The harness builds the :class:`LoadContext` the engine would build, converts list inputs
    to numpy, checks inputs against the plugin's input specs, calls ``predict`` and checks that
    every declared output is there with its dtype, item shape and one item per input item.

    The specs come from the plugin's ``signature(params, upstream)``, as the server's come.
    ``upstream`` is what the pipeline would wire into the node: given, it is checked against
    the plugin's inputs when the plugin loads, with the pipeline validator's rules and words
    (``input 'x' must be float32[4] (got float32[3])``); not given, the harness derives it from
    each batch (the dtype and item shape of each array).  A plugin that states specs when it
    loads (``loaded_inputs`` / ``loaded_outputs``) has its outputs checked against what it
    stated, and list inputs converted to the stated dtypes; :meth:`declared` gives what the
    worker reports to the server.

    **Isolated** (``isolated=True``), the plugin is imported, loaded, run and unloaded in a
    spawned worker process that runs the server's worker code, over the same messages: a plugin
    that imports a deep-learning framework never enters the caller's process.  The checks still
    run in the caller.  Closing the harness (leaving the ``with`` block, or :meth:`close`)
    stops the worker.

    **Errors are the server's, in both modes**: errors of dagserve's own tree (``Params``
    raises :class:`PluginLoadError`, a plugin may raise :class:`InvalidRequest`) reach the
    caller as they were raised.  Any other exception becomes :class:`PluginLoadError` (from
    ``signature`` or ``load``) or :class:`InferenceError` (from ``predict``, with ``cause``
    the original class), naming the node and the original class and message.  In process,
    the original is the new error's ``__cause__``; isolated, the worker's traceback is a note
    on it.  A worker that dies (a segfault) fails the call in progress the same way, with its
    crash dump as a note.  An exception in ``unload`` reaches the caller in process; isolated,
    it is only logged, as the server logs it.

    Args:
        plugin: a :class:`ModelPlugin` subclass (created with no arguments), an instance, or a
            reference as a pipeline writes it: a built-in name (``torchscript``) or
            ``module:Class``.  Isolated, a reference or an importable class.
        params: the node's ``params:``.
        model_path: the node's ``model:`` (a file or folder).
        device: ``cpu`` or ``cuda:N``.
        node: the node name the plugin sees in its context and the errors name.
        upstream: the specs wired into the node (None where unknown), as the pipeline would
            give them, instead of deriving them from each batch.
        join: ``all`` requires every non-optional input; ``available`` (as a node with
            ``join: available``) lets inputs be absent.
        isolated: run the plugin in a spawned worker process.

    Example::

        with PluginHarness(MiniLMEncoder, model_path="models/minilm") as harness:
            out = harness.predict({"text": ["a post", "another post"]})
        assert out["embedding"].shape == (2, 384)

        with PluginHarness("torchscript", model_path="m.pt", isolated=True) as harness:
            out = harness.predict({"x": np.zeros((3, 8), np.float32)})
    """

    def __init__(
        self,
        plugin: type[ModelPlugin] | ModelPlugin | str,
        *,
        params: Mapping[str, Any] | None = None,
        model_path: str | Path | None = None,
        device: str = "cpu",
        node: str = "harness",
        upstream: Mapping[str, TensorSpec | None] | None = None,
        join: Literal["all", "available"] = "all",
        isolated: bool = False,
    ) -> None:
        self.isolated = isolated
        self._plugin: ModelPlugin | None = None
        self._worker: _Worker | None = None
        if isinstance(plugin, str):
            reference = plugin
        elif isinstance(plugin, type):
            reference = f"{plugin.__module__}:{plugin.__qualname__}"
        elif isolated:
            msg = (
                "an isolated harness creates the plugin in its worker process: give a reference "
                f"or a class (got an instance of {type(plugin).__name__})"
            )
            raise TypeError(msg)
        else:
            reference = f"{type(plugin).__module__}:{type(plugin).__qualname__}"
        if not isolated:
            from model_plugins.registry import resolve

            cls = resolve(plugin) if isinstance(plugin, str) else plugin
            self._plugin = cls() if isinstance(cls, type) else cls
        #: the plugin reference that errors name: as given, or ``module:Class``
        self.reference = reference
        self.context = LoadContext(
            node=node,
            plugin=self.reference,
            model_path=Path(model_path) if model_path is not None else None,
            device=device,
            params=dict(params or {}),
        )
        self.upstream = dict(upstream) if upstream is not None else None
        self.join = join
        self.loaded = False
        self._stated: Signature = ({}, {})
        self._signatures: dict[frozenset[tuple[str, TensorSpec | None]], Signature] = {}

    @property
    def plugin(self) -> ModelPlugin:
        """The plugin object (in process only: an isolated harness's lives in its worker)."""
        if self._plugin is None:
            msg = "an isolated harness holds its plugin in a worker process"
            raise RuntimeError(msg)
        return self._plugin

    @property
    def where(self) -> str:
        """How the errors name the node: ``node 'harness' (plugin 'mymod:MyPlugin')``."""
        return node_label(self.context.node, self.reference)

    def signature(self, upstream: Mapping[str, TensorSpec | None] | None = None) -> Signature:
        """The plugin's ``(inputs, outputs)`` specs for this harness's params.

        Args:
            upstream: the wired specs; defaults to the ``upstream`` given to the harness, or
                nothing known.
        """
        if upstream is None:
            upstream = self.upstream or {}
        key = frozenset(upstream.items())
        if key not in self._signatures:
            if self._plugin is not None:
                with self._as_server("signature()"):
                    specs = type(self._plugin).signature(self.context.params, upstream)
            else:
                message = GetSignature(self.reference, dict(self.context.params), dict(upstream))
                specs = self._ask(message, "signature()")
            self._signatures[key] = (dict(specs[0]), dict(specs[1]))
        inputs, outputs = self._signatures[key]
        return dict(inputs), dict(outputs)

    def load(self) -> None:
        """Check the wiring (when ``upstream`` is given), then call the plugin's ``load`` with
        the harness's context, as the engine does once.

        Raises:
            PluginError: ``upstream`` does not fit the plugin's inputs.
            PluginLoadError: ``signature`` or ``load`` failed (see the class's error rules).
        """
        try:
            if self.upstream is not None:
                self._check_wiring(self.upstream)
            if self._plugin is not None:
                with self._as_server("load"):
                    self._plugin.load(self.context)
                stated = (self._plugin.loaded_inputs, self._plugin.loaded_outputs)
            else:
                message = LoadModel(_MODEL_ID, self.reference, (self.context,))
                loaded: Loaded = self._ask(message, "load")
                stated = (loaded.inputs, loaded.outputs)
        except BaseException:
            self._stop()
            raise
        self._stated = (dict(stated[0] or {}), dict(stated[1] or {}))
        self.loaded = True

    def declared(self) -> Signature:
        """What the plugin stated on load (``loaded_inputs`` / ``loaded_outputs``), empty where
        it stated nothing: what the worker reports to the server, which checks it against the
        pipeline."""
        if not self.loaded:
            msg = "call load() first, or use the harness as a context manager"
            raise RuntimeError(msg)
        inputs, outputs = self._stated
        return dict(inputs), dict(outputs)

    def predict(self, batch: Mapping[str, Any], *, n_items: int | None = None) -> Batch:
        """Check ``batch``, run ``predict`` on it, check and return the outputs.

        The batch is one request's items, as the server sees it: a :class:`Partial` that
        fails items fails it with the first failed item's error (``item 1: ...``, the others
        listed in a note), and one that fails none gives its outputs.

        Args:
            batch: input name -> numpy array or (nested) list; the first dimension is items.
            n_items: the number of items, needed only when ``batch`` is empty.

        Returns:
            The plugin's outputs, checked.

        Raises:
            RuntimeError: :meth:`load` has not run.
            InvalidRequest: the batch does not fit the input specs.
            BatchContractError: an output does not hold one item per input item.
            InferenceError: ``predict`` failed, or an output is missing or has the wrong dtype
                or item shape.
            DagserveError: the error of the first item that a :class:`Partial` fails.
        """
        if not self.loaded:
            msg = "call load() first, or use the harness as a context manager"
            raise RuntimeError(msg)
        stated_inputs, stated_outputs = self._stated
        # the declared dtypes, to convert lists with, before the arrays tell what they are
        declared = stated_inputs
        if not declared:
            declared, _ = self.signature(self.upstream or {name: None for name in batch})
        arrays: Batch = {
            name: _to_array(name, value, declared.get(name)) for name, value in batch.items()
        }
        if self.upstream is not None:
            inputs, outputs = self.signature(self.upstream)
        else:
            try:
                seen = {name: TensorSpec(dtype_of(a), a.shape[1:]) for name, a in arrays.items()}
            except TypeError as exc:
                msg = f"{self.where}: {exc}"
                raise InvalidRequest(msg, field="inputs") from exc
            inputs, outputs = self.signature(seen)
        if stated_outputs:
            outputs = stated_outputs
        found = check_inputs(inputs, arrays, where=self.where, partial=self.join == "available")
        expected = found if found is not None else n_items
        if expected is None:
            msg = "the batch is empty: pass n_items to say how many items the outputs must have"
            raise ValueError(msg)
        if self._plugin is not None:
            with self._as_server("predict"):
                result = self._plugin.predict(arrays)
        else:
            result = self._ask(Predict(_MODEL_ID, arrays), "predict")
        checked = check_result(
            outputs, result, expected, plugin=self.reference, node=self.context.node
        )
        if not isinstance(checked, Partial):
            return checked
        if checked.errors:
            first, *others = sorted(checked.errors)
            error = checked.errors[first]
            fields = {k: v for k, v in error.__dict__.items() if k != "message"}
            failed = rebuild(type(error), f"item {first}: {error.message}", fields)
            if others:
                failed.add_note(f"items {', '.join(map(str, others))} failed too")
            raise failed
        return checked.outputs

    def unload(self) -> None:
        """Call the plugin's ``unload`` (once, if it was loaded); isolated, stop the worker."""
        try:
            if self.loaded:
                self.loaded = False
                if self._plugin is not None:
                    self._plugin.unload()
                else:
                    self._ask(Unload(_MODEL_ID), "unload")
        finally:
            self._stop()

    def close(self) -> None:
        """Unload the plugin if it is loaded, and stop the worker process if there is one."""
        self.unload()

    def _check_wiring(self, upstream: Mapping[str, TensorSpec | None]) -> None:
        declared, _ = self.signature(upstream)
        # Isolated, the class is not here to ask: an input of unknown spec goes unchecked.
        mirrors = self._plugin is None or overrides_signature(type(self._plugin))
        problems = wiring_problems(declared, upstream, plugin=self.reference, mirrors=mirrors)
        if problems:
            msg = f"{self.where}: " + "; ".join(message for _, message in problems)
            raise PluginError(msg)

    @contextlib.contextmanager
    def _as_server(self, what: str) -> Iterator[None]:
        """Map an exception of plugin code run here as the worker's errors are mapped."""
        try:
            yield
        except DagserveError:
            raise
        except Exception as exc:
            raise self._mapped(what, RemoteError.from_exception(exc)) from exc

    def _mapped(self, what: str, remote: RemoteError) -> DagserveError:
        if what == "predict":
            return remote.to_inference_error(self.context.node, self.reference)
        return self._failed(what, str(remote))

    def _failed(self, what: str, text: str) -> DagserveError:
        if what == "predict":
            return InferenceError(
                f"{self.where} failed: {text}", node=self.context.node, plugin=self.reference
            )
        return PluginLoadError(f"{self.where}: {what} failed: {text}")

    def _ask(self, message: Any, what: str) -> Any:
        """Send ``message`` to the worker (started on first use); the value of its reply."""
        if self._worker is None:
            self._worker = _Worker(f"harness-{self.context.node}")
        reply = self._worker.call(message)
        if reply is None:
            error = self._failed(what, self._worker.death(what))
            if dump := self._worker.record.read().head():
                error.add_note(f"the worker's crash dump:\n{dump}")
            self._stop()
            raise error
        if reply.error is None:
            return reply.value
        if isinstance(reply.error, RemoteError):
            error = self._mapped(what, reply.error)
            if reply.error.traceback:
                error.add_note(f"in the worker process:\n{reply.error.traceback}")
            raise error
        raise reply.error

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
            self._signatures.clear()

    def __enter__(self) -> PluginHarness:
        try:
            self.load()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


#: the id the harness's one model has in its worker
_MODEL_ID = "harness"


def _to_array(name: str, value: object, spec: TensorSpec | None) -> np.ndarray:
    """A batch input as an array, or the request error the server would answer."""
    if not isinstance(value, (list, tuple, np.ndarray)):
        msg = f"input {name!r} must be a numpy array or a list (got {type(value).__name__})"
        raise InvalidRequest(msg, field=f"inputs.{name}")
    try:
        return as_array(value, spec)
    except ValueError as exc:
        msg = f"input {name!r} is {exc}"
        raise InvalidRequest(msg, field=f"inputs.{name}") from exc


class _Worker:
    """The harness's end of one worker process: the server's worker, called one message at a
    time over the same wire (the server's end, ``engine.runtime.workers.process``, is async)."""

    def __init__(self, name: str) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.record = FlightRecord(name)
        self.process = _SPAWN.Process(
            target=worker_entry,
            args=(child, name, logging.WARNING, *self.record.paths()),
            name=f"dagserve-{name}",
            daemon=True,
        )
        try:
            self.process.start()
        except BaseException:
            parent.close()
            self.record.remove()
            raise
        finally:
            child.close()  # so that the worker's death reads as end-of-file here
        self.sock = parent
        self._ids = itertools.count(1)

    def call(self, message: Any) -> Reply | None:
        """The worker's reply to ``message``; None when the worker died first."""
        message_id = next(self._ids)
        try:
            wire.send(self.sock, (message_id, message))
            while True:
                reply: Reply = wire.recv(self.sock)
                if reply.id == message_id:
                    return reply
        except (EOFError, OSError):
            return None

    def death(self, what: str) -> str:
        """How the worker ended, once ``call`` found it gone."""
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                how = f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        return f"the worker process (pid {self.process.pid}) {how} during {what}"

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError, EOFError):  # the worker may be going already
                self.sock.settimeout(10)
                self.call(Shutdown())
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.sock.close()
        self.record.remove()


__all__ = ["PluginHarness"]
