"""Benchmark: images/s of the full training step against forward+backward alone, and the cost of streaming.

Part 1, one config (default ``configs/demo.yaml``: resnet18, 64x32 images, batch 32, SGD as
``wildreid.training`` builds it), three kinds of step, each on its own model:

* baseline: the model in train mode, forward + a trivial loss ``(x ** 2).sum()`` + backward +
  SGD step, on one pre-loaded random float batch (no data loading, no augmentation, no dictionary);
* full step, with ``train.workers`` DataLoader workers (as many lanes) and with 0 workers: what
  the training loop does per batch: shards -> DataLoader -> ``train_transform`` -> model ->
  ``dictionary_step`` (DTL with hard negatives streamed through a ``PageCache`` over a float16
  FeatureStore of one random row per training image, self positives, backward, SGD step,
  momentum update). Each step is timed from the end of the previous one, data waits included.

The kinds run in alternating rounds of ``--steps`` steps, so a busy neighbour slows them alike,
and inside one epoch (no DataLoader restart is timed; on VeRi-Wild an epoch is ~2,200 steps).
The headline is the 20th percentile of each kind's step times (the steps other users slowed
least) and its ratio; medians are given too. The first full step of each round is not timed.

Part 2, dictionary streaming against N: ``dictionary_step`` alone (hard-negative scan of every
row, gather with grad, backward to the batch features, momentum update; no model, no optimizer)
on random float16 rows in a Zarr FeatureStore, the whole dictionary resident in the page cache
(budget = its size plus a page, warmed before timing), so it measures compute and not disk.
Times are the best of ``--repeats`` or more calls (see ``stream_time``). They are set against the model step of
the same batch (forward+backward+SGD on pre-loaded tensors); ``share`` is stream / (model + stream). Two series:
D=512 with the demo baseline's p20 step (resnet18, 64x32, batch 32) and D=2048 with resnet50,
256x128, batch 128, whose step is estimated as 8x the best of ``--r50-steps`` steps at batch 16
(CPU time is near linear in the batch at this size; a batch-128 step takes a minute or more here).
The N where the share passes 10% is interpolated linearly in N between measured sizes
(extrapolated past the largest, marked so).

The machine is shared and noisy: only same-run ratios mean anything. Synthetic data and shards
are cached under ``--work``; dictionary stores are written there and deleted after use.

    python scripts/bench_train.py [--work /tmp/wildreid-bench-train] [--sizes 1000,3000,10000,30000,100000,300000]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from wildreid.config import Config, load_config
from wildreid.core.errors import ShardNotFoundError
from wildreid.model import build_model, param_groups
from wildreid.shards import load_manifest, pack_dataset, read_dataset
from wildreid.shards.reader import ShardDataset, split_entry
from wildreid.shards.synth import write_synthetic
from wildreid.stores import FeatureStore, PageCache
from wildreid.training import dictionary_step
from wildreid.transforms import train_transform

ROOT = Path(__file__).resolve().parent.parent
SHARE = 0.10  # the streaming share of a step the issue asks about
R50_BATCH = 16
QUIET_PERCENTILE = 20  # of step times: the steps a busy neighbour slowed least, not the luckiest one


# --------------------------------------------------------------------------- data


def prepare_shards(work: Path, train_vehicles: int, shard_samples: int) -> Path:
    """Synthetic VeRi-Wild-layout data and its shards under ``work`` (reused when already there)."""
    data, shards = work / f"data-{train_vehicles}", work / f"shards-{train_vehicles}-{shard_samples}"
    if not (data / "train_test_split" / "train_list.txt").exists():
        write_synthetic(data, train_vehicles=train_vehicles, test_vehicles=10, workers=2)
    try:
        load_manifest(shards)
    except ShardNotFoundError:
        pack_dataset(read_dataset(data), shards, max_samples=shard_samples, workers=2)
    return shards


def random_store(path: Path, n: int, dim: int, seed: int = 0, block: int = 65536) -> FeatureStore:
    """A float16 FeatureStore of ``n`` random L2-normalised rows at ``path`` (replaced if there)."""
    shutil.rmtree(path, ignore_errors=True)
    store = FeatureStore.create(path, n, dim, dtype="float16")
    rng = np.random.default_rng(seed)
    for start in range(0, n, block):
        rows = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        store.write_rows(start, rows / np.linalg.norm(rows, axis=1, keepdims=True))
    return store


def self_positives(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64)


def resident_cache(store: FeatureStore) -> PageCache:
    """A cache holding the whole dictionary, warmed so no timed step reads the store."""
    page = store.chunk_rows * store.dim() * store.features.dtype.itemsize
    cache = PageCache(store.features, host_budget=store.count() * store.dim() * 2 + page, dtype=store.features.dtype)
    cache.read(0, store.count())
    return cache


# --------------------------------------------------------------------------- model steps


def model_and_optimizer(config: Config, arch: str | None = None):
    """The model and SGD as wildreid.training builds them (epoch-0 learning rates), in train mode."""
    tc = config.train
    model = build_model(arch or config.model.arch, last_stride=config.model.last_stride)
    groups = param_groups(model, 1.0, tc.backbone_lr_factor)
    for g in groups:
        g["lr"] = tc.lr_at(0) * g["lr"]
    optimizer = torch.optim.SGD(
        groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov, weight_decay=tc.weight_decay
    )
    return model.train(), optimizer


def plain_step(model, optimizer, x: torch.Tensor) -> None:
    """Forward, a trivial loss, backward, SGD step: the baseline with no data and no dictionary."""
    optimizer.zero_grad(set_to_none=True)
    (model(x) ** 2).sum().backward()
    optimizer.step()


def step_times(model, optimizer, x: torch.Tensor, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        plain_step(model, optimizer, x)
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        plain_step(model, optimizer, x)
        times.append(time.perf_counter() - began)
    return times


def epochs_of(dataset: ShardDataset, workers: int):
    """(images, indices, epoch) for ever, a new DataLoader per epoch as in wildreid.training."""
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        for images, idx, _vid, _cam in DataLoader(dataset, batch_size=None, num_workers=workers):
            if len(idx) >= 2:  # as train.py: BatchNorm cannot train on one sample
                yield images, idx, epoch
        epoch += 1


class FullStep:
    """The training loop's step, data included, on its own model, optimizer and dictionary."""

    def __init__(self, config: Config, shards: Path, store_path: Path, workers: int):
        tc = config.train
        torch.manual_seed(0)
        self.config, self.workers = config, workers
        self.model, self.optimizer = model_and_optimizer(config)
        self.n = split_entry(shards, "train")["num_samples"]
        self.store_path = store_path
        self.cache = resident_cache(random_store(store_path, self.n, self.model.feature_dim))
        self.positives = self_positives(self.n)
        self.augment = train_transform(config.model.image_size, seed=tc.seed)
        dataset = ShardDataset(
            shards,
            "train",
            image_size=tuple(config.model.image_size),
            seed=tc.seed,
            lanes=max(1, workers),
            chunk=tc.batch_size,
        )
        self.batches = epochs_of(dataset, workers)

    def step(self) -> int:
        images, idx, epoch = next(self.batches)
        x = self.model(self.augment(images, idx, epoch))
        dictionary_step(x, idx, self.cache, self.positives, self.config.loss.r, self.config.loss.delta, self.optimizer)
        return len(idx)

    def close(self) -> None:
        self.batches.close()  # stops the DataLoader workers
        shutil.rmtree(self.store_path, ignore_errors=True)


def timed(step, count: int) -> list[float]:
    """Seconds of each of ``count`` calls, each from the end of the previous one (data waits included)."""
    times, last = [], time.perf_counter()
    for _ in range(count):
        step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    return times


def interleaved(
    config: Config, shards: Path, work: Path, workers: list[int], rounds: int, steps: int, warmup: int
) -> dict:
    """Baseline and full steps in alternating rounds, so a busy neighbour slows all of them alike.

    Each round times ``steps`` baseline steps, then ``steps`` full steps per worker count; the
    first full step of a round is not timed (its workers had the baseline's time to prefetch).
    """
    torch.manual_seed(0)
    model, optimizer = model_and_optimizer(config)
    x = torch.randn(config.train.batch_size, 3, *config.model.image_size)

    def plain() -> None:
        plain_step(model, optimizer, x)

    fulls = {w: FullStep(config, shards, work / f"train-dict-{w}.zarr", w) for w in workers}
    try:
        timed(plain, warmup)
        for full in fulls.values():
            timed(full.step, warmup)
        times = {"baseline": []} | {w: [] for w in workers}
        for _ in range(rounds):
            times["baseline"].append(timed(plain, steps))
            for w, full in fulls.items():
                full.step()
                times[w].append(timed(full.step, steps))
    finally:
        for full in fulls.values():
            full.close()
    batch = config.train.batch_size
    result = {"n": fulls[workers[0]].n, "baseline": _summary(times["baseline"], batch), "full": []}
    for w in workers:
        summary = _summary(times[w], batch)
        summary["workers"] = w
        for key in ("quiet", "median"):
            summary[f"ratio_{key}"] = result["baseline"][f"{key}_step_s"] / summary[f"{key}_step_s"]
        result["full"].append(summary)
    return result


def _summary(rounds: list[list[float]], batch: int) -> dict:
    flat = np.concatenate(rounds)
    quiet, median = float(np.percentile(flat, QUIET_PERCENTILE)), float(np.median(flat))
    return {
        "quiet_step_s": quiet,
        "median_step_s": median,
        "images_per_s": batch / quiet,
        "median_images_per_s": batch / median,
        "mean_images_per_s": batch * len(flat) / float(flat.sum()),
        "steps": len(flat),
        "round_median_step_s": [float(np.median(r)) for r in rounds],
    }


# --------------------------------------------------------------------------- streaming against N


def stream_time(
    cache: PageCache,
    batch: int,
    dim: int,
    r: float,
    delta: float,
    repeats: int,
    seed: int = 0,
    cap_s: float = 10.0,
    quick_s: float = 2.0,
) -> float:
    """Best time of ``dictionary_step`` alone on random normalised batch features.

    One untimed call first when it is quick (< 1 s). Then at least ``repeats`` timed calls
    (fewer once they took ``cap_s``, at least one) and more, up to 50, while they took under
    ``quick_s``: cheap sizes get many tries at a quiet moment on a shared machine.
    """
    n = cache.n
    positives = self_positives(n)
    gen = torch.Generator().manual_seed(seed)
    times: list[float] = []
    warm = True
    while not times or (len(times) < repeats and sum(times) < cap_s) or (sum(times) < quick_s and len(times) < 50):
        x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).requires_grad_()
        idx = torch.randperm(n, generator=gen)[:batch]
        began = time.perf_counter()
        dictionary_step(x, idx, cache, positives, r, delta, None)
        seconds = time.perf_counter() - began
        if warm and seconds < 1.0:
            warm = False
            continue
        warm = False
        times.append(seconds)
    return min(times)


def crossing(sizes: list[int], stream: list[float], limit: float) -> tuple[float | None, str]:
    """N where the streaming time passes ``limit``, linear in N between measured sizes."""
    points = list(zip(sizes, stream))
    if stream[0] > limit:
        return None, f"already above at N={sizes[0]:,}"
    for (n0, s0), (n1, s1) in itertools.pairwise(points):
        if s1 > limit:
            return n0 + (limit - s0) * (n1 - n0) / (s1 - s0), "interpolated"
    (n0, s0), (n1, s1) = points[-2], points[-1]
    if s1 <= s0:
        return None, "not reached (no growth to extrapolate)"
    return n1 + (limit - s1) * (n1 - n0) / (s1 - s0), "extrapolated"


def streaming_series(
    work: Path, sizes: list[int], dim: int, batch: int, model_step_s: float, config: Config, repeats: int
) -> dict:
    rows = []
    for n in sizes:
        path = work / f"dict-{n}x{dim}.zarr"
        store = random_store(path, n, dim)
        cache = resident_cache(store)
        seconds = stream_time(cache, batch, dim, config.loss.r, config.loss.delta, repeats)
        rows.append(
            {
                "n": n,
                "stream_s": seconds,
                "share": seconds / (model_step_s + seconds),
                "cache_bytes": cache.resident_bytes,
            }
        )
        del cache, store
        shutil.rmtree(path, ignore_errors=True)
    n_at, how = crossing(sizes, [r["stream_s"] for r in rows], model_step_s * SHARE / (1 - SHARE))
    return {"dim": dim, "batch": batch, "model_step_s": model_step_s, "rows": rows, "n_at_10pct": n_at, "how": how}


def resnet50_step(config: Config, steps: int, batch: int = R50_BATCH, full_batch: int = 128) -> float:
    """Estimated seconds of one resnet50 256x128 step at ``full_batch``: best of ``steps`` at ``batch``, scaled."""
    torch.manual_seed(0)
    model, optimizer = model_and_optimizer(config, arch="resnet50")
    times = step_times(model, optimizer, torch.randn(batch, 3, 256, 128), steps, warmup=1)
    return min(times) * full_batch / batch


# --------------------------------------------------------------------------- report


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def markdown(report: dict) -> str:
    base = report["baseline"]
    head = (
        f"config {report['config']}: {report['arch']}, {report['image_size'][0]}x{report['image_size'][1]}, "
        f"batch {report['batch']}, {report['train_images']:,} synthetic training images, torch threads "
        f"{report['threads']}, {report['rounds']} interleaved rounds of {report['steps']} steps, 1-min load "
        f"{report['load'][0]:.1f} -> {report['load'][1]:.1f}"
    )
    base_row = (
        f"| forward + (x**2).sum() + backward + SGD, pre-loaded tensors | - | {base['images_per_s']:.0f} "
        f"| {base['quiet_step_s']:.3f} | {base['median_step_s']:.3f} | 1.00 | 1.00 |"
    )
    lines = [
        head,
        "",
        "| step | workers | images/s (p20) | s/step p20 | s/step median | ratio p20 | ratio median |",
        "|---|---:|---:|---:|---:|---:|---:|",
        base_row,
    ]
    for full in report["full"]:
        lines.append(
            f"| full: shards, augmentation, DTL + dictionary streaming, momentum update | {full['workers']} "
            f"| {full['images_per_s']:.0f} | {full['quiet_step_s']:.3f} | {full['median_step_s']:.3f} "
            f"| **{full['ratio_quiet']:.2f}** | {full['ratio_median']:.2f} |"
        )
    lines += [
        "",
        "| D | batch | model step s | N | dictionary_step s | share of step |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for series in report["streaming"]:
        for row in series["rows"]:
            lines.append(
                f"| {series['dim']} | {series['batch']} | {series['model_step_s']:.3f} | {row['n']:,} "
                f"| {row['stream_s']:.3f} | {100 * row['share']:.1f}% |"
            )
    lines.append("")
    for series in report["streaming"]:
        n_at = series["n_at_10pct"]
        where = f"N ~ {n_at:,.0f} ({series['how']})" if n_at is not None else series["how"]
        lines.append(
            f"- D={series['dim']}, batch {series['batch']}, {series['model']}: dictionary streaming passes "
            f"10% of a step at {where}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/wildreid-bench-train"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--train-vehicles", type=int, default=300, help="8 images each: 75 batches, one epoch")
    parser.add_argument(
        "--shard-samples", type=int, default=300, help="samples per shard (several, so both lanes read)"
    )
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round and kind")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sizes", default="1000,3000,10000,30000,100000,300000")
    parser.add_argument("--repeats", type=int, default=3, help="dictionary_step calls per size (best is kept)")
    parser.add_argument("--r50-steps", type=int, default=3, help="timed resnet50 steps at batch 16; 0 skips D=2048")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    tc = config.train
    args.work.mkdir(parents=True, exist_ok=True)
    began, load = time.perf_counter(), [_load()]
    shards = prepare_shards(args.work, args.train_vehicles, args.shard_samples)
    print(f"data ready in {time.perf_counter() - began:.1f} s: {shards}", file=sys.stderr)

    part1 = interleaved(
        config, shards, args.work, list(dict.fromkeys([tc.workers, 0])), args.rounds, args.steps, args.warmup
    )
    print(json.dumps(part1), file=sys.stderr)

    sizes = [int(s) for s in args.sizes.split(",")]
    # the baseline's p20 step, to set against the best-of streaming times
    model_step = part1["baseline"]["quiet_step_s"]
    series = [streaming_series(args.work, sizes, 512, tc.batch_size, model_step, config, args.repeats)]
    series[0]["model"] = (
        f"{config.model.arch} {config.model.image_size[0]}x{config.model.image_size[1]} (p20 baseline step)"
    )
    if args.r50_steps:
        r50 = resnet50_step(config, args.r50_steps)
        print(f"resnet50 256x128 step estimate at batch 128: {r50:.1f} s", file=sys.stderr)
        series.append(streaming_series(args.work, sizes, 2048, 128, r50, config, args.repeats))
        series[1]["model"] = f"resnet50 256x128 (step estimated as 8x the best batch-{R50_BATCH} step)"
    load.append(_load())

    report = {
        "bench": "train",
        "config": Path(args.config).name,
        "arch": config.model.arch,
        "image_size": list(config.model.image_size),
        "batch": tc.batch_size,
        "threads": torch.get_num_threads(),
        "train_images": part1["n"],
        "rounds": args.rounds,
        "steps": args.steps,
        "load": load,
        "baseline": part1["baseline"],
        "full": part1["full"],
        "streaming": series,
        "seconds": time.perf_counter() - began,
    }
    print(markdown(report))
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
