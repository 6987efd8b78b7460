"""Structured logs: request ids on every line about a request, slow requests, failures."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from engine.observability.logs import JsonFormatter, _RequestContext
from engine.transport.client import Client
from model_plugins.errors import InferenceError
from tests.serving import PIPELINES, serving

pytestmark = pytest.mark.e2e


@pytest.fixture
def json_lines():
    """Capture the engine's log lines as the JSON that `--log-format json` writes."""
    records: list[dict] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(json.loads(self.format(record)))

    handler = Keep(level=logging.DEBUG)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_RequestContext())
    logger = logging.getLogger("engine")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_slow_and_failed_requests_are_logged_with_their_request_id(json_lines):
    with (
        serving([PIPELINES / "calc.yaml"], slow_request_ms=0.001) as server,
        Client("127.0.0.1", server.port) as client,
    ):
        client.infer("calc", {"x": np.ones((1, 3), np.float32)}, request_id="req-ok")
        with pytest.raises(InferenceError):
            client.infer("calc", {"x": -np.ones((1, 3), np.float32)}, request_id="req-bad")
    slow = [r for r in json_lines if r["message"].startswith("slow request")]
    assert slow
    assert slow[0]["request_id"] == "req-ok"
    assert set(slow[0]["node_ms"]) == {"double", "triple", "check", "fuse"}
    failed = [r for r in json_lines if r["message"].startswith("request failed")]
    assert failed[0]["request_id"] == "req-bad"
    assert failed[0]["node"] == "check"
    assert failed[0]["plugin"] == "tests.plugins:FailOnNegative"
    assert failed[0]["cause"] == "builtins.ValueError"
    # every line written while serving a request names it
    about_requests = [r for r in json_lines if "request" in r["message"]]
    assert all(r.get("request_id") for r in about_requests)


def test_a_callers_traceparent_is_on_the_request_lines(json_lines):
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    with (
        serving([PIPELINES / "calc.yaml"], slow_request_ms=0.001) as server,
        Client("127.0.0.1", server.port) as client,
    ):
        client.infer(
            "calc", {"x": np.ones((1, 3), np.float32)},
            headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
        )  # fmt: skip
    slow = [r for r in json_lines if r["message"].startswith("slow request")]
    assert slow[0]["trace_id"] == trace
