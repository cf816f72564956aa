"""Label-free statistics of mined positives (wildreid.label_free) against a dense reference."""

from __future__ import annotations

import numpy as np
import pytest

from wildreid.core.errors import ConfigError
from wildreid.label_free import connected_groups, positives_stats


def _csr(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.cumsum([0, *map(len, lists)])
    return indptr, np.array([j for row in lists for j in row], dtype=np.int64)


def dense_reference(indptr, indices) -> dict:
    """The same statistics from an N x N matrix: transitive closure of the undirected graph by squaring."""
    n = len(indptr) - 1
    a = np.eye(n, dtype=bool)
    for i in range(n):
        a[i, indices[indptr[i] : indptr[i + 1]]] = True
    reach = a | a.T
    while True:
        nxt = (reach.astype(np.int64) @ reach.astype(np.int64)) > 0
        if (nxt == reach).all():
            break
        reach = nxt
    first = reach.argmax(axis=1)  # smallest row reachable from each row: its group's label
    sizes = np.bincount(first, minlength=n)
    others = [bool(np.any(indices[indptr[i] : indptr[i + 1]] != i)) for i in range(n)]
    return {
        "labels": first,
        "mean_positives": len(indices) / n,
        "share_with_others": float(np.mean(others)),
        "groups": int(np.count_nonzero(sizes)),
        "largest_group": int(sizes.max()),
    }


@pytest.mark.parametrize(
    "lists, groups, largest, share",
    [
        ([[0], [1], [2]], 3, 1, 0.0),  # warm-up: every row its own positive and its own group
        ([[], [], []], 3, 1, 0.0),  # no positives at all
        ([[0, 1], [1], [2]], 2, 2, 1 / 3),  # one direction is enough to join
        ([[1], [2], [3], [0]], 1, 4, 1.0),  # a cycle
        ([[4], [0], [], [], [3]], 2, 4, 0.6),  # 1 -> 0 -> 4 -> 3; 2 alone
        ([[3, 3], [3], [2], [1]], 2, 3, 0.75),  # repeated positives; row 2 lists only itself
    ],
)
def test_small_graphs(lists, groups, largest, share):
    stats = positives_stats(*_csr(lists))
    assert (stats["groups"], stats["largest_group"]) == (groups, largest)
    assert stats["share_with_others"] == pytest.approx(share)
    assert stats["mean_positives"] == pytest.approx(sum(map(len, lists)) / len(lists))


@pytest.mark.parametrize("seed", range(6))
def test_random_graphs_match_the_dense_reference(seed):
    """Sparse random graphs with chains (long ones need many pointer jumps) and self positives."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 90))
    lists = []
    for i in range(n):
        row = [i] if rng.random() < 0.7 else []
        if rng.random() < 0.3:
            row += rng.integers(0, n, rng.integers(1, 4)).tolist()
        if seed % 2 and i and rng.random() < 0.5:  # descending chains: hooking joins them in one round each
            row.append(i - 1)
        lists.append(row)
    indptr, indices = _csr(lists)
    expected = dense_reference(indptr, indices)
    np.testing.assert_array_equal(connected_groups(indptr, indices), expected.pop("labels"))
    stats = positives_stats(indptr, indices)
    assert stats == pytest.approx(expected)


def test_empty_and_invalid_csr():
    empty = positives_stats([0], [])
    assert empty == {"mean_positives": 0.0, "share_with_others": 0.0, "groups": 0, "largest_group": 0}
    for indptr, indices in (([0, 2], [0]), ([1, 1], [0]), ([0, 1], [1]), ([0, 1], [-1]), ([0, 2, 1], [0, 0])):
        with pytest.raises(ConfigError, match="expected a CSR"):
            positives_stats(indptr, indices)
