from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from helpers import SYNTH

from wildreid.core.errors import ConfigError, LayoutError
from wildreid.shards import detect_layout, read_dataset
from wildreid.shards.layouts import camera_rule, read_folder, read_list, read_veriwild


def test_veriwild_official_layout(veriwild_root):
    index = read_dataset(veriwild_root)
    assert index.layout == "veriwild"
    assert list(index.records) == [
        "train",
        "query-small",
        "gallery-small",
        "query-medium",
        "gallery-medium",
        "query-large",
        "gallery-large",
    ]
    train = index.records["train"]
    assert len(train) == SYNTH["train_vehicles"] * SYNTH["images_per_vehicle"]
    assert train == sorted(train)
    assert {r.vid for r in train} == set(range(1, SYNTH["train_vehicles"] + 1))
    assert all(1 <= r.camid <= SYNTH["cameras"] for r in train)
    assert len(index.records["query-large"]) == SYNTH["test_vehicles"]
    # cameras come from vehicle_info.txt, line by line
    info = (veriwild_root / "train_test_split" / "vehicle_info.txt").read_text().splitlines()[1:]
    cams = {line.split(";")[0]: int(line.split(";")[1]) for line in info}
    for r in train[:10]:
        assert cams[r.path[len("images/") : -len(".jpg")]] == r.camid
    assert index.rejects == []


def test_veri776_layout(veri776_root, veriwild_root):
    index = read_dataset(veri776_root)
    assert index.layout == "veri776"
    assert list(index.records) == ["train", "query", "gallery"]
    original = read_veriwild(veriwild_root)
    for ours, theirs in (("train", "train"), ("query", "query-large"), ("gallery", "gallery-large")):
        got = sorted((r.vid, r.camid) for r in index.records[ours])
        assert got == sorted((r.vid, r.camid) for r in original.records[theirs])


def test_flat_layout(flat_root, veriwild_root):
    index = read_dataset(flat_root)
    assert index.layout == "flat"
    original = read_veriwild(veriwild_root)
    pairs = {
        "train": "train",
        "query": "query-large",
        "gallery": "gallery-large",
        "query-small": "query-small",
        "gallery-small": "gallery-small",
        "query-medium": "query-medium",
        "gallery-medium": "gallery-medium",
    }
    assert set(index.records) == set(pairs)
    for ours, theirs in pairs.items():
        got = sorted((r.vid, r.camid) for r in index.records[ours])
        assert got == sorted((r.vid, r.camid) for r in original.records[theirs])


@pytest.mark.parametrize(
    "fixture, expected", [("veriwild_root", "veriwild"), ("veri776_root", "veri776"), ("flat_root", "flat")]
)
def test_auto_detection(request, fixture, expected):
    assert detect_layout(request.getfixturevalue(fixture)) == expected


def test_unknown_folder_names_what_was_looked_for(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(LayoutError) as err:
        read_dataset(tmp_path)
    message = str(err.value)
    assert "train_test_split/train_list.txt" in message and "image_train" in message
    assert "bounding_box_train" in message and "\n" not in message


def test_explicit_layout_that_does_not_match(veri776_root):
    with pytest.raises(LayoutError, match="not in the VeRi-Wild official layout"):
        read_dataset(veri776_root, "veriwild")
    with pytest.raises(LayoutError, match="unknown layout"):
        read_dataset(veri776_root, "market")


def test_veriwild_list_entries_with_extension_and_problems(veriwild_root, tmp_path):
    root = tmp_path / "vw"
    shutil.copytree(veriwild_root, root)
    train_list = root / "train_test_split" / "train_list.txt"
    lines = train_list.read_text().splitlines()
    # an explicit extension is accepted, a missing file and a malformed line are rejected with reasons
    lines[0] = lines[0] + ".jpg"
    lines.append("99999/999999")
    lines.append("not-an-entry")
    train_list.write_text("\n".join(lines) + "\n")
    index = read_dataset(root)
    assert len(index.records["train"]) == len(lines) - 2
    reasons = {r.path: r.reason for r in index.rejects}
    assert reasons["images/99999/999999.jpg"] == "missing file"
    assert "expected 'vid/imgid'" in reasons["not-an-entry"]


def test_veriwild_without_vehicle_info(veriwild_root, tmp_path):
    root = tmp_path / "vw"
    shutil.copytree(veriwild_root, root)
    (root / "train_test_split" / "vehicle_info.txt").unlink()
    with pytest.raises(LayoutError, match="vehicle_info.txt"):
        read_dataset(root)


def test_folder_layout_rejects_badly_named_images(veri776_root, tmp_path):
    root = tmp_path / "v"
    shutil.copytree(veri776_root, root)
    first = sorted((root / "image_train").iterdir())[0]
    shutil.copyfile(first, root / "image_train" / "holiday.jpg")
    (root / "image_train" / "Thumbs.db").write_bytes(b"x")
    index = read_dataset(root)
    assert [r.path for r in index.rejects] == ["image_train/holiday.jpg"]
    assert all(not r.path.endswith("Thumbs.db") for r in index.records["train"])


# --------------------------------------------------------------------------- folder and list layouts


def _images(veriwild_root, count: int) -> list:
    """The first ``count`` synthetic train images (real JPEG files)."""
    return [veriwild_root / r.path for r in read_veriwild(veriwild_root).records["train"][:count]]


@pytest.fixture
def photos(veriwild_root, tmp_path):
    """A nested folder of images without ids: c1/ (two levels deep too), c2/, a top-level image, and things
    that are not images (a text file, hidden files and folders)."""
    root = tmp_path / "photos"
    files = ["c1/0001.jpg", "c1/evening/0002.jpg", "c2/0001.jpg", "c2/0003.JPG", "top.jpg"]
    for src, rel in zip(_images(veriwild_root, len(files)), files):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, root / rel)
    (root / "notes.txt").write_text("not an image")
    (root / "c2" / ".0004.jpg").write_bytes(b"hidden")
    (root / ".cache").mkdir()
    shutil.copyfile(root / "top.jpg", root / ".cache" / "0005.jpg")
    return root


@pytest.mark.parametrize(
    "camera_from, cameras, rejected",
    [
        (None, {"c1/0001.jpg": -1, "c1/evening/0002.jpg": -1, "c2/0001.jpg": -1, "c2/0003.JPG": -1, "top.jpg": -1}, {}),
        (
            "level:1",
            {"c1/0001.jpg": 1, "c1/evening/0002.jpg": 1, "c2/0001.jpg": 2, "c2/0003.JPG": 2},
            {"top.jpg": "has 0 folder level(s), not 1"},
        ),
        (
            "level:2",
            {},
            {
                "c1/0001.jpg": "not 2",
                "c1/evening/0002.jpg": "folder 'evening' is not a camera number",
                "c2/0001.jpg": "not 2",
                "c2/0003.JPG": "not 2",
                "top.jpg": "not 2",
            },
        ),
        (
            r"regex:^c(?P<camera>\d+)/",
            {"c1/0001.jpg": 1, "c1/evening/0002.jpg": 1, "c2/0001.jpg": 2, "c2/0003.JPG": 2},
            {"top.jpg": "no match in the path"},
        ),
        (r"regex:(?P<camera>\d+)\.jpg$", {"c1/0001.jpg": 1, "c1/evening/0002.jpg": 2, "c2/0001.jpg": 1}, None),
    ],
)
def test_folder_layout_reads_every_image_with_cameras_from_a_rule(photos, camera_from, cameras, rejected):
    index = read_dataset(photos, "folder", camera_from) if cameras else None
    if index is None:  # every image rejected: nothing to shard, the error names the first reason
        with pytest.raises(LayoutError, match="lists no usable images; 5 rejected, first c1/0001.jpg"):
            read_dataset(photos, "folder", camera_from)
        index = read_folder(photos, camera_from)
    assert index.layout == "folder" and index.root == photos.resolve() and index.source == photos.resolve()
    assert list(index.records) == ["train"] and not index.split_folders
    records = index.records["train"]
    assert [r.path for r in records] == sorted(cameras)  # sorted, hidden files and non-images left out
    assert {r.path: r.camid for r in records} == cameras
    assert all(r.vid == -1 and r.split == "train" for r in records)
    if rejected is None:  # 0003.JPG and top.jpg do not match: rejects too
        rejected = {"c2/0003.JPG": "no match", "top.jpg": "no match"}
    assert {r.path: r.reason for r in index.rejects}.keys() == rejected.keys()
    for r in index.rejects:
        assert rejected[r.path] in r.reason and r.split == "train"


@pytest.mark.parametrize(
    "spec, text",
    [
        ("level:0", "level:N with N >= 1"),
        ("level:x", "level:N with N >= 1"),
        ("regex:c(\\d+)", "group named camera"),
        ("regex:c(?P<camera>", "not a valid regular expression"),
        ("folder:1", "expected --camera-from level:N or regex:PATTERN"),
    ],
)
def test_bad_camera_rules_are_config_errors(spec, text, photos):
    with pytest.raises(ConfigError, match=re.escape(text)) as err:
        camera_rule(spec)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(text)):
        read_dataset(photos, "folder", spec)


def test_camera_rule_only_for_folders(veriwild_root):
    with pytest.raises(ConfigError, match="applies to --layout folder, not to the VeRi-Wild official"):
        read_dataset(veriwild_root, camera_from="level:1")


def test_folder_layout_on_a_benchmark_folder_only_when_asked(veriwild_root, tmp_path):
    # asked for: every image, no ids, although the folder is VeRi-Wild
    index = read_dataset(veriwild_root, "folder")
    assert index.count() == len(list((veriwild_root / "images").rglob("*.jpg")))
    assert {r.vid for r in index.records["train"]} == {-1}
    # a VeRi-Wild folder that lost its train list is an error, never a folder of unlabelled images
    broken = tmp_path / "vw"
    shutil.copytree(veriwild_root, broken)
    (broken / "train_test_split" / "train_list.txt").unlink()
    with pytest.raises(LayoutError) as err:
        read_dataset(broken)
    message = str(err.value)
    assert "matches no known dataset layout" in message and "a file is missing" in message
    assert "--layout folder" in message and "\n" not in message


def _write_list(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_list_layout_with_ids_splits_and_bad_rows(veriwild_root, tmp_path):
    a, b, c, d = _images(veriwild_root, 4)
    (tmp_path / "lists" / "img").mkdir(parents=True)
    for src, name in ((a, "a.jpg"), (b, "b.jpg")):
        shutil.copyfile(src, tmp_path / "lists" / "img" / name)
    shutil.copyfile(c, tmp_path / "outside.jpg")
    rows = [
        "Path,vid,camid,split",  # header names are case-insensitive
        "img/a.jpg,7,3,query-small",
        "img/b.jpg,,,gallery-small",  # empty ids: unknown
        f"{tmp_path / 'outside.jpg'},8,-1,gallery-small",  # absolute, outside the list's folder
        f"{d},9,2,train",  # absolute, elsewhere
        "",  # blank lines are skipped
        "img/a.jpg,7,3,gallery-small",  # the same image in another split is fine
        "img/missing.jpg,1,1,train",
        "img/a.jpg,x,3,train",
        "img/b.jpg,4,c5,train",
        "img/b.jpg,4,5,train/../x",
        "img/b.jpg,4,5",
        "img/a.jpg,7,3,query-small",  # listed twice
        "img/notes.txt,1,1,train",
        "img/b.jpg,-2,1,train",
    ]
    index = read_dataset(_write_list(tmp_path / "lists" / "images.csv", "\n".join(rows) + "\n"))
    assert index.layout == "list" and index.root == (tmp_path / "lists").resolve()
    assert index.source == (tmp_path / "lists" / "images.csv").resolve() and not index.split_folders
    assert list(index.records) == ["query-small", "gallery-small", "train"]  # order of first appearance
    got = {s: [(r.path, r.vid, r.camid) for r in recs] for s, recs in index.records.items()}
    outside_d = Path(os.path.relpath(d.resolve(), (tmp_path / "lists").resolve())).as_posix()
    assert got == {
        "query-small": [("img/a.jpg", 7, 3)],
        "gallery-small": sorted([("img/b.jpg", -1, -1), ("../outside.jpg", 8, -1), ("img/a.jpg", 7, 3)]),
        "train": [(outside_d, 9, 2)],
    }
    reasons = [(r.split, r.path, r.reason) for r in index.rejects]
    assert reasons[0] == ("train", "img/missing.jpg", "missing file")
    expected = [
        ("train", "img/a.jpg", "images.csv:9: expected vid to be an integer >= 0"),
        ("train", "img/b.jpg", "images.csv:10: expected camid to be an integer >= 0"),
        ("train/../x", "img/b.jpg", "images.csv:11: expected a split name"),
        ("train", "img/b.jpg", "images.csv:12: expected 4 fields (path, vid, camid, split), found 3"),
        ("query-small", "img/a.jpg", "images.csv:13: listed twice in split query-small (first on line 2)"),
        ("train", "img/notes.txt", "images.csv:14: expected the path of an image"),
        ("train", "img/b.jpg", "images.csv:15: expected vid to be an integer >= 0"),
    ]
    assert len(reasons) == 1 + len(expected)
    for (split, path, reason), (e_split, e_path, e_reason) in zip(reasons[1:], expected):
        assert (split, path) == (e_split, e_path) and reason.startswith(e_reason), reason


def test_list_layout_without_optional_columns(veriwild_root, tmp_path):
    a, b = _images(veriwild_root, 2)
    shutil.copyfile(a, tmp_path / "a.jpg")
    shutil.copyfile(b, tmp_path / "b.jpg")
    index = read_list(_write_list(tmp_path / "l.csv", "path\nb.jpg\na.jpg\n"))
    assert {s: [(r.path, r.vid, r.camid) for r in recs] for s, recs in index.records.items()} == {
        "train": [("a.jpg", -1, -1), ("b.jpg", -1, -1)]
    }
    index = read_list(_write_list(tmp_path / "v.csv", "vid,path\n3,b.jpg\n"))
    assert index.records["train"][0].vid == 3 and index.records["train"][0].camid == -1


@pytest.mark.parametrize(
    "text", ["", "file,vid\na.jpg,1\n", "path,vid,vid\na.jpg,1,1\n", "a.jpg,1\n", "path,cam\na.jpg,1\n"]
)
def test_list_needs_a_header_naming_known_columns(tmp_path, text):
    with pytest.raises(LayoutError, match="expected a first line naming the columns") as err:
        read_dataset(_write_list(tmp_path / "l.csv", text))
    assert "\n" not in str(err.value)


def test_auto_detection_of_lists_and_folders_of_images(photos, veriwild_root, tmp_path):
    listed = _write_list(tmp_path / "l.CSV", "path\nphotos/top.jpg\n")
    assert detect_layout(listed) == "list"
    assert read_dataset(listed).records["train"][0].path == "photos/top.jpg"
    with pytest.raises(LayoutError, match="is a file but not a .csv image list"):
        read_dataset(_write_list(tmp_path / "l.txt", "path\nphotos/top.jpg\n"))
    assert read_dataset(tmp_path / "l.txt", "list").count() == 1  # asked for: any suffix
    with pytest.raises(LayoutError, match=r"it holds images \(e.g. top.jpg\).*pass --layout folder"):
        detect_layout(photos)
    with pytest.raises(LayoutError, match="expected a CSV image list, found no file"):
        read_dataset(photos, "list")
    with pytest.raises(LayoutError, match="expected a folder of images"):
        read_dataset(listed, "folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match=r"\(folder of images layout\) lists no usable images$"):
        read_dataset(tmp_path / "empty", "folder")
