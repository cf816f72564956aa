#!/usr/bin/env bash
# The main job on the embedded synthetic default: synth -> shard -> read back.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-demo-out}"
if [ ! -f "$OUT/data/train_test_split/train_list.txt" ]; then
  rm -rf "$OUT/data"
  wildreid synth "$OUT/data" --train-vehicles 200 --test-vehicles 60 --images-per-vehicle 8 --seed 0 --workers 2 \
    --preview "$OUT/synth_grid.png"
fi
wildreid shard "$OUT/data" "$OUT/shards" --max-samples 400 --workers 2
wildreid shard --verify "$OUT/shards"
wildreid inspect "$OUT/shards" --workers 2
