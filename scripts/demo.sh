#!/usr/bin/env bash
# The main job on the synthetic default: synth -> shard -> read back -> baseline -> train -> eval -> pictures.
# Re-running continues where it stopped (every stage is resumable).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
OUT="${DEMO_OUT:-demo-out}"
BUDGET="${DEMO_BUDGET:-2GiB}"
if [ ! -f "$OUT/data/train_test_split/train_list.txt" ]; then
  rm -rf "$OUT/data"
  wildreid synth "$OUT/data" --train-vehicles 200 --test-vehicles 60 --images-per-vehicle 8 --seed 0 --workers 2 \
    --preview "$OUT/synth_grid.png"
fi
wildreid shard "$OUT/data" "$OUT/shards" --max-samples 400 --workers 2
wildreid shard --verify "$OUT/shards"
wildreid inspect "$OUT/shards" --workers 2

resume() { [ -d "$1/train" ] && echo --resume || true; }
# the untrained baseline, then camera-aware SSML-FD training with the demo config (a few minutes on 2 cores)
wildreid train --shards "$OUT/shards" --store "$OUT/baseline" --config configs/demo.yaml --epochs 0 \
  --memory-budget "$BUDGET" $(resume "$OUT/baseline")
wildreid train --shards "$OUT/shards" --store "$OUT/run" --config configs/demo.yaml \
  --memory-budget "$BUDGET" $(resume "$OUT/run")
# the standard protocol, then with each camera's mean feature removed (eval --camera-norm; features reused)
for run in baseline run; do
  wildreid eval --shards "$OUT/shards" --checkpoint "$OUT/$run/train/model.pt" --split all \
    --memory-budget "$BUDGET" --json | tail -n 1 > "$OUT/$run-eval.json"
  wildreid eval --shards "$OUT/shards" --checkpoint "$OUT/$run/train/model.pt" --split all --camera-norm \
    --memory-budget "$BUDGET" --json | tail -n 1 > "$OUT/$run-eval-camnorm.json"
done
"$PY" - "$OUT" <<'PYEOF'
import json, sys
out = sys.argv[1]
print("| split | protocol | model | mAP | mINP | rank-1 | rank-5 | rank-10 | valid queries |")
print("|---|---|---|---:|---:|---:|---:|---:|---:|")
for tag, protocol in (("", "standard"), ("-camnorm", "camera-normalised")):
    base, run = (json.load(open(f"{out}/{name}-eval{tag}.json")) for name in ("baseline", "run"))
    for split in run:
        for name, res in (("untrained (--epochs 0)", base[split]), ("camera-aware SSML-FD, configs/demo.yaml", run[split])):
            print(f"| {split} | {protocol} | {name} | {res['mAP']:.3f} | {res['mINP']:.3f} | {res['rank1']:.3f} "
                  f"| {res['rank5']:.3f} | {res['rank10']:.3f} | {res['valid_queries']} |")
PYEOF
wildreid visualize --shards "$OUT/shards" --query "$OUT/run/train/features/query-small" \
  --gallery "$OUT/run/train/features/gallery-small" --query-split query-small --gallery-split gallery-small \
  --num 4 --k 8 --out "$OUT/ranked_lists.png" --history "$OUT/run/train/history.jsonl" --curves "$OUT/curves.png"
echo "pictures: $OUT/ranked_lists.png $OUT/curves.png $OUT/run/train/eval-small-cmc.png"
