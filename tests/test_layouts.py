from __future__ import annotations

import shutil

import pytest
from conftest import SYNTH

from wildreid.errors import LayoutError
from wildreid.shards import detect_layout, read_dataset
from wildreid.shards.layouts import read_veriwild


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
