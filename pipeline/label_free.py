"""What the mined positives say without vehicle ids: how many, how spread, how grouped.

Precision and recall of pseudo-labels (``wildreid.dplm.pseudo_label_quality``)
need the true vehicle id of every row. A data set without ids (``wildreid shard
--layout folder``, or a list without a vid column) still shows whether mining
finds anything: positives per row, the share of rows with a positive besides
themselves, and the connected groups of the positives graph (taken undirected:
row i listing j joins them). Pure functions of the CSR arrays (``indptr``,
``indices``), linear in the number of positives; no N x N matrix.
"""

from __future__ import annotations

import numpy as np

from wildreid.core.errors import ConfigError

__all__ = ["connected_groups", "positives_stats"]


def _checked(indptr, indices) -> tuple[np.ndarray, np.ndarray]:
    indptr, indices = np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64)
    n = len(indptr) - 1
    if (
        n < 0
        or indptr[0] != 0
        or indptr[-1] != len(indices)
        or np.any(np.diff(indptr) < 0)
        or (len(indices) and (indices.min() < 0 or indices.max() >= n))
    ):
        raise ConfigError(
            f"expected a CSR of rows over indices in [0, rows), found indptr of length {len(indptr)} "
            f"(ending at {indptr[-1] if len(indptr) else None}) over {len(indices)} indices"
        )
    return indptr, indices


def connected_groups(indptr, indices) -> np.ndarray:
    """The group of every row: the smallest row connected to it through positives (either direction).

    A vectorised union-find: each round hooks the larger root of every edge that still joins two
    groups onto the smaller one, then jumps pointers until every row points at its root. Edges
    inside one group are dropped for good (groups only ever merge), so rounds get cheaper.
    """
    indptr, indices = _checked(indptr, indices)
    n = len(indptr) - 1
    parent = np.arange(n, dtype=np.int64)
    u = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    v = indices
    while len(u):
        ru, rv = parent[u], parent[v]
        apart = ru != rv
        if not apart.any():
            break
        u, v, ru, rv = u[apart], v[apart], ru[apart], rv[apart]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))  # parent[i] <= i always: no cycles
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    return parent


def positives_stats(indptr, indices) -> dict:
    """Label-free statistics of a positives CSR (row i's positives: ``indices[indptr[i]:indptr[i+1]]``).

    ``mean_positives``: positives per row; ``share_with_others``: share of rows with a positive other
    than the row itself; ``groups``: connected groups of the positives graph; ``largest_group``: rows
    in the biggest one (one group holding most rows means mining has merged everything).
    """
    indptr, indices = _checked(indptr, indices)
    n = len(indptr) - 1
    if n == 0:
        return {"mean_positives": 0.0, "share_with_others": 0.0, "groups": 0, "largest_group": 0}
    owner = np.repeat(np.arange(n, dtype=np.int64), np.diff(indptr))
    with_others = np.bincount(owner[indices != owner], minlength=n) > 0
    sizes = np.bincount(connected_groups(indptr, indices), minlength=n)
    return {
        "mean_positives": len(indices) / n,
        "share_with_others": float(with_others.mean()),
        "groups": int(np.count_nonzero(sizes)),
        "largest_group": int(sizes.max()),
    }
