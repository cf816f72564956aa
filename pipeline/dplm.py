"""DPLM pseudo-positive mining (SSML-FD), dense reference and blockwise form.

For row i of the dictionary M (N x D), with s_ij the exact similarity of
``wildreid.knn`` and threshold t, min candidates l, adjacency a:

1. sigma_i: i first, then the other rows by descending s_ij, ties by ascending id;
2. C_i = 1 + #{j != i : s_ij >= t};  k_i = min(max(C_i, l), N);
3. T_i = sigma_i[0:k_i];  A_i = sigma_i[0:a];
4. G = M[A_i] M[A_i]^T with a zero diagonal; d_p = |G[0] - G[p]|; N_i = the k_i
   entries of A_i with the smallest d (stable);
5. node_i = {i} if C_i == 1 else {i} + (T_i & N_i);
6. step = 1; for j < k_i: break when rank(i in sigma_{T_i[j]}) > k_i, else
   step = max(step, j); then step = min(step + 1, C_i);
7. positives_i = node_i & sigma_i[0:step], ascending.

Blockwise, a graph row sigma_i[0:K] with K >= a + 1 (or K >= N) is enough for
everything except a rank check whose j does not list i while k_i >= K: such
(j, i) pairs are "pending" and need a counting pass (``knn.exact_ranks``).
Only the checks j < min(k_i, a) matter: node_i lies in sigma_i[0:a], so once
those pass, min(step + 1, C_i) already covers node_i (C_i >= a) or equals C_i.

Candidate order (``order``). "similarity" is the order above. "published" is the
order of the published SSML-FD code (andreYoo/VeRI_SSML_FD,
lib/onlinesamplemining/dplm.py, ``DPLM.predict``), which sets every s_ij < t to -1
before sorting, so that past the first C_i entries the order is the sort's tie
order; made deterministic here:

  sigma^pub_i = i; the rows j != i with s_ij >= t by descending s_ij, ties by
  ascending id (as in rule 1); then every other row by ascending id.

T_i, A_i and rule 7 use sigma^pub_i; rule 6 ranks i in the true order sigma_j of
rule 1 (no threshold there). Two more quirks of that code are reproduced:

(a) its ``topk_idx`` is a view of the sorted index row, and when C_i > 1 every
    candidate of T_i not in N_i is overwritten with -1 in place ("removed"); its rank
    check then gathers ``memory[topk_idx]``, so a removed position j checks the rank of
    i in sigma_{N-1} (row -1 is the last row of the dictionary), not in sigma_{T_i[j]};
(b) ``multilabel[i, index_sorted[i, 0:step]] = 1`` sets column N-1 as well whenever a
    removed position lies below step; positives are node_i & that row, so N-1 is a
    positive of i iff N-1 is in node_i and (its position < step or a removed one is).

With C_i == 1 nothing is removed (node_i = {i}). Only positions >= C_i differ
between the orders, and a check at j >= C_i cannot lower step below C_i, so the
orders give different positives only where k_i < a' = min(a, N) (l < a and
C_i < a: A_i, hence N_i, changes and candidates get removed). A graph row gives
sigma^pub_i[0:a'] as well: it keeps sigma_i[0:C_i] and fills the rest with the
smallest other ids (``published_order``). The argument for j < min(k_i, a) above
still holds, since a removed position beyond a' adds nothing: N-1 in node_i sits
below a'. ``dplm_published_dense`` is a literal transcription of ``DPLM.predict``,
the reference for the other paths.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from wildreid.camera import camera_columns, camera_rows, camera_scale
from wildreid.core.errors import ConfigError, StoreError
from wildreid.knn import (
    check_features,
    exact_ranks,
    knn_graph,
    pair_similarity,
    similarity,
    validate_rows,
)

__all__ = [
    "ORDERS",
    "RowPlan",
    "check_dplm_args",
    "check_order",
    "camera_similarity",
    "check_sizes",
    "concat_plans",
    "dplm_blockwise",
    "dplm_dense",
    "dplm_published_dense",
    "dplm_rows",
    "dplm_rows_bytes",
    "finish_rows",
    "graph_positions",
    "oracle_positives",
    "pending_ranks",
    "plan_rows",
    "pseudo_label_quality",
    "published_order",
    "quality_means",
    "quality_sums",
    "reverse_index",
    "settled_pending",
]


ORDERS = ("similarity", "published")


def check_order(order) -> str:
    """ConfigError unless ``order`` is one of :data:`ORDERS`; returns it."""
    if not isinstance(order, str) or order not in ORDERS:
        raise ConfigError(f"expected a DPLM order of {' or '.join(ORDERS)}, found {order!r}")
    return order


def check_dplm_args(
    *, n: int, graph_width: int | None, threshold: float, min_candidates: int, adjacency: int, order: str = "similarity"
):
    """ConfigError unless t in (-1, 1], l >= 1, a >= 1, the graph width K >= a + 1 or K >= N, and a known order."""
    check_order(order)
    if not -1.0 < threshold <= 1.0:
        raise ConfigError(f"expected a DPLM threshold in (-1, 1], found {threshold}")
    if int(min_candidates) != min_candidates or min_candidates < 1:
        raise ConfigError(f"expected min_candidates >= 1, found {min_candidates}")
    if int(adjacency) != adjacency or adjacency < 1:
        raise ConfigError(f"expected adjacency >= 1, found {adjacency}")
    if graph_width is not None and graph_width < min(adjacency + 1, n):
        raise ConfigError(
            f"expected a k-NN graph of at least adjacency + 1 = {adjacency + 1} entries per row "
            f"(or all {n} rows), found {graph_width}: rebuild the graph with a larger k"
        )


def _adjacency_order(x: np.ndarray) -> np.ndarray:
    """Positions of A_i (rows of x, row 0 = i) by ascending d_p, stable (rule 4).

    Dense and blockwise both call this on the same (|A_i|, D) rows, so G comes out
    bit-identical whatever the blocking.
    """
    x = np.asarray(x, dtype=np.float64)
    g = x @ x.T
    np.fill_diagonal(g, 0.0)
    d = np.sqrt(((g[0] - g) ** 2).sum(axis=1))
    return np.argsort(d, kind="stable")


def _sigma_rows(s: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """sigma_i of each row (rule 1) from its full similarity row ``s`` (B, N): i, then by descending s, ties by id."""
    first = s.copy()
    first[np.arange(len(rows)), rows] = np.inf
    return np.lexsort((np.broadcast_to(np.arange(s.shape[1]), s.shape), -first), axis=1)


def published_order(sigma, counts) -> np.ndarray:
    """sigma^pub_i[0:W] of every row from its sigma_i[0:W] and C_i, with W = ``sigma.shape[1]`` <= N.

    Keeps sigma_i[0:C_i] (i, then the rows at or above t) and fills the positions from C_i
    with the smallest ids not kept: at most C_i of the ids 0..W-1 are kept, so those suffice.
    """
    sigma = np.asarray(sigma, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.int64)
    out = sigma.copy()
    width = sigma.shape[1]
    short = np.flatnonzero(counts < width)
    if len(short):
        head, c = sigma[short], counts[short][:, None]
        pos = np.arange(width)[None, :]
        kept = pos < c
        taken = np.zeros(head.shape, dtype=bool)
        r, p = np.nonzero(kept & (head < width))
        taken[r, head[r, p]] = True
        free = np.argsort(taken, axis=1, kind="stable")  # the ids below W not kept, ascending, come first
        out[short] = np.where(kept, head, np.take_along_axis(free, np.maximum(pos - c, 0), axis=1))
    return out


def _csr(lists: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    indptr = np.zeros(len(lists) + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
    return indptr, indices


def dplm_dense(
    features,
    *,
    threshold: float = 0.6,
    min_candidates: int = 10,
    adjacency: int = 100,
    order: str = "similarity",
    camids=None,
    camera_penalty: float = 0.0,
):
    """Reference DPLM over the full N x N similarity (tests, small N): CSR ``(indptr, indices)``.

    ``order="published"`` applies sigma^pub and quirks (a) and (b) rule by rule; it equals
    ``dplm_published_dense``, which transcribes the published code instead. ``camera_penalty``
    delta > 0 ranks by the camera-aware value s_ij - delta [same camera] (``wildreid.camera``:
    rules 1-3 and 6 on it, rule 4 on the rows), with ``camids`` the rows' cameras.
    """
    return _dense(
        features,
        threshold=threshold,
        min_candidates=min_candidates,
        adjacency=adjacency,
        order=order,
        alias=True,
        camids=camids,
        camera_penalty=camera_penalty,
    )


def camera_similarity(features, camids, penalty: float) -> np.ndarray:
    """The N x N camera-aware similarity s_ij - delta [same camera] as the blockwise k-NN computes it."""
    m = np.asarray(features)
    columns = camera_columns(camids)
    cameras, c = int(columns.max(initial=-1)) + 1, camera_scale(penalty, m.dtype)
    return similarity(camera_rows(m, columns, cameras, c), camera_rows(m, columns, cameras, -c))


def _dense(
    features,
    *,
    threshold: float,
    min_candidates: int,
    adjacency: int,
    order: str,
    alias: bool,
    camids=None,
    camera_penalty: float = 0.0,
):
    """``dplm_dense``; ``alias=False`` leaves quirks (a) and (b) out (tests show that they matter)."""
    m = np.asarray(features)
    check_features(m)
    n = len(m)
    check_dplm_args(
        n=n, graph_width=None, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency, order=order
    )
    s = camera_similarity(m, camids, camera_penalty) if camera_penalty > 0 else similarity(m, m)
    sigma = _sigma_rows(s, np.arange(n))
    rank = np.empty((n, n), dtype=np.int64)
    np.put_along_axis(rank, sigma, np.broadcast_to(np.arange(n), (n, n)), axis=1)  # rank[j, i]: i in sigma_j
    counts = 1 + np.count_nonzero(s >= threshold, axis=1) - (np.diagonal(s) >= threshold)
    published = order == "published"
    cand = published_order(sigma, counts) if published else sigma
    out = []
    for i in range(n):
        c = int(counts[i])
        k = min(max(c, min_candidates), n)
        t_i, a_i = cand[i, :k], cand[i, :adjacency]
        n_i = a_i[_adjacency_order(m[a_i])[:k]]
        node = {i} if c == 1 else {i} | (set(t_i.tolist()) & set(n_i.tolist()))
        removed = ~np.isin(t_i, n_i) if alias and published and c > 1 else np.zeros(k, dtype=bool)
        checked = np.where(removed, n - 1, t_i)  # quirk (a): a removed candidate checks row N-1
        step = 1
        for j in range(k):
            if rank[checked[j], i] > k:
                break
            step = max(step, j)
        step = min(step + 1, c)
        head = set(cand[i, :step].tolist()) | ({n - 1} if removed[:step].any() else set())  # quirk (b)
        out.append(np.array(sorted(node & head), dtype=np.int64))
    return _csr(out)


def dplm_published_dense(features, *, threshold: float = 0.6, min_candidates: int = 10, adjacency: int = 100):
    """``DPLM.predict`` of the published code (lib/onlinesamplemining/dplm.py) over every row, in numpy: CSR.

    Its control flow step by step, made deterministic as the module docstring says: exact
    float64 similarities, i first and ties by ascending id in every sort, the stable rule-4
    sort, k_i and A_i at most N. The writes of -1 through the view ``topk_idx`` and the
    gathers with index -1 act as they do in torch (numpy reads index -1 as the last row too).
    """
    m = np.asarray(features)
    check_features(m)
    n = len(m)
    check_dplm_args(n=n, graph_width=None, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency)
    ids = np.arange(n)
    sim = similarity(m, m)  # memory.mm(memory.t())
    node_sim = sim.copy()
    node_sim[node_sim < threshold] = -1.0
    node_sim[ids, ids] = np.inf  # i first: s_ii = 1 tops a normalised row, but may tie with a copy of i
    index_sorted = np.lexsort((np.broadcast_to(ids, (n, n)), -node_sim), axis=1)  # descending, ties by id
    node_sim_sorted = np.take_along_axis(node_sim, index_sorted, axis=1)
    mask_num = np.count_nonzero(node_sim_sorted != -1.0, axis=1)  # C_i
    sim_sorted = _sigma_rows(sim, ids)  # row r: the sort of memory[r].mm(memory.t()), r first
    nodeclass = np.zeros((n, n), dtype=bool)
    multilabel = np.zeros((n, n), dtype=bool)
    for i in range(n):
        topk = max(int(mask_num[i]), min_candidates)
        topk = min(topk, n)  # published: no cap (it assumes N >= topk)
        topk_idx = index_sorted[i, :topk]  # a view: the -1 written below lands in index_sorted
        g_top_index = index_sorted[i, :adjacency]
        adj_index = g_top_index[_adjacency_order(m[g_top_index])]  # cdist + sort; fancy indexing copies
        topk_idx_nbased = adj_index[:topk]
        if mask_num[i] == 1:
            nodeclass[i, i] = True
        else:
            nodeclass[i, i] = True
            for j in range(topk):
                if topk_idx[j] in topk_idx_nbased:
                    continue
                topk_idx[j] = -1
            nodeclass[i, topk_idx[topk_idx != -1]] = True
            nodeclass[i, i] = True
        idx_sorted = sim_sorted[topk_idx]  # memory[topk_idx]: index -1 gathers row N-1
        step = 1
        for j in range(topk):
            pos = int(np.flatnonzero(idx_sorted[j] == index_sorted[i, 0])[0])
            if pos > topk:
                break
            step = max(step, j)
        step = step + 1
        step = min(step, int(mask_num[i]))
        if step <= 0:
            continue
        multilabel[i, index_sorted[i, 0:step]] = True  # a -1 below step marks column N-1
    mining_results = nodeclass & multilabel
    return _csr([np.flatnonzero(row) for row in mining_results])


def dplm_rows(
    features, rows, *, threshold: float = 0.6, min_candidates: int = 10, adjacency: int = 100, order: str = "similarity"
):
    """DPLM positives of ``rows`` only, against the whole dictionary: CSR over ``rows``, in their order.

    Equal to those rows of ``dplm_dense(features, ...)``. Rules 4-7 run through
    ``plan_rows`` / ``finish_rows`` on graph rows of full width N, so no rank is pending;
    the full sigma is computed for ``rows`` and their candidates sigma_i[0:min(k_i, a)]
    only: at most ``dplm_rows_bytes(N, D, len(rows), a)`` bytes (small N, per-batch mining).
    """
    m = np.asarray(features)
    check_features(m)
    n = len(m)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    check_dplm_args(
        n=n, graph_width=n, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency, order=order
    )
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ConfigError(
            f"expected rows in 0..{n - 1}, found {rows.min()}..{rows.max()}; mine rows of this dictionary"
        )

    def full_rows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = similarity(m[ids], m)
        return s, _sigma_rows(s, ids)

    s, sigma = full_rows(rows)
    counts = 1 + np.count_nonzero(s >= threshold, axis=1) - (s[np.arange(len(rows)), rows] >= threshold)
    plan = plan_rows(
        rows,
        sigma,
        np.take_along_axis(s, sigma, axis=1),
        counts,
        lambda ids: full_rows(ids)[1],
        lambda ids: m[ids],
        n=n,
        threshold=threshold,
        min_candidates=min_candidates,
        adjacency=adjacency,
        order=order,
    )
    return finish_rows(plan, np.zeros(0, dtype=np.int64))


def dplm_rows_bytes(n: int, dim: int, rows: int, adjacency: int) -> int:
    """Bound on what ``dplm_rows`` holds for ``rows`` rows of an N x D dictionary.

    Per full sigma row (``rows`` plus up to rows x a candidates, at most N): the float64
    similarities, a copy, the lexsort keys and the int64 order (40 bytes a column), plus
    the rule-6 search (1 byte a column per candidate) and float64 copies of the dictionary.
    """
    full = min(n, rows * (1 + min(adjacency, n)))
    return int(full * n * 41 + 2 * n * dim * 8)


@dataclass(frozen=True)
class RowPlan:
    """Per-row DPLM state of one block of rows, between ``plan_rows`` and ``finish_rows``.

    Positions are positions in sigma_i (or sigma^pub_i; 0 = i itself), up to a' = min(a, N).
    ``ranks[b, p]`` is the known rank of row b in sigma_{sigma_b[p]} for p < ``stop[b]``,
    -1 where pending; ``stop[b]`` is the first check that certainly breaks, else
    min(k_i, a'). The ``pending_*`` arrays list the pairs (j, i, s_ji) whose rank is
    still needed, with where they go (``pending_row``, ``pending_pos``).
    ``removed[b, p]``: quirk (a) of the published order, position p checks row ``n`` - 1
    instead (all False in the similarity order). A removed position is never pending:
    it needs k_i < a' <= K, and with k_i < K a rank is found in the graph row or breaks.
    """

    rows: np.ndarray
    width: int
    sigma: np.ndarray
    counts: np.ndarray
    k: np.ndarray
    node: np.ndarray
    ranks: np.ndarray
    stop: np.ndarray
    pending_row: np.ndarray
    pending_pos: np.ndarray
    pending_j: np.ndarray
    pending_i: np.ndarray
    pending_sim: np.ndarray
    removed: np.ndarray
    n: int

    @property
    def n_pending(self) -> int:
        return len(self.pending_j)


def check_sizes(counts, *, width: int, min_candidates: int, n: int) -> tuple[np.ndarray, int]:
    """(k_i of every row, the window of graph entries rule 6 searches for a block of rows): a rank above
    k_i breaks, so only the first max k_i + 1 entries of a graph row can hold a rank that does not."""
    k = np.minimum(np.maximum(np.asarray(counts, dtype=np.int64), min_candidates), n)
    return k, int(min(width, k.max() + 1)) if len(k) else width


def plan_rows(
    rows,
    graph_idx,
    graph_sim,
    counts,
    neighbour_idx: Callable[[np.ndarray], np.ndarray] | None,
    features: Callable[[np.ndarray], np.ndarray],
    *,
    n: int,
    threshold: float = 0.6,
    min_candidates: int = 10,
    adjacency: int = 100,
    validated: bool = False,
    order: str = "similarity",
    neighbour_positions: Callable[[np.ndarray, np.ndarray, int], np.ndarray] | None = None,
) -> RowPlan:
    """Rules 1-6 for one block of rows, as far as the stored graph allows.

    ``rows`` (B,) row ids; ``graph_idx`` / ``graph_sim`` (B, K) their graph rows sigma_i[0:K];
    ``counts`` (B,) C_i (as ``knn_rows`` returns them); ``neighbour_idx(ids)`` the
    (len(ids), K) graph rows of any ids; ``features(ids)`` the (len(ids), D) dictionary rows;
    ``n`` the dictionary size. Each callable is called once, with unique ids.
    ``neighbour_positions(i, j, window)``, when given, replaces ``neighbour_idx`` (which may then
    be None): for aligned ids, the position of i in sigma_j[0:window], -1 where it is not there
    (``graph_positions`` answers it from a reverse index, without the graph rows of j).
    ``validated``: every dictionary row was checked already (the k-NN stage checks each
    as a query row), so the feature rows fetched here are not checked again.
    ``order="published"``: the graph rows (similarity order) are reordered into sigma^pub
    (``published_order``); the features of row N-1 are fetched too, for quirk (a).
    """
    rows = np.asarray(rows, dtype=np.int64)
    graph_idx = np.asarray(graph_idx, dtype=np.int64)
    graph_sim = np.asarray(graph_sim, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    n_rows, width = graph_idx.shape if graph_idx.ndim == 2 else (len(rows), -1)
    check_dplm_args(
        n=n, graph_width=width, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency, order=order
    )
    if rows.shape != (n_rows,) or graph_sim.shape != graph_idx.shape or counts.shape != (n_rows,):
        raise ConfigError(
            f"expected rows (B,), graph rows (B, K) and counts (B,), found {rows.shape}, "
            f"{graph_idx.shape}, {graph_sim.shape} and {counts.shape}"
        )
    span = min(adjacency, n)
    sigma = graph_idx[:, :span]
    if n_rows and (np.any(graph_idx[:, 0] != rows) or np.any(sigma < 0) or np.any(sigma >= n)):
        raise StoreError(f"expected graph rows that start with their own id and list {span} rows, found otherwise")
    if np.any(counts < 1) or np.any(counts > n):
        raise StoreError(f"expected C_i = 1 + knn counts in [1, {n}], found {counts.min()}..{counts.max()}")
    k, window = check_sizes(counts, width=width, min_candidates=min_candidates, n=n)
    checks = np.minimum(k, span)
    published = order == "published"
    if published:
        sigma = published_order(sigma, counts)

    extra = np.array([n - 1] if published else [], dtype=np.int64)  # quirk (a) checks row N-1
    feat_ids, feat_at = np.unique(np.concatenate([sigma.reshape(-1), extra]), return_inverse=True)
    feats = np.asarray(features(feat_ids))
    if not validated:
        validate_rows(feats, feat_ids)
    feat_at = feat_at.reshape(-1)[: sigma.size].reshape(sigma.shape)
    look = np.arange(span)[None, :] < checks[:, None]

    node = np.zeros(sigma.shape, dtype=bool)
    node[:, 0] = True
    for b in np.flatnonzero(counts > 1):  # rule 4 needs one small Gram matrix per row
        near = _adjacency_order(feats[feat_at[b]])[: int(k[b])]
        node[b, near[near < k[b]]] = True
    # i is always in N_i, so below k_i "not in node_i" is "not in N_i"
    removed = look & ~node & (counts > 1)[:, None] if published else np.zeros(sigma.shape, dtype=bool)
    check = np.where(removed, n - 1, sigma)  # the row whose rank of i each check reads

    # rule 6, vectorised over the block: where row i sits in the graph rows of its candidates.
    # A rank above k_i breaks, so only the first k_i + 1 entries of those rows are searched:
    # i missing from them means a break too, unless the window is the whole graph row.
    if neighbour_positions is not None:
        at_b, at_p = np.nonzero(look)
        where = np.full(sigma.shape, -1, dtype=np.int64)
        where[at_b, at_p] = neighbour_positions(rows[at_b], check[at_b, at_p], window)
        found = where >= 0
        pos = np.maximum(where, 0)
    else:
        nbr_ids, nbr_at = np.unique(check[look], return_inverse=True)
        nbr_rows = np.asarray(neighbour_idx(nbr_ids), dtype=np.int64)
        if nbr_rows.shape != (len(nbr_ids), width):
            raise StoreError(f"expected neighbour rows of shape {(len(nbr_ids), width)}, found {nbr_rows.shape}")
        nbr_of = np.full(sigma.shape, -1, dtype=np.int64)
        nbr_of[look] = nbr_at.reshape(-1)
        hit = nbr_rows[np.where(look, nbr_of, 0), :window] == rows[:, None, None]
        found = hit.any(axis=2) & look
        pos = hit.argmax(axis=2)
    ranks = np.where(found, pos, -1)
    breaks = look & np.where(found, pos > k[:, None], (k < window)[:, None])
    stop = np.where(breaks.any(axis=1), breaks.argmax(axis=1), checks)
    p_row, p_pos = np.nonzero(look & ~found & (np.arange(span)[None, :] < stop[:, None]))
    p_j = check[p_row, p_pos]
    if published:  # sigma^pub is not the graph's order: s_ji of the pairs, exact
        p_sim = pair_similarity(feats[np.searchsorted(feat_ids, p_j)], feats[np.searchsorted(feat_ids, rows[p_row])])
    else:
        p_sim = graph_sim[p_row, p_pos]
    return RowPlan(
        rows=rows,
        width=width,
        sigma=sigma,
        counts=counts,
        k=k,
        node=node,
        ranks=ranks,
        stop=stop,
        pending_row=p_row,
        pending_pos=p_pos,
        pending_j=p_j,
        pending_i=rows[p_row],
        pending_sim=p_sim,
        removed=removed,
        n=n,
    )


def reverse_index(graph_blocks, lo: int, hi: int, window: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the rows [lo, hi) sit in the graph rows of others: sorted keys i * n + j and positions p < ``window``
    with sigma_j[p] = i, from ``(start, graph rows)`` blocks that cover the graph once (read in order)."""
    keys, positions = [], []
    for start, block in graph_blocks:
        part = block[:, :window]
        j, p = np.nonzero((part >= lo) & (part < hi))
        keys.append(part[j, p] * n + (j + start))
        positions.append(p)
    keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    positions = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    order = np.argsort(keys, kind="stable")
    return keys[order], positions[order]


def graph_positions(keys: np.ndarray, positions: np.ndarray, n: int):
    """``neighbour_positions`` for ``plan_rows`` from a ``reverse_index`` that covers the rows asked about."""

    def lookup(i: np.ndarray, j: np.ndarray, window: int) -> np.ndarray:
        wanted = np.asarray(i, dtype=np.int64) * n + np.asarray(j, dtype=np.int64)
        at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
        hit = (keys[at] == wanted) & (positions[at] < window) if len(keys) else np.zeros(len(wanted), bool)
        return np.where(hit, positions[at] if len(keys) else -1, -1)

    return lookup


def finish_rows(plan: RowPlan, exact_rank) -> tuple[np.ndarray, np.ndarray]:
    """Rules 6-7 once pending ranks are known: local CSR ``(indptr, indices)`` of the block's rows.

    ``exact_rank`` (P,) aligned with ``plan.pending_*``: the full rank of i in sigma_j,
    i.e. 1 + the ``exact_ranks`` counts summed over every base block.
    """
    exact_rank = np.asarray(exact_rank, dtype=np.int64).reshape(-1)
    if len(exact_rank) != plan.n_pending:
        raise ConfigError(f"expected {plan.n_pending} exact ranks (one per pending pair), found {len(exact_rank)}")
    if np.any(exact_rank < plan.width):
        raise StoreError(
            f"expected pending ranks >= the graph width {plan.width} (i is not in sigma_j[0:K]), "
            f"found {exact_rank.min()}: were the counts summed over every base block and 1 added?"
        )
    ranks = plan.ranks.copy()
    ranks[plan.pending_row, plan.pending_pos] = exact_rank
    pos = np.arange(plan.sigma.shape[1])[None, :]
    fails = (pos < plan.stop[:, None]) & (ranks > plan.k[:, None])
    broke_at = np.where(fails.any(axis=1), np.argmax(fails, axis=1), plan.stop)
    step = np.minimum(np.maximum(broke_at - 1, 1) + 1, plan.counts)
    keep = plan.node & (pos < step[:, None])
    if plan.removed.any():  # quirk (b): a removed position below step marks N-1, kept if in node_i
        marks = (plan.removed & (pos < step[:, None])).any(axis=1)
        keep |= plan.node & (plan.sigma == plan.n - 1) & marks[:, None]
    return _csr([np.sort(plan.sigma[b, keep[b]]) for b in range(len(plan.rows))])


def settled_pending(plan: RowPlan, j_counts: np.ndarray, threshold: float) -> np.ndarray:
    """Which pending pairs (j, i) cannot break rule 6, known without a counting pass.

    When s_ji >= t, every row ahead of i in sigma_j has s_jr >= s_ji >= t, so i sits at
    position C_j - 1 or earlier (``j_counts``: C_j of each pair's j, aligned); if that is
    at most k_i, the check passes whatever the exact rank. In the dense regime (C_i near
    N, e.g. the features of an untrained network) this settles nearly every pair.
    A settled pair's rank can be given as ``plan.width``: a pair is pending only when its
    whole graph row was searched (window = K) and k_i >= K, so K <= k_i as well.
    """
    k_i = plan.k[plan.pending_row]
    return (plan.pending_sim >= threshold) & (np.asarray(j_counts, dtype=np.int64) - 1 <= k_i)


def pending_ranks(
    plan: RowPlan, j_vectors: np.ndarray, base_blocks, *, pairs=slice(None), chunk: int | None = None
) -> np.ndarray:
    """Exact ranks of the plan's pending pairs (or of ``pairs`` of them, a slice or indices, ``j_vectors``
    aligned with it): 1 + counts over every ``(base_ids, base)`` block; ``chunk``: ``exact_ranks``'s."""
    i_ids, s_ji, j_ids = plan.pending_i[pairs], plan.pending_sim[pairs], plan.pending_j[pairs]
    rank = np.ones(len(j_ids), dtype=np.int64)
    if len(j_ids):
        for base_ids, base in base_blocks:
            rank += exact_ranks(j_vectors, i_ids, s_ji, base, base_ids, j_ids, chunk=chunk)
    return rank


def concat_plans(plans: list[RowPlan]) -> RowPlan:
    """One plan for consecutive blocks of rows (the pending pairs of all of them in one list)."""
    if not plans:
        raise ConfigError("expected at least one row plan")
    if len({(p.width, p.n, p.sigma.shape[1]) for p in plans}) != 1:
        raise ConfigError("expected row plans of one graph (the same width, N and adjacency)")
    offsets = np.cumsum([0] + [len(p.rows) for p in plans[:-1]])
    join = lambda name: np.concatenate([getattr(p, name) for p in plans])  # noqa: E731
    return RowPlan(
        rows=join("rows"),
        width=plans[0].width,
        sigma=join("sigma"),
        counts=join("counts"),
        k=join("k"),
        node=join("node"),
        ranks=join("ranks"),
        stop=join("stop"),
        pending_row=np.concatenate([p.pending_row + o for p, o in zip(plans, offsets)]),
        pending_pos=join("pending_pos"),
        pending_j=join("pending_j"),
        pending_i=join("pending_i"),
        pending_sim=join("pending_sim"),
        removed=join("removed"),
        n=plans[0].n,
    )


def dplm_blockwise(
    features,
    *,
    k: int | None = None,
    block_rows: int = 256,
    block_base: int = 1024,
    threshold: float = 0.6,
    min_candidates: int = 10,
    adjacency: int = 100,
    margin: int = 16,
    stats: dict | None = None,
    order: str = "similarity",
) -> tuple[np.ndarray, np.ndarray]:
    """DPLM through the blockwise functions, in memory, in the order an out-of-core run uses.

    ``k`` is the graph width K (self included, default a + 1). If ``stats`` is a dict it
    receives ``pending`` (pairs that needed a counting pass).
    """
    m = np.asarray(features)
    n = len(m)
    k = adjacency + 1 if k is None else k
    check_dplm_args(
        n=n, graph_width=k, threshold=threshold, min_candidates=min_candidates, adjacency=adjacency, order=order
    )
    sim, idx, counts = knn_graph(m, k, threshold=threshold, block_rows=block_rows, block_base=block_base, margin=margin)
    parts, pending = [], 0
    for r0 in range(0, n, block_rows):
        r1 = min(r0 + block_rows, n)
        plan = plan_rows(
            np.arange(r0, r1),
            idx[r0:r1],
            sim[r0:r1],
            counts[r0:r1],
            lambda ids: idx[ids],
            lambda ids: m[ids],
            n=n,
            threshold=threshold,
            min_candidates=min_candidates,
            adjacency=adjacency,
            order=order,
        )
        blocks = ((np.arange(b0, min(b0 + block_base, n)), m[b0 : b0 + block_base]) for b0 in range(0, n, block_base))
        rank = pending_ranks(plan, m[plan.pending_j], blocks)
        pending += plan.n_pending
        parts.append(finish_rows(plan, rank))
    if stats is not None:
        stats["pending"] = pending
    indices = [ind for _, ind in parts]
    lengths = [np.diff(ptr) for ptr, _ in parts]
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(np.concatenate(lengths)) if lengths else []
    return indptr, np.concatenate(indices) if indices else np.zeros(0, np.int64)


def quality_sums(rows, indptr, indices, ids, id_sizes) -> dict:
    """Sums over ``rows`` of per-row precision and recall (see :func:`pseudo_label_quality`).

    ``indptr``/``indices`` is the CSR of these rows only; ``ids`` covers the whole
    set and ``id_sizes[v]`` is how many rows have id v. Sums, not means, so blocks add up.
    """
    rows, indptr, indices, ids = (np.asarray(x, dtype=np.int64) for x in (rows, indptr, indices, ids))
    sizes = np.diff(indptr)
    out = {"rows": len(rows), "positives": int(sizes.sum()), "precision": None, "recall": None}
    if len(rows) == 0 or np.any(ids < 0):
        return out
    owner = np.repeat(np.arange(len(rows)), sizes)
    same = np.bincount(owner, weights=ids[indices] == ids[rows[owner]], minlength=len(rows))
    out["precision"] = float(np.divide(same, sizes, out=np.zeros(len(rows)), where=sizes > 0).sum())
    out["recall"] = float((same / np.asarray(id_sizes)[ids[rows]]).sum())
    return out


def oracle_positives(ids) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth positives (``mining.oracle``): row i's are the rows of its vehicle id, ascending, i among
    them; CSR ``(indptr, indices)``. ConfigError if any id is unknown (negative)."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and ids.min() < 0:
        raise ConfigError(
            f"mining.oracle=true needs the vehicle id of every training image, but {np.count_nonzero(ids < 0):,} "
            f"of {len(ids):,} are unknown (-1); drop mining.oracle (it is a ceiling for labelled studies only)"
        )
    n = len(ids)
    order = np.argsort(ids, kind="stable")  # rows grouped by id, ascending rows within a group
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]) if n else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, n])
    group = np.empty(n, dtype=np.int64)
    group[order] = np.repeat(np.arange(len(starts)), sizes)
    counts = sizes[group]
    indptr = np.zeros(n + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    seg = np.repeat(np.arange(n), counts)
    return indptr, order[starts[group[seg]] + np.arange(indptr[-1]) - indptr[seg]].astype(np.int64)


def pseudo_label_quality(indptr, indices, ids) -> dict:
    """Mean per-row precision and recall of the mined positives against vehicle ids.

    precision_i: share of row i's positives with i's id; recall_i: share of all rows
    with i's id (i included) that were mined. Ids of -1 mean unknown: precision and
    recall are then None. ``mean_positives`` is always given.
    """
    indptr, indices, ids = (np.asarray(x, dtype=np.int64) for x in (indptr, indices, ids))
    n = len(indptr) - 1
    if n < 0 or len(ids) != n or indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise ConfigError(
            f"expected a CSR of {len(ids)} rows over {len(indices)} indices, found indptr of length {len(indptr)}"
        )
    return quality_means(quality_sums(np.arange(n), indptr, indices, ids, np.bincount(np.maximum(ids, 0))))


def quality_means(sums: dict) -> dict:
    """Per-row means of ``quality_sums`` output (one block's, or several added up):
    precision and recall (None when ids are unknown or no row was mined) and mean_positives."""
    rows = sums["rows"]
    known = sums["precision"] is not None and rows > 0
    return {
        "precision": sums["precision"] / rows if known else None,
        "recall": sums["recall"] / rows if known else None,
        "mean_positives": sums["positives"] / max(rows, 1),
    }
