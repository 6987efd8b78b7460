"""Load pipeline files for serving: plugins other than built-ins are inspected, not imported.

The front process never imports a ``module:Class`` plugin (it may import a framework at its
top): :class:`~engine.runtime.inspector.InspectingResolver` reads their declarations in a spawned
process, all at once, before the pipelines are validated, and runs the ``signature`` of those
that work out their own specs there, node by node, while they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dag.errors import PipelineError
from dag.pipeline import Pipeline, add_folder_to_path, load_pipelines
from engine.runtime.inspector import InspectingResolver


def plugin_references(paths: Iterable[Path]) -> set[str]:
    """Every ``plugin:`` named in the files (unreadable files are left to the validator)."""
    found: set[str] = set()
    for path in paths:
        try:
            data: Any = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            continue
        nodes = data.get("nodes") if isinstance(data, dict) else None
        if isinstance(nodes, dict):
            for node in nodes.values():
                if isinstance(node, dict) and isinstance(node.get("plugin"), str):
                    found.add(node["plugin"])
    return found


def load_for_serving(paths: Iterable[Path]) -> tuple[list[Pipeline], list[PipelineError]]:
    """Validate pipeline files as ``dag.load_pipelines`` does, inspecting plugins out of process."""
    paths = [Path(p) for p in paths]
    # The loader puts each pipeline's folder on sys.path for `module:Class` beside the YAML;
    # the inspector's process inherits sys.path, so put them there before it starts.
    for path in paths:
        add_folder_to_path(path)
    # The inspector stays up while the pipelines load: the validator asks it for the
    # signature of each node whose plugin works out its own specs.
    with InspectingResolver() as resolver:
        resolver.prefetch(plugin_references(paths))
        return load_pipelines(paths, resolver=resolver)


__all__ = ["load_for_serving", "plugin_references"]
