"""Spans that leave the pod: the OpenTelemetry SDK, set up by ``dagserve serve`` when asked.

Tracing is on when the server config has a ``tracing:`` section, or when the environment
asks the standard way: ``OTEL_TRACES_EXPORTER=otlp`` (or ``console``), or an
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set.  The other
``OTEL_*`` variables mean what the OpenTelemetry specification says, read by the SDK itself:
``OTEL_EXPORTER_OTLP_PROTOCOL`` (``http/protobuf``, the default, or ``grpc``),
``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` and its
``_ARG``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``; ``OTEL_SDK_DISABLED=true`` turns it
off.  (The specification's default exporter is ``otlp``; a server that sends nothing until
told to is the safer default, so an unset ``OTEL_TRACES_EXPORTER`` with no endpoint is off.)

Off, OpenTelemetry is never imported: the request and node spans of
``engine.observability.tracing`` are no-ops, and trace contexts are still continued in the
log lines.  A provider set before (``opentelemetry-instrument dagserve serve``) is kept.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from engine.config import TracingConfig
from engine.errors import ConfigError
from engine.observability.tracing import disable_opentelemetry

logger = logging.getLogger(__name__)

#: the exporters ``OTEL_TRACES_EXPORTER`` may name
EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_INSTALL = "pip install 'dagserve[otel]'"


def exporters_asked(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; empty: tracing off.

    >>> exporters_asked({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    ['otlp']
    >>> exporters_asked({"OTEL_TRACES_EXPORTER": "none"}), exporters_asked({})
    ([], [])

    Raises:
        ConfigError: an exporter dagserve does not have.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    if names is None:
        return ["otlp"] if any(environ.get(key) for key in _ENDPOINTS) else []
    asked = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in asked if n not in EXPORTERS]
    if unknown:
        msg = f"OTEL_TRACES_EXPORTER: unknown exporter {unknown[0]!r} (known: otlp, console, none)"
        raise ConfigError(msg)
    return asked


def env_protocol(environ: Mapping[str, str]) -> str:
    """``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL``, else ``OTEL_EXPORTER_OTLP_PROTOCOL``, else
    ``http/protobuf``.

    Raises:
        ConfigError: another protocol (``http/json`` is not supported).
    """
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    protocol = protocol.strip()
    if protocol not in PROTOCOLS:
        msg = f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is unsupported: http/protobuf or grpc"
        raise ConfigError(msg)
    return protocol


def configure_tracing(
    config: TracingConfig | None, environ: Mapping[str, str] | None = None
) -> Any | None:
    """Set the process's OpenTelemetry tracer provider as ``config`` or the environment say.

    Returns:
        The SDK ``TracerProvider`` set (shut it down to flush), or None: tracing off (then
        OpenTelemetry is never imported), or a provider was already set.

    Raises:
        ConfigError: a bad ``OTEL_*`` value, or the ``otel`` extra is not installed.
    """
    environ = os.environ if environ is None else environ
    asked = ["otlp"] if config is not None else exporters_asked(environ)
    if not asked:
        disable_opentelemetry()
        return None
    protocol = config.protocol if config is not None else env_protocol(environ)
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        msg = f"tracing is configured, but the OpenTelemetry SDK is not installed: {_INSTALL}"
        raise ConfigError(msg) from exc
    current = trace.get_tracer_provider()
    if type(current).__name__ not in ("ProxyTracerProvider", "NoOpTracerProvider"):
        logger.info("tracing: keeping the tracer provider already set (%s)", type(current).__name__)
        return None
    attributes: dict[str, str] = {}
    if config is not None and config.service_name:
        attributes[SERVICE_NAME] = config.service_name
    elif not environ.get("OTEL_SERVICE_NAME") and "service.name=" not in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes[SERVICE_NAME] = "dagserve"
    # sampler None: the SDK reads OTEL_TRACES_SAMPLER (parent-based, always on by default)
    sampler = ParentBased(TraceIdRatioBased(config.sample_ratio)) if config is not None else None
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    for name in asked:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, protocol, config)))
    trace.set_tracer_provider(provider)
    where = config.endpoint if config is not None else _env_endpoint(environ)
    service = provider.resource.attributes.get(SERVICE_NAME)
    logger.info(
        "tracing: exporting spans (%s) as service %s",
        ", ".join(f"otlp {protocol} to {where}" if n == "otlp" else n for n in asked),
        service,
    )
    return provider


def _env_endpoint(environ: Mapping[str, str]) -> str:
    for key in reversed(_ENDPOINTS):
        if environ.get(key):
            return environ[key]
    return "the default endpoint"


def _exporter(name: str, protocol: str, config: TracingConfig | None) -> Any:
    """An exporter; with ``config`` None, the exporter reads its ``OTEL_*`` settings itself."""
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    package = f"opentelemetry-exporter-otlp-proto-{'grpc' if protocol == 'grpc' else 'http'}"
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcExporter,
            )
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter as HttpExporter,
            )
    except ImportError as exc:
        msg = f"tracing over OTLP {protocol} needs {package}: {_INSTALL}"
        raise ConfigError(msg) from exc
    if protocol == "grpc":
        if config is None:
            return GrpcExporter()
        return GrpcExporter(endpoint=config.endpoint, insecure=config.endpoint.startswith("http:"))
    if config is None:
        return HttpExporter()
    # an endpoint given in code is used as it is: the signal's path is added here, as the
    # SDK adds it to OTEL_EXPORTER_OTLP_ENDPOINT
    return HttpExporter(endpoint=config.endpoint.rstrip("/") + "/v1/traces")


@contextmanager
def exporting_traces(config: TracingConfig | None) -> Iterator[None]:
    """Tracing set up for the block (``dagserve serve``); the spans left are flushed at its
    end, bounded by the exporter's timeout."""
    provider = configure_tracing(config)
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


__all__ = ["configure_tracing", "env_protocol", "exporters_asked", "exporting_traces"]
