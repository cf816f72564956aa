"""Pack a dataset index into deterministic, resumable WebDataset tar shards.

Three phases: scan every image (bad ones are listed, never dropped silently),
plan shard boundaries (a pure function of the scan), write shards in parallel.
Each shard is written under a private ``.partial`` name and renamed when
complete; a small receipt in ``OUT/.progress`` then records its checksum, so a
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
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from wildreid.errors import BadImageError, ShardError, ShardNotFoundError
from wildreid.shards.images import image_extension
from wildreid.shards.layouts import DatasetIndex, Record, Reject

__all__ = [
    "MANIFEST_NAME",
    "Sample",
    "load_manifest",
    "pack_dataset",
    "plan_shards",
    "scan_records",
    "verify_shards",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "wildreid-shards"
FORMAT_VERSION = 1
PROGRESS_DIR = ".progress"
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tar files are padded to whole 10 KiB records

# One call per unit of work: (phase description, units done since last call, phase total).
ProgressFn = Callable[[str, int, int], None]


def _no_progress(phase: str, advance: int, total: int) -> None:
    return None


def _crash_point(name: str) -> None:
    """Test hook: WILDREID_CRASH_AT=<name> kills the process (SIGKILL, as the OOM killer does) right here."""
    if os.environ.get("WILDREID_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Sample:
    """A record that passed the scan, with what the tar needs to know about it."""

    record: Record
    key: str
    ext: str
    size: int
    index: int = -1  # dense index within the split, set by planning

    def json_bytes(self) -> bytes:
        r = self.record
        return f'{{"camid":{r.camid},"index":{self.index},"path":{json.dumps(r.path)},"vid":{r.vid}}}'.encode()

    def tar_bytes(self) -> int:
        return 2 * _BLOCK + _padded(self.size) + _padded(len(self.json_bytes()))


def _padded(n: int) -> int:
    return -(-n // _BLOCK) * _BLOCK


def sample_key(rel_path: str) -> str:
    """Tar key of an image: its path below the split folder, without extension, no dots.

    WebDataset splits a member name at the first dot of its base name, so dots
    inside the stem would corrupt the key.
    """
    parts = rel_path.split("/")[1:]
    stem = "/".join(parts)
    stem = stem.rsplit(".", 1)[0] if "." in parts[-1] else stem
    return stem.replace(".", "_")


# --------------------------------------------------------------------------- scan


def _scan_chunk(root: str, records: Sequence[Record]) -> list[tuple[Record, str, int] | Reject]:
    out: list[tuple[Record, str, int] | Reject] = []
    for record in records:
        try:
            data = _read_file(f"{root}/{record.path}")
        except FileNotFoundError:
            out.append(Reject(record.split, record.path, "missing file"))
            continue
        except OSError as exc:
            out.append(Reject(record.split, record.path, f"unreadable ({exc.strerror or exc})"))
            continue
        try:
            out.append((record, image_extension(data), len(data)))
        except BadImageError as exc:
            out.append(Reject(record.split, record.path, str(exc)))
    return out


def scan_records(
    index: DatasetIndex, *, pool: ProcessPoolExecutor | None = None, progress: ProgressFn = _no_progress
) -> tuple[dict[str, list[Sample]], list[Reject]]:
    """Check every image; return the healthy samples per split and every reject (reader's included)."""
    chunks: list[list[Record]] = []
    for records in index.records.values():
        chunks.extend(records[i : i + 256] for i in range(0, len(records), 256))
    total = index.count()
    results: Iterator[list]
    if pool is None:
        results = (_scan_chunk(str(index.root), chunk) for chunk in chunks)
    else:
        results = pool.map(_scan_chunk, [str(index.root)] * len(chunks), chunks)
    samples: dict[str, list[Sample]] = {split: [] for split in index.records}
    rejects = list(index.rejects)
    keys_seen: dict[str, set[str]] = {split: set() for split in index.records}
    for chunk_result in results:
        for item in chunk_result:
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            record, ext, size = item
            key = sample_key(record.path)
            if key in keys_seen[record.split]:
                rejects.append(Reject(record.split, record.path, f"duplicate key {key!r} (same name, other extension)"))
                continue
            keys_seen[record.split].add(key)
            samples[record.split].append(Sample(record, key, ext, size))
        progress("scanning images", len(chunk_result), total)
    return samples, sorted(rejects, key=lambda r: (r.split, r.path))


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ShardPlan:
    split: str
    number: int
    samples: tuple[Sample, ...]

    @property
    def file(self) -> str:
        return f"{self.split}/{self.split}-{self.number:06d}.tar"

    def digest(self) -> str:
        """Fingerprint of what the shard must contain; a receipt is trusted only if it matches."""
        h = hashlib.sha256(f"{FORMAT}/{FORMAT_VERSION}".encode())
        for s in self.samples:
            h.update(f"\n{s.key}.{s.ext}:{s.size}:".encode() + s.json_bytes())
        return h.hexdigest()


def plan_shards(split: str, samples: Sequence[Sample], *, max_samples: int, max_bytes: int) -> list[ShardPlan]:
    """Cut a split's samples, in order, into shards of at most max_samples and max_bytes each.

    A single sample bigger than max_bytes still gets a shard of its own.
    """
    plans: list[ShardPlan] = []
    current: list[Sample] = []
    current_bytes = 0
    for i, sample in enumerate(samples):
        sample = Sample(sample.record, sample.key, sample.ext, sample.size, index=i)
        cost = sample.tar_bytes()
        if current and (len(current) >= max_samples or current_bytes + cost + 2 * _BLOCK > max_bytes):
            plans.append(ShardPlan(split, len(plans), tuple(current)))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += cost
    if current:
        plans.append(ShardPlan(split, len(plans), tuple(current)))
    return plans


# --------------------------------------------------------------------------- write


class _ShardSink:
    """Buffers tar members and writes them in large blocks, hashing what goes to disk."""

    def __init__(self, f, flush_at: int = 4 << 20):
        self.f, self.flush_at = f, flush_at
        self.sha = hashlib.sha256()
        self.size = 0
        self.parts: list[bytes] = []
        self.pending = 0

    def add(self, name: str, data: bytes) -> None:
        self.parts += (_tar_header(name, len(data)), data, _ZEROS[: -len(data) % _BLOCK])
        self.pending += _BLOCK + _padded(len(data))
        if self.pending >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        block = b"".join(self.parts)
        self.f.write(block)
        self.sha.update(block)
        self.size += len(block)
        self.parts, self.pending = [], 0

    def close(self) -> None:
        end = 2 * _BLOCK + (-(self.size + self.pending + 2 * _BLOCK) % _RECORD)
        self.parts.append(bytes(end))
        self.flush()


_ZEROS = bytes(_BLOCK)
# A ustar header with every field this writer fixes (mode 0444, uid/gid 0, mtime 0, no user names);
# only the name, size and checksum change from member to member.
_TEMPLATE = bytearray(_BLOCK)
_TEMPLATE[100:108] = b"0000444\0"
_TEMPLATE[108:124] = b"0000000\0" * 2
_TEMPLATE[136:148] = b"00000000000\0"
_TEMPLATE[148:156] = b" " * 8  # the checksum counts its own field as spaces
_TEMPLATE[156:157] = b"0"
_TEMPLATE[257:265] = b"ustar\x0000"
_TEMPLATE = bytes(_TEMPLATE)
_TEMPLATE_SUM = sum(_TEMPLATE)


def _tar_header(name: str, size: int) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)  # long or non-ASCII names need the general (PAX) encoder
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field) - sum(_TEMPLATE[124:136])
    return b"".join((
        raw, _TEMPLATE[len(raw) : 124], size_field, _TEMPLATE[136:148],
        b"%06o\0 " % checksum, _TEMPLATE[156:],
    ))  # fmt: skip


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) <= size:  # short read (or the file grew): read the rest
            rest = [data]
            while chunk := os.read(fd, 1 << 20):
                rest.append(chunk)
            data = b"".join(rest)
        return data
    finally:
        os.close(fd)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_receipt(out: Path, plan: ShardPlan, sha256: str, nbytes: int) -> None:
    receipt = out / PROGRESS_DIR / f"{plan.split}-{plan.number:06d}.json"
    _atomic_write_text(receipt, json.dumps({"plan": plan.digest(), "sha256": sha256, "bytes": nbytes}))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_shard(root: str, out: str, plan: ShardPlan) -> tuple[str, int]:
    """Write one shard atomically and leave its receipt; returns (sha256, bytes)."""
    final = Path(out) / plan.file
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps an orphaned writer from a killed run off this run's file.
    partial = final.with_name(f"{final.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as f:
            sink = _ShardSink(f)
            for i, sample in enumerate(plan.samples):
                if i == len(plan.samples) // 2:
                    _crash_point(f"mid-shard:{plan.file}")
                data = _read_file(f"{root}/{sample.record.path}")
                if len(data) != sample.size:
                    raise ShardError(
                        f"{sample.record.path} changed while packing (was {sample.size} bytes, now {len(data)}); "
                        "re-run when the source is stable"
                    )
                sink.add(f"{sample.key}.{sample.ext}", data)
                sink.add(f"{sample.key}.json", sample.json_bytes())
            sink.close()
        # Receipt first: a shard that exists under its final name always has one.
        _write_receipt(Path(out), plan, sink.sha.hexdigest(), sink.size)
        os.replace(partial, final)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ShardError(
                f"disk full while writing {final}; free space and re-run the same command "
                "(finished shards are kept and reused)"
            ) from None
        raise
    return sink.sha.hexdigest(), sink.size


def _reusable(out: Path, plan: ShardPlan, known: dict[str, tuple[str, str]]) -> tuple[str, int] | None:
    """(sha256, bytes) of an existing shard that verifies against its receipt or the old manifest."""
    final = out / plan.file
    if not final.is_file():
        return None
    expected = set()
    receipt = out / PROGRESS_DIR / f"{plan.split}-{plan.number:06d}.json"
    try:
        r = json.loads(receipt.read_text())
        if r.get("plan") == plan.digest():
            expected.add(r["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    if known.get(plan.file, ("", ""))[0] == plan.digest():
        expected.add(known[plan.file][1])
    if not expected:
        return None
    sha = _file_sha256(final)
    return (sha, final.stat().st_size) if sha in expected else None


# --------------------------------------------------------------------------- processes


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose parent was killed (kill -9, OOM) exits instead of lingering."""

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
    elif any(out.iterdir()):
        raise ShardError(f"output folder {out} is not empty and holds no wildreid shards; choose a new folder")
    if owner is not None and owner != (source, layout):
        raise ShardError(
            f"output folder {out} holds shards of {owner[0]} ({owner[1]} layout), not of {source}; "
            "choose a new folder or delete it"
        )
    return known


def _stale_files(out: Path, plans: Sequence[ShardPlan], splits: Sequence[str]) -> list[Path]:
    wanted = {out / p.file for p in plans}
    stale = []
    for split in splits:
        folder = out / split
        if folder.is_dir():
            stale += [p for p in folder.glob(f"{split}-*.tar*") if p not in wanted]
    if out.is_dir():
        stale += [p for p in out.glob("*/*.tar") if p.parent.name not in splits]
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
) -> dict:
    """Shard every split of ``index`` into ``out``; returns the manifest that was written."""
    if max_samples < 1 or max_bytes < 4 * _BLOCK:
        raise ShardError(f"expected --max-samples >= 1 and --max-bytes >= 2048, found {max_samples} and {max_bytes}")
    out = Path(out).resolve()
    source = str(index.root)
    known = _check_out_folder(out, source, index.layout)
    pool = worker_pool(workers)
    try:
        samples, rejects = scan_records(index, pool=pool, progress=progress)
        if strict and rejects:
            first = rejects[0]
            raise BadImageError(
                f"--strict: {len(rejects)} bad input(s), first {first.path}: {first.reason}; "
                "nothing was written (drop --strict to skip and list them)"
            )
        plans = [
            plan
            for split, split_samples in samples.items()
            for plan in plan_shards(split, split_samples, max_samples=max_samples, max_bytes=max_bytes)
        ]
        _atomic_write_text(
            out / PROGRESS_DIR / "job.json", json.dumps({"source": source, "layout": index.layout})
        )
        _crash_point("scanned")
        results = _write_all(out, source, plans, known, pool, progress)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    for stale in _stale_files(out, plans, list(samples)):
        stale.unlink(missing_ok=True)
    manifest = _manifest(index, samples, plans, results, rejects, max_samples, max_bytes)
    _atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    _crash_point("manifest")
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return manifest


def _write_all(out, source, plans, known, pool, progress) -> dict[str, tuple[str, int]]:
    total = sum(len(p.samples) for p in plans)
    results: dict[str, tuple[str, int]] = {}
    todo = []
    for plan in plans:
        reused = _reusable(out, plan, known)
        if reused is not None:
            results[plan.file] = reused
            progress("writing shards", len(plan.samples), total)
        else:
            todo.append(plan)
    if pool is None:
        for plan in todo:
            results[plan.file] = write_shard(source, str(out), plan)
            progress("writing shards", len(plan.samples), total)
            _crash_point(f"shard:{plan.file}")
    else:
        futures = {plan.file: pool.submit(write_shard, source, str(out), plan) for plan in todo}
        for plan in todo:
            results[plan.file] = futures[plan.file].result()
            progress("writing shards", len(plan.samples), total)
            _crash_point(f"shard:{plan.file}")
    return results


def _manifest(index, samples, plans, results, rejects, max_samples, max_bytes) -> dict:
    splits = {}
    for split in samples:
        shards = [
            {
                "file": p.file,
                "samples": len(p.samples),
                "first_index": p.samples[0].index,
                "bytes": results[p.file][1],
                "sha256": results[p.file][0],
                "plan": p.digest(),
            }
            for p in plans
            if p.split == split
        ]
        splits[split] = {
            "num_samples": len(samples[split]),
            "num_bytes": sum(s["bytes"] for s in shards),
            "num_vehicles": len({s.record.vid for s in samples[split]}),
            "num_cameras": len({s.record.camid for s in samples[split]}),
            "shards": shards,
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": index.layout,
        "source": str(index.root),
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
        elif _file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: sha256 differs from the manifest (corrupted)")
        progress("verifying shards", shard["samples"], total)
    return problems
