from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wildreid.core.errors import ConfigError, ShardError, ShardNotFoundError
from wildreid.shards.order import epoch_order, merge_lanes, schedule_from
from wildreid.shards.reader import (
    ShardDataset,
    decode_batch,
    decode_tensor,
    encoded_tensor,
    read_split_samples,
    resize_uint8,
)

CHUNK = 5


def _batches(ds: ShardDataset, workers: int) -> list[np.ndarray]:
    return [index.numpy() for _, index, _, _ in DataLoader(ds, batch_size=None, num_workers=workers)]


@pytest.mark.parametrize(
    "sizes, lanes, chunk", [([12, 12, 12, 7], 2, 5), ([3], 4, 2), ([5, 1, 9, 9, 2], 3, 4), ([], 2, 3)]
)
def test_epoch_order_is_a_permutation(sizes, lanes, chunk):
    order = epoch_order(sizes, seed=1, epoch=2, lanes=lanes, chunk=chunk)
    assert sorted(order.tolist()) == list(range(sum(sizes)))
    again = epoch_order(sizes, seed=1, epoch=2, lanes=lanes, chunk=chunk)
    assert np.array_equal(order, again)


def test_epoch_order_changes_with_epoch_and_seed():
    sizes = [12] * 6
    base = epoch_order(sizes, seed=0, epoch=0)
    assert not np.array_equal(base, epoch_order(sizes, seed=0, epoch=1))
    assert not np.array_equal(base, epoch_order(sizes, seed=1, epoch=0))
    assert np.array_equal(epoch_order(sizes, seed=0, epoch=0, shuffle=False), np.arange(72))


@pytest.mark.parametrize("start", [0, 1, 4, 5, 6, 13, 29, 30])
def test_schedule_from_covers_the_rest_of_the_epoch(start):
    lengths = [12, 7, 11]
    full = [(lane, i) for lane, lo, hi in merge_lanes(lengths, 4) for i in range(lo, hi)]
    rest = [(lane, i) for lane, lo, hi in schedule_from(lengths, 4, start) for i in range(lo, hi)]
    assert rest == full[start:]


@pytest.fixture(scope="module")
def train_len(shard_root):
    return sum(1 for _ in read_split_samples(shard_root, "train"))


def test_zero_and_two_workers_give_the_same_batches(shard_root, train_len):
    ds = ShardDataset(shard_root, "train", image_size=(32, 16), seed=7, lanes=2, chunk=CHUNK)
    ds.set_epoch(3)
    in_process = _batches(ds, 0)
    with_workers = _batches(ds, 2)
    assert [b.tolist() for b in in_process] == [b.tolist() for b in with_workers]
    flat = np.concatenate(in_process)
    assert sorted(flat.tolist()) == list(range(train_len))  # nothing dropped, nothing twice
    assert np.array_equal(flat, ds.order())


def test_samples_carry_their_labels(shard_root):
    truth = {s["index"]: (s["vid"], s["camid"]) for s in read_split_samples(shard_root, "train")}
    ds = ShardDataset(shard_root, "train", image_size=(32, 16), seed=1, lanes=2, chunk=CHUNK)
    for images, index, vid, camid in DataLoader(ds, batch_size=None, num_workers=2):
        assert images.shape == (len(index), 3, 32, 16) and images.dtype.is_floating_point is False
        for i, v, c in zip(index.tolist(), vid.tolist(), camid.tolist()):
            assert truth[i] == (v, c)


def test_same_seed_and_epoch_same_order_other_epoch_other_order(shard_root):
    ds = ShardDataset(shard_root, "train", image_size=(16, 8), seed=5, lanes=1, chunk=8)
    ds.set_epoch(1)
    first = np.concatenate(_batches(ds, 0))
    second = np.concatenate(_batches(ds, 0))
    ds.set_epoch(2)
    other = np.concatenate(_batches(ds, 0))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other) and sorted(first) == sorted(other)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("start", [1, CHUNK, CHUNK + 2, 37, -1])
def test_resume_mid_epoch(shard_root, train_len, workers, start):
    start = train_len - 1 if start == -1 else start
    ds = ShardDataset(shard_root, "train", image_size=(16, 8), seed=11, lanes=2, chunk=CHUNK)
    ds.set_epoch(4)
    full = _batches(ds, 0)
    flat = np.concatenate(full)
    ds.set_epoch(4, start=start)
    resumed = _batches(ds, workers)
    assert np.array_equal(np.concatenate(resumed), flat[start:])
    # after the (possibly short) first batch, batch boundaries are those of the uninterrupted epoch
    ends = np.cumsum([len(b) for b in full])
    resumed_ends = start + np.cumsum([len(b) for b in resumed])
    assert set(resumed_ends.tolist()) <= set(ends.tolist())


@pytest.mark.parametrize(("size", "start"), [(2, 0), (3, 0), (2, CHUNK + 2), (4, 3)])
def test_processes_take_their_share_of_every_global_batch(shard_root, size, start):
    """Rank r of W yields its slice of each batch of the one canonical order: together, batch by batch,
    the W processes see what one process sees, whatever W and wherever a resumed epoch starts."""
    one = ShardDataset(shard_root, "train", image_size=(16, 8), seed=3, lanes=2, chunk=CHUNK)
    one.set_epoch(2, start=start)
    whole = _batches(one, 2)
    parts = []
    for rank in range(size):
        ds = ShardDataset(shard_root, "train", image_size=(16, 8), seed=3, lanes=2, chunk=CHUNK, share=(rank, size))
        ds.set_epoch(2, start=start)
        parts.append(_batches(ds, 2 if rank % 2 else 0))
    assert all(len(p) == len(whole) for p in parts)
    for b, batch in enumerate(whole):
        assert np.concatenate([p[b] for p in parts]).tolist() == batch.tolist()
        assert [len(p[b]) for p in parts] == [
            len(batch) * (r + 1) // size - len(batch) * r // size for r in range(size)
        ]
    with pytest.raises(ConfigError, match="share"):
        ShardDataset(shard_root, "train", share=(2, 2))


def test_resume_at_the_end_yields_nothing(shard_root, train_len):
    ds = ShardDataset(shard_root, "train", lanes=2, chunk=CHUNK)
    ds.set_epoch(0, start=train_len)
    assert _batches(ds, 2) == []
    with pytest.raises(ConfigError, match="start position"):
        ds.set_epoch(0, start=train_len + 1)


def test_worker_count_must_match_lanes(shard_root):
    ds = ShardDataset(shard_root, "train", lanes=2, chunk=CHUNK)
    with pytest.raises(ConfigError, match="lanes=2"):
        _batches(ds, 1)


def test_unknown_split_and_missing_shard(shard_root, tmp_path):
    import shutil

    with pytest.raises(ShardNotFoundError, match="query-small"):
        ShardDataset(shard_root, "query")
    copy = tmp_path / "s"
    shutil.copytree(shard_root, copy)
    (copy / "train" / "train-000001.tar").unlink()
    ds = ShardDataset(copy, "train", shuffle=False, chunk=50)
    with pytest.raises(ShardNotFoundError, match="train-000001.tar is missing"):
        _batches(ds, 0)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_webdataset_reads_the_shards(shard_root):
    """The shards are plain WebDataset: its own reader sees every sample with image and metadata."""
    import json

    import webdataset as wds

    files = sorted(str(p) for p in (shard_root / "train").glob("*.tar"))
    samples = list(wds.WebDataset(files, shardshuffle=False, empty_check=False))
    ours = {s["key"]: s for s in read_split_samples(shard_root, "train")}
    assert len(samples) == len(ours)
    for s in samples:
        meta = json.loads(s["json"])
        assert s["jpg"] == ours[s["__key__"]]["image"] and meta["index"] == ours[s["__key__"]]["index"]
    del samples  # webdataset leaves its file objects to the garbage collector


def test_several_splits_read_as_one_run_of_indices(veri776_shards):
    """Transductive training reads train then gallery: gallery sample i becomes index n_train + i."""
    train = {s["index"]: s for s in read_split_samples(veri776_shards, "train")}
    gallery = {s["index"]: s for s in read_split_samples(veri776_shards, "gallery")}
    ds = ShardDataset(veri776_shards, ("train", "gallery"), image_size=(16, 8), seed=2, lanes=2, chunk=CHUNK)
    assert len(ds) == len(train) + len(gallery)
    seen = {}
    for workers in (0, 2):
        for images, index, vid, camid in DataLoader(ds, batch_size=None, num_workers=workers):
            for k, i in enumerate(index.tolist()):
                truth = train[i] if i < len(train) else gallery[i - len(train)]
                assert (vid[k], camid[k]) == (truth["vid"], truth["camid"])
                seen.setdefault(i, images[k])
                assert torch.equal(seen[i], images[k])  # 0 and 2 workers decode the same sample for an index
    assert sorted(seen) == list(range(len(train) + len(gallery)))
    single = ShardDataset(veri776_shards, "gallery", image_size=(16, 8), shuffle=False, chunk=CHUNK)
    for images, index, _, _ in single:
        for k, i in enumerate(index.tolist()):
            assert torch.equal(seen[len(train) + i], images[k])
    with pytest.raises(ConfigError, match="distinct split names"):
        ShardDataset(veri776_shards, ("train", "train"))
    with pytest.raises(ShardNotFoundError, match="gallery-small"):
        ShardDataset(veri776_shards, ("train", "gallery-small"))


def test_decode_on_device_gives_the_batches_the_workers_decode(shard_root):
    """decode=False yields encoded bytes; decode_batch (the --decode-on-device path, here on the CPU) gives the
    same bits."""
    kwargs = dict(image_size=(24, 12), seed=4, lanes=2, chunk=CHUNK)
    plain, encoded = (
        ShardDataset(shard_root, "train", **kwargs),
        ShardDataset(shard_root, "train", decode=False, **kwargs),
    )
    plain.set_epoch(1)
    encoded.set_epoch(1)
    seen = []
    for (images, index, _, _), (raw, raw_index, _, _) in zip(
        DataLoader(plain, batch_size=None, num_workers=2), DataLoader(encoded, batch_size=None, num_workers=2)
    ):
        assert isinstance(raw, list) and all(r.ndim == 1 and r.dtype == torch.uint8 for r in raw)
        assert torch.equal(index, raw_index)
        assert torch.equal(decode_batch(raw, (24, 12), "cpu"), images)
        seen += index.tolist()
    assert seen == plain.order().tolist()  # the whole epoch went through both


def test_decode_batch_mixes_formats_and_names_a_broken_image():
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    files = {}
    for fmt in ("JPEG", "PNG"):
        buf = BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt)
        files[fmt] = buf.getvalue()
    batch = [encoded_tensor(files["JPEG"]), encoded_tensor(files["PNG"]), encoded_tensor(files["JPEG"])]
    out = decode_batch(batch, (10, 15))
    assert out.shape == (3, 3, 10, 15) and out.dtype == torch.uint8
    for k, fmt in enumerate(("JPEG", "PNG", "JPEG")):
        assert torch.equal(out[k], resize_uint8(decode_tensor(files[fmt]), (10, 15)))
    broken = encoded_tensor(files["JPEG"][:2] + b"not an image at all")
    with pytest.raises(ShardError, match="cannot decode image 1 of the batch"):
        decode_batch([batch[0], broken], (10, 15))
