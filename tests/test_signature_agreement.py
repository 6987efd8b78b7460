"""One plugin, one judgement: a plugin whose specs depend on its params (``signature``
overridden) is judged alike by ``dagserve validate``, by ``dagserve serve``'s loading (which
runs ``signature`` in the inspector process, node by node) and by ``PluginHarness``.

The plugin's class attributes say ``y`` is float32[-1]; only its ``signature`` knows the width
(``params.dim``).  A check of the class attributes alone would pass every wiring below.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.runtime.loading import load_for_serving
from engine.transport.client import Client
from model_plugins import PluginError, PluginHarness, PluginLoadError, TensorSpec
from tests.serving import ROOT, serving

PLUGINS = '''
import numpy as np

from model_plugins import Batch, LoadContext, ModelPlugin, Params, Signature, TensorSpec


class Widen(ModelPlugin):
    """y: each item's x repeated params.dim times."""

    inputs = {"x": TensorSpec("float32", [])}
    outputs = {"y": TensorSpec("float32", [-1])}  # the width is the node's: see signature
    known_params = ("dim",)

    @classmethod
    def signature(cls, params, upstream) -> Signature:
        dim = Params(params, cls.known_params).positive_int("dim", 2)
        return dict(cls.inputs), {"y": TensorSpec("float32", [dim])}

    def load(self, context: LoadContext) -> None:
        self.dim = Params.of(context, self.known_params).positive_int("dim", 2)

    def predict(self, batch: Batch) -> Batch:
        return {"y": np.repeat(batch["x"][:, None], self.dim, axis=1)}


class Sum4(ModelPlugin):
    """s: the sum of four values."""

    inputs = {"y": TensorSpec("float32", [4])}
    outputs = {"s": TensorSpec("float32", [])}

    def predict(self, batch: Batch) -> Batch:
        return {"s": batch["y"].sum(axis=1)}
'''

PIPELINE = """
name: widen
inputs:
  x: {{dtype: float32}}
nodes:
  widen:
    plugin: {module}:Widen
    params: {{dim: {dim}}}
    inputs: {{x: $inputs.x}}
  total:
    plugin: {module}:Sum4
    inputs: {{y: widen.y}}
outputs:
  s: total.s
"""

#: what all three say of a float32[3] wired into a float32[4] input
WRONG_WIDTH = "input 'y' must be float32[4] (got float32[3]"
#: what all three say of a dim that is no width
BAD_DIM = "params.dim must be a positive integer (got 0)"
X = TensorSpec("float32", [])


def write_case(folder: Path, module: str, dim: int) -> Path:
    """The plugin module and a pipeline beside it, as a user lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(textwrap.dedent(PLUGINS), encoding="utf-8")
    path = folder / f"dim{dim}.yaml"
    path.write_text(PIPELINE.format(module=module, dim=dim), encoding="utf-8")
    return path


def dagserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("command", ["validate", "serve"])
def test_the_command_line_judges_by_the_plugins_signature(tmp_path: Path, command: str) -> None:
    wrong = dagserve(command, str(write_case(tmp_path, "widen_cli", 3)))
    assert wrong.returncode == 1
    assert f"node 'total': {WRONG_WIDTH} from widen.y)" in wrong.stderr
    bad = dagserve(command, str(write_case(tmp_path, "widen_cli", 0)))
    assert bad.returncode == 1
    assert BAD_DIM in bad.stderr
    if command == "validate":
        right = dagserve(command, str(write_case(tmp_path, "widen_cli", 4)))
        assert right.returncode == 0, right.stderr


def test_loading_for_serving_asks_the_signature_per_node_without_importing_it(
    tmp_path: Path,
) -> None:
    pipelines, errors = load_for_serving([write_case(tmp_path / "a", "widen_front", 3)])
    assert not pipelines
    assert [f"node 'total': {WRONG_WIDTH} from widen.y)" in str(e) for e in errors] == [True]
    pipelines, errors = load_for_serving([write_case(tmp_path / "b", "widen_front", 4)])
    assert not errors, errors
    assert pipelines[0].node_signatures["widen"][1] == {"y": TensorSpec("float32", [4])}
    assert "widen_front" not in sys.modules  # the front process never imported the plugin


@pytest.mark.parametrize("isolated", [False, True], ids=["in_process", "isolated"])
def test_the_harness_judges_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: bool
) -> None:
    write_case(tmp_path, "widen_harness", 4)
    monkeypatch.syspath_prepend(str(tmp_path))  # the isolated worker inherits sys.path
    with PluginHarness("widen_harness:Widen", params={"dim": 3}, isolated=isolated) as widen:
        _, produced = widen.signature({"x": X})
    with (
        pytest.raises(PluginError, match="^node 'harness' .*: " + re.escape(WRONG_WIDTH)),
        PluginHarness("widen_harness:Sum4", upstream=produced, isolated=isolated),
    ):
        pass
    with (
        pytest.raises(PluginLoadError, match=re.escape(BAD_DIM)),
        PluginHarness("widen_harness:Widen", params={"dim": 0}, isolated=isolated),
    ):
        pass
    with PluginHarness("widen_harness:Widen", params={"dim": 4}, isolated=isolated) as widen:
        _, produced = widen.signature({"x": X})
        y = widen.predict({"x": [1.0, 2.0]})["y"]
    with PluginHarness("widen_harness:Sum4", upstream=produced, isolated=isolated) as total:
        np.testing.assert_array_equal(total.predict({"y": y})["s"], [4.0, 8.0])


@pytest.mark.e2e
def test_the_served_pipeline_runs_with_the_width_its_signature_gave(tmp_path: Path) -> None:
    with (
        serving([write_case(tmp_path, "widen_served", 4)]) as server,
        Client("127.0.0.1", server.port) as client,
    ):
        result = client.infer("widen", {"x": np.array([1.0, 2.0], np.float32)})
    np.testing.assert_array_equal(result.outputs["s"], [4.0, 8.0])
