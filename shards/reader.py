"""Reading shards back: a chain of small generator stages over WebDataset's tar parsing.

``ShardDataset`` is a PyTorch IterableDataset that yields whole batches of
``chunk`` samples. Load it with ``DataLoader(ds, batch_size=None,
num_workers=ds.lanes)`` (or ``num_workers=0``, which runs every lane in-process
and yields the same batches), and call :meth:`ShardDataset.set_epoch` before
iterating (no persistent workers, so the new epoch reaches them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from wildreid.errors import ConfigError, ShardError, ShardNotFoundError
from wildreid.shards.images import decode_rgb
from wildreid.shards.order import Group, epoch_order, lane_groups, schedule_from
from wildreid.shards.writer import load_manifest

__all__ = ["ShardDataset", "collate", "pil_to_uint8", "read_split_samples"]

_IMAGE_EXTS = ("jpg", "png", "jpeg", "bmp", "webp", "gif", "tiff")


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------- stages


def open_shards(paths: Iterable[Path]) -> Iterator[dict]:
    for path in paths:
        if not path.is_file():
            raise ShardNotFoundError(f"shard {path} is missing; run 'wildreid shard --verify' on the shard folder")
        with path.open("rb") as stream:
            yield {"url": str(path), "stream": stream}


def tar_samples(streams: Iterable[dict]) -> Iterator[dict]:
    """WebDataset's own tar parsing: members grouped into samples by key."""
    return group_by_keys(tar_file_expander(streams))


def parse_meta(samples: Iterable[dict]) -> Iterator[dict]:
    for sample in samples:
        ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ShardError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or its .json")
        meta = json.loads(sample["json"])
        yield {"key": sample["__key__"], "image": sample[ext], **meta}


def permuted(samples: list[dict], group: Group, skip: int) -> Iterator[dict]:
    if len(samples) != len(group):
        raise ShardError(
            f"shards {group.shards} hold {len(samples)} samples, the manifest says {len(group)}; "
            "run 'wildreid shard --verify'"
        )
    for position in group.permutation[skip:]:
        yield samples[position]


def decoded(samples: Iterable[dict], transform: Callable[[Image.Image], object]) -> Iterator[tuple]:
    for s in samples:
        try:
            image = decode_rgb(s["image"])
        except OSError as exc:
            raise ShardError(f"cannot decode sample {s['key']} ({s['path']}): {exc}") from None
        yield transform(image), s["index"], s["vid"], s["camid"]


# --------------------------------------------------------------------------- dataset


class ShardDataset(IterableDataset):
    """Batches of (images, indices, vehicle ids, camera ids) of one split, in a seeded, resumable order."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        image_size: tuple[int, int] = (256, 128),
        transform: Callable[[Image.Image], object] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        lanes: int = 1,
        chunk: int = 1,
        group: int = 2,
    ):
        manifest = load_manifest(root)
        if split not in manifest["splits"]:
            raise ShardNotFoundError(
                f"split {split!r} is not in {root}; it has {', '.join(manifest['splits']) or 'no splits'}"
            )
        if lanes < 1 or chunk < 1 or group < 1:
            raise ConfigError(f"expected lanes, chunk and group >= 1, found {lanes}, {chunk}, {group}")
        entry = manifest["splits"][split]
        self.root = Path(root)
        self.split = split
        self.shard_files = [self.root / s["file"] for s in entry["shards"]]
        self.shard_sizes = [s["samples"] for s in entry["shards"]]
        self.num_samples = entry["num_samples"]
        self.image_size = image_size
        self.transform = transform
        self.seed, self.shuffle, self.lanes, self.chunk, self.group = seed, shuffle, lanes, chunk, group
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch and the position in its order to begin at (0 = from the start)."""
        if not 0 <= start <= self.num_samples:
            raise ConfigError(f"start position must be in 0..{self.num_samples}, found {start}")
        self.epoch, self.start = epoch, start

    def order(self) -> np.ndarray:
        """Dense indices of the current epoch from its start position, in the order they are yielded."""
        full = epoch_order(
            self.shard_sizes, seed=self.seed, epoch=self.epoch, lanes=self.lanes,
            chunk=self.chunk, group=self.group, shuffle=self.shuffle,
        )  # fmt: skip
        return full[self.start :]

    def _transform(self, image: Image.Image):
        if self.transform is not None:
            return self.transform(image)
        if image.size != (self.image_size[1], self.image_size[0]):
            image = image.resize((self.image_size[1], self.image_size[0]), Image.Resampling.BILINEAR)
        return pil_to_uint8(image)

    def _lane(self, groups: list[Group], skip: int) -> Iterator[tuple]:
        for group in groups:
            if skip >= len(group):
                skip -= len(group)  # consumed before the resume point: not even read
                continue
            samples = list(parse_meta(tar_samples(open_shards(self.shard_files[s] for s in group.shards))))
            yield from decoded(permuted(samples, group, skip), self._transform)
            skip = 0

    def __iter__(self) -> Iterator[tuple]:
        lanes = lane_groups(
            self.shard_sizes, seed=self.seed, epoch=self.epoch, lanes=self.lanes,
            group=self.group, shuffle=self.shuffle,
        )  # fmt: skip
        lengths = [sum(len(g) for g in groups) for groups in lanes]
        schedule = schedule_from(lengths, self.chunk, self.start)
        # A DataLoader always asks worker 0 first, so after a resume the lane
        # that is due next is handed to worker 0 and the others follow in turn.
        rotation = schedule[0][0] if schedule else 0
        worker = get_worker_info()
        if worker is not None:
            if worker.num_workers != self.lanes:
                raise ConfigError(
                    f"ShardDataset has lanes={self.lanes} but the DataLoader has {worker.num_workers} workers; "
                    f"use num_workers=0 or {self.lanes}"
                )
            mine = (worker.id + rotation) % self.lanes
            schedule = [entry for entry in schedule if entry[0] == mine]
        firsts = {}
        for lane, lo, _ in schedule:
            firsts.setdefault(lane, lo)
        streams = {lane: self._lane(lanes[lane], lo) for lane, lo in firsts.items()}
        for lane, lo, hi in schedule:
            yield collate([next(streams[lane]) for _ in range(hi - lo)])


def collate(batch: list[tuple]) -> tuple:
    """Stack a list of (image, index, vid, camid) into batch tensors (images as a list if not tensors)."""
    images = [b[0] for b in batch]
    if all(isinstance(i, torch.Tensor) for i in images):
        images = torch.stack(images)
    columns = [torch.tensor([b[k] for b in batch], dtype=torch.int64) for k in (1, 2, 3)]
    return (images, *columns)


def read_split_samples(root: str | Path, split: str) -> Iterator[dict]:
    """Every raw sample of a split in index order (key, image bytes, index, vid, camid, path)."""
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise ShardNotFoundError(f"split {split!r} is not in {root}")
    files = [Path(root) / s["file"] for s in manifest["splits"][split]["shards"]]
    yield from parse_meta(tar_samples(open_shards(files)))


def read_back(root: str | Path, split: str, *, image_size=(256, 128), workers: int = 0, batch: int = 64) -> dict:
    """Decode a whole split through ShardDataset and check it: counts, ids, and that indices are dense."""
    import time

    from torch.utils.data import DataLoader

    dataset = ShardDataset(root, split, image_size=image_size, shuffle=False, lanes=max(1, workers), chunk=batch)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    seen = np.zeros(len(dataset), dtype=np.int64)
    vids, cams = set(), set()
    began = time.perf_counter()
    for images, index, vid, camid in loader:
        if images.shape[1:] != (3, *image_size):
            raise ShardError(f"decoded batch has shape {tuple(images.shape)}, expected (B, 3, {image_size[0]}, {image_size[1]})")
        np.add.at(seen, index.numpy(), 1)
        vids.update(vid.tolist())
        cams.update(camid.tolist())
    seconds = time.perf_counter() - began
    if not (seen == 1).all():
        raise ShardError(f"split {split}: {int((seen == 0).sum())} samples missing, {int((seen > 1).sum())} repeated")
    return {"split": split, "samples": len(dataset), "vehicles": len(vids), "cameras": len(cams),
            "seconds": seconds, "images_per_s": len(dataset) / max(seconds, 1e-9)}  # fmt: skip
