"""Spans on the OTLP wire from ``dagserve serve`` (engine.observability.otel).

A test receiver on 127.0.0.1 (OTLP/HTTP at ``/v1/traces``, or OTLP/gRPC) decodes what the
server exports with ``opentelemetry-proto``; the server runs as a subprocess, so the tracer
provider it sets is its own.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import ConfigError
from engine.observability.otel import env_protocol, exporters_asked
from engine.tools.ports import free_port, wait_ready
from engine.transport.client import Client

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"

PIPELINE = """
name: traced
inputs: {x: {dtype: float32, shape: [-1]}}
nodes:
  echo: {plugin: identity, inputs: {x: $inputs.x}}
outputs: {y: echo.x}
"""


def _installed(module: str) -> bool:
    try:  # find_spec imports the parent package, which may be missing
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


needs_exporters = pytest.mark.skipif(
    not (
        _installed("opentelemetry.exporter.otlp.proto.http")
        and _installed("opentelemetry.exporter.otlp.proto.grpc")
        and _installed("opentelemetry.proto")
    ),
    reason="the otel extra (OTLP exporters, opentelemetry-proto) is not installed",
)


# --- what the environment asks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "asked"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, []),
    ],
)
def test_the_environment_turns_tracing_on(environ: dict[str, str], asked: list[str]) -> None:
    assert exporters_asked(environ) == asked


def test_unknown_exporter_and_protocol_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="'zipkin'"):
        exporters_asked({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="'http/json'"):
        env_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert env_protocol({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == "grpc"
    assert env_protocol({}) == "http/protobuf"


# --- off: nothing imported --------------------------------------------------------------------


def test_tracing_off_imports_no_opentelemetry(tmp_path: Path) -> None:
    path = tmp_path / "traced.yaml"
    path.write_text(PIPELINE, encoding="utf-8")
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        import numpy as np
        from engine.config import ServerConfig
        from engine.observability.otel import exporting_traces
        from engine.runtime.loading import load_for_serving
        from engine.server import Server
        from engine.transport.client import AsyncClient

        async def serve_one(pipelines):
            server = Server(ServerConfig(port=0), pipelines)
            await server.startup()
            try:
                async with AsyncClient("127.0.0.1", server.port) as client:
                    x = np.ones((1, 2), dtype=np.float32)
                    headers = {{"traceparent": {TRACEPARENT!r}}}
                    await client.infer("traced", {{"x": x}}, headers=headers)
            finally:
                await server.shutdown()

        pipelines, errors = load_for_serving([{str(path)!r}])
        assert not errors, errors
        with exporting_traces(None):  # what dagserve serve does
            asyncio.run(serve_one(pipelines))
        print(sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry"))
        """
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# --- on: spans on the wire --------------------------------------------------------------------


class Received:
    """The spans a test receiver decoded, with their resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, payload: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest.FromString(payload)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)

    def wait_for(self, names: set[str], timeout_s: float = 20.0) -> dict[str, tuple[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                found = {span.name: (service, span) for service, span in self.spans}
            if names <= found.keys():
                return found
            assert time.monotonic() < deadline, f"spans received: {sorted(found)}"
            time.sleep(0.05)


@pytest.fixture
def http_receiver() -> Iterator[tuple[int, Received]]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    received = Received()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            received.add(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[int, Received]]:
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = Received()

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # the gRPC method's name
            received.add(request.SerializeToString())
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port, received
    finally:
        server.stop(grace=None)


def serve(args: list[str], environ: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "serve", *args, "--port", str(port)],
        cwd=ROOT, env={**clean, "OTEL_BSP_SCHEDULE_DELAY": "50", **environ},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_ready(port, process, timeout_s=60)
    except BaseException:
        process.kill()
        process.wait(10)
        raise
    return process, port


def stop(process: subprocess.Popen[bytes]) -> str:
    if process.poll() is None:
        process.terminate()
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
    return err.decode(errors="replace")


def check_spans(received: Received, service: str) -> None:
    spans = received.wait_for({"infer traced", "node echo"})
    request_service, request = spans["infer traced"]
    node_service, node = spans["node echo"]
    assert request_service == node_service == service
    # the caller's trace continued: its trace id, its span the parent of the request span
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == SPAN_ID
    assert node.trace_id.hex() == TRACE_ID
    assert node.parent_span_id == request.span_id


@pytest.mark.e2e
@needs_exporters
def test_served_request_spans_reach_an_otlp_http_receiver(
    tmp_path: Path, http_receiver: tuple[int, Received]
) -> None:
    receiver_port, received = http_receiver
    path = tmp_path / "traced.yaml"
    path.write_text(PIPELINE, encoding="utf-8")
    environ = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}",
        "OTEL_SERVICE_NAME": "dagserve-under-test",
    }
    process, port = serve([str(path)], environ)
    try:
        with Client("127.0.0.1", port) as client:
            x = np.ones((1, 2), dtype=np.float32)
            client.infer("traced", {"x": x}, headers={"traceparent": TRACEPARENT})
        check_spans(received, "dagserve-under-test")
    finally:
        err = stop(process)
    assert "tracing: exporting spans (otlp http/protobuf" in err


@pytest.mark.e2e
@needs_exporters
def test_the_tracing_section_exports_over_grpc(
    tmp_path: Path, grpc_receiver: tuple[int, Received]
) -> None:
    receiver_port, received = grpc_receiver
    (tmp_path / "traced.yaml").write_text(PIPELINE, encoding="utf-8")
    config = tmp_path / "server.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            pipelines: [traced.yaml]
            tracing:
              endpoint: http://127.0.0.1:{receiver_port}
              protocol: grpc
              service_name: dagserve-grpc
              sample_ratio: 0.0
            """
        ),
        encoding="utf-8",
    )
    process, port = serve([str(config)], {})
    try:
        with Client("127.0.0.1", port) as client:
            x = np.ones((1, 2), dtype=np.float32)
            # ratio 0, but the caller sampled the trace: parent-based sampling records it
            client.infer("traced", {"x": x}, headers={"traceparent": TRACEPARENT})
        check_spans(received, "dagserve-grpc")
    finally:
        stop(process)
