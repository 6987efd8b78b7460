"""Plugins are inspected out of process: the front process never imports a framework."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from engine.runtime.inspector import InspectedPlugin, InspectingResolver, inspect_plugins
from engine.transport.client import Client
from model_plugins import PluginError, PluginLoadError, TensorSpec
from model_plugins.errors import PluginNotFound
from tests.serving import PIPELINES, ROOT, serving

FRAMEWORKS = ("torch", "tensorflow", "paddle")


def test_inspector_reads_declarations_of_a_plugin_in_another_process():
    found = inspect_plugins(["tests.plugins:Scale", "tests.plugins:Nope", "no.such.module:X"])
    scale = found["tests.plugins:Scale"]
    assert scale.outputs["y"].describe() == "float32[?]"
    assert scale.framework is None
    assert isinstance(found["tests.plugins:Nope"], PluginNotFound)
    assert isinstance(found["no.such.module:X"], PluginNotFound)


@pytest.mark.slow
@pytest.mark.frameworks
def test_tensorflow_then_paddle_plugins_serve_in_one_server():
    # The single inspector process that imports both modules crashes (SIGSEGV); the inspector
    # then reads each module in its own process. Each model runs in its framework's worker.
    with serving([PIPELINES / "tf_then_paddle.yaml"]) as server:
        with Client("127.0.0.1", server.port) as client:
            result = client.infer("tf_then_paddle", {"x": np.array([[1, 2]], np.float32)})
        np.testing.assert_array_equal(result.outputs["y"], [[6, 12]])
        workers = server.engine.workers.statistics()
        assert set(workers) == {"tensorflow@cpu", "paddle@cpu"}
    for name in FRAMEWORKS:
        assert name not in sys.modules, f"the test process imported {name}"


@pytest.mark.slow
@pytest.mark.frameworks
def test_a_crashing_combination_is_inspected_one_plugin_at_a_time(caplog):
    tf, paddle = "tests.fwplugins.tf_top:TfDouble", "tests.fwplugins.paddle_top:PaddleTriple"
    found = inspect_plugins([tf, paddle])  # this order segfaults in one process
    assert found[tf].framework == "tensorflow"
    assert found[paddle].framework == "paddle"
    assert "exit code -11" in caplog.text


@pytest.mark.slow
@pytest.mark.frameworks
def test_loading_for_serving_imports_no_framework_in_the_front_process():
    script = textwrap.dedent(
        f"""
        import sys
        from engine.runtime.loading import load_for_serving
        pipelines, errors = load_for_serving([{str(PIPELINES / "tf_then_paddle.yaml")!r}])
        assert not errors, errors
        assert pipelines[0].plugin_classes["tf_double"].framework == "tensorflow"
        print(sorted(n for n in {FRAMEWORKS!r} if n in sys.modules))
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300,
        check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


SIGNATURES = """
from model_plugins import ModelPlugin, Params, TensorSpec


class MirrorsError(Exception):
    pass


class Mirrors(ModelPlugin):
    @classmethod
    def signature(cls, params, upstream):
        if params.get("fail") == "own":
            raise MirrorsError("an error class of the plugin's own")
        if params.get("fail") == "builtin":
            raise KeyError("width")
        Params(params, ("fail",))
        known = {name: spec for name, spec in upstream.items() if spec is not None}
        return known, known
"""


def test_a_stand_in_runs_the_plugins_own_signature_in_the_inspector(tmp_path, monkeypatch):
    (tmp_path / "mirrors_plugins.py").write_text(SIGNATURES, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = TensorSpec("float32", [3])
    with InspectingResolver() as resolver:
        stand_in = resolver("mirrors_plugins:Mirrors")
        assert issubclass(stand_in, InspectedPlugin)
        assert stand_in.signature({}, {"x": x, "y": None}) == ({"x": x}, {"x": x})
        with pytest.raises(KeyError, match="width"):  # a built-in exception crosses as itself
            stand_in.signature({"fail": "builtin"}, {})
        # the plugin's own class would import its module here: it crosses as text
        with pytest.raises(PluginLoadError, match=r"mirrors_plugins\.MirrorsError: an error"):
            stand_in.signature({"fail": "own"}, {})
        with pytest.raises(PluginLoadError, match=r"^unknown params: size \(known: fail\)"):
            stand_in.signature({"size": 1}, {})
    with pytest.raises(PluginError, match="after the inspector closed"):
        stand_in.signature({}, {})
    assert "mirrors_plugins" not in sys.modules
