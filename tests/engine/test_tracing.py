"""W3C traceparent parsing and the optional OpenTelemetry bridge (engine.observability.tracing)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from engine.observability import tracing
from engine.observability.tracing import (
    TraceContext,
    format_traceparent,
    parse_traceparent,
    start_node_span,
    start_request_span,
    traceparent_of,
)

ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{SPAN_ID}-01"


def _has_otel_sdk() -> bool:
    try:  # find_spec imports the parent package, which may be missing
        return importlib.util.find_spec("opentelemetry.sdk") is not None
    except ImportError:
        return False


HAS_OTEL_SDK = _has_otel_sdk()


# --- parsing ------------------------------------------------------------------------------


def test_parse_valid():
    ctx = parse_traceparent(VALID)
    assert ctx == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert ctx.sampled


def test_parse_unsampled_and_other_flags():
    ctx = parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-00")
    assert ctx is not None
    assert ctx.flags == 0
    assert not ctx.sampled
    assert parse_traceparent(f"00-{TRACE_ID}-{SPAN_ID}-03") == TraceContext(TRACE_ID, SPAN_ID, 3)


def test_parse_ignores_surrounding_whitespace():
    assert parse_traceparent(f"  {VALID}\t") == TraceContext(TRACE_ID, SPAN_ID, 1)


def test_round_trip():
    ctx = parse_traceparent(VALID)
    assert ctx is not None
    assert format_traceparent(ctx) == VALID
    assert format_traceparent(TraceContext(TRACE_ID, SPAN_ID, 0)).endswith("-00")


def test_future_version_is_read_as_version_00():
    assert parse_traceparent(f"01-{TRACE_ID}-{SPAN_ID}-01") == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert parse_traceparent(f"cc-{TRACE_ID}-{SPAN_ID}-01-what-the-future-holds") is not None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(f"ff-{TRACE_ID}-{SPAN_ID}-01", id="version-ff-forbidden"),
        pytest.param(f"0-{TRACE_ID}-{SPAN_ID}-01", id="version-one-digit"),
        pytest.param(f"000-{TRACE_ID}-{SPAN_ID}-01", id="version-three-digits"),
        pytest.param(f"zz-{TRACE_ID}-{SPAN_ID}-01", id="version-not-hex"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-01-extra", id="version-00-with-more-fields"),
        pytest.param(f"00-{'0' * 32}-{SPAN_ID}-01", id="zero-trace-id"),
        pytest.param(f"00-{TRACE_ID}-{'0' * 16}-01", id="zero-parent-id"),
        pytest.param(f"00-{TRACE_ID[:-1]}-{SPAN_ID}-01", id="trace-id-31"),
        pytest.param(f"00-{TRACE_ID}a-{SPAN_ID}-01", id="trace-id-33"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID[:-1]}-01", id="parent-id-15"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}a-01", id="parent-id-17"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-1", id="flags-one-digit"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-001", id="flags-three-digits"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}-0g", id="flags-not-hex"),
        pytest.param(f"00-{TRACE_ID.upper()}-{SPAN_ID}-01", id="uppercase-hex"),
        pytest.param(f"00_{TRACE_ID}_{SPAN_ID}_01", id="wrong-separator"),
        pytest.param(f"00-{TRACE_ID}-{SPAN_ID}", id="missing-flags"),
        pytest.param("", id="empty"),
        pytest.param("garbage", id="garbage"),
    ],
)
def test_parse_invalid(value):
    assert parse_traceparent(value) is None


@pytest.mark.parametrize("value", [None, 42, b"00-" + TRACE_ID.encode(), [VALID]])
def test_parse_non_strings_never_raise(value):
    assert parse_traceparent(value) is None


def test_traceparent_of_headers():
    assert traceparent_of(None) is None
    assert traceparent_of({}) is None
    assert traceparent_of({"traceparent": VALID}) == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert traceparent_of({"Traceparent": VALID}) == TraceContext(TRACE_ID, SPAN_ID, 1)
    assert traceparent_of({"traceparent": "bogus"}) is None


def test_child_keeps_trace_id_and_flags_with_a_new_span_id():
    parent = TraceContext(TRACE_ID, SPAN_ID, 0)
    children = [parent.child() for _ in range(50)]
    for child in children:
        assert child.trace_id == TRACE_ID
        assert child.flags == 0
        assert child.span_id != SPAN_ID
        assert parse_traceparent(format_traceparent(child)) == child  # a valid span id
    assert len({c.span_id for c in children}) == len(children)


# --- the no-op path -----------------------------------------------------------------------


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_opentelemetry_spans_are_noops_and_nothing_is_imported():
    # A fresh interpreter where importing opentelemetry fails, as if it were not installed.
    result = _run_python(
        f"""
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("no opentelemetry here")
                return None

        sys.meta_path.insert(0, NoOtel())
        from engine.observability.tracing import start_node_span, start_request_span

        with start_request_span("calc", {{"traceparent": "{VALID}"}}) as ctx:
            with start_node_span("calc", "double"):
                pass
        assert ctx.trace_id == "{TRACE_ID}" and ctx.span_id != "{SPAN_ID}", ctx
        with start_request_span("calc", None) as ctx:
            assert ctx is None
        try:
            with start_request_span("calc", {{}}):
                raise KeyError("boom")
        except KeyError:
            pass
        else:
            raise AssertionError("the exception was swallowed")
        leaked = sorted(m for m in sys.modules if m.split(".")[0] == "opentelemetry")
        assert not leaked, leaked
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_importing_the_module_does_not_import_opentelemetry():
    result = _run_python(
        """
        import sys
        import engine.observability.tracing
        print(any(m.split(".")[0] == "opentelemetry" for m in sys.modules))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- with OpenTelemetry -------------------------------------------------------------------


def test_with_the_api_alone_no_span_is_made_but_the_context_is_a_child_of_the_callers():
    pytest.importorskip("opentelemetry.trace", reason="opentelemetry-api is not installed")
    from opentelemetry import trace

    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        pytest.skip("a global OpenTelemetry tracer provider is configured in this process")
    with start_request_span("calc", {"traceparent": VALID}) as ctx:
        # no SDK provider: nothing would record a span, so none is made (no cost per request)
        assert not trace.get_current_span().get_span_context().is_valid
    assert ctx is not None
    assert ctx.trace_id == TRACE_ID
    assert ctx.span_id != SPAN_ID
    with start_request_span("calc", {}) as ctx:
        pass
    assert ctx is None


@pytest.fixture
def exporter():
    """An SDK tracer provider exporting to memory, used by engine.observability.tracing for one
    test."""
    if not HAS_OTEL_SDK:
        pytest.skip("opentelemetry-sdk is not installed (pip install 'dagserve[otel]')")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))

    class Trace:
        """opentelemetry.trace with this test's provider in place of the global one."""

        def __init__(self, real: Any) -> None:
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def get_tracer(self, name, *args, **kwargs):
            return provider.get_tracer(name, *args, **kwargs)

    from opentelemetry import propagate, trace

    # the global provider can be set only once per process: hand the module a wrapper instead
    saved = tracing._otel
    tracing._otel = (Trace(trace), propagate)
    try:
        yield memory
    finally:
        tracing._otel = saved
        provider.shutdown()


def test_request_span_continues_the_callers_trace(exporter):
    with (
        start_request_span("calc", {"traceparent": VALID}) as ctx,
        start_node_span("calc", "double", model="calc/double", batch_size=4),
    ):
        pass
    assert ctx is not None
    assert ctx.trace_id == TRACE_ID
    assert ctx.span_id != SPAN_ID

    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"infer calc", "node double"}
    request, node = spans["infer calc"], spans["node double"]
    assert f"{request.context.trace_id:032x}" == TRACE_ID
    assert f"{request.context.span_id:016x}" == ctx.span_id
    assert f"{request.parent.span_id:016x}" == SPAN_ID
    assert request.parent.is_remote
    assert request.attributes["dagserve.pipeline"] == "calc"
    assert node.context.trace_id == request.context.trace_id
    assert node.parent.span_id == request.context.span_id
    assert dict(node.attributes) == {
        "dagserve.pipeline": "calc",
        "dagserve.node": "double",
        "dagserve.model": "calc/double",
        "dagserve.batch_size": 4,
    }


def test_request_span_header_name_is_case_insensitive(exporter):
    with start_request_span("calc", {"TraceParent": VALID}) as ctx:
        pass
    assert ctx is not None
    assert ctx.trace_id == TRACE_ID
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == TRACE_ID


def test_request_span_without_traceparent_starts_a_new_trace(exporter):
    with start_request_span("calc", {"traceparent": "garbage"}) as ctx:
        pass
    (span,) = exporter.get_finished_spans()
    assert span.parent is None
    assert ctx is not None
    assert ctx == TraceContext(
        f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", ctx.flags
    )
    assert ctx.trace_id != TRACE_ID


def test_request_span_records_the_error(exporter):
    from opentelemetry.trace import StatusCode

    with pytest.raises(ValueError, match="boom"), start_request_span("calc", {}):
        raise ValueError("boom")
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == ["exception"]


@pytest.mark.e2e
def test_a_served_request_continues_the_callers_trace_with_a_span_per_node(exporter):
    import numpy as np

    from engine.transport.client import Client
    from tests.serving import PIPELINES, serving

    traceparent = f"00-{TRACE_ID}-{SPAN_ID}-01"
    with serving([PIPELINES / "calc.yaml"]) as server, Client("127.0.0.1", server.port) as c:
        c.infer("calc", {"x": np.ones((1, 3), np.float32)}, headers={"traceparent": traceparent})
    spans = exporter.get_finished_spans()
    request = next(s for s in spans if s.name == "infer calc")
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == SPAN_ID
    nodes = {s.name for s in spans if s.parent and s.parent.span_id == request.context.span_id}
    assert {"node double", "node triple", "node check", "node fuse"} <= nodes
