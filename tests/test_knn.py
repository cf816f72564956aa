"""Blockwise exact k-NN against a dense argsort reference, ties included."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import shuffled_clusters

from wildreid.core.errors import ConfigError, StoreError
from wildreid.knn import (
    check_features,
    exact_ranks,
    knn_graph,
    knn_rows,
    pair_similarity,
    similarity,
    with_self_first,
)


def dense_graph(x: np.ndarray, k: int, threshold: float):
    """sigma_i[0:k] by argsort over the full similarity matrix, self first, ties by id; and C_i."""
    n = len(x)
    s = similarity(x, x)
    eye = np.eye(n, dtype=bool)
    sigma = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -np.where(eye, np.inf, s)), axis=1)[:, :k]
    counts = 1 + np.count_nonzero((s >= threshold) & ~eye, axis=1)
    return np.take_along_axis(s, sigma, axis=1), sigma, counts


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    ("k", "block_rows", "block_base", "dups", "threshold"),
    [
        (101, 64, 128, 0, 0.6),
        (11, 37, 53, 40, 0.2),
        (11, 1, 500, 40, 0.6),
        (21, 600, 7, 0, 0.5),
        (700, 100, 100, 10, 0.6),  # k > N: rows padded with -1
    ],
)
def test_graph_matches_dense(dtype, k, block_rows, block_base, dups, threshold):
    x = shuffled_clusters(1, dtype=dtype, dups=dups)
    sim, idx, counts = knn_graph(x, k, threshold=threshold, block_rows=block_rows, block_base=block_base)
    ref_sim, ref_idx, ref_counts = dense_graph(x, k, threshold)
    w = min(k, len(x))
    np.testing.assert_array_equal(idx[:, :w], ref_idx)
    np.testing.assert_array_equal(sim[:, :w], ref_sim)
    np.testing.assert_array_equal(counts, ref_counts)
    assert (idx[:, w:] == -1).all() and np.isneginf(sim[:, w:]).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_duplicates_beyond_margin_take_the_exact_path(dtype):
    # 40 copies of one row: float32 scores tie, so the candidate heap cannot pick the lowest ids by itself
    rng = np.random.default_rng(2)
    x = rng.standard_normal((60, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = np.concatenate([x, np.repeat(x[:1], 40, axis=0)]).astype(dtype)
    x = x[rng.permutation(len(x))]
    ids = np.arange(len(x))
    sim, idx, count = knn_rows(x, ids, [(ids, x)], 6, threshold=0.99, margin=0)
    ref_sim, ref_idx, ref_counts = dense_graph(x, 6, 0.99)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sim, ref_sim)
    np.testing.assert_array_equal(count, ref_counts)


def test_similarity_does_not_depend_on_blocking():
    # BLAS dgemm rounds float32 data differently for different shapes; the exact kernel must not
    x = shuffled_clusters(3, dtype=np.float32, dim=96)
    full = similarity(x, x)
    for rows, cols in [(slice(0, 1), slice(0, 17)), (slice(5, 300), slice(7, 400)), (slice(3, 4), slice(9, 10))]:
        np.testing.assert_array_equal(similarity(x[rows], x[cols]), full[rows, cols])
    i, j = np.arange(len(x)), np.roll(np.arange(len(x)), 5)
    np.testing.assert_array_equal(pair_similarity(x[i], x[j]), full[i, j])
    np.testing.assert_allclose(full, x.astype(np.float64) @ x.astype(np.float64).T, rtol=0, atol=1e-14)


def test_exact_ranks_sum_to_the_rank_in_sigma():
    x = shuffled_clusters(4, dtype=np.float32, dups=20)
    n = len(x)
    _, sigma, _ = dense_graph(x, n, 0.6)
    rank = np.argsort(sigma, axis=1)  # rank[j, i]: position of i in sigma_j
    rng = np.random.default_rng(0)
    j, i = rng.integers(0, n, 300), rng.integers(0, n, 300)
    keep = j != i
    j, i = j[keep], i[keep]
    s_ji = pair_similarity(x[j], x[i])
    total = np.ones(len(j), dtype=np.int64)
    for b0 in range(0, n, 77):
        b1 = min(b0 + 77, n)
        total += exact_ranks(x[j], i, s_ji, x[b0:b1], np.arange(b0, b1), j)
    np.testing.assert_array_equal(total, rank[j, i])


def test_self_first():
    sim = np.array([[0.9, 0.5, -np.inf]])
    idx = np.array([[7, 2, -1]])
    sim, idx = with_self_first([5], sim, idx, [1.0], width=2)
    np.testing.assert_array_equal(idx, [[5, 7]])
    np.testing.assert_array_equal(sim, [[1.0, 0.9]])


def test_block_smaller_than_k_is_padded():
    x = shuffled_clusters(5)[:4]
    sim, idx, _count = knn_rows(x, [10, 11, 12, 13], [(np.array([10, 11]), x[:2])], 4, threshold=0.6)
    assert list(idx[:, 0]) == [10, 11, 12, 13]  # self first
    assert (idx[:2, 2:] == -1).all() and np.isneginf(sim[:2, 2:]).all()  # one other row each
    assert (idx[2:, 3] == -1).all() and np.isneginf(sim[2:, 3]).all()  # two other rows each
    assert list(idx[:2, 1]) == [11, 10] and set(idx[2, 1:3]) == set(idx[3, 1:3]) == {10, 11}


@pytest.mark.parametrize(
    ("row", "value", "match"),
    [(3, np.nan, "row 13 has NaN"), (5, np.inf, "row 15 has NaN or inf"), (2, 0.0, "row 12 is all zeros")],
)
def test_bad_rows_are_named(row, value, match):
    x = shuffled_clusters(6, dtype=np.float32)[:8].copy()
    x[row] = value
    with pytest.raises(StoreError, match=match):
        check_features(x, np.arange(10, 18))
    with pytest.raises(StoreError, match=match):
        knn_rows(x, np.arange(10, 18), [(np.arange(10, 18), x)], 3, threshold=0.6)


def test_bad_arguments():
    x = shuffled_clusters(7)[:8]
    with pytest.raises(StoreError, match="same D"):
        knn_rows(x, np.arange(8), [(np.arange(8), x[:, :5])], 3, threshold=0.6)
    with pytest.raises(ConfigError, match="query_ids"):
        knn_rows(x, np.arange(7), [(np.arange(8), x)], 3, threshold=0.6)
    with pytest.raises(ConfigError, match="k >= 1"):
        knn_rows(x, np.arange(8), [(np.arange(8), x)], 0, threshold=0.6)
    with pytest.raises(StoreError, match="2-D float"):
        check_features(np.ones(4))
