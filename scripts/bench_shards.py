"""Benchmark: shard writing against `tar -cf`, shard reading against loose files.

One run measures both sides on the same synthetic set, on the same machine, and
prints ratios (this machine is shared and noisy, so only same-run ratios mean
anything). Usage:

    python scripts/bench_shards.py [--images 20000] [--workers 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from wildreid.shards import read_dataset
from wildreid.shards.reader import ShardDataset, pil_to_uint8
from wildreid.shards.synth import write_synthetic

SIZE = (256, 128)
WRITE_CHILD = """
import sys, time
from wildreid.shards import pack_dataset, read_dataset
index = read_dataset(sys.argv[1])
index.records = {"train": index.records["train"]}
began = time.perf_counter()
pack_dataset(index, sys.argv[2], max_samples=2_000, workers=int(sys.argv[3]))
print(time.perf_counter() - began)
"""


class LooseFolderDataset(Dataset):
    """The baseline: one file per image, opened and decoded as torchvision's ImageFolder does."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with open(self.paths[i], "rb") as f:
            image = Image.open(f).convert("RGB")
        image = image.resize((SIZE[1], SIZE[0]), Image.Resampling.BILINEAR)
        return pil_to_uint8(image), i


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--image-size", type=int, default=256, help="base crop side of the synthetic vehicles")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="wildreid-bench-"))
    src = work / "data"
    per_vehicle = 10
    vehicles = args.images // per_vehicle
    if not src.exists():
        write_synthetic(
            src,
            train_vehicles=vehicles,
            test_vehicles=2,
            images_per_vehicle=per_vehicle,
            image_size=(args.image_size, args.image_size),
            workers=args.workers,
            seed=0,
        )
    index = read_dataset(src)
    index.records = {"train": index.records["train"]}  # the train split: one shard set, like tar's one archive
    n = len(index.records["train"])
    nbytes = sum((src / r.path).stat().st_size for r in index.records["train"])
    file_list = work / "files.txt"
    file_list.write_text("".join(r.path + "\n" for r in index.records["train"]))

    def write_tar():
        subprocess.run(["tar", "-cf", str(work / "all.tar"), "-C", str(src), "-T", str(file_list)], check=True)

    def write_shards() -> float:
        # In a fresh interpreter without torch, as `wildreid shard` runs; timed from inside, so
        # the interpreter's start-up (a constant, not a throughput) is left out.
        shutil.rmtree(work / "shards", ignore_errors=True)
        child = subprocess.run(
            [sys.executable, "-c", WRITE_CHILD, str(src), str(work / "shards"), str(args.workers)],
            check=True,
            capture_output=True,
            text=True,
        )
        return float(child.stdout.split()[-1])

    write_tar()  # warm the page cache for both sides alike
    t_tar = timed(write_tar, args.repeats)
    t_shard = statistics.median(write_shards() for _ in range(args.repeats))

    paths = [src / r.path for r in index.records["train"]]

    def read_loose():
        loader = DataLoader(LooseFolderDataset(paths), batch_size=args.batch, num_workers=args.workers)
        assert sum(len(i) for _, i in loader) == n

    def read_shards():
        ds = ShardDataset(
            work / "shards", "train", image_size=SIZE, shuffle=True, lanes=max(1, args.workers), chunk=args.batch
        )
        loader = DataLoader(ds, batch_size=None, num_workers=args.workers)
        assert sum(len(i) for _, i, _, _ in loader) == n

    read_loose()
    t_loose = timed(read_loose, args.repeats)
    t_read = timed(read_shards, args.repeats)

    rows = [
        ("write", "tar -cf (1 process)", n / t_tar, f"wildreid shard (--workers {args.workers})", n / t_shard),
        (
            "read",
            f"loose files, ImageFolder-style ({args.workers} workers)",
            n / t_loose,
            f"shards, ShardDataset ({args.workers} workers)",
            n / t_read,
        ),
    ]
    print(
        f"{n} images, {nbytes / n / 1024:.1f} KiB each on average, torch {torch.__version__}, median of {args.repeats}"
    )
    print("| step | baseline | baseline img/s | wildreid | wildreid img/s | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for step, base, base_rate, ours, rate in rows:
        print(f"| {step} | {base} | {base_rate:,.0f} | {ours} | {rate:,.0f} | {rate / base_rate:.2f}x |")
    print(json.dumps({"images": n, "write_ratio": (n / t_shard) / (n / t_tar), "read_ratio": t_loose / t_read}))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
