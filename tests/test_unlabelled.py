"""Images without vehicle ids end to end: shard a folder or a CSV list, train on them, and what refuses them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, SMALL, assert_picture, final_json, train_cli
from typer.testing import CliRunner

from wildreid.checkpoint import save_model
from wildreid.cli import app
from wildreid.config import load_config
from wildreid.model import build_model
from wildreid.shards import pack_dataset, read_dataset
from wildreid.shards.reader import read_split_samples
from wildreid.stores import FeatureStore

runner = CliRunner()


def _one_line_error(result, code: int, text: str) -> str:
    """The command failed with ``code`` and one line of error (after the line naming the layout, if it got there)."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("layout: ")]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.output
    return lines[0]


@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_shard_a_folder_of_images_without_ids(photos, tmp_path):
    out = tmp_path / "shards"
    refused = runner.invoke(app, ["shard", str(photos), str(out)])  # auto: a folder of images is no benchmark
    _one_line_error(refused, 3, "pass --layout folder")
    assert not out.exists()
    done = runner.invoke(app, ["shard", str(photos), str(out), "--layout", "folder", "--camera-from", "level:1"])
    assert done.exit_code == 0, done.output
    assert "folder of images (as asked), 80 images listed" in done.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["layout"], manifest["source"], manifest["skipped"]) == ("folder", str(photos.resolve()), [])
    train = manifest["splits"]["train"]
    assert (train["num_samples"], train["num_vehicles"], train["num_cameras"], train["num_unlabelled"]) == (
        80,
        0,
        3,
        80,
    )
    samples = list(read_split_samples(out, "train"))
    assert [s["path"] for s in samples] == sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    assert {s["vid"] for s in samples} == {-1}
    assert all(s["camid"] == int(s["path"][len("part")]) for s in samples)
    # keys keep the whole path (the folder is part of it), with no dot: img.0000.jpg -> part0/img_0000
    assert samples[0]["key"] == "part0/img_0000" and len({s["key"] for s in samples}) == 80
    import webdataset as wds

    files = [str(out / s["file"]) for s in train["shards"]]
    read = list(wds.WebDataset(files, shardshuffle=False, empty_check=False))
    assert [r["__key__"] for r in read] == [s["key"] for s in samples]  # WebDataset groups them the same way
    del read  # webdataset leaves its file objects to the garbage collector
    inspected = runner.invoke(app, ["inspect", str(out), "--image-size", "32x16", "--json"])
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.output.strip().splitlines()[-1])["train"]
    assert (summary["samples"], summary["vehicles"], summary["cameras"]) == (80, 0, 3)


def test_shard_a_list_with_bad_rows_and_strict(photos, tmp_path):
    listed = tmp_path / "images.csv"
    listed.write_text(
        "path,vid,split\n"
        f"{photos / 'part0' / 'img.0000.jpg'},5,query-small\n"
        f"{photos / 'part1' / 'img.0001.jpg'},,gallery-small\n"
        f"{photos / 'part2' / 'img.0002.jpg'},six,gallery-small\n"
        "gone.jpg,7,gallery-small\n"
    )
    strict = runner.invoke(app, ["shard", str(listed), str(tmp_path / "strict"), "--strict"])
    _one_line_error(strict, 4, "--strict: 2 bad input(s), first")
    assert not (tmp_path / "strict" / "manifest.json").exists()
    refused = runner.invoke(app, ["shard", str(listed), str(tmp_path / "x"), "--camera-from", "level:1"])
    _one_line_error(refused, 2, "--camera-from applies to --layout folder, not to the CSV image list layout")
    done = runner.invoke(app, ["shard", str(listed), str(tmp_path / "shards")])
    assert done.exit_code == 0, done.output
    assert "CSV image list (auto-detected), 2 images listed" in done.output
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (manifest["layout"], manifest["source"]) == ("list", str(listed.resolve()))
    assert list(manifest["splits"]) == ["query-small", "gallery-small"]
    gallery = manifest["splits"]["gallery-small"]
    assert (gallery["num_samples"], gallery["num_vehicles"], gallery["num_unlabelled"]) == (1, 0, 1)
    assert manifest["splits"]["query-small"]["num_vehicles"] == 1
    skipped = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
    assert skipped["gone.jpg"] == "missing file" and "expected vid to be an integer" in skipped["img.0002.jpg"]
    (sample,) = read_split_samples(tmp_path / "shards", "query-small")
    assert sample["vid"] == 5 and sample["path"].endswith("photos/part0/img.0000.jpg")


@pytest.mark.slow
def test_train_on_images_without_ids(photo_shards, tmp_path):
    """A DPLM epoch (no warm-up; the dictionary extracted first) on shards whose every vehicle id is -1: the
    history reports what needs no ids, and the run says once why precision and recall are missing."""
    quick = [*SMALL, "train.epochs=1", "train.warmup_epochs=0", "train.refresh=eval", "train.checkpoint_every_steps=0"]
    run = train_cli(photo_shards, tmp_path / "store", overrides=quick)
    (mined,) = final_json(run)["history"]
    assert not mined["warmup"] and mined["precision"] is None and mined["recall"] is None
    assert mined["mean_positives"] > 1 and 0 < mined["share_with_others"] <= 1
    assert 1 <= mined["groups"] < 80 and 1 < mined["largest_group"] <= 80
    assert run.stderr.count("are unknown (-1)") == 1 and "80 of 80 training images" in run.stderr
    table = "\n".join(run.stdout.strip().splitlines()[:-1])  # the last line is the JSON report
    assert "groups" in table and "precision" not in table
    assert (FeatureStore.open(tmp_path / "store").ids() == -1).all()
    assert_picture(tmp_path / "store" / "train" / "curves.png", size=(760, 340))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, build_model("resnet18"), load_config(ROOT / "configs" / "demo.yaml").to_dict())


@pytest.mark.parametrize(
    "query_vids, gallery_vids, text",
    [
        (["", ""], ["", "", ""], "query split 'query-small'"),
        (["1", "2"], ["", "", ""], "gallery split 'gallery-small'"),
    ],
)
def test_eval_refuses_splits_without_ids(photos, model_file, tmp_path, query_vids, gallery_vids, text):
    images = sorted(photos.rglob("*.jpg"))
    rows = [f"{images[i]},{vid},query-small" for i, vid in enumerate(query_vids)]
    rows += [f"{images[10 + i]},{vid},gallery-small" for i, vid in enumerate(gallery_vids)]
    (tmp_path / "l.csv").write_text("path,vid,split\n" + "\n".join(rows) + "\n")
    pack_dataset(read_dataset(tmp_path / "l.csv"), tmp_path / "shards")
    ckpt = shutil.copy(model_file, tmp_path / "model.pt")
    args = ["eval", "--shards", tmp_path / "shards", "--checkpoint", ckpt, "--split", "small"]
    line = _one_line_error(runner.invoke(app, [str(a) for a in args]), 2, text)
    assert "without a vehicle id (-1)" in line
    assert not (tmp_path / "features").exists()  # refused before anything was extracted


def _groups(tmp_path: Path, q_ids, g_ids) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name, ids in (("q", q_ids), ("g", g_ids)):
        x = rng.standard_normal((len(ids), 8)).astype(np.float32)
        camids = np.full(len(ids), -1)
        FeatureStore.create(tmp_path / name, len(ids), 8, dtype="float32", ids=ids, camids=camids).write_rows(0, x)
        paths.append(tmp_path / name)
    return paths[0], paths[1]


def test_eval_of_feature_groups_refuses_queries_without_ids(tmp_path):
    q, g = _groups(tmp_path, np.array([-1, -1, -1]), np.array([3, 4, -1, 4]))
    args = ["eval", "--query", str(q), "--gallery", str(g), "--memory-budget", "4GiB"]
    _one_line_error(runner.invoke(app, args), 6, "has only unknown ids (-1)")
    # a query of unknown id among labelled ones is skipped and counted, as the protocol skips queries
    q, g = _groups(tmp_path / "some", np.array([3, -1, 4]), np.array([3, 4, -1, 4]))
    done = runner.invoke(app, ["eval", "--query", str(q), "--gallery", str(g), "--memory-budget", "4GiB", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["skipped_queries"] == 1
    # a gallery row of id -1 is a distractor, as before: labelled queries are evaluated
    q, g = _groups(tmp_path / "ok", np.array([3, 4]), np.array([3, 4, -1, 4]))
    done = runner.invoke(app, ["eval", "--query", str(q), "--gallery", str(g), "--memory-budget", "4GiB", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output.strip().splitlines()[-1])["gallery"] == 4


def test_visualize_unlabelled_groups(photos, tmp_path):
    """Ranked lists of images without ids draw (every match red); without --queries none has a true match."""
    images = sorted(photos.rglob("*.jpg"))
    rows = [f"{p},,{'q' if i < 2 else 'g'}" for i, p in enumerate(images[:8])]
    (tmp_path / "l.csv").write_text("path,vid,split\n" + "\n".join(rows) + "\n")
    pack_dataset(read_dataset(tmp_path / "l.csv"), tmp_path / "shards")
    q, g = _groups(tmp_path, np.full(2, -1), np.full(6, -1))
    base = ["visualize", "--shards", tmp_path / "shards", "--query", q, "--gallery", g]
    base += ["--query-split", "q", "--gallery-split", "g", "--out", tmp_path / "lists.png"]
    drawn = runner.invoke(app, [str(a) for a in [*base, "--queries", "0,1", "--k", "3"]])
    assert drawn.exit_code == 0, drawn.output
    assert_picture(tmp_path / "lists.png", min_colours=64)  # photo thumbnails
    _one_line_error(runner.invoke(app, [str(a) for a in base]), 2, "has a true match")
