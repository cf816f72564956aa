"""k-reciprocal re-ranking: the sparse strips against the dense N x N reference, and its pieces."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import SCALARS, assert_same_metrics, make_set

from wildreid.core.errors import ConfigError
from wildreid.distances import grid_distances
from wildreid.evaluation import evaluate_blockwise, evaluate_dense
from wildreid.rerank import (
    ReRanker,
    knn_lists,
    reciprocal_lists,
    rerank_dense,
    segment_sums,
)
from wildreid.stores.rows import ArrayRows


def sparse_matrix(ranker: ReRanker, query_rows: int) -> np.ndarray:
    return np.concatenate([ranker.strip(q0, min(ranker.nq, q0 + query_rows)) for q0 in range(0, ranker.nq, query_rows)])


@pytest.mark.parametrize("ints", [True, False], ids=["int-ties", "float"])
@pytest.mark.parametrize(
    ("tile", "query_rows", "k1", "k2", "lambda_"),
    [
        ((3, 5), 6, 20, 6, 0.3),  # the paper's parameters; the last query tile holds gallery rows
        ((1, 7), 1, 20, 6, 0.3),
        ((256, 16384), 256, 20, 6, 0.3),
        ((4, 4), 8, 7, 1, 0.5),  # k2 = 1: no local query expansion
        ((4, 4), 4, 5, 6, 0.0),  # pure Jaccard distance
    ],
)
def test_sparse_equals_dense(ints, tile, query_rows, k1, k2, lambda_):
    qf, _, _, gf, _, _ = make_set(7, 20, 100, ints=ints)
    dense = rerank_dense(qf, gf, k1, k2, lambda_, tile=tile)
    ranker = ReRanker(qf, gf, k1=k1, k2=k2, lambda_=lambda_, memory_budget=32 << 20, tile=tile)
    sparse = sparse_matrix(ranker, query_rows)
    if ints:  # every distance is exact: the very same bits
        np.testing.assert_array_equal(sparse, dense)
    else:
        np.testing.assert_allclose(sparse, dense, rtol=0, atol=1e-6)
    assert 0.0 <= sparse.min() and sparse.max() <= 1.0 + 1e-12
    assert np.mean(sparse < (1 - lambda_) + lambda_ - 1e-12) > 0.05  # some pairs share k-reciprocal support


@pytest.mark.parametrize("ints", [True, False], ids=["int-ties", "float"])
def test_reranked_metrics_equal_dense(ints):
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(3, 20, 100, ints=ints, vehicles=12)
    dense = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams, tile=(4, 16), rerank=True)
    for rows in (4, 8, 20):
        blockwise = evaluate_blockwise(
            qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=32 << 20, tile=(4, 16), query_rows=rows, rerank=True
        )
        for key in SCALARS:
            assert blockwise[key] == pytest.approx(dense[key], abs=1e-6), key
    plain = evaluate_dense(qf, q_ids, q_cams, gf, g_ids, g_cams, tile=(4, 16))
    assert dense["mAP"] != plain["mAP"]  # re-ranking changed the lists


def test_lambda_one_keeps_the_plain_ranking():
    """final = original / m_q: the same order as the plain distance, so the same metrics."""
    qf, q_ids, q_cams, gf, g_ids, g_cams = make_set(5, 30, 90, ints=True)
    plain = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=32 << 20)
    ranked = evaluate_blockwise(qf, gf, q_ids, q_cams, g_ids, g_cams, memory_budget=32 << 20, rerank=True, lambda_=1.0)
    assert_same_metrics(plain, ranked)


def test_knn_lists_against_stable_argsort():
    qf, _, _, gf, _, _ = make_set(1, 15, 60, ints=True)
    x = np.concatenate([qf, gf])

    idx, dist, row_max = knn_lists(ArrayRows(x), 9, budget=1 << 20, tile=(2, 8))
    d = grid_distances(x, 0, x, 0, tile=(2, 8))
    want = np.argsort(d, axis=1, kind="stable")[:, :9]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_array_equal(dist, np.take_along_axis(d, want, axis=1))
    np.testing.assert_array_equal(row_max, d.max(axis=1))


def test_reciprocal_lists_brute_force():
    rng = np.random.default_rng(0)
    n, k = 30, 4
    ranked = np.stack([np.concatenate([[i], rng.permutation(np.delete(np.arange(n), i))]) for i in range(n)])
    ptr, idx = reciprocal_lists(ranked, k)
    for i in range(n):
        want = [j for j in ranked[i, : k + 1] if i in ranked[j, : k + 1]]
        assert idx[ptr[i] : ptr[i + 1]].tolist() == want


@pytest.mark.parametrize(
    ("values", "lengths", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], [1, 3], [1.0, 9.0]),
        ([1e16, 1.0, -1e16], [3], [0.0]),  # left to right: (1e16 + 1) - 1e16 rounds the 1 away
        ([5.0], [0, 1, 0], [0.0, 5.0, 0.0]),
    ],
)
def test_segment_sums_order(values, lengths, expected):
    np.testing.assert_array_equal(segment_sums(np.array(values), np.array(lengths)), expected)


@pytest.mark.parametrize(("k1", "k2", "lambda_"), [(0, 6, 0.3), (20, 22, 0.3), (20, 6, 1.5)])
def test_bad_parameters(k1, k2, lambda_):
    qf, _, _, gf, _, _ = make_set(1, 4, 10, ints=True)
    with pytest.raises(ConfigError, match="expected k1 >= 1"):
        ReRanker(qf, gf, k1=k1, k2=k2, lambda_=lambda_, memory_budget=16 << 20)
