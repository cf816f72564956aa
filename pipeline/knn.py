"""Exact blockwise k-nearest-neighbour graph over a feature dictionary.

Pure functions over numpy arrays; the caller streams blocks from storage. The
order of calls (``knn_graph`` runs it in memory) is:

1. for every query block, ``knn_rows`` streams the base blocks and returns the
   stored graph rows sigma_i[0:K] (self first) and C_i;
2. the pseudo-label miner may later ask for exact ranks of pending (j, i)
   pairs: sum ``exact_ranks`` over every base block and add 1.

Similarity is defined once, here: ``s_ij`` is the float64 dot product of the
float64-upcast rows, summed in a fixed order (products padded with zeros to a
power-of-two length, then summed as a balanced tree), so that it is a pure
function of the two rows. BLAS dgemm is not: for float32 data it rounds the
same pair differently depending on the shapes of the operands, which would make
the graph depend on the blocking. For float16 rows whose norms multiply to less
than 16 every summation order is exact (every partial sum is a multiple of
2**-48 below 2**5), so dgemm is used there and gives the very same values.

Float32 BLAS only proposes candidates; every similarity that decides an order,
a threshold or a rank is the exact value above. Float32 values are trusted only
outside a proven error band (``_slack``); whatever falls inside it is rescored.
"""

from __future__ import annotations

import faiss
import numpy as np

from wildreid.core.errors import ConfigError, StoreError

__all__ = [
    "check_features",
    "exact_ranks",
    "knn_graph",
    "knn_rows",
    "pair_similarity",
    "TEMP_ELEMENTS",
    "similarity",
    "topk_pairs",
    "validate_rows",
    "with_self_first",
]

# Elements in one temporary array (32 MiB of float64) unless the caller passes ``temp``: a memory
# budget (wildreid.mining's plan) passes its own to every call it makes.
TEMP_ELEMENTS = 1 << 22


# ---------------------------------------------------------------- validation


def check_features(
    block: np.ndarray, ids: np.ndarray | None = None, *, what: str = "feature", temp: int = TEMP_ELEMENTS
) -> np.ndarray:
    """Float64 row norms of a (n, D) float block; StoreError naming the first NaN/inf or zero row.

    ``ids`` (global row ids of the block) only make the message point at the right row.
    """
    block = np.asarray(block)
    if block.ndim != 2 or not np.issubdtype(block.dtype, np.floating):
        raise StoreError(f"expected a 2-D float {what} block, found shape {block.shape} and dtype {block.dtype}")
    finite = np.empty(len(block), dtype=bool)
    norms = np.zeros(len(block))
    step = max(1, temp // max(1, block.shape[1]))  # float64 copies of a few rows at a time
    for r0 in range(0, len(block), step):
        x = block[r0 : r0 + step].astype(np.float64)
        finite[r0 : r0 + step] = np.isfinite(x).all(axis=1)
        norms[r0 : r0 + step] = np.sqrt(np.einsum("ij,ij->i", x, x))
    for bad, reason in ((~finite, "has NaN or inf values"), (finite & (norms == 0), "is all zeros")):
        if bad.any():
            r = int(np.argmax(bad))
            row = int(ids[r]) if ids is not None else r
            raise StoreError(
                f"{what} row {row} {reason}; expected an L2-normalised row: re-extract the features of that image"
            )
    return norms


def validate_rows(block: np.ndarray, ids: np.ndarray | None = None, *, what: str = "feature") -> None:
    """The checks of ``check_features`` without computing norms: cheap enough for rows seen before."""
    block = np.asarray(block)
    if (
        block.ndim != 2
        or not np.issubdtype(block.dtype, np.floating)
        or not (np.isfinite(block).all() and (block != 0).any(axis=1).all())
    ):
        check_features(block, ids, what=what)  # finds the bad row and says which


def _ids(ids, n: int, name: str) -> np.ndarray:
    out = np.asarray(ids)
    if out.shape != (n,) or not np.issubdtype(out.dtype, np.integer):
        raise ConfigError(f"expected {name} to be {n} integer ids, found shape {out.shape} and dtype {out.dtype}")
    return out.astype(np.int64, copy=False)


def _same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise StoreError(f"expected two (n, D) blocks with the same D, found shapes {a.shape} and {b.shape}")


# ---------------------------------------------------------- exact similarity


def _norms(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def _order_free(a: np.ndarray, b: np.ndarray) -> bool:
    """True when every summation order gives the exact dot product (see the module docstring)."""
    if a.dtype != np.float16 or b.dtype != np.float16 or not len(a) or not len(b):
        return False
    return float(_norms(a).max()) * float(_norms(b).max()) < 16.0


def _tree_dot(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Dot products over the last axis of broadcast float64 x * y, in the fixed tree order."""
    d = x.shape[-1]
    width = 1 << max(d - 1, 0).bit_length()
    p = np.zeros(np.broadcast_shapes(x.shape[:-1], y.shape[:-1]) + (width,))
    np.multiply(x, y, out=p[..., :d])
    while width > 1:
        width //= 2
        np.add(p[..., :width], p[..., width : 2 * width], out=p[..., :width])
    return p[..., 0].copy()


def similarity(a: np.ndarray, b: np.ndarray, *, temp: int = TEMP_ELEMENTS) -> np.ndarray:
    """s = a . b^T as float64 (len(a), len(b)), the same bits for a pair whatever the blocks."""
    a, b = np.asarray(a), np.asarray(b)
    _same_dim(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if _order_free(a, b):
        return a64 @ b64.T
    out = np.empty((len(a), len(b)))
    step_b = max(1, temp // max(1, 2 * a.shape[1]))
    for c0 in range(0, len(b), step_b):
        bc = b64[c0 : c0 + step_b]
        step_a = max(1, temp // max(1, 2 * a.shape[1] * len(bc)))
        for r0 in range(0, len(a), step_a):
            out[r0 : r0 + step_a, c0 : c0 + step_b] = _tree_dot(a64[r0 : r0 + step_a, None, :], bc[None, :, :])
    return out


def _pairs(
    a: np.ndarray, ra: np.ndarray, b: np.ndarray, rb: np.ndarray, *, free: bool | None = None, temp: int = TEMP_ELEMENTS
) -> np.ndarray:
    """Exact s(a[ra[p]], b[rb[p]]) for every p, gathered chunk by chunk.

    ``free`` says whether every summation order is exact for these rows (see the
    module docstring); callers that know bounds on the norms pass it, so that a
    large block is not scanned for its norms once per call.
    """
    out = np.empty(len(ra))
    if len(ra) > 4 * len(a) and (_order_free(a, b) if free is None else free):
        # Every summation order is exact here, so one matrix-vector product per row of a
        # (BLAS on one float64 copy of each block) gives the very same bits.
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        order = np.argsort(ra, kind="stable")
        starts = np.flatnonzero(np.r_[True, np.diff(ra[order]) != 0])
        for lo, hi in zip(starts, np.r_[starts[1:], len(order)]):
            p = order[lo:hi]
            out[p] = b64[rb[p]] @ a64[ra[p[0]]]
        return out
    step = max(1, temp // max(1, 2 * a.shape[1]))
    for p0 in range(0, len(ra), step):
        x, y = a[ra[p0 : p0 + step]], b[rb[p0 : p0 + step]]
        exact_any_order = _order_free(x, y) if free is None else free
        x, y = x.astype(np.float64), y.astype(np.float64)
        out[p0 : p0 + step] = np.einsum("ij,ij->i", x, y) if exact_any_order else _tree_dot(x, y)
    return out


def pair_similarity(a: np.ndarray, b: np.ndarray, *, temp: int = TEMP_ELEMENTS) -> np.ndarray:
    """s(a[p], b[p]) for aligned rows, bit-identical to ``similarity``; use it for s_ii."""
    a, b = np.asarray(a), np.asarray(b)
    _same_dim(a, b)
    if len(a) != len(b):
        raise ConfigError(f"expected as many rows in a as in b, found {len(a)} and {len(b)}")
    rows = np.arange(len(a))
    return _pairs(a, rows, b, rows, temp=temp)


def _slack(d: int, na: np.ndarray, nb_max: float) -> np.ndarray:
    """Upper bound of |float32 BLAS dot - exact float64 dot| per query row.

    sgemm in any order (FMA included) is within D*2^-24 * |a||b| of the real dot
    product; rounding float64 inputs to float32 adds 2*2^-24 and the exact
    kernel itself is within D*2^-53; the absolute term covers underflow.
    """
    rel = 1.01 * ((d + 4) * 2.0**-24 + (d + 4) * 2.0**-53)
    return rel * na * nb_max + d * 2.0**-100


def _floor32(x: np.ndarray) -> np.ndarray:
    """Largest float32 <= x, so that float32 s > x  <=>  s > _floor32(x)."""
    t = np.asarray(x, np.float64).astype(np.float32)
    return np.where(t.astype(np.float64) > x, np.nextafter(t, np.float32(-np.inf)), t)


def _ceil32(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= x, so that float32 s >= x  <=>  s >= _ceil32(x)."""
    t = np.asarray(x, np.float64).astype(np.float32)
    return np.where(t.astype(np.float64) < x, np.nextafter(t, np.float32(np.inf)), t)


# ------------------------------------------------------------------ top-k


def topk_pairs(n_rows: int, r: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int):
    """(sim desc, id asc) top-k per row of a (row, sim, id) list; -inf / -1 padding."""
    out_sim = np.full((n_rows, k), -np.inf)
    out_idx = np.full((n_rows, k), -1, dtype=np.int64)
    order = np.lexsort((ids, -sims, r))
    r, sims, ids = r[order], sims[order], ids[order]
    rank = np.arange(len(r)) - np.searchsorted(r, r, side="left")
    keep = rank < k
    out_sim[r[keep], rank[keep]] = sims[keep]
    out_idx[r[keep], rank[keep]] = ids[keep]
    return out_sim, out_idx


def _topk_matrix(sims: np.ndarray, ids: np.ndarray, k: int):
    """(sim desc, id asc) top-k of every row of (B, W) candidates; missing ones are -inf / -1."""
    order = np.lexsort((ids, -sims), axis=-1)[:, :k]
    out_sim = np.take_along_axis(sims, order, axis=1)
    out_idx = np.where(np.isfinite(out_sim), np.take_along_axis(ids, order, axis=1), -1)
    if out_sim.shape[1] < k:
        pad = k - out_sim.shape[1]
        out_sim = np.pad(out_sim, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_idx = np.pad(out_idx, ((0, 0), (0, pad)), constant_values=-1)
    return out_sim, out_idx


def _contiguous(ids: np.ndarray) -> bool:
    """True for ids start, start + 1, ...: stored blocks are ranges, and lookups into them are subtractions."""
    return len(ids) > 0 and int(ids[-1]) - int(ids[0]) == len(ids) - 1 and bool(np.all(np.diff(ids) == 1))


def _locate(ids: np.ndarray, wanted: np.ndarray):
    """(positions in ``wanted``, positions in ``ids``) of every wanted id that ``ids`` holds."""
    if _contiguous(ids):
        hit = (wanted >= ids[0]) & (wanted <= ids[-1])
        where = np.nonzero(hit)
        return where, wanted[where] - ids[0]
    order = np.argsort(ids, kind="stable")
    pos = np.minimum(np.searchsorted(ids[order], wanted), max(len(ids) - 1, 0))
    where = np.nonzero((wanted >= 0) & (ids[order][pos] == wanted)) if len(ids) else np.nonzero(wanted < -1)
    return where, order[pos[where]]


def _self_mask(query_ids: np.ndarray, base_ids: np.ndarray):
    """(rows, cols) where a query row meets its own id in the base block."""
    (rows,), cols = _locate(base_ids, query_ids)
    return rows, cols


def with_self_first(rows, sim, idx, self_sim, *, width: int | None = None):
    """Graph rows sigma_i[0:width]: (rows, self_sim) first, then the merged others.

    ``width`` defaults to ``1 + idx.shape[1]``; ``self_sim`` is best ``pair_similarity(x, x)``
    (s_ii, stored for completeness: nothing downstream orders by it).
    """
    rows = _ids(rows, len(idx), "rows")
    width = idx.shape[1] + 1 if width is None else width
    out_idx = np.concatenate([rows[:, None], np.asarray(idx, np.int64)], axis=1)[:, :width]
    out_sim = np.concatenate([np.asarray(self_sim, np.float64)[:, None], sim], axis=1)[:, :width]
    return out_sim, out_idx


def exact_ranks(j_vectors, i_ids, s_ji, base, base_ids, j_ids, *, chunk: int | None = None) -> np.ndarray:
    """Per pending pair p = (j, i): #{r in this base block, r != j : s_jr > s_ji or (s_jr == s_ji and r < i)}.

    ``j_vectors`` (P, D) are the rows of j (aligned with the pairs), ``s_ji`` the exact
    similarities (from the graph). Summed over all base blocks, plus 1, this is the
    rank of i in sigma_j. Float32 BLAS settles every base row outside the error band;
    rows inside it are compared with exact values.
    """
    j_vectors, base = np.asarray(j_vectors), np.asarray(base)
    _same_dim(j_vectors, base)
    n_p = len(j_vectors)
    i_ids, j_ids = _ids(i_ids, n_p, "i_ids"), _ids(j_ids, n_p, "j_ids")
    bids = _ids(base_ids, len(base), "base_ids")
    s_ji = np.asarray(s_ji, np.float64)
    if s_ji.shape != (n_p,):
        raise ConfigError(f"expected {n_p} similarities s_ji, found shape {s_ji.shape}")
    out = np.zeros(n_p, dtype=np.int64)
    if n_p == 0 or len(base) == 0:
        return out
    temp = chunk or TEMP_ELEMENTS
    bn = check_features(base, bids, what="base", temp=temp)
    base32 = np.asarray(base, dtype=np.float32)
    uniq, first, group = np.unique(j_ids, return_index=True, return_inverse=True)
    vecs = j_vectors[first]
    eps = _slack(base.shape[1], check_features(vecs, uniq, what="query", temp=temp), float(bn.max()))
    by_group = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[by_group], np.arange(len(uniq) + 1))
    rows_per = max(1, temp // len(base))
    for g0 in range(0, len(uniq), rows_per):
        g1 = min(g0 + rows_per, len(uniq))
        scores = vecs[g0:g1].astype(np.float32) @ base32.T
        sr, sc = _self_mask(uniq[g0:g1], bids)
        scores[sr, sc] = -np.inf
        pairs = by_group[starts[g0] : starts[g1]]
        for p0 in range(0, len(pairs), rows_per):
            p = pairs[p0 : p0 + rows_per]
            g = group[p] - g0
            rows = scores[g]
            hi = _floor32(s_ji[p] + eps[group[p]])
            lo = _ceil32(s_ji[p] - eps[group[p]])
            out[p] = np.count_nonzero(rows > hi[:, None], axis=1)
            br, bc = np.nonzero((rows >= lo[:, None]) & (rows <= hi[:, None]))
            exact = _pairs(vecs, group[p][br], base, bc, temp=temp)
            s, i = s_ji[p][br], i_ids[p][br]
            ahead = (exact > s) | ((exact == s) & (bids[bc] < i))
            out[p] += np.bincount(br, weights=ahead, minlength=len(p)).astype(np.int64)
    return out


def _passes(base_blocks, dtype=None):
    """A fresh iterator over the base blocks for every pass: a callable is called with the dtype the pass
    computes in (None: as stored), so a reader can convert while it copies; a sequence is re-iterated."""
    return base_blocks(dtype) if callable(base_blocks) else iter(base_blocks)


def _threshold_count(query, base, scores, eps, threshold, free=None, temp: int = TEMP_ELEMENTS) -> np.ndarray:
    """#{base rows with exact s >= t} per query row: float32 settles all but the error band."""
    hi, lo = _floor32(threshold + eps), _ceil32(threshold - eps)
    count = np.count_nonzero(scores > hi[:, None], axis=1).astype(np.int64)
    r, c = np.nonzero((scores >= lo[:, None]) & (scores <= hi[:, None]))
    exact = _pairs(query, r, base, c, free=free, temp=temp)
    return count + np.bincount(r, weights=exact >= threshold, minlength=len(query)).astype(np.int64)


def knn_rows(
    query,
    query_ids,
    base_blocks,
    k: int,
    *,
    threshold: float,
    margin: int = 16,
    stored_dtype=None,
    temp: int = TEMP_ELEMENTS,
    self_in_base: bool = True,
):
    """Graph rows sigma_i[0:k] and C_i of one query block against the whole dictionary.

    The one blockwise exact top-k of wildreid: mining calls it for graph rows (the query
    rows are rows of the base: self first, then the k - 1 others); search calls it with
    ``self_in_base=False`` (queries apart from the gallery: the top k of the base, ids
    naming the query rows in errors only) and ``threshold=inf`` (no counts needed).

    ``base_blocks`` gives ``(base_ids, base)`` blocks covering the dictionary once:
    a sequence, or a callable ``(dtype) -> iterator`` (streamed from storage) that may
    hand the rows over already converted to ``dtype`` (float32 for FAISS, float64 for
    the rescoring; conversions of stored values are exact). ``stored_dtype`` is then
    the dtype the rows are stored in, which decides whether BLAS is exact (float16).
    A block may live in a buffer the next block reuses: each is used before the next.

    1. FAISS's fused search proposes the float32 top-(k-1+margin) others of every
       row, block by block, merged in a FAISS heap;
    2. a second stream computes the exact similarity of those candidates only;
    3. rows whose boundary float32 cannot settle (a non-candidate within the error
       band of the k-th exact value) get an exact pass of their own;
    4. C_i comes from the graph row when its last entry is below t (then every row
       with s >= t is in it); rows whose whole graph row is >= t are counted in an
       exact pass of their own (the dense regime).
    Returns ``(sim (B, k), idx (B, k), counts (B,))``.
    """
    query = np.asarray(query)
    if int(k) != k or k < 1 or margin < 0:
        raise ConfigError(f"expected k >= 1 and margin >= 0, found k={k} and margin={margin}")
    named = _ids(query_ids, len(query), "query_ids")
    qn = check_features(query, named, what="query", temp=temp)
    qids = named if self_in_base else np.full(len(query), -1, dtype=np.int64)  # -1: no base row is the query
    n_q, others_k, dim = len(query), int(k) - (1 if self_in_base else 0), query.shape[1]
    q32 = np.ascontiguousarray(query, dtype=np.float32)
    width = others_k + margin
    heap = faiss.ResultHeap(n_q, max(width, 1), keep_max=True)
    base_max, total, self_seen = 0.0, 0, np.zeros(n_q, dtype=np.int64)
    base_dtype = np.dtype(np.float64)
    for base_ids, base in _passes(base_blocks, np.float32):
        base = np.asarray(base)
        _same_dim(query, base)
        bids = _ids(base_ids, len(base), "base_ids")
        base_dtype = base.dtype if total == 0 or base.dtype == base_dtype else np.dtype(np.float64)
        b32 = np.ascontiguousarray(base, dtype=np.float32)
        # Rows are validated in their own query block; here only the largest norm is needed (for the
        # error band), from float32 with a relative margin far above its rounding error.
        norm = float(np.sqrt(np.einsum("ij,ij->i", b32, b32).max()) * (1 + dim * 2.0**-22)) if len(b32) else 0.0
        if not np.isfinite(norm):
            check_features(base, bids, what="base", temp=temp)  # names the bad row
        base_max, total = max(base_max, norm), total + len(base)
        self_r, _ = _self_mask(qids, bids)
        self_seen[self_r] += 1
        if others_k and len(base):
            found_d, found_i = faiss.knn(q32, b32, min(width + 1, len(base)), metric=faiss.METRIC_INNER_PRODUCT)
            ids = np.where(found_i >= 0, bids[np.maximum(found_i, 0)], -1)
            found_d = np.where((ids == qids[:, None]) | (ids < 0), -np.inf, found_d).astype(np.float32)
            heap.add_result(found_d, np.where(np.isfinite(found_d), ids, -1))
    sim = np.full((n_q, others_k), -np.inf)
    idx = np.full((n_q, others_k), -1, dtype=np.int64)
    eps = _slack(dim, qn, base_max)
    # every summation order exact for these rows (blocks may arrive converted from float16)
    stored = np.dtype(stored_dtype) if stored_dtype is not None else base_dtype
    free = query.dtype == np.float16 and stored == np.float16 and float(qn.max()) * base_max < 16.0
    if others_k and total:
        heap.finalize()
        cand, f32 = heap.I, heap.D.astype(np.float64)
        exact = np.full(cand.shape, -np.inf)
        for base_ids, base in _passes(base_blocks, np.float64 if free else None):
            (r, slot), pos = _locate(np.asarray(base_ids, dtype=np.int64), cand)
            exact[r, slot] = _pairs(query, r, np.asarray(base), pos, free=free, temp=temp)
        sim, idx = _topk_matrix(exact, cand, others_k)
        # a row is unsafe when a non-candidate (float32 <= the last candidate's) may reach the k-th exact value
        last = np.where(cand[:, -1] >= 0, f32[:, -1], -np.inf)
        unsafe = np.flatnonzero((total - self_seen > width) & (last + eps >= sim[:, -1]))
        if len(unsafe):
            sim[unsafe], idx[unsafe] = _exact_rows(
                query, qids, unsafe, base_blocks, sim[unsafe, -1] - eps[unsafe], others_k, free, temp
            )
    count = 1 + np.count_nonzero(sim >= threshold, axis=1)
    dense = np.flatnonzero(sim[:, -1] >= threshold) if others_k else np.arange(n_q)
    if len(dense):
        count[dense] = 1
        for base_ids, base in _passes(base_blocks, np.float32):
            base, bids = np.asarray(base), np.asarray(base_ids, dtype=np.int64)
            b32 = np.asarray(base, dtype=np.float32)
            step = max(1, temp // max(1, len(base)))  # bounded score matrices
            for r0 in range(0, len(dense), step):
                rows = dense[r0 : r0 + step]
                scores = q32[rows] @ b32.T
                self_r, self_c = _self_mask(qids[rows], bids)
                scores[self_r, self_c] = -np.inf
                count[rows] += _threshold_count(query[rows], base, scores, eps[rows], threshold, free, temp)
    if self_in_base:
        sim, idx = with_self_first(qids, sim, idx, pair_similarity(query, query, temp=temp))
    return sim, idx, count


def _exact_rows(query, qids, rows, base_blocks, cut, k, free=None, temp: int = TEMP_ELEMENTS):
    """Exact top-k others of ``rows`` among every base row whose float32 score reaches ``cut``."""
    q32 = query[rows].astype(np.float32)
    cut = _ceil32(cut)
    found_r, sims, ids = [], [], []
    for base_ids, base in _passes(base_blocks, np.float32):
        base, bids = np.asarray(base), np.asarray(base_ids, dtype=np.int64)
        b32 = np.asarray(base, dtype=np.float32)
        step = max(1, temp // max(1, len(base)))  # bounded score matrices
        for r0 in range(0, len(rows), step):
            scores = q32[r0 : r0 + step] @ b32.T
            self_r, self_c = _self_mask(qids[rows[r0 : r0 + step]], bids)
            scores[self_r, self_c] = -np.inf
            rr, cc = np.nonzero(scores >= cut[r0 : r0 + step, None])
            found_r.append(rr + r0)
            sims.append(_pairs(query, rows[rr + r0], base, cc, free=free, temp=temp))
            ids.append(bids[cc])
    return topk_pairs(len(rows), np.concatenate(found_r), np.concatenate(sims), np.concatenate(ids), k)


def knn_graph(features, k: int, *, threshold: float, block_rows: int = 1024, block_base: int = 4096, margin: int = 16):
    """In-memory driver (and the reference call order): graph rows sigma_i[0:k] and C_i.

    Returns ``(sim (N, k) float64, idx (N, k) int64, counts (N,) int64)`` with self
    first in every row, -1 / -inf padding when k > N, and counts = C_i =
    1 + #{j != i : s_ij >= threshold}.
    """
    features = np.asarray(features)
    if int(k) != k or k < 1 or block_rows < 1 or block_base < 1:
        raise ConfigError(f"expected k, block_rows, block_base >= 1, found {k}, {block_rows}, {block_base}")
    n = len(features)
    check_features(features)
    blocks = [
        (np.arange(b0, min(b0 + block_base, n)), features[b0 : b0 + block_base]) for b0 in range(0, n, block_base)
    ]
    sims, idxs, counts = [], [], []
    for q0 in range(0, n, block_rows):
        q, qids = features[q0 : q0 + block_rows], np.arange(q0, min(q0 + block_rows, n))
        sim, idx, count = knn_rows(q, qids, blocks, k, threshold=threshold, margin=margin)
        sims.append(sim)
        idxs.append(idx)
        counts.append(count)
    if not sims:
        return np.zeros((0, k)), np.zeros((0, k), np.int64), np.zeros(0, np.int64)
    return np.concatenate(sims), np.concatenate(idxs), np.concatenate(counts)
