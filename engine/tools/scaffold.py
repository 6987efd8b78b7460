"""``dagserve new-plugin NAME``: a plugin skeleton whose own test passes as generated.

It writes ``NAME/NAME.py`` (the plugin), ``NAME/pipeline.yaml`` (a pipeline that serves it)
and ``NAME/test_NAME.py`` (the plugin through the SDK harness, in the server's worker code,
and the pipeline loaded as ``dagserve serve`` loads it).
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path

_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")

PLUGIN = '''"""{title}: a dagserve plugin.

Served by pipeline.yaml beside this file; tested by test_{name}.py (run: pytest {name}).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from model_plugins import Batch, LoadContext, ModelPlugin, Params, TensorSpec


class {cls}(ModelPlugin):
    """Scores each item: a weighted sum of its features, squashed into (0, 1)."""

    # One item's specs; the engine adds the item dimension and checks both directions.
    # (Specs that depend on params: override the class method signature(params, upstream).)
    inputs: ClassVar = {{"features": TensorSpec("float32", [-1])}}
    outputs: ClassVar = {{"score": TensorSpec("float32", [])}}
    # framework = "torch"   # set it when load/predict use a framework: picks the worker
    known_params: ClassVar = ("scale",)

    def load(self, context: LoadContext) -> None:
        # Runs once per instance, in the worker process, before any predict.
        # context.model_path is the node's `model:`; context.params its `params:`, read
        # through Params: an unknown key or a bad value is a PluginLoadError naming the node.
        self.scale = Params.of(context, self.known_params).number("scale", 1.0)

    def predict(self, batch: Batch) -> Batch:
        # batch["features"] is N x D (N items, maybe from several requests): return N scores.
        features = batch["features"]
        logits = features.mean(axis=1) * self.scale
        return {{"score": (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)}}
'''

PIPELINE = """# Serve it: dagserve serve {name}/pipeline.yaml
# Call it:  dagserve infer --pipeline {name} --input 'features=[0.5, 1.0, 1.5]'
name: {name}
version: "1"
inputs:
  features: {{dtype: float32, shape: [-1]}}
nodes:
  score:
    plugin: {name}:{cls}        # {name}.py beside this file
    params: {{scale: 2.0}}
    inputs: {{features: $inputs.features}}
outputs:
  score: score.score
"""

TEST = '''"""Tests of {cls}: run them with `pytest {name}`."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # so that `{name}:{cls}` imports, here and in the worker

from engine.runtime.loading import load_for_serving  # noqa: E402
from model_plugins import BatchContractError, PluginHarness, PluginLoadError  # noqa: E402


def test_scores_each_item_in_a_worker_like_the_servers():
    with PluginHarness("{name}:{cls}", params={{"scale": 2.0}}, isolated=True) as plugin:
        out = plugin.predict({{"features": np.array([[0.0, 0.0], [1.0, 3.0]], np.float32)}})
    assert out["score"].shape == (2,)
    np.testing.assert_allclose(out["score"], [0.5, 1 / (1 + np.exp(-4.0))], rtol=1e-6)


def test_the_harness_checks_the_batch_contract():
    class Broken(__import__("{name}").{cls}):
        def predict(self, batch):
            return {{"score": np.zeros(len(batch["features"]) + 1, np.float32)}}

    with PluginHarness(Broken) as plugin, pytest.raises(BatchContractError) as info:
        plugin.predict({{"features": np.ones((3, 2), np.float32)}})
    assert (info.value.expected, info.value.actual) == (3, 4)


def test_a_bad_param_is_refused_at_load():
    with pytest.raises(PluginLoadError, match="params.scale must be a number"):
        with PluginHarness("{name}:{cls}", params={{"scale": "big"}}, isolated=True):
            pass


def test_the_pipeline_is_valid():
    # as `dagserve validate` and `dagserve serve` load it
    pipelines, errors = load_for_serving([HERE / "pipeline.yaml"])
    assert not errors, errors
    assert pipelines[0].name == "{name}"
    assert pipelines[0].output_specs["score"].dtype == "float32"
'''


def new_plugin(name: str, where: Path) -> Path:
    """Write the skeleton of plugin ``name`` into ``where/name``; return that folder.

    Raises:
        ValueError: ``name`` is not a lower-case identifier, or the folder exists.
    """
    if not _NAME.match(name) or keyword.iskeyword(name):
        msg = f"a plugin name must be a lower-case Python identifier like my_scorer (got {name!r})"
        raise ValueError(msg)
    folder = where / name
    if folder.exists():
        msg = f"{folder} already exists; choose another name or remove it"
        raise ValueError(msg)
    cls = "".join(part.capitalize() for part in name.split("_") if part) or "Plugin"
    title = name.replace("_", " ").capitalize()
    values = {"name": name, "cls": cls, "title": title}
    folder.mkdir(parents=True)
    (folder / f"{name}.py").write_text(PLUGIN.format(**values), encoding="utf-8")
    (folder / "pipeline.yaml").write_text(PIPELINE.format(**values), encoding="utf-8")
    (folder / f"test_{name}.py").write_text(TEST.format(**values), encoding="utf-8")
    return folder


__all__ = ["new_plugin"]
