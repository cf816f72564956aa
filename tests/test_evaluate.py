"""Exact evaluation: the blockwise strips against the dense reference, counting, errors, memory, pictures."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from helpers import SCALARS, assert_same_metrics, make_set
from PIL import Image

from wildreid.camera import camera_means, camera_normalise
from wildreid.core.errors import ConfigError, StoreError
from wildreid.distances import grid_distances
from wildreid.evaluation import (
    count_preceding,
    evaluate_blockwise,
    evaluate_dense,
    evaluate_distances,
    evaluate_groups,
    per_query_metrics,
    topk_lists,
    write_results,
)
from wildreid.plots import (
    cmc_curve,
    nice_ticks,
    ranked_grid,
    render_ranked_lists,
    training_curves,
)
from wildreid.stores import FeatureStore
from wildreid.stores.rows import ArrayRows

# --------------------------------------------------------------------------- against the dense reference


@pytest.mark.parametrize("ints", [True, False], ids=["int-ties", "float"])
@pytest.mark.parametrize(
    ("nq", "ng", "tile", "query_rows"),
    [
        (37, 203, (1, 7), 1),  # strips of one query, gallery tiles that do not divide G
        (37, 203, (3, 5), 6),  # strips of two tiles, the last strip shorter
        (37, 203, (256, 16384), None),  # the default grid: one partial tile each way
        (1, 50, (1, 4), 1),  # a single query
        (40, 40, (8, 8), 40),  # one strip holding every query
    ],
)
def test_blockwise_equals_dense(ints, nq, ng, tile, query_rows):
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(nq * 1000 + ng, nq, ng, ints=ints)
    dense = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams, tile=tile)
    blockwise = evaluate_blockwise(
        qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=64 << 20, tile=tile, query_rows=query_rows
    )
    assert_same_metrics(dense, blockwise)
    if nq > 1:
        assert dense["skipped_queries"] > 0 and dense["valid_queries"] > 0  # the set exercises both


@pytest.mark.parametrize(("tile", "query_rows"), [((1, 7), 1), ((3, 5), 6), ((256, 16384), None)])
def test_camera_normalised_blockwise_equals_dense_and_a_plain_reference(tile, query_rows):
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(11, 37, 203, ints=False)
    dense = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams, tile=tile, camera_norm=True)
    blockwise = evaluate_blockwise(
        qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=64 << 20, tile=tile, query_rows=query_rows, camera_norm=True
    )
    assert_same_metrics(dense, blockwise)
    # the same metrics from features normalised by hand: mean of each camera over query and gallery rows
    rows, cams = np.concatenate([qf, gf]).astype(np.float64), np.concatenate([q_cams, g_cams])
    means = {c: rows[cams == c].mean(axis=0) for c in np.unique(cams)}
    streamed = camera_means([(ArrayRows(qf), q_cams), (ArrayRows(gf), g_cams)], block_rows=10)
    assert sorted(streamed) == sorted(means) and all(np.allclose(means[c], streamed[c]) for c in means)
    by_hand = [(x - np.stack([means[c] for c in cam])) for x, cam in ((qf, q_cams), (gf, g_cams))]
    by_hand = [(x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32) for x in by_hand]
    np.testing.assert_array_equal(by_hand[0], camera_normalise(qf, q_cams, means))
    assert_same_metrics(dense, evaluate_dense(by_hand[0], q_ids, q_cams, by_hand[1], g_ids, g_cams, tile=tile))


def test_camera_normalisation_removes_a_per_camera_offset():
    """Identity features plus a large offset per camera: the plain ranking is mostly camera; normalised, identity."""
    rng = np.random.default_rng(4)
    ids, cams = np.repeat(np.arange(40), 4), np.tile(np.arange(4), 40)
    identity = rng.standard_normal((40, 32))[ids] + 0.3 * rng.standard_normal((160, 32))
    x = (identity + 6.0 * rng.standard_normal((4, 32))[cams]).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q, g = np.arange(0, 160, 4), np.setdiff1d(np.arange(160), np.arange(0, 160, 4))
    args = (x[q], ids[q], cams[q], x[g], ids[g], cams[g])
    plain, normalised = evaluate_dense(*args), evaluate_dense(*args, camera_norm=True)
    assert plain["rank1"] < 0.5 < 0.9 < normalised["rank1"]
    assert normalised["mAP"] > plain["mAP"] + 0.3


def test_streamed_gallery_equals_dense():
    """A gallery larger than half the budget is read block by block for every strip, not kept."""
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(6, 20, 4000, dim=512, ints=True, vehicles=300)
    assert gf.nbytes > (12 << 20) // 2  # float32 rows: more than half the budget
    dense = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams, tile=(4, 64))
    blockwise = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=12 << 20, tile=(4, 64))
    assert_same_metrics(dense, blockwise)


def test_other_grid_agrees_within_rounding():
    """A different tile grid may round pairs differently in the last bit; metrics stay within 1e-6."""
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(5, 60, 300, dim=32, ints=False)
    a = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams)
    b = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=64 << 20, tile=(4, 16), query_rows=8)
    for key in SCALARS:
        assert a[key] == pytest.approx(b[key], abs=1e-6)


HAND = [
    # query 0 at x=0, id 7 cam 0; gallery x = [1, -1, 2, 1, 0] -> d = [1, 1, 4, 1, 0]
    # ids [7, 3, 7, 7, 3], cams [1, 2, 0, 1, 0]: row 2 is junk (same id, same camera).
    # Order by (d, index): 4 (other), 0 (match), 1 (other), 3 (match) -> match ranks 2 and 4.
    ([7], [0], [7, 3, 7, 7, 3], [1, 2, 0, 1, 0], {"mAP": 0.5, "mINP": 0.5, "rank1": 0.0, "rank5": 1.0, "valid": 1}),
    # the only same-id rows are on the query's camera: skipped
    ([7], [0], [7, 3, 7, 7, 3], [0, 2, 0, 0, 0], {"mAP": 0.0, "mINP": 0.0, "rank1": 0.0, "rank5": 0.0, "valid": 0}),
    # id -1 never matches, even another -1
    ([-1], [0], [-1, -1, 7, 7, 3], [1, 2, 0, 1, 0], {"mAP": 0.0, "mINP": 0.0, "rank1": 0.0, "rank5": 0.0, "valid": 0}),
    # a -1 gallery row (index 0) is a distractor: order 4, 0, 1 (match), 3 (match); row 2 is junk
    (
        [7],
        [0],
        [-1, 7, 7, 7, 3],
        [1, 2, 0, 1, 0],
        {"mAP": (1 / 3 + 2 / 4) / 2, "mINP": 2 / 4, "rank1": 0.0, "rank5": 1.0, "valid": 1},
    ),
    # unknown cameras (-1, data without --camera-from): never the same camera, so no match is junk:
    # order 4, 0 (match), 1, 3 (match), 2 (match)
    (
        [7],
        [-1],
        [7, 3, 7, 7, 3],
        [-1, -1, -1, -1, -1],
        {"mAP": (1 / 2 + 2 / 4 + 3 / 5) / 3, "mINP": 3 / 5, "rank1": 0.0, "rank5": 1.0, "valid": 1},
    ),
    # a query of unknown camera keeps a match from camera 0; a gallery row of unknown camera is kept too
    (
        [7],
        [-1],
        [7, 3, 7, 7, 3],
        [0, 2, -1, 0, 0],
        {"mAP": (1 / 2 + 2 / 4 + 3 / 5) / 3, "mINP": 3 / 5, "rank1": 0.0, "rank5": 1.0, "valid": 1},
    ),
]


@pytest.mark.parametrize(("q_ids", "q_cams", "g_ids", "g_cams", "expected"), HAND)
def test_hand_computed_ties_and_junk(q_ids, q_cams, g_ids, g_cams, expected):
    qf = np.zeros((1, 1), np.float32)
    gf = np.array([[1], [-1], [2], [1], [0]], np.float32)
    for result in (
        evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams),
        evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=16 << 20, tile=(1, 2), query_rows=1),
    ):
        for key in ("mAP", "mINP", "rank1", "rank5"):
            assert result[key] == pytest.approx(expected[key], abs=1e-15), key
        assert (result["valid_queries"], result["skipped_queries"]) == (expected["valid"], 1 - expected["valid"])


def test_all_queries_on_their_matches_camera():
    qf, q_ids, _, gf, g_ids, _ = make_set(9, 12, 60, ints=True)
    q_cams, g_cams = np.zeros(12, np.int64), np.zeros(60, np.int64)
    for out in (
        evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams),
        evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=16 << 20),
    ):
        assert (out["valid_queries"], out["skipped_queries"], out["mAP"]) == (0, 12, 0.0)


def test_perfect_features_score_one():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 16)).astype(np.float32)
    g_ids = np.repeat(np.arange(6), 5)
    gf = centres[g_ids] + 0.01 * rng.standard_normal((30, 16), dtype=np.float32)
    q_ids = np.arange(6)
    out = evaluate_blockwise(centres, gf, q_ids, np.full(6, 9), g_ids, np.arange(30) % 4, memory_budget=16 << 20)
    assert out["mAP"] == 1.0 and out["mINP"] == 1.0 and out["rank1"] == 1.0 and out["cmc"][0] == 1.0


@pytest.mark.parametrize("ints", [True, False], ids=["int-ties", "float"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_query_metrics_average_to_the_aggregates(ints, seed):
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(seed, 37, 150, ints=ints)
    dist = grid_distances(qf, 0, gf, 0)
    ap, hit1 = per_query_metrics(dist, q_ids, q_cams, g_ids, g_cams)
    agg = evaluate_distances(dist, q_ids, q_cams, g_ids, g_cams)
    assert ap.shape == hit1.shape == (37,) and ap.dtype == hit1.dtype == np.float64
    assert (np.isnan(ap) == np.isnan(hit1)).all()
    assert (int((~np.isnan(ap)).sum()), int(np.isnan(ap).sum())) == (agg["valid_queries"], agg["skipped_queries"])
    assert 0 < agg["valid_queries"] < 37  # the set has skipped queries: NaN keeps the arrays aligned
    assert np.nanmean(ap) == pytest.approx(agg["mAP"], abs=1e-12)
    assert np.nanmean(hit1) == pytest.approx(agg["rank1"], abs=1e-12)
    assert set(np.unique(hit1[~np.isnan(hit1)])) <= {0.0, 1.0}


@pytest.mark.parametrize(("q_ids", "q_cams", "g_ids", "g_cams", "expected"), HAND)
def test_per_query_metrics_hand_computed(q_ids, q_cams, g_ids, g_cams, expected):
    dist = grid_distances(np.zeros((1, 1), np.float32), 0, np.array([[1], [-1], [2], [1], [0]], np.float32), 0)
    ap, hit1 = per_query_metrics(dist, q_ids, q_cams, g_ids, g_cams)
    if expected["valid"]:
        assert (ap[0], hit1[0]) == (pytest.approx(expected["mAP"], abs=1e-15), expected["rank1"])
    else:
        assert np.isnan(ap[0]) and np.isnan(hit1[0])


# --------------------------------------------------------------------------- the counting kernel


def brute_counts(strip, thr_val, thr_idx, n_thr):
    cols = np.arange(strip.shape[1])
    out = np.zeros(thr_val.shape, np.int64)
    for r in range(len(strip)):
        for k in range(n_thr[r]):
            out[r, k] = np.sum((strip[r] < thr_val[r, k]) | ((strip[r] == thr_val[r, k]) & (cols < thr_idx[r, k])))
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spread", ["ties", "narrow", "wide"])
def test_count_preceding_brute_force(dtype, spread):
    """Ties, +inf (removed entries), thresholds close together and 60 decades apart (the wide-shift path)."""
    rng = np.random.default_rng(hash((spread, str(dtype))) % 1000)
    rows, cols, m = 21, 3000, 9
    if spread == "ties":
        strip = rng.integers(0, 6, (rows, cols)).astype(dtype)
    elif spread == "narrow":
        strip = (1.0 + 1e-6 * rng.random((rows, cols))).astype(dtype)
    else:
        strip = (10.0 ** rng.uniform(-30, 30, (rows, cols))).astype(dtype)
    strip[rng.random((rows, cols)) < 0.05] = np.inf
    n_thr = rng.integers(0, m + 1, rows)
    thr_val = np.full((rows, m), np.inf, dtype)
    thr_idx = np.full((rows, m), np.iinfo(np.int64).max)
    for r in range(rows):
        picks = np.sort(rng.choice(np.flatnonzero(np.isfinite(strip[r])), n_thr[r], replace=False))
        order = np.lexsort((picks, strip[r, picks]))
        thr_val[r, : n_thr[r]], thr_idx[r, : n_thr[r]] = strip[r, picks[order]], picks[order]
        strip[r, picks] = np.inf  # the contract: the thresholds' own entries are removed first
    got = count_preceding(strip, thr_val, thr_idx, n_thr, chunk=4096)
    want = brute_counts(strip, thr_val, thr_idx, n_thr)
    mask = np.arange(m)[None, :] < n_thr[:, None]
    np.testing.assert_array_equal(got[mask], want[mask])


def test_grid_distances_refuses_blocks_off_the_grid():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ConfigError, match="tile grid"):
        grid_distances(x, 1, x, 0, tile=(2, 2))
    d = grid_distances(x, 0, 2 * x, 0, tile=(2, 2))
    np.testing.assert_array_equal(d, np.full((4, 4), 3.0, np.float32))  # |1-2|^2 * 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_grid_matches_cpu_on_exact_features():
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(3, 50, 400, ints=True)
    a = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=64 << 20)
    b = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=64 << 20, device="cuda")
    assert_same_metrics(a, b)


# --------------------------------------------------------------------------- memory


MEMORY_CHILD = """
import json, sys
import numpy as np
from wildreid.budget import peak_rss_bytes
from wildreid.evaluation import evaluate_blockwise
nq, ng, dim, budget = (int(a) for a in sys.argv[1:5])
rng = np.random.default_rng(0)
def feats(n):
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x
qf, gf = feats(nq), feats(ng)
q_ids, g_ids = rng.integers(0, 2000, nq), rng.integers(0, 2000, ng)
q_cams, g_cams = rng.integers(0, 20, nq), rng.integers(0, 20, ng)
evaluate_blockwise(qf[:3], gf[:50], q_ids[:3], q_cams[:3], g_ids[:50], g_cams[:50], memory_budget=budget)  # warm-up
idle = int(open('/proc/self/statm').read().split()[1]) * 4096
out = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=budget)
print(json.dumps({"above_idle": peak_rss_bytes() - idle, "valid": out["valid_queries"]}))
"""


@pytest.mark.slow
def test_peak_memory_stays_within_budget():
    """The dense (Q, G) float32 matrix would be 490 MB; the budget is 96 MB.

    Allowance of 16 MB over 1.5 x budget: allocator slack, the interpreter's own growth and the
    per-strip match lists, which the budget does not plan for (it does plan the strip, the cached
    gallery, the BLAS tile buffer and the counting temporaries).
    """
    nq, ng, dim, budget = 2048, 60_000, 32, 96 << 20
    child = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(nq), str(ng), str(dim), str(budget)],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["valid"] > 0
    assert nq * ng * 4 > 4 * budget
    assert report["above_idle"] < 1.5 * budget + (16 << 20), report


def test_budget_too_small_says_how_much():
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(2, 10, 5000, ints=True)
    with pytest.raises(ConfigError, match="raise --memory-budget to at least"):
        evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=1 << 20)


# --------------------------------------------------------------------------- stores and results


def write_store(path, x, ids=None, camids=None):
    store = FeatureStore.create(path, len(x), x.shape[1], dtype="float32", ids=ids, camids=camids)
    if len(x):
        store.write_rows(0, x)
    return path


def test_evaluate_groups_matches_dense_and_writes_json(tmp_path):
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(4, 30, 150, ints=False)
    q = write_store(tmp_path / "q.zarr", qf, q_ids, q_cams)
    g = write_store(tmp_path / "g.zarr", gf, g_ids, g_cams)
    out = evaluate_groups(q, g, memory_budget=32 << 20)
    assert_same_metrics(out, evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams))
    assert (out["queries"], out["gallery"], out["rerank"]) == (30, 150, False)
    path = write_results(tmp_path / "out" / "metrics.json", out)
    assert json.loads(path.read_text()) == out
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no partial file left


def _without(path, name):
    del zarr.open_group(str(path), mode="r+")[name]
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("dims", "dimension 8 but gallery features .* have 6"),
        ("empty-query", "query group .* has 0 rows"),
        ("empty-gallery", "gallery group .* has 0 rows"),
        ("no-ids", "has no 'ids' array"),
        ("no-camids", "has no 'camids' array"),
        ("unknown-ids", "only unknown ids"),
    ],
)
def test_evaluate_groups_errors(tmp_path, case, match):
    rng = np.random.default_rng(0)
    x8, ids, cams = rng.standard_normal((5, 8), dtype=np.float32), np.arange(5), np.zeros(5, np.int64)
    q = write_store(tmp_path / "q.zarr", x8[:0] if case == "empty-query" else x8, ids, cams)
    gx = rng.standard_normal((5, 6), dtype=np.float32) if case == "dims" else x8
    g = write_store(
        tmp_path / "g.zarr", gx[:0] if case == "empty-gallery" else gx, None if case == "unknown-ids" else ids, cams
    )
    if case == "no-ids":
        _without(q, "ids")
    if case == "no-camids":
        _without(g, "camids")
    with pytest.raises(StoreError, match=match):
        evaluate_groups(q, g, memory_budget=16 << 20)


# --------------------------------------------------------------------------- ranked lists and pictures


def test_topk_lists_follow_the_dense_order():
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(11, 20, 120, ints=True)
    dist = grid_distances(qf, 0, gf, 0)
    chosen = [0, 7, 19]
    lists = topk_lists(qf, gf, q_ids, q_cams, g_ids, g_cams, chosen, k=10)
    for q, entry in zip(chosen, lists):
        order = np.argsort(dist[q], kind="stable")
        assert entry["ranked"] == order[: len(entry["ranked"])].tolist()
        same = (g_ids == q_ids[q]) & (q_ids[q] >= 0)
        junk = same & (g_cams == q_cams[q])
        assert entry["flags"] == [None if junk[j] else bool(same[j]) for j in entry["ranked"]]
        assert sum(f is not None for f in entry["flags"]) == 10 and entry["flags"][-1] is not None


@pytest.mark.slow
def test_plots_are_small_valid_pngs(tmp_path):
    cmc = evaluate_distances(
        np.random.default_rng(0).random((30, 80)),
        np.arange(30) % 10,
        np.zeros(30, int),
        np.arange(80) % 10,
        np.ones(80, int),
    )["cmc"]
    history = [{"epoch": e, "loss": 2.0 / (e + 1), "precision": 0.5 + 0.03 * e} for e in range(8)]
    history[2].pop("loss")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 64, 3), dtype=np.uint8)) for _ in range(12)]
    written = [
        (cmc_curve(cmc, tmp_path / "cmc.png", "test"), (480, 360)),
        (training_curves(history, tmp_path / "train.png"), (760, 340)),
        (training_curves([], tmp_path / "empty.png"), (760, 340)),
        (
            ranked_grid(
                images[:2],
                [images[2:12], images[2:5]],
                [[True, None] + [False] * 8, [False, True, None]],
                tmp_path / "grid.png",
            ),
            (11 * 78 + 12, 2 * 94 + 6),
        ),  # labels fit a tile
    ]
    for path, size in written:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == size
        assert path.stat().st_size < 300_000
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("lo", "hi", "expected"),
    [
        (0, 9, [0, 2, 4, 6, 8, 10]),
        (0.3, 0.86, [0.2, 0.4, 0.6, 0.8, 1.0]),
        (1, 50, [0, 10, 20, 30, 40, 50]),
        (2, 2, [2.0, 2.2, 2.4, 2.6, 2.8, 3.0]),
    ],
)
def test_nice_ticks(lo, hi, expected):
    np.testing.assert_allclose(nice_ticks(lo, hi), expected)


def test_render_ranked_lists_from_shards(shard_root, tmp_path):
    """Features that know the vehicle (one-hot id plus noise) on the synthetic shards: a real picture."""
    from wildreid.shards.reader import read_split_samples

    rng = np.random.default_rng(0)
    stores = {}
    for split in ("query-large", "gallery-large"):
        meta = sorted((s["index"], s["vid"], s["camid"]) for s in read_split_samples(shard_root, split))
        ids, cams = np.array([m[1] for m in meta]), np.array([m[2] for m in meta])
        x = np.eye(64, dtype=np.float32)[ids % 64] + 0.3 * rng.standard_normal((len(ids), 64), dtype=np.float32)
        stores[split] = write_store(tmp_path / f"{split}.zarr", x, ids, cams)
    path = render_ranked_lists(
        shard_root,
        "query-large",
        "gallery-large",
        stores["query-large"],
        stores["gallery-large"],
        [0, 1, 2],
        tmp_path / "ranked.png",
        k=5,
    )
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 5 * 64 and image.height >= 3 * 64
    assert path.stat().st_size < 300_000
