"""The synthetic VeRi-Wild set: layout, determinism, and that it is a real Re-ID problem."""

from __future__ import annotations

import dataclasses
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wildreid.core.errors import ConfigError
from wildreid.shards import synth
from wildreid.shards.synth import write_synthetic

SPLIT = "train_test_split"
SMALL = dict(train_vehicles=12, test_vehicles=10, images_per_vehicle=4, cameras=5, image_size=(48, 64), seed=3)


def read_list(path: Path) -> list[str]:
    text = path.read_text()
    assert text.endswith("\n")
    return text.splitlines()


def read_info(root: Path) -> dict[str, list[str]]:
    lines = read_list(root / SPLIT / "vehicle_info.txt")
    assert lines[0] == "id/image;Camera ID;Time;Model;Type;Color"
    return {fields[0]: fields[1:] for fields in (line.split(";") for line in lines[1:])}


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "small"
    return out, write_synthetic(out, **SMALL)


def test_layout_and_counts(small):
    root, summary = small
    t, v, n, c = SMALL["train_vehicles"], SMALL["test_vehicles"], SMALL["images_per_vehicle"], SMALL["cameras"]
    info = read_info(root)
    assert len(info) == (t + v) * n == summary["images"]
    assert sorted(info) == list(info)
    jpgs = sorted(p.relative_to(root / "images").with_suffix("").as_posix() for p in (root / "images").rglob("*.jpg"))
    assert jpgs == list(info)
    ids = [int(key.split("/")[1]) for key in info]
    assert ids == list(range(1, len(ids) + 1))  # global running image ids
    for _key, (camera, time, model, kind, color) in info.items():
        assert 1 <= int(camera) <= c
        assert len(time) == 19 and time.startswith("2017-")
        assert model.startswith("model-") and kind in synth.TYPES and color in [x[0] for x in synth.COLORS]

    train = read_list(root / SPLIT / "train_list.txt")
    assert train == sorted(train) and len(train) == t * n == summary["train"]["images"]
    assert {int(k[:5]) for k in train} == set(range(1, t + 1))

    sizes = {}
    for tag, expected in (("3000", 3), ("5000", 5), ("10000", 10)):
        query = read_list(root / SPLIT / f"test_{tag}_query.txt")
        gallery = read_list(root / SPLIT / f"test_{tag}.txt")
        assert query == sorted(query) and gallery == sorted(gallery)
        assert not set(query) & set(gallery)
        vids = {int(k[:5]) for k in query}
        assert vids == set(range(t + 1, t + 1 + expected)) == {int(k[:5]) for k in gallery}
        assert len(query) == expected and len(gallery) == expected * (n - 1)
        assert summary["test"][tag]["query"] == len(query) and summary["test"][tag]["gallery"] == len(gallery)
        sizes[tag] = (set(query), set(gallery))
    assert sizes["3000"][0] <= sizes["5000"][0] <= sizes["10000"][0]
    assert sizes["3000"][1] <= sizes["5000"][1] <= sizes["10000"][1]
    assert not {k[:5] for k in train} & {k[:5] for k in sizes["10000"][1]}

    for q in sizes["10000"][0]:
        other_cams = {info[g][0] for g in sizes["10000"][1] if g[:5] == q[:5]} - {info[q][0]}
        assert other_cams, f"query {q} has no cross-camera match"
    assert summary["models"] == 4 and summary["cameras"] == c


def test_cameras_change_scale(small):
    root, _ = small
    widths = defaultdict(list)
    for key, fields in read_info(root).items():
        with Image.open(root / "images" / f"{key}.jpg") as img:
            widths[fields[0]].append(img.size[0])
    means = sorted(np.mean(w) for w in widths.values())
    assert means[-1] > 1.3 * means[0]
    assert all(max(w) < 1.25 * min(w) for w in widths.values())  # a camera keeps roughly its own scale


def test_progress_reports_every_image(tmp_path):
    seen = []
    summary = write_synthetic(
        tmp_path / "p",
        train_vehicles=3,
        test_vehicles=2,
        images_per_vehicle=2,
        cameras=2,
        image_size=(32, 32),
        progress=seen.append,
    )
    assert sum(seen) == summary["images"] == 10


@pytest.mark.slow
def test_bytes_do_not_depend_on_workers(tmp_path):
    kwargs = dict(SMALL, train_vehicles=30)
    write_synthetic(tmp_path / "a", **kwargs, workers=1)
    write_synthetic(tmp_path / "b", **kwargs, workers=2)
    write_synthetic(tmp_path / "c", **dict(kwargs, seed=kwargs["seed"] + 1))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    assert not list(tmp_path.glob("*.partial"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        small = img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(small, np.float64).ravel() / 255.0


@pytest.mark.slow
def test_raw_pixels_do_not_solve_it(tmp_path):
    # Look-alikes seen by one camera must often be closer in raw pixels than one
    # vehicle seen by two cameras; otherwise nearest-neighbour on pixels would solve it.
    root = tmp_path / "reid"
    write_synthetic(root, train_vehicles=60, test_vehicles=1, images_per_vehicle=6, cameras=6, seed=0)
    info = read_info(root)
    keys = list(info)
    x = np.stack([pixels(root / "images" / f"{k}.jpg") for k in keys])
    sq = (x * x).sum(1)
    dist = sq[:, None] + sq[None] - 2 * x @ x.T
    vid = np.array([k[:5] for k in keys])
    cam = np.array([info[k][0] for k in keys])
    look = np.array([info[k][2] + info[k][4] for k in keys])  # model + colour
    wins = total = hits = 0
    for a in range(len(keys)):
        pos = dist[a][(vid == vid[a]) & (cam != cam[a])]
        neg = dist[a][(vid != vid[a]) & (cam == cam[a]) & (look == look[a])]
        wins += int((neg[:, None] < pos[None]).sum())
        total += neg.size * pos.size
        allowed = ~((vid == vid[a]) & (cam == cam[a]))  # the usual cross-camera protocol
        hits += vid[np.flatnonzero(allowed)[dist[a][allowed].argmin()]] == vid[a]
    assert total > 1000
    assert wins / total > 0.5
    assert hits / len(keys) < 0.3  # raw-pixel rank-1 stays poor


def test_identity_marks_are_small_but_visible():
    plan = synth._make_plan("unused", 0, (96, 96), 8, 4, 6)
    marked = synth._make_vehicle(0, 7, 4, 8, 6)
    marked = dataclasses.replace(
        marked,
        stickers=((0.1, 0.8, 0), (0.8, 0.7, 3)),
        rear_mark=(0.5, 0.6, 4),
        roof=2,
        plate=(1, 0, 1, 1, 0, 1),
        stripe=(0.5, 1),
        dent=("left", 0.4, 0.5),
    )
    bare = dataclasses.replace(marked, stickers=(), rear_mark=None, roof=0, plate=(0,) * 6, stripe=None, dent=None)
    for k in range(8):
        a, _ = synth._render(plan, marked, k)
        b, _ = synth._render(plan, bare, k)
        changed = (np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max(-1) > 25).mean()
        assert 0.003 < changed < 0.15, (k, changed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_vehicles": 0}, "train_vehicles"),
        ({"test_vehicles": -1}, "test_vehicles"),
        ({"images_per_vehicle": 1}, "images_per_vehicle"),
        ({"cameras": 1}, "cameras"),
        ({"cameras": 2.5}, "cameras"),
        ({"image_size": (31, 64)}, "image_size"),
        ({"image_size": 64}, "image_size"),
        ({"workers": 0}, "workers"),
        ({"seed": -1}, "seed"),
        ({"train_vehicles": 99999}, "at most 99999 vehicles"),
        ({"progress": "bar"}, "progress"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        write_synthetic(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_refuses_non_empty_folder(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="exists and is not empty; choose a new folder"):
        write_synthetic(tmp_path, train_vehicles=2, test_vehicles=1)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_fills_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_synthetic(out, train_vehicles=2, test_vehicles=1, images_per_vehicle=2, cameras=2, image_size=(32, 32))
    assert (out / SPLIT / "test_10000_query.txt").read_text().count("\n") == 1
