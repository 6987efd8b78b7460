"""``plugin: remote``: a pipeline of another real server run as one node (engine.runtime.remote).

Two real servers in this process: the *back* serves the pipelines, the *front* serves
pipelines whose node is ``plugin: remote`` pointing at the back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dag.pipeline import load_pipeline
from engine.runtime.loading import load_for_serving
from engine.runtime.local import NodeBinding
from engine.runtime.remote import RemotePlugin, RemoteRunner, RemoteTarget
from engine.tools.ports import free_port
from engine.transport.client import Client
from model_plugins.errors import DeadlineExceeded, InferenceError, PluginLoadError
from model_plugins.specs import TensorSpec
from tests.serving import ServerThread, serving

pytestmark = pytest.mark.e2e

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

BACK = {
    "scaled": """
name: scaled
inputs: {x: {dtype: float32, shape: [-1]}}
nodes:
  scale: {plugin: "tests.plugins:Scale", params: {factor: 3}, inputs: {x: $inputs.x}}
  check: {plugin: "tests.plugins:FailOnNegative", inputs: {x: scale.y}}
outputs: {y: check.y}
""",
    "nap": """
name: nap
inputs: {x: {dtype: float32, shape: [-1]}}
nodes:
  nap: {plugin: "tests.plugins:Sleep", params: {seconds: 0.2}, inputs: {x: $inputs.x}}
outputs: {y: nap.y}
""",
}


def front_yaml(name: str, remote: str, port: int, *, dtype: str = "float32") -> str:
    return f"""
name: {name}
inputs: {{x: {{dtype: {dtype}, shape: [-1]}}}}
nodes:
  far:
    plugin: remote
    params: {{target: "127.0.0.1:{port}", pipeline: {remote}}}
    inputs: {{x: $inputs.x}}
  twice: {{plugin: identity, inputs: {{y: far.y}}}}
outputs: {{y: twice.y}}
"""


def write(folder: Path, texts: dict[str, str]) -> list[Path]:
    paths = []
    for name, text in texts.items():
        path = folder / f"{name}.yaml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def back(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("back")
    with serving(write(folder, BACK)) as thread:
        yield thread


@pytest.fixture(scope="module")
def front(back: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("front")
    texts = {
        "front_scaled": front_yaml("front_scaled", "scaled", back.port),
        "front_nap": front_yaml("front_nap", "nap", back.port),
        # the balancing client over what the name resolves to
        "front_dns": front_yaml("front_dns", "scaled", back.port).replace(
            '"127.0.0.1:', '"dns:///localhost:'
        ),
    }
    with serving(write(folder, texts)) as thread:
        yield thread


def test_the_answer_is_the_remote_pipelines_own(back: ServerThread, front: ServerThread) -> None:
    x = np.array([[1.0, 2.0], [0.5, -0.0]], dtype=np.float32)
    with Client("127.0.0.1", back.port) as to_back, Client("127.0.0.1", front.port) as to_front:
        own = to_back.infer("scaled", {"x": x}).outputs["y"]
        through = to_front.infer("front_scaled", {"x": x}).outputs["y"]
        balanced = to_front.infer("front_dns", {"x": x}).outputs["y"]
    np.testing.assert_array_equal(through, own)
    np.testing.assert_array_equal(through, x * 3)
    np.testing.assert_array_equal(balanced, own)


def test_a_short_deadline_fails_fast_against_a_slow_remote(front: ServerThread) -> None:
    x = np.zeros((1, 2), dtype=np.float32)
    with Client("127.0.0.1", front.port) as client:
        client.infer("front_nap", {"x": x})  # connections made, worker warm
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.infer("front_nap", {"x": x}, timeout_ms=50)
        took = time.monotonic() - started
    assert took < 0.15, f"DeadlineExceeded after {took * 1000:.0f} ms"


def test_the_remotes_typed_error_comes_back_typed_naming_node_and_remote(
    front: ServerThread,
) -> None:
    with Client("127.0.0.1", front.port) as client, pytest.raises(InferenceError) as caught:
        client.infer("front_scaled", {"x": np.array([[-1.0]], dtype=np.float32)})
    error = caught.value
    assert error.node == "far"
    assert "remote pipeline 'scaled'" in error.message
    assert "127.0.0.1" in error.message
    assert "negative input is not allowed" in error.message


def test_request_id_deadline_and_traceparent_reach_the_remote(
    back: ServerThread, front: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []
    engine = back.engine
    infer = engine.infer

    async def spy(request: Any) -> Any:
        seen.append(request)
        return await infer(request)

    monkeypatch.setattr(engine, "infer", spy)
    with Client("127.0.0.1", front.port) as client:
        client.infer(
            "front_scaled",
            {"x": np.ones((1, 1), dtype=np.float32)},
            request_id="req-remote-1",
            timeout_ms=5000,
            headers={"traceparent": TRACEPARENT},
        )
    (request,) = seen
    assert request.pipeline == "scaled"
    assert request.request_id == "req-remote-1"
    assert 0 < request.timeout_ms <= 5000
    version, trace_id, parent, flags = request.headers["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACEPARENT.split("-")[1], "01")
    assert parent != TRACEPARENT.split("-")[2]  # the front's own span, a child of the caller's


def test_wiring_that_differs_from_the_remote_stops_loading(
    back: ServerThread, tmp_path: Path
) -> None:
    (path,) = write(tmp_path, {"bad": front_yaml("bad", "scaled", back.port, dtype="int64")})
    pipelines, errors = load_for_serving([path])
    assert not pipelines
    (error,) = errors
    text = str(error)
    assert "far" in text
    assert "remote pipeline 'scaled'" in text
    assert "int64" in text
    assert "float32" in text


def test_an_unreachable_remote_is_said_to_be_unchecked(tmp_path: Path) -> None:
    (path,) = write(tmp_path, {"lost": front_yaml("lost", "scaled", free_port())})
    with pytest.raises(Exception, match="cannot describe it, so its inputs and outputs are not"):
        load_pipeline(path)


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"pipeline": "p"}, "needs params.target"),
        ({"target": "nohost", "pipeline": "p"}, "must be"),
        ({"target": "dns:///svc:99999", "pipeline": "p"}, "must be"),
        ({"target": "h:1", "pipeline": "p", "retries": 2}, "retries"),
    ],
)
def test_bad_params_are_refused(params: dict[str, Any], problem: str) -> None:
    with pytest.raises(PluginLoadError, match=problem):
        RemoteTarget.of(params)


def test_a_dns_target_is_balanced() -> None:
    target = RemoteTarget.of({"target": "dns:///back.models.svc:9090", "pipeline": "p"})
    assert (target.host, target.port) == ("back.models.svc", 9090)
    assert target.client_args() == {"targets": "dns:///back.models.svc:9090"}
    plain = RemoteTarget.of({"target": "back:9090", "pipeline": "p"})
    assert plain.client_args() == {"host": "back", "port": 9090}


async def test_a_remote_that_changed_since_validation_stops_the_start(
    back: ServerThread,
) -> None:
    binding = NodeBinding(
        pipeline="front", node="far", plugin="remote", plugin_class=RemotePlugin,
        outputs={"y": TensorSpec("int64", [-1]), "z": TensorSpec("float32", [])}, contexts=(),
    )  # fmt: skip
    runner = RemoteRunner(binding, {"target": f"127.0.0.1:{back.port}", "pipeline": "scaled"})
    with pytest.raises(PluginLoadError) as caught:
        await runner.start()
    message = caught.value.message
    assert "remote pipeline 'scaled'" in message
    assert "its output 'y' is float32[?] (validated: int64[?])" in message
    assert "it has no output 'z'" in message
