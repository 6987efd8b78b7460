"""An official Apache Thrift client, generated from the IDL at test time, calls our server.

This is the contract business callers rely on: code from ``thrift --gen py`` over the
``thrift`` library's TSocket + TFramedTransport + TBinaryProtocol, unchanged.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engine.transport.client import Client
from idl import IDL_PATH
from tests.engine.fake_engine import ServerThread, serving

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

THRIFT = shutil.which("thrift") or shutil.which("/usr/bin/thrift")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    if THRIFT is None:
        pytest.skip(
            "the Apache Thrift compiler (`thrift`, Debian thrift-compiler) is not installed"
        )
    pytest.importorskip("thrift", reason="the `thrift` PyPI library is not installed")
    out = tmp_path_factory.mktemp("apache_gen")
    subprocess.run(
        [THRIFT, "--gen", "py", "-out", str(out), str(IDL_PATH)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    sys.path.insert(0, str(out))
    try:
        service: ModuleType = importlib.import_module("dagserve_idl.InferenceService")
        ttypes: ModuleType = importlib.import_module("dagserve_idl.ttypes")
        yield SimpleNamespace(service=service, ttypes=ttypes)
    finally:
        sys.path.remove(str(out))
        for name in [
            m for m in sys.modules if m == "dagserve_idl" or m.startswith("dagserve_idl.")
        ]:
            del sys.modules[name]


@pytest.fixture
def server() -> Iterator[ServerThread]:
    with serving() as running:
        yield running


@pytest.fixture
def apache(generated: SimpleNamespace, server: ServerThread) -> Iterator[Any]:
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TSocket, TTransport

    sock = TSocket.TSocket("127.0.0.1", server.port)
    sock.setTimeout(10_000)
    transport = TTransport.TFramedTransport(sock)
    client = generated.service.Client(TBinaryProtocol.TBinaryProtocol(transport))
    transport.open()
    try:
        yield client
    finally:
        transport.close()


@pytest.fixture
def ours(server: ServerThread) -> Iterator[Client]:
    with Client("127.0.0.1", server.port) as client:
        yield client


def test_infer(generated: SimpleNamespace, apache: Any, ours: Client) -> None:
    tt = generated.ttypes
    image = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    request = tt.InferRequest(
        pipeline="echo",
        inputs={
            "x": tt.Tensor(
                dtype=tt.DataType.FLOAT32, shape=[2, 2, 3], data=image.astype("<f4").tobytes()
            ),
            "text": tt.Tensor(dtype=tt.DataType.STRING, shape=[2], elements=["é".encode(), b"b"]),
            "blob": tt.Tensor(dtype=tt.DataType.BYTES, shape=[1], elements=[b"\x00\xff"]),
        },
        request_id="apache-1",
    )
    response = apache.infer(request)
    assert response.request_id == "apache-1"
    assert response.version == "1"
    assert response.node_latency_us == {"echo": 7}
    x = response.outputs["x"]
    assert (x.dtype, x.shape) == (tt.DataType.FLOAT32, [2, 2, 3])
    assert isinstance(x.data, bytes)
    np.testing.assert_array_equal(np.frombuffer(x.data, "<f4").reshape(2, 2, 3), image)
    assert response.outputs["text"].elements == ["é".encode(), b"b"]
    assert response.outputs["blob"].elements == [b"\x00\xff"]

    mine = ours.infer("echo", {"x": image, "text": ["é", "b"], "blob": [b"\x00\xff"]})
    np.testing.assert_array_equal(mine.outputs["x"], image)
    assert mine.outputs["text"].tolist() == ["é", "b"]
    assert mine.outputs["blob"].tolist() == [b"\x00\xff"]


def test_descriptions_match_our_client(
    generated: SimpleNamespace, apache: Any, ours: Client
) -> None:
    tt = generated.ttypes
    (info,) = apache.list_pipelines()
    described = apache.describe("echo")
    assert described == info
    mine = ours.describe("echo")
    assert (info.name, info.version, info.nodes) == (mine.name, mine.version, mine.nodes)
    assert {s.name: (s.dtype, s.shape, s.is_optional) for s in info.inputs} == {
        "x": (tt.DataType.FLOAT32, [3], False),
        "text": (tt.DataType.STRING, [], True),
    }
    assert [s.name for s in info.outputs] == list(mine.outputs)
    assert [(e.source, e.target, e.tensor) for e in info.edges] == [
        (e.source, e.target, e.tensor) for e in mine.edges
    ]
    health = apache.health()
    assert (health.live, health.ready, health.details) == (True, True, ours.health().details)


def test_typed_exceptions(generated: SimpleNamespace, apache: Any, server: ServerThread) -> None:
    tt = generated.ttypes
    with pytest.raises(tt.PipelineNotFound) as missing:
        apache.describe("nope")
    assert "'nope' is not served" in missing.value.message
    request = tt.InferRequest(
        pipeline="echo",
        inputs={"x": tt.Tensor(dtype=tt.DataType.FLOAT32, shape=[1, 3], data=b"\0" * 12)},
        headers={"raise": "overloaded"},
    )
    with pytest.raises(tt.Overloaded) as overloaded:
        apache.infer(request)
    assert overloaded.value.retry_after_ms == 250
    bad = tt.InferRequest(
        pipeline="echo",
        inputs={"x": tt.Tensor(dtype=tt.DataType.FLOAT32, shape=[1, 3], data=b"\0" * 11)},
    )
    with pytest.raises(tt.InvalidRequest) as invalid:
        apache.infer(bad)
    assert invalid.value.field == "inputs.x.data"
    assert apache.health().ready  # the connection survived three exceptions
    assert server.read(lambda: server.server.accepted_connections) == 1
