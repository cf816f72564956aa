"""Embedding: the features of any image source into a feature group that ``wildreid search`` can query.

A source is a shard split (``wildreid shard`` output and ``--split``), an image
folder or a list file (read by :mod:`wildreid.shards.layouts`). Images are decoded
and resized exactly as the shard reader does (``decode_tensor``, ``resize_uint8``)
and go through the model in eval mode (``extract_features``), so a shard split
embedded here gives the rows ``wildreid eval`` extracts from it.

The group is the store format (``features``, ``ids``, ``camids``) plus ``keys``
(each row's image path, relative to the source's root) and a ``source`` attribute
that says where the images are (``kind``, ``root``, ``split``), which is how a
search draws them. Rows are written in whole chunks by
:func:`wildreid.extract.write_features`; after each chunk the rows done are
recorded, so a killed embedding resumes at its first unfinished chunk. The record
names the input (split name and shard digests, or a digest of the image paths,
sizes and modification times) and the checkpoint (its sha256): a group holding
rows of other inputs or another checkpoint with the same shape is embedded again
from row 0; one of another shape is refused.

``memory_budget`` bounds what embedding allocates beyond the loaded model: the
features buffered until a whole chunk is written (chunks are 16 MiB, or an eighth
of the budget when that is smaller) and one batch's forward pass, counted per
image as the decoded and normalised input plus two of the network's largest
activations (measured with :func:`wildreid.run_budget.activation_bytes`; on CUDA
the activations are device memory and only the input counts). The batch is the
largest divisor of the chunk height that fits, at most 256 (what extraction uses),
so batches never straddle a chunk and a resumed run forms the very batches of an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wildreid.budget import default_budget
from wildreid.checkpoint import load_model
from wildreid.core.durable import file_sha256
from wildreid.core.errors import BadImageError, ConfigError
from wildreid.core.signals import fault_point
from wildreid.extract import (
    EXTRACT_BATCH,
    extract_split,
    extraction_meta,
    rows_done,
    split_fingerprint,
    write_features,
)
from wildreid.run_budget import activation_bytes
from wildreid.shards.layouts import read_dataset
from wildreid.shards.reader import decode_tensor, resize_uint8, split_entry, split_labels
from wildreid.shards.writer import MANIFEST_NAME, load_manifest
from wildreid.stores import CHUNK_BYTES, FeatureStore, WriterLock, rows_per_chunk, writable_group

__all__ = [
    "EmbedPlan",
    "Source",
    "checkpoint_digest",
    "embed",
    "file_batches",
    "load_image",
    "open_source",
    "plan_embed",
]

SOURCE_KINDS = ("shards", "folder", "list")
FIXED_BYTES = 16 << 20  # temporaries beside the batch and the chunk buffer: the last chunk's float16 copy, labels


@dataclass(frozen=True)
class Source:
    """Where the rows of a group come from: ``count`` images, ``keys[i]`` relative to ``root``."""

    kind: str  # shards | folder | list
    root: Path  # the shard folder, or the folder the image paths are relative to
    name: str  # the split name, or the source path
    split: str | None
    count: int
    fingerprint: str  # what the rows depend on besides the model
    paths: tuple[str, ...] = field(default=(), repr=False)  # folder / list: every image, in row order
    vids: np.ndarray | None = field(default=None, repr=False)
    camids: np.ndarray | None = field(default=None, repr=False)
    rejects: tuple[str, ...] = ()  # listed entries that are not images of the source, and why

    def meta(self) -> dict:
        """The group's ``source`` attribute: enough to find every row's image again."""
        return {"kind": self.kind, "root": str(self.root), "split": self.split}


def checkpoint_digest(checkpoint: str | Path) -> str:
    """The first 16 hex digits of the sha256 of ``model.pt`` (or a checkpoint folder's ``state.pt``),
    the label ``wildreid eval`` records too."""
    checkpoint = Path(checkpoint)
    return file_sha256(checkpoint / "state.pt" if checkpoint.is_dir() else checkpoint)[:16]


def _files_fingerprint(root: Path, paths: Sequence[str]) -> str:
    digest = hashlib.sha256(str(root).encode())
    for path in paths:
        st = os.stat(root / path)
        digest.update(f"\0{path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def open_source(src: str | Path, split: str | None = None, camera_from: str | None = None) -> Source:
    """The source at ``src``: a shard folder (``split`` required), an image folder (every image below it,
    cameras by ``camera_from``, see :func:`wildreid.shards.layouts.camera_rule`) or a CSV list file."""
    src = Path(src)
    if not src.exists():
        raise ConfigError(f"{src} does not exist; expected a shard folder (with --split), an image folder or a list")
    is_shards = src.is_dir() and (src / MANIFEST_NAME).is_file()
    if camera_from is not None and (is_shards or not src.is_dir()):
        what = "a shard folder (its cameras are in the shards)" if is_shards else "a list (its camid column)"
        raise ConfigError(f"--camera-from applies to an image folder, and {src} is {what}; leave it out")
    if is_shards:
        if split is None:
            names = ", ".join(load_manifest(src)["splits"])
            raise ConfigError(f"{src} is a shard folder; pass --split to choose one of its splits ({names})")
        count = split_entry(src, split)["num_samples"]
        return Source("shards", src.resolve(), split, split, count, split_fingerprint(src, split))
    kind = "folder" if src.is_dir() else "list"
    index = read_dataset(src, kind, camera_from=camera_from)
    if split is not None and split not in index.records:
        raise ConfigError(f"{src} has no split {split!r}; it has {', '.join(index.records) or 'none'}")
    records = [r for name in ([split] if split is not None else index.records) for r in index.records[name]]
    if not records:
        raise ConfigError(f"{src} lists no images; expected image files (.jpg, .png, ...) or a list of them")
    root = Path(index.root).resolve()
    unreadable = {r.path: why for r in records if (why := _not_an_image(root / r.path)) is not None}
    rejects = [f"{r.path}: {r.reason}" for r in index.rejects if split is None or r.split == split]
    rejects += [f"{path}: {why}" for path, why in unreadable.items()]
    records = [r for r in records if r.path not in unreadable]
    if not records:
        raise ConfigError(f"{src} holds no readable images; first problem: {rejects[0] if rejects else 'none'}")
    paths = tuple(r.path for r in records)
    return Source(
        kind,
        root,
        str(src.resolve()) + (f":{split}" if split is not None else ""),
        split,
        len(records),
        _files_fingerprint(root, paths),
        paths=paths,
        vids=np.array([r.vid for r in records], dtype=np.int64),
        camids=np.array([r.camid for r in records], dtype=np.int64),
        rejects=tuple(rejects),
    )


def _not_an_image(path: Path) -> str | None:
    """Why the file at ``path`` is not an image (empty, unreadable, no known image header), or None. Only the
    header is parsed (PIL opens lazily): junk files are skipped and listed before any row is embedded, so
    removing them never changes a finished group's rows; a file that is truncated past its header still
    fails later, when it is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as image:
            image.size  # noqa: B018 - the header is parsed by open; size proves it named one
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    return None


# --------------------------------------------------------------------------- images of files


def load_image(path: str | Path, image_size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) uint8 of the image file at ``path``, decoded and resized as the shard reader does."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BadImageError(f"cannot read image {path} ({exc.strerror}); expected a readable image file") from None
    if not data:
        raise BadImageError(f"image {path} is empty (0 bytes); remove it from the source or replace it")
    try:
        image = decode_tensor(data)
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(
            f"image {path} cannot be decoded ({type(exc).__name__}); replace it with a whole image "
            "(rows done so far are kept; removing the file instead shifts the rows after it, and the group "
            "has to be made again)"
        ) from None
    return resize_uint8(image, image_size)


def file_batches(
    root: Path, paths: Sequence[str], start: int, batch: int, image_size: tuple[int, int]
) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """(B, 3, H, W) uint8 batches of the images ``paths[start:]`` (relative to ``root``) and their row numbers."""
    for b0 in range(start, len(paths), batch):
        b1 = min(len(paths), b0 + batch)
        yield torch.stack([load_image(root / p, image_size) for p in paths[b0:b1]]), np.arange(b0, b1)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class EmbedPlan:
    batch: int  # images per forward pass
    chunk_rows: int  # rows per Zarr chunk of a new group (an existing group keeps its own)
    per_image: int  # bytes one image of a batch takes
    buffer: int  # bytes of features buffered before a whole chunk is written


def plan_embed(
    budget: int,
    *,
    dim: int,
    image_size: tuple[int, int],
    largest: int,
    chunk_rows: int | None = None,
    rows: int | None = None,
) -> EmbedPlan:
    """Batch and chunk sizes that keep embedding within ``budget`` (module docstring).

    ``largest``: bytes per image of the network's largest activation (0 when activations live on a device);
    ``chunk_rows``: the chunk height of an existing group or one asked for (else from the budget);
    ``rows``: the group's height, when known.
    """
    h, w = image_size
    per_image = 3 * h * w + 2 * 3 * h * w * 4 + 2 * largest + dim * 4
    if chunk_rows is None:
        chunk_rows = rows_per_chunk(dim * 2, max(dim * 2, min(CHUNK_BYTES, budget // 8)))
    if chunk_rows < 1:
        raise ConfigError(f"expected chunk rows >= 1, found {chunk_rows}")
    buffer = chunk_rows * dim * 4
    room = budget - FIXED_BYTES - buffer
    most = min(EXTRACT_BATCH, chunk_rows, room // per_image) if room > 0 else 0
    # a divisor of the chunk height: batches never straddle a chunk, so a resumed run forms the same batches;
    # a group of one chunk (shorter than a chunk: its chunk is its own height, 401 rows say) resumes at row 0
    # only, so any batch does (a divisor of 401 would be 1: 50x slower)
    single = rows is not None and chunk_rows >= rows
    batch = int(most) if single else max((b for b in range(1, int(most) + 1) if chunk_rows % b == 0), default=0)
    if batch < 1:
        need = FIXED_BYTES + buffer + per_image
        raise ConfigError(
            f"memory budget of {budget / 2**20:,.1f} MiB cannot hold one image's forward pass "
            f"({per_image / 2**20:,.1f} MiB) beside a chunk of {chunk_rows:,} features ({buffer / 2**20:,.1f} MiB); "
            f"raise --memory-budget to at least {-(-need >> 20):,} MiB (or, for a new group, lower --chunk-rows)"
        )
    return EmbedPlan(int(batch), int(chunk_rows), int(per_image), int(buffer))


# --------------------------------------------------------------------------- the command


def embed(
    src: str | Path,
    checkpoint: str | Path,
    output: str | Path,
    *,
    split: str | None = None,
    camera_from: str | None = None,
    memory_budget: int | None = None,
    device: str = "cpu",
    chunk_rows: int | None = None,
    feature: str | None = None,
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Embed every image of ``src`` with the model of ``checkpoint`` into the group ``output``, resumably.

    Returns a report: the group, rows, dim, the source, batch and chunk sizes, rows found
    done, the checkpoint's label, seconds and images per second (of this call).
    """
    source = open_source(src, split, camera_from)  # before the model: a wrong source fails fast
    if source.rejects:
        log(f"skipped {len(source.rejects)} entries of {src} that are not usable images, first {source.rejects[0]}")
    budget = memory_budget if memory_budget is not None else default_budget()
    model, config = load_model(checkpoint, device)
    feature = feature or config["model"].get("eval_feature", "bnneck")
    if feature not in ("bnneck", "pool5"):
        raise ConfigError(f"expected --feature bnneck or pool5, found {feature!r}")
    image_size = tuple(int(s) for s in config["model"]["image_size"])
    label = checkpoint_digest(checkpoint)
    dim = model.feature_dim
    on_host = torch.device(device).type != "cuda"
    largest = activation_bytes(model, image_size, device)[1] if on_host else 0
    model.eval()
    output = Path(output)
    began = time.perf_counter()
    with WriterLock(output, log=log):
        existing = FeatureStore.open(output).chunk_rows if (output / "features").exists() else chunk_rows
        shape = {"dim": dim, "image_size": image_size, "largest": largest, "rows": source.count}
        plan = plan_embed(budget, chunk_rows=existing, **shape)
        store = writable_group(output, source.count, dim, chunk_bytes=plan.chunk_rows * dim * 2, other="--output")
        if store.chunk_rows != plan.chunk_rows:  # a group shorter than a chunk has one chunk of its own height
            plan = plan_embed(budget, chunk_rows=store.chunk_rows, **shape)
        meta = extraction_meta(source.name, source.fingerprint, label, feature)
        done = rows_done(store, meta)
        if done == 0 or not store.has("keys") or store.meta("source") != source.meta():
            labels = _write_keys(store, source)
        else:
            labels = None
            if source.kind != "shards":  # a shard split's labels are checked by extract_split
                _update_labels(store, source)
        on_chunk = lambda rows: fault_point(f"embed:{rows}")  # noqa: E731 - test hook (kill -9 mid-run)
        if source.kind == "shards":
            extract_split(
                source.root,
                source.split,
                model,
                store,
                image_size=image_size,
                device=device,
                progress=progress,
                label=label,
                should_stop=should_stop,
                feature=feature,
                batch=plan.batch,
                labels=labels,
                on_chunk=on_chunk,
            )
        else:
            phase = "embedding"
            progress(phase, done, source.count)
            if done < source.count:
                write_features(
                    store,
                    file_batches(source.root, source.paths, done, plan.batch, image_size),
                    model,
                    meta=meta,
                    start=done,
                    device=device,
                    progress=progress,
                    phase=phase,
                    should_stop=should_stop,
                    feature=feature,
                    on_chunk=on_chunk,
                )
    seconds = time.perf_counter() - began
    return {
        "group": str(output),
        "rows": source.count,
        "dim": dim,
        "source": source.meta(),
        "checkpoint_sha256": label,
        "feature": feature,
        "batch": plan.batch,
        "chunk_rows": plan.chunk_rows,
        "rows_found_done": done,
        "skipped": len(source.rejects),
        "seconds": seconds,
        "images_per_s": (source.count - done) / max(seconds, 1e-9),
        "memory_budget_bytes": budget,
    }


def _write_keys(store: FeatureStore, source: Source) -> tuple[np.ndarray, np.ndarray] | None:
    """Keys, the ``source`` attribute and (files) labels, written before any row; returns a shard split's labels."""
    if source.kind == "shards":
        vids, camids, paths = split_labels(source.root, source.split, paths=True)
        store.write_keys(paths)
        labels = (vids, camids)
    else:
        store.write_keys(np.asarray(source.paths, dtype=str))
        _update_labels(store, source)
        labels = None
    store.set_meta("source", source.meta())
    return labels


def _update_labels(store: FeatureStore, source: Source) -> None:
    """Ids and cameras of a folder or list as the source gives them now: they do not change the features, so
    a re-run with another ``--camera-from`` or edited list cells updates them and keeps the rows."""
    if not (np.array_equal(store.ids(), source.vids) and np.array_equal(store.camids(), source.camids)):
        store.write_labels(0, source.vids, source.camids)
