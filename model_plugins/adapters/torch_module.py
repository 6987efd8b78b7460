"""``torch``: an ``nn.Module`` built by a factory function, with an optional state_dict."""

from __future__ import annotations

import importlib
import inspect
import pickle
from typing import Any, ClassVar

from model_plugins.adapters._base import model_path
from model_plugins.adapters._torch_common import TorchAdapter
from model_plugins.errors import PluginLoadError
from model_plugins.params import Params
from model_plugins.plugin import LoadContext


class TorchModuleAdapter(TorchAdapter):
    """Serves a PyTorch ``nn.Module`` built by your function, with weights from a state_dict.

    The node::

        embed:
          plugin: torch
          model: models/mlp_state.pt         # optional: torch.save(model.state_dict(), path)
          inputs: {x: $inputs.x}
          outputs: {embedding: {dtype: float32, shape: [4]}}
          params:
            factory: mypkg.models:make_mlp   # a function returning the nn.Module
            factory_kwargs: {width: 4}       # optional keyword arguments for it
            output_names: [embedding]

    The factory is imported in the worker (the pipeline file's folder is on ``sys.path``) and
    called with ``params.factory_kwargs``.  When ``model:`` is given, the file is read with
    ``torch.load(..., weights_only=True)`` and loaded with ``strict=True``: every key must match.
    Inputs and outputs follow the ``torchscript`` adapter's conventions; forward's argument
    names are read from its Python signature.

    Params:
        factory (str): ``module:function`` returning an ``nn.Module``; required.
        factory_kwargs (dict): keyword arguments for the factory.
        input_names (list[str]): forward's inputs, in positional order.
        output_names (list[str]): the names of what forward returns (default ``[output]``).
    """

    known_params: ClassVar[tuple[str, ...]] = (
        "factory",
        "factory_kwargs",
        "input_names",
        "output_names",
    )

    def load(self, context: LoadContext) -> None:
        """Build the module, load the state_dict if any, move it to the device, ``eval()``."""
        params = self.read_params(context)
        self.read_names(params)
        self.check_device(context)
        reference = params.string("factory")
        if reference is None or ":" not in reference:
            params.fail(f"params.factory must be 'module:function' (got {reference!r})")
        kwargs = params.values.get("factory_kwargs", {})
        if not (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)):
            params.fail(f"params.factory_kwargs must be a mapping (got {kwargs!r})")
        path = None
        if context.model_path is not None:
            path = model_path(context, "a state_dict file written by torch.save")
        factory = _import(reference, params)
        import torch

        try:
            module = factory(**kwargs)
        except Exception as exc:
            params.fail(f"params.factory {reference!r} raised {type(exc).__name__}: {exc}")
        if not isinstance(module, torch.nn.Module):
            params.fail(
                f"params.factory {reference!r} must return a torch.nn.Module "
                f"(got {type(module).__name__})"
            )
        if path is not None:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True)
                module.load_state_dict(state, strict=True)
            except (RuntimeError, ValueError, OSError, pickle.UnpicklingError) as exc:
                msg = f"{params.where}: loading the state_dict {str(path)!r} failed: {exc}"
                raise PluginLoadError(msg) from exc
        module.to(context.device)
        self.use(module, context, _positional_names(module.forward))


def _import(reference: str, params: Params) -> Any:
    module_name, _, attribute = reference.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        params.fail(f"params.factory {reference!r} cannot be imported: {exc}")
    if not callable(target):
        params.fail(f"params.factory {reference!r} must be callable (got {target!r})")
    return target


def _positional_names(function: Any) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]


__all__ = ["TorchModuleAdapter"]
