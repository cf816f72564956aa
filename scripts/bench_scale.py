"""A full-size rehearsal: VeRi-Wild's sizes end to end on one machine, under one memory budget.

Stages, each a ``wildreid`` command in its own process tree, timed, with the tree's memory sampled from
outside (psutil, every 0.5 s: the sum over the command and all its children of USS, the pages only that
process holds, and of PSS, each shared page split between its sharers; summed RSS would count pages that
forked DataLoader workers share with their parent once per process):

1. ``synth``: a synthetic set with VeRi-Wild's sizes (277,797 training images; the large test split's
   10,000 queries x 128,517 gallery images), small JPEGs so it fits the disk and the clock;
2. ``shard``;
3. ``extract``: the untrained demo network's features of every training image (``wildreid train --epochs 0``:
   the N-row dictionary);
4. ``mine``: the k-NN graph and DPLM positives of that dictionary (``wildreid mine``);
5. ``train``: ``--max-steps`` training steps (default 200) with exact hard negatives over an N-row dictionary
   (a fresh run: the published refresh starts the dictionary at zeros, so the steps come first);
6. ``eval``: the large split (extraction of 138,517 images, then the blockwise evaluation).

``--scale 0.01`` runs the same at 1 % of the sizes (a try-out). D = 512 with the demo network (ResNet-18);
``--arch resnet50`` gives D = 2048. Results: OUT/scale.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from wildreid.run_budget import run_measured

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES, QUERIES, GALLERY = 277_797, 10_000, 128_517  # VeRi-Wild: train, large test split
# The generator gives every vehicle the same number of images: 14 gives the large split 10,000 queries and
# 130,000 gallery images (trimmed to 128,517) and the train split 19,843 vehicles (trimmed to 277,797 images;
# VeRi-Wild has 30,671 training vehicles of about 9 images: the dictionary's size is what this rehearses).
IMAGES_PER_VEHICLE = 14


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wildreid.cli", *args]


def run_stage(name: str, cmd: list[str], ok_codes=(0,), interval: float = 0.5) -> dict:
    """Run ``cmd``, sampling its process tree's memory; wall time, peaks and the last stdout line."""
    run = run_measured(cmd, interval=interval)
    if run.returncode not in ok_codes:
        raise SystemExit(f"error: stage {name} exited {run.returncode}: {run.stderr.strip()[-800:]}")
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    print(
        f"[{name}] {run.seconds:.0f} s, peak tree USS {run.peak_uss / 2**20:.0f} MiB, "
        f"PSS {run.peak_pss / 2**20:.0f} MiB",
        flush=True,
    )
    return {
        "stage": name,
        "seconds": run.seconds,
        "peak_uss_bytes": run.peak_uss,
        "peak_pss_bytes": run.peak_pss,
        "exit_code": run.returncode,
        "last_line": last,
    }


def _trim_lists(data: Path, train_images: int, gallery_images: int) -> None:
    """Cut the generated lists to the exact sizes: the last training images, then one gallery image each from
    the last test vehicles (so every query keeps true matches)."""
    split = data / "train_test_split"
    train = (split / "train_list.txt").read_text().splitlines()
    (split / "train_list.txt").write_text("\n".join(train[:train_images]) + "\n")
    lines = (split / "test_10000.txt").read_text().splitlines()
    extra = len(lines) - gallery_images
    if extra > 0:
        drop, seen = set(), set()
        for position in range(len(lines) - 1, -1, -1):  # the last image of each vehicle, from the last vehicle
            vid = lines[position].split("/")[0]
            if vid not in seen:
                seen.add(vid)
                drop.add(position)
                if len(drop) == extra:
                    break
        (split / "test_10000.txt").write_text("\n".join(x for i, x in enumerate(lines) if i not in drop) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/wildreid-bench-scale"))
    p.add_argument("--scale", type=float, default=1.0, help="fraction of VeRi-Wild's sizes (1.0: full size)")
    p.add_argument("--memory-budget", default="2GiB")
    p.add_argument("--arch", default="resnet18", help="resnet18 (D = 512, the demo network) or resnet50 (D = 2048)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--image-size", default="32x32", help="synthetic base crop size (small JPEGs)")
    a = p.parse_args(argv)
    n_train, n_query, n_gallery = (max(8, round(v * a.scale)) for v in (TRAIN_IMAGES, QUERIES, GALLERY))
    a.out.mkdir(parents=True, exist_ok=True)
    data, shards, budget = a.out / "data", a.out / "shards", a.memory_budget
    config = [str(ROOT / "configs" / "demo.yaml"), "--set", f"model.arch={a.arch}"]
    stages = []
    if not (data / "train_test_split" / "train_list.txt").exists():
        stages.append(
            run_stage(
                "synth",
                _cli(
                    "synth",
                    str(data),
                    "--train-vehicles",
                    str(math.ceil(n_train / IMAGES_PER_VEHICLE)),
                    "--test-vehicles",
                    str(n_query),
                    "--images-per-vehicle",
                    str(IMAGES_PER_VEHICLE),
                    "--image-size",
                    a.image_size,
                    "--workers",
                    str(a.workers),
                ),
            )
        )
    _trim_lists(data, n_train, n_gallery)
    if not (shards / "manifest.json").exists():
        stages.append(run_stage("shard", _cli("shard", str(data), str(shards), "--workers", str(a.workers))))
    manifest = json.loads((shards / "manifest.json").read_text())
    sizes = {s: manifest["splits"][s]["num_samples"] for s in ("train", "query-large", "gallery-large")}
    base = a.out / "untrained"
    stages.append(
        run_stage(
            "extract",
            _cli(
                "train",
                "--shards",
                str(shards),
                "--store",
                str(base),
                "--config",
                *config,
                "--epochs",
                "0",
                "--memory-budget",
                budget,
                "--json",
            ),
        )
    )
    stages.append(
        run_stage(
            "mine",
            _cli(
                "mine",
                "--store",
                str(base),
                "--k",
                "21",
                "--adjacency",
                "20",
                "--min-candidates",
                "5",
                "--memory-budget",
                budget,
                "--workers",
                "2",
                "--json",
            ),
        )
    )
    stages.append(
        run_stage(
            "train",
            _cli(
                "train",
                "--shards",
                str(shards),
                "--store",
                str(a.out / "steps"),
                "--config",
                *config,
                "--max-steps",
                str(a.steps),
                "--memory-budget",
                budget,
                "--set",
                "train.checkpoint_every_steps=0",
                "--json",
            ),
            ok_codes=(0, 75),
        )
    )
    stages.append(
        run_stage(
            "eval",
            _cli(
                "eval",
                "--shards",
                str(shards),
                "--checkpoint",
                str(base / "train" / "model.pt"),
                "--split",
                "large",
                "--memory-budget",
                budget,
                "--json",
            ),
        )
    )
    result = {
        "scale": a.scale,
        "sizes": sizes,
        "arch": a.arch,
        "memory_budget": budget,
        "steps": a.steps,
        "cpus": os.cpu_count(),
        "stages": stages,
    }
    (a.out / "scale.json").write_text(json.dumps(result, indent=1))
    print(
        f"\n{sizes['train']:,} training images, large split {sizes['query-large']:,} x {sizes['gallery-large']:,}, "
        f"{a.arch}, --memory-budget {budget}\n"
    )
    print("| stage | wall time | peak USS, whole tree | peak PSS, whole tree |")
    print("|---|---:|---:|---:|")
    for s in stages:
        print(
            f"| {s['stage']} | {s['seconds'] / 60:.1f} min | {s['peak_uss_bytes'] / 2**20:,.0f} MiB "
            f"| {s['peak_pss_bytes'] / 2**20:,.0f} MiB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
