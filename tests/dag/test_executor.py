"""The per-request executor, driven with fake runners (no processes, no sockets)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from dag.executor import Plan, execute
from dag.schema import PipelineSpec
from model_plugins.errors import DeadlineExceeded, InferenceError


class Recorder:
    """A fake runner: records the order of events, can wait on a gate, can fail."""

    def __init__(
        self,
        name: str,
        log: list[str],
        gate: asyncio.Event | None = None,
        opens: asyncio.Event | None = None,
        fail: bool = False,
        hang: bool = False,
    ):
        self.name, self.log, self.gate, self.opens = name, log, gate, opens
        self.fail, self.hang = fail, hang
        self.seen: dict[str, np.ndarray] | None = None

    async def run(self, inputs, *, deadline):
        self.seen = dict(inputs)
        self.log.append(f"start {self.name}")
        if self.opens is not None:
            self.opens.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail:
            raise ValueError("boom")
        self.log.append(f"end {self.name}")
        first = next(iter(inputs.values()))
        return {"out": first + 1 if first.dtype != object else first}


def plan(text: dict) -> Plan:
    return Plan.of(PipelineSpec.model_validate(text))


DIAMOND = {
    "name": "diamond",
    "inputs": {
        "x": {"dtype": "float32", "shape": [2]},
        "opt": {"dtype": "float32", "shape": [2], "optional": True},
    },
    "nodes": {
        "a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}},
        "b": {"plugin": "identity", "inputs": {"x": "$inputs.x"}},
        "fuse": {
            "plugin": "identity",
            "join": "available",
            "inputs": {"a": "a.out", "b": "b.out", "o": "c.out"},
        },
        "c": {"plugin": "identity", "inputs": {"x": "$inputs.opt"}},
    },
    "outputs": {"y": "fuse.out", "c": "c.out"},
}


async def test_independent_branches_overlap():
    # a waits until b has started, and b waits until a has started: both can only finish if
    # they run at the same time (a sequential executor would never end: the test times out).
    log: list[str] = []
    a_started, b_started = asyncio.Event(), asyncio.Event()
    runners = {
        "a": Recorder("a", log, gate=b_started, opens=a_started),
        "b": Recorder("b", log, gate=a_started, opens=b_started),
        "c": Recorder("c", log),
        "fuse": Recorder("fuse", log),
    }
    x = np.ones((1, 2), np.float32)
    result = await asyncio.wait_for(execute(plan(DIAMOND), {"x": x}, runners), 5)
    assert log.index("start b") < log.index("end a")
    assert log.index("start a") < log.index("end b")
    t = result.timings
    assert t["a"].start < t["b"].end
    assert t["b"].start < t["a"].end
    assert t["fuse"].start >= max(t["a"].end, t["b"].end)
    np.testing.assert_array_equal(result.outputs["y"], x + 2)


async def test_missing_optional_input_skips_its_branch():
    log: list[str] = []
    runners = {n: Recorder(n, log) for n in ("a", "b", "c", "fuse")}
    result = await execute(plan(DIAMOND), {"x": np.zeros((3, 2), np.float32)}, runners)
    assert result.timings["c"].status == "skipped"
    assert "start c" not in log
    assert set(runners["fuse"].seen) == {"a", "b"}  # join: available ran on what arrived
    assert "c" not in result.outputs
    assert "y" in result.outputs
    assert set(result.node_latency_us) == {"a", "b", "fuse"}


async def test_join_all_skips_when_an_input_is_absent():
    s = dict(
        DIAMOND,
        nodes={
            **DIAMOND["nodes"],
            "fuse": {"plugin": "identity", "inputs": {"a": "a.out", "o": "c.out"}},
        },
    )
    runners = {n: Recorder(n, []) for n in ("a", "b", "c", "fuse")}
    result = await execute(plan(s), {"x": np.zeros((1, 2), np.float32)}, runners)
    assert result.timings["fuse"].status == "skipped"
    assert result.outputs == {}


async def test_wanted_outputs_prune_nodes():
    log: list[str] = []
    runners = {n: Recorder(n, log) for n in ("a", "b", "c", "fuse")}
    inputs = {"x": np.zeros((1, 2), np.float32), "opt": np.zeros((1, 2), np.float32)}
    result = await execute(plan(DIAMOND), inputs, runners, wanted=["c"])
    assert set(result.outputs) == {"c"}
    assert log == ["start c", "end c"]


async def test_failure_names_the_node_and_cancels_the_rest():
    log: list[str] = []
    runners = {
        "a": Recorder("a", log, fail=True),
        "b": Recorder("b", log, hang=True),
        "c": Recorder("c", log),
        "fuse": Recorder("fuse", log),
    }
    with pytest.raises(InferenceError) as info:
        await asyncio.wait_for(
            execute(plan(DIAMOND), {"x": np.zeros((1, 2), np.float32)}, runners), 5
        )
    assert info.value.node == "a"
    assert "ValueError: boom" in str(info.value)
    assert "start fuse" not in log


async def test_deadline_names_the_running_nodes():
    loop = asyncio.get_running_loop()
    runners = {
        "a": Recorder("a", [], hang=True),
        "b": Recorder("b", []),
        "c": Recorder("c", []),
        "fuse": Recorder("fuse", []),
    }
    with pytest.raises(DeadlineExceeded, match="running nodes: a"):
        await execute(
            plan(DIAMOND), {"x": np.zeros((1, 2), np.float32)}, runners, deadline=loop.time() + 0.05
        )


async def test_a_node_past_its_timeout_fails_alone_with_its_name():
    s = dict(
        DIAMOND,
        nodes={
            **DIAMOND["nodes"],
            "b": {"plugin": "identity", "timeout_ms": 20, "inputs": {"x": "$inputs.x"}},
        },
    )
    runners = {
        "a": Recorder("a", []),
        "b": Recorder("b", [], hang=True),
        "c": Recorder("c", []),
        "fuse": Recorder("fuse", []),
    }
    with pytest.raises(
        InferenceError, match=r"node 'b' did not finish within its timeout_ms \(20 ms\)"
    ) as info:
        await asyncio.wait_for(execute(plan(s), {"x": np.zeros((1, 2), np.float32)}, runners), 5)
    assert info.value.node == "b"


CHAIN = {
    "name": "chain",
    "inputs": {"x": {"dtype": "float32", "shape": [2]}},
    "nodes": {
        "a": {"plugin": "identity", "inputs": {"x": "$inputs.x"}},
        "b": {"plugin": "identity", "inputs": {"x": "a.out"}},
    },
    "outputs": {"y": "b.out", "a": "a.out"},
}


def test_the_schedule_runs_a_chain_in_order_and_a_diamond_concurrently():
    diamond = plan(DIAMOND)
    assert not diamond.schedule().chain
    assert diamond.schedule(["c"]).nodes == ("c",)
    assert diamond.schedule(["c"]).chain
    assert diamond.schedule() is diamond.schedule(None)  # worked out once
    chain = plan(CHAIN)
    assert chain.schedule().nodes == ("a", "b")
    assert chain.schedule().chain
    assert chain.schedule(["a"]).nodes == ("a",)


async def test_a_chain_runs_in_the_callers_task():
    tasks: list[asyncio.Task | None] = []

    class InTask(Recorder):
        async def run(self, inputs, *, deadline):
            tasks.append(asyncio.current_task())
            return await super().run(inputs, deadline=deadline)

    log: list[str] = []
    x = np.ones((1, 2), np.float32)
    result = await execute(plan(CHAIN), {"x": x}, {n: InTask(n, log) for n in ("a", "b")})
    assert tasks == [asyncio.current_task()] * 2
    assert log == ["start a", "end a", "start b", "end b"]
    np.testing.assert_array_equal(result.outputs["y"], x + 2)
    assert result.timings["a"].end <= result.timings["b"].start


async def test_a_failure_in_a_chain_names_its_node_and_stops_the_chain():
    log: list[str] = []
    runners = {"a": Recorder("a", log, fail=True), "b": Recorder("b", log)}
    with pytest.raises(InferenceError) as info:
        await execute(plan(CHAIN), {"x": np.zeros((1, 2), np.float32)}, runners)
    assert info.value.node == "a"
    assert log == ["start a"]


async def test_deadline_names_the_running_node_of_a_chain():
    loop = asyncio.get_running_loop()
    runners = {"a": Recorder("a", []), "b": Recorder("b", [], hang=True)}
    with pytest.raises(DeadlineExceeded, match="running nodes: b"):
        await execute(
            plan(CHAIN), {"x": np.zeros((1, 2), np.float32)}, runners, deadline=loop.time() + 0.05
        )


class Late:
    """A runner whose model gave up on the request's deadline (as a batcher does)."""

    async def run(self, inputs, *, deadline):
        raise DeadlineExceeded("the deadline passed before a batch could run")


@pytest.mark.parametrize("spec", [CHAIN, DIAMOND], ids=["chain", "diamond"])
@pytest.mark.parametrize("with_deadline", [False, True])
async def test_a_runners_deadline_exceeded_reaches_the_caller_as_it_is(spec, with_deadline):
    loop = asyncio.get_running_loop()
    runners = {n: Recorder(n, []) for n in spec["nodes"]} | {"a": Late()}
    deadline = loop.time() + 5 if with_deadline else None
    with pytest.raises(DeadlineExceeded, match="before a batch could run"):
        await execute(plan(spec), {"x": np.zeros((1, 2), np.float32)}, runners, deadline=deadline)
