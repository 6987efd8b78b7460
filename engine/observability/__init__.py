"""What the on-call engineer sees: Prometheus ``metrics`` (and the ``http`` endpoints that
serve them with ``/healthz`` and ``/readyz``), JSON ``logs`` and OpenTelemetry ``tracing``."""
