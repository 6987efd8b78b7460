"""Resolve a plugin reference to a plugin class.

A reference is one of, tried in this order:

* a built-in name (``identity``, ``image_decode``, ...): :data:`BUILTINS`;
* the name of an entry point in the ``dagserve.plugins`` group (third-party packages);
* ``module:Class``, imported from ``sys.path`` (the pipeline file's folder included by the loader).

Only what the configuration names is ever imported: a request can never name code.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re

from model_plugins.errors import PluginLoadError, PluginNotFound
from model_plugins.plugin import ModelPlugin

#: the entry-point group third-party plugins register in
ENTRY_POINT_GROUP = "dagserve.plugins"

#: built-in name -> import string; imported only when named
BUILTINS: dict[str, str] = {
    "identity": "model_plugins.builtins.identity:Identity",
    "image_decode": "model_plugins.builtins.image_decode:ImageDecode",
    "concat_fusion": "model_plugins.builtins.fusion:ConcatFusion",
    "weighted_mean_fusion": "model_plugins.builtins.fusion:WeightedMeanFusion",
    "torchscript": "model_plugins.adapters.torchscript:TorchScriptAdapter",
    "torch": "model_plugins.adapters.torch_module:TorchModuleAdapter",
    "tensorflow": "model_plugins.adapters.tensorflow:SavedModelAdapter",
    "paddle": "model_plugins.adapters.paddle:PaddleInferenceAdapter",
    # a pipeline of another dagserve service; the engine's, as it is a client of one
    "remote": "engine.runtime.remote:RemotePlugin",
}

_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def import_from_string(reference: str) -> object:
    """Import ``module:attribute`` (the attribute may be dotted).

    Raises:
        PluginNotFound: the text is not of that form, or the module or attribute is missing.
        PluginLoadError: the module exists but raised while importing.
    """
    if not _IMPORT_STRING.match(reference):
        msg = (
            f'plugin reference "{reference}" must be a built-in name '
            'or in format "<module>:<Class>"'
        )
        raise PluginNotFound(msg)
    module_name, _, attribute = reference.partition(":")
    try:
        target: object = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            msg = f'plugin "{reference}": module "{module_name}" not found'
            raise PluginNotFound(msg) from exc
        msg = f'plugin "{reference}": importing "{module_name}" failed: {exc}'
        raise PluginLoadError(msg) from exc
    except Exception as exc:
        msg = f'plugin "{reference}": importing "{module_name}" failed: {type(exc).__name__}: {exc}'
        raise PluginLoadError(msg) from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            msg = f'plugin "{reference}": module "{module_name}" has no attribute "{attribute}"'
            raise PluginNotFound(msg) from exc
    return target


def _entry_point(name: str) -> str | None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return str(entry.value)
    return None


def available() -> dict[str, str]:
    """Every plugin name that resolves without ``module:``: built-ins and entry points."""
    found = {e.name: str(e.value) for e in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {**found, **BUILTINS}


def resolve(reference: str) -> type[ModelPlugin]:
    """The plugin class a reference names.

    >>> resolve("identity").__name__
    'Identity'

    Raises:
        PluginNotFound: nothing of that name, or it is not a ModelPlugin subclass.
        PluginLoadError: the plugin's module failed to import.
    """
    target_string = BUILTINS.get(reference) or _entry_point(reference)
    if target_string is None:
        if ":" not in reference:
            known = ", ".join(sorted(available()))
            msg = (
                f'unknown plugin "{reference}" '
                f'(built-in and installed: {known}; or use "module:Class")'
            )
            raise PluginNotFound(msg)
        target_string = reference
    target = import_from_string(target_string)
    if not (isinstance(target, type) and issubclass(target, ModelPlugin)):
        msg = f'plugin "{reference}" resolves to {target!r}, which is not a ModelPlugin subclass'
        raise PluginNotFound(msg)
    return target


__all__ = ["BUILTINS", "ENTRY_POINT_GROUP", "available", "import_from_string", "resolve"]
