"""The Grafana dashboard in deploy/ is valid and queries only metrics the server exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dagserve-dashboard.json"

#: the metrics contract (DESIGN.md "Observability"): family name -> type
FAMILIES = {
    "dagserve_requests_total": "counter",
    "dagserve_request_duration_seconds": "histogram",
    "dagserve_inflight_requests": "gauge",
    "dagserve_open_connections": "gauge",
    "dagserve_node_duration_seconds": "histogram",
    "dagserve_node_errors_total": "counter",
    "dagserve_model_queue_duration_seconds": "histogram",
    "dagserve_model_batch_size": "histogram",
    "dagserve_model_compute_duration_seconds": "histogram",
    "dagserve_model_queue_length": "gauge",
    "dagserve_worker_up": "gauge",
    "dagserve_worker_restarts_total": "counter",
    "dagserve_worker_resident_memory_bytes": "gauge",
    "dagserve_worker_crashes_total": "counter",
    "dagserve_model_quarantined": "gauge",
    "dagserve_gpu_utilization_ratio": "gauge",
    "dagserve_gpu_memory_used_bytes": "gauge",
    "dagserve_gpu_memory_total_bytes": "gauge",
    "dagserve_gpu_temperature_celsius": "gauge",
    "dagserve_gpu_power_watts": "gauge",
    "dagserve_gpu_committed_memory_bytes": "gauge",
    "dagserve_gpu_committed_share": "gauge",
}
#: the series names Prometheus stores: histograms only as _bucket, _sum and _count
SERIES = {
    series
    for name, kind in FAMILIES.items()
    for series in (
        [f"{name}_bucket", f"{name}_sum", f"{name}_count"] if kind == "histogram" else [name]
    )
}
_NAME = re.compile(r"\bdagserve_[a-zA-Z0-9_]+")


def _walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, key)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [e for e in _walk(dashboard["panels"], "expr") if isinstance(e, str)]


def _variable_queries(dashboard: dict[str, Any]) -> list[str]:
    queries = []
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_dashboard_is_a_grafana_dashboard(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pipeline", "model"):
        assert variables[name]["type"] == "query"
        assert "label_values(" in variables[name]["definition"]


def test_every_panel_queries_the_templated_prometheus(dashboard):
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].strip(), panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_panels_do_not_overlap(dashboard):
    taken: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["x"] >= 0, panel["title"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not cells & taken, f"{panel['title']} overlaps another panel"
        taken |= cells


def test_every_metric_in_a_query_is_in_the_contract(dashboard):
    queries = _exprs(dashboard) + _variable_queries(dashboard)
    assert len(queries) > 20
    used = {name for q in queries for name in _NAME.findall(q)}
    unknown = used - SERIES
    assert not unknown, f"not in the metrics contract: {sorted(unknown)}"


def test_the_dashboard_covers_every_family(dashboard):
    used = {name for q in _exprs(dashboard) for name in _NAME.findall(q)}
    families = {re.sub(r"_(bucket|sum|count)$", "", n) if n not in FAMILIES else n for n in used}
    assert families == set(FAMILIES)


def test_histograms_are_read_through_their_buckets(dashboard):
    for expr in _exprs(dashboard):
        for quantile in re.findall(r"histogram_quantile\(([^,]+),", expr):
            assert 0 < float(quantile) < 1, expr
        if "histogram_quantile" in expr:
            assert "_bucket{" in expr, expr
            assert re.search(r"sum by \(le\b", expr), f"quantile not aggregated by le: {expr}"


def test_the_on_call_panels_are_there(dashboard):
    exprs = _exprs(dashboard)

    def has(*parts: str) -> bool:
        return any(all(p in e for p in parts) for e in exprs)

    assert has("dagserve_requests_total", "pipeline, status")
    assert has("dagserve_requests_total", 'status!="ok"')  # error ratio
    for quantile in ("0.5", "0.95", "0.99"):
        assert has(
            f"histogram_quantile({quantile},",
            "dagserve_request_duration_seconds_bucket",
            "by (le, pipeline)",
            "[5m]",
        ), quantile
    assert has("histogram_quantile(0.95", "dagserve_node_duration_seconds_bucket", "pipeline, node")
    # queue vs compute side by side: one panel with both
    assert any(
        {
            "dagserve_model_queue_duration_seconds_bucket",
            "dagserve_model_compute_duration_seconds_bucket",
        }
        <= {n for t in p.get("targets", []) for n in _NAME.findall(t["expr"])}
        for p in dashboard["panels"]
    )
    assert has("dagserve_model_batch_size_sum", "/", "dagserve_model_batch_size_count")
    # why did my neighbour's requests not fail, and is that model now refused?
    assert has("dagserve_worker_crashes_total", "worker, model")
    assert has("dagserve_model_quarantined")
