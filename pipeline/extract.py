"""Feature extraction: one split's shards (or any stream of images) through a model into a Zarr feature group.

The group is the store format of :mod:`wildreid.stores.dictionary` (``features``,
``ids``, ``camids``) and can be mined or evaluated. Rows are written in whole
Zarr chunks (a partial chunk is read, merged and rewritten, several times
slower: see scripts/bench_store.py), and after every chunk the number of rows
done is recorded, so a killed extraction resumes at the first unfinished chunk.
The labels (``ids``, ``camids``) are written once, whole, before the first row
(read from the shards' label members), never a batch at a time: their chunks
hold up to 2^20 rows, so per-batch writes would rewrite a whole chunk each time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from wildreid.core.errors import Stopped, StoreError
from wildreid.shards.reader import ShardDataset, split_entries, split_labels
from wildreid.stores import FeatureStore
from wildreid.transforms import normalise

__all__ = [
    "EXTRACT_BATCH",
    "extract_features",
    "extract_split",
    "extraction_meta",
    "refresh_key",
    "rows_done",
    "split_fingerprint",
    "write_features",
]

EXTRACT_BATCH = 256  # images per extraction batch (the run's memory plan counts one batch's activations)
REFRESH_KEYS = 1_000_000  # refresh_key(epoch) = REFRESH_KEYS + epoch: never a training epoch's key


def refresh_key(epoch: int) -> int:
    """The order and augmentation key of epoch ``epoch``'s dictionary rebuild: its own draw, as the
    published rebuild iterates the (reshuffled, re-augmented) training loader once more."""
    return REFRESH_KEYS + epoch


def split_fingerprint(shards_root: str | Path, split: str | Sequence[str]) -> str:
    """What the rows of an extracted split (or run of splits) depend on, besides the model: its shard digests."""
    entries = split_entries(shards_root, split)
    digest = hashlib.sha256(split.encode() if isinstance(split, str) else "+".join(split).encode())
    for _, entry, _ in entries:
        for shard in entry["shards"]:
            digest.update(shard["sha256"].encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(model: torch.nn.Module, images: torch.Tensor, device, feature: str = "bnneck") -> np.ndarray:
    """L2-normalised ``feature`` (B, D) of a uint8 batch (B, 3, H, W), in the model's mode, as float32."""
    x = normalise(images.to(device, non_blocking=True))
    if torch.device(device).type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return model(x, feature).float().cpu().numpy()
    return model(x, feature).cpu().numpy()


def extraction_meta(name: str, inputs: str, label: str, feature: str = "bnneck") -> dict:
    """What the rows of an extraction depend on: the input's name and fingerprint, the model's label, the feature."""
    meta = {"split": name, "shards": inputs, "label": label}
    if feature != "bnneck":  # records of bnneck extractions stay as they were
        meta["feature"] = feature
    return meta


def rows_done(store: FeatureStore, meta: dict) -> int:
    """Rows of ``store`` already extracted under ``meta`` (0 when another extraction, or anything else, wrote them)."""
    state = store.meta("extraction", {})
    # rows count as extracted only if nothing wrote the features since (e.g. training steps before a kill -9)
    unchanged = state.get("features_version") == store.features_version
    return int(state.get("rows_done", 0)) if state.get("meta") == meta and unchanged else 0


def write_features(
    store: FeatureStore,
    batches: Iterable[tuple[torch.Tensor, np.ndarray]],
    model: torch.nn.Module,
    *,
    meta: dict,
    start: int,
    device="cpu",
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
    phase: str = "features",
    should_stop: Callable[[], bool] = lambda: False,
    feature: str = "bnneck",
    on_chunk: Callable[[int], None] = lambda rows_done: None,
    stop: int | None = None,
) -> FeatureStore:
    """Features of ``batches`` ((B, 3, H, W) uint8 images, their row numbers from ``start`` on) into ``store``.

    Rows are written in whole chunks; after each, ``rows_done`` and ``meta`` are recorded in the
    store's ``extraction`` attribute (what :func:`rows_done` resumes from) and ``on_chunk(rows_done)``
    runs. When ``should_stop()`` turns true, :class:`Stopped` is raised after the next whole chunk.
    ``stop``: the rows end there (a rank's share of the dictionary; nothing is recorded then,
    since the attribute speaks for the whole store).
    """
    chunk = store.chunk_rows
    n = store.count() if stop is None else stop
    record = stop is None
    name = meta.get("split", "")
    was_training = model.training
    model.eval()
    pending: list[np.ndarray] = []  # features not yet written
    try:
        for images, idx in batches:
            rows = sum(len(p) for p in pending)
            if not np.array_equal(np.asarray(idx), np.arange(start + rows, start + rows + len(idx))):
                raise StoreError(
                    f"split {name} yielded sample indices out of order at {start + rows}; re-shard the data set"
                )
            pending.append(extract_features(model, images, device, feature))
            rows += len(idx)
            if rows >= chunk or start + rows >= n:
                block = np.concatenate(pending)
                whole = len(block) if start + len(block) >= n else len(block) // chunk * chunk
                store.write_rows(start, block[:whole])
                pending = [block[whole:]] if whole < len(block) else []
                start += whole
                if record:
                    store.set_meta(
                        "extraction", {"meta": meta, "rows_done": start, "features_version": store.features_version}
                    )
                progress(phase, whole, n)
                on_chunk(start)
                if should_stop() and start < n:
                    raise Stopped(
                        f"extraction of {name} stopped after {start} of {n} rows; run the same command again to resume"
                    )
    finally:
        model.train(was_training)
    if start < n:
        raise StoreError(f"{name} ended after {start} of {n} rows; expected one image per row: re-run the command")
    return store


def extract_split(
    shards_root: str | Path,
    split: str | Sequence[str],
    model: torch.nn.Module,
    store: FeatureStore,
    *,
    image_size: tuple[int, int],
    device="cpu",
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
    label: str = "",
    should_stop: Callable[[], bool] = lambda: False,
    feature: str = "bnneck",
    batch: int = EXTRACT_BATCH,
    labels: tuple[np.ndarray, np.ndarray] | None = None,
    on_chunk: Callable[[int], None] = lambda rows_done: None,
    span: tuple[int, int] | None = None,
) -> FeatureStore:
    """Fill ``store.features`` with the model's features of every sample of ``split``, resumably.

    ``store`` must have one row per sample (row i = sample index i); a sequence of
    splits fills it split after split (a transductive training run). Progress is kept
    in the store's ``extraction`` attribute together with ``label`` (what produced
    the features, e.g. a checkpoint digest) and ``feature`` (``ReidNet.forward``'s):
    a store extracted by something else starts again from row 0. When ``should_stop()``
    turns true, :class:`Stopped` is raised after the next whole chunk is written. The
    caller holds the store's writer lock. ``batch``: images per forward pass (at most a
    chunk); ``labels``: the split's (vids, camids) when the caller has read them already;
    ``on_chunk(rows_done)`` runs after each chunk.

    ``span`` = (lo, hi), chunk-aligned: only those rows, as a rank of a distributed run
    extracts the rows it owns (``wildreid.world``); the labels are then left to rank 0
    and a stopped extraction starts again from ``lo`` (no progress is recorded).
    """
    n = store.count()
    samples = sum(entry["num_samples"] for _, entry, _ in split_entries(shards_root, split))
    name = split if isinstance(split, str) else "+".join(split)
    if samples != n:
        raise StoreError(
            f"store {store.path} has {n} rows but split {name} has {samples} samples; "
            "use a new store path for this split"
        )
    meta = extraction_meta(name, split_fingerprint(shards_root, split), label, feature)
    if span is not None:
        return _extract_span(shards_root, split, model, store, meta, span, image_size, device, batch, should_stop)
    done = rows_done(store, meta)
    phase = f"features {name}"
    progress(phase, done, n)
    if done >= n:
        return store
    vids, camids = labels if labels is not None else split_labels(shards_root, split)
    if not (np.array_equal(store.ids(), vids) and np.array_equal(store.camids(), camids)):
        store.write_labels(0, vids, camids)  # whole arrays: O(N) bytes once, not a chunk rewrite per batch
    dataset = ShardDataset(
        shards_root, split, image_size=image_size, shuffle=False, chunk=max(1, min(store.chunk_rows, batch))
    )
    dataset.set_epoch(0, done)
    return write_features(
        store,
        ((images, idx.numpy()) for images, idx, _, _ in dataset),
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


def _extract_span(
    shards_root, split, model, store: FeatureStore, meta: dict, span, image_size, device, batch, should_stop
):
    """``extract_split`` of the rows ``span`` = (lo, hi) only."""
    lo, hi = span
    if lo >= hi:
        return store
    dataset = ShardDataset(
        shards_root, split, image_size=image_size, shuffle=False, chunk=max(1, min(store.chunk_rows, batch))
    )
    dataset.set_epoch(0, lo)

    def batches():
        for images, idx, _, _ in dataset:
            keep = int(np.searchsorted(idx.numpy(), hi))
            if keep:
                yield images[:keep], idx.numpy()[:keep]
            if keep < len(idx):
                return

    return write_features(store, batches(), model, meta=meta, start=lo, device=device, should_stop=should_stop, stop=hi)
