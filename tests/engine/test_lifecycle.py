"""Model lifecycle: versions loaded, routed, mirrored, reloaded and unloaded while serving.

The pipelines are tests/pipelines/lifecycle/: ``y = x * the number in the model file``, so
each answer says which version (and which load of it) served it.  Each test copies them into
its own folder, where it may rewrite or break their model files.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from engine.errors import LifecycleError
from engine.runtime.assembly import ServedPipeline, file_stamp, plan_placement
from engine.runtime.devices import CpuInfo, DeviceInventory
from engine.runtime.engine import Engine
from engine.runtime.lifecycle import Route
from engine.runtime.loading import load_for_serving
from engine.runtime.shadow import compare_outputs
from engine.runtime.types import InferenceRequest
from engine.runtime.workers.pool import WorkerPool
from engine.transport.client import Client
from model_plugins.errors import PipelineNotFound
from tests.serving import PIPELINES, serving, wait_until

LIFECYCLE = PIPELINES / "lifecycle"
X = np.arange(1, 5, dtype=np.float32)[None, :]  # one item: [1, 2, 3, 4]


def versions_in(folder: Path, *factors: tuple[str, float]) -> list[Path]:
    """Versions of pipeline ``scale`` in ``folder``: (version, factor) each, from the
    template of tests/pipelines/lifecycle; returns their YAML paths."""
    shutil.copy(LIFECYCLE / "factor.py", folder / "factor.py")
    template = (LIFECYCLE / "scale_v2.yaml").read_text()
    paths = []
    for version, factor in factors:
        text = template.replace('version: "2"', f'version: "{version}"')
        text = text.replace("factor_v2.txt", f"factor_v{version}.txt")
        (folder / f"factor_v{version}.txt").write_text(f"{factor}\n")
        path = folder / f"scale_v{version}.yaml"
        path.write_text(text)
        paths.append(path)
    return paths


def request(version: str | None = None, headers: dict[str, str] | None = None) -> InferenceRequest:
    return InferenceRequest("scale", {"x": X}, "r", version=version, headers=headers or {})


async def started(paths: list[Path], **options) -> Engine:
    pipelines, errors = load_for_serving(paths)
    assert not errors
    engine = Engine(
        pipelines,
        workers=WorkerPool(),
        inventory=options.pop("inventory", DeviceInventory.cpu_only(CpuInfo(2, 4000))),
        **options,
    )
    await engine.start()
    return engine


async def factor_of(
    engine: Engine, version: str | None = None, **headers: str
) -> tuple[str, float]:
    """(the version that answered, the factor it applied)."""
    result = await engine.infer(request(version, headers))
    return result.version, float(result.outputs["y"][0, 0])


def worker_models(engine: Engine) -> set[str]:
    return {m for stats in engine.workers.statistics().values() for m in stats["models"]}


# -- routing, without a server -----------------------------------------------------------------


def routed(weights: dict[str, float], sticky: str | None = None) -> Route:
    versions = {v: ServedPipeline.__new__(ServedPipeline) for v in ("1", "2", "10")}
    for version, served in versions.items():
        served.inflight = 0
        served.tag = version  # type: ignore[attr-defined]
    return Route("p", versions, weights, sticky)


def test_a_route_splits_by_weight_and_one_version_is_picked_without_a_draw():
    route = routed({"1": 0.9, "10": 0.1})
    picks = Counter(route.pick(None).tag for _ in range(20_000))
    assert set(picks) == {"1", "10"}
    assert abs(picks["10"] / 20_000 - 0.1) < 0.01
    only = routed({"2": 1.0})
    assert only.only is only.versions["2"]
    assert {only.pick(None).tag for _ in range(10)} == {"2"}


def test_a_sticky_header_keeps_one_value_on_one_version_and_spreads_values_by_weight():
    route = routed({"1": 0.5, "2": 0.5}, sticky="user")
    first = {f"u{i}": route.pick({"user": f"u{i}"}).tag for i in range(2000)}
    again = {f"u{i}": route.pick({"user": f"u{i}"}).tag for i in range(2000)}
    assert first == again
    share = Counter(first.values())["2"] / 2000
    assert 0.45 < share < 0.55
    # without the header: at random
    assert {route.pick({}).tag for _ in range(200)} == {"1", "2"}


def test_a_route_with_no_weight_serves_only_requests_that_name_a_version():
    with pytest.raises(PipelineNotFound):
        routed({}).pick(None)


def test_shadow_outputs_are_compared_by_name_dtype_shape_and_value():
    y = np.array([[1.0, 2.0]], np.float32)
    assert compare_outputs({"y": y}, {"y": y + 1e-9}) == (pytest.approx(0.0, abs=1e-6), True)
    assert compare_outputs({"y": y}, {"y": y * 3}) == (4.0, False)
    assert compare_outputs({"y": y}, {"y": y.astype(np.float64)})[1] is False
    assert compare_outputs({"y": y}, {"y": y[:, :1]})[1] is False
    assert compare_outputs({"y": y}, {"z": y})[1] is False
    text = np.array(["a"], dtype=object)
    assert compare_outputs({"t": text}, {"t": text.copy()}) == (0.0, True)


def test_a_model_file_rewritten_in_place_is_another_model(tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("2\n")
    before = file_stamp(path)
    path.write_text("3\n")  # same size, maybe the same mtime: the content tells
    assert file_stamp(path) != before
    assert file_stamp(tmp_path / "absent") is None


def test_a_version_placed_beside_others_gets_a_model_id_of_its_own(tmp_path):
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    pipelines, _ = load_for_serving([v1, v2])
    inventory = DeviceInventory.cpu_only(CpuInfo(2, 4000))
    placement, ids = plan_placement(pipelines[:1], inventory)
    assert list(ids.values()) == ["scale/scale"]
    _, more = plan_placement(pipelines[1:], inventory, current=placement, loaded=ids)
    assert sorted(more.values()) == ["scale/scale", "scale:2/scale"]


# -- the engine, in process ---------------------------------------------------------------------


async def test_a_loaded_version_takes_no_traffic_until_promoted(tmp_path):
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    engine = await started([v1])
    try:
        state = await engine.lifecycle.load(v2)
        assert (state.version, state.state, state.weight) == ("2", "ready", 0.0)
        assert {await factor_of(engine) for _ in range(50)} == {("1", 2.0)}
        assert await factor_of(engine, "2") == ("2", 3.0)  # a named version: exactly it
        with pytest.raises(PipelineNotFound):
            await factor_of(engine, "3")
        states = await engine.lifecycle.set_traffic("scale", {"1": 1, "2": 3})
        assert {s.version: s.weight for s in states} == {"1": 0.25, "2": 0.75}
        seen = {await factor_of(engine) for _ in range(100)}
        assert seen == {("1", 2.0), ("2", 3.0)}
        with pytest.raises(LifecycleError, match="no ready version '7'"):
            await engine.lifecycle.set_traffic("scale", {"7": 1})
        with pytest.raises(LifecycleError, match="at least one weight"):
            await engine.lifecycle.set_traffic("scale", {"1": 0})
        with pytest.raises(LifecycleError, match="a shadow never answers"):
            await engine.lifecycle.set_traffic("scale", {}, shadow="2")
        with pytest.raises(LifecycleError, match="already served"):
            await engine.lifecycle.load(v2)
    finally:
        await engine.aclose()


async def test_a_version_that_fails_to_load_changes_nothing(tmp_path):
    # v2 has two nodes: one shares v1's model, the other's file is broken
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    (tmp_path / "factor_v2.txt").write_text("not a number\n")
    text = v2.read_text().replace("outputs:\n  y: scale.y", "outputs:\n  y: scale.y\n  z: shared.y")
    text = text.replace(
        "nodes:\n",
        "nodes:\n  shared:\n    plugin: tests.pipelines.lifecycle.factor:Factor\n"
        "    model: factor_v1.txt\n    batching: {max_batch_size: 16, max_queue: 256}\n"
        "    inputs: {x: $inputs.x}\n",
    )
    v2.write_text(text)
    engine = await started([v1])
    try:
        models, loaded = dict(engine.models), worker_models(engine)
        with pytest.raises(LifecycleError, match="ValueError") as refused:
            await engine.lifecycle.load(v2)
        assert "node 'scale'" in str(refused.value)
        assert engine.models == models  # the shared model stays, the new one is gone
        assert worker_models(engine) == loaded
        assert [(s.version, s.state) for s in engine.lifecycle.versions()] == [
            ("1", "ready"),
            ("2", "failed"),
        ]
        assert "ValueError" in engine.lifecycle.versions()[1].why
        assert {await factor_of(engine) for _ in range(20)} == {("1", 2.0)}
        with pytest.raises(PipelineNotFound):
            await factor_of(engine, "2")
        await engine.lifecycle.unload("scale", "2")  # a failed version is forgotten
        assert [s.state for s in engine.lifecycle.versions()] == ["ready"]
    finally:
        await engine.aclose()


async def test_reload_swaps_a_rewritten_model_file_blue_green(tmp_path):
    (v1,) = versions_in(tmp_path, ("1", 2))
    engine = await started([v1])
    try:
        (old,) = worker_models(engine)
        (tmp_path / "factor_v1.txt").write_text("5\n")
        state = await engine.lifecycle.reload("scale", "1")
        assert state.state == "ready"
        assert await factor_of(engine) == ("1", 5.0)
        (new,) = state.models
        assert new != old
        assert worker_models(engine) == {new}  # the old model is unloaded from its worker
        assert [m.model_id for m in engine.models.values()] == [new]
        # nothing changed: the version is served again by the same model
        assert (await engine.lifecycle.reload("scale", "1")).models == (new,)
        assert worker_models(engine) == {new}
        # a file that no longer loads: refused, the version keeps serving as it was
        (tmp_path / "factor_v1.txt").write_text("broken\n")
        with pytest.raises(LifecycleError, match="ValueError"):
            await engine.lifecycle.reload("scale", "1")
        assert await factor_of(engine) == ("1", 5.0)
        assert worker_models(engine) == {new}
    finally:
        await engine.aclose()


async def test_unload_drains_then_frees_and_refuses_the_version_taking_all_traffic(tmp_path):
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    engine = await started([v1, v2])  # at startup the latest takes all
    try:
        assert {await factor_of(engine) for _ in range(20)} == {("2", 3.0)}
        with pytest.raises(LifecycleError, match="takes all the requests"):
            await engine.lifecycle.unload("scale", "2")
        await engine.lifecycle.set_traffic("scale", {"1": 1})
        # a request in flight on v2 when it is unloaded still gets its answer
        served = engine.find("scale", "2")
        model = next(iter(engine.models.values()))
        gate = asyncio.Event()
        slow = _slowed(served, gate)
        inflight = asyncio.create_task(engine.infer(request("2")))
        await _until(lambda: served.inflight == 1)
        unloading = asyncio.create_task(engine.lifecycle.unload("scale", "2"))
        await _until(lambda: engine.lifecycle.versions()[-1].state == "draining")
        with pytest.raises(PipelineNotFound):  # not routed any more, even by name
            await factor_of(engine, "2")
        assert not unloading.done()
        gate.set()
        assert (await inflight).version == "2"
        await unloading
        slow()
        assert [(s.version, s.state) for s in engine.lifecycle.versions()] == [("1", "ready")]
        assert worker_models(engine) == {"scale/scale"}
        assert model.model_id == "scale/scale"
        # the only version of a name may go: the name is then not served
        await engine.lifecycle.unload("scale", "1")
        assert worker_models(engine) == set()
        with pytest.raises(PipelineNotFound):
            await factor_of(engine)
    finally:
        await engine.aclose()


def _slowed(served: ServedPipeline, gate: asyncio.Event):
    """Make ``served``'s node wait for ``gate``; returns the undo."""
    runner = served.runners["scale"]
    run = runner.run

    async def gated(inputs, *, deadline):
        await gate.wait()
        return await run(inputs, deadline=deadline)

    runner.run = gated  # type: ignore[method-assign]
    return lambda: setattr(runner, "run", run)


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.005)


async def test_a_shadow_gets_a_copy_of_each_answered_request_and_never_answers(tmp_path):
    v1, v2, v3 = versions_in(tmp_path, ("1", 2), ("2", 3), ("3", 2))
    engine = await started([v1])
    try:
        for path in (v2, v3):
            await engine.lifecycle.load(path)
        await engine.lifecycle.set_traffic("scale", {"1": 1}, shadow="2")
        assert {await factor_of(engine) for _ in range(30)} == {("1", 2.0)}
        metrics = engine.metrics
        await _until(lambda: metrics.shadow_requests.snapshot().get(("scale", "2")) == 30)
        await _until(lambda: not engine.lifecycle._shadow_tasks)
        assert metrics.shadow_mismatches.snapshot()[("scale", "2")] == 30
        assert metrics.shadow_max_abs_difference.get("scale", "2") == 4.0  # 4 * (3 - 2)
        # the same outputs from another file: no mismatch
        await engine.lifecycle.set_traffic("scale", {"1": 1}, shadow="3")
        assert {await factor_of(engine) for _ in range(10)} == {("1", 2.0)}
        await _until(lambda: metrics.shadow_requests.snapshot().get(("scale", "3")) == 10)
        await _until(lambda: not engine.lifecycle._shadow_tasks)
        assert metrics.shadow_mismatches.snapshot().get(("scale", "3"), 0) == 0
        # over the bound: dropped and counted, the reply unchanged
        engine.lifecycle.max_shadow_inflight = 0
        assert await factor_of(engine) == ("1", 2.0)
        assert metrics.shadow_dropped.snapshot()[("scale", "3")] == 1
        states = {s.version: s.shadow for s in engine.lifecycle.versions()}
        assert states == {"1": False, "2": False, "3": True}
    finally:
        await engine.aclose()


async def test_the_state_file_brings_back_runtime_versions_and_weights(tmp_path, caplog):
    v1, v2, v3 = versions_in(tmp_path, ("1", 2), ("2", 3), ("3", 4))
    state_file = tmp_path / "state" / "lifecycle.json"
    engine = await started([v1], state_file=state_file)
    try:
        await engine.lifecycle.load(v2)
        await engine.lifecycle.load(v3)
        await engine.lifecycle.set_traffic("scale", {"1": 1, "2": 3}, sticky_header="user")
    finally:
        await engine.aclose()
    saved = json.loads(state_file.read_text())
    assert saved["pipelines"]["scale"]["weights"] == {"1": 0.25, "2": 0.75}
    assert set(saved["pipelines"]["scale"]["loaded"]) == {"2", "3"}
    assert not list(state_file.parent.glob(".*.tmp"))  # written whole, then renamed
    (tmp_path / "factor_v3.txt").write_text("broken\n")  # v3 no longer loads: skipped
    engine = await started([v1], state_file=state_file)
    try:
        states = {s.version: (s.state, s.weight) for s in engine.lifecycle.versions()}
        assert states == {"1": ("ready", 0.25), "2": ("ready", 0.75), "3": ("failed", 0.0)}
        assert engine.lifecycle.versions()[0].sticky_header == "user"
        assert "3 not restored" in caplog.text
        picked = {await factor_of(engine, user="alice") for _ in range(20)}
        assert len(picked) == 1
        # a version that did not come back stays in the state until it is unloaded
        assert engine.lifecycle.versions()[-1].path == str(v3)
        await engine.lifecycle.set_traffic("scale", {"2": 1})
        assert set(json.loads(state_file.read_text())["pipelines"]["scale"]["loaded"]) == {"2", "3"}
        await engine.lifecycle.unload("scale", "3")
        assert set(json.loads(state_file.read_text())["pipelines"]["scale"]["loaded"]) == {"2"}
    finally:
        await engine.aclose()


async def test_blue_green_needs_room_for_both_or_reloads_in_place(tmp_path):
    (v1,) = versions_in(tmp_path, ("1", 2))
    v1.write_text(
        v1.read_text().replace(
            "    model: factor_v1.txt\n",
            "    model: factor_v1.txt\n    device: cuda:0\n    gpu_memory_mb: 6000\n",
        )
    )
    inventory = DeviceInventory.from_config([{"index": 0, "name": "FakeCard", "memory_mb": 10000}])
    engine = await started([v1], inventory=inventory)
    try:
        assert engine.placement.models == {"scale/scale": "cuda:0"}
        (tmp_path / "factor_v1.txt").write_text("5\n")
        with pytest.raises(LifecycleError, match="needs 6000 MB") as refused:
            await engine.lifecycle.reload("scale", "1")
        assert "left: cuda:0 4000 MB" in str(refused.value)
        assert "in place" in str(refused.value)
        assert await factor_of(engine) == ("1", 2.0)
        # in place: the version's requests wait while its model is swapped
        old = engine.find("scale", "1")
        reloading = asyncio.create_task(engine.lifecycle.reload("scale", "1", in_place=True))
        await _until(lambda: old.paused is not None)
        waiting = [asyncio.create_task(factor_of(engine)) for _ in range(5)]
        state = await reloading
        assert set(await asyncio.gather(*waiting)) == {("1", 5.0)}
        assert engine.placement.models == {state.models[0]: "cuda:0"}
        assert engine.placement.budgets["cuda:0"].memory_committed_mb == 6000
    finally:
        await engine.aclose()


# -- a real server under closed-loop load ---------------------------------------------------------


class Load:
    """Client threads in closed loop on pipeline ``scale``; each answer is kept as (the phase
    when it was sent, the version that answered, the factor it applied)."""

    def __init__(self, port: int, clients: int = 4, headers: dict[str, str] | None = None):
        self.port = port
        self.phase = "start"
        self.answers: list[tuple[str, str, float]] = []
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(clients)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _loop(self) -> None:
        with Client("127.0.0.1", self.port, timeout_s=30) as client:
            while not self._stop.is_set():
                phase = self.phase
                try:
                    result = client.infer("scale", {"x": X})
                except Exception as exc:  # every failure counts, whatever it is
                    self.failures.append(f"{phase}: {type(exc).__name__}: {exc}")
                    continue
                # A thread may be held up between reading the phase and sending: a request
                # whose phase changed before its answer came was sent around a change.
                if self.phase != phase:
                    phase = "changing"
                y = result.outputs["y"]
                factor = float(y[0, 0])
                if not np.array_equal(y, X * np.float32(factor)):
                    self.wrong.append(f"{phase}: {y!r}")
                self.answers.append((phase, result.version, factor))

    def at(self, phase: str) -> Counter[tuple[str, float]]:
        return Counter((v, f) for p, v, f in self.answers if p == phase)

    def wait(self, phase: str, count: int, timeout_s: float = 120) -> None:
        wait_until(lambda: sum(self.at(phase).values()) >= count, f"{count} in {phase}", timeout_s)


def roll_out(
    server,
    load: Load,
    v2: Path,
    canary: dict[str, float],
    *,
    at_least: int,
    in_canary: int,
    timeout_s: float = 60.0,
) -> None:
    """Under ``load``: load ``v2``, split by ``canary``, promote it, reload it after its factor
    file was rewritten to 5, unload v1; each phase waits for ``at_least`` answers (``in_canary``
    in the canary).  A phase names what was served when a request was sent; a request sent
    while a change is being made is counted under "changing" (either side of it may answer)."""
    lifecycle = server.engine.lifecycle
    steps = [
        ("loaded", lambda: lifecycle.load(v2)),
        ("canary", lambda: lifecycle.set_traffic("scale", canary)),
        ("promoted", lambda: lifecycle.set_traffic("scale", {"2": 1})),
        ("reloaded", lambda: lifecycle.reload("scale", "2")),
        ("v2", lambda: lifecycle.unload("scale", "1")),
    ]
    load.phase = "v1"
    load.wait("v1", at_least)
    for phase, change in steps:
        load.phase = "changing"
        if phase == "reloaded":
            (v2.parent / "factor_v2.txt").write_text("5\n")
        server.run(change(), timeout_s=timeout_s)
        load.phase = phase
        load.wait(phase, in_canary if phase == "canary" else at_least)


@pytest.mark.e2e
def test_a_rollout_under_load_fails_no_request(tmp_path):
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    with serving([v1]) as server, Load(server.port) as load:
        roll_out(server, load, v2, {"1": 0.9, "2": 0.1}, at_least=100, in_canary=3000)
    assert load.failures == []
    assert load.wrong == []
    versions = {("1", 2.0), ("2", 3.0), ("2", 5.0)}  # every answer is one version's output
    assert set(Counter((v, f) for _, v, f in load.answers)) <= versions
    assert set(load.at("v1")) == set(load.at("loaded")) == {("1", 2.0)}
    canary = load.at("canary")
    share = canary[("2", 3.0)] / sum(canary.values())
    assert abs(share - 0.1) <= 0.03, canary
    assert set(load.at("promoted")) == {("2", 3.0)}
    assert set(load.at("reloaded")) == set(load.at("v2")) == {("2", 5.0)}
    assert load.at("changing")  # requests ran while every change was made


@pytest.mark.e2e
def test_a_broken_version_leaves_every_request_to_the_old_and_sticky_users_stay(tmp_path):
    v1, v2 = versions_in(tmp_path, ("1", 2), ("2", 3))
    (tmp_path / "factor_v2.txt").write_text("three\n")
    with serving([v1]) as server:
        lifecycle = server.engine.lifecycle
        with Load(server.port) as load:
            load.phase = "broken"
            with pytest.raises(LifecycleError, match="could not convert string to float"):
                server.run(lifecycle.load(v2))
            load.wait("broken", 100)
        assert load.failures == []
        assert set(Counter((v, f) for _, v, f in load.answers)) == {("1", 2.0)}
        (tmp_path / "factor_v2.txt").write_text("3\n")
        server.run(lifecycle.load(v2))
        server.run(lifecycle.set_traffic("scale", {"1": 1, "2": 1}, sticky_header="x-user"))
        with Client("127.0.0.1", server.port) as client:
            picks = {
                user: {
                    client.infer("scale", {"x": X}, headers={"x-user": user}).version
                    for _ in range(3)
                }
                for user in (f"user-{i}" for i in range(40))
            }
        assert all(len(v) == 1 for v in picks.values()), picks
        assert {v for (v,) in picks.values()} == {"1", "2"}


@pytest.mark.e2e
def test_a_restarted_server_comes_back_with_the_state_file_s_versions_and_traffic(tmp_path):
    from engine.transport.admin_client import AdminClient

    v1, v2, v3 = versions_in(tmp_path, ("1", 2), ("2", 3), ("3", 4))
    state_file = tmp_path / "state.json"
    with serving([v1], state_file=state_file, admin_port=0) as server:
        admin = AdminClient("127.0.0.1", server.admin_port, timeout_s=60)
        admin.load(str(v2))
        admin.load(str(v3))
        admin.traffic("scale", {"1": 1, "2": 3}, shadow="3", sticky_header="x-user")
    assert state_file.exists()
    # a new server, started from the config's version 1 alone
    with serving([v1], state_file=state_file, admin_port=0) as server:
        states = {
            s.version: (s.state, s.weight, s.shadow, s.sticky_header)
            for s in server.engine.lifecycle.versions()
        }
        assert states == {
            "1": ("ready", 0.25, False, "x-user"),
            "2": ("ready", 0.75, False, "x-user"),
            "3": ("ready", 0.0, True, "x-user"),
        }
        with Client("127.0.0.1", server.port) as client:
            pinned = client.infer("scale", {"x": X}, version="3")  # loaded at runtime, back
            assert (pinned.version, float(pinned.outputs["y"][0, 0])) == ("3", 4.0)
            picks = {
                user: {
                    client.infer("scale", {"x": X}, headers={"x-user": user}).version
                    for _ in range(2)
                }
                for user in (f"user-{i}" for i in range(30))
            }
        assert all(len(v) == 1 for v in picks.values()), picks  # sticky, as before
        assert {v for (v,) in picks.values()} == {"1", "2"}  # the shadow never answers
