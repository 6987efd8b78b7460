"""The compiled pipeline: a checked spec with its graph, plugin classes and tensor specs,
its executor plan, its description, and the checks a request passes before it runs.

:func:`load_pipeline` is the one way from a YAML file to a :class:`Pipeline`; it raises
:class:`~dag.errors.PipelineInvalid` with every problem of the file at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np

from dag.errors import PipelineError, PipelineInvalid
from dag.executor import Plan
from dag.graph import OUTPUTS, Resolver, Signature, analyze, build_graph
from dag.loader import SourceMap, load_spec
from dag.schema import PipelineSpec
from model_plugins.contract import check_inputs
from model_plugins.errors import InvalidRequest
from model_plugins.plugin import ModelPlugin
from model_plugins.registry import resolve
from model_plugins.specs import TensorSpec


@dataclass(frozen=True)
class EdgeDescription:
    """One tensor along an edge of a :class:`PipelineDescription`."""

    source: str  # "$inputs" or a node
    target: str  # a node or "$outputs"
    tensor: str  # "NAME" for pipeline inputs, "NODE.OUTPUT" otherwise


@dataclass(frozen=True)
class PipelineDescription:
    """What the ``describe`` and ``list_pipelines`` calls answer about one pipeline, free of
    any wire format (``Pipeline.description``)."""

    name: str
    version: str
    inputs: dict[str, TensorSpec]
    #: None where no end declares the output's spec
    outputs: dict[str, TensorSpec | None]
    nodes: list[str]
    edges: list[EdgeDescription]


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
        variant_classes: node -> variant -> its plugin class (nodes with ``variants:``).
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
    variant_classes: dict[str, dict[str, type[ModelPlugin]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    def line_of(self, node: str) -> int | None:
        """The line where ``node`` is written, or None (built in code, or no such node)."""
        return self.source.lines.get(("nodes", node))

    @cached_property
    def plan(self) -> Plan:
        """What the executor runs (:func:`dag.executor.execute`), read off the graph."""
        return Plan.of(self.spec, self.graph)

    @cached_property
    def description(self) -> PipelineDescription:
        """The pipeline's signature and graph, as ``describe`` answers them."""
        edges = [
            EdgeDescription(ref.source, target, ref.name if ref.is_input else str(ref))
            for target, refs in [*self.plan.refs.items(), (OUTPUTS, self.plan.outputs)]
            for ref in refs.values()
        ]
        return PipelineDescription(
            name=self.name,
            version=self.version,
            inputs=dict(self.input_specs),
            outputs=dict(self.output_specs),
            nodes=list(self.spec.nodes),
            edges=edges,
        )

    @cached_property
    def required_inputs(self) -> frozenset[str]:
        """The inputs every request must carry."""
        return frozenset(n for n, s in self.input_specs.items() if not s.optional)

    def check_request(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> None:
        """Check one request against the pipeline's signature, before anything runs.

        Args:
            inputs: pipeline input name -> array, first dimension = items.
            outputs: the outputs asked for; None = all.

        Raises:
            InvalidRequest: an input the pipeline does not have, a required one missing, no
                input at all, a wrong dtype or item shape, inputs that disagree on the number
                of items, a NaN where ``allow_nan: false``, or an unknown output; ``field``
                names it (``inputs.NAME``, ``outputs``).
        """
        specs = self.input_specs
        for name in inputs:
            if name not in specs:
                msg = f"pipeline {self.name!r} has no input {name!r} (inputs: {', '.join(specs)})"
                raise InvalidRequest(msg, field=f"inputs.{name}")
        for name in self.required_inputs - inputs.keys():
            msg = f"required input {name!r} is missing ({specs[name].describe()} per item)"
            raise InvalidRequest(msg, field=f"inputs.{name}")
        if not inputs:
            msg = "the request carries no inputs"
            raise InvalidRequest(msg, field="inputs")
        # dtypes, item shapes, and the same number of items in every input
        check_inputs({n: specs[n] for n in inputs}, inputs, where="inputs")
        for name, array in inputs.items():
            if not self.spec.inputs[name].allow_nan and array.dtype.kind == "f":
                bad = np.isnan(array.reshape(len(array), -1)).any(axis=1) if array.size else []
                items = [int(i) for i in np.flatnonzero(bad)]
                if items:
                    msg = (
                        f"input {name!r} holds NaN in item(s) {items[:10]}, which the pipeline "
                        "does not allow (allow_nan: false)"
                    )
                    raise InvalidRequest(msg, field=f"inputs.{name}")
        if outputs is not None:
            unknown = [o for o in outputs if o not in self.spec.outputs]
            if unknown:
                known = ", ".join(self.spec.outputs)
                msg = f"unknown outputs requested: {', '.join(unknown)} (outputs: {known})"
                raise InvalidRequest(msg, field="outputs")

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
            variant_classes=found.variant_classes,
        )


def add_folder_to_path(path: str | Path) -> None:
    """Put the folder of the pipeline file ``path`` at the front of ``sys.path`` (once).

    Then ``plugin: my_plugins:Encoder`` finds ``my_plugins.py`` next to the YAML.  It stays
    there: the plugins' modules are imported from it again when the pipeline is served (and
    processes started later inherit it).
    """
    folder = str(Path(path).resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_pipeline(path: str | Path, *, resolver: Resolver = resolve) -> Pipeline:
    """Load, check and compile a pipeline file.

    The file's folder is put on ``sys.path`` (:func:`add_folder_to_path`) BEFORE plugins
    resolve.

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
    add_folder_to_path(path)
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


__all__ = [
    "EdgeDescription",
    "Pipeline",
    "PipelineDescription",
    "add_folder_to_path",
    "load_pipeline",
    "load_pipelines",
]
