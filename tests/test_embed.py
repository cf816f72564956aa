"""``wildreid embed`` (shard split, image folder, CSV list; resume after kill -9) and ``wildreid search`` on its groups
(an image query, pictures, a checkpoint that did not embed the gallery), with an untrained model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from wildreid.checkpoint import load_model, save_model
from wildreid.cli import app
from wildreid.config import load_config
from wildreid.core.errors import ConfigError
from wildreid.embedding import plan_embed
from wildreid.extract import extract_split
from wildreid.model import build_model
from wildreid.shards.reader import read_split_samples
from wildreid.stores import FeatureStore

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
BUDGET = ["--memory-budget", "256MiB"]


def _save(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    return save_model(path, build_model("resnet18"), load_config(REPO / "configs" / "demo.yaml").to_dict())


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained resnet18 with the demo config (64x32 images)."""
    return _save(tmp_path_factory.mktemp("model") / "model.pt", 0)


@pytest.fixture(scope="module")
def images(veriwild_root) -> Path:
    """A folder of 130 images in vehicle folders (read only)."""
    return veriwild_root / "images"


@pytest.fixture(scope="module")
def folder_group(images, model_file, tmp_path_factory) -> tuple[Path, dict]:
    """The image folder embedded in one uninterrupted run, 16-row chunks (read only)."""
    out = tmp_path_factory.mktemp("folder") / "group"
    return out, _embed([images, "--checkpoint", model_file, "--output", out, "--chunk-rows", 16])


def _embed(args: list) -> dict:
    result = runner.invoke(app, ["embed", *[str(a) for a in args], *BUDGET, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _features(path: Path) -> np.ndarray:
    store = FeatureStore.open(path)
    return np.asarray(store.features[:])


@pytest.mark.slow
def test_embed_of_a_shard_split_equals_its_extraction(shard_root, model_file, tmp_path):
    out = tmp_path / "g"
    report = _embed([shard_root, "--split", "query-small", "--checkpoint", model_file, "--output", out])
    store = FeatureStore.open(out)
    model, _ = load_model(model_file)
    reference = FeatureStore.create(tmp_path / "ref", store.count(), store.dim())
    extract_split(shard_root, "query-small", model, reference, image_size=(64, 32))
    assert np.array_equal(store.features[:], reference.features[:])
    assert np.array_equal(store.ids(), reference.ids()) and np.array_equal(store.camids(), reference.camids())
    assert store.keys().tolist() == [s["path"] for s in read_split_samples(shard_root, "query-small")]
    assert store.meta("source") == {"kind": "shards", "root": str(shard_root.resolve()), "split": "query-small"}
    assert report["rows"] == store.count() and report["rows_found_done"] == 0

    again = _embed([shard_root, "--split", "query-small", "--checkpoint", model_file, "--output", out])
    assert again["rows_found_done"] == store.count()  # nothing embedded twice
    other = _save(tmp_path / "other.pt", 1)  # another checkpoint: the same group is embedded again
    third = _embed([shard_root, "--split", "query-small", "--checkpoint", other, "--output", out])
    assert third["rows_found_done"] == 0 and not np.array_equal(_features(out), reference.features[:])

    wrong = runner.invoke(
        app,
        ["embed", str(shard_root), "--split", "train", "--checkpoint", str(model_file)]
        + [
            "--output",
            str(out),
            *BUDGET,
        ],
    )
    assert wrong.exit_code == 6 and wrong.output.startswith("error: ") and "choose another --output" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1
    no_split = runner.invoke(app, ["embed", str(shard_root), "--checkpoint", str(model_file), "--output", str(out)])
    assert no_split.exit_code == 2 and "pass --split" in no_split.output


@pytest.mark.slow
def test_embed_resumes_after_kill_9_with_the_features_of_an_uninterrupted_run(
    images, model_file, folder_group, tmp_path
):
    whole, report = folder_group
    out = tmp_path / "group"
    cmd = [sys.executable, "-m", "wildreid.cli", "embed", str(images), "--checkpoint", str(model_file)]
    cmd += ["--output", str(out), "--chunk-rows", "16", *BUDGET, "--json"]
    killed = subprocess.run(cmd, env={**os.environ, "WILDREID_KILL_AT": "embed:48"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = FeatureStore.open(out).meta("extraction")
    assert state["rows_done"] == 48  # three whole chunks survived the kill
    partial = runner.invoke(app, ["search", "--gallery", str(out), "--query", str(out)])
    assert partial.exit_code == 6 and "embedded up to row 48 of 130" in partial.output
    resumed = runner.invoke(app, cmd[3:])  # the same command again, in this process
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["rows_found_done"] == 48
    assert "took over the writer lock" in resumed.output
    assert np.array_equal(_features(out), _features(whole))
    store = FeatureStore.open(whole)
    assert report["rows"] == store.count() == 130 and report["batch"] == 16
    assert store.keys().tolist()[:2] == ["00001/000001.jpg", "00001/000002.jpg"]
    assert store.meta("source")["kind"] == "folder" and (store.ids() == -1).all()


@pytest.mark.slow
def test_embed_of_a_csv_list_keeps_its_ids_and_equals_the_folder_rows(images, model_file, folder_group, tmp_path):
    whole, _ = folder_group
    keys = FeatureStore.open(whole).keys().tolist()
    listed = tmp_path / "cars.csv"
    rows = ["path,vid,camid"] + [f"{images / key},{n // 5},{n % 3}" for n, key in enumerate(keys[:10])]
    listed.write_text("\n".join(rows + ["missing.jpg,1,1"]) + "\n")
    out = tmp_path / "listed"
    result = runner.invoke(
        app, ["embed", str(listed), "--checkpoint", str(model_file), "--output", str(out), *BUDGET, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "skipped 1 entries" in result.output and "missing.jpg" in result.output
    store = FeatureStore.open(out)
    assert store.ids().tolist() == [n // 5 for n in range(10)] and store.camids().tolist() == [n % 3 for n in range(10)]
    assert [Path(k).name for k in store.keys().tolist()] == [Path(k).name for k in keys[:10]]
    # a 10-row group's one 10-image batch against 16-image batches: the same rows, up to float16 rounding
    assert np.allclose(_features(out).astype(np.float32), _features(whole)[:10].astype(np.float32), atol=2e-3)


def test_plan_embed_sizes_the_batch_from_the_budget():
    roomy = plan_embed(1 << 30, dim=512, image_size=(256, 128), largest=1 << 20)
    assert roomy.batch == 256 and roomy.chunk_rows == 16384
    tight = plan_embed(64 << 20, dim=512, image_size=(256, 128), largest=1 << 20)
    assert tight.chunk_rows == 8192 and tight.batch < 256 and tight.chunk_rows % tight.batch == 0
    assert 16 * 2**20 + tight.buffer + tight.batch * tight.per_image <= 64 << 20
    with pytest.raises(ConfigError, match="raise --memory-budget to at least"):
        plan_embed(20 << 20, dim=512, image_size=(256, 128), largest=1 << 20)
    # a group of one chunk (401 rows: prime) resumes at row 0 only, so its batch need not divide 401;
    # a chunk of 401 rows inside a longer group keeps batches within chunks (divisors only)
    shape = {"dim": 512, "image_size": (256, 128), "largest": 1 << 20, "chunk_rows": 401}
    assert plan_embed(1 << 30, rows=401, **shape).batch == 256
    assert plan_embed(1 << 30, rows=4010, **shape).batch == 1


# --------------------------------------------------------------------------- search on embedded groups


def test_search_an_image_finds_itself_first_and_draws_a_picture(images, model_file, folder_group, tmp_path):
    whole, _ = folder_group
    image = images / "00003" / "000012.jpg"
    png = tmp_path / "found.png"
    args = ["search", "--gallery", whole, "--query", image, "--checkpoint", model_file, "--top-k", 4, *BUDGET]
    result = runner.invoke(app, [str(a) for a in [*args, "--json", "--picture", png]])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["query"] == str(image)
    first = found["results"][0]
    assert first["key"] == "00003/000012.jpg" and first["similarity"] == pytest.approx(1.0, abs=2e-3)
    with Image.open(png) as picture:
        assert picture.format == "PNG" and picture.width > 5 * 64 and picture.height >= 64

    other = _save(tmp_path / "other.pt", 1)
    wrong = runner.invoke(
        app, [str(a) for a in ["search", "--gallery", whole, "--query", image, "--checkpoint", other]]
    )
    assert wrong.exit_code == 6 and "pass the checkpoint that embedded the gallery" in wrong.output
    assert len(wrong.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_search_a_query_group_of_shards_draws_its_ranked_lists(shard_root, model_file, tmp_path):
    for split in ("query-small", "gallery-small"):
        _embed([shard_root, "--split", split, "--checkpoint", model_file, "--output", tmp_path / split])
    png = tmp_path / "lists.png"
    result = runner.invoke(
        app,
        ["search", "--gallery", str(tmp_path / "gallery-small"), "--query", str(tmp_path / "query-small")]
        + ["--top-k", "3", "--picture", str(png), *BUDGET],
    )
    assert result.exit_code == 0, result.output
    queries = FeatureStore.open(tmp_path / "query-small").count()
    with Image.open(png) as picture:
        assert picture.height >= min(8, queries) * 64  # one row per drawn query
    other = _save(tmp_path / "other.pt", 1)
    _embed([shard_root, "--split", "query-small", "--checkpoint", other, "--output", tmp_path / "q-other"])
    mixed = runner.invoke(
        app, ["search", "--gallery", str(tmp_path / "gallery-small"), "--query", str(tmp_path / "q-other")]
    )
    assert mixed.exit_code == 6 and "embed both with one checkpoint" in mixed.output
    shutil.rmtree(tmp_path / "gallery-small" / "features")
    broken = runner.invoke(app, ["search", "--gallery", str(tmp_path / "gallery-small"), "--query", str(png)])
    assert broken.exit_code == 6 and len(broken.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_junk_files_are_skipped_and_labels_follow_the_source_on_a_rerun(images, model_file, tmp_path):
    """A file that is no image is skipped and listed before any row (so removing it later changes nothing);
    a re-run with another --camera-from keeps the finished rows and updates the cameras."""
    src = tmp_path / "photos"
    for n, path in enumerate(sorted(images.rglob("*.jpg"))[:6]):
        (src / f"c{n % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(path, src / f"c{n % 2}" / path.name)
    (src / "c0" / "zzz.jpg").write_bytes(b"not an image at all")
    (src / "c1" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "group"
    first = runner.invoke(app, ["embed", str(src), "--checkpoint", str(model_file), "--output", str(out), *BUDGET])
    assert first.exit_code == 0, first.output
    assert "skipped 2 entries" in first.output
    store = FeatureStore.open(out)
    assert store.count() == 6 and (store.camids() == -1).all()
    assert not any("zzz" in k or "empty" in k for k in store.keys().tolist())
    rows = _features(out)
    again = _embed([src, "--checkpoint", model_file, "--output", out, "--camera-from", "level:1"])
    assert again["rows_found_done"] == 6  # nothing embedded again
    store = FeatureStore.open(out)
    assert sorted(set(store.camids().tolist())) == [0, 1] and np.array_equal(_features(out), rows)
    listed = tmp_path / "l.csv"
    listed.write_text("path\n" + "\n".join(str(p) for p in sorted(src.rglob("*.jpg"))[:2]) + "\n")
    args = [listed, "--checkpoint", model_file, "--output", tmp_path / "l", "--camera-from", "level:1"]
    refused = runner.invoke(app, ["embed", *map(str, args)])
    assert refused.exit_code == 2 and "--camera-from applies to an image folder" in refused.output, refused.output


def test_a_group_stopped_before_its_first_chunk_is_not_searched(images, model_file, tmp_path):
    from wildreid.embedding import Source, _write_keys

    out = tmp_path / "group"
    store = FeatureStore.create(out, 3, 512)
    paths = tuple(p.relative_to(images).as_posix() for p in sorted(images.rglob("*.jpg"))[:3])
    minus = np.full(3, -1, dtype=np.int64)
    _write_keys(store, Source("folder", images, "x", None, 3, "f", paths=paths, vids=minus, camids=minus))
    refused = runner.invoke(app, ["search", "--gallery", str(out), "--query", str(out)])
    assert refused.exit_code == 6 and "embedded up to row 0 of 3" in refused.output, refused.output
