"""One record through a real server with the stream operator's calls (engine/stream/caller.py),
no Flink: answers equal direct calls, typed failures become dead letters, Overloaded and a
refused connection are retried within the record's deadline."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from engine.config import ServerConfig
from engine.runtime.loading import load_for_serving
from engine.server import Server
from engine.stream.caller import Outcome, RecordCaller
from engine.stream.records import RecordMapping
from engine.tools.ports import free_port
from engine.transport.client import AsyncClient, Client
from model_plugins.specs import TensorSpec
from tests.serving import PIPELINES, ServerThread, serving

CALC = PIPELINES / "calc.yaml"

pytestmark = pytest.mark.e2e


def caller_of(port: int, timeout_ms: int = 10_000) -> RecordCaller:
    with Client("127.0.0.1", port) as client:
        inputs = client.describe("calc").inputs
    return RecordCaller(
        AsyncClient("127.0.0.1", port, timeout_s=30), "calc", RecordMapping(inputs), timeout_ms
    )


def letter(outcome: Outcome) -> dict[str, object]:
    assert outcome.kind == "dead", outcome
    return json.loads(outcome.text)


async def test_answers_equal_direct_calls_and_failures_are_dead_letters() -> None:
    with serving([CALC]) as server:
        caller = caller_of(server.port)
        try:
            ok = await caller.call('{"id": 1, "x": [1, 2, 3], "tag": "t"}')
            assert ok.kind == "answer"
            assert ok.retries == 0
            answer = json.loads(ok.text)
            with Client("127.0.0.1", server.port) as client:
                direct = client.infer("calc", {"x": np.array([[1, 2, 3]], np.float32)})
            assert answer["id"] == 1
            assert answer["tag"] == "t"
            assert "x" not in answer
            for name, array in direct.outputs.items():
                np.testing.assert_array_equal(answer[name], array[0])

            failed = letter(await caller.call('{"id": 2, "x": [-1, 2, 3]}'))
            assert failed["error"]["type"] == "InferenceError"
            assert failed["error"]["node"] == "check"
            assert "negative input is not allowed" in failed["error"]["message"]
            assert failed["record"] == {"id": 2, "x": [-1, 2, 3]}

            # NaN passes the record's check (JSON in Python reads it); the server refuses it
            refused = letter(await caller.call('{"id": 3, "x": [NaN, 2, 3]}'))
            assert refused["error"]["type"] == "InvalidRequest"
            assert refused["error"]["field"].startswith("inputs.x")

            invalid = letter(await caller.call('{"id": 4, "x": "abc"}'))
            assert invalid["error"]["type"] == "InvalidRecord"
            assert (await caller.call("   ")).kind == "blank"
        finally:
            await caller.client.aclose()


async def test_overloaded_is_retried_after_retry_after_ms() -> None:
    with serving([CALC], max_inflight=1) as server:
        caller = caller_of(server.port)
        try:
            lines = [json.dumps({"id": i, "x": [i, 1, 2]}) for i in range(24)]
            outcomes = await asyncio.gather(*(caller.call(text) for text in lines))
        finally:
            await caller.client.aclose()
    assert [o.kind for o in outcomes] == ["answer"] * 24
    assert sum(o.retries for o in outcomes) > 0, "max_inflight=1 refused nothing"
    assert sorted(json.loads(o.text)["id"] for o in outcomes) == list(range(24))


async def test_a_refused_connection_is_retried_until_the_server_is_up() -> None:
    port = free_port()
    # the signature, from a server on another port
    with serving([CALC]) as first, Client("127.0.0.1", first.port) as client:
        inputs = client.describe("calc").inputs
    caller = RecordCaller(
        AsyncClient("127.0.0.1", port, timeout_s=30), "calc", RecordMapping(inputs), 30_000
    )
    pipelines, errors = load_for_serving([CALC])
    assert not errors
    late = ServerThread(Server(ServerConfig(port=port), pipelines))
    loop = asyncio.get_running_loop()
    try:
        pending = asyncio.ensure_future(caller.call('{"id": 1, "x": [1, 2, 3]}'))
        await asyncio.sleep(0.5)
        assert not pending.done()
        await loop.run_in_executor(None, late.start)
        outcome = await asyncio.wait_for(pending, 30)
    finally:
        await caller.client.aclose()
        await loop.run_in_executor(None, late.stop)
    assert outcome.kind == "answer", outcome
    assert outcome.retries >= 2


async def test_the_deadline_ends_the_retries_with_the_last_error() -> None:
    spec = {"x": TensorSpec("float32", [3])}
    port = free_port()  # nobody listens
    caller = RecordCaller(
        AsyncClient("127.0.0.1", port, timeout_s=30), "calc", RecordMapping(spec), 400
    )
    started = time.monotonic()
    try:
        outcome = await caller.call('{"id": 1, "x": [1, 2, 3]}')
    finally:
        await caller.client.aclose()
    assert time.monotonic() - started < 3
    dead = letter(outcome)
    assert dead["error"]["type"] == "DeadlineExceeded"
    assert "no answer within 400 ms" in dead["error"]["message"]
    assert "ClientConnectionError" in dead["error"]["message"]
    assert outcome.retries >= 2
