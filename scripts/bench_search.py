"""Benchmark: exact blockwise search against IVF search, each in its own process, memory sampled from outside.

    python scripts/bench_search.py                   # 1,000,000 x 256 float16 gallery, 1,000 queries, k = 20
    python scripts/bench_search.py --rows 20000      # a quick run
    python scripts/bench_search.py --nprobe 8,32,128 --exact-budget 512MiB --ivf-budget 1GiB

Features: clustered like re-identification features (``--clusters`` centres, default one per 50
rows, each row its centre plus Gaussian noise, L2-normalised), written as float16 through
``FeatureStore`` into a gallery group and a query group (queries: fresh rows around centres that
the gallery holds). Each search is ``wildreid.retrieval.search`` on the two groups, in a child
process; the parent samples the child's unique set size (USS, psutil, every 10 ms: what the process
alone holds) and reports its peak, and the child reports its own VmHWM and its USS after imports
("idle"). Recall@k of IVF is the share of the exact top-k rows it returns. IVF time is split into building (k-means on a
sample, then adding every row) and searching; queries/s counts the search only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from wildreid.core.units import format_bytes, parse_bytes
from wildreid.run_budget import run_measured
from wildreid.stores import FeatureStore

BLOCK = 1 << 16  # rows generated and written at a time


def write_groups(work: Path, rows: int, dim: int, queries: int, clusters: int, noise: float, seed: int):
    """The gallery and query groups (float16, L2-normalised), written block by block."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    for name, n in (("gallery", rows), ("queries", queries)):
        store = FeatureStore.create(work / name, n, dim)
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            x = centres[rng.integers(0, clusters, m)] + noise * rng.standard_normal((m, dim), dtype=np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            store.write_rows(start, x.astype(np.float16))


def child(args) -> None:
    from wildreid.budget import peak_rss_bytes
    from wildreid.retrieval import search
    from wildreid.run_budget import process_uss

    idle = process_uss()
    began = time.perf_counter()
    result = search(
        args.gallery,
        args.query,
        k=args.k,
        index=args.index,
        nlist=args.nlist,
        nprobe=args.nprobe_one,
        memory_budget=parse_bytes(args.budget),
    )
    seconds = time.perf_counter() - began
    ids = np.array([[r["row"] for r in q["results"]] for q in result.results], dtype=np.int64)
    np.save(args.out, ids)
    info = {**result.info, "wall_s": seconds, "idle_uss": idle, "vmhwm": peak_rss_bytes()}
    print(json.dumps(info))


def run_child(script: Path, work: Path, index: str, budget: str, k: int, nlist: int | None, nprobe: int):
    out = work / f"ids-{index}-{nprobe}.npy"
    cmd = [sys.executable, str(script), "--child", "--index", index, "--budget", budget, "--k", str(k)]
    cmd += ["--gallery", str(work / "gallery"), "--query", str(work / "queries"), "--out", str(out)]
    cmd += ["--nprobe-one", str(nprobe)] + (["--nlist", str(nlist)] if nlist else [])
    run = run_measured(cmd, interval=0.01)
    if run.returncode != 0:
        raise SystemExit(f"{index} search failed:\n{run.stderr[-3000:]}")
    info = json.loads(run.stdout.strip().splitlines()[-1])
    info["sampled_peak_uss"] = run.peak_uss
    return info, np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--clusters", type=int, default=None, help="default: rows / 50")
    parser.add_argument("--noise", type=float, default=1.0, help="per-coordinate noise (centres: N(0, 1) coordinates)")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default: sqrt(rows))")
    parser.add_argument("--nprobe", default="1,8,32,128", help="IVF lists visited, comma-separated")
    parser.add_argument("--exact-budget", default="512MiB")
    parser.add_argument("--ivf-budget", default="1GiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for the groups (default: a temporary one)")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--index", default="exact", help=argparse.SUPPRESS)
    parser.add_argument("--budget", default="1GiB", help=argparse.SUPPRESS)
    parser.add_argument("--gallery", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--query", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--nprobe-one", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_search-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        began = time.perf_counter()
        clusters = args.clusters or max(1, args.rows // 50)
        if not (work / "gallery").exists():
            write_groups(work, args.rows, args.dim, args.queries, clusters, args.noise, args.seed)
        print(
            f"groups: {args.rows:,} x {args.dim} float16 gallery, {args.queries:,} queries, {clusters:,} clusters "
            f"({time.perf_counter() - began:.1f} s)",
            file=sys.stderr,
        )
        script = Path(__file__).resolve()
        exact, exact_ids = run_child(script, work, "exact", args.exact_budget, args.k, None, 1)
        rows = [("exact, blockwise", args.exact_budget, exact, 1.0)]
        for nprobe in (int(p) for p in args.nprobe.split(",")):
            info, ids = run_child(script, work, "ivf", args.ivf_budget, args.k, args.nlist, nprobe)
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids.tolist(), exact_ids.tolist())])
            rows.append((f"IVF (nlist {info['nlist']:,}, nprobe {nprobe})", args.ivf_budget, info, float(recall)))
        print(f"\n{args.rows:,} x {args.dim} float16 gallery, {args.queries:,} queries, top-{args.k}\n")
        # search's --memory-budget bounds its working set beyond the loaded libraries: "above idle" is what it bounds
        print(
            "| method | --memory-budget | build | search | queries/s | recall@20 | peak USS (sampled) | idle USS "
            "| above idle |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, budget, info, recall in rows:
            build = info.get("build_s", 0.0)
            searching = info["seconds"] - build
            print(
                f"| {name} | {budget} | {build:.1f} s | {searching:.1f} s | {args.queries / searching:,.0f} | "
                f"{recall:.4f} | {format_bytes(info['sampled_peak_uss'])} | {format_bytes(info['idle_uss'])} "
                f"| {format_bytes(info['sampled_peak_uss'] - info['idle_uss'])} |"
            )
        ivf = [info for _, _, info, _ in rows[1:]]
        if ivf:
            print(f"\nIVF index in memory: {format_bytes(ivf[0]['index_bytes'])} (float16 codes, ids, centroids)")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
