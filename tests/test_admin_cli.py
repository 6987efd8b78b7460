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


def test_render_aligns_every_column():
    table = render([
        FakeState("calc", "1", weight=0.9, inflight=3),
        FakeState("calc", "2", state="failed", why="no such file", shadow=True,
                  sticky_header="x-user"),
    ])  # fmt: skip
    lines = table.splitlines()
    assert lines[0].split() == [
        "pipeline", "version", "state", "weight", "shadow", "sticky", "inflight", "why"
    ]  # fmt: skip
    assert lines[1].split() == ["calc", "1", "ready", "0.9", "3"]
    assert lines[2].split()[:7] == ["calc", "2", "failed", "0", "yes", "x-user", "0"]
    assert lines[2].endswith("  no such file")
    assert lines[1].index("0.9") == lines[0].index("weight")


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
    for verb in ("list", "load", "traffic", "reload", "unload", "--token-file", "--tls-ca"):
        assert verb in done.stdout
