"""Model workers as Ray actors (issue 16): a real server whose workers are actors of a real
one-node Ray cluster on 127.0.0.1, started by this module and shut down after it.

The two-node cluster, pinning by custom resources across nodes and the loss of a node are
tests/engine/test_ray_cluster.py's.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.config import RayConfig
from engine.runtime.placement import PlacementRequest
from engine.runtime.ray_placement import RAY_GPU, place_on_ray
from engine.transport.client import Client
from model_plugins.errors import DeadlineExceeded, InferenceError, PluginLoadError
from tests.serving import PIPELINES, ROOT, ServerThread, serving, wait_until

RAY = PIPELINES / "ray"
HAS_RAY = importlib.util.find_spec("ray") is not None
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="the ray extra is not installed")


# -- which models share an actor, and what it asks for (no Ray needed) ----------------------


def _request(model: str, **fields: Any) -> PlacementRequest:
    return PlacementRequest(model_id=model, pipeline="p", node=model, **fields)


def test_actor_requests_follow_gpu_share_memory_and_ray_resources() -> None:
    placement = place_on_ray(
        [
            _request("a", device="auto", gpu_memory_mb=2000, gpu_share=0.5, framework="torch"),
            _request("b", device="cuda:3", gpu_memory_mb=1000, gpu_share=0.3, framework="torch"),
            _request("c", device="auto", gpu_memory_mb=500, gpu_share=0.4, framework="torch"),
            _request("whole", device="cuda:0", gpu_memory_mb=0, framework="torch"),
            _request("zoned", device="auto", gpu_memory_mb=100, gpu_share=0.1,
                     framework="torch", ray_resources=(("zone_b", 1.0),)),
            _request("cpu1", device="cpu", framework="torch"),
            _request("cpu2", device="auto", framework="torch"),  # no memory asked: the CPU
            _request("np", device="auto", gpu_memory_mb=100, framework="numpy"),
        ],
        num_cpus=2,
    )  # fmt: skip
    actor = placement.actor_of
    # a (0.5) and c (0.4) fit one GPU, b (0.3) does not fit beside them
    assert actor("a") == actor("c") != actor("b")
    assert actor("a").num_gpus == pytest.approx(0.9)  # type: ignore[union-attr]
    assert actor("a").memory_mb == 2500  # type: ignore[union-attr]
    assert actor("a").options() == {  # type: ignore[union-attr]
        "num_cpus": 2, "num_gpus": pytest.approx(0.9), "memory": 2500 * 1024 * 1024,
    }  # fmt: skip
    assert actor("b").num_gpus == pytest.approx(0.3)  # type: ignore[union-attr]
    # a GPU model without a share asks for a whole GPU (Ray gives none to num_gpus=0)
    assert actor("whole").num_gpus == 1.0  # type: ignore[union-attr]
    assert actor("whole") not in (actor("a"), actor("b"))
    # other custom resources: an actor of its own, asking for them
    zoned = actor("zoned")
    assert zoned is not None
    assert zoned.options()["resources"] == {"zone_b": 1.0}
    assert zoned not in (actor("a"), actor("b"), actor("whole"))
    # CPU models of one framework share an actor that asks for no GPU
    assert actor("cpu1") == actor("cpu2")
    assert actor("cpu1").num_gpus == 0  # type: ignore[union-attr]
    assert "memory" not in actor("cpu1").options()  # type: ignore[union-attr]
    assert actor("np").num_gpus == 0  # type: ignore[union-attr]  # numpy cannot use a GPU
    # plugins of a GPU actor are told cuda:0: Ray sets CUDA_VISIBLE_DEVICES to its GPU
    assert placement.device_of("b") == RAY_GPU == "cuda:0"
    assert placement.device_of("cpu1") == "cpu"
    indices = {a.index for a in placement.actors.values()}
    assert len(indices) == len(set(placement.actors.values()))  # one index per actor
    assert any("zone_b=1" in line for line in placement.log_lines())


def test_loaded_models_keep_their_actor_and_new_ones_get_new_actors() -> None:
    first = place_on_ray([_request("a", device="cpu", framework="torch")])
    second = place_on_ray(
        [_request("b", device="cpu", framework="torch")], current=first, keep={"a"}
    )
    assert second.actor_of("a") == first.actor_of("a")
    assert second.actor_of("b") is not None
    assert second.actor_of("b").index != first.actor_of("a").index  # type: ignore[union-attr]
    # a model leaving (not kept) still runs while the new one is placed: its index is not reused
    third = place_on_ray(
        [_request("c", device="cpu", framework="numpy")], current=second, keep={"b"}
    )
    assert third.actor_of("a") is None
    indices = {second.actor_of("a").index, second.actor_of("b").index}  # type: ignore[union-attr]
    assert third.actor_of("c").index not in indices  # type: ignore[union-attr]


def test_an_actor_is_threaded_not_restarted_by_ray_and_gets_the_worker_environment() -> None:
    from engine.runtime.ray_placement import ActorRequest
    from engine.runtime.workers.pool import WorkerKey
    from engine.runtime.workers.ray_worker import RayCluster, RayWorker
    from model_plugins._host import threads

    config = RayConfig(address="127.0.0.1:1", namespace="ns", actor_max_concurrency=16)
    request = ActorRequest(3, num_gpus=0.5, memory_mb=100, resources=(("zone_b", 1.0),), num_cpus=2)
    worker = RayWorker(
        WorkerKey("torch", RAY_GPU, request), RayCluster(config), threads_setting=None
    )
    options = worker.options()
    assert worker.name == "torch@cuda:0#ray3"
    assert options["max_restarts"] == 0  # the pool's supervisor replaces it, not Ray
    assert options["max_concurrency"] == 16
    assert options["namespace"] == "ns"
    assert options["num_cpus"] == 2
    assert options["num_gpus"] == 0.5
    assert options["resources"] == {"zone_b": 1.0}
    assert "lifetime" not in options  # not detached: the server owns it
    env = options["runtime_env"]["env_vars"]  # type: ignore[index]
    assert env[threads.CORES_VAR] == "2"  # its threads share the actor's CPUs
    assert env[threads.FRAMEWORK_VAR] == "torch"
    assert "CUDA_VISIBLE_DEVICES" not in env  # Ray sets it to the actor's GPU


def test_ray_resources_without_a_ray_key_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from engine.config import ServerConfig
    from engine.runtime.loading import load_for_serving
    from engine.runtime.workers.pool import ProcessBackend
    from engine.server import Server

    pipelines, errors = load_for_serving([RAY / "nowhere.yaml"])
    assert not errors
    server = Server(ServerConfig(port=0), pipelines)
    assert isinstance(server.engine.workers.backend, ProcessBackend)  # local workers
    assert "pipeline ray_nowhere node pinned: ray_resources {'zone_nowhere': 1.0} ignored" in (
        caplog.text
    )


def test_private_record_attributes_of_a_library_are_not_logged_as_fields() -> None:
    import logging

    from engine.observability.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord("dagserve", logging.INFO, "", 0, "hello", (), None)
    record._ray_timestamp_ns = 1  # what Ray's record factory adds once ray is imported
    record.model = "m"  # a field passed with extra=
    assert "_ray_timestamp_ns" not in JsonFormatter().format(record)
    assert '"model": "m"' in JsonFormatter().format(record)
    assert "_ray_timestamp_ns" not in TextFormatter().format(record)


def test_ray_resources_are_positive_custom_resources() -> None:
    from pydantic import ValidationError

    from dag.schema import NodeSpec

    assert NodeSpec(plugin="x", ray_resources={"zone_b": 1}).ray_resources == {"zone_b": 1.0}
    with pytest.raises(ValidationError, match="greater than 0"):
        NodeSpec(plugin="x", ray_resources={"zone_b": 0})
    with pytest.raises(ValidationError, match="'GPU' is not a custom Ray resource"):
        NodeSpec(plugin="x", ray_resources={"GPU": 1})


# -- a real server on a one-node Ray cluster -----------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """One Ray head on 127.0.0.1 for the module (a server connects to it and disconnects)."""
    if not HAS_RAY:
        pytest.skip("the ray extra is not installed")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray.cluster_utils import Cluster

    head = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 6,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            "resources": {"zone_a": 1},
        },
    )
    try:
        yield head
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        head.shutdown()


def _ray(cluster: Any, **fields: Any) -> RayConfig:
    return RayConfig(address=cluster.address, node_ip_address="127.0.0.1", **fields)


@pytest.fixture(scope="module")
def server(cluster: Any) -> Iterator[ServerThread]:
    """torch, fail, slow and hang pipelines served with every worker a Ray actor, on uvloop (as
    ``dagserve serve`` runs where it is installed): Ray's replies reach that loop too."""
    from engine.config import ServerConfig
    from engine.runtime.loading import load_for_serving
    from engine.server import Server

    paths = [RAY / "torch.yaml", RAY / "fail.yaml", RAY / "slow.yaml", RAY / "hang.yaml"]
    pipelines, errors = load_for_serving(paths)
    assert not errors
    config = ServerConfig(port=0, ray=_ray(cluster), worker_restart_wait_s=60)
    thread = ServerThread(Server(config, pipelines))
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        thread.loop.close()
        thread.loop = uvloop.new_event_loop()
        thread._thread = threading.Thread(target=thread.loop.run_forever, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


X = np.ones((1, 3), np.float32)


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.frameworks
@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_a_torch_model_serves_batched_from_a_ray_actor(server: ServerThread) -> None:
    import ray

    def one(i: int) -> np.ndarray:
        with Client("127.0.0.1", server.port) as client:
            return client.infer("ray_torch", {"x": np.full((1, 3), i, np.float32)}).outputs["y"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    for i, y in enumerate(answers):
        np.testing.assert_allclose(y, np.full((1, 3), 3.0 * i))
    model = next(m for m in server.engine.models.values() if m.model_id == "ray_torch/scale")
    # eight requests, 0.1 s a call, at most 8 a batch: batched across requests
    assert model.statistics().batches < 8
    if importlib.util.find_spec("uvloop") is not None:
        assert type(server.loop).__module__.startswith("uvloop")
    # the worker is a Ray actor on the cluster's node, and says so everywhere
    stats = server.engine.workers.statistics()
    torch_worker = next(name for name in stats if name.startswith("torch@cpu#ray"))
    node_ids = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
    assert stats[torch_worker]["ray_node"] in node_ids
    assert stats[torch_worker]["ray_ip"] == "127.0.0.1"
    health = server.engine.health().details
    assert f"ray_node={stats[torch_worker]['ray_node']}" in health[f"worker.{torch_worker}"]
    info = {
        "worker": torch_worker,
        "ray_node": stats[torch_worker]["ray_node"],
        "ray_ip": "127.0.0.1",
    }
    assert server.engine.metrics.registry.get_sample_value("dagserve_worker_info", info) == 1


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_plugin_error_in_an_actor_is_typed_and_names_its_node(server: ServerThread) -> None:
    with Client("127.0.0.1", server.port) as client:
        np.testing.assert_array_equal(client.infer("ray_fail", {"x": X}).outputs["y"], X)
        with pytest.raises(InferenceError) as info:
            client.infer("ray_fail", {"x": -X})
    assert info.value.node == "picky"
    assert "negative input is not allowed" in str(info.value)
    assert "ValueError" in str(info.value)
    # an error reply is not a death: the actor was not replaced
    stats = server.engine.workers.statistics()
    assert all(s["restarts"] == 0 for s in stats.values() if "ray_fail/picky" in s["models"])


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_deadline_is_honoured_on_a_ray_actor(server: ServerThread) -> None:
    with Client("127.0.0.1", server.port) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.infer("ray_slow", {"x": X}, timeout_ms=150)
        assert time.monotonic() - start < 0.45  # the call takes 0.5 s: not waited for
        client.infer("ray_slow", {"x": X})  # and the model still serves


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_call_past_its_timeout_replaces_its_actor(server: ServerThread) -> None:
    workers = server.engine.workers
    name = next(n for n, s in workers.statistics().items() if "ray_hang/stuck" in s["models"])
    # an actor of its own (other ray_resources than the other numpy models)
    assert workers.statistics()[name]["models"] == ["ray_hang/stuck"]
    before = workers.statistics()[name]
    start = time.monotonic()
    with (
        Client("127.0.0.1", server.port) as client,
        pytest.raises(InferenceError, match="within its timeout_ms") as info,
    ):
        client.infer("ray_hang", {"x": X})
    assert time.monotonic() - start < 2.5  # the call takes 3 s: not waited for
    assert info.value.node == "stuck"

    def replaced() -> dict[str, Any] | None:
        stats = workers.statistics()[name]
        return stats if stats["ready"] and stats["restarts"] == before["restarts"] + 1 else None

    after = wait_until(replaced, "a new actor for ray_hang", timeout_s=60)
    assert after["pid"] != before["pid"]
    assert after["crashes"] == {"ray_hang/stuck": 1}  # laid at the model that hung


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "ray.kill"])
def test_innocent_calls_survive_the_actor_being_killed(server: ServerThread, how: str) -> None:
    workers = server.engine.workers
    name = next(n for n, s in workers.statistics().items() if "ray_slow/nap" in s["models"])
    key = next(k for k in workers._slots if k.name == name)
    first = workers.process(key)
    assert first is not None
    assert first.pid is not None
    restarts = workers.statistics()[name]["restarts"]

    def one(i: int) -> np.ndarray:
        with Client("127.0.0.1", server.port) as client:
            return client.infer("ray_slow", {"x": np.full((1, 3), i, np.float32)}).outputs["y"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        calls = [pool.submit(one, i) for i in range(4)]
        model = next(m for m in server.engine.models.values() if m.model_id == "ray_slow/nap")
        wait_until(lambda: model.batcher.statistics().busy_instances > 0, "calls in flight")
        if how == "SIGKILL":  # the actor's process, on this machine's one node
            os.kill(first.pid, signal.SIGKILL)
        else:  # Ray ends it (as an operator or the autoscaler would)
            import ray

            ray.kill(first.actor)  # type: ignore[attr-defined]
        answers = [call.result(timeout=90) for call in calls]
    # every call was sent again to the new actor, which loaded its models again
    for i, y in enumerate(answers):
        np.testing.assert_array_equal(y, np.full((1, 3), i, np.float32))
    stats = workers.statistics()[name]
    assert stats["restarts"] == restarts + 1
    assert stats["retried"] >= 1
    assert stats["pid"] != first.pid
    assert sum(stats["crashes"].values()) >= 1  # type: ignore[attr-defined]
    assert stats["crashes"].get("", 0) >= 1  # type: ignore[attr-defined]  # nobody blamed
    with Client("127.0.0.1", server.port) as client:
        client.infer("ray_slow", {"x": X})


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_version_loaded_at_runtime_gets_an_actor_and_keeps_the_others(
    server: ServerThread, tmp_path: Path
) -> None:
    version = tmp_path / "scale_v2.yaml"
    version.write_text(
        "name: ray_fail\nversion: '2'\ninputs:\n  x: {dtype: float32, shape: [-1]}\n"
        "nodes:\n  picky:\n    plugin: tests.plugins:Scale\n    params: {factor: 5}\n"
        "    inputs: {x: $inputs.x}\noutputs:\n  y: picky.y\n"
    )
    workers = server.engine.workers
    before = {name: s["pid"] for name, s in workers.statistics().items()}
    lifecycle = server.engine.lifecycle
    server.run(lifecycle.load(version))
    try:
        with Client("127.0.0.1", server.port) as client:
            y = client.infer("ray_fail", {"x": X}, version="2").outputs["y"]
            np.testing.assert_array_equal(y, 5 * X)
            client.infer("ray_fail", {"x": X}, version="1")  # the first version still serves
        stats = workers.statistics()
        new = [name for name in stats if name not in before]
        # its model could not join an actor already asked for: it has one of its own
        assert len(new) == 1
        assert stats[new[0]]["models"] == ["ray_fail:2/picky"]
        assert stats[new[0]]["ray_ip"] == "127.0.0.1"
        # and the actors that were serving were left as they were
        assert all(stats[name]["pid"] == pid for name, pid in before.items())
    finally:
        server.run(lifecycle.unload("ray_fail", "2"))
    # an actor left without models is stopped: it held its resources on the cluster
    assert set(workers.statistics()) == set(before)
    pid = stats[new[0]]["pid"]
    assert isinstance(pid, int)
    wait_until(lambda: not _alive(pid), "the emptied actor's process ended")


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_shutdown_kills_every_actor_the_server_started(cluster: Any, server: ServerThread) -> None:
    with serving([RAY / "fail.yaml"], ray=_ray(cluster)) as thread:
        with Client("127.0.0.1", thread.port) as client:
            client.infer("ray_fail", {"x": X})
        pids = [s["pid"] for s in thread.engine.workers.statistics().values()]
        assert pids
        assert all(isinstance(pid, int) for pid in pids)
    # the actors ran on this machine's one node: their processes are gone
    wait_until(lambda: not any(_alive(pid) for pid in pids), "the actors' processes ended")
    # the other server's actors, on the same cluster, were left alone
    with Client("127.0.0.1", server.port) as client:
        client.infer("ray_fail", {"x": X})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_a_pipeline_the_cluster_cannot_hold_is_refused_with_what_is_missing(
    cluster: Any, server: ServerThread
) -> None:
    from engine.config import ServerConfig
    from engine.runtime.loading import load_for_serving
    from engine.runtime.workers.ray_worker import RayPlacementError
    from engine.server import Server

    pipelines, errors = load_for_serving([RAY / "nowhere.yaml"])
    assert not errors
    thread = ServerThread(
        Server(ServerConfig(port=0, ray=_ray(cluster, start_timeout_s=3)), pipelines)
    )
    start = time.monotonic()
    # startup fails naming the pipeline and node (PluginLoadError, which the CLI prints), and
    # the cause is typed: what the actor asked for against what the cluster has
    with pytest.raises(PluginLoadError, match="'ray_nowhere': node 'pinned'") as info:
        thread.start()
    thread.stop()
    assert time.monotonic() - start < 30
    assert isinstance(info.value.__cause__, RayPlacementError)
    message = str(info.value)
    assert "zone_nowhere=1" in message  # what the actor asked for
    assert "the cluster has in all {'CPU': 6.0," in message  # what the cluster has
    assert "'zone_a': 1.0" in message
    assert "free now {" in message
    assert "not placed (or did not start) within 3 s" in message


@needs_ray
@pytest.mark.e2e
@pytest.mark.slow
def test_dagserve_serve_gives_up_on_an_unreachable_cluster_and_says_so(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as free:  # a port where no Ray cluster answers
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    config = tmp_path / "server.yaml"
    config.write_text(
        f"port: 0\npipelines: [{RAY / 'fail.yaml'}]\n"
        f"ray: {{address: '127.0.0.1:{port}', node_ip_address: 127.0.0.1, start_timeout_s: 3}}\n"
    )
    start = time.monotonic()
    # in a process of its own: ray.init keeps trying that address on a thread of its own
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "serve", str(config)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 1
    assert time.monotonic() - start < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("dagserve serve: PluginLoadError: pipeline 'ray_fail': node 'picky'")
    assert f"cannot connect to the Ray cluster at 127.0.0.1:{port}: no answer within 3 s" in last
