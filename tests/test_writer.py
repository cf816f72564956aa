from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
from helpers import tree_digest
from PIL import Image
from typer.testing import CliRunner

from wildreid.cli import app
from wildreid.core.errors import BadImageError
from wildreid.shards import pack_dataset, read_dataset, verify_shards
from wildreid.shards.images import image_extension
from wildreid.shards.reader import read_split_samples

runner = CliRunner()


def _shard(src, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "wildreid.cli", "shard", str(src), str(out), "--max-samples", "12", *extra],
        capture_output=True,
        text=True,
        env={**os.environ, **_env},
    )


_env: dict[str, str] = {}


@pytest.mark.slow
def test_deterministic_and_independent_of_workers(veriwild_root, tmp_path):
    index = read_dataset(veriwild_root)
    pack_dataset(index, tmp_path / "a", max_samples=12)
    pack_dataset(index, tmp_path / "b", max_samples=12, workers=2)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a == b
    assert "train/train-000000.tar" in a and "manifest.json" in a
    assert not any(".partial" in name or ".progress" in name for name in a)


def test_shard_contents_and_manifest(veriwild_root, shard_root):
    manifest = json.loads((shard_root / "manifest.json").read_text())
    index = read_dataset(veriwild_root)
    assert manifest["layout"] == "veriwild" and manifest["source"] == str(veriwild_root.resolve())
    for split, records in index.records.items():
        entry = manifest["splits"][split]
        assert entry["num_samples"] == len(records) == sum(s["samples"] for s in entry["shards"])
        assert all(s["samples"] <= 12 for s in entry["shards"])
        samples = list(read_split_samples(shard_root, split))
        assert [s["index"] for s in samples] == list(range(len(records)))
        for s, r in zip(samples, records):
            assert (s["vid"], s["camid"], s["path"]) == (r.vid, r.camid, r.path)
            # original bytes, never re-encoded
            assert s["image"] == (veriwild_root / r.path).read_bytes()
    # fixed tar metadata, sample keys as WebDataset expects them
    with tarfile.open(shard_root / "train" / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o444)}
    assert members[0].name == "00001/000001.jpg" and members[1].name == "00001/000001.json"


def test_max_bytes_cuts_shards(veriwild_root, tmp_path):
    manifest = pack_dataset(read_dataset(veriwild_root), tmp_path / "s", max_bytes=20_000)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    assert all(s["bytes"] <= 20_000 + 10_240 for s in shards)  # tar pads to whole 10 KiB records


@pytest.mark.slow
@pytest.mark.parametrize(
    "crash_at, workers",
    [
        ("scanned", "1"),
        ("mid-shard:train/train-000002.tar", "1"),
        ("shard:train/train-000001.tar", "1"),
        ("shard:gallery-large/gallery-large-000000.tar", "2"),
        ("mid-shard:train/train-000003.tar", "2"),
        ("manifest", "1"),
    ],
)
def test_kill_9_then_rerun_is_byte_identical(veriwild_root, shard_root, tmp_path, crash_at, workers):
    out = tmp_path / "out"
    _env["WILDREID_KILL_AT"] = crash_at
    try:
        crashed = _shard(veriwild_root, out, "--workers", workers)
    finally:
        del _env["WILDREID_KILL_AT"]
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr
    if workers == "1":
        assert crashed.returncode == -9
    survivors = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("*.tar")} if crash_at != "scanned" else {}
    rerun = _shard(veriwild_root, out, "--workers", workers)
    assert rerun.returncode == 0, rerun.stderr
    assert tree_digest(out) == tree_digest(shard_root)
    # complete shards that verified were reused, not rewritten
    for name, mtime in survivors.items():
        assert (out / "train" / name).stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_rerun_rewrites_a_corrupted_shard(veriwild_root, shard_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shard_root, out)
    victim = out / "train" / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert verify_shards(out) == ["train/train-000001.tar: sha256 differs from the manifest (corrupted)"]
    result = runner.invoke(app, ["shard", "--verify", str(out)])
    assert result.exit_code == 5 and "do not match the manifest" in result.output
    assert _shard(veriwild_root, out).returncode == 0
    assert tree_digest(out) == tree_digest(shard_root)
    assert runner.invoke(app, ["shard", "--verify", str(out)]).exit_code == 0


def test_refuses_a_folder_of_another_dataset(veri776_root, shard_root, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(shard_root, out)
    result = runner.invoke(app, ["shard", str(veri776_root), str(out)])
    assert result.exit_code == 5 and "holds shards of" in result.output
    assert tree_digest(out) == tree_digest(shard_root)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert runner.invoke(app, ["shard", str(veri776_root), str(other)]).exit_code == 5
    assert (other / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- bad and unusual inputs


def _jpeg(mode: str, color) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (40, 30), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def messy_root(veriwild_root, tmp_path):
    """The synthetic set with broken and unusual images planted among the train images."""
    root = tmp_path / "messy"
    shutil.copytree(veriwild_root, root)
    train = [f"images/{line}.jpg" for line in (root / "train_test_split/train_list.txt").read_text().split()]
    good = (root / train[0]).read_bytes()
    planted = {
        train[1]: good[: len(good) // 2],  # truncated
        train[2]: b"",  # zero bytes
        train[3]: b"this is not an image at all" * 20,  # undecodable
        train[4]: _jpeg("L", 128),  # grayscale
        train[5]: _jpeg("CMYK", (0, 255, 255, 0)),  # CMYK
        train[6]: _png(),  # a PNG named .jpg
    }
    for rel, data in planted.items():
        (root / rel).write_bytes(data)
    (root / train[7]).unlink()  # listed, missing
    return root, train


def test_bad_inputs_are_skipped_and_listed(messy_root, tmp_path):
    root, train = messy_root
    result = runner.invoke(app, ["shard", str(root), str(tmp_path / "out"), "--max-samples", "12"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {train[1], train[2], train[3], train[7]}
    assert skipped[train[1]].startswith("truncated")
    assert skipped[train[2]] == "empty file (0 bytes)"
    assert skipped[train[3]].startswith("not a decodable image")
    assert skipped[train[7]] == "missing file"
    assert "skipped 4 bad input(s)" in result.output and train[1] in result.output
    assert manifest["splits"]["train"]["num_samples"] == len(train) - 4

    samples = {s["path"]: s for s in read_split_samples(tmp_path / "out", "train")}
    assert not set(skipped) & set(samples)
    with tarfile.open(tmp_path / "out" / "train" / "train-000000.tar") as tar:
        names = tar.getnames()
    key = train[6][len("images/") : -len(".jpg")]
    assert f"{key}.png" in names and f"{key}.jpg" not in names  # stored under its true extension
    for rel in (train[4], train[5], train[6]):
        assert samples[rel]["image"] == (root / rel).read_bytes()  # kept as is


def test_unusual_images_come_out_as_rgb(messy_root, tmp_path):
    from torch.utils.data import DataLoader

    from wildreid.shards.reader import ShardDataset

    root, train = messy_root
    pack_dataset(read_dataset(root), tmp_path / "out", max_samples=12)
    paths = {s["index"]: s["path"] for s in read_split_samples(tmp_path / "out", "train")}
    ds = ShardDataset(tmp_path / "out", "train", image_size=(32, 16), shuffle=False, chunk=8)
    seen = {}
    for images, index, _, _ in DataLoader(ds, batch_size=None):
        assert images.shape[1:] == (3, 32, 16)
        seen.update({paths[int(i)]: img for i, img in zip(index, images)})
    gray = seen[train[4]]
    assert bool((gray[0] == gray[1]).all() and (gray[1] == gray[2]).all())
    png = seen[train[6]].float().mean(dim=(1, 2))
    assert png[1] > 150 and png[0] < 50  # the green PNG


def test_strict_fails_before_writing(messy_root, tmp_path):
    root, train = messy_root
    out = tmp_path / "out"
    result = runner.invoke(app, ["shard", str(root), str(out), "--strict"])
    assert result.exit_code == BadImageError.exit_code
    assert "--strict: 4 bad input(s)" in result.output and "nothing was written" in result.output
    assert not out.exists()


def test_truncated_after_the_header_is_caught():
    big = io.BytesIO()
    Image.effect_noise((300, 200), 60).convert("RGB").save(big, format="JPEG", quality=95)
    with pytest.raises(BadImageError, match="truncated JPEG"):
        image_extension(big.getvalue()[: len(big.getvalue()) * 2 // 3])


@pytest.mark.parametrize(
    "data, expected",
    [(b"", "empty file"), (b"\xff\xd8\xff\xe0" + b"\0" * 40, "not a decodable image"), (b"GIF89a", "not a decodable")],
)
def test_image_extension_rejects(data, expected):
    with pytest.raises(BadImageError, match=expected):
        image_extension(data)


def test_image_extension_accepts_trailing_bytes_after_eoi():
    data = _jpeg("RGB", (1, 2, 3)) + b"camera trailer"
    assert image_extension(data) == "jpg"


@pytest.mark.slow
def test_kill_9_with_bad_inputs_then_rerun(messy_root, tmp_path):
    """Bad images force a second plan; a crash between the two still ends identical to a clean run."""
    root, _ = messy_root
    clean = runner.invoke(app, ["shard", str(root), str(tmp_path / "clean"), "--max-samples", "12"])
    assert clean.exit_code == 0
    _env["WILDREID_KILL_AT"] = "shard:train/train-000003.tar"
    try:
        crashed = _shard(root, tmp_path / "out")
    finally:
        del _env["WILDREID_KILL_AT"]
    assert crashed.returncode == -9
    assert _shard(root, tmp_path / "out").returncode == 0
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "clean")
