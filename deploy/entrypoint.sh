#!/bin/sh
# The container's entrypoint: `dagserve serve` on the mounted server config.
#
#   DAGSERVE_CONFIG        the server config (default /etc/dagserve/dagserve.yaml, the ConfigMap)
#   DAGSERVE_HOST          address to listen on (default 0.0.0.0: probes and Services reach it)
#   DAGSERVE_PORT          Thrift port (default: the config's, else 9090)
#   DAGSERVE_METRICS_PORT  /metrics, /healthz, /readyz (default: the config's, else 9100)
#   DAGSERVE_ADMIN_PORT    the admin (lifecycle) port (default: the config's, else none)
#
# Arguments are passed on to `dagserve serve` after these (e.g. --log-level debug).  `exec`
# makes the server PID 1's process itself, so the kubelet's SIGTERM reaches it and drains.
set -eu

config="${DAGSERVE_CONFIG:-/etc/dagserve/dagserve.yaml}"
if [ ! -r "$config" ]; then
    echo "entrypoint: no server config at $config (mount one, or set DAGSERVE_CONFIG)" >&2
    exit 2
fi

# a Service named "dagserve" injects DAGSERVE_PORT=tcp://<ip>:<port> into pods with service
# links on: refuse anything but a number, naming the variable
for name in DAGSERVE_PORT DAGSERVE_METRICS_PORT DAGSERVE_ADMIN_PORT; do
    eval "value=\${$name:-}"
    case "$value" in
        *[!0-9]*)
            echo "entrypoint: $name must be a port number (got '$value')" >&2
            exit 2 ;;
    esac
done

set -- "$config" --host "${DAGSERVE_HOST:-0.0.0.0}" "$@"
if [ -n "${DAGSERVE_PORT:-}" ]; then set -- "$@" --port "$DAGSERVE_PORT"; fi
# the probes need the metrics port: on unless the config or the environment names one
if [ -n "${DAGSERVE_METRICS_PORT:-}" ]; then
    set -- "$@" --metrics-port "$DAGSERVE_METRICS_PORT"
elif ! grep -Eq '^metrics_port:' "$config"; then
    set -- "$@" --metrics-port 9100
fi
if [ -n "${DAGSERVE_ADMIN_PORT:-}" ]; then set -- "$@" --admin-port "$DAGSERVE_ADMIN_PORT"; fi

exec dagserve serve "$@"
