"""``wildreid eval`` and ``wildreid visualize`` end to end, on the synthetic set and an untrained model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import shuffled_clusters
from PIL import Image
from typer.testing import CliRunner

from wildreid.checkpoint import save_model
from wildreid.cli import app
from wildreid.config import load_config
from wildreid.evaluation import evaluate_dense
from wildreid.model import build_model
from wildreid.stores import LOCK_NAME, FeatureStore

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
METRICS = ("mAP", "mINP", "rank1", "rank5", "rank10", "rank20")
# an explicit budget keeps the tests off the machine's free memory; it covers the whole (pytest) process
EVAL = ["eval", "--memory-budget", "4GiB"]


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model("resnet18")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """An untrained resnet18 with the demo config (64x32 images); copy it: eval writes beside it."""
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_model(path, _model(0), load_config(REPO / "configs" / "demo.yaml").to_dict())


def _run(args: list) -> dict:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _check_metrics(m: dict) -> None:
    assert "cmc" not in m
    for key in METRICS:
        assert 0.0 <= m[key] <= 1.0, (key, m[key])
    assert m["rank1"] <= m["rank5"] <= m["rank10"] <= m["rank20"]
    assert m["valid_queries"] >= 1 and m["valid_queries"] + m["skipped_queries"] == m["queries"]


def _dense(query: Path, gallery: Path, **kwargs) -> dict:
    qs, gs = FeatureStore.open(query), FeatureStore.open(gallery)
    return evaluate_dense(
        qs.read_rows(0, qs.count()), qs.ids(), qs.camids(), gs.read_rows(0, gs.count()), gs.ids(), gs.camids(), **kwargs
    )


def _same(blockwise: dict, dense: dict) -> None:
    for key in (*METRICS, "valid_queries", "skipped_queries"):
        assert blockwise[key] == pytest.approx(dense[key], rel=1e-12, abs=1e-15), key


def _mtimes(folder: Path) -> dict[str, int]:
    """Modification times of the stored data (the writer lock file is rewritten by every writer)."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and p.name != LOCK_NAME
    }


@pytest.mark.slow
def test_eval_checkpoint_extracts_once_and_matches_the_dense_reference(shard_root, model_file, tmp_path):
    ckpt = Path(shutil.copy(model_file, tmp_path / "model.pt"))
    args = [*EVAL, "--shards", shard_root, "--checkpoint", ckpt, "--split", "small"]
    first = _run([*args, "--json"])
    assert list(first) == ["small"]
    _check_metrics(first["small"])
    features = tmp_path / "features"
    assert sorted(p.name for p in features.iterdir()) == ["gallery-small", "query-small"]
    saved = json.loads((tmp_path / "eval-small.json").read_text())
    assert len(saved["small"]["cmc"]) == 50 and saved["small"]["mAP"] == first["small"]["mAP"]
    with Image.open(tmp_path / "eval-small-cmc.png") as png:
        assert png.format == "PNG"
    _same(first["small"], _dense(features / "query-small", features / "gallery-small"))

    before = _mtimes(features)
    assert _run([*args, "--json"]) == first  # the extracted features are reused, not rewritten
    assert _mtimes(features) == before

    other = save_model(tmp_path / "other.pt", _model(1), load_config(REPO / "configs" / "demo.yaml").to_dict())
    second = _run([*EVAL, "--shards", shard_root, "--checkpoint", other, "--split", "small", "--json"])
    assert _mtimes(features) != before  # another checkpoint's features are extracted again, in the same folder
    assert second["small"]["checkpoint_sha256"] != first["small"]["checkpoint_sha256"]
    _same(second["small"], _dense(features / "query-small", features / "gallery-small"))


@pytest.mark.slow
def test_eval_feature_pool5_extracts_the_pooled_feature_again(shard_root, tmp_path):
    """--feature pool5 (the published evaluation feature) re-extracts the groups and evaluates those; the model's
    model.eval_feature is the default."""
    model = _model(0)
    with torch.no_grad():  # a neck that is not the identity, as after training
        model.neck.running_mean.normal_(generator=torch.Generator().manual_seed(1))
    ckpt = save_model(tmp_path / "model.pt", model, load_config(REPO / "configs" / "demo.yaml").to_dict())
    args = [*EVAL, "--shards", shard_root, "--checkpoint", ckpt, "--split", "small", "--json"]
    bnneck = _run(args)["small"]
    query = FeatureStore.open(tmp_path / "features" / "query-small")
    neck_rows = query.read_rows(0, query.count())
    pool5 = _run([*args, "--feature", "pool5"])["small"]
    assert (bnneck["feature"], pool5["feature"]) == ("bnneck", "pool5")
    pooled_rows = FeatureStore.open(tmp_path / "features" / "query-small").read_rows(0, query.count())
    assert not np.allclose(neck_rows, pooled_rows)
    assert np.allclose(np.linalg.norm(pooled_rows.astype(np.float32), axis=1), 1, atol=1e-2)
    _same(pool5, _dense(tmp_path / "features" / "query-small", tmp_path / "features" / "gallery-small"))
    config = load_config(REPO / "configs" / "demo.yaml", ["model.eval_feature=pool5"]).to_dict()
    other = save_model(tmp_path / "pool5.pt", _model(0), config)
    assert (
        _run([*EVAL, "--shards", shard_root, "--checkpoint", other, "--split", "small", "--json"])["small"]["feature"]
        == "pool5"
    )
    bad = runner.invoke(app, [*map(str, args), "--feature", "pool4"])
    assert bad.exit_code == 2 and "expected --feature bnneck or pool5" in bad.output


@pytest.mark.slow
def test_eval_all_splits_into_a_features_dir(shard_root, model_file, tmp_path):
    ckpt = Path(shutil.copy(model_file, tmp_path / "model.pt"))
    result = runner.invoke(
        app,
        [
            *EVAL,
            "--shards",
            str(shard_root),
            "--checkpoint",
            str(ckpt),
            "--split",
            "all",
            "--features-dir",
            str(tmp_path / "feats"),
        ],
    )
    assert result.exit_code == 0, result.output
    for name in ("small", "medium", "large"):
        assert name in result.stdout
        assert (tmp_path / f"eval-{name}-cmc.png").is_file()
        assert (tmp_path / "feats" / f"query-{name}" / "zarr.json").is_file()
    assert sorted(json.loads((tmp_path / "eval-all.json").read_text())) == ["large", "medium", "small"]


@pytest.mark.slow
def test_eval_veri776_layout(veri776_shards, model_file, tmp_path):
    ckpt = Path(shutil.copy(model_file, tmp_path / "model.pt"))
    out = _run([*EVAL, "--shards", veri776_shards, "--checkpoint", ckpt, "--split", "veri776", "--json"])
    assert list(out) == ["veri776"]
    _check_metrics(out["veri776"])
    assert out["veri776"]["query_split"] == "query" and out["veri776"]["gallery_split"] == "gallery"
    _same(out["veri776"], _dense(tmp_path / "features" / "query", tmp_path / "features" / "gallery"))


def _groups(tmp_path: Path, *, dim_gallery: int = 32, ids: bool = True) -> tuple[Path, Path]:
    x = shuffled_clusters(5, dtype=np.float32, clusters=12, dim=32)
    rng = np.random.default_rng(5)
    vid = rng.integers(0, 12, len(x))
    cam = rng.integers(0, 4, len(x))
    nq = len(x) // 4
    q, g = tmp_path / "q.zarr", tmp_path / "g.zarr"
    q_ids = vid[:nq] if ids else None  # without ids every row is -1: unknown
    FeatureStore.create(q, nq, 32, dtype="float32", ids=q_ids, camids=cam[:nq]).write_rows(0, x[:nq])
    gx = x[nq:] if dim_gallery == 32 else np.ones((len(x) - nq, dim_gallery), np.float32)
    FeatureStore.create(g, len(gx), dim_gallery, dtype="float32", ids=vid[nq:], camids=cam[nq:]).write_rows(0, gx)
    return q, g


@pytest.mark.parametrize("rerank", [False, True])
def test_eval_feature_groups(tmp_path, rerank):
    q, g = _groups(tmp_path)
    output = tmp_path / "results" / "eval.json"
    args = [*EVAL, "--query", q, "--gallery", g, "--json", "--output", output] + (["--rerank"] if rerank else [])
    out = _run(args)
    _check_metrics(out)
    assert out["rerank"] is rerank
    _same(out, _dense(q, g, rerank=rerank))
    assert json.loads(output.read_text())["mAP"] == out["mAP"]
    assert (output.parent / "eval-cmc.png").is_file()
    assert not list(output.parent.glob("*.partial"))


@pytest.mark.slow
def test_visualize_ranked_lists_and_training_curves(shard_root, model_file, tmp_path):
    ckpt = Path(shutil.copy(model_file, tmp_path / "model.pt"))
    _run([*EVAL, "--shards", shard_root, "--checkpoint", ckpt, "--split", "small", "--json"])
    history = tmp_path / "history.jsonl"
    history.write_text(
        "".join(
            json.dumps({"epoch": e, "loss": 2.0 / (e + 1), "precision": 0.2 + 0.1 * e, "recall": 0.1 * e}) + "\n"
            for e in range(4)
        )
    )
    base = [
        "visualize",
        "--shards",
        shard_root,
        "--query",
        tmp_path / "features" / "query-small",
        "--gallery",
        tmp_path / "features" / "gallery-small",
        "--query-split",
        "query-small",
        "--gallery-split",
        "gallery-small",
    ]
    result = runner.invoke(
        app, [str(a) for a in [*base, "--num", "2", "--k", "4", "--out", tmp_path / "lists.png", "--history", history]]
    )
    assert result.exit_code == 0, result.output
    assert "ranked lists of queries" in result.stdout and "training curves (4 epochs)" in result.stdout
    with Image.open(tmp_path / "lists.png") as a, Image.open(tmp_path / "lists-curves.png") as c:
        assert a.format == c.format == "PNG" and a.height > 2 * 64 and c.size == (760, 340)
    result = runner.invoke(app, [str(a) for a in [*base, "--queries", "1", "--k", "3", "--out", tmp_path / "one.png"]])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "lists.png") as two:
        assert one.height < two.height


def _one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert text in lines[0], lines[0]


def test_eval_a_split_the_shards_do_not_have(veri776_shards, model_file, tmp_path):
    ckpt = Path(shutil.copy(model_file, tmp_path / "model.pt"))
    result = runner.invoke(app, [*EVAL, "--shards", str(veri776_shards), "--checkpoint", str(ckpt), "--split", "small"])
    _one_line_error(result, 5, "it has train, query, gallery")
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize(
    "case, code, text",
    [
        ("dims", 6, "dimension 32 but gallery features"),
        ("no-ids", 6, "only unknown ids"),
        ("split", 2, "expected --split to be one of"),
        ("both", 2, "not both and not neither"),
        ("neither", 2, "not both and not neither"),
        ("half", 2, "one of a pair is missing"),
        ("budget", 2, "expected a size"),
        ("device", 2, "expected --device cpu or cuda"),
        ("queries", 2, "expected --queries as row numbers"),
        ("history", 2, "line 2 is not JSON"),
    ],
)
def test_errors_are_one_line_with_an_exit_code(tmp_path, case, code, text):
    q, g = _groups(tmp_path, dim_gallery=16 if case == "dims" else 32, ids=case != "no-ids")
    groups = ["--query", q, "--gallery", g]
    vis = [
        "visualize",
        "--shards",
        tmp_path,
        *groups,
        "--query-split",
        "q",
        "--gallery-split",
        "g",
        "--out",
        tmp_path / "x.png",
    ]
    (tmp_path / "h.jsonl").write_text('{"epoch": 0}\nnot json\n')
    args = {
        "dims": [*EVAL, *groups],
        "no-ids": [*EVAL, *groups],
        "split": [*EVAL, "--shards", tmp_path, "--checkpoint", tmp_path / "m.pt", "--split", "tiny"],
        "both": ["eval", *groups, "--shards", tmp_path, "--checkpoint", tmp_path / "m.pt"],
        "neither": ["eval"],
        "half": [*EVAL, "--query", q],
        "budget": ["eval", *groups, "--memory-budget", "lots"],
        "device": [*EVAL, *groups, "--device", "tpu"],
        "queries": [*vis, "--queries", "1,x"],
        "history": [*vis, "--history", tmp_path / "h.jsonl"],
    }[case]
    _one_line_error(runner.invoke(app, [str(a) for a in args]), code, text)


@pytest.mark.slow
def test_eval_budget_covers_the_whole_process(tmp_path):
    """A budget below what the process holds before evaluating is refused with the smallest that works,
    and that budget works (a separate process: the test process's own size is not the command's)."""
    import re

    q, g = _groups(tmp_path)
    cmd = [sys.executable, "-m", "wildreid.cli", "eval", "--query", str(q), "--gallery", str(g), "--json"]
    refused = subprocess.run([*cmd, "--memory-budget", "64MiB"], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip()
    assert "\n" not in line and "covers this whole process, which holds" in line, line
    smallest = int(re.search(r"the smallest budget that works is ([\d,]+) MiB", line).group(1).replace(",", ""))
    assert smallest > 64
    done = subprocess.run([*cmd, "--memory-budget", f"{smallest}MiB"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    _same(json.loads(done.stdout.strip().splitlines()[-1]), _dense(q, g, rerank=False))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_eval_on_cuda_without_cuda(tmp_path):
    q, g = _groups(tmp_path)
    result = runner.invoke(app, [*EVAL, "--query", str(q), "--gallery", str(g), "--device", "cuda"])
    _one_line_error(result, 2, "CUDA is not available")
