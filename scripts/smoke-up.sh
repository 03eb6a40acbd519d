#!/usr/bin/env bash
# The README's first command, checked: `make up` in a fresh data directory
# must print a URL and a demo token, and /ready must answer 200; then the
# platform smoke test (`ragplane smoke`): a question about the demo knowledge
# base gets citations, and the same question again is a cache hit. Prints how
# long it took from the command to ready.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${SMOKE_PORT:-18080}
data=$(mktemp -d)
log=$(mktemp)
start=$(date +%s.%N)
make up ARGS="--port $port --data-dir $data" >"$log" 2>&1 &
pid=$!
cleanup() { kill -TERM "$pid" 2>/dev/null || true; pkill -TERM -f "ragplane up --port $port" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
for _ in $(seq 1 600); do
  if grep -q "ragplane is ready" "$log"; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$log"; echo "make up exited early" >&2; exit 1; fi
  sleep 0.2
done
grep -q "ragplane is ready" "$log" || { cat "$log"; echo "make up did not become ready" >&2; exit 1; }
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/ready")
ready=$(date +%s.%N)
token=$(grep -E '^eyJ' "$log" | tail -n 1)
[ -n "$token" ] || { cat "$log"; echo "no demo token printed" >&2; exit 1; }
tenant=$(curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$port/v1/whoami" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tenant_id"])')
echo "make up: ready in $(python3 -c "print(round($ready - $start, 1))") s; /ready -> $code; demo token -> $tenant"
{ [ "$code" = 200 ] && [ "$tenant" = tnt_acme_eu ]; } || { cat "$log"; echo "not ready or wrong demo tenant" >&2; exit 1; }
.venv/bin/ragplane smoke "http://127.0.0.1:$port" --tenant tnt_acme_eu
