"""Benchmark: exact hard negatives (the whole dictionary streamed) against k-NN graph candidates, in one run.

    python scripts/bench_negatives.py [--work /tmp/wildreid-bench-neg] [--sizes 10000,100000,300000]
                                      [--dim 2048 --batch 128] [--train-vehicles 60 | --train-vehicles 0]

Measures what ``loss.negatives: exact | graph`` trades:

(a) time: ``wildreid.training.dictionary_step`` (hard negatives, gather with grad, backward to the
    batch features, momentum update; no model, no optimizer) per step, exact streaming against
    graph candidates, at each N of ``--sizes``, on random float16 rows in a Zarr FeatureStore
    wholly resident in the page cache (``bench_train.resident_cache``), self positives, r and
    delta of configs/veriwild.yaml. The graph is a random one of K = 101 rows per row (self
    first), computed from the row ids by a hash, so the graph reader's page cache is not timed.
    Times are the best of ``--repeats`` (or more) calls, as ``bench_train.stream_time``.
(b) quality: clustered features (``--quality-n`` rows around centres, about 10 per cluster,
    float16 in a store), mined with ``wildreid.mining.mine`` at K = 21 and 101 (adjacency K - 1),
    DPLM positives from that mining; for a random batch of rows y_b with live features
    x_b = normalise(M[y_b] + noise) (``drift`` = 1 - mean cos(x_b, M[y_b]); 0 is x_b = M[y_b]),
    the recall of the exact H_b by the graph selection (sum |H_graph & H_exact| / sum |H_exact|),
    the share of batch elements whose h_b exceeds their graph candidates, and the mean z of the
    selected negatives in both, for r = 0.01 and 0.05.
(c) with ``--train-vehicles`` > 0: the final mAP (large split) of a configs/demo.yaml training
    (``train.workers=0``) on a synthetic set (``write_synthetic`` + ``pack_dataset``), once with
    each option, through the CLI as tests/test_train.py runs it, and the untrained baseline.

Prints markdown tables and a final JSON line. The machine is shared: only same-run ratios mean much.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import zarr

from wildreid.config import load_config
from wildreid.dtl import batch_positives, graph_negatives, hard_negatives, tensor_blocks, tensor_rows
from wildreid.mining import MineParams, mine
from wildreid.stores import FeatureStore
from wildreid.training import dictionary_step

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_train import random_store, resident_cache, self_positives  # noqa: E402

GRAPH_K = 101


# --------------------------------------------------------------------------- (a) time per step


def hash_graph(n: int, k: int):
    """``rows -> (len(rows), k)``: the row itself, then k - 1 pseudo-random rows (a fixed function of the row)."""
    cols = np.arange(1, k, dtype=np.int64)

    def rows_fn(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        others = (idx[:, None] * 2654435761 + cols * 40503 + (cols * cols) * 97) % n
        return np.concatenate([idx[:, None], others], 1)

    return rows_fn


def step_time(
    cache,
    batch: int,
    dim: int,
    r: float,
    delta: float,
    repeats: int,
    graph=None,
    seed: int = 0,
    cap_s: float = 15.0,
    quick_s: float = 2.0,
) -> float:
    """Best seconds of ``dictionary_step`` on random batches: one untimed call, then ``repeats`` or more timed."""
    positives = self_positives(cache.n)
    gen = torch.Generator().manual_seed(seed)
    times: list[float] = []
    calls = 0
    while len(times) < repeats and sum(times) < cap_s or (sum(times) < quick_s and len(times) < 30):
        x = F.normalize(torch.randn(batch, dim, generator=gen), dim=1).requires_grad_()
        idx = torch.randperm(cache.n, generator=gen)[:batch]
        began = time.perf_counter()
        dictionary_step(x, idx, cache, positives, r, delta, None, graph=graph)
        if calls:
            times.append(time.perf_counter() - began)
        calls += 1
    return min(times)


def timing(work: Path, sizes: list[int], dim: int, batch: int, r: float, delta: float, repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        path = work / f"dict-{n}x{dim}.zarr"
        store = random_store(path, n, dim)
        cache = resident_cache(store)
        exact = step_time(cache, batch, dim, r, delta, repeats)
        graph = step_time(cache, batch, dim, r, delta, repeats, graph=hash_graph(n, GRAPH_K))
        rows.append(
            {
                "n": n,
                "exact_s": exact,
                "graph_s": graph,
                "speedup": exact / graph,
                "h": int(np.floor(r * (n - 1) + 1e-9)),
                "cache_bytes": cache.resident_bytes,
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
        del cache, store
        shutil.rmtree(path, ignore_errors=True)
    return rows


# --------------------------------------------------------------------------- (b) selection quality


def clustered(n: int, dim: int, per_cluster: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    clusters = max(1, n // per_cluster)
    labels = rng.integers(0, clusters, n)
    x = rng.standard_normal((clusters, dim))[labels] + noise * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16), labels


def drifted(m: torch.Tensor, rows: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    base = m[rows]
    return F.normalize(base + sigma / base.shape[1] ** 0.5 * torch.randn(base.shape, generator=gen), dim=1)


def quality(
    work: Path, n: int, dim: int, batch: int, ks: list[int], rs: list[float], sigmas: list[float], budget: int
) -> list[dict]:
    x16, labels = clustered(n, dim, 10, 0.6)
    m = torch.from_numpy(x16.astype(np.float32))
    rows = torch.from_numpy(np.random.default_rng(1).choice(n, batch, replace=False))
    out = []
    for k in ks:
        path = work / f"quality-{n}-k{k}.zarr"
        shutil.rmtree(path, ignore_errors=True)
        store = FeatureStore.create(path, n, dim, dtype="float16", ids=labels)
        store.write_rows(0, x16)
        mine(str(path), MineParams(k=k, adjacency=k - 1, min_candidates=min(10, k - 1)), memory_budget=budget)
        group = zarr.open_group(str(path), mode="r")
        pos_ptr, pos_idx = batch_positives(group["positives/indptr"][:], group["positives/indices"][:], rows)
        cand = torch.from_numpy(group["knn/indices"][:][rows.numpy()])
        for sigma in sigmas:
            x = drifted(m, rows, sigma, seed=2)
            drift = float(1 - (x * m[rows]).sum(1).mean())
            for r in rs:
                exact, h = hard_negatives(x, tensor_blocks(m, 8192), pos_ptr, pos_idx, rows, r, count=n)
                graph, taken = graph_negatives(x, cand, tensor_rows(m), pos_ptr, pos_idx, rows, r, count=n)
                hit = sum(len(set(e[e >= 0].tolist()) & set(g[g >= 0].tolist())) for e, g in zip(exact, graph))
                out.append(
                    {
                        "n": n,
                        "k": k,
                        "r": r,
                        "drift": drift,
                        "h_mean": float(h.float().mean()),
                        "taken_mean": float(taken.float().mean()),
                        "recall": hit / max(1, int(h.sum())),
                        "short_share": float((h > taken).float().mean()),
                        "z_exact": _mean_z(x, m, exact),
                        "z_graph": _mean_z(x, m, graph),
                        "mean_positives": float(np.diff(pos_ptr.numpy()).mean()),
                    }
                )
                print(json.dumps(out[-1]), file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
    return out


def _mean_z(x: torch.Tensor, m: torch.Tensor, hard: torch.Tensor) -> float:
    b, k = torch.nonzero(hard >= 0, as_tuple=True)
    return float((x[b] * m[hard[b, k]]).sum(1).mean()) if len(b) else float("nan")


# --------------------------------------------------------------------------- (c) training


def _cli(*args: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "wildreid.cli", *args, "--json"], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def training(work: Path, vehicles: int) -> list[dict]:
    from wildreid.shards import pack_dataset, read_dataset
    from wildreid.shards.synth import write_synthetic

    data, shards = work / f"train-data-{vehicles}", work / f"train-shards-{vehicles}"
    for p in (data, shards):
        shutil.rmtree(p, ignore_errors=True)
    write_synthetic(data, train_vehicles=vehicles, test_vehicles=30, images_per_vehicle=8, seed=0)
    pack_dataset(read_dataset(data), shards)
    out = []
    # graph negatives need the eval-mode refresh (a k-NN graph from epoch 0): both runs use it, to compare alike
    eval_refresh = ["--set", "train.refresh=eval"]
    for name, extra in (
        ("untrained", ["--epochs", "0"]),
        ("exact", eval_refresh),
        ("graph", [*eval_refresh, "--set", "loss.negatives=graph"]),
    ):
        store = work / f"train-store-{name}"
        shutil.rmtree(store, ignore_errors=True)
        began = time.perf_counter()
        report = _cli(
            "train",
            "--shards",
            str(shards),
            "--store",
            str(store),
            "--config",
            str(ROOT / "configs" / "demo.yaml"),
            "--memory-budget",
            "2GiB",
            "--set",
            "train.workers=0",
            *extra,
        )
        seconds = time.perf_counter() - began
        scores = _cli(
            "eval",
            "--shards",
            str(shards),
            "--checkpoint",
            report["checkpoint"],
            "--split",
            "large",
            "--memory-budget",
            "2GiB",  # the whole eval process
        )["large"]
        history = report["history"]
        out.append(
            {
                "run": name,
                "mAP": scores["mAP"],
                "rank1": scores["rank1"],
                "rank5": scores["rank5"],
                "train_s": seconds,
                "final_precision": history[-1]["precision"] if history else None,
                "negatives": history[-1]["negatives"] if history else None,
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr)
        shutil.rmtree(store, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    a = report["timing"]
    lines = [
        f"(a) dictionary_step per step, D={a['dim']}, batch {a['batch']}, r={a['r']}, graph K={GRAPH_K}, "
        f"dictionary resident in the page cache, torch threads {report['threads']}",
        "",
        "| N | h_b = floor(r(N-1)) | exact s/step | graph s/step | exact / graph |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in a["rows"]:
        lines.append(
            f"| {row['n']:,} | {row['h']:,} | {row['exact_s']:.3f} | {row['graph_s']:.3f} | {row['speedup']:.1f}x |"
        )
    q = report["quality"]
    lines += [
        "",
        f"(b) selection quality, {q['rows'][0]['n']:,} clustered rows (D={q['dim']}, ~10 per cluster), "
        f"batch {q['batch']}, DPLM positives of the same mining",
        "",
        "| K | r | drift | mean h_b | mean taken | recall of exact H_b | share h_b > candidates "
        "| mean z exact | mean z graph |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in q["rows"]:
        lines.append(
            f"| {row['k']} | {row['r']} | {row['drift']:.3f} | {row['h_mean']:.1f} | {row['taken_mean']:.1f} "
            f"| {row['recall']:.3f} | {row['short_share']:.2f} | {row['z_exact']:.3f} "
            f"| {row['z_graph']:.3f} |"
        )
    if report["training"]:
        lines += [
            "",
            "(c) configs/demo.yaml on a synthetic set, large split",
            "",
            "| run | mAP | rank-1 | rank-5 | DPLM precision (last epoch) | train s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in report["training"]:
            prec = "-" if row["final_precision"] is None else f"{row['final_precision']:.3f}"
            lines.append(
                f"| {row['run']} | {row['mAP']:.4f} | {row['rank1']:.4f} | {row['rank5']:.4f} | {prec} "
                f"| {row['train_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench_negatives.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000,300000", help="dictionary sizes N of part (a)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/wildreid-bench-neg"))
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quality-n", type=int, default=4000)
    parser.add_argument("--quality-dim", type=int, default=64)
    parser.add_argument("--quality-batch", type=int, default=256)
    parser.add_argument("--train-vehicles", type=int, default=60, help="0 skips part (c)")
    args = parser.parse_args(argv)

    loss = load_config(ROOT / "configs" / "veriwild.yaml").loss
    args.work.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = timing(args.work, sizes, args.dim, args.batch, loss.r, loss.delta, args.repeats)
    quality_rows = quality(
        args.work, args.quality_n, args.quality_dim, args.quality_batch, [21, 101], [0.01, 0.05], [0.0, 0.5], 512 << 20
    )
    trained = training(args.work, args.train_vehicles) if args.train_vehicles else []
    report = {
        "bench": "negatives",
        "threads": torch.get_num_threads(),
        "timing": {"dim": args.dim, "batch": args.batch, "r": loss.r, "delta": loss.delta, "rows": rows},
        "quality": {"dim": args.quality_dim, "batch": args.quality_batch, "rows": quality_rows},
        "training": trained,
        "seconds": time.perf_counter() - began,
    }
    print(markdown(report))
    print(json.dumps(report, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
