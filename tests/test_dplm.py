"""DPLM: the blockwise path against the dense N x N reference, edge cases and the quality metric."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import shuffled_clusters

from wildreid.core.errors import ConfigError, StoreError
from wildreid.dplm import (
    _dense,
    concat_plans,
    dplm_blockwise,
    dplm_dense,
    dplm_published_dense,
    dplm_rows,
    dplm_rows_bytes,
    finish_rows,
    graph_positions,
    plan_rows,
    pseudo_label_quality,
    reverse_index,
)
from wildreid.knn import knn_graph, pair_similarity


def assert_same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# (threshold, adjacency, K, noise, pending expected): sparse neighbourhoods, then C_i > K for many rows
REGIMES = {
    "sparse": (0.6, 100, 101, 0.5, False),
    "low-threshold": (0.2, 10, 11, 0.5, True),
    "tight-clusters": (0.6, 10, 11, 0.15, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("dups", [0, 40])
def test_blockwise_equals_dense(dtype, regime, dups):
    threshold, adjacency, k, noise, pending = REGIMES[regime]
    x = shuffled_clusters(10, dtype=dtype, noise=noise, dups=dups)
    args = {"threshold": threshold, "min_candidates": 10, "adjacency": adjacency}
    dense = dplm_dense(x, **args)
    assert_rows_match(x, dense, args, seed=21)
    sizes = np.diff(dense[0])
    assert sizes.max() >= 10 and (regime != "sparse" or sizes.min() == 1)  # large and lone neighbourhoods
    for block_rows, block_base in [(37, 53), (128, 1000)]:
        stats = {}
        assert_same(dplm_blockwise(x, k=k, block_rows=block_rows, block_base=block_base, stats=stats, **args), dense)
        assert (stats["pending"] > 0) == pending
    if pending:
        counts = knn_graph(x, k, threshold=threshold)[2]
        assert np.mean(counts > k) > 0.2


def rows_of(csr, rows):
    """The CSR of ``rows`` (in their order) cut from a CSR over every row."""
    lists = [csr[1][csr[0][r] : csr[0][r + 1]] for r in rows]
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    return indptr, np.concatenate(lists) if lists else np.zeros(0, np.int64)


def assert_rows_match(x, dense, args, seed: int):
    """Per-batch mining: subsets of rows, in any order, exact ties with row 0 among them, give the dense rows."""
    rng = np.random.default_rng(seed)
    copies = np.flatnonzero((x == x[0]).all(axis=1))
    for rows in (np.arange(len(x)), rng.permutation(len(x))[:32], copies[:7], np.array([len(x) - 1]), []):
        rows = np.asarray(rows, dtype=np.int64)
        assert_same(dplm_rows(x, rows, **args), rows_of(dense, rows))


def test_rows_of_a_small_dictionary_and_bad_rows():
    x = shuffled_clusters(22, clusters=6, dups=10)[:6]
    args = {"threshold": 0.6, "min_candidates": 10, "adjacency": 100}
    assert_same(dplm_rows(x, [5, 0, 3], **args), rows_of(dplm_dense(x, **args), [5, 0, 3]))
    with pytest.raises(ConfigError, match="expected rows in 0..5"):
        dplm_rows(x, [6])
    sizes = [dplm_rows_bytes(1000, 512, batch, 20) for batch in (32, 64, 999)]
    assert sizes[0] < sizes[1] <= sizes[2]


@pytest.mark.parametrize(
    ("n", "adjacency", "min_candidates", "k"),
    [(30, 100, 10, None), (6, 100, 10, 6), (6, 3, 10, 4), (1, 5, 10, None), (40, 5, 50, 6)],
)
def test_small_dictionaries(n, adjacency, min_candidates, k):
    x = shuffled_clusters(11, clusters=6, dups=10)[:n]
    args = {"threshold": 0.6, "min_candidates": min_candidates, "adjacency": adjacency}
    dense = dplm_dense(x, **args)
    assert_same(dplm_blockwise(x, k=k, block_rows=4, block_base=7, **args), dense)
    assert_rows_match(x, dense, args, seed=n)


def test_isolated_row_keeps_only_itself():
    rng = np.random.default_rng(12)
    x = np.concatenate([np.eye(8)[:1], 0.3 * np.eye(8)[1:2] + rng.normal(0, 0.05, (20, 8))])
    x[:, 0] = np.abs(x[:, 0]) * 0.01  # nothing else passes t = 0.6 with row 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    indptr, indices = dplm_blockwise(x, block_rows=5, block_base=6)
    assert indices[indptr[0] : indptr[1]].tolist() == [0]
    assert_same((indptr, indices), dplm_dense(x))


def test_finish_rows_checks_the_exact_ranks():
    x = shuffled_clusters(13, noise=0.15)
    sim, idx, counts = knn_graph(x, 11, threshold=0.6)
    plan = plan_rows(
        np.arange(len(x)),
        idx,
        sim,
        counts,
        lambda ids: idx[ids],
        lambda ids: x[ids],
        n=len(x),
        threshold=0.6,
        min_candidates=10,
        adjacency=10,
    )
    assert plan.n_pending > 0
    with pytest.raises(ConfigError, match="exact ranks"):
        finish_rows(plan, np.zeros(plan.n_pending + 1))
    with pytest.raises(StoreError, match="1 added"):
        finish_rows(plan, np.full(plan.n_pending, 10))


@pytest.mark.parametrize("order", ["similarity", "published"])
def test_a_reverse_index_answers_rule_6_like_the_neighbour_rows(order):
    """Rows 0-39 of a dense neighbourhood (pending pairs), planned in blocks of 13 from neighbour rows and from
    a reverse index built over graph blocks of 17 rows: the same plan, field by field, once concatenated."""
    x = shuffled_clusters(90, noise=0.3)
    sim, idx, counts = knn_graph(x, 11, threshold=0.3)
    n, rows = len(x), np.arange(40)
    args = dict(n=n, threshold=0.3, min_candidates=5, adjacency=10, order=order)
    whole = plan_rows(rows, idx[rows], sim[rows], counts[rows], lambda ids: idx[ids], lambda ids: x[ids], **args)
    keys, positions = reverse_index(((s, idx[s : s + 17]) for s in range(0, n, 17)), 0, 40, 11, n)
    assert len(keys) == np.isin(idx, rows).sum()  # every place a row of 0-39 sits in the graph
    lookup = graph_positions(keys, positions, n)
    parts = [
        plan_rows(r, idx[r], sim[r], counts[r], None, lambda ids: x[ids], neighbour_positions=lookup, **args)
        for r in np.array_split(rows, [13, 26])
    ]
    joined = concat_plans(parts)
    assert whole.n_pending > 0
    for field in ("rows", "sigma", "k", "node", "ranks", "stop", "removed", "pending_row", "pending_pos"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field), err_msg=field)
    for field in ("pending_j", "pending_i", "pending_sim"):
        np.testing.assert_array_equal(getattr(joined, field), getattr(whole, field), err_msg=field)


@pytest.mark.parametrize(("row", "value", "match"), [(4, np.nan, "row 4 has NaN"), (7, 0.0, "row 7 is all zeros")])
def test_bad_rows(row, value, match):
    x = shuffled_clusters(14, dtype=np.float32).copy()
    x[row] = value
    with pytest.raises(StoreError, match=match):
        dplm_blockwise(x)
    with pytest.raises(StoreError, match=match):
        dplm_dense(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 10, "adjacency": 10}, "at least adjacency \\+ 1 = 11"),
        ({"threshold": -1.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"min_candidates": 0}, "min_candidates"),
        ({"adjacency": 0}, "adjacency"),
        ({"order": "nearest"}, "expected a DPLM order of similarity or published, found 'nearest'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        dplm_blockwise(shuffled_clusters(15), **kwargs)


def test_bad_order_everywhere():
    x = shuffled_clusters(15)
    sim, idx, counts = knn_graph(x, 101, threshold=0.6)
    calls = [
        lambda: dplm_dense(x, order="Published"),
        lambda: dplm_rows(x, [0], order=None),
        lambda: plan_rows(
            np.arange(3), idx[:3], sim[:3], counts[:3], lambda ids: idx[ids], lambda ids: x[ids], n=len(x), order="tie"
        ),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="similarity or published"):
            call()


def test_pseudo_label_quality():
    ids = np.array([0, 0, 0, 1, 1])
    # row 0 mines {0, 1, 3}, rows 1-4 mine only themselves
    indptr = np.array([0, 3, 4, 5, 6, 7])
    indices = np.array([0, 1, 3, 1, 2, 3, 4])
    q = pseudo_label_quality(indptr, indices, ids)
    assert q["precision"] == pytest.approx((2 / 3 + 4) / 5)
    assert q["recall"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 3 + 1 / 2 + 1 / 2) / 5)
    assert q["mean_positives"] == pytest.approx(7 / 5)
    unknown = pseudo_label_quality(indptr, indices, np.array([0, 0, -1, 1, 1]))
    assert unknown == {"precision": None, "recall": None, "mean_positives": pytest.approx(7 / 5)}
    with pytest.raises(ConfigError):
        pseudo_label_quality(indptr, indices, ids[:4])


# ----------------------------------------------------------------- the published candidate order

# (threshold, adjacency, K, min_candidates, noise, pending expected): l < a, so that k_i < a for rows with
# C_i < a and the orders differ; "dense" also has many rows with k_i >= K (pending rank pairs)
PUBLISHED_REGIMES = {
    "sparse": (0.6, 100, 101, 10, 0.5, False),
    "dense": (0.5, 10, 11, 5, 0.3, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("regime", PUBLISHED_REGIMES)
@pytest.mark.parametrize("dups", [0, 40])
def test_published_blockwise_equals_the_transcription(dtype, regime, dups):
    threshold, adjacency, k, min_candidates, noise, pending = PUBLISHED_REGIMES[regime]
    x = shuffled_clusters(10, dtype=dtype, noise=noise, dups=dups)
    args = {"threshold": threshold, "min_candidates": min_candidates, "adjacency": adjacency}
    published = dplm_published_dense(x, **args)
    assert_same(dplm_dense(x, order="published", **args), published)
    assert_rows_match(x, published, {**args, "order": "published"}, seed=22)
    for block_rows, block_base in [(37, 53), (128, 1000)]:
        stats = {}
        got = dplm_blockwise(
            x, k=k, block_rows=block_rows, block_base=block_base, stats=stats, order="published", **args
        )
        assert_same(got, published)
        assert (stats["pending"] > 0) == pending
    similarity = dplm_dense(x, **args)
    assert not np.array_equal(np.diff(published[0]), np.diff(similarity[0]))  # the order matters here
    assert_same(dplm_dense(x, order="similarity", **args), similarity)  # the default, unchanged
    if pending:
        counts = knn_graph(x, k, threshold=threshold)[2]
        assert np.mean(counts > k) > 0.2 and np.mean(counts < adjacency) > 0.05


@pytest.mark.parametrize(
    ("n", "adjacency", "min_candidates", "k"),
    [(30, 100, 10, None), (6, 100, 2, 6), (6, 3, 2, 4), (1, 5, 10, None), (40, 5, 3, 6), (40, 20, 5, 21)],
)
def test_published_small_dictionaries(n, adjacency, min_candidates, k):
    x = shuffled_clusters(11, clusters=6, dups=10)[:n]
    args = {"threshold": 0.6, "min_candidates": min_candidates, "adjacency": adjacency}
    published = dplm_published_dense(x, **args)
    assert_same(dplm_dense(x, order="published", **args), published)
    assert_same(dplm_blockwise(x, k=k, block_rows=4, block_base=7, order="published", **args), published)
    assert_rows_match(x, published, {**args, "order": "published"}, seed=n)


def blobs(seed: int):
    """A few rows around 3 centres in 4-d (float32): small enough to hit every quirk of the published code."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 30))
    x = rng.standard_normal((3, 4))[rng.integers(0, 3, n)] + 0.6 * rng.standard_normal((n, 4))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_published_aliasing_matters():
    """Quirk (a): removed candidates check row N-1, which changes step on clustered rows; quirk (b): it also
    makes N-1 a positive of rows that without the aliasing do not get it. The blockwise path follows both."""
    x = shuffled_clusters(10, noise=0.5)
    args = {"threshold": 0.6, "min_candidates": 10, "adjacency": 100}
    published = dplm_published_dense(x, **args)
    unaliased = _dense(x, order="published", alias=False, **args)
    assert not np.array_equal(np.diff(published[0]), np.diff(unaliased[0]))

    def last_row_gained(x, args) -> bool:
        n = len(x)
        ref, plain = dplm_published_dense(x, **args), _dense(x, order="published", alias=False, **args)
        gained = [
            i
            for i in range(n)
            if n - 1 in ref[1][ref[0][i] : ref[0][i + 1]] and n - 1 not in plain[1][plain[0][i] : plain[0][i + 1]]
        ]
        if gained:
            assert_same(
                dplm_blockwise(x, k=args["adjacency"] + 1, block_rows=5, block_base=7, order="published", **args), ref
            )
            assert_same(dplm_rows(x, gained, order="published", **args), rows_of(ref, gained))
        return bool(gained)

    cases = [
        (blobs(seed), {"threshold": t, "min_candidates": l, "adjacency": a})
        for seed in (9, 18, 19, 2)
        for t, l, a in [(0.6, 2, 5), (0.5, 2, 6), (0.3, 3, 8)]  # noqa: E741 (l: the paper's name)
    ]
    assert sum(last_row_gained(x, args) for x, args in cases) >= 2


def test_published_pending_pairs_carry_their_exact_similarity():
    """With l >= K, rows with C_i < a are filled past C_i with ids the graph row does not hold, and their checks
    may be pending: each pair carries s_ji of its own (j, i), as the counting pass needs."""
    x = shuffled_clusters(13, noise=0.5)
    args = {"threshold": 0.6, "min_candidates": 16, "adjacency": 10}
    sim, idx, counts = knn_graph(x, 11, threshold=0.6)
    plan = plan_rows(
        np.arange(len(x)),
        idx,
        sim,
        counts,
        lambda ids: idx[ids],
        lambda ids: x[ids],
        n=len(x),
        order="published",
        **args,
    )
    filled = plan.pending_pos >= plan.counts[plan.pending_row]
    assert filled.sum() > 10
    np.testing.assert_array_equal(plan.pending_sim, pair_similarity(x[plan.pending_j], x[plan.pending_i]))
    assert_same(
        dplm_blockwise(x, k=11, block_rows=64, block_base=100, order="published", **args),
        dplm_published_dense(x, **args),
    )
