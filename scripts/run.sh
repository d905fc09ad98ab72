#!/usr/bin/env bash
# `make run`: the gateway on its embedded defaults, with the fake upstream as its
# demo provider. Stops both with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
UPSTREAM_PORT=${UPSTREAM_PORT:-9100}

$PY manage.py migrate --no-input -v 0
$PY -m relay.fake_upstream --host 127.0.0.1 --port "$UPSTREAM_PORT" > var/fake-upstream.log 2>&1 &
upstream=$!
trap 'kill $upstream 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 50); do
  curl -sf "http://127.0.0.1:$UPSTREAM_PORT/health" > /dev/null && break
  sleep 0.1
done
$PY manage.py demo --url "http://$HOST:$PORT"
# --no-proxy-headers: X-Forwarded-For is the gateway's to judge (GATEWAY_TRUSTED_PROXIES).
.venv/bin/uvicorn gateway_project.asgi:application --host "$HOST" --port "$PORT" \
  --no-access-log --no-proxy-headers
