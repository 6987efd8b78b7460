"""Test a plugin without a server: load it, feed it batches, check what it returns.

With ``isolated=True`` the plugin lives in a spawned child process, as in the server's worker,
so a plugin that imports a deep-learning framework never enters the test's process.

>>> import numpy as np
>>> from model_plugins.builtins.identity import Identity
>>> with PluginHarness(Identity) as harness:
...     out = harness.predict({"x": [[1.0, 2.0], [3.0, 4.0]]})
>>> out["x"].shape
(2, 2)
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from model_plugins.contract import check_inputs, check_outputs
from model_plugins.errors import DagserveError, InferenceError, InvalidRequest, PluginLoadError
from model_plugins.plugin import Batch, LoadContext, ModelPlugin
from model_plugins.specs import NUMPY_DTYPES, OBJECT_DTYPES, TensorSpec, dtype_of


def _to_array(name: str, value: object, spec: TensorSpec | None) -> np.ndarray:
    """Turn a list (or tuple) into an array of the declared dtype; pass arrays through."""
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, (list, tuple)):
        msg = f"input {name!r} must be a numpy array or a list (got {type(value).__name__})"
        raise InvalidRequest(msg, field=f"inputs.{name}")
    if spec is not None and spec.dtype in OBJECT_DTYPES:
        return np.array(value, dtype=object)
    try:
        array = np.array(value)
    except ValueError as exc:  # ragged nesting: numpy refuses to guess
        msg = f"input {name!r} is not a rectangular list: {exc}"
        raise InvalidRequest(msg, field=f"inputs.{name}") from exc
    if array.dtype.kind in "US":
        return np.array(value, dtype=object)
    if spec is not None:
        target = NUMPY_DTYPES[spec.dtype]
        # Cast only where nothing is lost in kind (ints -> float32, float64 -> float32);
        # a list of floats for an int input stays float and fails the dtype check.
        if np.can_cast(array.dtype, target, casting="same_kind"):
            return array.astype(target)
    return array


#: a plugin's ``(inputs, outputs)`` specs
Specs = tuple[dict[str, TensorSpec], dict[str, TensorSpec]]
#: what a loaded plugin stated itself (``loaded_inputs``, ``loaded_outputs``), None where nothing
Stated = tuple[dict[str, TensorSpec] | None, dict[str, TensorSpec] | None]


class PluginHarness:
    """Runs one plugin the way the engine would, checking the batch contract.

    The harness builds the :class:`LoadContext` the engine would build, converts list inputs
    to numpy, checks inputs against the plugin's input specs, calls ``predict`` and checks that
    every declared output is there with its dtype, item shape and one item per input item.

    The specs come from the plugin's ``signature(params, upstream)``.  ``upstream`` is what the
    pipeline would wire into the node; by default the harness derives it from each batch (the
    dtype and item shape of each array it is given).  A plugin that states specs when it loads
    (a framework adapter's ``loaded_inputs`` / ``loaded_outputs``) has its outputs checked
    against what it stated, and list inputs converted to the stated dtypes;
    :meth:`declared` gives what a worker would report.

    **In process** (the default), exceptions that ``load`` or ``predict`` raise reach the caller
    unchanged.  **Isolated** (``isolated=True``), the plugin is created, loaded, run and
    unloaded in one spawned child process, as in the server's worker: a plugin that imports a
    deep-learning framework never enters the caller's process.  Its input arrays arrive
    read-only, as decoded requests do.  The checks still run in the caller.  Errors of dagserve's
    own tree come back as they were raised; any other exception comes back as
    :class:`PluginLoadError` (from ``load``) or :class:`InferenceError` (from ``predict``)
    naming the original class, with the child's traceback as a note.  Closing the harness
    (leaving the ``with`` block, or :meth:`close`) stops the child.

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
        isolated: run the plugin in a spawned child process.

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
        self._child: _Child | None = None
        if isinstance(plugin, str):
            reference = plugin
        elif isinstance(plugin, type):
            reference = f"{plugin.__module__}:{plugin.__qualname__}"
        elif isolated:
            msg = (
                "an isolated harness creates the plugin in its child process: give a reference "
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
        self._stated: Stated = (None, None)
        self._declared: Specs = ({}, {})
        self._signatures: dict[frozenset[tuple[str, TensorSpec | None]], Specs] = {}

    @property
    def plugin(self) -> ModelPlugin:
        """The plugin object (in process only: an isolated harness's lives in its child)."""
        if self._plugin is None:
            msg = "an isolated harness holds its plugin in a child process"
            raise RuntimeError(msg)
        return self._plugin

    def signature(
        self, upstream: Mapping[str, TensorSpec | None] | None = None
    ) -> tuple[dict[str, TensorSpec], dict[str, TensorSpec]]:
        """The plugin's ``(inputs, outputs)`` specs for this harness's params.

        Args:
            upstream: the wired specs; defaults to the ``upstream`` given to the harness, or
                nothing known.
        """
        if upstream is None:
            upstream = self.upstream or {}
        if self._plugin is not None:
            return type(self._plugin).signature(self.context.params, upstream)
        key = frozenset(upstream.items())
        if key not in self._signatures:
            specs = self._call("signature", self.context.params, dict(upstream))
            self._signatures[key] = specs
        inputs, outputs = self._signatures[key]
        return dict(inputs), dict(outputs)

    def load(self) -> None:
        """Call the plugin's ``load`` with the harness's context, as the engine does once."""
        if self._plugin is not None:
            self._plugin.load(self.context)
            self._stated, self._declared = _report(self._plugin)
        else:
            try:
                self._stated, self._declared = self._call("load", self.context)
            except BaseException:
                self._stop()
                raise
        self.loaded = True

    def declared(self) -> Specs:
        """The ``(inputs, outputs)`` a worker reports once the plugin is loaded.

        That is what the plugin stated on load (``loaded_inputs`` / ``loaded_outputs``), else
        its class declarations.
        """
        if not self.loaded:
            msg = "call load() first, or use the harness as a context manager"
            raise RuntimeError(msg)
        inputs, outputs = self._declared
        return dict(inputs), dict(outputs)

    def predict(self, batch: Mapping[str, Any], *, n_items: int | None = None) -> Batch:
        """Check ``batch``, run ``predict`` on it, check and return the outputs.

        Args:
            batch: input name -> numpy array or (nested) list; the first dimension is items.
            n_items: the number of items, needed only when ``batch`` is empty.

        Returns:
            The plugin's outputs, checked.

        Raises:
            RuntimeError: :meth:`load` has not run.
            InvalidRequest: the batch does not fit the input specs.
            BatchContractError: an output does not hold one item per input item.
            InferenceError: an output is missing or has the wrong dtype or item shape.
        """
        if not self.loaded:
            msg = "call load() first, or use the harness as a context manager"
            raise RuntimeError(msg)
        where = f"node {self.context.node!r} (plugin {self.reference!r})"
        stated_inputs, stated_outputs = self._stated
        # the declared dtypes, to convert lists with, before the arrays tell what they are
        declared = stated_inputs
        if declared is None:
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
                msg = f"{where}: {exc}"
                raise InvalidRequest(msg, field="inputs") from exc
            inputs, outputs = self.signature(seen)
        if stated_outputs is not None:
            outputs = stated_outputs
        found = check_inputs(inputs, arrays, where=where, partial=self.join == "available")
        expected = found if found is not None else n_items
        if expected is None:
            msg = "the batch is empty: pass n_items to say how many items the outputs must have"
            raise ValueError(msg)
        if self._plugin is not None:
            result = self._plugin.predict(arrays)
        else:
            result = self._call("predict", arrays)
        return check_outputs(
            outputs, result, expected, plugin=self.reference, node=self.context.node
        )

    def unload(self) -> None:
        """Call the plugin's ``unload`` (once, if it was loaded); isolated, stop the child."""
        try:
            if self.loaded:
                self.loaded = False
                if self._plugin is not None:
                    self._plugin.unload()
                else:
                    self._call("unload")
        finally:
            self._stop()

    def close(self) -> None:
        """Unload the plugin if it is loaded, and stop the child process if there is one."""
        self.unload()

    def _call(self, op: str, *args: Any) -> Any:
        """Run ``op`` in the child (started on first use), mapping its failures to ours."""
        try:
            if self._child is None:
                self._child = _Child()
                self._child.call("resolve", self.reference)
            return self._child.call(op, *args)
        except _RemoteError as exc:
            raise self._error(op, exc) from None

    def _error(self, op: str, remote: _RemoteError) -> DagserveError:
        what = f"{remote.cls}: {remote.message}" if remote.cls else remote.message
        error: DagserveError
        if op in ("resolve", "signature", "load"):
            error = PluginLoadError(f"plugin {self.reference!r}: {op} failed: {what}")
        else:
            node = self.context.node
            message = f"node {node!r} (plugin {self.reference!r}) failed: {what}"
            error = InferenceError(message, node=node, plugin=self.reference, cause=remote.cls)
        if remote.traceback:
            error.add_note(f"in the harness's child process:\n{remote.traceback}")
        return error

    def _stop(self) -> None:
        if self._child is not None:
            self._child.stop()
            self._child = None
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


def _report(plugin: ModelPlugin) -> tuple[Stated, Specs]:
    """What a loaded plugin stated, and what a worker reports for it (the worker's rule)."""
    cls = type(plugin)
    inputs = getattr(plugin, "loaded_inputs", None) or None
    outputs = getattr(plugin, "loaded_outputs", None) or None
    stated: Stated = (
        dict(inputs) if inputs else None,
        dict(outputs) if outputs else None,
    )
    return stated, (dict(inputs or cls.inputs), dict(outputs or cls.outputs))


# -- the isolated child ------------------------------------------------------------------------


class _RemoteError(Exception):
    """An exception outside dagserve's tree, raised in the child, as text."""

    def __init__(self, cls: str | None, message: str, traceback: str = "") -> None:
        super().__init__(message)
        self.cls = cls
        self.message = message
        self.traceback = traceback


class _Child:
    """The caller's end of the child process: one request, one reply, in turn."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=_child_main, args=(child_end,), name="dagserve-harness", daemon=True
        )
        self.process.start()
        child_end.close()  # so that the child's death reads as end-of-file here

    def call(self, op: str, *args: Any) -> Any:
        try:
            self.conn.send((op, args))
            reply = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(timeout=5)
            code = self.process.exitcode
            if code is not None and code < 0:
                how = f"was killed by {signal.Signals(-code).name}"
            else:
                how = f"exited with code {code}"
            msg = f"the harness's child process {how} during {op}"
            raise _RemoteError(None, msg) from exc
        kind, *rest = reply
        if kind == "ok":
            return rest[0]
        if kind == "error":
            error, text = rest
            error.add_note(f"in the harness's child process:\n{text}")
            raise error
        raise _RemoteError(*rest)

    def stop(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(OSError):  # the child is already going
                self.conn.send(("stop", ()))
            self.process.join(timeout=10)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.conn.close()


#: the child's state: the plugin class and, once loaded, the plugin and its context
_HOSTED: dict[str, Any] = {}


def _child_main(conn: Connection) -> None:
    """The target of the child process: serve requests until told to stop."""
    # Frameworks print to stdout (Paddle's oneDNN check does): keep it off the caller's.
    os.dup2(2, 1)
    # The caller handles Ctrl-C and stops the child in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:
                break
            if op == "stop":
                break
            conn.send(_child_run(op, args))
    finally:
        conn.close()
        # Skip interpreter teardown: frameworks' atexit hooks can hang or crash on the way out.
        os._exit(0)


def _child_run(op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    import pickle

    try:
        return ("ok", _CHILD_OPS[op](*args))
    except DagserveError as exc:
        reply = ("error", exc, "".join(traceback.format_exception(exc)))
        try:  # a plugin's own subclass may hold fields that do not pickle
            pickle.dumps(reply)
        except Exception:
            return _raised(exc)
        return reply
    except BaseException as exc:
        return _raised(exc)


def _raised(exc: BaseException) -> tuple[Any, ...]:
    path = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return ("raised", path, str(exc), "".join(traceback.format_exception(exc)))


def _child_resolve(reference: str) -> None:
    from model_plugins.registry import resolve

    _HOSTED["class"] = resolve(reference)


def _child_signature(params: Mapping[str, Any], upstream: dict[str, TensorSpec | None]) -> Specs:
    inputs, outputs = _HOSTED["class"].signature(params, upstream)
    return dict(inputs), dict(outputs)


def _child_load(context: LoadContext) -> tuple[Stated, Specs]:
    plugin = _HOSTED["class"]()
    plugin.load(context)
    _HOSTED["plugin"], _HOSTED["context"] = plugin, context
    return _report(plugin)


def _child_predict(batch: Batch) -> Batch:
    for array in batch.values():
        array.flags.writeable = False  # as the arrays a worker decodes from a request
    result = _HOSTED["plugin"].predict(batch)
    # Only numpy crosses back: another object (a framework tensor) would import its framework
    # in the caller when unpickled.  The caller checks the rest of the contract.
    context: LoadContext = _HOSTED["context"]
    where = f"node {context.node!r} (plugin {context.plugin!r})"
    if not isinstance(result, Mapping):
        msg = f"{where}: predict() must return a dict of arrays (got {type(result).__name__})"
        raise InferenceError(msg, node=context.node, plugin=context.plugin)
    for name, value in result.items():
        if not isinstance(value, np.ndarray):
            msg = f"{where}: output {name!r} must be a numpy array (got {type(value).__name__})"
            raise InferenceError(msg, node=context.node, plugin=context.plugin)
        if value.dtype.kind == "O":
            for element in value.flat:
                if not isinstance(element, (str, bytes)):
                    kind = type(element).__name__
                    msg = f"{where}: output {name!r} must hold str or bytes (holds {kind})"
                    raise InferenceError(msg, node=context.node, plugin=context.plugin)
    return dict(result)


def _child_unload() -> None:
    plugin = _HOSTED.pop("plugin", None)
    if plugin is not None:
        plugin.unload()


#: what the child can be asked to do
_CHILD_OPS: dict[str, Any] = {
    "resolve": _child_resolve,
    "signature": _child_signature,
    "load": _child_load,
    "predict": _child_predict,
    "unload": _child_unload,
}


__all__ = ["PluginHarness"]
