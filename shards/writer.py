"""Pack a dataset index into deterministic, resumable WebDataset tar shards.

Every image is read once: shard boundaries are planned from file sizes, and
each shard checks its images while writing them. A shard that meets a bad image
(truncated, empty, undecodable, vanished) is not kept; the bad images are
listed, the plan is redrawn without them, and only shards whose contents
changed are written again. ``strict`` instead checks everything first and
fails before writing anything.

Each shard is written under a private ``.partial`` name and renamed when
complete, after a receipt in ``OUT/.progress`` has recorded its checksum, so a
re-run after a crash reuses every shard whose bytes still verify. The manifest
is written last and the receipts are removed, so an interrupted and resumed run
ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wildreid.core.durable import atomic_write, file_sha256, publish
from wildreid.core.errors import BadImageError, ShardError, ShardNotFoundError, Stopped
from wildreid.core.signals import fault_point, ignore_stop_signals
from wildreid.shards.images import image_extension
from wildreid.shards.layouts import DatasetIndex, Record, Reject
from wildreid.shards.tario import BLOCK, ShardSink, padded, read_file, scan_sample_offsets
from wildreid.stores.lock import LOCK_NAME, WriterLock

__all__ = [
    "MANIFEST_NAME",
    "Sample",
    "index_path",
    "load_manifest",
    "load_sample_offsets",
    "pack_dataset",
    "plan_shards",
    "scan_records",
    "stat_records",
    "verify_shards",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "wildreid-shards"
FORMAT_VERSION = 1
PROGRESS_DIR = ".progress"
# Beside each shard, the byte offset where each of its samples begins, then where the last one ends,
# as little-endian uint64: the reader seeks to any sample without holding the shard in memory.
INDEX_SUFFIX = ".idx"

# One call per unit of work: (phase description, units done since last call, phase total).
ProgressFn = Callable[[str, int, int], None]


def _no_progress(phase: str, advance: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class Sample:
    """A record to pack, with its tar key and the size its file had when listed."""

    record: Record
    key: str
    size: int

    def meta(self, index: int) -> bytes:
        """The sample's .json member (sorted keys, no spaces), built without json.dumps of a dict."""
        r = self.record
        return f'{{"camid":{r.camid},"index":{index},"path":{json.dumps(r.path)},"vid":{r.vid}}}'.encode()


def sample_key(rel_path: str, split_folders: bool = True) -> str:
    """Tar key of an image: its path below the split folder (``split_folders``; else the whole
    path), without extension, no dots.

    WebDataset splits a member name at the first dot of its base name, so dots
    inside the stem would corrupt the key (``../`` of a list's image outside its folder becomes ``__/``).
    """
    parts = rel_path.split("/")[1:] if split_folders else rel_path.split("/")
    stem = "/".join(parts)
    stem = stem.rsplit(".", 1)[0] if "." in parts[-1] else stem
    return stem.replace(".", "_")


# --------------------------------------------------------------------------- listing and checking


def _samples(
    index: DatasetIndex,
    sizes: Callable[[str, list[Record]], list[int | str]],
    progress: ProgressFn,
    should_stop: Callable[[], bool] = lambda: False,
):
    """Samples per split and rejects, given a function giving each record's size or why it is bad.

    Nothing is written while listing, so a stop asked for here ends it at once (Stopped)."""
    samples: dict[str, list[Sample]] = {}
    rejects = list(index.rejects)
    for split, records in index.records.items():
        samples[split], seen = [], set()
        for start in range(0, len(records), 512):
            if should_stop():
                raise Stopped(
                    "sharding stopped while listing and checking images, before anything was written; "
                    "run the same command again"
                )
            chunk = records[start : start + 512]
            for record, size in zip(chunk, sizes(split, chunk)):
                key = sample_key(record.path, index.split_folders)
                if isinstance(size, str):
                    rejects.append(Reject(split, record.path, size))
                elif key in seen:
                    rejects.append(
                        Reject(split, record.path, f"duplicate key {key!r} (same name, other extension or dots)")
                    )
                else:
                    seen.add(key)
                    samples[split].append(Sample(record, key, size))
            progress("listing images", len(chunk), index.count())
    return samples, rejects


def _stat_chunk(root: str, paths: Sequence[str]) -> list[int | str]:
    out: list[int | str] = []
    for path in paths:
        try:
            out.append(os.stat(f"{root}/{path}").st_size)
        except FileNotFoundError:
            out.append("missing file")
        except OSError as exc:
            out.append(f"unreadable ({exc.strerror or exc})")
    return out


def _scan_chunk(root: str, paths: Sequence[str]) -> list[int | str]:
    """Size of each healthy image, or the reason it is bad (plain values pickle fast)."""
    out: list[int | str] = []
    for path in paths:
        try:
            data = read_file(f"{root}/{path}")
            image_extension(data)
            out.append(len(data))
        except FileNotFoundError:
            out.append("missing file")
        except BadImageError as exc:
            out.append(str(exc))
        except OSError as exc:
            out.append(f"unreadable ({exc.strerror or exc})")
    return out


def _pooled(index: DatasetIndex, pool: ProcessPoolExecutor | None, check: Callable) -> Callable:
    """The per-chunk function for :func:`_samples`, its chunks computed ahead in the pool if there is one."""
    root = str(index.root)
    if pool is None:
        return lambda split, chunk: check(root, [r.path for r in chunk])
    futures = {
        (split, start): pool.submit(check, root, [r.path for r in records[start : start + 512]])
        for split, records in index.records.items()
        for start in range(0, len(records), 512)
    }
    positions: dict[str, int] = {}

    def sizes(split: str, chunk: list[Record]) -> list[int | str]:
        start = positions.get(split, 0)
        positions[split] = start + len(chunk)
        return futures[split, start].result()

    return sizes


def stat_records(
    index: DatasetIndex,
    *,
    pool: ProcessPoolExecutor | None = None,
    progress: ProgressFn = _no_progress,
    should_stop: Callable[[], bool] = lambda: False,
):
    """Samples from file sizes alone (images are checked while shards are written)."""
    return _samples(index, _pooled(index, pool, _stat_chunk), progress, should_stop)


def scan_records(
    index: DatasetIndex,
    *,
    pool: ProcessPoolExecutor | None = None,
    progress: ProgressFn = _no_progress,
    should_stop: Callable[[], bool] = lambda: False,
):
    """Samples after reading and checking every image: what ``strict`` needs before writing anything."""
    return _samples(index, _pooled(index, pool, _scan_chunk), progress, should_stop)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardPlan:
    """What one shard holds, in plain tuples (cheap to send to a worker process)."""

    split: str
    number: int
    first_index: int
    paths: tuple[str, ...]  # source files, relative to the dataset root
    keys: tuple[str, ...]
    metas: tuple[bytes, ...]  # .json members
    sizes: tuple[int, ...]  # image sizes when listed
    digest: str  # fingerprint of all the above: a receipt is trusted only if it matches

    @property
    def file(self) -> str:
        return f"{self.split}/{self.split}-{self.number:06d}.tar"

    def __len__(self) -> int:
        return len(self.paths)


def _make_plan(split: str, number: int, first_index: int, samples: Sequence[Sample], metas: list[bytes]) -> ShardPlan:
    keys = tuple(s.key for s in samples)
    sizes = tuple(s.size for s in samples)
    fingerprint = b"\n".join(b"%s:%d:%s" % (k.encode(), n, m) for k, n, m in zip(keys, sizes, metas))
    digest = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}\n".encode() + fingerprint).hexdigest()
    return ShardPlan(
        split, number, first_index, tuple(s.record.path for s in samples), keys, tuple(metas), sizes, digest
    )


def plan_shards(split: str, samples: Sequence[Sample], *, max_samples: int, max_bytes: int) -> list[ShardPlan]:
    """Cut a split's samples, in order, into shards of at most max_samples and max_bytes each.

    A single sample bigger than max_bytes still gets a shard of its own.
    """
    plans: list[ShardPlan] = []
    start, current_bytes, metas = 0, 0, []
    for i, sample in enumerate(samples):
        meta = sample.meta(i)
        cost = 2 * BLOCK + padded(sample.size) + padded(len(meta))
        if i > start and (i - start >= max_samples or current_bytes + cost + 2 * BLOCK > max_bytes):
            plans.append(_make_plan(split, len(plans), start, samples[start:i], metas))
            start, current_bytes, metas = i, 0, []
        metas.append(meta)
        current_bytes += cost
    if metas:
        plans.append(_make_plan(split, len(plans), start, samples[start:], metas))
    return plans


# --------------------------------------------------------------------------- write


def _write_receipt(out: Path, plan: ShardPlan, sha256: str, nbytes: int) -> None:
    receipt = out / PROGRESS_DIR / f"{plan.split}-{plan.number:06d}.json"
    atomic_write(receipt, json.dumps({"plan": plan.digest, "sha256": sha256, "bytes": nbytes}))


@dataclass(frozen=True)
class ShardResult:
    sha256: str
    nbytes: int
    bad: tuple[tuple[str, str], ...] = ()  # (path, reason); when not empty, no shard was kept
    index_sha256: str = ""


def index_path(shard: str | Path) -> Path:
    """The sample-offset index beside a shard file."""
    shard = Path(shard)
    return shard.with_name(shard.name + INDEX_SUFFIX)


def _write_index(shard: Path, offsets) -> str:
    """Write the offset index of ``shard`` atomically; its sha256 (what the manifest records)."""
    data = np.asarray(offsets, dtype="<u8").tobytes()
    atomic_write(index_path(shard), data)
    return hashlib.sha256(data).hexdigest()


def load_sample_offsets(
    shard: str | Path, samples: int, *, sha256: str | None = None, shard_bytes: int | None = None
) -> np.ndarray:
    """The ``samples + 1`` sample offsets of a shard: its index file, or one scan of its headers if it has none.

    A present index must match ``sha256`` (the manifest's) and fit the shard, else ShardError: a damaged index
    is reported, not silently replaced.
    """
    shard, path = Path(shard), index_path(shard)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    if data is None:
        try:
            offsets = np.asarray(scan_sample_offsets(shard), dtype=np.int64)
        except FileNotFoundError:
            raise ShardNotFoundError(
                f"shard {shard} is missing; run 'wildreid shard --verify' on the shard folder"
            ) from None
    else:
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise ShardError(
                f"{path}: sha256 differs from the manifest (damaged index); delete it (the reader "
                "then scans the shard) or re-run 'wildreid shard'"
            )
        offsets = np.frombuffer(data, dtype="<u8").astype(np.int64) if len(data) % 8 == 0 else np.zeros(0, np.int64)
    size = shard_bytes if shard_bytes is not None else (shard.stat().st_size if shard.exists() else None)
    if len(offsets) != samples + 1 or (np.diff(offsets) <= 0).any() or (size is not None and offsets[-1] > size):
        raise ShardError(
            f"{shard}: its index lists {len(offsets) - 1} samples in {offsets[-1] if len(offsets) else 0}"
            f" bytes, the manifest says {samples} samples in {size} bytes; run 'wildreid shard --verify'"
        )
    return offsets


def write_shard(root: str, out: str, plan: ShardPlan) -> ShardResult:
    """Write one shard atomically, checking every image on the way."""
    final = Path(out) / plan.file
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps an orphaned writer from a killed run off this run's file.
    partial = final.with_name(f"{final.name}.{os.getpid()}.partial")
    bad: list[tuple[str, str]] = []
    offsets: list[int] = []
    try:
        with partial.open("wb") as f:
            sink = ShardSink(f)
            for i, (path, key, meta, size) in enumerate(zip(plan.paths, plan.keys, plan.metas, plan.sizes)):
                if i == len(plan) // 2:
                    fault_point(f"mid-shard:{plan.file}")
                try:
                    data = read_file(f"{root}/{path}", size)
                    ext = image_extension(data)
                except FileNotFoundError:
                    bad.append((path, "missing file"))
                    continue
                except BadImageError as exc:
                    bad.append((path, str(exc)))
                    continue
                if len(data) != size:
                    raise ShardError(
                        f"{path} changed while packing (was {size} bytes, now {len(data)}); "
                        "re-run when the source is stable"
                    )
                if not bad:  # after the first bad image, only check the rest
                    offsets.append(sink.position)
                    sink.add(f"{key}.{ext}", data)
                    sink.add(f"{key}.json", meta)
            if not bad:
                offsets.append(sink.position)
                sink.close()
        if bad:
            partial.unlink()
            return ShardResult("", 0, tuple(bad))
        # Index and receipt first: a shard that exists under its final name always has both.
        index_sha = _write_index(final, offsets)
        _write_receipt(Path(out), plan, sink.sha.hexdigest(), sink.size)
        publish(partial, final)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ShardError(
                f"disk full while writing {final}; free space and re-run the same command "
                "(finished shards are kept and reused)"
            ) from None
        raise
    return ShardResult(sink.sha.hexdigest(), sink.size, index_sha256=index_sha)


def _reused_index(final: Path, samples: int) -> str:
    """sha256 of a kept shard's index; written from a scan when missing or not matching the shard."""
    scanned = scan_sample_offsets(final)  # headers only: one seek per member
    if index_path(final).is_file():
        try:
            # an index that fits the shard but points elsewhere (an earlier wildreid miscounted a shard
            # with multi-block PAX headers) is replaced too
            if np.array_equal(load_sample_offsets(final, samples), scanned):
                return file_sha256(index_path(final))
        except ShardError:
            pass  # an index of another shard or a damaged one: replaced below
    return _write_index(final, scanned)


def _reusable(out: Path, plan: ShardPlan, known: dict[str, tuple[str, str]]) -> ShardResult | None:
    """An existing shard that verifies against its receipt or the old manifest."""
    final = out / plan.file
    if not final.is_file():
        return None
    expected = set()
    receipt = out / PROGRESS_DIR / f"{plan.split}-{plan.number:06d}.json"
    try:
        r = json.loads(receipt.read_text())
        if r.get("plan") == plan.digest:
            expected.add(r["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    if known.get(plan.file, ("", ""))[0] == plan.digest:
        expected.add(known[plan.file][1])
    if not expected:
        return None
    sha = file_sha256(final)
    if sha not in expected:
        return None
    return ShardResult(sha, final.stat().st_size, index_sha256=_reused_index(final, len(plan)))


def _write_all(out, root, plans, known, pool, progress, should_stop) -> dict[str, ShardResult]:
    """Write (or reuse) every shard of ``plans``, reading images below ``root``."""
    total = sum(len(p) for p in plans)
    results: dict[str, ShardResult] = {}
    todo = []
    for plan in plans:
        reused = _reusable(out, plan, known)
        if reused is not None:
            results[plan.file] = reused
            progress("writing shards", len(plan), total)
        else:
            todo.append(plan)
    if pool is None:
        done: Iterator = ((plan, write_shard(root, str(out), plan)) for plan in todo)
    else:
        futures = [(plan, pool.submit(write_shard, root, str(out), plan)) for plan in todo]
        done = ((plan, future.result()) for plan, future in futures)
    for plan, result in done:
        results[plan.file] = result
        progress("writing shards", len(plan), total)
        fault_point(f"shard:{plan.file}")
        if should_stop():
            raise Stopped(
                f"sharding stopped after {plan.file} ({len(results)} of {len(plans)} shards written); "
                "run the same command again to resume"
            )
    return results


# --------------------------------------------------------------------------- processes


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose parent was killed (kill -9, OOM) exits instead of lingering;
    stop signals are its parent's to handle (it finishes the shard it is writing)."""
    ignore_stop_signals()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def worker_pool(workers: int) -> ProcessPoolExecutor | None:
    """Worker processes that die with their parent, or None for a single process."""
    if workers <= 1:
        return None
    # Forking is much faster to start, but unsafe once torch (and its thread pools) is loaded.
    ctx = multiprocessing.get_context("spawn" if "torch" in sys.modules else "fork")
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=_exit_with_parent, initargs=(os.getpid(),))


# --------------------------------------------------------------------------- manifest


def load_manifest(out: str | Path) -> dict:
    path = Path(out) / MANIFEST_NAME
    if not path.is_file():
        raise ShardNotFoundError(f"no {MANIFEST_NAME} in {out}: expected a folder written by 'wildreid shard'")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise ShardError(f"{path} is not valid JSON ({exc}); re-run 'wildreid shard' to rewrite it") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{path} is not a wildreid shard manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise ShardError(
            f"{path} has shard format version {manifest.get('version')}, this wildreid reads {FORMAT_VERSION}; "
            "re-shard the dataset"
        )
    return manifest


def _check_out_folder(out: Path, source: str, layout: str) -> dict[str, tuple[str, str]]:
    """Refuse folders holding something else; return {file: (plan digest, sha256)} of an old manifest."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise ShardError(f"output {out} exists and is not a folder")
    job = out / PROGRESS_DIR / "job.json"
    owner = None
    known: dict[str, tuple[str, str]] = {}
    if (out / MANIFEST_NAME).is_file():
        manifest = load_manifest(out)
        owner = (manifest.get("source"), manifest.get("layout"))
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                known[shard["file"]] = (shard["plan"], shard["sha256"])
    elif job.is_file():
        try:
            j = json.loads(job.read_text())
            owner = (j.get("source"), j.get("layout"))
        except ValueError:
            owner = None
    elif any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ShardError(f"output folder {out} is not empty and holds no wildreid shards; choose a new folder")
    if owner is not None and owner != (source, layout):
        raise ShardError(
            f"output folder {out} holds shards of {owner[0]} ({owner[1]} layout), not of {source}; "
            "choose a new folder or delete it"
        )
    return known


def _stale_files(out: Path, plans: Sequence[ShardPlan], splits: Sequence[str]) -> list[Path]:
    wanted = {out / p.file for p in plans} | {index_path(out / p.file) for p in plans}
    stale = []
    for split in splits:
        folder = out / split
        if folder.is_dir():
            stale += [p for p in folder.glob(f"{split}-*.tar*") if p not in wanted]
    if out.is_dir():
        stale += [p for p in out.glob("*/*.tar*") if p.parent.name not in splits and p.parent.name != PROGRESS_DIR]
    return stale


def pack_dataset(
    index: DatasetIndex,
    out: str | Path,
    *,
    max_samples: int = 10_000,
    max_bytes: int = 1 << 30,
    workers: int = 1,
    strict: bool = False,
    progress: ProgressFn = _no_progress,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Shard every split of ``index`` into ``out``; returns the manifest that was written.

    The folder's writer lock is held throughout. When ``should_stop()`` turns true,
    :class:`Stopped` is raised after the shard being written: a re-run reuses every
    finished shard.
    """
    if max_samples < 1 or max_bytes < 4 * BLOCK:
        raise ShardError(f"expected --max-samples >= 1 and --max-bytes >= 2048, found {max_samples} and {max_bytes}")
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise ShardError(f"output {out} exists and is not a folder")
    if not (out / LOCK_NAME).exists():  # a folder with a lock is ours: the lock decides first (a live writer's
        # half-written files would otherwise read as a folder of others), then _pack checks it
        _check_out_folder(out, str(index.source), index.layout)  # before the lock file goes into a folder of others
    with WriterLock(out, log=log):
        return _pack(index, out, max_samples, max_bytes, workers, strict, progress, should_stop)


def _pack(index: DatasetIndex, out: Path, max_samples, max_bytes, workers, strict, progress, should_stop) -> dict:
    source, root = str(index.source), str(index.root)  # what was read; where its record paths start
    known = _check_out_folder(out, source, index.layout)
    pool = worker_pool(workers)
    try:
        if strict:
            samples, rejects = scan_records(index, pool=pool, progress=progress, should_stop=should_stop)
            if rejects:
                first = rejects[0]
                raise BadImageError(
                    f"--strict: {len(rejects)} bad input(s), first {first.path}: {first.reason}; "
                    "nothing was written (drop --strict to skip and list them)"
                )
        else:
            samples, rejects = stat_records(index, pool=pool, progress=progress, should_stop=should_stop)
        atomic_write(out / PROGRESS_DIR / "job.json", json.dumps({"source": source, "layout": index.layout}))
        fault_point("scanned")
        while True:
            plans = [
                plan
                for split, split_samples in samples.items()
                for plan in plan_shards(split, split_samples, max_samples=max_samples, max_bytes=max_bytes)
            ]
            results = _write_all(out, root, plans, known, pool, progress, should_stop)
            bad = {(plan.split, path): reason for plan in plans for path, reason in results[plan.file].bad}
            if not bad:
                break
            # Every image has now been read once, so this second plan is the last.
            rejects += [Reject(split, path, reason) for (split, path), reason in bad.items()]
            samples = {
                split: [s for s in split_samples if (split, s.record.path) not in bad]
                for split, split_samples in samples.items()
            }
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for stale in _stale_files(out, plans, list(samples)):
        stale.unlink(missing_ok=True)
    rejects.sort(key=lambda r: (r.split, r.path))
    manifest = _manifest(index, samples, plans, results, rejects, max_samples, max_bytes)
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    fault_point("manifest")
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


def _manifest(index, samples, plans, results, rejects, max_samples, max_bytes) -> dict:
    splits = {}
    for split in samples:
        shards = [
            {
                "file": p.file,
                "samples": len(p),
                "first_index": p.first_index,
                "bytes": results[p.file].nbytes,
                "sha256": results[p.file].sha256,
                "index_sha256": results[p.file].index_sha256,
                "plan": p.digest,
            }
            for p in plans
            if p.split == split
        ]
        splits[split] = {
            "num_samples": len(samples[split]),
            "num_bytes": sum(s["bytes"] for s in shards),
            # known ids only: -1 (unknown) is no vehicle or camera
            "num_vehicles": len({s.record.vid for s in samples[split]} - {-1}),
            "num_cameras": len({s.record.camid for s in samples[split]} - {-1}),
            "num_unlabelled": sum(s.record.vid < 0 for s in samples[split]),
            "shards": shards,
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": index.layout,
        "source": str(index.source),
        "options": {"max_samples": max_samples, "max_bytes": max_bytes},
        "splits": splits,
        "skipped": [{"split": r.split, "path": r.path, "reason": r.reason} for r in rejects],
    }


# --------------------------------------------------------------------------- verify


def verify_shards(out: str | Path, *, progress: ProgressFn = _no_progress) -> list[str]:
    """Problems found re-checking every shard against the manifest (empty list: all good)."""
    out = Path(out)
    manifest = load_manifest(out)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    total = sum(s["samples"] for s in shards)
    problems = []
    for shard in shards:
        path = out / shard["file"]
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['file']}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
        elif file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (corrupted)")
        else:
            index = index_path(path)
            if shard.get("index_sha256") and not index.is_file():
                problems.append(
                    f"{index.relative_to(out)}: missing (the reader scans the shard instead; "
                    "re-run 'wildreid shard' to write it)"
                )
            elif shard.get("index_sha256") and file_sha256(index) != shard["index_sha256"]:
                problems.append(f"{index.relative_to(out)}: sha256 differs from the manifest (corrupted)")
            elif index.is_file() and not np.array_equal(np.fromfile(index, dtype="<u8"), scan_sample_offsets(path)):
                problems.append(
                    f"{index.relative_to(out)}: offsets differ from the shard's headers; re-run 'wildreid shard' "
                    "to rewrite it"
                )
        progress("verifying shards", shard["samples"], total)
    return problems
