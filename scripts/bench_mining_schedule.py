"""Benchmark: pseudo-label precision of DPLM mined once per epoch against DPLM mined for every batch.

The published SSML-FD implementation re-mines DPLM for every batch against the live
dictionary; wildreid mines once per epoch from the exact k-NN graph (``train.mining``).
This trains ``configs/demo.yaml`` twice from the same seed on one synthetic set made by the
project's own generator (``write_synthetic`` + ``pack_dataset``), once with
``train.mining=epoch`` and once with ``train.mining=batch``, and reports:

* per DPLM epoch, from each run's ``history.jsonl``: precision, recall and mean positives
  (``pseudo_label_quality`` definitions: per row, the share of its positives with its vehicle
  id; the share of its vehicle's images that were mined). For "epoch" these are the positives
  mined at the start of the epoch; for "batch" the positives the steps really used, averaged
  over the batch rows mined in that epoch;
* final mAP and rank-1 of each trained model on the synthetic test split (``wildreid eval
  --split small``, run as a subprocess: extraction and ``evaluate_groups`` as the command does);
* the wall time of each training run (the two runs run one after the other on the same machine;
  the machine may be shared, so only same-run ratios mean anything).

It prints a markdown table and a final JSON line. Data, shards and runs go under ``--work``
(runs are replaced; data and shards are reused).

    python scripts/bench_mining_schedule.py [--work /tmp/wildreid-bench-mining-schedule] [--train-vehicles 120]
        [--set train.epochs=20 ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from wildreid.config import load_config
from wildreid.core.errors import ShardNotFoundError
from wildreid.core.units import parse_bytes
from wildreid.shards import load_manifest, pack_dataset, read_dataset
from wildreid.shards.synth import write_synthetic
from wildreid.training import TrainOptions, train

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ("epoch", "batch")


def prepare_shards(work: Path, train_vehicles: int, test_vehicles: int, seed: int) -> Path:
    """Synthetic VeRi-Wild-layout data (8 images a vehicle) and its shards under ``work``, reused when there."""
    tag = f"{train_vehicles}-{test_vehicles}-{seed}"
    data, shards = work / f"data-{tag}", work / f"shards-{tag}"
    if not (data / "train_test_split" / "train_list.txt").exists():
        shutil.rmtree(data, ignore_errors=True)
        write_synthetic(data, train_vehicles=train_vehicles, test_vehicles=test_vehicles, seed=seed, workers=2)
    try:
        load_manifest(shards)
    except ShardNotFoundError:
        shutil.rmtree(shards, ignore_errors=True)
        pack_dataset(read_dataset(data), shards, workers=2)
    return shards


def evaluate(shards: Path, checkpoint: str, split: str, budget: str) -> dict:
    """``wildreid eval --shards --checkpoint --split`` as a subprocess; its JSON result for ``split``."""
    cmd = [
        sys.executable,
        "-m",
        "wildreid.cli",
        "eval",
        "--shards",
        str(shards),
        "--checkpoint",
        checkpoint,
        "--split",
        split,
        "--memory-budget",
        budget,
        "--json",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise SystemExit(f"wildreid eval failed ({run.returncode}): {run.stderr[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])[split]


def run_schedule(
    shards: Path, work: Path, config_path: str, overrides: list[str], schedule: str, budget: str, split: str
) -> dict:
    config = load_config(config_path, [*overrides, f"train.mining={schedule}"])
    store = work / f"run-{schedule}"
    shutil.rmtree(store, ignore_errors=True)
    began = time.perf_counter()
    report = train(shards, store, config, TrainOptions(memory_budget=parse_bytes(budget)))
    seconds = time.perf_counter() - began
    result = evaluate(shards, report["checkpoint"], split, budget)
    print(f"{schedule}: {seconds:.0f} s, mAP {result['mAP']:.4f}, rank-1 {result['rank1']:.4f}", file=sys.stderr)
    return {
        "schedule": schedule,
        "train_s": seconds,
        "mAP": result["mAP"],
        "rank1": result["rank1"],
        "valid_queries": result["valid_queries"],
        "gallery": result["gallery"],
        "history": [
            {k: h[k] for k in ("epoch", "warmup", "mining", "precision", "recall", "mean_positives", "loss", "steps")}
            for h in report["history"]
        ],
    }


def markdown(report: dict) -> str:
    runs = {r["schedule"]: r for r in report["runs"]}
    epoch, batch = runs["epoch"], runs["batch"]
    lines = [
        f"{report['train_images']:,} synthetic training images ({report['train_vehicles']} vehicles), "
        f"config {report['config']} {' '.join(report['overrides'])}, seed {report['seed']}; "
        f"evaluation: --split {report['split']} ({epoch['valid_queries']} queries, "
        f"{epoch['gallery']} gallery images)",
        "",
        "| epoch | epoch: precision | recall | mean positives | batch: precision | recall | mean positives |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for e, b in zip(epoch["history"], batch["history"]):
        if e["warmup"]:
            continue
        lines.append(
            f"| {e['epoch']} | {e['precision']:.3f} | {e['recall']:.3f} | {e['mean_positives']:.2f} "
            f"| {b['precision']:.3f} | {b['recall']:.3f} | {b['mean_positives']:.2f} |"
        )
    mean = report["dplm_epoch_means"]
    lines.append(
        f"| mean | {mean['epoch']['precision']:.3f} | {mean['epoch']['recall']:.3f} "
        f"| {mean['epoch']['mean_positives']:.2f} | {mean['batch']['precision']:.3f} "
        f"| {mean['batch']['recall']:.3f} | {mean['batch']['mean_positives']:.2f} |"
    )
    lines += ["", "| schedule | mAP | rank-1 | training wall time |", "| --- | ---: | ---: | ---: |"]
    for r in report["runs"]:
        lines.append(f"| {r['schedule']} | {100 * r['mAP']:.2f} % | {100 * r['rank1']:.2f} % | {r['train_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-vehicles", type=int, default=120, help="8 images each")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/wildreid-bench-mining-schedule"))
    parser.add_argument("--test-vehicles", type=int, default=60, help="the small split holds 30%% of them")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic set")
    parser.add_argument("--split", default="small", help="evaluation split (wildreid eval --split)")
    parser.add_argument("--memory-budget", default="1GiB")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=None,
        help="config override section.key=value (default: train.workers=0)",
    )
    args = parser.parse_args(argv)
    overrides = args.overrides if args.overrides is not None else ["train.workers=0"]

    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    shards = prepare_shards(args.work, args.train_vehicles, args.test_vehicles, args.seed)
    print(f"data ready in {time.perf_counter() - began:.0f} s: {shards}", file=sys.stderr)
    runs = [
        run_schedule(shards, args.work, args.config, overrides, s, args.memory_budget, args.split) for s in SCHEDULES
    ]
    means = {}
    for r in runs:
        dplm = [h for h in r["history"] if not h["warmup"]]
        means[r["schedule"]] = {
            k: sum(h[k] for h in dplm) / max(1, len(dplm)) for k in ("precision", "recall", "mean_positives")
        }
    config = load_config(args.config, overrides)
    report = {
        "bench": "mining_schedule",
        "config": Path(args.config).name,
        "overrides": overrides,
        "train_vehicles": args.train_vehicles,
        "train_images": 8 * args.train_vehicles,
        "seed": config.train.seed,
        "split": args.split,
        "runs": runs,
        "dplm_epoch_means": means,
        "seconds": time.perf_counter() - began,
    }
    print(markdown(report))
    print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
    main()
