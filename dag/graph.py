"""The DAG of a pipeline as an ``nx.DiGraph``, and the checks a pipeline must pass to load.

Functions in networkx style: they take the spec or the graph first and return plain values.

* :func:`build_graph`: nodes are the pipeline's node names plus the pseudo nodes ``$inputs``
  and ``$outputs``; the edge ``u -> v`` carries ``wires``, the :class:`Wire` list of tensors
  that ``v`` reads from ``u``.
* :func:`analyze`: every check, plus what loading needs (plugin classes, node signatures,
  the topological order); :func:`validate` returns only the problems.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import networkx as nx

from dag.errors import PipelineError
from dag.loader import Loc, SourceMap
from dag.schema import INPUTS_PREFIX, NAME_PATTERN, PipelineSpec, Ref, parse_ref
from model_plugins.errors import DagserveError
from model_plugins.plugin import ModelPlugin, Signature, overrides_signature
from model_plugins.registry import resolve
from model_plugins.specs import TensorSpec
from model_plugins.wiring import wiring_problems

#: the pseudo node every pipeline input comes from
INPUTS = INPUTS_PREFIX
#: the pseudo node every pipeline output goes to
OUTPUTS = "$outputs"

#: turns a ``plugin:`` reference into a plugin class (``model_plugins.registry.resolve``)
Resolver = Callable[[str], type[ModelPlugin]]

#: what a node or input name must look like (references cannot name anything else)
_NAME = re.compile(NAME_PATTERN)


class Wire(NamedTuple):
    """One tensor along an edge.

    Attributes:
        tensor: the producer's name for it: a node output, or a pipeline input.
        input: the consumer's name for it: a node input, or a pipeline output on ``$outputs``.
    """

    tensor: str
    input: str


def build_graph(spec: PipelineSpec) -> nx.DiGraph:
    """The DAG of ``spec``.

    References that do not parse or name nothing are left out (:func:`validate` reports them).

    Args:
        spec: the pipeline.

    Returns:
        A graph with a node per pipeline node (attributes ``kind="node"``, ``plugin``, ``join``),
        the pseudo nodes ``$inputs`` and ``$outputs`` (``kind="inputs"``/``"outputs"``), and an
        edge per producer and consumer pair whose ``wires`` lists the tensors passed.

    >>> spec = PipelineSpec.model_validate({
    ...     "name": "p", "inputs": {"x": {"dtype": "float32"}},
    ...     "nodes": {"a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}}},
    ...     "outputs": {"y": "a.x"},
    ... })
    >>> graph = build_graph(spec)
    >>> for tail, head, wires in graph.edges(data="wires"):
    ...     print(tail, head, wires)
    $inputs a [Wire(tensor='x', input='x')]
    a $outputs [Wire(tensor='x', input='y')]
    """
    graph = nx.DiGraph(name=spec.name)
    graph.add_node(INPUTS, kind="inputs")
    for name, node in spec.nodes.items():
        graph.add_node(name, kind="node", plugin=node.plugin, join=node.join)
    graph.add_node(OUTPUTS, kind="outputs")
    for name, node in spec.nodes.items():
        for local, text in node.inputs.items():
            _wire(graph, spec, text, name, local)
    for output, text in spec.outputs.items():
        _wire(graph, spec, text, OUTPUTS, output)
    return graph


def read_ref(spec: PipelineSpec, text: str) -> Ref:
    """Parse a reference of ``spec`` and check that it names a declared input or a node.

    The one place where dag reads references: the graph is built from what it returns, and
    the executor's plan and the pipeline's description are read off the graph.

    >>> spec = PipelineSpec.model_validate({
    ...     "name": "p", "inputs": {"x": {"dtype": "float32"}},
    ...     "nodes": {"a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}}},
    ...     "outputs": {"y": "a.x"},
    ... })
    >>> read_ref(spec, "a.x")
    Ref(source='a', name='x')
    >>> read_ref(spec, "b.x")
    Traceback (most recent call last):
    ValueError: b.x names no node 'b' (nodes: a)

    Raises:
        ValueError: the text does not parse, or names nothing; the message says which.
    """
    ref = parse_ref(text)
    if ref.is_input and ref.name not in spec.inputs:
        declared = ", ".join(spec.inputs) or "none"
        msg = f"{ref} names no pipeline input (inputs: {declared})"
        raise ValueError(msg)
    if not ref.is_input and ref.source not in spec.nodes:
        msg = f"{ref} names no node {ref.source!r} (nodes: {', '.join(spec.nodes)})"
        raise ValueError(msg)
    return ref


def _wire(graph: nx.DiGraph, spec: PipelineSpec, text: str, consumer: str, local: str) -> None:
    try:
        ref = read_ref(spec, text)
    except ValueError:  # reported by validate()
        return
    if not graph.has_edge(ref.source, consumer):
        graph.add_edge(ref.source, consumer, wires=[])
    graph.edges[ref.source, consumer]["wires"].append(Wire(ref.name, local))


def find_cycles(graph: nx.DiGraph) -> list[list[str]]:
    """One cycle per group of nodes that reach each other, as the list of its nodes.

    >>> find_cycles(nx.DiGraph([("$inputs", "a"), ("a", "b"), ("b", "a"), ("c", "c")]))
    [['a', 'b'], ['c']]
    """
    position = {node: index for index, node in enumerate(graph)}
    cycles = []
    for group in nx.strongly_connected_components(graph):
        first = min(group, key=position.__getitem__)
        if len(group) == 1 and not graph.has_edge(first, first):
            continue
        try:
            edges = nx.find_cycle(graph.subgraph(group), source=first)
        except nx.NetworkXNoCycle:  # cannot happen for a strongly connected group; be safe
            continue
        cycles.append([str(u) for u, *_ in edges])
    return sorted(cycles, key=lambda cycle: position[cycle[0]])


def topological_order(graph: nx.DiGraph, spec: PipelineSpec) -> list[str]:
    """The real nodes in an order where producers come first, ties in file order.

    A cyclic graph has no such order; its nodes then come in file order.
    """
    index = {name: i for i, name in enumerate(spec.nodes)}
    last = len(index)

    def key(node: Hashable) -> int:
        return index.get(str(node), -1 if node == INPUTS else last)

    try:
        ordered = list(nx.lexicographical_topological_sort(graph, key=key))
    except nx.NetworkXUnfeasible:
        return list(spec.nodes)
    return [str(node) for node in ordered if node in index]


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` found.

    Attributes:
        errors: the problems that stop the pipeline from loading, in line order.
        warnings: what is suspicious but runs (``severity="warning"``).
        order: the real nodes, producers first.
        plugin_classes: node -> its plugin class (nodes whose plugin resolved).
        node_signatures: node -> ``(inputs, outputs)`` specs; ``outputs:`` of the YAML included.
        variant_classes: node -> variant -> its plugin class (the variants that resolved).
        input_specs: pipeline input -> its spec.
        output_specs: pipeline output -> the spec of the tensor it names, None where unknown.
    """

    errors: list[PipelineError] = field(default_factory=list)
    warnings: list[PipelineError] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    plugin_classes: dict[str, type[ModelPlugin]] = field(default_factory=dict)
    node_signatures: dict[str, Signature] = field(default_factory=dict)
    variant_classes: dict[str, dict[str, type[ModelPlugin]]] = field(default_factory=dict)
    input_specs: dict[str, TensorSpec] = field(default_factory=dict)
    output_specs: dict[str, TensorSpec | None] = field(default_factory=dict)


def validate(
    graph: nx.DiGraph,
    spec: PipelineSpec,
    *,
    resolver: Resolver = resolve,
    source: SourceMap | None = None,
) -> list[PipelineError]:
    """Every problem of a pipeline: the errors, then the warnings (``severity="warning"``).

    See :func:`analyze` for the checks.

    >>> spec = PipelineSpec.model_validate({
    ...     "name": "p", "inputs": {"x": {"dtype": "float32"}},
    ...     "nodes": {"a": {"plugin": "identity", "inputs": {"x": "b.y"}},
    ...               "b": {"plugin": "identity", "inputs": {"x": "a.x"}}},
    ...     "outputs": {"y": "a.x"},
    ... })
    >>> for problem in validate(build_graph(spec), spec):
    ...     print(problem)
    node 'a': cycle: a -> b -> a
    warning: input 'x' is declared but nothing reads it
    """
    found = analyze(graph, spec, resolver=resolver, source=source)
    return found.errors + found.warnings


def analyze(
    graph: nx.DiGraph,
    spec: PipelineSpec,
    *,
    resolver: Resolver = resolve,
    source: SourceMap | None = None,
) -> Analysis:
    """Check a pipeline and work out the specs of every tensor.

    Checks, each problem placed at its line and node when ``source`` is given:

    * node and input names are identifiers; every reference parses and names a declared
      pipeline input, or an existing node and (when that node's outputs are known) one of its
      outputs; every pipeline output so names a tensor that something produces;
    * the graph has no cycle (``cycle: a -> b -> a``);
    * every plugin resolves, and its ``signature`` runs;
    * each node wires only inputs its plugin declares, and every required one;
    * along each edge whose ends both declare specs, the dtypes and shapes agree;
    * each variant of a node has a name like a node's, its plugin resolves, and its
      signature (worked out with its own params, from the same upstream specs) equals the
      node's: a variant replaces the node for some requests, so what it reads and produces
      must be the node's;
    * warm-up samples generated for a node need the spec of every input it reads;
    * a pipeline input nothing reads is a warning, and so are generated warm-up samples of a
      ``bytes`` input (a decoder refuses them: give a file).

    Node signatures come from ``plugin_cls.signature(params, upstream)``, called in
    topological order with the spec of each wired tensor (None where unknown); a node's
    ``outputs:`` in the YAML supplies or overrides output specs.  A node with no output specs
    at all has unknown outputs: references to it are not checked for output names.

    Args:
        graph: ``build_graph(spec)``.
        spec: the pipeline.
        resolver: turns a ``plugin:`` reference into a class; its ``DagserveError`` becomes
            an error of the node.
        source: where each part of the spec was written, for lines (None: no lines).

    Returns:
        The problems, and what a loaded pipeline needs.
    """
    checker = _Checker(spec, resolver, source or SourceMap())
    checker.check_names()
    refs = checker.check_refs()
    for cycle in find_cycles(graph):
        cycle_text = " -> ".join([*cycle, cycle[0]])
        checker.error(("nodes", cycle[0]), f"cycle: {cycle_text}", node=cycle[0])
    checker.resolve_plugins()
    order = topological_order(graph, spec)
    for name in order:
        checker.check_node(name, refs[name])
    output_specs = {
        output: checker.tensor_spec(ref, ("outputs", output), f"output {output!r}", None)
        for output, ref in refs[OUTPUTS].items()
    }
    checker.check_unused_inputs(refs)
    checker.check_pipeline_warmup()
    return Analysis(
        errors=sorted(checker.errors, key=_line),
        warnings=sorted(checker.warnings, key=_line),
        order=order,
        plugin_classes=checker.plugin_classes,
        node_signatures=checker.signatures,
        variant_classes=checker.variant_classes,
        input_specs=checker.input_specs,
        output_specs=output_specs,
    )


def _line(error: PipelineError) -> int:
    return error.line if error.line is not None else 0


class _Checker:
    """The state of one :func:`analyze` run: what is known so far, and what is wrong."""

    def __init__(self, spec: PipelineSpec, resolver: Resolver, source: SourceMap) -> None:
        self.spec = spec
        self.resolver = resolver
        self.source = source
        self.errors: list[PipelineError] = []
        self.warnings: list[PipelineError] = []
        self.input_specs = {name: decl.to_spec() for name, decl in spec.inputs.items()}
        self.plugin_classes: dict[str, type[ModelPlugin]] = {}
        self.variant_classes: dict[str, dict[str, type[ModelPlugin]]] = {}
        self.signatures: dict[str, Signature] = {}
        #: node -> its output specs; None = unknown (not worked out, or declared as nothing)
        self.outputs: dict[str, dict[str, TensorSpec] | None] = {}

    def error(self, loc: Sequence[Hashable], message: str, *, node: str | None) -> None:
        self.errors.append(self.source.error(loc, message, node=node))

    def check_names(self) -> None:
        for section, names in (("nodes", self.spec.nodes), ("inputs", self.spec.inputs)):
            kind = "node" if section == "nodes" else "input"
            for name in names:
                if not _NAME.match(name):
                    self.error(
                        (section, name),
                        f"a {kind} name must be a letter or _ then letters, digits or _ "
                        f"(got {name!r})",
                        node=name if section == "nodes" else None,
                    )
        for name, node in self.spec.nodes.items():
            for variant in node.variants:
                if not _NAME.match(variant):
                    self.error(
                        ("nodes", name, "variants", variant),
                        "a variant name must be a letter or _ then letters, digits or _ "
                        f"(got {variant!r})",
                        node=name,
                    )

    def check_refs(self) -> dict[str, dict[str, Ref]]:
        """Parse every reference; report those that do not parse or name nothing."""
        refs: dict[str, dict[str, Ref]] = {}
        for name, node in self.spec.nodes.items():
            refs[name] = {}
            for local, text in node.inputs.items():
                loc = ("nodes", name, "inputs", local)
                ref = self._ref(text, loc, f"input {local!r}", name)
                if ref is not None:
                    refs[name][local] = ref
        refs[OUTPUTS] = {}
        for output, text in self.spec.outputs.items():
            ref = self._ref(text, ("outputs", output), f"output {output!r}", None)
            if ref is not None:
                refs[OUTPUTS][output] = ref
        return refs

    def _ref(self, text: str, loc: Loc, what: str, node: str | None) -> Ref | None:
        try:
            return read_ref(self.spec, text)
        except ValueError as exc:
            self.error(loc, f"{what}: {exc}", node=node)
            return None

    def resolve_plugins(self) -> None:
        found: dict[str, type[ModelPlugin] | str] = {}  # plugin reference -> class or problem
        for name, node in self.spec.nodes.items():
            if node.plugin not in found:
                found[node.plugin] = self._resolve(node.plugin)
            result = found[node.plugin]
            if isinstance(result, str):
                self.error(("nodes", name, "plugin"), result, node=name)
            else:
                self.plugin_classes[name] = result
            for variant in node.variants:
                plugin = node.variant(variant).plugin
                if plugin not in found:
                    found[plugin] = self._resolve(plugin)
                result = found[plugin]
                if isinstance(result, str):
                    loc = ("nodes", name, "variants", variant, "plugin")
                    self.error(loc, f"variant {variant!r}: {result}", node=name)
                else:
                    self.variant_classes.setdefault(name, {})[variant] = result

    def _resolve(self, plugin: str) -> type[ModelPlugin] | str:
        try:
            return self.resolver(plugin)
        except DagserveError as exc:
            return str(exc)
        except Exception as exc:  # a resolver is user-replaceable: never let it escape
            return f"plugin {plugin!r} cannot be resolved: {type(exc).__name__}: {exc}"

    def tensor_spec(self, ref: Ref, loc: Loc, what: str, node: str | None) -> TensorSpec | None:
        """The spec of the tensor ``ref`` names; reports an output its node does not have."""
        if ref.is_input:
            return self.input_specs.get(ref.name)
        outputs = self.outputs.get(ref.source)
        if outputs is None:
            return None
        if ref.name not in outputs:
            self.error(
                loc,
                f"{what}: node {ref.source!r} has no output {ref.name!r} "
                f"(outputs: {', '.join(outputs)})",
                node=node,
            )
            return None
        return outputs[ref.name]

    def check_node(self, name: str, refs: Mapping[str, Ref]) -> None:
        node = self.spec.nodes[name]
        upstream = {
            local: self.tensor_spec(ref, ("nodes", name, "inputs", local), f"input {local!r}", name)
            for local, ref in refs.items()
        }
        plugin_cls = self.plugin_classes.get(name)
        inputs: dict[str, TensorSpec] = {}
        outputs: dict[str, TensorSpec] = {}
        if plugin_cls is not None:
            try:
                inputs, outputs = plugin_cls.signature(node.params, upstream)
            except Exception as exc:  # plugin code: report it at the node
                self.error(
                    ("nodes", name, "plugin"),
                    f"plugin {node.plugin!r}: signature() failed: {type(exc).__name__}: {exc}",
                    node=name,
                )
                plugin_cls = None
            inputs, outputs = dict(inputs), dict(outputs)
        if node.outputs:
            outputs.update({out: decl.to_spec() for out, decl in node.outputs.items()})
        self.signatures[name] = (inputs, outputs)
        self.outputs[name] = outputs or None
        if plugin_cls is not None and inputs:
            self._check_inputs(name, plugin_cls, inputs, upstream, refs)
        if plugin_cls is not None:  # else reported, and its specs are unknown
            for variant in node.variants:
                self._check_variant(name, variant, upstream)
            self._check_node_warmup(name)

    def _check_variant(
        self, name: str, variant: str, upstream: Mapping[str, TensorSpec | None]
    ) -> None:
        """A variant's signature must be its node's: it answers in the node's place."""
        plugin_cls = self.variant_classes.get(name, {}).get(variant)
        if plugin_cls is None:
            return  # its plugin did not resolve: reported
        node = self.spec.nodes[name].variant(variant)
        loc = ("nodes", name, "variants", variant)
        try:
            inputs, outputs = plugin_cls.signature(node.params, upstream)
        except Exception as exc:  # plugin code: report it at the variant
            message = (
                f"variant {variant!r}: plugin {node.plugin!r}: signature() failed: "
                f"{type(exc).__name__}: {exc}"
            )
            self.error(loc, message, node=name)
            return
        outputs = dict(outputs)
        if node.outputs:
            outputs.update({out: decl.to_spec() for out, decl in node.outputs.items()})
        own_inputs, own_outputs = self.signatures[name]
        differences = [
            *_spec_differences("input", dict(inputs), own_inputs),
            *_spec_differences("output", outputs, own_outputs),
        ]
        if differences:
            message = (
                f"variant {variant!r} must have the node's specs, but {'; '.join(differences)}"
            )
            self.error(loc, message, node=name)

    def _check_node_warmup(self, name: str) -> None:
        node = self.spec.nodes[name]
        arms = [(None, node), *((v, node.variant(v)) for v in node.variants)]
        generated = [v for v, arm in arms if arm.warmup is not None and arm.warmup.samples]
        if not generated:
            return
        declared = self.signatures[name][0]
        where = "warmup" if generated[0] is None else f"variants.{generated[0]}.warmup"
        loc = ("nodes", name, *where.split("."))
        for local in node.inputs:
            spec = declared.get(local)
            if spec is None:
                message = (
                    f"{where}: samples are generated from the node's input specs, and input "
                    f"{local!r} has none: give warmup: {{file: ...}}"
                )
                self.error(loc, message, node=name)
            elif spec.dtype == "bytes":
                self.warnings.append(self.source.warning(loc, _bytes_warmup(local), node=name))

    def check_pipeline_warmup(self) -> None:
        warmup = self.spec.warmup
        if warmup is None or not warmup.samples:
            return
        for name, spec in self.input_specs.items():
            if spec.dtype == "bytes":
                self.warnings.append(self.source.warning(("warmup",), _bytes_warmup(name)))

    def _check_inputs(
        self,
        name: str,
        plugin_cls: type[ModelPlugin],
        declared: Mapping[str, TensorSpec],
        upstream: Mapping[str, TensorSpec | None],
        refs: Mapping[str, Ref],
    ) -> None:
        node = self.spec.nodes[name]
        # the SDK's rules, so that PluginHarness(upstream=...) says the same
        problems = wiring_problems(
            declared,
            {local: upstream.get(local) for local in node.inputs},
            plugin=node.plugin,
            mirrors=overrides_signature(plugin_cls),
            sources={local: str(ref) for local, ref in refs.items()},
        )
        for local, message in problems:
            loc = ("nodes", name, "inputs") if local is None else ("nodes", name, "inputs", local)
            self.error(loc, message, node=name)

    def check_unused_inputs(self, refs: Mapping[str, Mapping[str, Ref]]) -> None:
        used = {ref.name for wired in refs.values() for ref in wired.values() if ref.is_input}
        for name in self.spec.inputs:
            if name not in used:
                self.warnings.append(
                    self.source.warning(
                        ("inputs", name), f"input {name!r} is declared but nothing reads it"
                    )
                )


def _spec_differences(
    kind: str, got: Mapping[str, TensorSpec], want: Mapping[str, TensorSpec]
) -> list[str]:
    """How the tensors ``got`` differ from ``want``, one phrase each.

    >>> for difference in _spec_differences(
    ...     "output", {"y": TensorSpec("float64", [2])},
    ...     {"y": TensorSpec("float32", [2]), "z": TensorSpec("int64")},
    ... ):
    ...     print(difference)
    its output 'y' is float64[2] (the node's: float32[2])
    it has no output 'z' (the node's: int64[])
    """
    found = []
    for name, spec in want.items():
        if name not in got:
            found.append(f"it has no {kind} {name!r} (the node's: {spec.describe()})")
        elif got[name] != spec:
            found.append(
                f"its {kind} {name!r} is {_describe(got[name])} (the node's: {_describe(spec)})"
            )
    found.extend(
        f"it has {kind} {name!r} ({spec.describe()}), which the node has not"
        for name, spec in got.items()
        if name not in want
    )
    return found


def _describe(spec: TensorSpec) -> str:
    return spec.describe() + (" optional" if spec.optional else "")


def _bytes_warmup(name: str) -> str:
    return (
        f"warm-up samples of bytes input {name!r} are generated as b'warmup', which a "
        "decoder refuses: give warmup: {file: ...}"
    )


__all__ = [
    "INPUTS",
    "OUTPUTS",
    "Analysis",
    "Resolver",
    "Signature",
    "Wire",
    "analyze",
    "build_graph",
    "find_cycles",
    "read_ref",
    "topological_order",
    "validate",
]
