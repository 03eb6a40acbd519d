#!/usr/bin/env bash
# Run the whole suite. The tests start the servers they use themselves (an
# embedded Postgres + pgvector per test session). pytest's exit code 5 (no tests
# collected) is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
