"""``dagserve admin``: its verbs, output and exit codes (0 done, 1 refused, 2 usage,
3 unauthorized or unreachable), against an admin port serving a fake lifecycle; the verbs
end to end against a real server are in ``test_every_verb_against_a_real_server``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main
from engine.tools.admin_cli import parse_weights, render
from engine.tools.ports import free_port
from engine.transport.admin import version_to_wire
from tests.engine.fake_lifecycle import FakeLifecycle, FakeState, admin_serving
from tests.serving import ROOT

TOKEN = "cli-token"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text(TOKEN)
    return path


def admin(port: int, *words: str, token_file: Path | None = None) -> int:
    options = ["--token-file", str(token_file)] if token_file else []
    return main(["admin", "--port", str(port), *options, *words])


def test_parse_weights():
    assert parse_weights(["1=90", "v2.1=10.5"]) == {"1": 90.0, "v2.1": 10.5}
    for bad in ("1", "=3", "1=x", "1=-1", "1=nan"):
        with pytest.raises(ValueError, match="VERSION=NUMBER"):
            parse_weights([bad])
    with pytest.raises(ValueError, match="VARIANT=NUMBER"):
        parse_weights(["fast"], "VARIANT")


def test_render_aligns_every_column():
    table = render([version_to_wire(state) for state in (
        FakeState("calc", "1", weight=0.9, inflight=3),
        FakeState("calc", "2", state="failed", why="no such file", shadow=True,
                  sticky_header="x-user"),
        FakeState("calc", "3", variants={"b": {"x": 0}, "a": {"x": 10, "y": 2.5}},
                  variant_shadows={"a": "z"}),
    )])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split() == [
        "pipeline", "version", "state", "weight", "shadow", "sticky", "inflight", "variants",
        "why",
    ]  # fmt: skip
    assert lines[1].split() == ["calc", "1", "ready", "0.9", "3"]
    assert lines[2].split()[:7] == ["calc", "2", "failed", "0", "yes", "x-user", "0"]
    assert lines[2].endswith("  no such file")
    assert lines[1].index("0.9") == lines[0].index("weight")
    # each node's variants (percent), the shadow named, nodes in order
    assert lines[3][lines[0].index("variants") :] == "a: x=10 y=2.5 z(shadow); b: x=0"


@pytest.mark.e2e
def test_verbs_output_and_exit_codes(token_file: Path, tmp_path: Path, capsys):
    lifecycle = FakeLifecycle()
    with admin_serving(lifecycle, admin_token_file=token_file) as server:
        port = server.port
        assert admin(port, "list", token_file=token_file) == 0
        assert "calc      1        ready  1" in capsys.readouterr().out
        pipeline = tmp_path / "calc_v2.yaml"
        pipeline.write_text("name: calc\n")
        assert admin(port, "load", str(pipeline), token_file=token_file) == 0
        assert capsys.readouterr().out == "loaded calc version 2 (ready, weight 0)\n"
        assert lifecycle.calls[-1] == ("load", pipeline.resolve())
        code = admin(port, "traffic", "calc", "1=90", "2=10", "--shadow", "2", "--sticky",
                     "x-user", token_file=token_file)  # fmt: skip
        assert code == 0
        assert lifecycle.calls[-1] == ("traffic", "calc", {"1": 90.0, "2": 10.0}, "2", "x-user")
        assert "x-user" in capsys.readouterr().out
        assert admin(port, "variants", "calc", "1", "double", "fast=30", token_file=token_file) == 0
        assert lifecycle.calls[-1] == ("variants", "calc", "1", "double", {"fast": 30.0})
        assert "double: fast=30 next(shadow)" in capsys.readouterr().out
        assert admin(port, "variants", "calc", "1", "post", "fast=1", token_file=token_file) == 1
        assert "refused: no node 'post' with variants" in capsys.readouterr().err
        assert admin(port, "variants", "calc", "1", "double", "fast", token_file=token_file) == 2
        assert "VARIANT=NUMBER" in capsys.readouterr().err
        assert admin(port, "reload", "calc", "2", "--in-place", token_file=token_file) == 0
        assert lifecycle.calls[-1] == ("reload", "calc", "2", True)
        assert admin(port, "unload", "calc", "1", token_file=token_file) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "unloaded calc version 1"
        # 1: refused, with the server's reason
        assert admin(port, "unload", "calc", "1", token_file=token_file) == 1
        assert "refused: no version '1' of 'calc'" in capsys.readouterr().err
        # 2: usage (argparse exits 2 itself), bad weights
        with pytest.raises(SystemExit) as caught:
            admin(port, "reload", "calc", token_file=token_file)
        assert caught.value.code == 2
        assert admin(port, "traffic", "calc", "2=lots", token_file=token_file) == 2
        # 3: unauthorized (no token, a wrong one), unreachable
        assert admin(port, "list") == 3
        assert "unauthorized" in capsys.readouterr().err
        wrong = tmp_path / "wrong.token"
        wrong.write_text("nope")
        assert admin(port, "list", token_file=wrong) == 3
    assert admin(free_port(), "list") == 3
    assert "cannot reach the admin port" in capsys.readouterr().err


def test_a_missing_token_file_is_a_usage_error(tmp_path: Path, capsys):
    assert admin(1, "list", token_file=tmp_path / "missing") == 2
    assert "cannot read" in capsys.readouterr().err


def test_dagserve_admin_help_is_its_own():
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "admin", "--help"], cwd=ROOT, capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0
    for verb in ("list", "load", "traffic", "variants", "reload", "unload", "--token-file"):
        assert verb in done.stdout


def _weights_pipeline(folder: Path, name: str, version: str, model: str) -> Path:
    path = folder / f"{name}_v{version}.yaml"
    path.write_text(
        f'name: {name}\nversion: "{version}"\ninputs:\n  x: {{dtype: float32, shape: [2]}}\n'
        f"nodes:\n  scale:\n    plugin: tests.plugins:Weights\n    runner: thread\n"
        f"    model: {model}\n    inputs: {{x: $inputs.x}}\noutputs:\n  y: scale.y\n"
    )
    return path


@pytest.mark.e2e
def test_every_verb_against_a_real_server(token_file: Path, tmp_path: Path, capsys):
    import numpy as np

    from engine.transport.client import Client
    from tests.serving import serving

    np.save(tmp_path / "w1.npy", np.array([1, 1], np.float32))
    np.save(tmp_path / "w2.npy", np.array([2, 2], np.float32))
    v1 = _weights_pipeline(tmp_path, "scale", "1", "w1.npy")
    v2 = _weights_pipeline(tmp_path, "scale", "2", "w2.npy")
    broken = _weights_pipeline(tmp_path, "scale", "3", "missing.npy")
    x = {"x": np.ones((1, 2), np.float32)}
    with (
        serving([v1], admin_port=0, admin_token_file=token_file) as server,
        Client("127.0.0.1", server.port) as client,
    ):

        def answer(**kw):
            result = client.infer("scale", x, **kw)
            return result.version, float(result.outputs["y"][0, 0])

        def run(*words: str) -> tuple[int, str, str]:
            code = admin(server.admin_port, *words, token_file=token_file)
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = run("list")
        assert code == 0
        assert out.splitlines()[1].split()[:4] == ["scale", "1", "ready", "1"]
        assert run("load", str(v2))[:2] == (0, "loaded scale version 2 (ready, weight 0)\n")
        assert answer() == ("1", 1.0)  # a later version takes no traffic until told
        assert answer(version="2") == ("2", 2.0)  # a request naming a version gets it
        code, _, err = run("load", str(broken))  # fails to load: changes nothing, says why
        assert code == 1
        assert "missing.npy" in err
        assert answer() == ("1", 1.0)
        code, out, _ = run("traffic", "scale", "1=50", "2=50", "--sticky", "x-user")
        assert code == 0
        assert "x-user" in out
        picks = {answer(headers={"x-user": "ada"}) for _ in range(20)}
        assert len(picks) == 1  # sticky: one user, one version
        assert run("traffic", "scale", "2=1")[0] == 0
        assert answer() == ("2", 2.0)
        np.save(tmp_path / "w2.npy", np.array([3, 3], np.float32))
        assert run("reload", "scale", "2")[:2] == (0, "reloaded scale version 2 (ready)\n")
        assert answer() == ("2", 3.0)
        assert run("unload", "scale", "1")[:2] == (0, "unloaded scale version 1\n")
        code, out, _ = run("list")
        rows = [line.split() for line in out.splitlines()[1:]]
        assert [row[:3] for row in rows] == [["scale", "2", "ready"], ["scale", "3", "failed"]]
        assert "missing.npy" in out  # a failed load stays listed, with why
        code, _, err = run("unload", "scale", "1")
        assert code == 1
        assert "refused" in err
        assert admin(server.admin_port, "list") == 3  # no token


@pytest.mark.e2e
def test_variants_verb_moves_a_node_split_on_a_real_server(token_file: Path, capsys):
    """``variants`` against a real server serving a node with a canary and a shadow
    (tests/pipelines/variants/split.yaml): the split follows the new weights at once."""
    import numpy as np

    from engine.transport.admin_client import AdminClient, AdminUnauthorized
    from engine.transport.client import Client
    from tests.serving import PIPELINES, serving

    x = {"x": np.ones((1, 2), np.float32)}
    with (
        serving([PIPELINES / "variants" / "split.yaml"], admin_port=0,
                admin_token_file=token_file) as server,
        Client("127.0.0.1", server.port) as client,
    ):  # fmt: skip

        def run(*words: str) -> tuple[int, str, str]:
            code = admin(server.admin_port, *words, token_file=token_file)
            out, err = capsys.readouterr()
            return code, out, err

        def labels(requests: int) -> set[tuple[str, float]]:
            """(the embed node's label in node_latency_us, y) of each reply."""
            replies = [client.infer("split", x) for _ in range(requests)]
            return {
                (next(k for k in r.node_latency_us if k.startswith("embed")), r.outputs["y"][0, 0])
                for r in replies
            }

        code, out, _ = run("list")
        assert code == 0
        assert "embed: candidate=10 next(shadow)" in out  # the YAML's weights
        code, out, _ = run("variants", "split", "1", "embed", "candidate=100")
        assert code == 0
        assert "embed: candidate=100 next(shadow)" in out
        assert labels(40) == {("embed@candidate", 2.0)}  # every reply from the canary
        assert run("variants", "split", "1", "embed", "candidate=0")[0] == 0
        assert labels(40) == {("embed", 1.0)}  # every reply from the node itself
        # refused, with the reason, changing nothing: an unknown variant, the shadow, a node
        # without variants, a version that is not served, weights over 100
        for words, why in [
            (("embed", "nope=5"), "variant 'nope' is not one of its variants"),
            (("embed", "next=5"), "variant 'next' is the shadow"),
            (("post", "candidate=5"), "node 'post' has no variants"),
            (("embed", "candidate=101"), "a weight is a percent from 0 to 100"),
        ]:
            code, _, err = run("variants", "split", "1", *words)
            assert code == 1, words
            assert "refused: pipeline 'split' version '1': " in err
            assert why in err
        code, _, err = run("variants", "split", "9", "embed", "candidate=5")
        assert (code, "no ready version '9'" in err) == (1, True)
        assert "embed: candidate=0 next(shadow)" in run("list")[1]
        assert labels(20) == {("embed", 1.0)}
        # no token: Unauthorized, and nothing changed
        assert admin(server.admin_port, "variants", "split", "1", "embed", "candidate=100") == 3
        assert "unauthorized" in capsys.readouterr().err
        with pytest.raises(AdminUnauthorized):
            AdminClient("127.0.0.1", server.admin_port, timeout_s=5).variants(
                "split", "1", "embed", {"candidate": 100}
            )
        assert labels(20) == {("embed", 1.0)}
