"""The per-shard sample-offset index: written by the shard writer, rebuilt by a scan, and what lets the
reader seek to samples instead of holding whole shards in memory."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wildreid.core.errors import ShardError
from wildreid.shards import pack_dataset, read_dataset
from wildreid.shards.reader import ShardDataset, read_split_samples
from wildreid.shards.synth import write_synthetic
from wildreid.shards.tario import scan_sample_offsets
from wildreid.shards.writer import index_path, load_manifest, load_sample_offsets, verify_shards


def _shards(root: Path) -> list[tuple[Path, dict]]:
    manifest = load_manifest(root)
    return [(root / s["file"], s) for split in manifest["splits"].values() for s in split["shards"]]


def test_the_written_index_equals_a_scan_and_python_tarfile(shard_root):
    for path, entry in _shards(shard_root):
        written = np.fromfile(index_path(path), dtype="<u8")
        assert written.tolist() == scan_sample_offsets(path)
        assert len(written) == entry["samples"] + 1
        # every sample begins at the header of its image member, as tarfile sees the archive
        with tarfile.open(path) as tar:
            images = [m.offset for m in tar.getmembers() if not m.name.endswith(".json")]
        assert written[:-1].tolist() == images
        assert written[-1] <= path.stat().st_size


def test_scan_handles_pax_long_names(tmp_path):
    shard = tmp_path / "long.tar"
    names = [f"{'x' * 120}/{k:03d}" for k in range(3)] + ["short/004"]
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            for ext, data in (("jpg", b"\xff\xd8" + bytes(700)), ("json", b"{}")):
                info = tarfile.TarInfo(f"{name}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    offsets = scan_sample_offsets(shard)
    assert len(offsets) == len(names) + 1
    with tarfile.open(shard) as tar:
        jpgs = [m for m in tar.getmembers() if m.name.endswith(".jpg")]
    # a PAX header precedes each long name, so a sample starts before its image member's header
    assert all(start <= m.offset for start, m in zip(offsets, jpgs))
    assert offsets[3] == jpgs[3].offset  # the short name has no extended header


def test_reader_without_index_files_scans_and_reads_the_same(shard_root, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_root, copy)
    for path, _ in _shards(copy):
        index_path(path).unlink()
    ref = ShardDataset(shard_root, "train", image_size=(32, 32), seed=5, chunk=7)
    new = ShardDataset(copy, "train", image_size=(32, 32), seed=5, chunk=7)
    for ds in (ref, new):
        ds.set_epoch(2, start=9)
    for (a, ia, *_), (b, ib, *_) in zip(ref, new, strict=True):
        assert ia.tolist() == ib.tolist() and bool((a == b).all())
    assert [s["key"] for s in read_split_samples(copy, "gallery-large")] == [
        s["key"] for s in read_split_samples(shard_root, "gallery-large")
    ]
    # the manifest records an index per shard, so verify names the missing files
    problems = verify_shards(copy)
    assert problems and all(p.endswith("re-run 'wildreid shard' to write it)") for p in problems)


def test_a_damaged_or_foreign_index_is_an_error_not_a_wrong_sample(shard_root, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_root, copy)
    (path, entry), (other, _) = _shards(copy)[:2]
    shutil.copyfile(index_path(other), index_path(path))  # another shard's index
    with pytest.raises(ShardError, match="damaged index"):
        load_sample_offsets(path, entry["samples"], sha256=entry["index_sha256"])
    # without the manifest's digest the offsets are still checked against the shard's samples
    data = np.fromfile(index_path(path), dtype="<u8")
    data[1] += 512
    data.tofile(index_path(path))
    with pytest.raises(ShardError):
        list(read_split_samples(copy, entry["file"].split("/")[0]))
    assert any("sha256 differs" in p for p in verify_shards(copy))


def test_resharding_keeps_good_indexes_and_rewrites_missing_ones(veriwild_root, tmp_path):
    out = tmp_path / "shards"
    pack_dataset(read_dataset(veriwild_root), out, max_samples=12)
    first = {p: index_path(p).read_bytes() for p, _ in _shards(out)}
    lost = next(iter(first))
    index_path(lost).unlink()
    pack_dataset(read_dataset(veriwild_root), out, max_samples=12)
    assert {p: index_path(p).read_bytes() for p, _ in _shards(out)} == first
    assert verify_shards(out) == []


# One epoch over one big shard, measured in a child process: the reader's peak memory must not grow with
# the shard (it used to hold two whole shards per lane).
_READ_ONE_EPOCH = """
import resource, sys
from wildreid.shards.reader import ShardDataset
ds = ShardDataset(sys.argv[1], "train", chunk=16, decode=False)
ds.set_epoch(1)
n = sum(len(batch[1]) for batch in ds)
print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def _peak_rss_of_one_epoch(root: Path) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", _READ_ONE_EPOCH, str(root)], check=True, capture_output=True, text=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.slow
def test_reading_a_shard_far_larger_than_the_reader_keeps_memory_flat(tmp_path):
    data = tmp_path / "data"
    write_synthetic(data, train_vehicles=40, test_vehicles=2, images_per_vehicle=6, cameras=4, image_size=(32, 32))
    rng = np.random.default_rng(0)
    for jpg in sorted((data / "images").rglob("*.jpg")):  # noise JPEGs of ~190 kB: a 45 MB training shard
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(buf, "JPEG", quality=95)
        jpg.write_bytes(buf.getvalue())
    big, small = tmp_path / "big", tmp_path / "small"
    pack_dataset(read_dataset(data), big, max_samples=10_000, max_bytes=1 << 30)
    pack_dataset(read_dataset(data), small, max_samples=4)
    shard_bytes = load_manifest(big)["splits"]["train"]["num_bytes"]
    assert len(load_manifest(big)["splits"]["train"]["shards"]) == 1 and shard_bytes > 40 << 20
    n_big, peak_big = _peak_rss_of_one_epoch(big)
    n_small, peak_small = _peak_rss_of_one_epoch(small)
    assert n_big == n_small == 240
    # a whole-shard buffer would add at least shard_bytes (two shards per lane: twice that)
    print(f"peak RSS: one {shard_bytes >> 20} MiB shard {peak_big >> 20} MiB, 4-sample shards {peak_small >> 20} MiB")
    assert peak_big - peak_small < 16 << 20, (peak_big, peak_small, shard_bytes)
    assert json.loads((big / "manifest.json").read_text())["splits"]["train"]["shards"][0]["index_sha256"]


def test_long_and_non_ascii_paths_of_a_folder_read_back(tmp_path):
    """Folder layouts make multi-block (PAX) member headers ordinary: the written offsets must count them."""
    src = tmp_path / "crops"
    long_dir = "site-north-entrance-2024-05-01/camera-a-with-a-long-descriptive-name/hour-13"
    names = [f"cam02/Ünïcödé/vé_{k}.jpg" for k in range(3)] + [f"{long_dir}/{k:04d}.jpg" for k in range(3)]
    names += [f"plain/{k}.jpg" for k in range(3)]
    for k, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (20 * k, 100, 200 - 20 * k)).save(src / name, quality=90)
    out = tmp_path / "shards"
    pack_dataset(read_dataset(src, "folder"), out, max_samples=100)
    assert verify_shards(out) == []
    ((path, entry),) = _shards(out)
    assert np.fromfile(index_path(path), dtype="<u8").tolist() == scan_sample_offsets(path)
    dataset = ShardDataset(out, "train", image_size=(16, 16), shuffle=False, chunk=4)
    dataset.set_epoch(0, 0)
    seen = [int(i) for _, idx, _, _ in dataset for i in idx]
    assert seen == list(range(len(names)))
    # an index that fits the shard but points elsewhere is found by --verify and rewritten by a re-run
    wrong = np.fromfile(index_path(path), dtype="<u8")
    wrong[1:-1] -= 512
    index_path(path).write_bytes(wrong.tobytes())
    load_manifest(out)  # still a manifest; the index no longer matches the shard's headers
    assert any("offsets differ" in p or "sha256 differs" in p for p in verify_shards(out))
