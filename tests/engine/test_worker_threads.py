"""Threads and memory settings of worker processes (``model_plugins._host.threads``).

What a worker applies, seen from inside it: a plugin reports the variables its process started
with, torch's thread counts on its instance thread and numpy's BLAS threads.  No timing.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import threading
import time
from typing import Any, ClassVar

import numpy as np
import pytest
from pydantic import ValidationError

from engine.config import ServerConfig
from engine.runtime.workers.pool import WorkerKey, WorkerPool
from model_plugins import LoadContext, ModelPlugin, TensorSpec
from model_plugins._host import threads


def skip_without_torch() -> None:
    """Skip where torch is not installed, without importing it here: this process must never
    import a framework (other tests check that)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")


REPORTED = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOMP_SPINCOUNT",
    "OPENBLAS_THREAD_TIMEOUT", "GLIBC_TUNABLES", "TF_NUM_INTRAOP_THREADS",
    threads.THREADS_VAR, threads.CORES_VAR, threads.FRAMEWORK_VAR,
)  # fmt: skip


class ThreadReport(ModelPlugin):
    """Answers, per item, what its worker set: env, torch threads (torch workers), BLAS."""

    inputs: ClassVar = {"x": TensorSpec("float32", [-1])}
    outputs: ClassVar = {"report": TensorSpec("string", [])}

    def predict(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        report: dict[str, Any] = {"env": {k: os.environ.get(k) for k in REPORTED}}
        time.sleep(float(batch["x"][0, 1]))  # x[0, 1]: seconds to hold the call
        if self.framework == "torch":
            import torch

            report["torch"] = torch.get_num_threads()  # of this (the instance's) thread
            report["interop"] = torch.get_num_interop_threads()
        try:
            from threadpoolctl import threadpool_info

            blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
            report["blas"] = blas[0] if blas else None
        except ImportError:
            report["blas"] = None
        return {"report": np.array([json.dumps(report)] * len(batch["x"]), dtype=object)}


class TorchThreadReport(ThreadReport):
    framework = "torch"


PLUGIN = f"{__name__}:ThreadReport"
TORCH_PLUGIN = f"{__name__}:TorchThreadReport"
X = {"x": np.array([[1, 0]], np.float32)}


async def report(
    pool: WorkerPool, key: WorkerKey, model_id: str, instance: int = 0, hold_s: float = 0
) -> dict[str, Any]:
    x = {"x": np.array([[1, hold_s]], np.float32)}
    got = await pool.predict(key, model_id, x, instance=instance)
    return json.loads(got["report"][0])  # type: ignore[no-any-return]


async def reports(
    pool: WorkerPool, key: WorkerKey, model_id: str, instances: int
) -> list[dict[str, Any]]:
    return [await report(pool, key, model_id, instance) for instance in range(instances)]


async def load(pool: WorkerPool, key: WorkerKey, model_id: str, plugin: str, n: int) -> None:
    contexts = tuple(
        LoadContext(node=model_id, plugin=plugin, params={"m": model_id}, instance=i)
        for i in range(n)
    )
    await pool.load(key, model_id, plugin, contexts)


# -- the rule and the environment -----------------------------------------------------------


def test_each_instance_gets_its_share_of_the_cores():
    assert threads.per_instance(8, 1, None) == 8
    assert threads.per_instance(8, 3, None) == 2
    assert threads.per_instance(2, 4, None) == 1  # never 0
    assert threads.per_instance(8, 3, 5) == 5  # N is per instance, whatever the worker holds
    assert threads.available_cores() >= 1


def test_setting_is_auto_or_a_positive_int():
    assert threads.parse_setting("auto") is None
    assert threads.parse_setting(None) is None
    assert threads.parse_setting("3") == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="positive integer"):
            threads.parse_setting(bad)
    assert ServerConfig().worker_threads == "auto"
    assert ServerConfig(worker_threads=3).worker_threads == 3
    for wrong in (0, "many"):
        with pytest.raises(ValidationError):
            ServerConfig.model_validate({"worker_threads": wrong})


def test_worker_environment_sets_widths_spin_and_malloc():
    env = threads.worker_environment("torch", None, cores=4, environ={})
    assert env[threads.THREADS_VAR] == "auto"
    assert env[threads.CORES_VAR] == "4"
    assert env[threads.FRAMEWORK_VAR] == "torch"
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "4"
    assert env["GOMP_SPINCOUNT"] == threads.SPIN_VARS["GOMP_SPINCOUNT"]
    assert "glibc.malloc.arena_max=1" in env["GLIBC_TUNABLES"]
    assert "TF_NUM_INTRAOP_THREADS" not in env
    tf = threads.worker_environment("tensorflow", 3, cores=8, environ={})
    assert tf[threads.THREADS_VAR] == "3"
    assert tf["TF_NUM_INTRAOP_THREADS"] == "3"
    assert tf["TF_NUM_INTEROP_THREADS"] == str(threads.TF_INTER_OP)


def test_what_the_operator_set_is_kept():
    environ = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "PASSIVE", "MALLOC_ARENA_MAX": "4"}
    env = threads.worker_environment("torch", None, cores=8, environ=environ)
    assert env[threads.THREADS_VAR] == "3"  # OMP_NUM_THREADS counts as N under auto
    assert "OMP_NUM_THREADS" not in env  # inherited as it is
    assert env["MKL_NUM_THREADS"] == "3"
    assert "GOMP_SPINCOUNT" not in env  # the operator chose how threads wait
    assert "GLIBC_TUNABLES" not in env  # ... and glibc's malloc
    merged = threads.malloc_environment({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert merged["GLIBC_TUNABLES"].startswith("glibc.cpu.hwcaps=-AVX512F:glibc.malloc.")
    assert threads.malloc_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}


def test_instances_are_the_live_threads_that_settled():
    budget = threads._Budget()
    seen: list[int] = []
    release = threading.Event()

    def instance() -> None:
        seen.append(budget.instances())
        release.wait(10)

    first = threading.Thread(target=instance)
    first.start()
    second = threading.Thread(target=instance)
    second.start()
    while len(seen) < 2:
        threading.Event().wait(0.01)
    assert sorted(seen) == [1, 2]
    release.set()
    first.join()
    second.join()
    assert budget.instances() == 1  # the two have ended: only the caller is left


def test_running_counts_the_calls_in_flight_and_those_just_ended(monkeypatch):
    budget = threads._Budget()
    monkeypatch.setattr(threads, "BUSY_WINDOW_S", 0.2)
    counts: dict[str, int] = {}
    inside, release, done = threading.Event(), threading.Event(), threading.Event()

    def long_call() -> None:
        counts["long"] = budget.begin()
        inside.set()
        release.wait(10)
        budget.end()
        done.wait(10)  # an instance's thread lives on between calls

    other = threading.Thread(target=long_call)
    other.start()
    inside.wait(10)
    counts["beside"] = budget.begin()  # the long call is running: two
    budget.end()
    release.set()
    while budget.ended[other] == float("inf"):
        time.sleep(0.001)
    counts["just_after"] = budget.begin()  # it ended a moment ago: still counted
    budget.end()
    time.sleep(0.3)
    counts["alone"] = budget.begin()  # both idle past the window: this call alone
    budget.end()
    done.set()
    other.join()
    assert counts == {"long": 1, "beside": 2, "just_after": 2, "alone": 1}


# -- inside a worker -----------------------------------------------------------------------


@pytest.mark.e2e
async def test_a_numpy_worker_starts_with_its_settings():
    pool = WorkerPool()
    key = WorkerKey("numpy", "cpu")
    try:
        await load(pool, key, "report", PLUGIN, 1)
        (report,) = await reports(pool, key, "report", 1)
    finally:
        await pool.aclose()
    cores = threads.available_cores()
    expected = threads.worker_environment("numpy", None)
    for var in REPORTED:
        assert report["env"][var] == expected.get(var, os.environ.get(var)), var
    assert report["env"][threads.CORES_VAR] == str(cores)
    if report["blas"] is not None:  # threadpoolctl is installed in the worker
        assert report["blas"] == threads.per_instance(cores, 1, expected_setting())


def expected_setting() -> int | None:
    return threads.explicit_setting(None, os.environ)


@pytest.mark.e2e
@pytest.mark.frameworks
async def test_a_torch_worker_shares_its_cores_among_the_instances_running():
    skip_without_torch()
    pool = WorkerPool()
    key = WorkerKey("torch", "cpu")
    cores = threads.available_cores()
    setting = expected_setting()
    idle_s = threads.BUSY_WINDOW_S * 3
    try:
        await load(pool, key, "one", TORCH_PLUGIN, 1)
        alone = await report(pool, key, "one")
        assert alone["torch"] == threads.per_instance(cores, 1, setting)
        assert alone["interop"] == 1
        assert alone["env"][threads.FRAMEWORK_VAR] == "torch"
        # a second model of two instances, loaded and idle: the first still gets every core
        await load(pool, key, "two", TORCH_PLUGIN, 2)
        await asyncio.sleep(idle_s)
        beside_idle = await report(pool, key, "one")
        assert beside_idle["torch"] == threads.per_instance(cores, 1, setting)
        # while both instances of the second run, the three share the cores
        await asyncio.sleep(idle_s)
        busy = [asyncio.create_task(report(pool, key, "two", i, hold_s=1.5)) for i in (0, 1)]
        await asyncio.sleep(0.5)
        beside_busy = await report(pool, key, "one")
        assert beside_busy["torch"] == threads.per_instance(cores, 3, setting)
        assert [(await call)["torch"] for call in busy] in (
            [threads.per_instance(cores, n, setting) for n in order] for order in ((1, 2), (2, 1))
        )
        await asyncio.sleep(idle_s)
        again = await report(pool, key, "one")
        assert again["torch"] == threads.per_instance(cores, 1, setting)
    finally:
        await pool.aclose()


@pytest.mark.e2e
@pytest.mark.frameworks
async def test_worker_threads_n_gives_every_instance_n():
    skip_without_torch()
    pool = WorkerPool(worker_threads=3)
    key = WorkerKey("torch", "cpu")
    try:
        await load(pool, key, "two", TORCH_PLUGIN, 2)
        got = await reports(pool, key, "two", 2)
    finally:
        await pool.aclose()
    assert [r["torch"] for r in got] == [3, 3]
    assert got[0]["env"]["OMP_NUM_THREADS"] == os.environ.get("OMP_NUM_THREADS", "3")
    assert got[0]["env"][threads.THREADS_VAR] == "3"
