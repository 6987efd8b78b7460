"""The server configuration: a YAML file, or defaults plus pipeline files from the command line.

::

    host: 127.0.0.1
    port: 9090
    pipelines: [pipelines/post_understanding.yaml]   # relative to this file
    max_frame_bytes: 67108864
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from engine.errors import ConfigError
from engine.runtime.devices import GpuConfig

#: 64 MiB: a 32-image batch of 3x224x224 float32 is 19 MiB
DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024


class TlsConfig(BaseModel):
    """TLS on the Thrift port, optionally requiring client certificates (mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    certfile: Path
    """The server's certificate chain (PEM)."""
    keyfile: Path
    """The server's private key (PEM)."""
    client_ca: Path | None = None
    """CA certificates that client certificates must chain to."""
    require_client_cert: bool = False
    """Refuse clients without a certificate signed by ``client_ca`` (mutual TLS)."""

    def server_context(self) -> ssl.SSLContext:
        """The server-side SSL context these settings describe."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.certfile, self.keyfile)
            if self.client_ca is not None:
                context.load_verify_locations(self.client_ca)
        except (OSError, ssl.SSLError) as exc:
            msg = f"tls: cannot load the certificate, key or CA: {exc}"
            raise ConfigError(msg) from exc
        if self.require_client_cert:
            if self.client_ca is None:
                msg = "tls: require_client_cert needs client_ca"
                raise ConfigError(msg)
            context.verify_mode = ssl.CERT_REQUIRED
        return context


class TracingConfig(BaseModel):
    """Where ``dagserve serve`` sends its spans (OTLP); the ``OTEL_*`` environment variables
    configure the same without a config file (``engine.observability.otel``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str
    """The collector: ``http://collector:4318`` (http/protobuf; ``/v1/traces`` is added) or
    ``http://collector:4317`` (grpc; ``https://`` for TLS)."""
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    """OTLP over HTTP (protobuf bodies) or over gRPC."""
    service_name: str | None = None
    """``service.name`` of the spans; None: ``OTEL_SERVICE_NAME``, else ``dagserve``."""
    sample_ratio: float = Field(1.0, ge=0, le=1)
    """The share of traces recorded that no caller decided on (a caller's sampled flag is
    followed: parent-based)."""


class RayConfig(BaseModel):
    """Model workers as actors of a Ray cluster (README, "Workers on a Ray cluster").

    With this key every model worker of the server is a Ray actor, placed by Ray; without it
    nothing of Ray is imported.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: str
    """The cluster: ``host:port`` of its head (GCS), or ``auto`` (the cluster this machine is
    part of, as ``ray.init(address="auto")`` finds it)."""
    namespace: str | None = None
    """The Ray namespace of the server's actors; None: an anonymous one."""
    node_ip_address: str | None = None
    """This process's IP as the cluster sees it (Ray's ``_node_ip_address``); None: Ray's
    guess.  A loopback cluster needs ``127.0.0.1``."""
    num_cpus: float = Field(1.0, gt=0)
    """CPUs each worker actor asks for; its models' compute threads share them (as a local
    worker's share its cores, README "Threads in a worker")."""
    start_timeout_s: float = Field(60.0, gt=0)
    """How long a worker's actor may wait to be placed (and to start) before the pipeline is
    refused with what it asked for and what the cluster has."""
    actor_max_concurrency: int = Field(64, ge=12)
    """Threads of each actor: at least the instances of its models plus a few for loads and
    pings (calls past it queue in Ray)."""


class ServerConfig(BaseModel):
    """Settings of one ``dagserve serve``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    """Address to listen on; loopback by default (see the README on what the server trusts)."""
    port: int = Field(9090, ge=0, le=65535)
    """Thrift port; 0 picks a free one (logged at startup)."""
    metrics_port: int | None = Field(None, ge=0, le=65535)
    """Prometheus ``/metrics`` port (with ``/healthz`` and ``/readyz``); None = not served."""
    pipelines: list[Path] = Field(default_factory=list)
    """Pipeline YAML files, relative to the config file."""
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, ge=1024)
    """Largest Thrift frame accepted; a larger one closes that connection before it is read."""
    idle_timeout_s: float | None = Field(None, gt=0)
    """Close a connection idle this long between requests; None = never."""
    thread_pool_size: int = Field(8, ge=1)
    """Threads for nodes that run in the thread pool (and for loading plugins)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "text", "json"] = "auto"
    """``auto``: readable text on a terminal, JSON lines otherwise."""
    max_inflight: int | None = Field(4096, ge=1)
    """Requests executing at once, server-wide; past it a request is answered Overloaded
    at once (each model's `batching.max_queue` bounds its own queue too).  None: no limit."""
    drain_timeout_s: float = Field(10.0, ge=0)
    """On SIGTERM, how long requests in flight may take to finish before they are cancelled."""
    slow_request_ms: float | None = Field(1000.0, gt=0)
    """Requests slower than this are logged with their per-node breakdown; None: never."""
    worker_ping_interval_s: float = Field(1.0, gt=0)
    """How often the supervisor pings each worker process."""
    worker_ping_timeout_s: float = Field(5.0, gt=0)
    """A worker that does not answer a ping this fast is killed and replaced."""
    worker_restart_wait_s: float = Field(30.0, gt=0)
    """How long a request waits for its worker to come back after a crash."""
    worker_memory_limit_mb: float | None = Field(None, gt=0)
    """A worker whose resident memory grows past this is replaced (checked at every ping)."""
    quarantine_after_crashes: int | None = Field(3, ge=1)
    """A model whose calls crash its worker this many times within ``quarantine_window_s`` is
    quarantined: its requests fail at once and it is not loaded into the replacement worker,
    until the server restarts.  None: never."""
    quarantine_window_s: float = Field(300.0, gt=0)
    """The window over which a model's crashes are counted for ``quarantine_after_crashes``."""
    worker_threads: Literal["auto"] | PositiveInt = "auto"
    """Intra-op threads of each model instance in a worker (torch/OpenMP, BLAS, Paddle, TF).
    ``auto``: a worker's cores (its CPU affinity, capped by a cgroup quota) shared among the
    instances it holds, ``max(1, cores // instances)`` each (README, "Threads in a worker")."""
    front_processes: Literal["auto"] | PositiveInt = 1
    """Processes that serve the Thrift port (README, "Front processes"): the first loads the
    models and batches them; the others decode, check and run the DAG of their connections'
    requests and send model items to the first.  ``auto``: one per core, at most 8."""
    tls: TlsConfig | None = None
    """TLS on the Thrift port; None: plain TCP (the default, meant for loopback)."""
    admin_port: int | None = Field(None, ge=0, le=65535)
    """The admin (model lifecycle) Thrift port, on ``host``; None: not served (the default);
    0 picks a free one.  Off a loopback host it needs ``admin_token_file`` or mutual TLS."""
    admin_token_file: Path | None = None
    """A file whose content (whitespace stripped) every admin call must carry as its token."""
    admin_require_client_cert: bool = False
    """The admin port accepts only clients with a certificate from ``admin_client_ca`` (or
    ``tls.client_ca``); needs ``tls``."""
    admin_client_ca: Path | None = None
    """CA certificates for admin clients; None: ``tls.client_ca``."""
    watch: bool = False
    """Poll the pipeline files and their model files; reload a version whose files changed."""
    watch_interval_s: float = Field(2.0, gt=0)
    """How often ``watch`` polls; a change must also stay the same for one interval."""
    gpus: list[GpuConfig] | None = None
    """An explicit GPU inventory (tests, or to reserve cards); None: read the GPUs via NVML."""
    gpu_reserve_mb: int = Field(0, ge=0)
    """Memory per GPU that placement leaves free (for the CUDA context and fragmentation)."""
    tracing: TracingConfig | None = None
    """Export spans over OTLP; None: as the ``OTEL_*`` environment says (off without it)."""
    state_file: Path | None = None
    """Where the model lifecycle keeps traffic weights, shadow, sticky header and the versions
    loaded at runtime (JSON, replaced atomically after every change), restored at startup;
    relative to the config file.  None: nothing survives a restart."""
    registry_uri: str | None = None
    """The MLflow tracking (and model registry) URI that ``models:/`` model names resolve
    against; None: ``MLFLOW_TRACKING_URI``, else the embedded sqlite store
    (``~/.local/share/dagserve/registry``; see ``engine.runtime.registry``)."""
    model_cache_dir: Path | None = None
    """Where registry and URI models are downloaded (one folder per version), relative to the
    config file; None: ``~/.cache/dagserve/models``."""
    ray: RayConfig | None = None
    """Run every model worker as an actor of this Ray cluster; None: local worker processes."""


def load_config(path: Path) -> ServerConfig:
    """Read a server config file; pipeline paths become relative to its folder.

    Raises:
        ConfigError: unreadable file, bad YAML, unknown key or bad value (all named).
    """
    try:
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        msg = f"{path}: cannot read server config: {exc}"
        raise ConfigError(msg) from exc
    if not isinstance(data, dict):
        msg = f"{path}: a server config must be a mapping (got {type(data).__name__})"
        raise ConfigError(msg)
    try:
        config = ServerConfig.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']} (got {e.get('input')!r})"
            for e in exc.errors()
        ]
        msg = f"{path}: invalid server config:\n  " + "\n  ".join(lines)
        raise ConfigError(msg) from exc
    base = path.parent
    update: dict[str, Any] = {"pipelines": [base / p for p in config.pipelines]}
    if config.tls is not None:  # certificate paths are relative to the config file too
        tls = config.tls
        update["tls"] = tls.model_copy(
            update={
                "certfile": base / tls.certfile,
                "keyfile": base / tls.keyfile,
                "client_ca": base / tls.client_ca if tls.client_ca else None,
            }
        )
    for key in ("admin_token_file", "admin_client_ca"):  # relative to the config file too
        value = getattr(config, key)
        if value is not None:
            update[key] = base / value
    if config.state_file is not None:
        update["state_file"] = base / config.state_file
    if config.model_cache_dir is not None:
        update["model_cache_dir"] = base / config.model_cache_dir
    return config.model_copy(update=update)


def is_server_config(path: Path) -> bool:
    """Whether a YAML file is a server config (has ``pipelines:``) rather than a pipeline."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "pipelines" in data and "nodes" not in data


__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "RayConfig",
    "ServerConfig",
    "TracingConfig",
    "is_server_config",
    "load_config",
]
