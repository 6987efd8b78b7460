"""``torchscript``: a TorchScript file (``torch.jit.save``), loaded with ``torch.jit.load``."""

from __future__ import annotations

import warnings
from typing import ClassVar

from model_plugins.adapters._base import model_path
from model_plugins.adapters._torch_common import TorchAdapter
from model_plugins.errors import PluginLoadError
from model_plugins.plugin import LoadContext


class TorchScriptAdapter(TorchAdapter):
    """Serves a TorchScript model (``torch.jit.trace`` or ``torch.jit.script``, then ``save``).

    The node::

        classify:
          plugin: torchscript
          model: models/classifier.pt      # the file torch.jit.save wrote
          inputs: {x: $inputs.pixels}      # forward's argument name -> reference
          outputs: {logits: {dtype: float32, shape: [10]}}
          params:
            output_names: [logits]         # default [output]
          device: cpu                      # or cuda:N

    Inputs go to ``forward`` positionally, in the order of ``params.input_names``; by default
    that is forward's own argument order and names (read from the TorchScript schema).  A
    TorchScript file does not say what it returns, so outputs are named by the adapter: a tensor
    gets the single name of ``params.output_names``, a tuple or list of tensors gets the names
    in order (their counts must agree), and a dict keeps its keys.  The file states no dtypes or
    shapes: declare the outputs in the node's ``outputs:``.

    Params:
        input_names (list[str]): forward's inputs, in positional order.
        output_names (list[str]): the names of what forward returns (default ``[output]``).

    The model runs in ``eval()`` mode under ``torch.inference_mode()`` on the node's device;
    read-only input arrays are copied before they become tensors.
    """

    known_params: ClassVar[tuple[str, ...]] = ("input_names", "output_names")

    def load(self, context: LoadContext) -> None:
        """Check the params, then ``torch.jit.load`` the file onto the node's device."""
        params = self.read_params(context)
        self.read_names(params)
        self.check_device(context)
        path = model_path(context, "a TorchScript file written by torch.jit.save")
        import torch

        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript in favour of torch.export; it still loads.
                warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated")
                module = torch.jit.load(str(path), map_location=context.device)  # type: ignore[no-untyped-call]
        except (RuntimeError, ValueError) as exc:
            msg = f"{params.where}: torch.jit.load({str(path)!r}) failed: {exc}"
            raise PluginLoadError(msg) from exc
        arguments = module.forward.schema.arguments[1:]  # [0] is self
        self.use(module, context, [argument.name for argument in arguments])


__all__ = ["TorchScriptAdapter"]
