"""Shared fixtures: small synthetic datasets made by wildreid's own generator, once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import SYNTH, final_json, train_cli

from wildreid.shards import pack_dataset, read_dataset
from wildreid.shards.layouts import read_veriwild
from wildreid.shards.synth import write_synthetic


@pytest.fixture(scope="session")
def veriwild_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("veriwild") / "data"
    write_synthetic(root, **SYNTH)
    return root


@pytest.fixture(scope="session")
def shard_root(veriwild_root, tmp_path_factory) -> Path:
    """Shards of the synthetic set, several per split (read only: copy before changing)."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    pack_dataset(read_dataset(veriwild_root), out, max_samples=12)
    return out


@pytest.fixture(scope="session")
def uninterrupted(shard_root, tmp_path_factory) -> dict:
    """The --json report of one uninterrupted training run (test_train's SMALL settings; read only):
    what every crash, stop and resume test must end with."""
    return final_json(train_cli(shard_root, tmp_path_factory.mktemp("run") / "store"))


@pytest.fixture(scope="session")
def photos(veriwild_root, tmp_path_factory) -> Path:
    """The synthetic train images under names that carry no id: part<n % 3>/img.<n>.jpg (a dot in the name)."""
    root = tmp_path_factory.mktemp("unlabelled") / "photos"
    for n, r in enumerate(read_veriwild(veriwild_root).records["train"]):
        (root / f"part{n % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(veriwild_root / r.path, root / f"part{n % 3}" / f"img.{n:04d}.jpg")
    return root


@pytest.fixture(scope="session")
def photo_shards(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unlabelled-shards") / "shards"
    pack_dataset(read_dataset(photos, "folder"), out, max_samples=32)
    return out


def _folder_layout(veriwild_root: Path, dest: Path, folders: dict[str, str], name) -> Path:
    """Re-file the synthetic VeRi-Wild images under a folder layout, renamed as that layout names them."""
    index = read_veriwild(veriwild_root)
    for split, folder in folders.items():
        (dest / folder).mkdir(parents=True)
        for n, r in enumerate(index.records[split]):
            shutil.copyfile(veriwild_root / r.path, dest / folder / name(r, n))
    return dest


@pytest.fixture(scope="session")
def veri776_root(veriwild_root, tmp_path_factory) -> Path:
    folders = {"train": "image_train", "query-large": "image_query", "gallery-large": "image_test"}
    return _folder_layout(
        veriwild_root,
        tmp_path_factory.mktemp("veri776") / "VeRi",
        folders,
        lambda r, n: f"{r.vid:04d}_c{r.camid:03d}_{n:08d}_0.jpg",
    )


@pytest.fixture(scope="session")
def veri776_shards(veri776_root, tmp_path_factory) -> Path:
    """Shards of the VeRi-776-layout copy: splits train, query, gallery (read only)."""
    out = tmp_path_factory.mktemp("veri776-shards") / "shards"
    pack_dataset(read_dataset(veri776_root), out, max_samples=40)
    return out


@pytest.fixture(scope="session")
def flat_root(veriwild_root, tmp_path_factory) -> Path:
    folders = {
        "train": "bounding_box_train",
        "query-large": "query",
        "gallery-large": "bounding_box_test",
        "query-small": "query_small",
        "gallery-small": "test_small",
        "query-medium": "query_middle",
        "gallery-medium": "test_middle",
    }
    return _folder_layout(
        veriwild_root,
        tmp_path_factory.mktemp("flat") / "VeRi-Wild",
        folders,
        lambda r, n: f"{r.vid:05d}_c{r.camid}_{n:06d}.jpg",
    )
