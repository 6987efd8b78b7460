"""deploy/: the Kubernetes manifests, the image's entrypoint, and what they assume of the code.

The core objects of the base and of both rendered overlays are validated with
``kubernetes-validate --strict`` against Kubernetes 1.31; the custom resources (PodMonitor,
ScaledObject), which it has no schema for, are checked structurally.  Ports, probe paths, the
grace period and every metric name the autoscalers query are checked against the code
(``ServerConfig``, ``MetricsServer``'s routes, the families ``engine/observability/metrics.py``
declares).  The overlays are rendered by ``kubectl kustomize`` (``make system-deps`` installs
Debian's ``kubernetes-client`` where no kubectl is found).  The entrypoint runs a real server
on a config folder laid out as the pod mounts it.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from engine.config import ServerConfig
from engine.observability.http import MetricsServer
from engine.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
OVERLAYS = ("cpu", "gpu")
#: what kubernetes-validate has schemas for; the rest are CRDs, checked structurally
CRD_GROUPS = ("monitoring.coreos.com/", "keda.sh/")


# --- rendering --------------------------------------------------------------------------------


@functools.cache
def _render(folder: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: `make system-deps` installs Debian's kubernetes-client"
    done = subprocess.run(
        [kubectl, "kustomize", str(KUBE / folder)], capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        # Debian bookworm's kubernetes-client is kubectl 1.20, whose kustomize (v2.0.3) knows
        # neither components nor patches: say which kustomize ran
        version = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True)
        pytest.fail(
            f"kubectl kustomize {folder} failed (needs kustomize v4.5 or later; this is\n"
            f"{version.stdout.strip()}):\n{done.stderr}"
        )
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def _one(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["dagserve"]
    return containers[0]  # type: ignore[no-any-return]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


def _server_config(docs: tuple[dict[str, Any], ...]) -> ServerConfig:
    """The config the pods read, from the generated ConfigMap (pydantic checks every key)."""
    config_maps = [d for d in docs if d["kind"] == "ConfigMap" and "dagserve.yaml" in d["data"]]
    assert len(config_maps) == 1
    return ServerConfig.model_validate(yaml.safe_load(config_maps[0]["data"]["dagserve.yaml"]))


ALL = ("base", "overlays/cpu", "overlays/gpu", "prometheus-adapter")


@pytest.mark.parametrize("folder", ALL)
def test_kustomize_renders(folder: str):
    assert _render(folder)


def _with_component(tmp_path: Path, component: str) -> tuple[dict[str, Any], ...]:
    """The cpu overlay with one more of the opt-in components, rendered."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    here = functools.partial(os.path.relpath, start=overlay)  # kustomize wants relative paths
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{here(KUBE / 'overlays' / 'cpu')}]\n"
        f"components: [{here(KUBE / 'components' / component)}]\n"
    )
    done = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def test_models_from_an_image_replace_the_pvc(tmp_path: Path):
    """components/models-from-image, added to an overlay, validates and drops the PVC."""
    from kubernetes_validate import utils

    docs = _with_component(tmp_path, "models-from-image")
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    assert {v["name"]: v for v in pod["volumes"]}["models"] == {
        "name": "models",
        "emptyDir": {"sizeLimit": "20Gi"},
    }
    (init,) = pod["initContainers"]
    assert init["volumeMounts"] == [{"name": "models", "mountPath": "/target"}]
    utils.validate(_one(docs, "Deployment"), KUBERNETES_VERSION, strict=True)


def test_tracing_points_the_server_at_a_collector(tmp_path: Path):
    """components/tracing: the OTEL_* variables the server reads turn OTLP export on."""
    from kubernetes_validate import utils

    from engine.observability.otel import env_protocol, exporters_asked

    docs = _with_component(tmp_path, "tracing")
    utils.validate(_one(docs, "Deployment"), KUBERNETES_VERSION, strict=True)
    env = _container(docs)["env"]
    values = {e["name"]: e.get("value", "") for e in env}
    assert exporters_asked(values) == ["otlp"]
    assert env_protocol(values) == "http/protobuf"
    assert values["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")  # OTLP/HTTP's port
    assert 0 < float(values["OTEL_TRACES_SAMPLER_ARG"]) <= 1
    # $(POD_NAME) expands only from a variable defined earlier in the list
    names = [e["name"] for e in env]
    assert names.index("POD_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in _env(_container(_render("overlays/cpu")))


def test_overlays_render_the_base_in_their_namespace():
    for overlay in OVERLAYS:
        docs = _render(f"overlays/{overlay}")
        namespaced = [d for d in docs if d["kind"] != "Namespace"]
        assert {d["metadata"].get("namespace") for d in namespaced} == {"dagserve"}
        assert {d["kind"] for d in _render("base")} <= {d["kind"] for d in docs}


# --- kubernetes-validate --strict and the CRDs ------------------------------------------------


@pytest.mark.parametrize("folder", ALL)
def test_core_objects_validate_strictly_against_kubernetes_1_31(folder: str):
    from kubernetes_validate import utils

    core = [d for d in _render(folder) if not d["apiVersion"].startswith(CRD_GROUPS)]
    assert core
    for doc in core:
        try:
            utils.validate(doc, KUBERNETES_VERSION, strict=True)
        except utils.ValidationError as exc:
            pytest.fail(f"{folder}: {doc['kind']}/{doc['metadata']['name']}: {exc.message}")


def test_strict_validation_refuses_an_unknown_field():
    """The check above can fail: a misspelt field in the Deployment is refused."""
    from kubernetes_validate import utils

    deployment = yaml.safe_load(yaml.safe_dump(_one(_render("base"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpget": {}}
    with pytest.raises(utils.ValidationError):
        utils.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_pod_monitor_scrapes_the_metrics_port_of_the_deployments_pods():
    """Structural (kubernetes-validate has no Prometheus Operator schema)."""
    docs = _render("base")
    monitor = _one(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"] for p in _container(docs)["ports"]}
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert endpoints
    for endpoint in endpoints:
        assert endpoint["port"] in ports
        assert endpoint.get("path", "/metrics") == "/metrics"


def test_scaled_object_targets_the_deployment_with_prometheus_triggers():
    """Structural (kubernetes-validate has no KEDA schema)."""
    docs = _render("overlays/gpu")
    scaled = _one(docs, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == _one(docs, "Deployment")["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert trigger["type"] == "prometheus"
        meta = trigger["metadata"]
        assert meta["serverAddress"].startswith("http")
        assert float(meta["threshold"]) > 0
        assert 'namespace="dagserve"' in meta["query"]  # the overlay's namespace
    hpa = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert hpa["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_each_overlay_has_one_autoscaler():
    """KEDA makes an HPA of its own: both on one Deployment would fight over the count."""
    kinds = {o: {d["kind"] for d in _render(f"overlays/{o}")} for o in OVERLAYS}
    assert "HorizontalPodAutoscaler" in kinds["cpu"]
    assert "ScaledObject" not in kinds["cpu"]
    assert "ScaledObject" in kinds["gpu"]
    assert "HorizontalPodAutoscaler" not in kinds["gpu"]
    for overlay in OVERLAYS:  # the autoscaler owns the replica count
        assert "replicas" not in _one(_render(f"overlays/{overlay}"), "Deployment")["spec"]


# --- the pod against the code -----------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_match_the_server(overlay: str):
    docs = _render(f"overlays/{overlay}")
    container = _container(docs)
    env = _env(container)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = _server_config(docs)
    # what the server binds: the entrypoint's flags override the config
    assert ports["thrift"] == int(env.get("DAGSERVE_PORT", config.port))
    assert ports["metrics"] == int(env.get("DAGSERVE_METRICS_PORT", config.metrics_port or 0))
    assert env["DAGSERVE_HOST"] == "0.0.0.0"  # the kubelet probes the pod's address
    # the Service "dagserve" would otherwise inject DAGSERVE_PORT=tcp://... (service links)
    assert _one(docs, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert env["DAGSERVE_CONFIG"].startswith("/etc/dagserve/")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(Path(env["DAGSERVE_CONFIG"]).parent)]["readOnly"] is True

    ready, health = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert (ready["path"], health["path"]) == ("/readyz", "/healthz")
    for probe in (ready, health, container["startupProbe"]["httpGet"]):
        assert probe["port"] in ("metrics", ports["metrics"])
    # the routes answer as the probes need: readiness follows loading, liveness does not
    loading = MetricsServer(Metrics(), lambda: False)
    assert loading._route("GET", "/readyz")[0].startswith("503")
    assert loading._route("GET", "/healthz")[0].startswith("200")
    assert MetricsServer(Metrics(), lambda: True)._route("GET", "/readyz")[0].startswith("200")

    for service in (d for d in docs if d["kind"] == "Service"):
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
    headless = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1
    assert not headless[0]["spec"].get("publishNotReadyAddresses")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_grace_period_outlasts_the_prestop_sleep_and_the_drain(overlay: str):
    docs = _render(f"overlays/{overlay}")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = _server_config(docs).drain_timeout_s  # the config's value, else ServerConfig's
    assert pod["terminationGracePeriodSeconds"] >= float(command[1]) + drain + 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pod_is_locked_down_and_sized(overlay: str):
    docs = _render(f"overlays/{overlay}")
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _containerfile_user()
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1
    assert "emptyDir" in volumes[tmp[0]["name"]]
    models = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
    assert len(models) == 1
    assert models[0]["readOnly"] is True
    resources = container["resources"]
    assert resources["requests"]["cpu"]
    assert resources["requests"]["memory"]
    assert resources["limits"]["memory"] == resources["requests"]["memory"]
    # a worker is replaced before the container would be OOM-killed
    limit_mb = _quantity_mb(resources["limits"]["memory"])
    config = _server_config(docs)
    assert config.worker_memory_limit_mb is not None
    assert config.worker_memory_limit_mb < limit_mb
    image = container["image"]
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
        assert image.endswith("-gpu")
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
        assert pod["nodeSelector"]
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
        assert image.endswith("-cpu")


def _quantity_mb(text: str) -> float:
    units = {"Gi": 1024, "Mi": 1, "G": 1e9 / 2**20, "M": 1e6 / 2**20}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * scale
    return float(text) / 2**20


def test_the_pdb_selects_the_deployments_pods():
    docs = _render("base")
    pdb = _one(docs, "PodDisruptionBudget")
    pod_labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_dashboard_config_map_is_generated_from_the_json():
    maps = [d for d in _render("base") if "dagserve-dashboard.json" in d.get("data", {})]
    assert len(maps) == 1
    assert maps[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = DEPLOY / "grafana" / "dagserve-dashboard.json"
    assert maps[0]["data"]["dagserve-dashboard.json"] == source.read_text(encoding="utf-8")
    assert not [p for p in KUBE.rglob("*.json")], "the dashboard is generated, never copied"


# --- metric names -----------------------------------------------------------------------------


@functools.cache
def _series() -> frozenset[str]:
    """The series names Prometheus stores for every family metrics.py declares.

    Read from the source (the first argument of each Counter, Gauge, Histogram or
    *MetricFamily call) so that the families only a live engine or a GPU yields count too.
    """
    tree = ast.parse((ROOT / "engine" / "observability" / "metrics.py").read_text())
    series: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else ""
        first = node.args[0]
        if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
            continue
        if name in ("Counter", "CounterMetricFamily"):
            series.add(first.value + "_total")
        elif name in ("Gauge", "GaugeMetricFamily"):
            series.add(first.value)
        elif name == "Histogram":
            series.update(first.value + s for s in ("_bucket", "_sum", "_count"))
    return frozenset(series)


def test_series_read_from_the_source_include_what_a_registry_exports():
    """The AST reading above agrees with prometheus_client for the static families."""
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    families = list(Metrics().registry.collect())
    assert len(families) > 10
    exported = {f.name + suffix for f in families for suffix in suffixes[f.type]}
    assert exported <= _series()
    assert {"dagserve_inflight_requests", "dagserve_model_queue_length"} <= _series()


_METRIC = re.compile(r"\bdagserve_[a-z0-9_]+")


def _adapter_rules() -> list[dict[str, Any]]:
    config_map = _one(_render("prometheus-adapter"), "ConfigMap")
    rules = yaml.safe_load(config_map["data"]["config.yaml"])["rules"]
    assert rules
    return rules  # type: ignore[no-any-return]


def test_adapter_rules_name_existing_series():
    for rule in _adapter_rules():
        names = set(_METRIC.findall(rule["seriesQuery"] + rule["name"]["matches"]))
        assert names, rule
        assert names <= _series(), f"unknown metric in an adapter rule: {names - _series()}"
        assert {"<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"} <= set(
            re.findall(r"<<\.\w+>>", rule["metricsQuery"])
        )
        assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}


def test_the_hpa_asks_for_pods_metrics_the_adapter_serves():
    served = {rule["name"]["as"] for rule in _adapter_rules()}
    hpa = _one(_render("overlays/cpu"), "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    metrics = hpa["spec"]["metrics"]
    assert metrics
    assert all(m["type"] == "Pods" for m in metrics)
    for metric in metrics:
        assert metric["pods"]["metric"]["name"] in served
    assert hpa["spec"]["scaleTargetRef"]["name"] == "dagserve"


def test_keda_queries_name_existing_series():
    for trigger in _one(_render("overlays/gpu"), "ScaledObject")["spec"]["triggers"]:
        names = set(_METRIC.findall(trigger["metadata"]["query"]))
        assert names, trigger
        assert names <= _series(), f"unknown metric in a KEDA query: {names - _series()}"


def test_an_unknown_metric_name_is_caught():
    """The checks above can fail: a misspelt family is not among the series."""
    assert "dagserve_inflight_request" not in _series()
    assert "dagserve_requests" not in _series()  # a counter is stored as _total


# --- the image --------------------------------------------------------------------------------


def _containerfile() -> list[str]:
    """The instructions of deploy/Containerfile, continuation lines joined."""
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _containerfile_user() -> int:
    users = [line.split()[1] for line in _containerfile() if line.startswith("USER ")]
    assert len(users) == 1
    return int(users[0].split(":")[0])


def test_containerfile_is_multi_stage_slim_non_root_and_execs_the_entrypoint():
    lines = _containerfile()
    args = {line.split()[1].split("=")[0]: line for line in lines if line.startswith("ARG ")}
    assert "python:3.11-slim" in args["PYTHON_IMAGE"]
    assert "EXTRAS" in args
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert all("${PYTHON_IMAGE}" in s for s in stages)
    final = lines[lines.index(stages[-1]) :]
    assert any(line.startswith("COPY --from=build ") for line in final)
    assert _containerfile_user() != 0
    entrypoint = [line for line in final if line.startswith("ENTRYPOINT ")]
    assert entrypoint == ['ENTRYPOINT ["/usr/local/bin/dagserve-entrypoint"]']  # exec form
    assert "COPY deploy/entrypoint.sh /usr/local/bin/dagserve-entrypoint" in final
    # every source the build copies exists, and .dockerignore lets it through
    ignore = (ROOT / ".dockerignore").read_text().split()
    for line in lines:
        if line.startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source}" in ignore, f".dockerignore leaves out {source}"
    assert (DEPLOY / "entrypoint.sh").stat().st_mode & 0o111, "entrypoint.sh not executable"


def test_entrypoint_refuses_a_missing_config(tmp_path: Path):
    done = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh")],
        env={**os.environ, "DAGSERVE_CONFIG": str(tmp_path / "absent.yaml")},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "absent.yaml" in done.stderr


def test_entrypoint_refuses_a_port_that_is_not_a_number(tmp_path: Path):
    """What service links inject for a Service named dagserve."""
    config = tmp_path / "dagserve.yaml"
    config.write_text("pipelines: []\n")
    done = subprocess.run(
        ["sh", str(DEPLOY / "entrypoint.sh")],
        env={**os.environ, "DAGSERVE_CONFIG": str(config), "DAGSERVE_PORT": "tcp://10.0.0.7:9090"},
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "DAGSERVE_PORT must be a port number (got 'tcp://10.0.0.7:9090')" in done.stderr


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


BUILD_MODEL = """
import sys, torch
torch.jit.save(torch.jit.trace(torch.nn.Linear(4, 2), torch.zeros(1, 4)), sys.argv[1])
"""


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.frameworks
def test_entrypoint_serves_the_mounted_config_and_drains_on_sigterm(tmp_path: Path):
    """The pod's layout: the ConfigMap's files in one folder, the model files in another.

    The only change to the base's files: the pipeline's absolute ``/models/`` becomes this
    test's models folder.
    """
    from engine.tools.ports import free_port
    from engine.transport.client import Client

    config_dir, models = tmp_path / "etc-dagserve", tmp_path / "models"
    config_dir.mkdir()
    for source in (KUBE / "base" / "config").iterdir():
        text = source.read_text(encoding="utf-8").replace("/models/", f"{models}/")
        (config_dir / source.name).write_text(text, encoding="utf-8")
    model = models / "scorer" / "1" / "model.pt"
    model.parent.mkdir(parents=True)
    # torch in a process of its own: the test process imports no framework
    subprocess.run([sys.executable, "-c", BUILD_MODEL, str(model)], check=True, timeout=120)

    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DAGSERVE_CONFIG": str(config_dir / "dagserve.yaml"),
        "DAGSERVE_HOST": "127.0.0.1",
        "DAGSERVE_PORT": str(port),
        "DAGSERVE_METRICS_PORT": str(metrics_port),
        "TMPDIR": str(tmp_path),
    }
    process = subprocess.Popen(
        ["sh", str(DEPLOY / "entrypoint.sh")], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{metrics_port}"
        deadline = time.monotonic() + 90
        while _get_or_none(base + "/readyz") != 200:
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "not ready within 90 s"
            time.sleep(0.2)
        assert _get(base + "/healthz")[0] == 200
        # exec: the shell became the server, so the kubelet's SIGTERM reaches it
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
        assert b"serve" in cmdline
        assert not cmdline[0].endswith(b"sh")
        with Client("127.0.0.1", port, timeout_s=30) as client:
            result = client.infer("scorer", {"x": np.ones((3, 4), np.float32)})
        assert result.outputs["y"].shape == (3, 2)
        # the model id the KEDA query names is the one the server exports
        metrics = _get(base + "/metrics")[1]
        scaled = _one(_render("overlays/gpu"), "ScaledObject")["spec"]["triggers"]
        models_queried = {
            m for t in scaled for m in re.findall(r'model="([^"]+)"', t["metadata"]["query"])
        }
        assert models_queried
        for model_id in models_queried:
            assert f'dagserve_model_queue_length{{model="{model_id}"}}' in metrics

        drain = _server_config(_render("base")).drain_timeout_s
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=drain + 15)
        assert process.returncode == 0, output
        assert time.monotonic() - started < drain + 15
        assert "dagserve stopped" in output
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def _get_or_none(url: str) -> int | None:
    try:
        return _get(url)[0]
    except OSError:
        return None
