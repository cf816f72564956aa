"""Exact Re-ID evaluation (mAP, mINP, CMC) without a query x gallery matrix.

Protocol (Market-1501 / VeRi / VeRi-Wild): for each query, gallery rows of the
same vehicle id *and* the same camera are junk and removed; the true matches
are the same id seen by another camera. The rest of the gallery is ranked by
distance, ascending, ties by ascending gallery index. A query without a true
match is skipped and counted. Id -1 means "unknown": it never matches, so such
queries are skipped and such gallery rows are distractors.

Distances are ``wildreid.distances.grid_distances`` (its docstring defines them).

Blockwise evaluation holds one strip of ``bq`` queries x the gallery (``bq``
follows the memory budget). Per strip, the distances of each query to its
true matches are the thresholds; the matches and the junk are set to +inf;
``count_preceding`` counts, for every threshold, the strip entries ranked
before it, with a per-row lookup table over the float bits (no sort, no
per-element search). Rank of the k-th match (k from 0) is 1 + k + that count.

Camera normalisation (``camera_norm``, off by default: the standard protocol
is without it): every query and gallery feature has the mean feature of its
camera subtracted (each camera's mean over the query and gallery rows it took,
no labels used) and is L2-normalised again. Features learnt without labels
carry much of each camera's look (background, light), so a camera's own
images crowd each query's ranking; removing the per-camera mean is the
test-time part of camera-based normalisation (Zhuang et al., ECCV 2020).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from wildreid.camera import camera_means, camera_normalise
from wildreid.core.durable import atomic_write
from wildreid.core.errors import ConfigError, StoreError
from wildreid.distances import (
    COUNT_CHUNK,
    TILE,
    check_tile,
    grid_distances,
    plan_query_rows,
    squared_norms,
)
from wildreid.rerank import ReRanker, rerank_dense
from wildreid.shards.reader import split_entry
from wildreid.stores.groups import open_group
from wildreid.stores.rows import ArrayRows, Rows, as_rows

__all__ = [
    "CameraNormalised",
    "camera_means",
    "camera_normalise",
    "count_preceding",
    "evaluate_blockwise",
    "evaluate_dense",
    "evaluate_distances",
    "evaluate_groups",
    "metrics_from_ranks",
    "per_query_metrics",
    "topk_lists",
    "write_results",
]

MAX_RANK = 50  # length of the CMC curve kept in the results
_LUT_WIDTH = 1 << 11  # buckets per query row in count_preceding's lookup table
_COUNT_ROWS = 16  # query rows per counting step: their tables stay in cache


class CameraNormalised(Rows):
    """The rows of another source camera-normalised (``camera_normalise``) as read, float32."""

    dtype = np.dtype(np.float32)

    def __init__(self, source: Rows, cams: np.ndarray, means: dict[int, np.ndarray]):
        self.source, self.cams, self.means = source, np.asarray(cams), means

    def count(self) -> int:
        return self.source.count()

    def dim(self) -> int:
        return self.source.dim()

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        rows = camera_normalise(self.source.read_rows(start, stop), self.cams[start:stop], self.means)
        if out is None:
            return rows
        out[...] = rows
        return out


def _camera_normalised(query, gallery, q_cams, g_cams) -> tuple[Rows, Rows]:
    query, gallery = as_rows(query), as_rows(gallery)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    means = camera_means([(query, q_cams), (gallery, g_cams)])
    return CameraNormalised(query, q_cams, means), CameraNormalised(gallery, g_cams, means)


# --------------------------------------------------------------------------- who matches whom


def _labels(values, n: int, name: str) -> np.ndarray:
    out = np.asarray(values)
    if out.shape != (n,) or not np.issubdtype(out.dtype, np.integer):
        raise ConfigError(f"expected {name} to be {n} integers, found shape {out.shape} and dtype {out.dtype}")
    return out.astype(np.int64, copy=False)


class _Gallery:
    """Gallery rows grouped by vehicle id once (stable sort), so a query finds its id's rows by search."""

    def __init__(self, ids: np.ndarray, cams: np.ndarray):
        self.ids, self.cams = ids, cams
        self.order = np.argsort(ids, kind="stable")
        self.sorted_ids = ids[self.order]

    def same_id(self, q_ids: np.ndarray):
        """(row in q_ids, gallery index) of every gallery row sharing the query's id; rows, then index ascending."""
        lo = np.searchsorted(self.sorted_ids, q_ids, side="left")
        hi = np.searchsorted(self.sorted_ids, q_ids, side="right")
        hi = np.where(q_ids < 0, lo, hi)  # -1 never matches
        n = hi - lo
        rows = np.repeat(np.arange(len(q_ids)), n)
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        return rows, self.order[np.repeat(lo, n) + within]


def same_camera(g_cams: np.ndarray, q_cams) -> np.ndarray:
    """True where a gallery image comes from the query's camera: the protocol's junk among true matches.
    Camera -1 is unknown (images of one's own data without ``--camera-from``), never the same camera, so
    such data keep their matches instead of losing every one of them as junk."""
    return (g_cams == q_cams) & (np.asarray(q_cams) >= 0)


def match_lists(gallery: _Gallery, q_ids: np.ndarray, q_cams: np.ndarray):
    """((rows, cols) of true matches, (rows, cols) of junk) of a block of queries, cols = gallery indices."""
    rows, cols = gallery.same_id(q_ids)
    junk = same_camera(gallery.cams[cols], q_cams[rows])
    return (rows[~junk], cols[~junk]), (rows[junk], cols[junk])


# --------------------------------------------------------------------------- counting


def _bits(values: np.ndarray) -> np.ndarray:
    """Integers ordered like the non-negative floats ``values`` (their IEEE bit patterns)."""
    return values.view(np.int32 if values.dtype == np.float32 else np.int64)


def _lookup_table(tb: np.ndarray, n_thr: np.ndarray, width: int):
    """Shift, per-row origin/last bucket/table offset and the table of ``count_preceding`` (pure; see there).

    One shift s for all rows (the smallest that fits every row's thresholds in ``width`` buckets);
    row r's buckets are lo_r-1 .. hi_r+1 (lo_r, hi_r: buckets of its first and last threshold), so
    a value's local bucket is ``(bits >> s) - (origin_r >> s)`` clipped to 0 .. w_r-1.
    """
    bq, m = tb.shape
    real = np.arange(m)[None, :] < n_thr[:, None]
    lo = np.where(n_thr > 0, tb[:, 0], 0)
    hi = np.where(n_thr > 0, tb[np.arange(bq), np.maximum(n_thr - 1, 0)], 0)
    shift = 0
    while ((hi >> shift) - (lo >> shift) + 3 > width).any():
        shift += 1
    lo_b, hi_b = lo >> shift, hi >> shift
    w = hi_b - lo_b + 3
    offset = np.cumsum(w) - w
    row = np.repeat(np.arange(bq), w)
    local = np.arange(w.sum()) - offset[row]
    tr, tk = np.nonzero(real)  # thresholds as sorted keys row * width + local bucket
    tkey = tr * width + ((tb[tr, tk] >> shift) - lo_b[tr] + 1)
    key = row * width + local
    pos = np.searchsorted(tkey, key, side="left")
    below = pos - np.searchsorted(tkey, row * width, side="left")  # thresholds in lower buckets
    hit = np.zeros(len(key), dtype=bool)
    inside = pos < len(tkey)
    hit[inside] = tkey[pos[inside]] == key[inside]
    table = np.where(hit, -1, row * (m + 1) + below)  # -1: the bucket holds a threshold, compare exactly
    return shift, (lo_b - 1) << shift, w - 1, offset, table


def count_preceding(
    strip: np.ndarray,
    thr_val: np.ndarray,
    thr_idx: np.ndarray,
    n_thr: np.ndarray,
    *,
    col0: int = 0,
    chunk: int | None = None,
) -> np.ndarray:
    """cnt[r, k] = #{j : (strip[r, j], col0 + j) < (thr_val[r, k], thr_idx[r, k])}, for k < n_thr[r].

    ``strip`` holds non-negative float32/64 values; each row's thresholds are sorted by (value, index)
    and padded after ``n_thr[r]`` (padding counts are meaningless); no strip entry may carry a
    threshold's own (value, index): set those entries to +inf first. Each strip element gets the number
    c of thresholds before it from a per-row lookup table over the high bits of its value; elements
    whose bucket holds a threshold are compared exactly (value, then index). cnt is the cumulative
    histogram of c.
    """
    bq, m = thr_val.shape
    if m == 0 or strip.shape[1] == 0:
        return np.zeros((bq, m), dtype=np.int64)
    thr_val = np.ascontiguousarray(thr_val, dtype=strip.dtype)
    pad_val = np.where(np.arange(m)[None, :] < n_thr[:, None], thr_val, np.inf)
    hist = np.zeros((bq, m + 1), dtype=np.int64)
    rows = min(bq, _COUNT_ROWS)
    cw = max(1, (chunk or COUNT_CHUNK) // rows)
    for r0 in range(0, bq, rows):
        r1 = min(bq, r0 + rows)
        shift, origin, last, offset, table = _lookup_table(
            _bits(thr_val[r0:r1]).astype(np.int64), n_thr[r0:r1], _LUT_WIDTH
        )
        itype = np.int32 if strip.dtype == np.float32 else np.int64  # int32 arithmetic is about 4x faster
        origin, last = (origin >> shift).astype(itype)[:, None], last.astype(itype)[:, None]
        offset = offset[:, None]
        t = np.empty((r1 - r0, min(cw, strip.shape[1])), dtype=itype)
        index = np.empty(t.shape, dtype=np.int64)
        exact = table < 0
        per_bucket = np.zeros(len(table), dtype=np.int64)  # histogram over buckets: spreads the increments
        pv, pi = pad_val[r0:r1], thr_idx[r0:r1]
        for a in range(0, strip.shape[1], cw):
            block = strip[r0:r1, a : a + cw]
            tt, ii = t[:, : block.shape[1]], index[:, : block.shape[1]]
            np.right_shift(_bits(block), shift, out=tt)  # shift first: bits - origin could overflow
            np.subtract(tt, origin, out=tt)
            np.maximum(tt, 0, out=tt)
            np.minimum(tt, last, out=tt)
            np.add(tt, offset, out=ii)
            per_bucket += np.bincount(ii.ravel(), minlength=len(table))
            amb = np.flatnonzero(np.take(exact, ii, mode="clip"))
            if len(amb):
                r, c = np.divmod(amb, block.shape[1])
                v, j = block[r, c][:, None], (col0 + a + c)[:, None]
                before = (pv[r] < v) | ((pv[r] == v) & (pi[r] < j))
                hist[r0:r1] += np.bincount(r * (m + 1) + before.sum(axis=1), minlength=(r1 - r0) * (m + 1)).reshape(
                    r1 - r0, m + 1
                )
        trash = (r1 - r0) * (m + 1)  # buckets holding a threshold were counted exactly above
        mapped = np.bincount(np.where(exact, trash, table), weights=per_bucket, minlength=trash + 1)[:trash]
        hist[r0:r1] += mapped.astype(np.int64).reshape(r1 - r0, m + 1)
    return np.cumsum(hist, axis=1)[:, :m]


# --------------------------------------------------------------------------- metrics


def metrics_from_ranks(ranks: list[np.ndarray], skipped: int, *, max_rank: int = MAX_RANK) -> dict:
    """mAP, mINP and CMC from the 1-based ranks of each valid query's true matches (ascending)."""
    valid = len(ranks)
    if valid == 0:
        return {
            "mAP": 0.0,
            "mINP": 0.0,
            **{f"rank{r}": 0.0 for r in (1, 5, 10, 20)},
            "cmc": [0.0] * max_rank,
            "valid_queries": 0,
            "skipped_queries": int(skipped),
        }
    ap = np.array([np.mean(np.arange(1, len(r) + 1) / r) for r in ranks])
    inp = np.array([len(r) / r[-1] for r in ranks])
    first = np.array([r[0] for r in ranks])
    cmc = np.cumsum(np.bincount(np.minimum(first, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]) / valid
    return {
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        **{f"rank{r}": float(cmc[r - 1]) if r <= max_rank else float(np.mean(first <= r)) for r in (1, 5, 10, 20)},
        "cmc": [float(c) for c in cmc],
        "valid_queries": valid,
        "skipped_queries": int(skipped),
    }


def evaluate_distances(dist: np.ndarray, q_ids, q_cams, g_ids, g_cams, *, max_rank: int = MAX_RANK) -> dict:
    """The dense reference on a full (Q, G) distance matrix: stable argsort, junk removed, cumsum per query."""
    dist = np.asarray(dist)
    nq, ng = dist.shape
    q_ids, q_cams = _labels(q_ids, nq, "query ids"), _labels(q_cams, nq, "query camids")
    g_ids, g_cams = _labels(g_ids, ng, "gallery ids"), _labels(g_cams, ng, "gallery camids")
    aps, inps, firsts = [], [], []
    for i in range(nq):
        order = np.argsort(dist[i], kind="stable")
        same = (g_ids[order] == q_ids[i]) & (q_ids[i] >= 0)
        keep = ~(same & same_camera(g_cams[order], q_cams[i]))
        hits = same[keep].astype(np.float64)
        if not hits.any():
            continue
        cum = np.cumsum(hits)
        pos = np.flatnonzero(hits)
        aps.append(float(np.sum(cum[pos] / (pos + 1.0)) / len(pos)))
        inps.append(float(cum[pos[-1]] / (pos[-1] + 1.0)))
        firsts.append(int(pos[0]) + 1)
    valid = len(firsts)
    if valid == 0:
        return metrics_from_ranks([], nq, max_rank=max_rank)
    first = np.array(firsts)
    cmc = [float(np.mean(first <= r)) for r in range(1, max_rank + 1)]
    return {
        "mAP": float(np.mean(aps)),
        "mINP": float(np.mean(inps)),
        **{f"rank{r}": float(np.mean(first <= r)) for r in (1, 5, 10, 20)},
        "cmc": cmc,
        "valid_queries": valid,
        "skipped_queries": nq - valid,
    }


def per_query_metrics(dist: np.ndarray, q_ids, q_cams, g_ids, g_cams) -> tuple[np.ndarray, np.ndarray]:
    """(AP, rank-1 hit) of every query of a full (Q, G) distance matrix, the protocol of ``evaluate_distances``.

    Two float64 arrays of length Q; a query without a true match (skipped by the metrics) is NaN in both,
    so the arrays of two models on one query set stay aligned. ``np.nanmean`` of them gives mAP and rank-1.
    """
    dist = np.asarray(dist)
    if dist.ndim != 2:
        raise ConfigError(f"expected a (Q, G) distance matrix, found shape {dist.shape}")
    nq, ng = dist.shape
    q_ids, q_cams = _labels(q_ids, nq, "query ids"), _labels(q_cams, nq, "query camids")
    g_ids, g_cams = _labels(g_ids, ng, "gallery ids"), _labels(g_cams, ng, "gallery camids")
    ap, hit1 = np.full(nq, np.nan), np.full(nq, np.nan)
    for i in range(nq):
        order = np.argsort(dist[i], kind="stable")
        same = (g_ids[order] == q_ids[i]) & (q_ids[i] >= 0)
        hits = same[~(same & same_camera(g_cams[order], q_cams[i]))]
        pos = np.flatnonzero(hits)
        if len(pos):
            ap[i] = np.mean(np.arange(1, len(pos) + 1) / (pos + 1.0))
            hit1[i] = float(pos[0] == 0)
    return ap, hit1


def evaluate_dense(
    qf,
    q_ids,
    q_cams,
    gf,
    g_ids,
    g_cams,
    *,
    tile=TILE,
    device: str = "cpu",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    camera_norm: bool = False,
) -> dict:
    """The reference: the whole (Q, G) matrix of ``grid_distances`` (or ``rerank_dense``), then
    ``evaluate_distances``."""
    qf, gf = np.asarray(qf, np.float32), np.asarray(gf, np.float32)
    if camera_norm:
        means = camera_means([(ArrayRows(qf), np.asarray(q_cams)), (ArrayRows(gf), np.asarray(g_cams))])
        qf, gf = camera_normalise(qf, np.asarray(q_cams), means), camera_normalise(gf, np.asarray(g_cams), means)
    if rerank:
        dist = rerank_dense(qf, gf, k1, k2, lambda_, tile=tile, device=device)
    else:
        dist = grid_distances(qf, 0, gf, 0, tile=tile, device=device)
    return evaluate_distances(dist, q_ids, q_cams, g_ids, g_cams)


# --------------------------------------------------------------------------- blockwise


def _plain_strips(query: Rows, gallery: Rows, *, budget: int, tile, device: str, entry_bytes: int = 4):
    """(rows per strip, strip(q0, q1) -> float32 (q1-q0, G)); the gallery is kept in memory when it fits half
    the budget."""
    tq, tg = check_tile(tile)
    nq, ng, dim = query.count(), gallery.count(), gallery.dim()
    gallery_bytes = ng * dim * 4
    cached = gallery.read_rows(0, ng) if gallery_bytes <= budget // 2 else None
    cached_norms = squared_norms(cached) if cached is not None else None
    read_rows = max(tg, (budget // 8) // max(1, dim * 4) // tg * tg)
    fixed = (gallery_bytes if cached is not None else read_rows * dim * 8) + ng * 40 + min(tq, nq) * min(tg, ng) * 4
    bq = plan_query_rows(ng * entry_bytes, budget, tile_q=tq, n_query=nq, fixed=fixed)

    def strip(q0: int, q1: int) -> np.ndarray:
        qx = query.read_rows(q0, q1)
        if cached is not None:
            return grid_distances(qx, q0, cached, 0, tile=tile, device=device, y_norms=cached_norms)
        out = np.empty((q1 - q0, ng), dtype=np.float32)
        for g0 in range(0, ng, read_rows):
            g1 = min(ng, g0 + read_rows)
            grid_distances(qx, q0, gallery.read_rows(g0, g1), g0, tile=tile, device=device, out=out[:, g0:g1])
        return out

    return bq, strip


def _strip_ranks(strip: np.ndarray, gallery: _Gallery, q_ids, q_cams) -> list[np.ndarray]:
    """Ranks of the true matches of each query of one strip (an empty array for a skipped query)."""
    bq = len(strip)
    (mr, mc), (jr, jc) = match_lists(gallery, q_ids, q_cams)
    n_thr = np.bincount(mr, minlength=bq)
    m = int(n_thr.max()) if bq else 0
    val = strip[mr, mc]
    order = np.lexsort((mc, val, mr))
    mr, mc, val = mr[order], mc[order], val[order]
    k = np.arange(len(mr)) - np.repeat(np.cumsum(n_thr) - n_thr, n_thr)
    thr_val = np.full((bq, m), np.inf, dtype=strip.dtype)
    thr_idx = np.full((bq, m), np.iinfo(np.int64).max, dtype=np.int64)
    thr_val[mr, k], thr_idx[mr, k] = val, mc
    strip[mr, mc] = np.inf
    strip[jr, jc] = np.inf
    cnt = count_preceding(strip, thr_val, thr_idx, n_thr)
    ranks = 1 + np.arange(m)[None, :] + cnt
    return [ranks[r, : n_thr[r]] for r in range(bq)]


def evaluate_blockwise(
    query,
    gallery,
    q_ids,
    q_cams,
    g_ids,
    g_cams,
    *,
    memory_budget: int,
    device: str = "cpu",
    tile=TILE,
    query_rows: int | None = None,
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    max_rank: int = MAX_RANK,
    camera_norm: bool = False,
) -> dict:
    """The metrics of ``evaluate_dense``, one (bq, G) strip at a time (``query``/``gallery``: stores or arrays).

    ``query_rows`` overrides the strip height from the budget (a multiple of ``tile[0]``, for tests).
    ``camera_norm`` reads the rows camera-normalised (one extra pass over both to get the camera means).
    """
    query, gallery = as_rows(query), as_rows(gallery)
    if camera_norm:
        query, gallery = _camera_normalised(query, gallery, q_cams, g_cams)
    nq, ng = query.count(), gallery.count()
    if query.dim() != gallery.dim():
        raise StoreError(
            f"query features have dimension {query.dim()} but gallery features {gallery.dim()}; "
            "evaluate features of one model"
        )
    q_ids, q_cams = _labels(q_ids, nq, "query ids"), _labels(q_cams, nq, "query camids")
    g = _Gallery(_labels(g_ids, ng, "gallery ids"), _labels(g_cams, ng, "gallery camids"))
    if rerank:
        ranker = ReRanker(
            query, gallery, k1=k1, k2=k2, lambda_=lambda_, memory_budget=memory_budget, tile=tile, device=device
        )
        bq, strip = ranker.query_rows, ranker.strip
    else:
        bq, strip = _plain_strips(query, gallery, budget=memory_budget, tile=tile, device=device)
    if query_rows is not None:
        if query_rows < 1 or query_rows % check_tile(tile)[0]:
            raise ConfigError(
                f"query_rows must be a positive multiple of the tile height {tile[0]}, found {query_rows}"
            )
        bq = query_rows
    ranks: list[np.ndarray] = []
    skipped = 0
    for q0 in range(0, nq, bq):
        q1 = min(nq, q0 + bq)
        for r in _strip_ranks(strip(q0, q1), g, q_ids[q0:q1], q_cams[q0:q1]):
            if len(r):
                ranks.append(r)
            else:
                skipped += 1
    return metrics_from_ranks(ranks, skipped, max_rank=max_rank)


# --------------------------------------------------------------------------- stores


def require_vehicle_ids(shards, query_split: str, gallery_split: str) -> None:
    """Refuse, before any extraction, shard splits that cannot be evaluated: a query or gallery split without
    any vehicle id (all -1), as counted in the shard manifest (queries of unknown id among labelled ones
    are skipped and counted by the metrics).

    (Manifests of older wildreid lack the count; ``evaluate_groups`` refuses such groups after extraction.)
    """
    for split, what in ((query_split, "query"), (gallery_split, "gallery")):
        entry = split_entry(shards, split)
        unknown, total = entry.get("num_unlabelled", 0), entry["num_samples"]
        if unknown and unknown == total:  # a query of unknown id among labelled ones is skipped and counted
            raise ConfigError(
                f"{what} split {split!r} of {shards} has {unknown:,} of {total:,} images without a vehicle id "
                f"(-1); evaluation needs vehicle ids of queries and gallery images: shard a list with a "
                "vid column for them (unlabelled images can be trained on and searched, not evaluated)"
            )


def evaluate_groups(
    query_path,
    gallery_path,
    *,
    memory_budget: int,
    device: str = "cpu",
    rerank: bool = False,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    camera_norm: bool = False,
) -> dict:
    """``evaluate_blockwise`` on two Zarr feature groups (``features``, ``ids``, ``camids``)."""
    qs, gs = open_group(query_path, "query", labels=True), open_group(gallery_path, "gallery", labels=True)
    q_ids, q_cams, g_ids, g_cams = qs.ids(), qs.camids(), gs.ids(), gs.camids()
    if qs.dim() != gs.dim():
        raise StoreError(
            f"query features {query_path} have dimension {qs.dim()} but gallery features "
            f"{gallery_path} have {gs.dim()}; evaluate features of one model"
        )
    out = evaluate_blockwise(
        qs,
        gs,
        q_ids,
        q_cams,
        g_ids,
        g_cams,
        memory_budget=memory_budget,
        device=device,
        rerank=rerank,
        k1=k1,
        k2=k2,
        lambda_=lambda_,
        camera_norm=camera_norm,
    )
    out.update(queries=qs.count(), gallery=gs.count(), rerank=bool(rerank))
    if camera_norm:  # results of the standard protocol stay as they were
        out["camera_norm"] = True
    return out


def write_results(path, results: dict) -> Path:
    """The results as indented JSON, written atomically."""
    return atomic_write(path, json.dumps(results, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- ranked lists for pictures


def topk_lists(
    query,
    gallery,
    q_ids,
    q_cams,
    g_ids,
    g_cams,
    queries,
    *,
    k: int = 10,
    tile=TILE,
    device: str = "cpu",
    memory_budget: int | None = None,
    rerank: bool = False,
) -> list[dict]:
    """Per chosen query: its top-``k`` valid gallery rows and the junk rows ranked among them.

    Each dict: ``query``, ``ranked`` (gallery indices in rank order, junk included), ``flags`` (True =
    same vehicle, False = another vehicle, None = same-camera junk, skipped by the metrics),
    ``distances``. Only the strips of the tiles holding the chosen queries are computed.
    """
    query, gallery = as_rows(query), as_rows(gallery)
    nq, ng = query.count(), gallery.count()
    q_ids, q_cams = _labels(q_ids, nq, "query ids"), _labels(q_cams, nq, "query camids")
    g_ids, g_cams = _labels(g_ids, ng, "gallery ids"), _labels(g_cams, ng, "gallery camids")
    tq = check_tile(tile)[0]
    budget = memory_budget if memory_budget is not None else max(256 << 20, 4 * ng * (tq + query.dim()) + (64 << 20))
    if rerank:
        strip = ReRanker(query, gallery, memory_budget=budget, tile=tile, device=device).strip
    else:
        strip = _plain_strips(query, gallery, budget=budget, tile=tile, device=device)[1]
    out = []
    for q in queries:
        if not 0 <= q < nq:
            raise ConfigError(f"query {q} is out of range: the query set has {nq} rows")
        t0 = q // tq * tq
        row = strip(t0, min(nq, t0 + tq))[q - t0]
        same = (g_ids == q_ids[q]) & (q_ids[q] >= 0)
        junk = same & same_camera(g_cams, q_cams[q])
        n_junk = int(junk.sum())
        take = min(ng, k + n_junk)
        cand = np.argpartition(row, take - 1)[:take] if take < ng else np.arange(ng)
        cand = np.flatnonzero(row <= row[cand].max())  # ties at the cut: keep all, the stable sort decides
        order = cand[np.lexsort((cand, row[cand]))]
        valid_pos = np.flatnonzero(~junk[order])
        end = valid_pos[k - 1] + 1 if len(valid_pos) >= k else len(order)
        ranked = order[:end]
        flags = [None if junk[j] else bool(same[j]) for j in ranked]
        out.append(
            {
                "query": int(q),
                "ranked": [int(j) for j in ranked],
                "flags": flags,
                "distances": [float(row[j]) for j in ranked],
            }
        )
    return out
