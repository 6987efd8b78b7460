"""The whole server end to end: YAML pipelines, engine, workers, Thrift, clients."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from engine.transport.client import AsyncClient, Client
from model_plugins.errors import InferenceError, InvalidRequest, PipelineNotFound
from tests.serving import PIPELINES, ROOT, serving

pytestmark = pytest.mark.e2e

QUICKSTART = ROOT / "examples" / "quickstart" / "pipeline.yaml"


@pytest.fixture(scope="module")
def server():
    with serving([PIPELINES / "calc.yaml", QUICKSTART]) as thread:
        yield thread


@pytest.fixture
def client(server):
    with Client("127.0.0.1", server.port, timeout_s=30) as c:
        yield c


def png(color: tuple[int, int, int], size: int = 20) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_branches_fuse_and_latencies_are_reported(client):
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    extra = np.array([[2, 2, 2], [4, 4, 4]], np.float32)
    result = client.infer("calc", {"x": x, "extra": extra})
    np.testing.assert_array_equal(result.outputs["doubled"], x * 2)
    np.testing.assert_array_equal(
        result.outputs["fused"], np.concatenate([x * 2, x * 3, extra / 2], 1)
    )
    assert set(result.node_latency_us) == {"double", "triple", "check", "extra_half", "fuse"}
    assert all(v >= 0 for v in result.node_latency_us.values())
    assert result.version == "1"


def test_missing_optional_input_skips_its_branch(client):
    x = np.ones((1, 3), np.float32)
    result = client.infer("calc", {"x": x})
    assert "extra_half" not in result.outputs
    assert "extra_half" not in result.node_latency_us
    # join: available with dims: the absent branch is zero-filled in its slot
    np.testing.assert_array_equal(result.outputs["fused"], [[2, 2, 2, 3, 3, 3, 0, 0, 0]])


def test_custom_numpy_plugin_runs_in_a_worker_process(server, client):
    result = client.infer("quickstart", {"image": [png((255, 0, 0)), png((0, 0, 255))]})
    stats = result.outputs["stats"]
    np.testing.assert_allclose(stats[:, :3], [[1, 0, 0], [0, 0, 1]], atol=1e-6)
    assert result.outputs["embedding"].shape == (2, 10)
    workers = server.engine.workers.statistics()
    assert "numpy@cpu" in workers
    assert workers["numpy@cpu"]["models"] == ["quickstart/color"]


def test_node_failure_names_the_node_and_the_connection_serves_on(client):
    with pytest.raises(InferenceError) as info:
        client.infer("calc", {"x": np.array([[-1, 0, 0]], np.float32)})
    assert info.value.node == "check"
    assert "negative input is not allowed" in str(info.value)
    ok = client.infer("calc", {"x": np.zeros((1, 3), np.float32)})
    assert "checked" in ok.outputs


@pytest.mark.parametrize(
    ("inputs", "field", "words"),
    [
        ({}, "inputs.x", "required input 'x' is missing"),
        ({"extra": np.zeros((1, 3), np.float32)}, "inputs.x", "required input 'x' is missing"),
        ({"x": np.zeros((1, 4), np.float32)}, "inputs.x", "shape"),
        ({"x": np.zeros((1, 3), np.float64)}, "inputs.x", "float32"),
        ({"x": np.array([["a", "b", "c"]], dtype=object)}, "inputs.x", "float32"),
        (
            {"x": np.zeros((1, 3), np.float32), "y": np.zeros((1, 3), np.float32)},
            "inputs.y",
            "no input 'y'",
        ),
        (
            {"x": np.zeros((2, 3), np.float32), "extra": np.zeros((1, 3), np.float32)},
            "inputs",
            "disagree on the number of items",
        ),
    ],
)
def test_bad_inputs_are_invalid_requests_naming_the_field(client, inputs, field, words):
    with pytest.raises(InvalidRequest) as info:
        client.infer("calc", inputs)
    assert info.value.field is not None
    assert info.value.field.startswith(field)
    assert words in str(info.value)
    assert client.infer("calc", {"x": np.zeros((1, 3), np.float32)}).outputs


def test_unknown_pipeline_and_version(client):
    with pytest.raises(PipelineNotFound, match="nope"):
        client.infer("nope", {"x": np.zeros((1, 3), np.float32)})
    with pytest.raises(PipelineNotFound, match="version '7'"):
        client.infer("calc", {"x": np.zeros((1, 3), np.float32)}, version="7")


def test_unknown_requested_output(client):
    with pytest.raises(InvalidRequest, match="unknown outputs requested: nope") as info:
        client.infer("calc", {"x": np.zeros((1, 3), np.float32)}, outputs=["nope"])
    assert info.value.field == "outputs"


def test_requested_outputs_run_only_what_they_need(client):
    result = client.infer("calc", {"x": np.zeros((1, 3), np.float32)}, outputs=["doubled"])
    assert set(result.outputs) == {"doubled"}
    assert set(result.node_latency_us) == {"double"}


def test_describe_and_list(client):
    info = client.describe("calc")
    assert info.inputs["extra"].optional
    assert info.inputs["x"].describe() == "float32[3]"
    assert "fuse" in info.nodes
    assert any(e.source == "double" and e.target == "fuse" for e in info.edges)
    assert {p.name for p in client.list_pipelines()} == {"calc", "quickstart"}
    health = client.health()
    assert health.live
    assert health.ready
    assert "worker.numpy@cpu" in health.details


async def test_async_client_sees_concurrent_branches(server):
    async with AsyncClient("127.0.0.1", server.port) as client:
        x = np.ones((1, 3), np.float32)
        results = [await client.infer("calc", {"x": x}) for _ in range(3)]
    assert all(r.outputs["doubled"][0, 0] == 2 for r in results)


def test_a_failed_load_stops_startup_with_node_plugin_and_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\ninputs: {x: {dtype: float32, shape: [3]}}\n"
        "nodes:\n  broken:\n    plugin: tests.plugins:FailToLoad\n    inputs: {x: $inputs.x}\n"
        "outputs: {y: broken.y}\n"
    )
    from model_plugins.errors import PluginLoadError

    with pytest.raises(PluginLoadError) as info, serving([bad]):
        pass
    text = str(info.value)
    assert "node 'broken'" in text
    assert "tests.plugins:FailToLoad" in text
    assert "weights file is corrupt" in text


def test_many_concurrent_clients(server):
    import concurrent.futures

    x = np.arange(3, dtype=np.float32)[None]

    def call(i: int) -> float:
        with Client("127.0.0.1", server.port) as c:
            return float(c.infer("calc", {"x": x + i}).outputs["doubled"][0, 0])

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(call, range(40)))
    assert got == [2.0 * i for i in range(40)]
    assert time.monotonic() - start < 60


def test_a_nan_where_the_pipeline_forbids_it_is_an_invalid_request(client):
    x = np.ones((3, 3), np.float32)
    x[1, 2] = np.nan
    with pytest.raises(InvalidRequest, match=r"NaN in item\(s\) \[1\]") as info:
        client.infer("calc", {"x": x})
    assert info.value.field == "inputs.x"
    extra = np.full((1, 3), np.nan, np.float32)  # `extra` allows NaN: it passes
    assert client.infer("calc", {"x": np.ones((1, 3), np.float32), "extra": extra}).outputs
