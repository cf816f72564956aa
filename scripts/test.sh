#!/usr/bin/env bash
# The test suite: sets up .venv if needed, checks lint and formatting (ruff, configured in pyproject.toml),
# then runs pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
"$PY" -m ruff check --quiet . || { echo "ruff check failed: run '$PY -m ruff check --fix .'" >&2; exit 1; }
"$PY" -m ruff format --check --quiet . || { echo "ruff format: run '$PY -m ruff format .'" >&2; exit 1; }
exec "$PY" -m pytest "$@"
