"""Run one request through a pipeline.

Every node starts as soon as the nodes it reads from have finished, so nodes without a path
between them run concurrently.  A node whose required input is absent (an optional pipeline
input left out, or an upstream node that was skipped) is skipped; a node with
``join: available`` runs on whatever of its inputs is present.  The executor knows nothing of
processes or sockets: each node is driven through a :class:`~dag.runner.Runner`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from dag.runner import Runner
from dag.schema import PipelineSpec, Ref, parse_ref
from model_plugins.errors import DagserveError, DeadlineExceeded, InferenceError
from model_plugins.plugin import Batch

NodeStatus = Literal["ok", "skipped", "error", "cancelled"]


@dataclass
class NodeTiming:
    """When a node ran, in seconds of ``time.perf_counter`` (unless another clock was given)."""

    start: float
    end: float
    status: NodeStatus

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
        """Latency of every node that ran (skipped nodes are absent)."""
        return {n: t.latency_us for n, t in self.timings.items() if t.status == "ok"}


@dataclass(frozen=True)
class _Plan:
    """What the executor needs of a spec, computed once per pipeline."""

    refs: dict[str, dict[str, Ref]]  # node -> input name -> reference
    upstream: dict[str, frozenset[str]]  # node -> nodes it reads from
    outputs: dict[str, Ref]


def plan(spec: PipelineSpec) -> _Plan:
    """Pre-parse a (validated) spec's references."""
    refs = {
        name: {local: parse_ref(text) for local, text in node.inputs.items()}
        for name, node in spec.nodes.items()
    }
    upstream = {
        name: frozenset(r.source for r in node_refs.values() if not r.is_input)
        for name, node_refs in refs.items()
    }
    outputs = {name: parse_ref(text) for name, text in spec.outputs.items()}
    return _Plan(refs, upstream, outputs)


def needed_nodes(execution_plan: _Plan, wanted: Collection[str]) -> set[str]:
    """The nodes whose work reaches the ``wanted`` outputs (the others need not run)."""
    todo = [r.source for name, r in execution_plan.outputs.items() if name in wanted]
    needed: set[str] = set()
    while todo:
        node = todo.pop()
        if node in needed or node not in execution_plan.upstream:
            continue
        needed.add(node)
        todo.extend(execution_plan.upstream[node])
    return needed


async def execute(
    spec: PipelineSpec,
    inputs: Mapping[str, np.ndarray],
    runners: Mapping[str, Runner],
    *,
    deadline: float | None = None,
    wanted: Collection[str] | None = None,
    execution_plan: _Plan | None = None,
    clock: Callable[[], float] | None = None,
    observer: Callable[[str, NodeTiming, BaseException | None], None] | None = None,
) -> Execution:
    """Run ``spec`` on one request's ``inputs``.

    Args:
        spec: a validated pipeline.
        inputs: pipeline input name -> array; optional inputs may be absent.
        runners: node name -> the runner that executes it.
        deadline: on the loop's clock; past it, running nodes are cancelled.
        wanted: the outputs to produce (None = all); nodes that feed none of them don't run.
        execution_plan: ``plan(spec)``, to skip re-parsing per request.
        clock: the time source for timings (default ``time.perf_counter``: uvloop's
            ``loop.time`` only has millisecond resolution).
        observer: called as each node that ran ends, with its timing and its error (or
            None); for metrics.

    Returns:
        The produced outputs (outputs of skipped nodes are absent) and each node's timing.

    Raises:
        InferenceError: a node failed; ``node`` names the first one that did.
        DeadlineExceeded: the deadline passed; the message names the nodes still running.
    """
    now = clock or time.perf_counter
    the_plan = execution_plan or plan(spec)
    wanted_set = set(spec.outputs) if wanted is None else set(wanted)
    to_run = needed_nodes(the_plan, wanted_set)

    values: dict[tuple[str, str], np.ndarray] = {("$inputs", k): v for k, v in inputs.items()}
    done = {name: asyncio.Event() for name in to_run}
    timings: dict[str, NodeTiming] = {}
    running: set[str] = set()

    async def run_node(name: str) -> None:
        for dependency in the_plan.upstream[name]:
            await done[dependency].wait()
        node = spec.nodes[name]
        present: dict[str, np.ndarray] = {}
        for local, ref in the_plan.refs[name].items():
            value = values.get((ref.source, ref.name))
            if value is not None:
                present[local] = value
        missing = len(present) < len(the_plan.refs[name])
        if (missing and node.join == "all") or (not present and the_plan.refs[name]):
            timings[name] = NodeTiming(now(), now(), "skipped")
            done[name].set()
            return
        start = now()
        running.add(name)
        try:
            if node.timeout_ms is None:
                produced = await runners[name].run(present, deadline=deadline)
            else:
                produced = await _run_bounded(runners[name], present, deadline, node.timeout_ms)
        except TimeoutError as exc:  # the node's own timeout_ms, not the request's deadline
            running.discard(name)
            timings[name] = NodeTiming(start, now(), "error")
            msg = f"node {name!r} did not finish within its timeout_ms ({node.timeout_ms:g} ms)"
            error = InferenceError(msg, node=name, plugin=node.plugin)
            if observer is not None:
                observer(name, timings[name], error)
            raise error from exc
        except asyncio.CancelledError:
            # stays in `running`, so that a deadline names the nodes it interrupted
            timings[name] = NodeTiming(start, now(), "cancelled")
            raise
        except DagserveError as exc:
            running.discard(name)
            timings[name] = NodeTiming(start, now(), "error")
            if observer is not None:
                observer(name, timings[name], exc)
            raise
        except Exception as exc:  # a runner that lets a plain exception through
            running.discard(name)
            timings[name] = NodeTiming(start, now(), "error")
            if observer is not None:
                observer(name, timings[name], exc)
            msg = f"node {name!r} failed: {type(exc).__name__}: {exc}"
            raise InferenceError(
                msg,
                node=name,
                plugin=node.plugin,
                cause=f"{type(exc).__module__}.{type(exc).__qualname__}",
            ) from exc
        running.discard(name)
        timings[name] = NodeTiming(start, now(), "ok")
        if observer is not None:
            observer(name, timings[name], None)
        for output, value in produced.items():
            values[(name, output)] = value
        done[name].set()

    try:
        async with asyncio.timeout_at(deadline):
            async with asyncio.TaskGroup() as group:
                for name in to_run:
                    group.create_task(run_node(name), name=f"dagserve-node-{name}")
    except TimeoutError as exc:
        late = ", ".join(sorted(running)) or "none"
        msg = f"deadline exceeded while running nodes: {late}"
        raise DeadlineExceeded(msg) from exc
    except BaseExceptionGroup as group_error:
        # The first failure cancels the other nodes; report the node that really failed.
        raise _first_cause(group_error) from None

    outputs: dict[str, np.ndarray] = {}
    for name, ref in the_plan.outputs.items():
        if name in wanted_set:
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


__all__ = ["Execution", "NodeTiming", "execute", "needed_nodes", "plan"]
