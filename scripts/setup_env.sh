# Sourced by demo.sh and test.sh: make sure .venv exists and holds this checkout, installed.
# torch/torchvision are pinned to the builds this environment ships wheels for (see README).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${WILDREID_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
fi
stamp="$VENV/.wildreid-install"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $ROOT"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing wildreid and its dependencies into $VENV (first run takes a few minutes)" >&2
  "$PY" -m pip install -q --disable-pip-version-check "torch==${WILDREID_TORCH:-2.14.1}" "torchvision==${WILDREID_TORCHVISION:-0.29.1}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$PY" -c "import wildreid, torch, torchvision, faiss, zarr, webdataset, dask, onnxscript, onnxruntime, tensorboard" || { echo "installation failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
# wildreid's own bytecode, written once: where PYTHONDONTWRITEBYTECODE is set (as on the development machine)
# every command would compile ~16,000 lines again at start (1-1.5 s on 2 cores); compileall skips what is current.
"$PY" -m compileall -q "$ROOT/pipeline" "$ROOT/shards" "$ROOT/stores" "$ROOT/core" > /dev/null
