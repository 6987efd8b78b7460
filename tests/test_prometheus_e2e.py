"""A real Prometheus scrapes a real dagserve server, and answers queries about it: every query
of the Grafana dashboard, under known traffic, returns data and a believable value.

Needs the Debian package ``prometheus`` (``make system-deps`` installs it); skipped without
it.  Everything listens on 127.0.0.1: the server's Thrift and metrics ports are chosen by the
kernel, Prometheus gets a free port of its own and keeps its data in the test's tmp_path, so a
system Prometheus (Debian's service listens on :9090) neither helps nor interferes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.tools.ports import free_port
from engine.transport.client import Client
from model_plugins.errors import InferenceError
from tests.serving import PIPELINES, serving

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
DASHBOARD = (
    Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dagserve-dashboard.json"
)
POLL_S = 30.0
REQUESTS = 5
_NAME = re.compile(r"\bdagserve_[a-zA-Z0-9_]+")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


class _NotYet(Exception):
    """A probe's answer is not the awaited one (yet); the message says what it was."""


def _poll(what: str, probe: Callable[[], Any], log: Path, timeout_s: float = POLL_S) -> Any:
    """``probe()`` until it returns something other than None, for at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except (OSError, ValueError, _NotYet) as error:  # not listening, not JSON, not there
            last = error
        else:
            if result is not None:
                return result
        time.sleep(0.2)
    pytest.fail(f"{what}: nothing after {timeout_s:.0f} s (last: {last!r})\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    text = log.read_text(errors="replace") if log.exists() else ""
    return "prometheus log:\n" + "\n".join(text.splitlines()[-lines:])


@contextmanager
def _prometheus(tmp_path: Path, target_port: int) -> Iterator[tuple[str, Path]]:
    """A Prometheus scraping 127.0.0.1:``target_port`` every second; yields its URL and log."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: dagserve\n"
        "    scrape_interval: 1s\n"
        "    scrape_timeout: 1s\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{target_port}']\n"
    )
    log = tmp_path / "prometheus.log"
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool | None:
            if process.poll() is not None:
                pytest.fail(f"prometheus exited with {process.returncode}\n{_tail(log)}")
            with urllib.request.urlopen(f"{url}/-/ready", timeout=2) as response:
                return True if response.status == 200 else None

        _poll("prometheus /-/ready", ready, log)
        yield url, log
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _query(url: str, promql: str) -> Any:
    """The ``data`` of an instant query; fails the test when Prometheus rejects it."""
    query = urllib.parse.urlencode({"query": promql})
    try:
        answer = _get_json(f"{url}/api/v1/query?{query}")
    except urllib.error.HTTPError as error:  # 400: a bad expression
        pytest.fail(f"{promql!r}: HTTP {error.code}: {error.read().decode(errors='replace')}")
    assert answer["status"] == "success", (promql, answer)
    return answer["data"]


def _scalar(data: Any) -> float | None:
    """The one value of a one-sample vector, else None."""
    if data["resultType"] != "vector" or len(data["result"]) != 1:
        return None
    return float(data["result"][0]["value"][1])


def _dashboard_queries() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    exprs.append(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])
    grafana = {"$__rate_interval": "4s", '"$pipeline"': '".*"', '"$model"': '".*"'}
    for placeholder, value in grafana.items():
        exprs = [e.replace(placeholder, value) for e in exprs]
    return exprs


@pytest.mark.skipif(
    not os.access(PROMETHEUS, os.X_OK),
    reason="the prometheus binary is missing (Debian package 'prometheus'; make system-deps)",
)
def test_prometheus_scrapes_the_server(tmp_path: Path) -> None:
    paths = [PIPELINES / "calc.yaml", PIPELINES / "batched_a.yaml"]  # batched_a: a worker
    with serving(paths, metrics_port=0) as thread:
        metrics_port = thread.server.metrics_port
        assert isinstance(metrics_port, int)
        assert metrics_port > 0
        with Client("127.0.0.1", thread.port) as client:
            for _ in range(REQUESTS):
                out = client.infer("calc", {"x": np.ones((1, 3), np.float32)})
                np.testing.assert_allclose(out.outputs["doubled"], np.full((1, 3), 2.0))

        with _prometheus(tmp_path, metrics_port) as (url, log):

            def sent() -> float | None:
                data = _query(url, 'sum(dagserve_requests_total{pipeline="calc"})')
                value = _scalar(data)
                if value != REQUESTS:
                    raise _NotYet(f"result {data['result']}")
                return value

            assert _poll(f"sum of calc's requests == {REQUESTS}", sent, log) == REQUESTS

            ok = _query(url, 'sum by (status) (dagserve_requests_total{pipeline="calc"})')
            assert [(r["metric"], r["value"][1]) for r in ok["result"]] == [
                ({"status": "ok"}, str(REQUESTS))
            ]
            target = _query(url, 'up{job="dagserve"}')
            assert _scalar(target) == 1.0

            # A quantile over the scraped histogram is a real latency; and every query of the
            # Grafana dashboard is PromQL that this Prometheus accepts.
            p99 = _scalar(
                _query(
                    url,
                    "histogram_quantile(0.99, sum by (le) "
                    '(dagserve_request_duration_seconds_bucket{pipeline="calc"}))',
                )
            )
            assert p99 is not None
            assert math.isfinite(p99)
            assert 0 < p99 <= 10

            # Every query of the Grafana dashboard is PromQL that this Prometheus accepts, and,
            # under known traffic, answers with data that makes sense: a query that returns
            # nothing about metrics the server exports is a broken panel.
            with _traffic(thread.port):
                exported = _exported_series(metrics_port)
                _check_dashboard(url, exported, log)


def _exported_series(metrics_port: int) -> set[str]:
    """The series names that the server's /metrics holds now."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@contextmanager
def _traffic(port: int) -> Iterator[None]:
    """Steady requests while the block runs: calc succeeding and failing (its ``check`` node
    refuses negative input) and the batched model; one connection stays open throughout."""
    stop = threading.Event()
    good = {"x": np.ones((1, 3), np.float32), "extra": np.ones((1, 3), np.float32)}
    bad = {"x": -np.ones((1, 3), np.float32)}
    sent: list[int] = [0]

    def run() -> None:
        with Client("127.0.0.1", port, timeout_s=10) as client:
            while not stop.is_set():
                client.infer("calc", good)
                with contextlib.suppress(InferenceError):
                    client.infer("calc", bad)
                client.infer("batched_a", {"x": np.ones((2, 2), np.float32)})
                sent[0] += 1
                time.sleep(0.02)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        done = pool.submit(run)
        try:
            _wait(lambda: sent[0] > 0 or done.done(), "the first round of traffic")
            yield
        finally:
            stop.set()
        done.result(timeout=30)  # the traffic itself never failed


def _wait(condition: Callable[[], bool], what: str, timeout_s: float = POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(0.05)


def _check_dashboard(url: str, exported: set[str], log: Path) -> None:
    """Each dashboard query until it answers plausibly, all within one bound."""
    queries = _dashboard_queries()
    missing = {n for q in queries for n in _NAME.findall(q)} - exported
    # only GPU families may be absent (no GPU, or one that does not report, say, its power)
    assert all(n.startswith("dagserve_gpu_") for n in missing), sorted(missing)
    pending = {q: "not asked yet" for q in queries}
    deadline = time.monotonic() + 2 * POLL_S
    while pending and time.monotonic() < deadline:
        for promql in list(pending):
            result = _query(url, promql)
            if set(_NAME.findall(promql)) & missing:
                # no such series on this machine: the query is valid and must return nothing
                assert not result["result"], (promql, result)
                del pending[promql]
                continue
            problem = _implausible(promql, result)
            if problem is None:
                del pending[promql]
            else:
                pending[promql] = problem
        if pending:
            time.sleep(0.5)
    if pending:
        lines = "\n".join(f"  {q}\n    -> {why}" for q, why in pending.items())
        pytest.fail(f"dashboard queries without a plausible answer:\n{lines}\n{_tail(log)}")


def _implausible(promql: str, data: Any) -> str | None:
    """Why the answer to one dashboard query is not believable, or None when it is."""
    if data["resultType"] != "vector" or not data["result"]:
        return f"no data: {data}"
    values = [float(r["value"][1]) for r in data["result"]]
    if not all(math.isfinite(v) for v in values):
        return f"not finite: {values}"
    if "histogram_quantile" in promql:  # seconds
        ok = all(0 <= v <= 10 for v in values) and any(v > 0 for v in values)
    elif "dagserve_model_batch_size_sum" in promql:  # the mean batch size
        ok = all(v >= 1 for v in values)
    elif "status!=" in promql:  # the error ratio: calc fails half its requests
        ok = all(0 < v <= 1 for v in values)
    elif "rate(" in promql:  # requests, node errors, batches per second under traffic
        ok = all(v >= 0 for v in values) and any(v > 0 for v in values)
    elif "dagserve_worker_up" in promql:
        ok = all(v == 1 for v in values)
    elif "resident_memory" in promql:
        ok = all(v > 1e6 for v in values)
    elif "open_connections" in promql:  # the traffic's connection is open
        ok = all(v >= 1 for v in values)
    else:  # in flight, queue length, restarts, GPU gauges
        ok = all(v >= 0 for v in values)
    return None if ok else f"implausible: {values}"
