"""``paddle``: a Paddle inference model (``paddle.jit.save``), run by a Paddle predictor."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from model_plugins.adapters._base import (
    Adapter,
    cast_input,
    cuda_index,
    model_path,
    no_gpu,
    spec_from,
)
from model_plugins.adapters._paddle_program import program_specs
from model_plugins.errors import PluginLoadError
from model_plugins.params import Params
from model_plugins.plugin import Batch, LoadContext

#: model file suffixes: PIR program (Paddle 3 default), then the legacy program
_MODEL_SUFFIXES = (".json", ".pdmodel")


class PaddleInferenceAdapter(Adapter):
    """Serves a Paddle inference model, as ``paddle.jit.save`` writes it.

    The node::

        rank:
          plugin: paddle
          model: models/ranker/inference     # prefix, .json, .pdmodel, or the folder
          inputs: {ids: $inputs.ids}         # Paddle input name -> reference
          params:
            output_names: [scores]           # renames the model's outputs, in order

    ``model:`` may be the prefix given to ``paddle.jit.save`` (``dir/inference``), its
    ``.json`` (PIR, the Paddle 3 default) or ``.pdmodel`` (legacy) file, or the folder holding
    exactly one of them; the ``.pdiparams`` file beside it holds the weights.  Inputs are fed by
    the names the predictor reports (``InputSpec(name=...)``).  Under PIR the outputs are called
    ``fetch_name_0``, ``fetch_name_1``...: ``params.output_names`` names them, in order.

    From a ``.json`` program the adapter reads each input's and output's dtype and shape and
    reports them (``loaded_inputs`` / ``loaded_outputs``); an input of another dtype is cast
    when nothing can be lost, else refused.  A legacy ``.pdmodel`` states nothing: declare the
    outputs in the node.

    Params:
        input_map (dict[str, str]): node-side input name -> Paddle input name.
        output_names (list[str]): node-side names of the outputs, in the model's order.
        onednn (bool): use oneDNN kernels on CPU (default false: bit-exact results and no
            stray prints; true is faster on large models, with ~1e-7 differences).
        cpu_threads (int): math library threads of this instance.
    """

    framework = "paddle"
    known_params: ClassVar[tuple[str, ...]] = ("input_map", "output_names", "onednn", "cpu_threads")

    def __init__(self) -> None:
        super().__init__()
        self.predictor: Any = None
        self.to_paddle: dict[str, str] = {}  # node input name -> Paddle input name
        self.fetch_names: dict[str, str] = {}  # node output name -> Paddle output name
        self.input_dtypes: dict[str, np.dtype[Any]] = {}  # node input name -> declared dtype

    def load(self, context: LoadContext) -> None:
        """Find the model files, create one predictor, read the declared specs."""
        params = self.read_params(context)
        input_map = params.mapping("input_map")
        output_names = params.names("output_names")
        onednn = params.flag("onednn", False)
        threads = params.positive_int("cpu_threads")
        model_file, params_file = _model_files(context, params)
        with warnings.catch_warnings():
            # Every import of paddle warns that ccache (a compiler cache) is missing.
            warnings.filterwarnings("ignore", "No ccache found")
            import paddle
            import paddle.inference

        config = paddle.inference.Config(str(model_file), str(params_file))
        config.disable_glog_info()
        index = cuda_index(context.device)
        if index is not None:
            if not paddle.device.is_compiled_with_cuda():
                why = "paddle.device.is_compiled_with_cuda() is False"
                raise no_gpu(params.where, context.device, "Paddle", why)
            config.enable_use_gpu(256, index)
        else:
            config.disable_gpu()
            if onednn:
                config.enable_mkldnn()
            else:
                config.disable_mkldnn()
            if threads is not None:
                config.set_cpu_math_library_num_threads(threads)
        try:
            self.predictor = paddle.inference.create_predictor(config)
        except (RuntimeError, ValueError, OSError) as exc:
            msg = f"{params.where}: creating a Paddle predictor for {model_file} failed: {exc}"
            raise PluginLoadError(msg) from exc
        inputs = list(self.predictor.get_input_names())
        outputs = list(self.predictor.get_output_names())
        by_paddle = {paddle_name: node for node, paddle_name in input_map.items()}
        for node, paddle_name in input_map.items():
            if paddle_name not in inputs:
                params.fail(
                    f"params.input_map: {node!r} must name a model input "
                    f"({', '.join(inputs)}) (got {paddle_name!r})"
                )
        self.to_paddle = {by_paddle.get(name, name): name for name in inputs}
        if output_names is not None and len(output_names) != len(outputs):
            params.fail(
                f"params.output_names must name the model's {len(outputs)} outputs "
                f"({', '.join(outputs)}) (got {output_names})"
            )
        self.fetch_names = dict(zip(output_names or outputs, outputs, strict=True))
        if model_file.suffix == ".json":
            self._read_specs(model_file, params)

    def _read_specs(self, model_file: Path, params: Params) -> None:
        declared = program_specs(model_file)
        if declared is None:
            return
        feeds, fetches = declared
        same_feeds = set(feeds) == set(self.to_paddle.values())
        if not (same_feeds and set(fetches) == set(self.fetch_names.values())):
            return  # the program and the predictor disagree: state nothing rather than guess
        self.loaded_inputs = {}
        for node, name in self.to_paddle.items():
            dtype, shape = feeds[name]
            self.loaded_inputs[node] = spec_from(dtype, shape, f"{params.where}: input {name!r}")
            self.input_dtypes[node] = np.dtype(dtype)
        self.loaded_outputs = {
            node: spec_from(*fetches[name], f"{params.where}: output {name!r}")
            for node, name in self.fetch_names.items()
        }

    def predict(self, batch: Batch) -> Batch:
        """Feed the inputs by name, run the predictor, copy the outputs out."""
        if self.predictor is None:
            msg = "the model is not loaded"
            raise self.failure(msg)
        for name in batch:
            if name not in self.to_paddle:
                takes = ", ".join(self.to_paddle)
                msg = f"unexpected input {name!r} (the model takes: {takes})"
                raise self.invalid(msg, field=f"inputs.{name}")
        for node, name in self.to_paddle.items():
            if node not in batch:
                takes = ", ".join(self.to_paddle)
                msg = f"input {node!r} is missing (the model takes all of: {takes})"
                raise self.invalid(msg, field=f"inputs.{node}")
            array = batch[node]
            if node in self.input_dtypes:
                array = cast_input(node, array, self.input_dtypes[node], "model", self.where)
            handle = self.predictor.get_input_handle(name)
            handle.reshape(list(array.shape))
            handle.copy_from_cpu(np.ascontiguousarray(array))
        self.predictor.run()
        return {
            node: self.predictor.get_output_handle(name).copy_to_cpu()
            for node, name in self.fetch_names.items()
        }

    def unload(self) -> None:
        """Drop the predictor."""
        self.predictor = None


def _model_files(context: LoadContext, params: Params) -> tuple[Path, Path]:
    """``(model file, params file)`` from ``model:``: a prefix, a model file or a folder."""
    what = "a Paddle inference model: prefix, .json, .pdmodel or their folder"
    path = context.model_path
    if path is not None and not Path(path).exists():
        candidates = [Path(f"{path}{suffix}") for suffix in _MODEL_SUFFIXES]
        found = [c for c in candidates if c.is_file()]
        if found:
            path = found[0]
    path = model_path(replace(context, model_path=path), what)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in _MODEL_SUFFIXES and p.is_file())
        if len(found) != 1:
            params.fail(
                f"model: folder {path} must hold exactly one .json or .pdmodel file "
                f"(got {len(found)}: {', '.join(p.name for p in found) or 'none'})"
            )
        path = found[0]
    elif path.suffix not in _MODEL_SUFFIXES:
        params.fail(f"model: must be {what} (got {path})")
    params_file = path.with_suffix(".pdiparams")
    if not params_file.is_file():
        params.fail(f"model: the weights file {params_file} is missing (next to {path.name})")
    return path, params_file


__all__ = ["PaddleInferenceAdapter"]
