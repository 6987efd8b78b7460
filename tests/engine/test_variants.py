"""Node variants served: the split by weight, sticky keys, the shadow (never answers, is
compared and counted, is bounded), weights changed at run time, and what a reply and the
metrics say about the variant that ran.  Pipelines: tests/pipelines/variants/."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from dag.runner import VariantScope, variant_scope
from engine.observability.metrics import Metrics
from engine.runtime.devices import CpuInfo, DeviceInventory
from engine.runtime.engine import Engine
from engine.runtime.loading import load_for_serving
from engine.runtime.types import InferenceRequest
from engine.runtime.variants import VariantRunner, set_variant_weights
from engine.transport.client import Client
from model_plugins.errors import InferenceError
from tests.serving import PIPELINES, serving, wait_until

VARIANTS = PIPELINES / "variants"
X = np.ones((1, 2), np.float32)


class Arm:
    """y = x * factor; records its calls; ``gate`` (an Event) holds each call until set."""

    def __init__(self, factor: float, gate: asyncio.Event | None = None, fail: bool = False):
        self.factor, self.gate, self.fail = factor, gate, fail
        self.calls = 0

    async def run(self, inputs, *, deadline):
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise InferenceError("the shadow broke", node="n@next")
        return {"y": inputs["x"] * self.factor}

    async def aclose(self):
        pass


def runner(weights=None, shadow=None, metrics=None, **arms) -> VariantRunner:
    arms.setdefault("base", Arm(1))
    table = {None if name == "base" else name: arm for name, arm in arms.items()}
    return VariantRunner("p", "n", table, weights or {}, shadow=shadow, metrics=metrics)


# -- choosing -----------------------------------------------------------------------------------


def test_requests_are_split_by_weight_and_the_node_takes_the_rest():
    split = runner({"a": 10, "b": 30}, a=Arm(2), b=Arm(3))
    picks = Counter(split.choose(None) for _ in range(20_000))
    assert abs(picks["a"] / 20_000 - 0.10) < 0.015
    assert abs(picks["b"] / 20_000 - 0.30) < 0.015
    assert abs(picks[None] / 20_000 - 0.60) < 0.015


def test_a_sticky_key_keeps_one_variant_while_the_weights_stay():
    split = runner({"a": 50}, a=Arm(2))
    first = {f"u{i}": split.choose(f"u{i}") for i in range(2000)}
    assert first == {f"u{i}": split.choose(f"u{i}") for i in range(2000)}
    assert 0.45 < Counter(first.values())["a"] / 2000 < 0.55


def test_no_weight_never_draws_and_all_weight_never_reaches_the_node():
    assert {runner({"a": 0}, a=Arm(2)).choose(None) for _ in range(100)} == {None}
    assert {runner({"a": 100}, a=Arm(2)).choose(None) for _ in range(1000)} == {"a"}


def test_weights_change_at_run_time_and_bad_ones_change_nothing():
    split = runner({"a": 10, "b": 0}, shadow="s", a=Arm(2), b=Arm(3), s=Arm(4))
    split.set_weights({"b": 90})
    assert split.weights == {"a": 10, "b": 90}
    for bad, words in [
        ({"c": 1}, "variant 'c' is not one of its variants (variants that take weight: a, b)"),
        ({"s": 1}, "variant 's' is the shadow"),
        ({"a": 11}, "must add up to at most 100 percent (got 101"),
        ({"a": -1}, "a weight is a percent from 0 to 100 (got -1)"),
        ({"a": "5"}, "a weight is a percent from 0 to 100 (got '5')"),
    ]:
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            split.set_weights(bad)
        assert split.weights == {"a": 10, "b": 90}


def test_set_variant_weights_names_a_node_that_has_none():
    runners = {"n": runner({"a": 10}, a=Arm(2)), "m": Arm(1)}
    assert set_variant_weights(runners, "n", {"a": 20}) == {"a": 20}
    with pytest.raises(ValueError, match="node 'm' has no variants"):
        set_variant_weights(runners, "m", {"a": 20})
    with pytest.raises(ValueError, match="no node 'x'"):
        set_variant_weights(runners, "x", {})


# -- running and the shadow ---------------------------------------------------------------------


async def test_the_shadow_never_answers_and_its_differences_are_counted():
    metrics = Metrics()
    split = runner(shadow="next", metrics=metrics, next=Arm(3))
    scope = VariantScope()
    token = variant_scope.set(scope)
    try:
        answer = await split.run({"x": X}, deadline=None)
    finally:
        variant_scope.reset(token)
    np.testing.assert_array_equal(answer["y"], X)  # the node's answer, not the shadow's
    assert scope.ran == {}  # the node itself ran
    labels = ("p", "n", "next")
    await asyncio.wait_for(asyncio.gather(*split._shadow_tasks), 5)
    assert metrics.variant_shadow_requests._series[labels][0] == 1
    assert metrics.variant_shadow_mismatches._series[labels][0] == 1
    assert metrics.variant_shadow_max_abs_difference.get(*labels) == 2.0


async def test_an_equal_shadow_is_no_mismatch_and_a_failing_one_is():
    metrics = Metrics()
    same = runner(shadow="next", metrics=metrics, next=Arm(1))
    await same.run({"x": X}, deadline=None)
    await asyncio.gather(*same._shadow_tasks)
    labels = ("p", "n", "next")
    assert metrics.variant_shadow_requests._series[labels][0] == 1
    assert labels not in metrics.variant_shadow_mismatches._series
    broken = runner(shadow="next", metrics=metrics, next=Arm(1, fail=True))
    await broken.run({"x": X}, deadline=None)  # the reply does not see the failure
    await asyncio.gather(*broken._shadow_tasks)
    assert metrics.variant_shadow_mismatches._series[labels][0] == 1
    assert metrics.node_errors._series[("p", "n@next", "InferenceError")][0] == 1


async def test_a_slow_shadow_never_delays_the_reply_and_copies_in_flight_are_bounded():
    metrics = Metrics()
    gate = asyncio.Event()
    shadow = Arm(3, gate=gate)
    split = runner(shadow="next", metrics=metrics, next=shadow)
    split.max_shadow_inflight = 2
    for _ in range(5):  # each returns at once while the shadow is held
        answer = await asyncio.wait_for(split.run({"x": X}, deadline=None), 1)
        np.testing.assert_array_equal(answer["y"], X)
    await asyncio.sleep(0)
    assert (split.shadow_inflight(), shadow.calls) == (2, 2)
    assert metrics.variant_shadow_dropped._series[("p", "n", "next")][0] == 3
    gate.set()
    await asyncio.gather(*split._shadow_tasks)
    await split.aclose()


async def test_the_shadow_gets_a_copy_of_the_inputs():
    seen = []

    class Writer(Arm):
        async def run(self, inputs, *, deadline):
            seen.append(inputs["x"])
            inputs["x"][...] = -1  # a plugin that writes into its inputs
            return {"y": inputs["x"]}

    x = np.ones((1, 2), np.float32)
    split = runner(shadow="next", next=Writer(1))
    await split.run({"x": x}, deadline=None)
    await asyncio.gather(*split._shadow_tasks)
    assert seen[0] is not x
    assert (x == 1).all()


async def test_which_variant_ran_is_recorded_in_the_scope():
    split = runner({"a": 100}, a=Arm(2))
    scope = VariantScope()
    token = variant_scope.set(scope)
    try:
        answer = await split.run({"x": X}, deadline=None)
    finally:
        variant_scope.reset(token)
    assert scope.ran == {"n": "a"}
    np.testing.assert_array_equal(answer["y"], X * 2)


async def test_the_pipeline_sticky_header_keeps_a_user_on_one_variant():
    pipelines, errors = load_for_serving([VARIANTS / "split.yaml"])
    assert not errors
    engine = Engine(pipelines, inventory=DeviceInventory.cpu_only(CpuInfo(2, 4000)))
    await engine.start()
    try:
        await engine.lifecycle.set_traffic("split", {"1": 1.0}, sticky_header="user")

        async def factor(user: str) -> float:
            request = InferenceRequest("split", {"x": X}, "r", headers={"user": user})
            return float((await engine.infer(request)).outputs["y"][0, 0])

        users = [f"u{i}" for i in range(300)]
        first = [await factor(user) for user in users]
        assert first == [await factor(user) for user in users]
        assert 0.04 < first.count(2.0) / len(users) < 0.16  # the canary's 10 %
    finally:
        await engine.aclose()


# -- through a real server ----------------------------------------------------------------------

REQUESTS = 3000


@pytest.mark.e2e
@pytest.mark.slow
def test_a_canary_takes_its_share_and_the_shadow_never_answers_through_a_server():
    with serving([VARIANTS / "split.yaml"]) as server, Client("127.0.0.1", server.port) as client:
        with ThreadPoolExecutor(4) as callers:  # 4 requests in flight
            results = list(callers.map(lambda _: client.infer("split", {"x": X}), range(REQUESTS)))
        answers = Counter(float(result.outputs["y"][0, 0]) for result in results)
        labels = Counter(tuple(sorted(result.node_latency_us)) for result in results)
        # y = x * 1 from the node, * 2 from the canary; never * 3 (the shadow)
        assert set(answers) == {1.0, 2.0}
        assert abs(answers[2.0] / REQUESTS - 0.10) <= 0.03
        # the reply's per-node latencies name the variant that ran
        assert labels == {
            ("embed", "post"): answers[1.0],
            ("embed@candidate", "post"): answers[2.0],
        }
        metrics = server.engine.metrics
        node_seconds = {k: series[0] for k, series in metrics.node_seconds._series.items()}
        assert sum(node_seconds[("split", "embed@candidate")]) == answers[2.0]
        assert sum(node_seconds[("split", "embed")]) == answers[1.0]
        # every request was mirrored to the shadow (none dropped at this pace), and differs
        shadow = ("split", "embed", "next")
        mirrored = metrics.variant_shadow_requests._series
        wait_until(lambda: shadow in mirrored and mirrored[shadow][0] == REQUESTS, "shadow copies")
        assert metrics.variant_shadow_mismatches._series[shadow][0] == REQUESTS
        assert shadow not in metrics.variant_shadow_dropped._series

        # weights move at run time: all to the canary
        served = server.engine.find("split")
        set_variant_weights(served.runners, "embed", {"candidate": 100})
        result = client.infer("split", {"x": X})
        assert float(result.outputs["y"][0, 0]) == 2.0
        assert "embed@candidate" in result.node_latency_us
