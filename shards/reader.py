"""Reading shards back: a chain of small generator stages (read -> members -> samples -> decode).

``ShardDataset`` is a PyTorch IterableDataset that yields whole batches of
``chunk`` samples. Load it with ``DataLoader(ds, batch_size=None,
num_workers=ds.lanes)`` (or ``num_workers=0``, which runs every lane in-process
and yields the same batches); ``transform`` takes a (3, H, W) uint8 tensor, and call
:meth:`ShardDataset.set_epoch` before
iterating (no persistent workers, so the new epoch reaches them).
"""

from __future__ import annotations

import json
import os
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as tvf

from wildreid.core.errors import ConfigError, ShardError, ShardNotFoundError
from wildreid.shards.images import decode_rgb
from wildreid.shards.order import Group, batch_share, epoch_order, lane_groups, schedule_from
from wildreid.shards.tario import sample_key, tar_members
from wildreid.shards.writer import load_manifest, load_sample_offsets

__all__ = [
    "ShardDataset",
    "collate",
    "decode_batch",
    "decode_tensor",
    "encoded_tensor",
    "pil_to_uint8",
    "read_split_samples",
    "resize_uint8",
    "split_entries",
]

_IMAGE_EXTS = ("jpg", "png", "jpeg", "bmp", "webp", "gif", "tiff")


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB image."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_tensor(data: bytes, device: str | torch.device = "cpu") -> torch.Tensor:
    """(3, H, W) uint8 RGB tensor of encoded image bytes, on ``device``.

    torchvision's decoders (libjpeg-turbo; nvJPEG when ``device`` is CUDA) are
    about twice as fast as PIL's; PIL stays the fallback for what they refuse.
    """
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            # torchvision 0.29 announces a move of its decoders to torchcodec; until they
            # are gone they are the fastest decoders here, and PIL is the fallback after.
            warnings.simplefilter("ignore", DeprecationWarning)
            if data[:2] == b"\xff\xd8":
                return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
            return decode_image(encoded, mode=ImageReadMode.RGB).to(device)
    except RuntimeError:
        return pil_to_uint8(decode_rgb(data)).to(device)


def encoded_tensor(data: bytes) -> torch.Tensor:
    """The encoded image bytes as a 1-D uint8 tensor (what ``decode_batch`` takes)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_batch(
    encoded: list[torch.Tensor], size: tuple[int, int], device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(B, 3, *size) uint8 on ``device`` of a batch of encoded images (1-D uint8 tensors).

    The JPEGs of a batch go to torchvision's batched ``decode_jpeg`` on ``device``
    (nvJPEG on CUDA; libjpeg-turbo on the CPU, where the result is bit-identical to
    decoding one by one in the DataLoader workers); anything else is decoded one by
    one as ``decode_tensor`` does. Then each image is resized as the reader resizes.
    """
    device = torch.device(device)
    jpeg = [k for k, e in enumerate(encoded) if len(e) > 1 and int(e[0]) == 0xFF and int(e[1]) == 0xD8]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # see decode_tensor
                decoded_jpeg = decode_jpeg([encoded[k] for k in jpeg], mode=ImageReadMode.RGB, device=device)
            for k, image in zip(jpeg, decoded_jpeg):
                images[k] = image
        except RuntimeError:
            pass  # one of them is not a JPEG libjpeg can read: every JPEG goes one by one below
    for k, image in enumerate(images):
        if image is None:
            try:
                images[k] = decode_tensor(encoded[k].numpy().tobytes(), device)
            except OSError as exc:
                raise ShardError(
                    f"cannot decode image {k} of the batch ({len(encoded[k])} bytes): {exc}; "
                    "run 'wildreid shard --verify' on the shard folder"
                ) from None
    return torch.stack([resize_uint8(image, size) for image in images])


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a (3, H, W) uint8 tensor to ``size`` (H, W)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return tvf.resize(image, list(size), interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)


# --------------------------------------------------------------------------- stages


def tar_samples(shards: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Members grouped into samples the WebDataset way: the key is the name up to the first dot of its base name."""
    for url, data in shards:
        sample: dict | None = None
        for name, content in tar_members(url, data):
            key, ext = sample_key(name)
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext.lower()] = content
        if sample is not None:
            yield sample


def parse_meta(samples: Iterable[dict]) -> Iterator[dict]:
    for sample in samples:
        ext = next((e for e in _IMAGE_EXTS if e in sample), None)
        if ext is None or "json" not in sample:
            raise ShardError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks an image or its .json")
        meta = json.loads(sample["json"])
        yield {"key": sample["__key__"], "image": sample[ext], "url": sample["__url__"], **meta}


class IndexedShard:
    """One shard read a sample at a time by offset (``os.pread``): memory is one sample, whatever the shard size."""

    def __init__(self, path: Path, offsets: np.ndarray):
        self.path, self.url, self.offsets = path, str(path), offsets
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardNotFoundError(
                f"shard {path} is missing; run 'wildreid shard --verify' on the shard folder"
            ) from None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sample(self, i: int) -> dict:
        """The raw sample ``i`` of the shard (``__key__``, ``__url__`` and one entry per member extension)."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        data = os.pread(self.fd, end - start, start)
        if len(data) != end - start:
            raise ShardError(f"{self.url}: truncated at sample {i}; run 'wildreid shard --verify'")
        samples = list(tar_samples([(self.url, data)]))
        if len(samples) != 1:
            raise ShardError(
                f"{self.url}: bytes {start}-{end} hold {len(samples)} samples, its index says one; "
                "run 'wildreid shard --verify'"
            )
        return samples[0]

    def close(self) -> None:
        os.close(self.fd)


def permuted(shards: Sequence[IndexedShard], group: Group, skip: int) -> Iterator[dict]:
    """The group's raw samples in its permutation from position ``skip``, each read alone by offset."""
    sizes = [len(shard) for shard in shards]
    if sum(sizes) != len(group):
        raise ShardError(
            f"shards {group.shards} hold {sum(sizes)} samples, the manifest says {len(group)}; "
            "run 'wildreid shard --verify'"
        )
    firsts = np.cumsum([0, *sizes])
    positions = group.permutation[skip:]
    which = np.searchsorted(firsts, positions, side="right") - 1
    for k, position in zip(which.tolist(), positions.tolist()):
        yield shards[k].sample(position - int(firsts[k]))


def decoded(samples: Iterable[dict], transform: Callable[[torch.Tensor], object] | None) -> Iterator[tuple]:
    """(image, index, vid, camid) per sample; with no ``transform`` the image stays encoded (``encoded_tensor``)."""
    for s in samples:
        if transform is None:
            yield encoded_tensor(s["image"]), s["index"], s["vid"], s["camid"]
            continue
        try:
            image = decode_tensor(s["image"])
        except OSError as exc:
            raise ShardError(f"cannot decode sample {s['key']} ({s['path']}): {exc}") from None
        yield transform(image), s["index"], s["vid"], s["camid"]


# --------------------------------------------------------------------------- dataset


class ShardDataset(IterableDataset):
    """Batches of (images, indices, vehicle ids, camera ids) of one split, in a seeded, resumable order."""

    def __init__(
        self,
        root: str | Path,
        split: str | Sequence[str],
        *,
        image_size: tuple[int, int] = (256, 128),
        transform: Callable[[torch.Tensor], object] | None = None,
        seed: int = 0,
        shuffle: bool = True,
        lanes: int = 1,
        chunk: int = 1,
        group: int = 2,
        decode: bool = True,
        share: tuple[int, int] = (0, 1),
    ):
        if lanes < 1 or chunk < 1 or group < 1:
            raise ConfigError(f"expected lanes, chunk and group >= 1, found {lanes}, {chunk}, {group}")
        if not 0 <= share[0] < share[1]:
            raise ConfigError(f"expected a share (rank, size) with 0 <= rank < size, found {share}")
        self.root = Path(root)
        self.split = split
        self.shard_files, self.shard_sizes, self.shard_entries, self._offsets = [], [], [], {}
        self._index_cache: dict[int, np.ndarray] = {}
        # several splits read as one: their dense indices run on, split after split
        for _name, entry, first in split_entries(root, split):
            for shard in entry["shards"]:
                self.shard_files.append(self.root / shard["file"])
                self.shard_sizes.append(shard["samples"])
                self.shard_entries.append(shard)
                self._offsets[str(self.shard_files[-1])] = first
        self.num_samples = sum(self.shard_sizes)
        self.image_size = image_size
        self.transform = transform
        self.seed, self.shuffle, self.lanes, self.chunk, self.group = seed, shuffle, lanes, chunk, group
        # decode=False yields each batch's images still encoded (a list of 1-D uint8 tensors), for
        # decode_batch on the training device when CPU workers cannot decode fast enough
        self.decode = decode
        # (rank, size): this process yields its batch_share of every chunk of the order (chunk = the global batch)
        self.share = share
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
            self.shard_sizes,
            seed=self.seed,
            epoch=self.epoch,
            lanes=self.lanes,
            chunk=self.chunk,
            group=self.group,
            shuffle=self.shuffle,
        )
        return full[self.start :]

    def _transform(self, image: torch.Tensor):
        if self.transform is not None:
            return self.transform(image)
        return resize_uint8(image, self.image_size)

    def _lane(self, groups: list[Group], skip: int) -> Iterator[tuple]:
        for group in groups:
            if skip >= len(group):
                skip -= len(group)  # consumed before the resume point: not even read
                continue
            shards = [IndexedShard(self.shard_files[s], self._sample_offsets(s)) for s in group.shards]
            try:
                yield from self._dense(parse_meta(permuted(shards, group, skip)))
            finally:
                for shard in shards:
                    shard.close()
            skip = 0

    @property
    def _empty(self) -> tuple:
        none = torch.zeros(0, dtype=torch.int64)
        images = torch.zeros((0, 3, *self.image_size), dtype=torch.uint8) if self.decode else []
        return images, none, none.clone(), none.clone()

    def _sample_offsets(self, s: int) -> np.ndarray:
        # One small array per shard (8 bytes a sample), loaded or scanned once per worker.
        if s not in self._index_cache:
            entry = self.shard_entries[s]
            self._index_cache[s] = load_sample_offsets(
                self.shard_files[s], entry["samples"], sha256=entry.get("index_sha256")
            )
        return self._index_cache[s]

    def _dense(self, samples: Iterable[dict]) -> Iterator[dict]:
        for sample in samples:
            sample["index"] += self._offsets[sample["url"]]
            yield sample

    def __iter__(self) -> Iterator[tuple]:
        lanes = lane_groups(
            self.shard_sizes,
            seed=self.seed,
            epoch=self.epoch,
            lanes=self.lanes,
            group=self.group,
            shuffle=self.shuffle,
        )
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
        rank, size = self.share
        for lane, lo, hi in schedule:
            samples = [next(streams[lane]) for _ in range(hi - lo)]  # read past the other ranks' shares, not decoded
            a, b = batch_share(hi - lo, rank, size)
            yield collate(list(decoded(samples[a:b], self._transform if self.decode else None)), self._empty)


def collate(batch: list[tuple], empty: tuple | None = None) -> tuple:
    """Stack a list of (image, index, vid, camid) into batch tensors (images as a list if not tensors);
    ``empty`` is what an empty list gives (a process's share of a short last batch may be empty)."""
    if not batch and empty is not None:
        return empty
    images = [b[0] for b in batch]
    if all(isinstance(i, torch.Tensor) and i.shape == images[0].shape and i.ndim == 3 for i in images):
        images = torch.stack(images)
    columns = [torch.tensor([b[k] for b in batch], dtype=torch.int64) for k in (1, 2, 3)]
    return (images, *columns)


def split_entry(root: str | Path, split: str) -> dict:
    """The manifest entry of one split; ShardNotFoundError naming the splits there are."""
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise ShardNotFoundError(
            f"split {split!r} is not in {root}; it has {', '.join(manifest['splits']) or 'no splits'}"
        )
    return manifest["splits"][split]


def split_entries(root: str | Path, splits: str | Sequence[str]) -> list[tuple[str, dict, int]]:
    """(name, manifest entry, dense index of its first sample) of each split, read as one run of indices."""
    names = [splits] if isinstance(splits, str) else list(splits)
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"expected one or more distinct split names, found {names}")
    out, first = [], 0
    for name in names:
        entry = split_entry(root, name)
        out.append((name, entry, first))
        first += entry["num_samples"]
    return out


def read_split_samples(root: str | Path, split: str) -> Iterator[dict]:
    """Every raw sample of a split in index order (key, image bytes, index, vid, camid, path)."""
    for entry in split_entry(root, split)["shards"]:
        path = Path(root) / entry["file"]
        shard = IndexedShard(path, load_sample_offsets(path, entry["samples"], sha256=entry.get("index_sha256")))
        try:
            yield from parse_meta(shard.sample(i) for i in range(len(shard)))
        finally:
            shard.close()


def split_labels(root: str | Path, splits: str | Sequence[str], *, paths: bool = False) -> tuple[np.ndarray, ...]:
    """(vid, camid) of every sample of ``splits`` by dense index, from the samples' .json members only;
    with ``paths`` also each sample's source path (relative to the data set root) as a third array.

    Python's ``tarfile`` seeks over the image members, so this reads the tar headers and the
    small label members, not the images: what a store needs before any image is embedded.
    """
    entries = split_entries(root, splits)
    n = sum(entry["num_samples"] for _, entry, _ in entries)
    vids, camids, seen = np.full(n, -1, np.int64), np.full(n, -1, np.int64), np.zeros(n, bool)
    sources = np.full(n, "", dtype=object) if paths else None
    for _, entry, first in entries:
        for shard in entry["shards"]:
            path = Path(root) / shard["file"]
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.isfile() and member.name.lower().endswith(".json"):
                            meta = json.loads(tar.extractfile(member).read())
                            i = first + int(meta["index"])
                            vids[i], camids[i], seen[i] = meta["vid"], meta["camid"], True
                            if sources is not None:
                                sources[i] = meta.get("path", "")
            except FileNotFoundError:
                raise ShardNotFoundError(
                    f"shard {path} is missing; run 'wildreid shard --verify' on the shard folder"
                ) from None
            except (tarfile.TarError, KeyError, ValueError, IndexError) as exc:
                raise ShardError(
                    f"cannot read the labels of shard {path} ({exc}); run 'wildreid shard --verify'"
                ) from None
    if not seen.all():
        raise ShardError(
            f"{int((~seen).sum())} samples of {splits} have no .json label in their shards; "
            "run 'wildreid shard --verify'"
        )
    return (vids, camids) if sources is None else (vids, camids, sources.astype(str))


def read_back(root: str | Path, split: str, *, image_size=(256, 128), workers: int = 0, batch: int = 64) -> dict:
    """Decode a whole split through ShardDataset and check it: counts, ids, and that indices are dense."""
    dataset = ShardDataset(root, split, image_size=image_size, shuffle=False, lanes=max(1, workers), chunk=batch)
    loader = DataLoader(dataset, batch_size=None, num_workers=workers)
    seen = np.zeros(len(dataset), dtype=np.int64)
    vids, cams = set(), set()
    began = time.perf_counter()
    for images, index, vid, camid in loader:
        if images.shape[1:] != (3, *image_size):
            raise ShardError(
                f"decoded batch has shape {tuple(images.shape)}, expected (B, 3, {image_size[0]}, {image_size[1]})"
            )
        np.add.at(seen, index.numpy(), 1)
        vids.update(vid.tolist())
        cams.update(camid.tolist())
    seconds = time.perf_counter() - began
    if not (seen == 1).all():
        raise ShardError(f"split {split}: {int((seen == 0).sum())} samples missing, {int((seen > 1).sum())} repeated")
    return {
        "split": split,
        "samples": len(dataset),
        "vehicles": len(vids - {-1}),  # known ids only: -1 is an unknown one
        "cameras": len(cams - {-1}),
        "seconds": seconds,
        "images_per_s": len(dataset) / max(seconds, 1e-9),
    }
