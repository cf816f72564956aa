"""One prepared CUDA smoke run: every GPU code path against the CPU result, one table (scripts/gpu_smoke.sh).

Checks, each with its tolerance (CUDA runs bf16 autocast and channels-last, nvJPEG and faiss-gpu, so results
are close to the CPU's, not equal):

1. decode: a batch of JPEGs decoded by nvJPEG on the device and resized there, against libjpeg-turbo on the CPU
   (mean absolute difference in 8-bit levels);
2. train: the demo config for a few epochs on the device (``--decode-on-device``, the device page tier)
   against the same run on the CPU (per-epoch loss, relative), and that the device tier served the pages;
3. eval: one CPU-trained model evaluated with ``--device cuda`` against ``--device cpu`` (mAP, rank-1);
4. knn: FAISS's proposal stage of the k-NN graph on faiss-gpu against faiss-cpu over the trained dictionary
   (recall of the CPU's top-k); skipped when faiss has no GPU support.

``--cpu-only`` runs the same script with the CPU on both sides (every check then agrees exactly): how the
script itself is tested on machines without a GPU. Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = {
    "decode": 2.0,  # mean |nvJPEG - libjpeg-turbo| in 8-bit levels, after the same resize
    "train": 0.05,  # relative difference of each epoch's mean loss (bf16 autocast against float32)
    "eval": 0.02,  # absolute difference of mAP and rank-1 (bf16 features; ties may reorder)
    "knn": 0.99,  # recall of the CPU top-k among the GPU top-k
}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "wildreid.cli", *args]


def _run(cmd: list[str]) -> str:
    began = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:5])} ... exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    print(f"  {' '.join(cmd[3:5])}: {time.perf_counter() - began:.0f} s", flush=True)
    return proc.stdout


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def prepare(out: Path, vehicles: int) -> Path:
    """A small synthetic set, sharded (reused when complete)."""
    data, shards = out / "data", out / "shards"
    if not (data / "train_test_split" / "train_list.txt").exists():
        _run(
            _cli(
                "synth",
                str(data),
                "--train-vehicles",
                str(vehicles),
                "--test-vehicles",
                str(max(4, vehicles // 2)),
                "--images-per-vehicle",
                "8",
                "--workers",
                str(min(8, os.cpu_count() or 1)),
            )
        )
    if not (shards / "manifest.json").exists():
        _run(_cli("shard", str(data), str(shards), "--max-samples", "200", "--workers", "2"))
    return shards


def check_decode(shards: Path, device: str) -> dict:
    import torch

    from wildreid.shards.reader import ShardDataset, decode_batch

    dataset = ShardDataset(shards, "train", shuffle=False, chunk=64, decode=False)
    encoded = next(iter(dataset))[0]
    size = (64, 32)
    cpu = decode_batch(encoded, size, "cpu").float()
    dev = decode_batch(encoded, size, device).float().cpu()
    diff = float((cpu - dev).abs().mean())
    return {
        "check": "decode",
        "what": f"{len(encoded)} JPEGs, mean abs Δ in levels",
        "cpu": 0.0,
        "device": diff,
        "difference": diff,
        "tolerance": TOLERANCE["decode"],
        "ok": diff <= TOLERANCE["decode"],
        "max_abs": float(torch.max((cpu - dev).abs())),
    }


def _train(shards: Path, store: Path, device: str, epochs: int, extra: list[str]) -> dict:
    if store.exists():
        import shutil

        shutil.rmtree(store)
    out = _run(
        _cli(
            "train",
            "--shards",
            str(shards),
            "--store",
            str(store),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--epochs",
            str(epochs),
            "--device",
            device,
            "--memory-budget",
            "8GiB",  # the whole process tree: CUDA libraries alone take GiBs of host memory
            "--json",
            "--set",
            "train.warmup_epochs=1",
            "--set",
            "train.reextract_every=2",
            *extra,
        )
    )
    return _last_json(out)


def check_train(shards: Path, out: Path, device: str, epochs: int) -> tuple[dict, dict, Path]:
    on_cpu = _train(shards, out / "run-cpu", "cpu", epochs, [])
    extra = ["--device-budget", "1GiB"] + (["--decode-on-device"] if device != "cpu" else [])
    on_dev = _train(shards, out / "run-device", device, epochs, extra)
    cpu_loss = np.array([h["loss"] for h in on_cpu["history"]])
    dev_loss = np.array([h["loss"] for h in on_dev["history"]])
    rel = float(np.max(np.abs(dev_loss - cpu_loss) / np.abs(cpu_loss)))
    tier = on_dev["page_cache"]
    used = tier["device_hits"] > 0 and tier["misses"] == 0
    train = {
        "check": "train",
        "what": f"{epochs} epochs, max relative Δ of epoch losses",
        "cpu": float(cpu_loss[-1]),
        "device": float(dev_loss[-1]),
        "difference": rel,
        "tolerance": TOLERANCE["train"],
        "ok": rel <= TOLERANCE["train"],
    }
    pages = {
        "check": "device pages",
        "what": "dictionary served from the device tier (hits, misses)",
        "cpu": 0,
        "device": tier["device_hits"],
        "difference": tier["misses"],
        "tolerance": 0,
        "ok": used,
    }
    return train, pages, Path(on_cpu["checkpoint"])


def check_eval(shards: Path, checkpoint: Path, out: Path, device: str) -> list[dict]:
    results = {}
    for where in ("cpu", device):
        folder = out / f"features-{where}"
        results[where] = _last_json(
            _run(
                _cli(
                    "eval",
                    "--shards",
                    str(shards),
                    "--checkpoint",
                    str(checkpoint),
                    "--split",
                    "large",
                    "--device",
                    where,
                    "--features-dir",
                    str(folder),
                    "--memory-budget",
                    "8GiB",  # the whole eval process: CUDA libraries alone take GiBs of host memory
                    "--json",
                )
            )
        )["large"]
    rows = []
    for metric in ("mAP", "rank1"):
        a, b = results["cpu"][metric], results[device][metric]
        rows.append(
            {
                "check": f"eval {metric}",
                "what": "large split, one CPU-trained model",
                "cpu": a,
                "device": b,
                "difference": abs(a - b),
                "tolerance": TOLERANCE["eval"],
                "ok": abs(a - b) <= TOLERANCE["eval"],
            }
        )
    return rows


def check_knn(store: Path, device: str, k: int = 21) -> dict:
    import faiss

    from wildreid.stores import FeatureStore

    dictionary = FeatureStore.open(store)
    x = np.ascontiguousarray(dictionary.read_rows(0, dictionary.count()), dtype=np.float32)
    _, cpu = faiss.knn(x, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    if device == "cpu":
        gpu = cpu
    elif not hasattr(faiss, "StandardGpuResources"):
        return {
            "check": "knn",
            "what": "faiss has no GPU support here: skipped",
            "cpu": k,
            "device": None,
            "difference": None,
            "tolerance": TOLERANCE["knn"],
            "ok": True,
            "skipped": True,
        }
    else:
        _, gpu = faiss.knn_gpu(faiss.StandardGpuResources(), x, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(cpu, gpu)]))
    return {
        "check": "knn",
        "what": f"{len(x)} rows, recall of the CPU top-{k}",
        "cpu": 1.0,
        "device": recall,
        "difference": 1.0 - recall,
        "tolerance": TOLERANCE["knn"],
        "ok": recall >= TOLERANCE["knn"],
    }


def _cell(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(rows: list[dict], device: str) -> str:
    lines = [
        f"| check | what | cpu | {device} | difference | tolerance | result |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        verdict = "skipped" if r.get("skipped") else ("pass" if r["ok"] else "FAIL")
        lines.append(
            f"| {r['check']} | {r['what']} | {_cell(r['cpu'])} | {_cell(r['device'])} "
            f"| {_cell(r['difference'])} | {_cell(r['tolerance'])} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/wildreid-gpu-smoke"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--vehicles", type=int, default=100, help="training vehicles of the synthetic set (8 images each)")
    p.add_argument("--cpu-only", action="store_true", help="the CPU on both sides: a test of this script")
    a = p.parse_args(argv)
    device = "cpu" if a.cpu_only else a.device
    if device != "cpu":
        import torch

        if not torch.cuda.is_available():
            print(f"error: --device {device} but torch sees no CUDA device here; --cpu-only tests the script")
            return 2
    a.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    print(f"gpu smoke on {device}, in {a.out}", flush=True)
    shards = prepare(a.out, a.vehicles)
    rows = [check_decode(shards, device)]
    train, pages, checkpoint = check_train(shards, a.out, device, a.epochs)
    rows += [train, pages, *check_eval(shards, checkpoint, a.out, device), check_knn(a.out / "run-cpu", device)]
    text = table(rows, device)
    print(text)
    print(f"\nwall time {time.perf_counter() - began:.0f} s")
    (a.out / "gpu_smoke.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    (a.out / "gpu_smoke.md").write_text(text + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
