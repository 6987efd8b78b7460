"""What the two PyTorch adapters share: parameters, and tensors in and out of the model."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from model_plugins.adapters._base import Adapter, cuda_index, no_gpu
from model_plugins.params import Params
from model_plugins.plugin import Batch, LoadContext

if TYPE_CHECKING:
    import torch

#: the output name of a model that returns one tensor, when ``params.output_names`` is absent
DEFAULT_OUTPUT = "output"


class TorchAdapter(Adapter):
    """Feeds numpy batches to a loaded ``torch`` module, positionally, and names its outputs."""

    framework = "torch"

    def __init__(self) -> None:
        super().__init__()
        self.module: Callable[..., Any] | None = None
        self.device = "cpu"
        self.input_names: list[str] = []
        self.output_names: list[str] = [DEFAULT_OUTPUT]

    def read_names(self, params: Params) -> None:
        """Read ``params.input_names`` / ``params.output_names`` (before the model loads)."""
        self.input_names = params.names("input_names") or []
        self.output_names = params.names("output_names") or [DEFAULT_OUTPUT]

    def check_device(self, context: LoadContext) -> None:
        """Refuse a ``cuda:N`` that this process's torch cannot use, before loading onto it."""
        import torch

        index = cuda_index(context.device)
        if index is None:
            return
        if not torch.cuda.is_available():
            raise no_gpu(self.where, context.device, "torch", "torch.cuda.is_available() is False")
        if index >= torch.cuda.device_count():
            why = f"it sees {torch.cuda.device_count()} card(s)"
            raise no_gpu(self.where, context.device, "torch", why)

    def use(self, module: Any, context: LoadContext, forward_names: Sequence[str]) -> None:
        """Hold ``module`` in inference mode; its inputs default to forward's arguments."""
        module.eval()
        self.module = module
        self.device = context.device
        self.input_names = self.input_names or list(forward_names)

    def predict(self, batch: Batch) -> Batch:
        """Call the module with the inputs in order, under ``torch.inference_mode()``."""
        import torch

        if self.module is None:
            msg = "the model is not loaded"
            raise self.failure(msg)
        unknown = sorted(set(batch) - set(self.input_names))
        if unknown:
            msg = (
                f"unexpected inputs {', '.join(map(repr, unknown))} "
                f"(the model takes: {', '.join(self.input_names)})"
            )
            raise self.invalid(msg, field=f"inputs.{unknown[0]}")
        with torch.inference_mode():
            args = [self.tensor(name, batch) for name in self.input_names]
            result = self.module(*args)
            return self.name_outputs(result)

    def name_outputs(self, result: object) -> Batch:
        """A tensor, a tuple/list of tensors or a dict of tensors -> named numpy arrays."""
        import torch

        names = self.output_names
        if isinstance(result, torch.Tensor):
            if len(names) != 1:
                msg = (
                    f"the model returned one tensor but params.output_names names "
                    f"{len(names)}: {names}"
                )
                raise self.failure(msg)
            return {names[0]: self.array(names[0], result)}
        if isinstance(result, (tuple, list)):
            if len(result) != len(names):
                msg = (
                    f"the model returned {len(result)} tensors but params.output_names names "
                    f"{len(names)}: {names}"
                )
                raise self.failure(msg)
            return {
                name: self.array(name, value) for name, value in zip(names, result, strict=True)
            }
        if isinstance(result, Mapping):
            return {str(name): self.array(str(name), value) for name, value in result.items()}
        msg = f"the model returned {type(result).__name__}: expected a tensor, tuple, list or dict"
        raise self.failure(msg)

    def tensor(self, name: str, batch: Batch) -> torch.Tensor:
        """Input ``name`` of the batch as a tensor on the model's device."""
        import torch

        if name not in batch:
            msg = f"input {name!r} is missing"
            raise self.invalid(msg, field=f"inputs.{name}")
        array = batch[name]
        if array.dtype.kind in "OUS":
            msg = f"input {name!r} holds {array.dtype} values; a torch model takes numbers"
            raise self.invalid(msg, field=f"inputs.{name}.dtype")
        # from_numpy shares memory and warns on read-only arrays (decoded requests are read-only).
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = np.array(array, order="C", copy=True)
        return torch.from_numpy(array).to(self.device)

    def array(self, name: str, value: object) -> np.ndarray:
        """An output tensor as a numpy array."""
        import torch

        if not isinstance(value, torch.Tensor):
            msg = f"output {name!r} is a {type(value).__name__}, not a tensor"
            raise self.failure(msg)
        return value.detach().cpu().numpy()


__all__ = ["DEFAULT_OUTPUT", "TorchAdapter"]
