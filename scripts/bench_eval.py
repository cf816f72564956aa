"""Benchmark: blockwise exact evaluation against the dense toolbox evaluation, each in its own process.

    python scripts/bench_eval.py                       # Q = 10,000, G = 128,517, D = 256 (VeRi-Wild large)
    python scripts/bench_eval.py --dim 2048
    python scripts/bench_eval.py --queries 2000 --gallery 20000 --dense-queries 2000

Features: random, L2-normalised, stored float16 in two Zarr feature groups. Ids like VeRi-Wild
large: one query per vehicle (10,000 vehicles), gallery ids drawn uniformly from the same
vehicles (about 12.85 images each), cameras uniform over 174. Random features are the hard case
for the blockwise counting: nearly every gallery row ranks before some true match.

Dense ("toolbox"): the full float32 distance matrix from one matrix product, ``np.argsort`` of it
(vectorised), then the per-query cumsum loop as in torchreid/fast-reid. Its matrix and argsort
indices take 12 bytes per query x gallery pair, so it runs on the first ``--dense-queries``
queries (default: as many as fit in ``--dense-limit``). Blockwise runs ``evaluate_groups`` on
the same queries (and, if different, on all of them). Each run is a child process, its peak RSS
read from /proc/self/status (VmHWM); "above idle" subtracts the child's size after imports.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wildreid.core.units import format_bytes, parse_bytes
from wildreid.stores import FeatureStore

CHILD_PRELUDE = """
import json, sys, time
import numpy as np
from wildreid.budget import peak_rss_bytes
from wildreid.stores import FeatureStore
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
"""

BLOCKWISE_CHILD = (
    CHILD_PRELUDE
    + """
from wildreid.evaluation import evaluate_blockwise
q, g, budget, nq = FeatureStore.open(sys.argv[1]), FeatureStore.open(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q_ids, q_cams, g_ids, g_cams = q.ids()[:nq], q.camids()[:nq], g.ids(), g.camids()
from wildreid.stores.rows import Rows
class Head(Rows):  # the first nq query rows of the store
    dtype = q.dtype
    def count(self): return nq
    def dim(self): return q.dim()
    def read(self, a, b, out=None): return q.read(a, b, out)
idle = rss()
began = time.perf_counter()
out = evaluate_blockwise(Head(), g, q_ids, q_cams, g_ids, g_cams, memory_budget=budget)
out["seconds"] = time.perf_counter() - began
out["peak_rss"], out["above_idle"] = peak_rss_bytes(), peak_rss_bytes() - idle
print(json.dumps(out))
"""
)

DENSE_CHILD = (
    CHILD_PRELUDE
    + """
q, g, nq = FeatureStore.open(sys.argv[1]), FeatureStore.open(sys.argv[2]), int(sys.argv[4])
q_ids, q_cams, g_ids, g_cams = q.ids()[:nq], q.camids()[:nq], g.ids(), g.camids()
idle = rss()
began = time.perf_counter()
qf, gf = q.read_rows(0, nq), g.read_rows(0, g.count())
dist = qf @ gf.T  # float32 (Q, G), then |q|^2 + |g|^2 - 2 q.g in place, as torch's addmm_ in fast-reid
dist *= -2.0
dist += (qf * qf).sum(1)[:, None]
dist += (gf * gf).sum(1)[None, :]
indices = np.argsort(dist, axis=1)
del dist
aps, inps, firsts = [], [], []
for i in range(nq):
    order = indices[i]
    same = g_ids[order] == q_ids[i]
    keep = ~(same & (g_cams[order] == q_cams[i]))
    hits = same[keep]
    if not hits.any():
        continue
    cum = hits.cumsum()
    pos = np.flatnonzero(hits)
    aps.append(float((cum[pos] / (pos + 1.0)).sum() / len(pos)))
    inps.append(float(cum[pos[-1]] / (pos[-1] + 1.0)))
    firsts.append(pos[0] + 1)
first = np.array(firsts)
out = {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
       **{f"rank{r}": float(np.mean(first <= r)) for r in (1, 5, 10, 20)},
       "valid_queries": len(firsts), "skipped_queries": nq - len(firsts)}
out["seconds"] = time.perf_counter() - began
out["peak_rss"], out["above_idle"] = peak_rss_bytes(), peak_rss_bytes() - idle
print(json.dumps(out))
"""
)

METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")


def make_stores(work: Path, nq: int, ng: int, dim: int, *, vehicles: int = 10_000, cameras: int = 174, seed: int = 0):
    rng = np.random.default_rng(seed)
    q_ids = rng.permutation(vehicles)[:nq] if nq <= vehicles else rng.integers(0, vehicles, nq)
    g_ids = rng.integers(0, vehicles, ng)
    for name, n, ids in (("query", nq, q_ids), ("gallery", ng, g_ids)):
        store = FeatureStore.create(work / f"{name}.zarr", n, dim, ids=ids, camids=rng.integers(0, cameras, n))
        for start in range(0, n, 16384):
            x = rng.standard_normal((min(16384, n - start), dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.write_rows(start, x.astype(np.float16))


def run_child(code: str, work: Path, budget: int, nq: int) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", code, str(work / "query.zarr"), str(work / "gallery.zarr"), str(budget), str(nq)],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode != 0:
        raise SystemExit(f"child failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--gallery", type=int, default=128_517)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--budget", default="512MiB", help="memory budget of the blockwise evaluation")
    parser.add_argument("--dense-queries", type=int, default=None, help="queries of the dense run (default: fit)")
    parser.add_argument("--dense-limit", default="8GiB", help="dense matrix + argsort indices stay below this")
    parser.add_argument("--keep", type=Path, default=None, help="reuse/keep the feature stores in this folder")
    args = parser.parse_args()
    budget = parse_bytes(args.budget)
    work = args.keep or Path(tempfile.mkdtemp(prefix="wildreid-bench-eval-"))
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "gallery.zarr").exists():
        began = time.perf_counter()
        make_stores(work, args.queries, args.gallery, args.dim)
        print(f"features written in {time.perf_counter() - began:.1f} s to {work}", file=sys.stderr)
    dense_q = args.dense_queries or min(args.queries, parse_bytes(args.dense_limit) // (12 * args.gallery))

    rows = []
    dense = run_child(DENSE_CHILD, work, budget, dense_q)
    same = run_child(BLOCKWISE_CHILD, work, budget, dense_q)
    rows.append(("dense (toolbox: matrix + argsort)", dense_q, dense))
    rows.append(("blockwise (evaluate_blockwise)", dense_q, same))
    if dense_q < args.queries:
        rows.append(
            ("blockwise (evaluate_blockwise)", args.queries, run_child(BLOCKWISE_CHILD, work, budget, args.queries))
        )

    print(
        f"\nG = {args.gallery:,}, D = {args.dim}, budget = {format_bytes(budget)}, "
        f"random L2-normalised float16 features\n"
    )
    print("| method | queries | time (s) | peak RSS | above idle | mAP | rank-1 | mINP |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, nq, r in rows:
        print(
            f"| {name} | {nq:,} | {r['seconds']:.1f} | {format_bytes(r['peak_rss'])} | "
            f"{format_bytes(r['above_idle'])} | {r['mAP']:.6f} | {r['rank1']:.4f} | {r['mINP']:.6f} |"
        )
    diff = max(abs(dense[k] - same[k]) for k in METRICS)
    counts = (dense["valid_queries"], dense["skipped_queries"]) == (same["valid_queries"], same["skipped_queries"])
    print(
        f"\nsame {dense_q:,} queries: time ratio dense/blockwise {dense['seconds'] / same['seconds']:.1f}x, "
        f"peak RSS ratio {dense['peak_rss'] / same['peak_rss']:.1f}x "
        f"(above idle {dense['above_idle'] / max(1, same['above_idle']):.1f}x); "
        f"max metric difference {diff:.2e}, valid/skipped counts {'equal' if counts else 'DIFFER'}"
    )


if __name__ == "__main__":
    main()
