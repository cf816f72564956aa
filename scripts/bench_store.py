"""Benchmark: how to store the feature dictionary in Zarr (chunk size, codec, format, library, concurrency).

Times wildreid's three access patterns on random L2-normalised float16 features: write (extraction
writes blocks of 8192 rows), full scan (k-NN reads chunk by chunk) and a random gather (momentum
updates: 20,000 sorted random rows, as one orthogonal fancy index or one bounding slice per chunk).
Each number is the best of ``--repeats`` runs in a temporary folder (page cache warm, no fsync);
ratios in sections 1-5 are against wildreid's layout without its checksum (zarr-python 3, format 3,
CHUNK_BYTES uncompressed chunks, default async concurrency). The machine is shared and noisy: only
same-run ratios mean anything.

Section 6 is the cost of wildreid's integrity and durability on CHUNK_BYTES chunks written in
chunk-aligned blocks: arrays made by ``create_checked_array`` (a crc32c checksum after the bytes
codec) against the same array without it, written through zarr's LocalStore or through wildreid's
DurableLocalStore (which fsyncs each chunk file and its folder); the configurations take turns
within each repeat so that a noisy spell slows all of them, and dirty pages are flushed (sync)
before each timed write so that no write pays for an earlier one's writeback.

    python scripts/bench_store.py [--n 200000] [--dim 512] [--repeats 3] [--zarr2-site /tmp/zarr2site]
    python scripts/bench_store.py --only checksum   # section 6 alone

The zarr-python 2 side runs this file in a child process with ``--zarr2-site`` first on PYTHONPATH:

    pip install "zarr>=2.18,<3" "numcodecs<0.16" fasteners asciitree deprecated wrapt \
        --no-deps --target /tmp/zarr2site
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

MIB = 1 << 20
WRITE_BLOCK = 8192  # rows per block written by the extraction pass
GATHER_ROWS = 20_000


def best(fn, repeats: int, setup=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        setup()
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return min(times)


def best_in_turns(fns: dict[str, Callable], repeats: int, setup: Callable[[str], None]) -> dict[str, float]:
    """``best`` for several configurations run in turn within each repeat, so drift slows them all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(best(fn, 1, lambda name=name: setup(name)))
    return {name: min(t) for name, t in times.items()}


def create(path: str, shape: tuple[int, int], chunk_rows: int, codec: str | None, fmt: int):
    """An empty float16 array with the installed zarr (2 or 3); codec is None, "zstd" or "lz4"."""
    import zarr

    if zarr.__version__.startswith("2."):
        import numcodecs

        compressor = {
            None: None,
            "lz4": numcodecs.Blosc("lz4", shuffle=numcodecs.Blosc.SHUFFLE),
            "zstd": numcodecs.Zstd(),
        }[codec]
        return zarr.open_array(
            path,
            mode="w",
            shape=shape,
            chunks=(chunk_rows, shape[1]),
            dtype="float16",
            compressor=compressor,
            fill_value=0,
        )
    from zarr.codecs import BloscCodec, ZstdCodec

    compressors = {None: None, "zstd": ZstdCodec(), "lz4": BloscCodec(cname="lz4", shuffle="shuffle")}[codec]
    return zarr.create_array(
        path,
        shape=shape,
        chunks=(chunk_rows, shape[1]),
        dtype="float16",
        compressors=compressors,
        fill_value=0,
        zarr_format=fmt,
    )


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def gather_per_chunk(arr, idx: np.ndarray) -> np.ndarray:
    """One bounding slice per touched chunk, then a numpy take: what FeatureStore.read_rows allows."""
    rows = arr.chunks[0]
    bounds = np.flatnonzero(np.diff(idx // rows)) + 1
    parts = [arr[g[0] : g[-1] + 1][g - g[0]] for g in np.split(idx, bounds)]
    return np.concatenate(parts)


def bench(spec: dict, data: np.ndarray, idx: np.ndarray, workdir: str, repeats: int) -> dict:
    """Write / scan / gather MiB/s for one configuration with the installed zarr."""
    import zarr

    path = os.path.join(workdir, spec["name"].replace(" ", "_"))
    rows, n, raw = spec["chunk_rows"], len(data), data.nbytes
    useful = len(idx) * data.shape[1] * data.itemsize
    out = {"name": spec["name"]}

    def write(block: int):
        arr = create(path, data.shape, rows, spec["codec"], spec["fmt"])
        for s in range(0, n, block):
            arr[s : s + block] = data[s : s + block]

    def clear():
        shutil.rmtree(path, ignore_errors=True)

    out["write"] = raw / best(lambda: write(WRITE_BLOCK), repeats, clear) / MIB
    aligned = -(-WRITE_BLOCK // rows) * rows
    if spec.get("aligned") and aligned != WRITE_BLOCK:
        out["write_aligned"] = raw / best(lambda: write(aligned), repeats, clear) / MIB
        clear()
        write(WRITE_BLOCK)
    out["disk_ratio"] = disk_bytes(path) / raw
    arr = zarr.open_array(path, mode="r")
    if not (np.array_equal(arr[:], data) and np.array_equal(gather_per_chunk(arr, idx), data[idx])):
        raise RuntimeError(f"{spec['name']}: rows read back differ from rows written")
    out["scan"] = raw / best(lambda: [arr[s : s + rows] for s in range(0, n, rows)], repeats) / MIB
    out["gather_oindex"] = useful / best(lambda: arr.get_orthogonal_selection((idx, slice(None))), repeats) / MIB
    out["gather_chunks"] = useful / best(lambda: gather_per_chunk(arr, idx), repeats) / MIB
    return out


CHECKSUM_CONFIGS = {"none": (False, False), "crc32c": (True, False), "crc32c + fsync": (True, True)}


def create_feature_array(path: str, shape: tuple[int, int], chunk_rows: int, checksum: bool, durable: bool):
    """wildreid's feature array (``create_checked_array``: crc32c) or the same without checksum, in a new group."""
    import zarr
    from zarr.storage import LocalStore

    from wildreid.core.durable import DurableLocalStore
    from wildreid.stores.dictionary import create_checked_array

    group = zarr.open_group(store=(DurableLocalStore if durable else LocalStore)(path), mode="w")
    make = create_checked_array if checksum else lambda g, name, **kw: g.create_array(name, compressors=None, **kw)
    return make(group, "features", shape=shape, chunks=(chunk_rows, shape[1]), dtype="float16", fill_value=0)


def bench_checksum(data: np.ndarray, chunk_rows: int, workdir: str, repeats: int) -> list[dict]:
    """Write (chunk-aligned blocks) and scan MiB/s for each of CHECKSUM_CONFIGS."""
    import zarr
    from zarr.codecs import Crc32cCodec

    n, raw = len(data), data.nbytes
    paths = {name: os.path.join(workdir, "checksum_" + name.replace(" ", "")) for name in CHECKSUM_CONFIGS}

    def write(name: str, rows: np.ndarray):
        arr = create_feature_array(paths[name], rows.shape, chunk_rows, *CHECKSUM_CONFIGS[name])
        for s in range(0, len(rows), chunk_rows):
            arr[s : s + chunk_rows] = rows[s : s + chunk_rows]

    def clear(name: str):
        shutil.rmtree(paths[name], ignore_errors=True)
        os.sync()  # untimed: no timed write flushes (or fsyncs behind) an earlier run's dirty pages

    for name in CHECKSUM_CONFIGS:  # untimed warm-up: the crc32c and fsync code paths once each
        write(name, data[: min(n, chunk_rows)])
        clear(name)
    writes = best_in_turns({name: lambda name=name: write(name, data) for name in CHECKSUM_CONFIGS}, repeats, clear)
    arrays = {name: zarr.open_group(paths[name], mode="r")["features"] for name in CHECKSUM_CONFIGS}
    for name, arr in arrays.items():
        checked = any(isinstance(c, Crc32cCodec) for c in arr.compressors)
        if checked != CHECKSUM_CONFIGS[name][0] or not np.array_equal(arr[:], data):
            raise RuntimeError(f"checksum {name}: wrong codecs {arr.compressors} or rows read back differ")

    def scan(arr):
        for s in range(0, n, chunk_rows):
            arr[s : s + chunk_rows]

    # the fsync store reads exactly like LocalStore: its scan would repeat the crc32c one
    scan_fns = {name: lambda a=arrays[name]: scan(a) for name in ("none", "crc32c")}
    scans = best_in_turns(scan_fns, repeats, lambda _: None)
    results = [{"name": name, "write": raw / t / MIB} for name, t in writes.items()]
    for r in results:
        if r["name"] in scans:
            r["scan"] = raw / scans[r["name"]] / MIB
    return results


def warm_up(data: np.ndarray, idx: np.ndarray, workdir: str) -> None:
    """One small untimed pass, so imports and zarr's event loop start are not charged to the first config."""
    bench(spec("warm-up", 1, data.shape[1] * 2), data[:4096], idx[idx < 4096], workdir, 1)


def bench_concurrency(path: str, raw: int, idx: np.ndarray, levels: list[int], repeats: int) -> list[dict]:
    """zarr 3 async.concurrency while 2 threads read disjoint halves (as two dask worker threads do)."""
    import zarr

    arr = zarr.open_array(path, mode="r")
    n, rows = arr.shape[0], arr.chunks[0]
    half = -(-n // 2 // rows) * rows  # split on a chunk boundary
    useful = len(idx) * arr.shape[1] * arr.dtype.itemsize

    def scan(lo: int, hi: int):
        for s in range(lo, hi, rows):
            arr[s : min(s + rows, hi)]

    def two_threads(fns):
        threads = [threading.Thread(target=f) for f in fns]
        [t.start() for t in threads]
        [t.join() for t in threads]

    take = [
        lambda part=part: arr.get_orthogonal_selection((part, slice(None)))
        for part in np.split(idx, [np.searchsorted(idx, half)])
    ]
    results = []
    for c in levels:
        with zarr.config.set({"async.concurrency": c}):
            one = best(lambda: scan(0, n), repeats)
            two = best(lambda: two_threads([lambda: scan(0, half), lambda: scan(half, n)]), repeats)
            gather = best(lambda: two_threads(take), repeats)
        results.append(
            {"name": str(c), "scan_1t": raw / one / MIB, "scan_2t": raw / two / MIB, "gather_2t": useful / gather / MIB}
        )
    return results


def run_zarr2(site: str, specs: list[dict], data_path: str, workdir: str, repeats: int) -> tuple[list, str]:
    """The same benches under zarr-python 2, in a child process; ([], reason) when it cannot run."""
    if not Path(site).is_dir():
        return [], f"{site} does not exist"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")])))
    job = json.dumps({"specs": specs, "data": data_path, "workdir": workdir})
    args = [sys.executable, __file__, "--child", job, "--repeats", str(repeats)]
    proc = subprocess.run(args, check=False, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return [], "child failed: " + (proc.stderr.strip().splitlines() or ["no message"])[-1]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    if not reply["version"].startswith("2."):
        return [], f"child imported zarr {reply['version']}, not zarr 2"
    return reply["results"], reply["version"]


def table(title: str, results: list[dict], base: dict, columns: dict[str, str]) -> None:
    print(f"\n### {title}\n")
    print("| config | " + " | ".join(columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in results:
        cells = [
            "-"
            if k not in r
            else f"{r[k]:.3f}"
            if k == "disk_ratio"
            else f"{r[k]:.0f} ({r[k] / base['write' if k == 'write_aligned' else k]:.2f}x)"
            for k in columns
        ]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")


def spec(name: str, mib: int, row_bytes: int, codec: str | None = None, fmt: int = 3, **extra) -> dict:
    return {"name": name, "chunk_rows": max(1, mib * MIB // row_bytes), "codec": codec, "fmt": fmt, **extra}


def fastest(results: list[dict], key: str) -> str:
    return max(results, key=lambda r: r.get(key, 0))["name"]


def layout_section(
    args: argparse.Namespace, data: np.ndarray, idx: np.ndarray, workdir: str, base_mib: int, concurrency: int
) -> None:
    """Sections 1-5: row chunk size, compression, library and format, async concurrency; tables and conclusions."""
    rb = data.shape[1] * data.itemsize
    sizes = sorted({1, 4, base_mib, 64})
    chunked = [bench(spec(f"{m} MiB", m, rb, aligned=True), data, idx, workdir, args.repeats) for m in sizes]
    base = next(r for r in chunked if r["name"] == f"{base_mib} MiB")
    codecs = [dict(base, name=f"{base_mib} MiB none")]
    codecs += [
        bench(spec(f"{base_mib} MiB {c}", base_mib, rb, c), data, idx, workdir, args.repeats) for c in ("zstd", "lz4")
    ]
    formats = [
        bench(spec(f"zarr3 fmt{f} {m} MiB", m, rb, fmt=f), data, idx, workdir, args.repeats)
        for m in (1, base_mib)
        for f in (3, 2)
    ]
    z2_specs = [spec(f"zarr2 {m} MiB", m, rb, fmt=2) for m in (1, base_mib)]
    z2_specs.append(spec(f"zarr2 {base_mib} MiB lz4", base_mib, rb, "lz4", fmt=2))
    z2, z2_note = [], "no --zarr2-site given"
    if args.zarr2_site:
        np.save(data_path := os.path.join(workdir, "data.npy"), data)
        np.save(data_path.replace(".npy", "_idx.npy"), idx)
        z2, z2_note = run_zarr2(args.zarr2_site, z2_specs, data_path, workdir, args.repeats)
    levels = sorted({1, 4, concurrency, 64})
    conc = bench_concurrency(os.path.join(workdir, f"{base_mib}_MiB"), data.nbytes, idx, levels, args.repeats)

    io_cols = {"write": "write", "scan": "scan", "gather_oindex": "gather oindex", "gather_chunks": "gather per-chunk"}
    table(
        "1. Row chunk size (zarr 3, format 3, uncompressed)",
        chunked,
        base,
        {**io_cols, "write": "write 8192-row blocks", "write_aligned": "write chunk-aligned blocks"},
    )
    table(f"2. Compression at {base_mib} MiB chunks", codecs, base, {"disk_ratio": "disk / raw", **io_cols})
    table("3-4. Library and format" + (f" (zarr2 = zarr-python {z2_note})" if z2 else ""), formats + z2, base, io_cols)
    if not z2:
        print(f"\nzarr-python 2 comparison skipped: {z2_note}")
    table(
        f"5. zarr 3 async.concurrency ({base_mib} MiB chunks, 2 threads on disjoint halves)",
        conc,
        next(r for r in conc if r["name"] == str(concurrency)),
        {"scan_1t": "scan 1 thread", "scan_2t": "scan 2 threads", "gather_2t": "gather oindex 2 threads"},
    )

    print("\n### Conclusions (from the numbers above)\n")
    print(
        f"- chunk size: fastest write {fastest(chunked, 'write')}, scan {fastest(chunked, 'scan')}, "
        f"gather {fastest(chunked, 'gather_oindex')} (oindex) / {fastest(chunked, 'gather_chunks')} (per-chunk)"
    )
    for r in codecs[1:]:
        print(
            f"- {r['name']}: disk/raw {r['disk_ratio']:.3f}, write {r['write'] / base['write']:.2f}x, "
            f"scan {r['scan'] / base['scan']:.2f}x of uncompressed"
        )
    for m in (1, base_mib):
        f3, f2 = (next(r for r in formats if r["name"] == f"zarr3 fmt{f} {m} MiB") for f in (3, 2))
        print(
            f"- zarr 3 format 2 vs format 3 at {m} MiB: write {f2['write'] / f3['write']:.2f}x, "
            f"scan {f2['scan'] / f3['scan']:.2f}x"
        )
        z = next((r for r in z2 if r["name"] == f"zarr2 {m} MiB"), None)
        if z:
            print(
                f"- zarr-python 2 vs 3 at {m} MiB: write {z['write'] / f3['write']:.2f}x, scan "
                f"{z['scan'] / f3['scan']:.2f}x, gather {z['gather_oindex'] / f3['gather_oindex']:.2f}x"
            )
    if "write_aligned" in base:
        print(
            f"- writing 8192-row blocks into {base_mib} MiB chunks (read-modify-write of partial chunks): chunk-"
            f"aligned blocks are {base['write_aligned'] / base['write']:.2f}x faster"
        )
    spread = {k: max(r[k] for r in conc) / min(r[k] for r in conc) for k in ("scan_2t", "gather_2t")}
    print(
        f"- async.concurrency: fastest 2-thread scan at {fastest(conc, 'scan_2t')} (fastest/slowest "
        f"{spread['scan_2t']:.2f}x), 2-thread gather at {fastest(conc, 'gather_2t')} ({spread['gather_2t']:.2f}x); "
        f"default {concurrency}"
    )


def checksum_section(data: np.ndarray, chunk_rows: int, workdir: str, repeats: int, base_mib: int) -> None:
    """Section 6: what wildreid's crc32c codec and DurableLocalStore cost; table and conclusions."""
    results = bench_checksum(data, chunk_rows, workdir, repeats)
    none, crc, durable = results
    title = f"6. Checksum and fsync ({base_mib} MiB uncompressed chunks written in chunk-aligned blocks)"
    table(title, results, none, {"write": "write", "scan": "scan"})
    print("\n### Checksum cost (from the numbers above)\n")
    print(f"- crc32c / none: write {crc['write'] / none['write']:.2f}x, scan {crc['scan'] / none['scan']:.2f}x")
    print(
        f"- DurableLocalStore (fsync) / LocalStore, both crc32c: write {durable['write'] / crc['write']:.2f}x "
        f"({durable['write'] / none['write']:.2f}x of no checksum and no fsync)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("layout", "checksum"), default=None, help="one section (default: both)")
    parser.add_argument("--zarr2-site", default=None, help="folder holding zarr-python 2 (see module docstring)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON job for the zarr 2 side
    args = parser.parse_args()
    if args.child is not None:  # the zarr-python 2 side: same benches, JSON on the last line
        import zarr

        job = json.loads(args.child)
        if not zarr.__version__.startswith("2."):
            return print(json.dumps({"version": zarr.__version__, "results": []}))
        data, idx = np.load(job["data"]), np.load(job["data"].replace(".npy", "_idx.npy"))
        warm_up(data, idx, job["workdir"])
        results = [bench(s, data, idx, job["workdir"], args.repeats) for s in job["specs"]]
        return print(json.dumps({"version": zarr.__version__, "results": results}))

    import zarr

    from wildreid.stores.dictionary import CHUNK_BYTES, rows_per_chunk

    rng = np.random.default_rng(0)
    data = rng.standard_normal((args.n, args.dim), dtype=np.float32)
    data = (data / np.linalg.norm(data, axis=1, keepdims=True)).astype(np.float16)
    idx = np.sort(rng.choice(args.n, size=min(GATHER_ROWS, args.n), replace=False))
    base_mib = CHUNK_BYTES // MIB
    concurrency = zarr.config.get("async.concurrency")
    print(
        f"N={args.n} D={args.dim} float16 = {data.nbytes / MIB:.0f} MiB, best of {args.repeats}; "
        f"zarr {zarr.__version__}, default async.concurrency={concurrency}; MiB/s (ratio to the baseline: sections "
        f"1-5 zarr 3, format 3, {base_mib} MiB uncompressed, no checksum; section 6 its 'none' row); "
        f"gathers count only the {len(idx)} rows asked for"
    )

    with tempfile.TemporaryDirectory(prefix="bench_store_") as workdir:
        warm_up(data, idx, workdir)
        if args.only != "checksum":
            layout_section(args, data, idx, workdir, base_mib, concurrency)
        if args.only != "layout":
            checksum_section(data, rows_per_chunk(args.dim * data.itemsize), workdir, args.repeats, base_mib)


if __name__ == "__main__":
    main()
