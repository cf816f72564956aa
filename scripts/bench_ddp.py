"""Benchmark: ``wildreid train`` on 1 process against 2 (torch.distributed, gloo, one thread each).

Both runs train the same config (``configs/demo.yaml``: resnet18, 64x32, global batch 32) on the
same synthetic shards, ``--epochs`` epochs (the first is warm-up, the others mine DPLM positives),
``OMP_NUM_THREADS=1`` per process. From each run's ``--json`` report (``world``):

* seconds per step: the median step of the run (forward, DTL over the rows it owns, backward,
  optimizer, momentum update; data loading excluded), as ``wildreid.training`` times it;
* dictionary bytes held: the most dictionary bytes each rank's page cache held at once;
* bytes per step: what each rank put into collectives per step, by kind (payload; the ring
  algorithms of gloo and NCCL move about (W - 1) / W of a gathered tensor and twice that of a
  summed one per rank).

A third run takes 2 processes with ``train.sync_bn=false`` (BatchNorm statistics of each rank's half
batch, a different training) to show what the global-batch BatchNorm costs. Ratios are over the
1-process run, in the same invocation. The machine is shared: other jobs move the
times, not the bytes.

Then a worked estimate (no measurement) for 8 GPUs at VeRi-Wild scale, from ``wildreid.sharded.step_bytes``:
N = 277,797, D = 2048, ResNet-50 (its parameter count, built here), r = 0.01, global batch 128 and 1,024:
bytes each rank sends per step, and what they cost at 100 GB/s (NVLink) and 12.5 GB/s (100 Gb Ethernet),
against an assumed compute time of ``--gpu-images-per-s`` training images per second per GPU
(ResNet-50 at 256x128 in bf16; an assumption, stated in the table, not a measurement).

    python scripts/bench_ddp.py [--work /tmp/wildreid-bench-ddp] [--vehicles 60] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from wildreid.model import build_model
from wildreid.sharded import step_bytes
from wildreid.shards import pack_dataset, read_dataset
from wildreid.shards.synth import write_synthetic

ROOT = Path(__file__).resolve().parents[1]


def shards(work: Path, vehicles: int) -> Path:
    out = work / f"shards-{vehicles}"
    if not (out / "manifest.json").exists():
        data = work / f"data-{vehicles}"
        write_synthetic(data, train_vehicles=vehicles, test_vehicles=10, images_per_vehicle=8, cameras=6, seed=1)
        pack_dataset(read_dataset(data), out, max_samples=64)
    return out


def train(shard_root: Path, store: Path, processes: int, epochs: int, sync_bn: bool = True) -> dict:
    command = [sys.executable, "-m", "wildreid", "train", "--shards", str(shard_root), "--store", str(store)]
    command += ["--config", str(ROOT / "configs" / "demo.yaml"), "--memory-budget", "2GiB", "--json"]
    command += ["--nproc-per-node", str(processes), "--set", f"train.epochs={epochs}", "--set", "train.warmup_epochs=1"]
    command += ["--set", "train.workers=0", "--set", f"train.sync_bn={str(sync_bn).lower()}"]
    run = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        raise SystemExit(f"training on {processes} process(es) failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def measured(work: Path, vehicles: int, epochs: int) -> list[dict]:
    shard_root = shards(work, vehicles)
    rows = []
    for processes, sync_bn in ((1, True), (2, True), (2, False)):
        store = work / f"run-{processes}-{sync_bn}"
        subprocess.run(["rm", "-rf", str(store)], check=True)
        world = train(shard_root, store, processes, epochs, sync_bn)["world"]
        per_step = world["bytes_per_step"]
        rows.append(
            {
                "processes": processes,
                "sync_bn": sync_bn,
                "seconds_per_step": world["seconds_per_step"],
                "dictionary_rows": sum(hi - lo for lo, hi in world["rows"]),
                "held_per_rank": world["dictionary_bytes_held"],
                "bytes_per_step": per_step[0],
                "total_per_step": [sum(kinds.values()) for kinds in per_step],
            }
        )
    return rows


def estimate(batches: list[int], images_per_s: float, size: int = 8) -> list[dict]:
    n, dim, r = 277_797, 2048, 0.01
    parameters = sum(p.numel() for p in build_model("resnet50").parameters())
    h_max = int(r * (n - 1))  # |P_b| >= 1
    out = []
    for batch in batches:
        sent = step_bytes(batch, dim, h_max, parameters, size)
        total = sum(sent.values())
        compute = batch / size / images_per_s
        row = {"batch": batch, "bytes": sent, "total": total, "compute_s": compute}
        for name, speed in (("nvlink", 100e9), ("ethernet", 12.5e9)):
            seconds = total / speed
            row[name] = {"seconds": seconds, "share": seconds / (seconds + compute)}
        out.append(row)
    return out


def mib(value: float) -> str:
    return f"{value / 2**20:,.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/wildreid-bench-ddp"))
    parser.add_argument("--vehicles", type=int, default=60, help="training vehicles of the synthetic set (x8 images)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--gpu-images-per-s", type=float, default=1000.0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    rows = measured(args.work, args.vehicles, args.epochs)
    one, two, unsynced = rows
    print(f"\n1 vs 2 processes (gloo, 1 thread each), {one['dictionary_rows']:,} dictionary rows\n")
    print(
        "| processes | BatchNorm | s/step (median) | dictionary bytes held per rank | collectives per step per rank |"
    )
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        held = " / ".join(f"{mib(b)} MiB" for b in row["held_per_rank"])
        total = " / ".join(f"{mib(b)} MiB" for b in row["total_per_step"])
        bn = "per process" if row["processes"] == 1 or not row["sync_bn"] else "global batch"
        print(f"| {row['processes']} | {bn} | {row['seconds_per_step']:.3f} | {held} | {total} |")
    print(
        f"\nratios, 2 over 1: step time {two['seconds_per_step'] / one['seconds_per_step']:.2f}x, "
        f"dictionary bytes per rank {max(two['held_per_rank']) / max(one['held_per_rank']):.2f}x; "
        f"without train.sync_bn {unsynced['seconds_per_step'] / one['seconds_per_step']:.2f}x"
    )
    print(
        "rank 0's payload per step by kind (2 processes):",
        {k: mib(v) + " MiB" for k, v in two["bytes_per_step"].items()},
    )

    print(
        "\nEstimate: 8 GPUs, N = 277,797, D = 2048, ResNet-50, r = 0.01; "
        f"compute {args.gpu_images_per_s:,.0f} images/s/GPU"
    )
    print(
        "\n| global batch | features | candidates | gradients | total per rank | NVLink 100 GB/s | Ethernet 12.5 GB/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in estimate([128, 1024], args.gpu_images_per_s):
        b = row["bytes"]
        cells = [f"{mib(b[k])} MiB" for k in ("features", "candidates", "gradients")]
        link = [f"{row[k]['seconds'] * 1e3:.1f} ms ({row[k]['share']:.0%})" for k in ("nvlink", "ethernet")]
        print(f"| {row['batch']:,} | {' | '.join(cells)} | {mib(row['total'])} MiB | {' | '.join(link)} |")
    print(
        "\n(share = communication / (communication + compute), with no overlap; DDP overlaps the gradient sum "
        "with the backward pass, so this is an upper bound)"
    )
    (args.work / "result.json").write_text(json.dumps({"measured": rows}, indent=1))


if __name__ == "__main__":
    main()
