"""The PyFlink operator's own lifecycle, without a JVM (.venv-flink's Python, a real server):
it survives Flink's pickling, ``open`` starts its loop thread and pool, ``async_invoke`` on
another loop (as Flink's runner calls it) answers rows, ``timeout`` answers a dead letter,
``close`` closes every connection and ends the thread."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.serving import PIPELINES, ROOT, serving
from tests.stream.flink import FLINK_PYTHON, needs_flink

pytestmark = [pytest.mark.e2e, needs_flink]

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading

    import cloudpickle

    from engine.stream.caller import Outcome
    from engine.stream.job import describe_inputs
    from engine.stream.operator import PipelineFunction

    def sockets():
        fds = os.listdir("/proc/self/fd")
        return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("socket:") for fd in fds
                   if os.path.exists(f"/proc/self/fd/{fd}"))

    target = sys.argv[1]
    made = PipelineFunction([target], "stream", describe_inputs([target], "stream"))
    function = cloudpickle.loads(cloudpickle.dumps(made))  # as Flink ships it
    threads, open_sockets = threading.active_count(), sockets()
    function.open(None)
    lines = [json.dumps({"id": i, "x": [i, 1, 2]}) for i in range(20)] + ['{"id": "bad"}']

    async def flink_loop():
        return await asyncio.gather(*(function.async_invoke(line) for line in lines))

    rows = asyncio.run(flink_loop())
    during = sockets()
    late = function.timeout('{"id": 99, "x": [1, 2, 3]}')
    function.close()
    print(json.dumps({
        "rows": [Outcome.from_row(row[0]).kind for row in rows],
        "answers": [json.loads(Outcome.from_row(row[0]).text).get("doubled") for row in rows],
        "late": json.loads(Outcome.from_row(late[0]).text),
        "sockets_during": during - open_sockets,
        "sockets_after": sockets() - open_sockets,
        "threads_after": threading.active_count() - threads,
    }))
    """
)


def test_open_invoke_timeout_close_as_flink_calls_them() -> None:
    with serving([PIPELINES / "stream.yaml"]) as server:
        done = subprocess.run(
            [str(FLINK_PYTHON), "-c", SCRIPT, f"127.0.0.1:{server.port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["rows"] == ["answer"] * 20 + ["dead"]
    assert report["answers"][:3] == [[0.0, 2.0, 4.0], [2.0, 2.0, 4.0], [4.0, 2.0, 4.0]]
    assert report["sockets_during"] > 0, "no pooled connection while open"
    assert report["sockets_after"] == 0, "close() left connections open"
    assert report["threads_after"] == 0, "close() left the loop thread running"
    assert report["late"]["error"]["type"] == "DeadlineExceeded"
    assert report["late"]["record"] == {"id": 99, "x": [1, 2, 3]}
