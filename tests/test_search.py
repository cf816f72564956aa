"""``wildreid search``: the top-k merge and the blockwise exact search against a dense numpy reference, IVF recall,
and the command end to end (table, JSON, picture, one-line errors) on groups written by ``wildreid embed``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import shuffled_clusters
from PIL import Image
from typer.testing import CliRunner

from wildreid.cli import app
from wildreid.core.errors import ConfigError
from wildreid.retrieval import (
    SearchPlan,
    build_ivf,
    exact_search,
    ivf_search,
    plan_search,
    topk_rows,
)
from wildreid.stores import FeatureStore
from wildreid.stores.rows import ArrayRows

runner = CliRunner()


def dense_topk(q: np.ndarray, g: np.ndarray, k: int):
    """The reference: the whole float64 similarity matrix, each row sorted by (similarity desc, row asc)."""
    s = q.astype(np.float64) @ g.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(len(g)), s.shape), -s), axis=-1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order


# --------------------------------------------------------------------------- pure top-k


def test_topk_rows_pads_short_rows_and_skips_padding_ids():
    sim, idx = topk_rows(np.array([[0.5, 0.9, 0.1]]), np.array([[3, -1, 1]]), 4)
    assert idx.tolist() == [[3, 1, -1, -1]]
    assert sim[0, :2].tolist() == [0.5, 0.1] and np.isneginf(sim[0, 2:]).all()


# --------------------------------------------------------------------------- exact search


@pytest.mark.parametrize(
    ("dtype", "margin", "gallery_rows"),
    [("float16", 16, 97), ("float16", 0, 64), ("float32", 2, 150), ("float16", 16, 5000)],
)
def test_blockwise_search_equals_the_dense_reference(dtype, margin, gallery_rows):
    """Several gallery blocks (one when 5000), ties from duplicated rows; margin 0 forces the exact fallback."""
    g = shuffled_clusters(1, dtype=dtype, dim=24, dups=40)
    q = np.concatenate([g[:25], shuffled_clusters(2, dtype=dtype, dim=24, clusters=6)])
    k = 12
    plan = SearchPlan(query_rows=16, gallery_rows=gallery_rows, temp_bytes=1 << 16)
    sim, idx = exact_search(ArrayRows(q), ArrayRows(g), k, plan=plan, margin=margin)
    ref_sim, ref_idx = dense_topk(q, g, k) if dtype == "float16" else (None, None)
    if dtype == "float32":  # float32 rows: the reference is knn's pair-pure exact kernel, then the same sort
        from wildreid.knn import similarity

        s = similarity(q, g)
        order = np.lexsort((np.broadcast_to(np.arange(len(g)), s.shape), -s), axis=-1)[:, :k]
        ref_sim, ref_idx = np.take_along_axis(s, order, axis=1), order
    assert np.array_equal(idx, ref_idx)
    assert np.array_equal(sim, ref_sim)
    assert (idx[:25, 0] != -1).all() and (sim[:25, 0] >= sim[:25, 1]).all()


def test_exact_search_with_fewer_gallery_rows_than_k_pads():
    g = shuffled_clusters(3, dim=8)[:4]
    plan = SearchPlan(query_rows=2, gallery_rows=3, temp_bytes=1 << 16)
    sim, idx = exact_search(ArrayRows(g[:2]), ArrayRows(g), 6, plan=plan)
    assert (idx[:, :4] >= 0).all() and (idx[:, 4:] == -1).all() and np.isneginf(sim[:, 4:]).all()
    assert sorted(idx[0, :4].tolist()) == [0, 1, 2, 3] and idx[0, 0] == 0  # a query equal to a row finds it first


def test_plan_search_refuses_a_budget_too_small_with_the_smallest_that_works():
    with pytest.raises(ConfigError, match=r"raise --memory-budget to at least \d+ MiB"):
        plan_search(32 << 20, n_query=10, n_gallery=10_000, dim=256, k=20, itemsize=2)
    plan = plan_search(128 << 20, n_query=10, n_gallery=1_000_000, dim=256, k=20, itemsize=2)
    assert plan.query_rows == 10 and 1000 < plan.gallery_rows < 1_000_000


# --------------------------------------------------------------------------- IVF


def test_ivf_recall_on_clustered_features_is_high_and_grows_with_nprobe():
    g = shuffled_clusters(5, dim=32, clusters=200, noise=0.3)
    q = shuffled_clusters(6, dim=32, clusters=200, noise=0.3)[:200]
    k = 10
    exact = dense_topk(q, g, k)[1]
    index = build_ivf(ArrayRows(g), nlist=32, block_rows=500)
    recalls = []
    for nprobe in (1, 4, 32):
        _, idx = ivf_search(index, ArrayRows(q), k, nprobe=nprobe, query_rows=64)
        recalls.append(np.mean([len(set(a) & set(b)) / k for a, b in zip(idx.tolist(), exact.tolist())]))
    assert recalls[0] <= recalls[1] <= recalls[2]
    assert recalls[1] > 0.6 and recalls[2] > 0.999, recalls  # every list visited: exhaustive


# --------------------------------------------------------------------------- the command


def _group(path: Path, x: np.ndarray, keys: list[str]) -> Path:
    store = FeatureStore.create(path, len(x), x.shape[1], keys=keys)
    store.write_rows(0, x)
    return path


def _invoke(args):
    return runner.invoke(app, ["search", *[str(a) for a in args]])


def test_search_cli_json_and_table_on_two_groups(tmp_path):
    g, q = shuffled_clusters(7, dim=16), shuffled_clusters(8, dim=16)[:3]
    gallery = _group(tmp_path / "g", g, [f"cars/{i:04d}.jpg" for i in range(len(g))])
    query = _group(tmp_path / "q", q, ["a.jpg", "b.jpg", "c.jpg"])
    args = ["--gallery", gallery, "--query", query, "--top-k", 5, "--memory-budget", "256MiB"]
    result = _invoke([*args, "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    ref_sim, ref_idx = dense_topk(q, g, 5)
    assert [line["query"] for line in lines] == ["a.jpg", "b.jpg", "c.jpg"]
    for line, sims, rows in zip(lines, ref_sim, ref_idx):
        assert [r["rank"] for r in line["results"]] == [1, 2, 3, 4, 5]
        assert [r["row"] for r in line["results"]] == rows.tolist()
        assert [r["key"] for r in line["results"]] == [f"cars/{i:04d}.jpg" for i in rows]
        assert [r["similarity"] for r in line["results"]] == sims.tolist()
    table = _invoke(args)
    assert table.exit_code == 0 and f"cars/{ref_idx[0, 0]:04d}.jpg" in table.stdout
    ivf = _invoke([*args, "--index", "ivf", "--nlist", 4, "--nprobe", 4, "--json"])  # every list: exhaustive
    assert ivf.exit_code == 0, ivf.output
    assert [r["row"] for r in json.loads(ivf.stdout.splitlines()[0])["results"]] == ref_idx[0].tolist()


def test_search_of_stored_groups_under_a_tight_budget_streams_blocks_and_equals_the_reference(tmp_path):
    from wildreid.retrieval import FIXED_BYTES, search

    g, q = shuffled_clusters(9, dim=16, dups=20), shuffled_clusters(10, dim=16)[:30]
    gallery = _group(tmp_path / "g", g, [f"g{i}" for i in range(len(g))])
    query = _group(tmp_path / "q", q, [f"q{i}" for i in range(len(q))])
    found = search(gallery, query, k=8, memory_budget=FIXED_BYTES + 51_200)
    assert found.info["gallery_block_rows"] < len(g) / 2 and found.info["query_rows"] < len(q) / 2
    ref_sim, ref_idx = dense_topk(q, g, 8)
    assert [[r["row"] for r in entry["results"]] for entry in found.results] == ref_idx.tolist()
    assert [[r["similarity"] for r in entry["results"]] for entry in found.results] == ref_sim.tolist()
    assert [entry["query"] for entry in found.results] == [f"q{i}" for i in range(len(q))]


def test_search_cli_errors_are_one_line(tmp_path):
    gallery = _group(
        tmp_path / "g", shuffled_clusters(7, dim=16), [str(i) for i in range(len(shuffled_clusters(7, dim=16)))]
    )
    other = _group(tmp_path / "q8", shuffled_clusters(8, dim=8)[:2], ["a", "b"])
    image = tmp_path / "car.png"
    Image.new("RGB", (32, 64), "red").save(image)
    cases = [
        (["--gallery", tmp_path / "missing", "--query", other], 6, "does not exist; make it with 'wildreid embed"),
        (["--gallery", gallery, "--query", other], 6, "dimension 8 but gallery"),
        (["--gallery", gallery, "--query", image], 2, "is an image: pass --checkpoint"),
        (["--gallery", gallery, "--query", other, "--index", "hnsw"], 2, "expected --index exact or ivf"),
        # refused before searching (no table printed): groups made without 'wildreid embed' record no images
        (["--gallery", gallery, "--query", gallery, "--picture", tmp_path / "p.png"], 6, "--picture needs them"),
        (["--gallery", gallery, "--query", other, "--device", "gpu"], 2, "expected --device cpu or cuda"),
    ]
    for args, code, text in cases:
        result = _invoke([*args, "--memory-budget", "256MiB"])
        assert result.exit_code == code, result.output
        assert result.output.startswith("error: ") and text in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
