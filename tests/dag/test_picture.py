"""dag/picture.py: the picture of a pipeline."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from dag import Pipeline, RenderError, load_pipeline, render
from dag.picture import maybe_absent, to_dot

CASES = Path(__file__).parent / "cases"

needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz `dot` not installed")


@pytest.fixture
def pipeline(monkeypatch: pytest.MonkeyPatch) -> Pipeline:
    monkeypatch.setattr(sys, "path", list(sys.path))
    return load_pipeline(CASES / "ok_valid.yaml")


def test_nodes_after_an_optional_input_may_be_absent(pipeline):
    # text_embed needs the optional text; fuse joins what is available, so it always runs.
    assert maybe_absent(pipeline) == {"text_embed"}


def test_description(pipeline):
    source = to_dot(pipeline).source
    assert '"node.embed" [label="embed\ntests.dag.fixtures:Embed"' in source
    assert "shape=invhouse" in source
    assert "shape=house" in source
    assert "join: available" in source
    assert "peripheries=2" in source
    # the optional input, its edge, the node that needs it and that node's edge: dashed grey
    assert source.count("style=dashed") == 3  # the input and two edges
    assert 'style="rounded,dashed"' in source
    assert source.count("color=grey50") == 4


@needs_dot
def test_svg(pipeline, tmp_path):
    out = render(pipeline, tmp_path / "p.svg")
    text = out.read_text()
    assert "<svg" in text
    assert "text_embed" in text
    assert "stroke-dasharray" in text  # dashed optional branch


@needs_dot
def test_png(pipeline, tmp_path):
    out = render(pipeline, tmp_path / "p.PNG")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_suffix_is_refused(pipeline, tmp_path):
    with pytest.raises(ValueError, match=r"must be \.svg or \.png \(got 'p\.pdf'\)"):
        render(pipeline, tmp_path / "p.pdf")


def test_missing_dot_says_what_to_install(pipeline, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RenderError, match="install the Debian package `graphviz`"):
        render(pipeline, tmp_path / "p.svg")
    assert not (tmp_path / "p.svg").exists()
