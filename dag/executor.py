"""Run one request through a pipeline.

Every node starts as soon as the nodes it reads from have finished, so nodes without a path
between them run concurrently.  A node whose required input is absent (an optional pipeline
input left out, or an upstream node that was skipped) is skipped; a node with
``join: available`` runs on whatever of its inputs is present.  The executor knows nothing of
processes or sockets: each node is driven through a :class:`~dag.runner.Runner`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import networkx as nx
import numpy as np

from dag.graph import OUTPUTS, build_graph
from dag.runner import Runner, VariantScope, variant_scope
from dag.schema import PipelineSpec, Ref, variant_label
from model_plugins.errors import DagserveError, DeadlineExceeded, InferenceError
from model_plugins.plugin import Batch

NodeStatus = Literal["ok", "skipped", "error", "cancelled"]


@dataclass
class NodeTiming:
    """When a node ran, in seconds of ``time.perf_counter`` (unless another clock was given)."""

    start: float
    end: float
    status: NodeStatus
    #: the variant that ran the node (``variants:``), None for the node itself
    variant: str | None = None

    @property
    def latency_us(self) -> int:
        return round((self.end - self.start) * 1e6)


@dataclass
class Execution:
    """The result of running one request."""

    outputs: dict[str, np.ndarray]
    timings: dict[str, NodeTiming] = field(default_factory=dict)

    @property
    def node_latency_us(self) -> dict[str, int]:
        """Latency of every node that ran (skipped nodes are absent), keyed
        ``node@variant`` where a variant ran it."""
        return {
            variant_label(n, t.variant): t.latency_us
            for n, t in self.timings.items()
            if t.status == "ok"
        }


@dataclass(frozen=True)
class Plan:
    """A pipeline's wiring as the executor reads it, worked out once per pipeline.

    It is read off the graph (:func:`dag.graph.build_graph`), which holds every reference
    already parsed: nothing is parsed per request.  A loaded pipeline has its own
    (``Pipeline.plan``); :meth:`of` plans a bare spec.

    Attributes:
        spec: the pipeline as written (each node's ``join``, ``timeout_ms`` and plugin).
        refs: node -> its input name -> the tensor it reads, in the order written.
        upstream: node -> the nodes it reads from.
        outputs: pipeline output -> the tensor it names.
        order: the nodes, in a topological order.
        variant_nodes: the nodes with ``variants:`` (empty for most pipelines).
    """

    spec: PipelineSpec
    refs: dict[str, dict[str, Ref]]
    upstream: dict[str, frozenset[str]]
    outputs: dict[str, Ref]
    order: tuple[str, ...]
    variant_nodes: frozenset[str] = frozenset()
    _schedules: dict[frozenset[str] | None, Schedule] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def of(cls, spec: PipelineSpec, graph: nx.DiGraph | None = None) -> Plan:
        """The plan of ``spec``, read off ``graph`` (default: ``build_graph(spec)``).

        >>> spec = PipelineSpec.model_validate({
        ...     "name": "p", "inputs": {"x": {"dtype": "float32"}},
        ...     "nodes": {"a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}}},
        ...     "outputs": {"y": "a.x"},
        ... })
        >>> Plan.of(spec).outputs
        {'y': Ref(source='a', name='x')}
        """
        graph = build_graph(spec) if graph is None else graph
        wired: dict[str, dict[str, Ref]] = {}
        for tail, head, wires in graph.edges(data="wires"):
            for wire in wires:
                wired.setdefault(head, {})[wire.input] = Ref(tail, wire.tensor)

        def in_order(consumer: str, written: Iterable[str]) -> dict[str, Ref]:
            found = wired.get(consumer, {})
            return {local: found[local] for local in written if local in found}

        refs = {name: in_order(name, node.inputs) for name, node in spec.nodes.items()}
        upstream = {
            name: frozenset(r.source for r in node_refs.values() if not r.is_input)
            for name, node_refs in refs.items()
        }
        order = tuple(n for n in nx.topological_sort(graph) if n in spec.nodes)
        variant_nodes = frozenset(name for name, node in spec.nodes.items() if node.variants)
        return cls(spec, refs, upstream, in_order(OUTPUTS, spec.outputs), order, variant_nodes)

    def schedule(self, wanted: Collection[str] | None = None) -> Schedule:
        """What runs for the outputs ``wanted`` (None = all), worked out once per set."""
        key = None if wanted is None else frozenset(wanted)
        schedule = self._schedules.get(key)
        if schedule is None:
            outputs = frozenset(self.outputs) if key is None else key
            needed = needed_nodes(self, outputs)
            nodes = tuple(n for n in self.order if n in needed)
            # Each node reads from the one before: no two can ever overlap.
            chain = all(a in self.upstream[b] for a, b in itertools.pairwise(nodes))
            schedule = Schedule(outputs, nodes, chain)
            if len(self._schedules) < _MAX_SCHEDULES:  # of the 2**outputs sets a client
                self._schedules[key] = schedule  # may ask for, the first few
        return schedule


#: schedules kept per plan (one per set of wanted outputs asked for)
_MAX_SCHEDULES = 64


@dataclass(frozen=True)
class Schedule:
    """The nodes that run for one set of wanted outputs.

    Attributes:
        wanted: the outputs to produce.
        nodes: the nodes whose work reaches them, in a topological order.
        chain: each of ``nodes`` reads from the one before, so none can overlap another:
            they run one after the other in the caller's task, without a task each.
    """

    wanted: frozenset[str]
    nodes: tuple[str, ...]
    chain: bool


def needed_nodes(plan: Plan, wanted: Collection[str]) -> set[str]:
    """The nodes whose work reaches the ``wanted`` outputs (the others need not run)."""
    todo = [r.source for name, r in plan.outputs.items() if name in wanted]
    needed: set[str] = set()
    while todo:
        node = todo.pop()
        if node in needed or node not in plan.upstream:
            continue
        needed.add(node)
        todo.extend(plan.upstream[node])
    return needed


async def execute(
    plan: Plan,
    inputs: Mapping[str, np.ndarray],
    runners: Mapping[str, Runner],
    *,
    deadline: float | None = None,
    wanted: Collection[str] | None = None,
    clock: Callable[[], float] | None = None,
    observer: Callable[[str, NodeTiming, BaseException | None], None] | None = None,
    request_key: str | None = None,
) -> Execution:
    """Run a pipeline on one request's ``inputs``.

    Args:
        plan: the pipeline's plan (``Pipeline.plan``, or ``Plan.of(spec)``).
        inputs: pipeline input name -> array; optional inputs may be absent.
        runners: node name -> the runner that executes it.
        deadline: on the loop's clock; past it, running nodes are cancelled.
        wanted: the outputs to produce (None = all); nodes that feed none of them don't run.
        clock: the time source for timings (default ``time.perf_counter``: uvloop's
            ``loop.time`` only has millisecond resolution).
        observer: called as each node that ran ends, with its timing and its error (or
            None); for metrics.
        request_key: the request's sticky key: nodes with variants pick one by its hash
            (None: at random, by weight).

    Returns:
        The produced outputs (outputs of skipped nodes are absent) and each node's timing.

    Raises:
        InferenceError: a node failed; ``node`` names the first one that did.
        DeadlineExceeded: the deadline passed; the message names the nodes still running.
    """
    now = clock or time.perf_counter
    spec = plan.spec
    schedule = plan.schedule(wanted)

    values: dict[tuple[str, str], np.ndarray] = {("$inputs", k): v for k, v in inputs.items()}
    timings: dict[str, NodeTiming] = {}
    running: set[str] = set()
    # Nodes with variants say which one ran through the scope (see dag.runner).
    scope = VariantScope(request_key) if plan.variant_nodes else None

    def ended(name: str, start: float, status: NodeStatus) -> None:
        variant = scope.ran.get(name) if scope is not None else None
        timings[name] = NodeTiming(start, now(), status, variant)

    async def run_node(name: str) -> None:
        """Run one node whose upstream nodes have all finished (or skip it)."""
        node = spec.nodes[name]
        refs = plan.refs[name]
        present: dict[str, np.ndarray] = {}
        for local, ref in refs.items():
            value = values.get((ref.source, ref.name))
            if value is not None:
                present[local] = value
        missing = len(present) < len(refs)
        if (missing and node.join == "all") or (not present and refs):
            timings[name] = NodeTiming(now(), now(), "skipped")
            return
        start = now()
        running.add(name)
        try:
            if node.timeout_ms is None:
                produced = await runners[name].run(present, deadline=deadline)
            else:
                produced = await _run_bounded(runners[name], present, deadline, node.timeout_ms)
        except asyncio.CancelledError:
            # stays in `running`, so that a deadline names the nodes it interrupted
            ended(name, start, "cancelled")
            raise
        except DagserveError as exc:  # DeadlineExceeded included, though a TimeoutError
            running.discard(name)
            ended(name, start, "error")
            if observer is not None:
                observer(name, timings[name], exc)
            raise
        except TimeoutError as exc:
            if node.timeout_ms is None:  # the runner's own, not a timeout_ms
                raise _failed(name, node.plugin, exc, start) from exc
            # the node's own timeout_ms, not the request's deadline
            running.discard(name)
            ended(name, start, "error")
            msg = f"node {name!r} did not finish within its timeout_ms ({node.timeout_ms:g} ms)"
            error = InferenceError(msg, node=name, plugin=node.plugin)
            if observer is not None:
                observer(name, timings[name], error)
            raise error from exc
        except Exception as exc:  # a runner that lets a plain exception through
            raise _failed(name, node.plugin, exc, start) from exc
        running.discard(name)
        ended(name, start, "ok")
        if observer is not None:
            observer(name, timings[name], None)
        for output, value in produced.items():
            values[(name, output)] = value

    def _failed(name: str, plugin: str, exc: Exception, start: float) -> InferenceError:
        running.discard(name)
        ended(name, start, "error")
        if observer is not None:
            observer(name, timings[name], exc)
        msg = f"node {name!r} failed: {type(exc).__name__}: {exc}"
        cause = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return InferenceError(msg, node=name, plugin=plugin, cause=cause)

    async def run_chain() -> None:
        for name in schedule.nodes:
            await run_node(name)

    async def run_concurrently() -> None:
        # Every node starts as soon as the nodes it reads from have finished.
        done = {name: asyncio.Event() for name in schedule.nodes}

        async def when_ready(name: str) -> None:
            for dependency in plan.upstream[name]:
                await done[dependency].wait()
            await run_node(name)
            done[name].set()

        async with asyncio.TaskGroup() as group:
            for name in schedule.nodes:
                group.create_task(when_ready(name), name=f"dagserve-node-{name}")

    run = run_chain if schedule.chain else run_concurrently
    scope_token = variant_scope.set(scope) if scope is not None else None
    try:
        if deadline is None:
            await run()
        else:
            async with asyncio.timeout_at(deadline):
                await run()
    except TimeoutError as exc:
        if deadline is None or isinstance(exc, DagserveError):
            raise  # a chain's own DeadlineExceeded (run_node lets no other TimeoutError out)
        late = ", ".join(sorted(running)) or "none"
        msg = f"deadline exceeded while running nodes: {late}"
        raise DeadlineExceeded(msg) from exc
    except BaseExceptionGroup as group_error:
        # The first failure cancels the other nodes; report the node that really failed.
        raise _first_cause(group_error) from None
    finally:
        if scope_token is not None:
            variant_scope.reset(scope_token)

    outputs: dict[str, np.ndarray] = {}
    for name, ref in plan.outputs.items():
        if name in schedule.wanted:
            value = values.get((ref.source, ref.name))
            if value is not None:
                outputs[name] = value
    return Execution(outputs, timings)


async def _run_bounded(
    runner: Runner, inputs: Mapping[str, np.ndarray], deadline: float | None, timeout_ms: float
) -> Batch:
    loop = asyncio.get_running_loop()
    limit = loop.time() + timeout_ms / 1000.0
    async with asyncio.timeout_at(limit):
        return await runner.run(
            dict(inputs), deadline=limit if deadline is None else min(deadline, limit)
        )


def _first_cause(group_error: BaseExceptionGroup[BaseException]) -> BaseException:
    errors = group_error.exceptions
    for error in errors:
        if isinstance(error, BaseExceptionGroup):
            return _first_cause(error)
        if not isinstance(error, asyncio.CancelledError):
            return error
    return errors[0]


__all__ = ["Execution", "NodeTiming", "Plan", "Schedule", "execute", "needed_nodes"]
