"""Metrics, health and readiness on the metrics port, scraped as Prometheus would."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.config import ServerConfig
from engine.runtime.devices import DeviceInventory
from engine.runtime.loading import load_for_serving
from engine.server import Server
from engine.transport.client import Client
from model_plugins.errors import (
    DeadlineExceeded,
    InferenceError,
    InvalidRequest,
    Overloaded,
    PipelineNotFound,
)
from tests.engine.test_devices import two_gpus
from tests.serving import PIPELINES, serving, wait_until

pytestmark = pytest.mark.e2e


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, metric: str, **labels: str) -> float:
    """The sample's value; a sample that is not exported fails (it does not read as 0)."""
    key = (metric, tuple(sorted(labels.items())))
    assert key in samples, f"{metric}{labels} is not exported"
    return samples[key]


@pytest.fixture(scope="module")
def server():
    paths = [PIPELINES / "calc.yaml", PIPELINES / "batched_a.yaml"]
    with serving(paths, metrics_port=0) as thread:
        yield thread


def test_a_known_mix_of_requests_is_counted_exactly(server):
    x = np.ones((1, 3), np.float32)
    with Client("127.0.0.1", server.port) as client:
        for _ in range(5):
            client.infer("calc", {"x": x})
        for _ in range(3):
            client.infer("batched_a", {"x": np.ones((2, 2), np.float32)})
        with pytest.raises(InvalidRequest):
            client.infer("calc", {"x": np.ones((1, 4), np.float32)})
        with pytest.raises(PipelineNotFound):
            client.infer("no_such_pipeline", {"x": x})
        with pytest.raises(InferenceError):
            client.infer("calc", {"x": -x})
        with pytest.raises(InvalidRequest, match="max_queue 64"):  # more than the whole queue
            client.infer("batched_a", {"x": np.ones((65, 2), np.float32)})
        limit, server.engine.max_inflight = server.engine.max_inflight, 0
        try:  # the server-wide limit answers Overloaded at once
            with pytest.raises(Overloaded, match="max_inflight 0"):
                client.infer("batched_a", {"x": np.ones((1, 2), np.float32)})
        finally:
            server.engine.max_inflight = limit
        with pytest.raises(DeadlineExceeded):
            client.infer("batched_a", {"x": np.ones((1, 2), np.float32)}, timeout_ms=1)
        s = scrape(server.server.metrics_port)
        assert value(s, "dagserve_open_connections") == 1  # this client's, still open
    # and the gauge follows the connection: it goes back to 0 once the client hangs up
    wait_until(
        lambda: value(scrape(server.server.metrics_port), "dagserve_open_connections") == 0,
        "dagserve_open_connections back to 0",
    )
    total = "dagserve_requests_total"
    assert value(s, total, pipeline="calc", version="1", status="ok") == 5
    assert value(s, total, pipeline="calc", version="1", status="invalid_request") == 1
    assert value(s, total, pipeline="calc", version="1", status="inference_error") == 1
    assert value(s, total, pipeline="", version="", status="pipeline_not_found") == 1
    assert value(s, total, pipeline="batched_a", version="1", status="ok") == 3
    assert value(s, total, pipeline="batched_a", version="1", status="invalid_request") == 1
    assert value(s, total, pipeline="batched_a", version="1", status="overloaded") == 1
    assert value(s, total, pipeline="batched_a", version="1", status="deadline_exceeded") == 1
    # the request histogram counts every request of a known pipeline
    assert value(s, "dagserve_request_duration_seconds_count", pipeline="calc", version="1") == 7
    # node latency: double ran for the 5 good requests and the failing one (not the invalid)
    assert value(s, "dagserve_node_duration_seconds_count", pipeline="calc", node="double") == 6
    errors = value(
        s, "dagserve_node_errors_total", pipeline="calc", node="check", error="InferenceError"
    )
    assert errors == 1
    # the batched model: 3 requests of 2 items went through its batcher, and the timed-out one
    # at most once more (its deadline may or may not have passed before its batch started)
    items = value(s, "dagserve_model_batch_size_sum", model="batched_a/probe")
    assert items in (6, 7)
    assert value(s, "dagserve_model_queue_duration_seconds_count", model="batched_a/probe") == items
    assert value(s, "dagserve_model_compute_duration_seconds_count", model="batched_a/probe") >= 3
    assert ("dagserve_model_queue_length", (("model", "batched_a/probe"),)) in s
    assert value(s, "dagserve_inflight_requests", pipeline="calc") == 0
    assert value(s, "dagserve_worker_up", worker="numpy@cpu") == 1
    assert value(s, "dagserve_worker_resident_memory_bytes", worker="numpy@cpu") > 1e6
    # without a GPU the GPU families are absent
    assert not any(name.startswith("dagserve_gpu_") for name, _ in s)


def test_buckets_resolve_latencies_from_100us_to_10s(server):
    s = scrape(server.server.metrics_port)
    les = sorted(
        float(dict(labels)["le"])
        for name, labels in s
        if name == "dagserve_request_duration_seconds_bucket" and dict(labels)["pipeline"] == "calc"
    )
    finite = [le for le in les if le != float("inf")]
    assert finite[0] == pytest.approx(1e-4)
    assert finite[-1] == pytest.approx(10)
    # neighbouring bounds at most 5/3 apart: a quantile is read within a third of its value
    assert all(b / a <= 5 / 3 + 1e-9 for a, b in itertools.pairwise(finite))


def test_health_endpoints(server):
    assert get(server.server.metrics_port, "/healthz") == (200, "ok\n")
    assert get(server.server.metrics_port, "/readyz") == (200, "ready\n")
    assert get(server.server.metrics_port, "/nope")[0] == 404


def test_gpu_families_from_a_fake_nvml(server):
    engine = server.engine
    real = engine.inventory
    engine.inventory = DeviceInventory.from_nvml(two_gpus())
    try:
        s = scrape(server.server.metrics_port)
    finally:
        engine.inventory = real
    name = "NVIDIA A100-SXM4-40GB"
    assert value(s, "dagserve_gpu_utilization_ratio", gpu="cuda:0", name=name) == pytest.approx(
        0.35
    )
    assert value(s, "dagserve_gpu_temperature_celsius", gpu="cuda:0", name=name) == 51
    assert value(s, "dagserve_gpu_memory_total_bytes", gpu="cuda:0", name=name) == 40960 * 2**20
    assert value(s, "dagserve_gpu_power_watts", gpu="cuda:0", name=name) == 50
    assert ("dagserve_gpu_power_watts", (("gpu", "cuda:1"), ("name", "Tesla T4"))) not in s


async def test_readiness_flips_only_after_models_load_and_back_when_draining(tmp_path: Path):
    gate = tmp_path / "loaded"
    path = tmp_path / "slow.yaml"
    path.write_text(
        "name: slow\ninputs: {x: {dtype: float32, shape: [-1]}}\nnodes:\n  m:\n"
        f"    plugin: tests.plugins:GatedLoad\n    params: {{gate: {str(gate)!r}}}\n"
        "    inputs: {x: $inputs.x}\noutputs: {y: m.y}\n"
    )
    pipelines, errors = load_for_serving([path])
    assert not errors
    server = Server(ServerConfig(port=0, metrics_port=0), pipelines)
    startup = asyncio.create_task(server.startup())
    try:
        while server.metrics_port is None:  # noqa: ASYNC110 - startup() owns no event for it
            await asyncio.sleep(0.01)
        port = server.metrics_port
        status, _ = await asyncio.to_thread(get, port, "/readyz")
        assert status == 503
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        gate.touch()
        await asyncio.wait_for(startup, 30)
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 200
        server.should_exit.set()  # SIGTERM: draining, so no longer ready, still alive
        assert (await asyncio.to_thread(get, port, "/readyz"))[0] == 503
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
    finally:
        gate.touch()
        with contextlib.suppress(Exception):
            await startup
        await server.shutdown()
