"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) without an (N, N) matrix, N = Q + G.

Definitions, shared by the dense reference ``rerank_dense`` and the sparse ``ReRanker``
(rows 0..Q-1 of the stacked features are the queries, Q..N-1 the gallery):

* ``D``: ``grid_distances`` of the stacked features against themselves (squared Euclidean, float32,
  on the tile grid of the N x N space); ``m_i = max_j D[i, j]``; ``original[i, j] = D[i, j] / m_i``
  in float64 (the public code divides by column maxima and transposes: the same for a symmetric D).
* ``N(i, k)``: the first k of row i ordered by (D[i, j], j); ``R(i, k) = [j in N(i, k+1) if i in N(j, k+1)]``.
* expansion ``E(i)``: R(i, k1) joined by R(c, kh), kh = round(k1/2), for every c in R(i, k1) with
  ``|R(c, kh) & R(i, k1)| > 2/3 |R(c, kh)|``; sorted, unique.
* ``V[i, j] = exp(-original[i, j]) / sum_{j' in E(i)} exp(-original[i, j'])`` on E(i).
* local query expansion (k2 > 1): ``V'[i] = sum_{r in N(i, k2)} V[r] / k2``.
* ``jaccard[q, g] = 1 - t / (2 - t)``, ``t = sum_k min(V'[q, k], V'[g, k])``;
  ``final = jaccard * (1 - lambda) + original[q, Q + g] * lambda``.

Every sum runs in one fixed order (``segment_sums``: ascending j or rank order, one term after the
other) in both versions, so they agree to the bit wherever they see the same D. The public code
keeps V and the Jaccard distance in float16; here they are float64. The sparse version keeps the
(N, k1+1) neighbour lists, V and V' as sparse rows, and builds the final distances one (bq, G) strip
at a time for ``evaluate_blockwise``.
"""

from __future__ import annotations

import numpy as np

from wildreid.core.errors import ConfigError, StoreError
from wildreid.distances import (
    TILE,
    check_tile,
    grid_distances,
    plan_query_rows,
    squared_norms,
)
from wildreid.stores.rows import Rows, as_rows

__all__ = ["ReRanker", "combine", "knn_lists", "pair_distances", "reciprocal_lists", "rerank_dense", "segment_sums"]


# --------------------------------------------------------------------------- pure pieces


def segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of each run of ``values`` (runs of ``lengths``), adding one term after the other from 0.0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    out = np.zeros(len(lengths), dtype=np.float64)
    for p in range(int(lengths.max()) if len(lengths) else 0):
        act = np.flatnonzero(lengths > p)
        out[act] += values[starts[act] + p]
    return out


def combine(jaccard, original, lambda_: float):
    """The final re-ranked distance."""
    return jaccard * (1 - lambda_) + original * lambda_


def _weights(original_rows: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    w = np.exp(-original_rows)
    return w / np.repeat(segment_sums(w, lengths), lengths)


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Float32 squared distance of aligned rows (for pairs outside the neighbour lists)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    dot = np.einsum("ij,ij->i", a * np.float32(-2.0), b)
    return np.maximum((dot + squared_norms(a)) + squared_norms(b), np.float32(0.0))


def _keys(d: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """int64 keys ordered like (d, col) for non-negative float32 d and cols < 2**32."""
    return (d.view(np.int32).astype(np.int64) << 32) | cols


def reciprocal_lists(ranked: np.ndarray, k: int):
    """CSR (indptr, indices) of R(i, k) in rank order, from the neighbour lists ``ranked`` (N, >= k+1)."""
    n = len(ranked)
    fwd = ranked[:, : k + 1]
    rows = np.repeat(np.arange(n), fwd.shape[1])
    cols = fwd.ravel()
    pairs = np.sort(rows * n + cols)
    back = cols * n + rows
    pos = np.minimum(np.searchsorted(pairs, back), len(pairs) - 1)
    keep = pairs[pos] == back
    counts = np.bincount(rows[keep], minlength=n)
    return np.concatenate([[0], np.cumsum(counts)]), cols[keep]


def _expansion(ranked: np.ndarray, k1: int):
    """CSR (indptr, indices) of E(i), indices ascending."""
    n = len(ranked)
    ptr, idx = reciprocal_lists(ranked, k1)
    hptr, hidx = reciprocal_lists(ranked, int(np.around(k1 / 2)))
    r_len = np.diff(ptr)
    i_of = np.repeat(np.arange(n), r_len)  # (i, c) for c in R(i)
    h_len = np.diff(hptr)[idx]
    t_i = np.repeat(i_of, h_len)  # (i, c, x) for x in R(c, kh)
    t_pair = np.repeat(np.arange(len(idx)), h_len)
    t_x = hidx[np.repeat(hptr[idx], h_len) + (np.arange(h_len.sum()) - np.repeat(np.cumsum(h_len) - h_len, h_len))]
    r_keys = i_of * n + idx  # sorted: rows ascending, and R(i) keys need not be sorted within a row
    r_sorted = np.sort(r_keys)
    probe = t_i * n + t_x
    pos = np.minimum(np.searchsorted(r_sorted, probe), max(len(r_sorted) - 1, 0))
    inside = r_sorted[pos] == probe if len(r_sorted) else np.zeros(len(probe), bool)
    overlap = np.bincount(t_pair, weights=inside, minlength=len(idx))
    chosen = overlap > 2 / 3 * h_len
    extra = chosen[t_pair]
    keys = np.unique(np.concatenate([r_keys, probe[extra]]))
    rows, cols = np.divmod(keys, n)
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]), cols


# --------------------------------------------------------------------------- dense reference


def rerank_dense(qf, gf, k1: int = 20, k2: int = 6, lambda_: float = 0.3, *, tile=TILE, device: str = "cpu"):
    """The (Q, G) re-ranked distances from full N x N matrices, written like the public ``re_ranking``."""
    qf, gf = np.asarray(qf, np.float32), np.asarray(gf, np.float32)
    nq = len(qf)
    x = np.concatenate([qf, gf])
    n = len(x)
    d = grid_distances(x, 0, x, 0, tile=tile, device=device)
    original = d.astype(np.float64) / d.max(axis=1).astype(np.float64)[:, None]
    initial_rank = np.argsort(d, axis=1, kind="stable")
    kh = int(np.around(k1 / 2))
    v = np.zeros((n, n))
    for i in range(n):
        fwd = initial_rank[i, : k1 + 1]
        rec = fwd[np.flatnonzero((initial_rank[fwd, : k1 + 1] == i).any(axis=1))]
        expansion = rec
        for c in rec:
            cf = initial_rank[c, : kh + 1]
            crec = cf[np.flatnonzero((initial_rank[cf, : kh + 1] == c).any(axis=1))]
            if len(np.intersect1d(crec, rec)) > 2 / 3 * len(crec):
                expansion = np.append(expansion, crec)
        expansion = np.unique(expansion)
        v[i, expansion] = _weights(original[i, expansion], np.array([len(expansion)]))
    if k2 != 1:
        vqe = np.zeros_like(v)
        for i in range(n):
            acc = np.zeros(n)
            for r in initial_rank[i, :k2]:
                acc = acc + v[r]
            vqe[i] = acc / k2
        v = vqe
    inv = [np.flatnonzero(v[:, j] != 0) for j in range(n)]
    jaccard = np.zeros((nq, n))
    for i in range(nq):
        temp_min = np.zeros(n)
        for j in np.flatnonzero(v[i] != 0):
            temp_min[inv[j]] = temp_min[inv[j]] + np.minimum(v[i, j], v[inv[j], j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    return combine(jaccard, original[:nq], lambda_)[:, nq:]


# --------------------------------------------------------------------------- sparse, blockwise


class _Stacked(Rows):
    """Query rows then gallery rows, as one row source (float32)."""

    dtype = np.dtype(np.float32)

    def __init__(self, query: Rows, gallery: Rows):
        self.query, self.gallery, self.nq = query, gallery, query.count()

    def count(self) -> int:
        return self.nq + self.gallery.count()

    def dim(self) -> int:
        return self.query.dim()

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((stop - start, self.dim()), dtype=np.float32) if out is None else out
        split = min(max(start, self.nq), stop)
        if split > start:
            out[: split - start] = self.query.read_rows(start, split)
        if stop > split:
            out[split - start :] = self.gallery.read_rows(split - self.nq, stop - self.nq)
        return out


def knn_lists(x: Rows, k: int, *, budget: int, tile=TILE, device: str = "cpu", cached: np.ndarray | None = None):
    """(indices, distances, row maxima) of the first k of every row by (D, index), blockwise over the grid."""
    tq, tg = check_tile(tile)
    n = x.count()
    k = min(k, n)
    rows = tq
    # a (rows, cols) block: float32 distances, int64 keys and their partitioned copy; the column rows themselves
    cols = max(tg, (budget // 2) // (rows * 24 + x.dim() * 4) // tg * tg)
    keys_out = np.empty((n, k), dtype=np.int64)
    row_max = np.empty(n, dtype=np.float32)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        xr = cached[r0:r1] if cached is not None else x.read_rows(r0, r1)
        best = np.empty((r1 - r0, 0), dtype=np.int64)
        top = np.zeros(r1 - r0, dtype=np.float32)
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            d = grid_distances(
                xr, r0, cached[c0:c1] if cached is not None else x.read_rows(c0, c1), c0, tile=tile, device=device
            )
            np.maximum(top, d.max(axis=1), out=top)
            keys = np.concatenate([best, _keys(d, np.arange(c0, c1, dtype=np.int64)[None, :])], axis=1)
            best = np.partition(keys, k - 1, axis=1)[:, :k] if keys.shape[1] > k else keys
        keys_out[r0:r1] = np.sort(best, axis=1)
        row_max[r0:r1] = top
    idx = keys_out & 0xFFFFFFFF
    dist = (keys_out >> 32).astype(np.int32).view(np.float32)
    return idx, dist, row_max


class ReRanker:
    """Neighbour lists, V' (sparse rows) and its gallery inverted index, built once; ``strip`` gives final distances."""

    def __init__(
        self,
        query,
        gallery,
        *,
        k1: int = 20,
        k2: int = 6,
        lambda_: float = 0.3,
        memory_budget: int,
        tile=TILE,
        device: str = "cpu",
    ):
        if k1 < 1 or not 1 <= k2 <= k1 + 1 or not 0.0 <= lambda_ <= 1.0:
            raise ConfigError(
                f"expected k1 >= 1, 1 <= k2 <= k1 + 1 and 0 <= lambda <= 1, found k1={k1}, k2={k2}, "
                f"lambda={lambda_}; the paper's values are 20, 6, 0.3"
            )
        query, gallery = as_rows(query), as_rows(gallery)
        if query.dim() != gallery.dim():
            raise StoreError(
                f"query features have dimension {query.dim()} but gallery features {gallery.dim()}; "
                "evaluate features of one model"
            )
        self.x = _Stacked(query, gallery)
        self.nq, self.n = query.count(), self.x.count()
        self.ng = self.n - self.nq
        self.tile, self.device, self.lambda_ = tile, device, lambda_
        tq, tg = check_tile(tile)
        feat_bytes = self.n * self.x.dim() * 4
        self.cached = self.x.read_rows(0, self.n) if feat_bytes <= memory_budget // 2 else None
        idx, dist, row_max = knn_lists(
            self.x, k1 + 1, budget=memory_budget, tile=tile, device=device, cached=self.cached
        )
        self.m = row_max.astype(np.float64)
        ptr, cols = _expansion(idx, k1)
        rows = np.repeat(np.arange(self.n), np.diff(ptr))
        d = self._pair_values(rows, cols, idx, dist)
        vals = _weights(d.astype(np.float64) / self.m[rows], np.diff(ptr))
        if k2 != 1:
            ptr, cols, vals = self._query_expansion(ptr, cols, vals, idx[:, :k2], k2)
        self.ptr, self.cols, self.vals = ptr, cols, vals
        # inverted index of V' over gallery rows: for column j, gallery rows (ascending) and values
        rows = np.repeat(np.arange(self.n), np.diff(ptr))
        g = rows >= self.nq
        order = np.argsort(cols[g], kind="stable")
        self.inv_rows, self.inv_vals = rows[g][order] - self.nq, vals[g][order]
        self.inv_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols[g], minlength=self.n))])
        fixed = (feat_bytes if self.cached is not None else 0) + 40 * len(self.cols) + 16 * self.n * (k1 + 2)
        self.step = 4 * tg  # gallery columns per matrix product
        triples = len(self.cols) / self.n * max(1.0, len(self.inv_rows) / self.n) * 48  # per query, in _overlaps
        row_bytes = int(16 * self.ng + 4 * min(self.step, self.n) + triples)
        self.query_rows = plan_query_rows(row_bytes, memory_budget, tile_q=tq, n_query=self.nq, fixed=fixed)

    def _pair_values(self, rows, cols, idx, dist) -> np.ndarray:
        """D[rows, cols]: from the neighbour lists where there, else from the feature rows."""
        n = len(idx)
        order = np.argsort(idx, axis=1, kind="stable")
        skeys = np.take_along_axis(idx, order, axis=1) + np.arange(n)[:, None] * n
        flat = skeys.ravel()
        probe = rows * n + cols
        pos = np.minimum(np.searchsorted(flat, probe), len(flat) - 1)
        found = flat[pos] == probe
        out = np.empty(len(rows), dtype=np.float32)
        src = np.take_along_axis(dist, order, axis=1).ravel()
        out[found] = src[pos[found]]
        miss = np.flatnonzero(~found)
        for a in range(0, len(miss), 1 << 16):
            p = miss[a : a + (1 << 16)]
            out[p] = pair_distances(self._rows(rows[p]), self._rows(cols[p]))
        return out

    def _rows(self, which: np.ndarray) -> np.ndarray:
        if self.cached is not None:
            return self.cached[which]
        return self.x.gather(which)

    def _query_expansion(self, ptr, cols, vals, first, k2: int):
        """V'[i] = sum of V over N(i, k2) / k2, summed in rank order; CSR with ascending columns."""
        n = len(first)
        out_ptr, out_cols, out_vals = [np.zeros(1, np.int64)], [], []
        step = max(1, (1 << 22) // max(1, k2 * int(np.diff(ptr).max(initial=1))))
        for a in range(0, n, step):
            rows = np.arange(a, min(n, a + step))
            src = first[rows].ravel()  # rank order within each row
            lens = np.diff(ptr)[src]
            owner = np.repeat(np.repeat(rows, k2), lens)
            at = np.repeat(ptr[src], lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
            key = owner * n + cols[at]
            order = np.argsort(key, kind="stable")  # by (row, column), rank order kept
            key, v = key[order], vals[at][order]
            uniq, counts = np.unique(key, return_counts=True)
            sums = segment_sums(v, counts) / k2
            r, c = np.divmod(uniq, n)
            out_ptr.append(np.cumsum(np.bincount(r - a, minlength=len(rows))) + out_ptr[-1][-1])
            out_cols.append(c)
            out_vals.append(sums)
        return np.concatenate(out_ptr), np.concatenate(out_cols), np.concatenate(out_vals)

    def strip(self, q0: int, q1: int) -> np.ndarray:
        """Final distances (q1 - q0, G), float64; ``q0`` on the query tile grid."""
        tg = check_tile(self.tile)[1]
        c_start = self.nq // tg * tg  # the gallery's first tile starts on the N x N grid
        tq = check_tile(self.tile)[0]
        r1 = min(self.n, q0 + -(-(q1 - q0) // tq) * tq)  # whole tiles: the last query tile may hold gallery rows
        xq = self.cached[q0:r1] if self.cached is not None else self.x.read_rows(q0, r1)
        out = np.empty((q1 - q0, self.ng), dtype=np.float64)
        for c0 in range(c_start, self.n, self.step):
            c1 = min(self.n, c0 + self.step)
            xc = self.cached[c0:c1] if self.cached is not None else self.x.read_rows(c0, c1)
            d = grid_distances(xq, q0, xc, c0, tile=self.tile, device=self.device)
            lo = max(c0, self.nq)
            out[:, lo - self.nq : c1 - self.nq] = d[: q1 - q0, lo - c0 :]
        out /= self.m[q0:q1, None]
        qrow, g, t = self._overlaps(q0, q1)
        pair_original = out[qrow, g]
        out *= self.lambda_  # combine(1.0, out): the Jaccard distance of pairs with disjoint supports is 1
        out += 1.0 * (1 - self.lambda_)
        out[qrow, g] = combine(1 - t / (2 - t), pair_original, self.lambda_)
        return out

    def _overlaps(self, q0: int, q1: int):
        """(query row in block, gallery index, t) for every pair whose V' supports meet; t summed in ascending k."""
        ptr, cols, vals = self.ptr, self.cols, self.vals
        lens = np.diff(ptr)[q0:q1]
        qrow = np.repeat(np.arange(q1 - q0), lens)
        at = np.repeat(ptr[q0:q1], lens) + np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        k, vq = cols[at], vals[at]
        glen = np.diff(self.inv_ptr)[k]
        t_q = np.repeat(qrow, glen)
        t_at = np.repeat(self.inv_ptr[k], glen) + np.arange(glen.sum()) - np.repeat(np.cumsum(glen) - glen, glen)
        t_g = self.inv_rows[t_at]
        term = np.minimum(np.repeat(vq, glen), self.inv_vals[t_at])
        key = t_q * self.ng + t_g
        order = np.argsort(key, kind="stable")  # by (query, gallery), ascending k kept
        uniq, counts = np.unique(key[order], return_counts=True)
        t = segment_sums(term[order], counts)
        r, gg = np.divmod(uniq, self.ng)
        return r, gg, t
