"""A picture of a pipeline's DAG (``dagserve graph PIPELINE.yaml -o FILE.svg``).

Pipeline inputs are drawn as inverted houses, outputs as houses, nodes as boxes labelled with
their name and plugin.  What may be absent at run time (an optional input, and whatever a node
that needs one produces) is drawn dashed and grey; ``join: available`` nodes have a double
border and say so.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from dag.errors import RenderError
from dag.graph import INPUTS, OUTPUTS
from dag.pipeline import Pipeline
from dag.schema import Ref

if TYPE_CHECKING:  # imported when drawing: serving never needs graphviz
    import graphviz

#: file suffix -> graphviz output format
FORMATS = {".svg": "svg", ".png": "png"}

#: how a tensor that may be absent is drawn
_MAYBE = {"style": "dashed", "color": "grey50", "fontcolor": "grey40"}


def render(pipeline: Pipeline, out_path: str | Path) -> Path:
    """Draw ``pipeline`` into ``out_path``, as SVG or PNG by its suffix.

    Args:
        pipeline: a loaded pipeline.
        out_path: the picture to write; ``.svg`` or ``.png``.

    Returns:
        The path written.

    Raises:
        ValueError: the suffix is neither ``.svg`` nor ``.png``.
        RenderError: graphviz's ``dot`` is not installed, or failed.
    """
    out_path = Path(out_path)
    fmt = FORMATS.get(out_path.suffix.lower())
    if fmt is None:
        msg = f"the picture must be .svg or .png (got {out_path.name!r})"
        raise ValueError(msg)
    if shutil.which("dot") is None:
        msg = (
            "graphviz's `dot` program is not installed: install the Debian package "
            "`graphviz` (apt-get install graphviz) to draw pipelines"
        )
        raise RenderError(msg)
    import graphviz

    try:
        data = to_dot(pipeline).pipe(format=fmt)
    except graphviz.ExecutableNotFound as exc:
        msg = "graphviz's `dot` program is not installed: install the Debian package `graphviz`"
        raise RenderError(msg) from exc
    except (subprocess.CalledProcessError, OSError) as exc:
        msg = f"graphviz's `dot` failed to draw {pipeline.name!r}: {exc}"
        raise RenderError(msg) from exc
    out_path.write_bytes(data)
    return out_path


def maybe_absent(pipeline: Pipeline) -> set[str]:
    """The nodes that a request may skip, because they need an optional input.

    A ``join: all`` node is skipped when one wired input is absent; a ``join: available``
    node only when all of them are.
    """
    skipped: set[str] = set()
    for name in pipeline.order:
        node = pipeline.spec.nodes[name]
        absent = [
            _maybe_absent(pipeline, ref, skipped) for ref in pipeline.plan.refs[name].values()
        ]
        if absent and (all(absent) if node.join == "available" else any(absent)):
            skipped.add(name)
    return skipped


def _maybe_absent(pipeline: Pipeline, ref: Ref, skipped: set[str]) -> bool:
    if ref.is_input:
        return pipeline.input_specs[ref.name].optional
    return ref.source in skipped


def to_dot(pipeline: Pipeline) -> graphviz.Digraph:
    """The graphviz description of ``pipeline`` (what :func:`render` draws)."""
    import graphviz

    dot = graphviz.Digraph(
        name=pipeline.name,
        graph_attr={"rankdir": "LR", "label": _title(pipeline), "fontname": "Helvetica"},
    )
    dot.attr("node", fontname="Helvetica", fontsize="11")
    dot.attr("edge", fontname="Helvetica", fontsize="9")
    for name, declared in pipeline.input_specs.items():
        style = {**_MAYBE, "style": "dashed"} if declared.optional else {}
        label = f"{name}\n{declared.describe()}" + ("\noptional" if declared.optional else "")
        dot.node(_input_id(name), label, shape="invhouse", **style)
    skipped = maybe_absent(pipeline)
    for name in pipeline.order:
        node = pipeline.spec.nodes[name]
        label = f"{name}\n{node.plugin}"
        attrs = {"shape": "box", "style": "rounded"}
        if node.join == "available":
            label += "\njoin: available"
            attrs["peripheries"] = "2"
        if name in skipped:
            attrs = {**attrs, **_MAYBE, "style": "rounded,dashed"}
        dot.node(_node_id(name), label, **attrs)
        for local, ref in pipeline.plan.refs[name].items():
            _edge(dot, pipeline, ref, _node_id(name), local, skipped)
    for output, ref in pipeline.plan.outputs.items():
        spec = pipeline.output_specs.get(output)
        label = output + (f"\n{spec.describe()}" if spec is not None else "")
        dot.node(_output_id(output), label, shape="house")
        _edge(dot, pipeline, ref, _output_id(output), output, skipped)
    return dot


def _edge(
    dot: graphviz.Digraph, pipeline: Pipeline, ref: Ref, head: str, local: str, skipped: set[str]
) -> None:
    tail = _input_id(ref.name) if ref.is_input else _node_id(ref.source)
    label = ref.name if ref.name == local else f"{ref.name} → {local}"
    style = _MAYBE if _maybe_absent(pipeline, ref, skipped) else {}
    dot.edge(tail, head, label=label, **style)


def _title(pipeline: Pipeline) -> str:
    return f"{pipeline.name} v{pipeline.version}"


# Ids keep pseudo nodes apart from real ones: a node and an input may share a name.
def _input_id(name: str) -> str:
    return f"{INPUTS}.{name}"


def _output_id(name: str) -> str:
    return f"{OUTPUTS}.{name}"


def _node_id(name: str) -> str:
    return f"node.{name}"


__all__ = ["FORMATS", "maybe_absent", "render", "to_dot"]
