"""The compiled pipeline: a checked spec with its graph, plugin classes and tensor specs.

:func:`load_pipeline` is the one way from a YAML file to a :class:`Pipeline`; it raises
:class:`~dag.errors.PipelineInvalid` with every problem of the file at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from dag.errors import PipelineError, PipelineInvalid
from dag.graph import Resolver, Signature, analyze, build_graph
from dag.loader import SourceMap, load_spec
from dag.schema import PipelineSpec
from model_plugins.plugin import ModelPlugin
from model_plugins.registry import resolve
from model_plugins.specs import TensorSpec


@dataclass(frozen=True, eq=False)
class Pipeline:
    """A pipeline that passed every check; read-only (the graph is frozen).

    Build one with :func:`load_pipeline` or :meth:`from_spec`, not directly.

    Attributes:
        spec: the pipeline as written.
        path: the file it was loaded from; None for a pipeline built in code.
        graph: ``dag.graph.build_graph(spec)``, frozen.
        input_specs: pipeline input -> its spec.
        output_specs: pipeline output -> the spec of the tensor it names, None where unknown.
        node_signatures: node -> ``(inputs, outputs)`` specs.
        plugin_classes: node -> its plugin class.
        warnings: what is suspicious but runs (an input nothing reads).
        order: the nodes, producers first (ties in file order).
        source: where each part of the spec was written.
    """

    spec: PipelineSpec
    path: Path | None
    graph: nx.DiGraph
    input_specs: dict[str, TensorSpec]
    output_specs: dict[str, TensorSpec | None]
    node_signatures: dict[str, Signature]
    plugin_classes: dict[str, type[ModelPlugin]]
    warnings: list[PipelineError] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    source: SourceMap = field(default_factory=SourceMap)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def line_of(self, node: str) -> int | None:
        """The line where ``node`` is written, or None (built in code, or no such node)."""
        return self.source.lines.get(("nodes", node))

    @classmethod
    def from_spec(
        cls,
        spec: PipelineSpec,
        *,
        resolver: Resolver = resolve,
        path: Path | None = None,
        source: SourceMap | None = None,
    ) -> Pipeline:
        """Check ``spec`` and compile it.

        Args:
            spec: the pipeline.
            resolver: turns each ``plugin:`` reference into a class.
            path: the file the spec came from, if any.
            source: the lines of the spec's parts (:func:`dag.loader.load_spec`).

        Raises:
            PipelineInvalid: with every problem found.

        >>> spec = PipelineSpec.model_validate({
        ...     "name": "echo", "inputs": {"x": {"dtype": "float32", "shape": [3]}},
        ...     "nodes": {"a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}}},
        ...     "outputs": {"y": "a.x"},
        ... })
        >>> pipeline = Pipeline.from_spec(spec)
        >>> pipeline.order, pipeline.output_specs["y"].describe()
        (['a'], 'float32[3]')
        """
        source = source or SourceMap(str(path) if path is not None else None)
        graph = build_graph(spec)
        found = analyze(graph, spec, resolver=resolver, source=source)
        if found.errors:
            raise PipelineInvalid(found.errors)
        return cls(
            spec=spec,
            path=path,
            graph=nx.freeze(graph),
            input_specs=found.input_specs,
            output_specs=found.output_specs,
            node_signatures=found.node_signatures,
            plugin_classes=found.plugin_classes,
            warnings=found.warnings,
            order=found.order,
            source=source,
        )


def load_pipeline(path: str | Path, *, resolver: Resolver = resolve) -> Pipeline:
    """Load, check and compile a pipeline file.

    The file's folder is put at the front of ``sys.path`` (once) BEFORE plugins resolve, so
    that ``plugin: my_plugins:Encoder`` finds ``my_plugins.py`` next to the YAML.  It stays
    there: the plugins' modules are imported from it again when the pipeline is served.

    Args:
        path: the YAML file.
        resolver: turns each ``plugin:`` reference into a class.

    Returns:
        The compiled pipeline; its ``warnings`` hold what is suspicious but runs.

    Raises:
        PipelineInvalid: with every problem of the file, each with file, line and node.
    """
    path = Path(path)
    spec, source = load_spec(path)
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return Pipeline.from_spec(spec, resolver=resolver, path=path, source=source)


def load_pipelines(
    paths: Iterable[str | Path], *, resolver: Resolver = resolve
) -> tuple[list[Pipeline], list[PipelineError]]:
    """Load every file, collecting the problems of all of them (for ``dagserve validate``).

    Returns:
        ``(pipelines, errors)``: the files that loaded, and every error of those that did not.
        Warnings stay on each pipeline's ``warnings``.
    """
    pipelines: list[Pipeline] = []
    errors: list[PipelineError] = []
    for path in paths:
        try:
            pipelines.append(load_pipeline(path, resolver=resolver))
        except PipelineInvalid as exc:
            errors.extend(exc.errors)
    return pipelines, errors


__all__ = ["Pipeline", "load_pipeline", "load_pipelines"]
