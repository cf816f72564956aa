#!/usr/bin/env bash
# The test suite: sets up .venv if needed, then runs pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$PY" -m pytest "$@"
