#!/bin/sh
# Docker HEALTHCHECK for both roles, without knowing which one runs: the API answers /health on
# DITSTREAM_PORT; a worker answers /health on DITSTREAM_WORKER_HEALTH_PORT, with 503 once its
# engine died (so the container is restarted). DITSTREAM_HEALTHCHECK_URL overrides both.
set -eu
if [ -n "${DITSTREAM_HEALTHCHECK_URL:-}" ]; then
  exec curl -fsS --max-time 4 -o /dev/null "$DITSTREAM_HEALTHCHECK_URL"
fi
curl -fsS --max-time 4 -o /dev/null "http://127.0.0.1:${DITSTREAM_PORT:-8000}/health" 2>/dev/null && exit 0
exec curl -fsS --max-time 4 -o /dev/null "http://127.0.0.1:${DITSTREAM_WORKER_HEALTH_PORT:-9100}/health"
