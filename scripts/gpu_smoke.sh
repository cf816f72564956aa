#!/usr/bin/env bash
# The CUDA smoke run (at most ~8 minutes on one GPU): decode, train, eval and k-NN on the GPU against the CPU,
# one table. Needs only the project's install; WILDREID_VENV may name an environment that already has CUDA torch.
# `bash scripts/gpu_smoke.sh --cpu-only` runs the same checks with the CPU on both sides (a test of the script).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
exec "$PY" scripts/gpu_smoke.py "$@"
