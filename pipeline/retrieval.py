"""Search: the gallery rows most similar to each query, exact and blockwise, or through an IVF index.

Similarity is cosine: the inner product of L2-normalised rows, with the exact value
:mod:`wildreid.knn` defines (float64 of the stored values; for float16 rows every
summation order gives it, so BLAS is used). Results are ordered by similarity,
descending, then gallery row, ascending: the exact search returns what a dense
reference (the whole query x gallery matrix in float64, sorted) returns, bit for bit.

Exact search streams the gallery in blocks of rows (``RowReader`` byte ranges of
the Zarr chunks) and keeps a running top-k per query; per block (``block_topk``):

1. FAISS (float32 BLAS, ``faiss.knn``) proposes the block's top k + ``margin`` rows of every query;
2. their exact similarities give the block's top k (``topk_rows``);
3. a query whose last proposal is within float32's proven error band of its k-th exact
   value (``knn._slack``) might miss a row, ties included: it gets its exact
   similarities to the whole block instead;
4. ``merge_topk`` merges the block's lists into the running ones.

The IVF index (``--index ivf``) is FAISS's ``IndexIVFScalarQuantizer`` with float16
codes (lossless for float16 features): coarse centroids trained by k-means on a
sample of rows, then every row added block by block. It lives in memory:
N x (2 D + 8) bytes (codes and ids) plus the centroids. Its similarities are FAISS's
float32 values and its lists are approximate (recall is measured in
``scripts/bench_search.py``); ties are still ordered by row.

``--memory-budget`` bounds the working set beyond the loaded libraries (``plan_search``):
FAISS's tiles and the exact kernel's temporaries (``FIXED_BYTES``) off the top; of the
rest, a block of query rows (stored, float32 and float64 copies, proposals, running
lists) a quarter, a block of gallery rows (as stored, as float32, checks) a half, and
the exact whole-block rescoring of unsafe queries a quarter (a few rows at a time).
Queries beyond one block each stream the gallery again. With ``--index ivf`` the index
and its k-means sample are taken off first, and a budget that cannot hold them is
refused with what they need.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from wildreid.budget import default_budget
from wildreid.checkpoint import load_model
from wildreid.core.errors import ConfigError, StoreError
from wildreid.distances import ArrayFeatures
from wildreid.embedding import checkpoint_digest, load_image
from wildreid.extract import extract_features
from wildreid.knn import _slack, check_features, pair_similarity, similarity, topk_pairs, validate_rows
from wildreid.plots import search_grid
from wildreid.shards.reader import IndexedShard, parse_meta, split_entry
from wildreid.shards.writer import load_sample_offsets
from wildreid.stores import FeatureStore

__all__ = [
    "ArrayRows",
    "check_pictures",
    "SearchPlan",
    "SearchResult",
    "StoreRows",
    "block_topk",
    "build_ivf",
    "exact_search",
    "ivf_search",
    "merge_topk",
    "plan_search",
    "search",
    "topk_rows",
]

FIXED_BYTES = 64 << 20  # FAISS's 4096 x 1024 float32 tile and heaps, the exact kernel's 32 MiB temporaries
MARGIN = 16  # extra FAISS proposals per query and block
DEFAULT_NPROBE = 16  # IVF lists visited per query unless asked (all of them for galleries of < 16 lists)
TRAIN_PER_LIST = 64  # IVF k-means sample: rows per list (FAISS asks for at least 39)


# --------------------------------------------------------------------------- pure top-k


def topk_rows(sims: np.ndarray, ids: np.ndarray, k: int):
    """(sim desc, id asc) top-k of every row of (Q, W) candidates; ids < 0 are padding (never chosen).

    Returns float64 (Q, k) similarities and int64 (Q, k) ids, padded with -inf / -1.
    """
    sims = np.asarray(sims, dtype=np.float64)
    ids = np.broadcast_to(np.asarray(ids, dtype=np.int64), sims.shape)
    if sims.ndim != 2 or k < 1:
        raise ConfigError(f"expected (Q, W) candidates and k >= 1, found shape {sims.shape} and k={k}")
    real = ids >= 0
    rows, cols = np.nonzero(real)
    return topk_pairs(len(sims), rows, sims[rows, cols], ids[rows, cols], k)


def merge_topk(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int):
    """The top-k of two (sim, id) lists of the same queries over disjoint rows, by (sim desc, id asc)."""
    return topk_rows(np.concatenate([a[0], b[0]], axis=1), np.concatenate([a[1], b[1]], axis=1), k)


def _max_norm(b32: np.ndarray) -> float:
    """An upper bound of the largest row norm of a float32 block (a relative margin above its rounding)."""
    if not len(b32):
        return 0.0
    return float(np.sqrt(np.einsum("ij,ij->i", b32, b32).max()) * (1 + b32.shape[1] * 2.0**-22))


def _exact_sims(query: np.ndarray, block: np.ndarray, free: bool) -> np.ndarray:
    """Exact float64 (len(query), len(block)) similarities, a float64 copy of a few block rows at a time."""
    out = np.empty((len(query), len(block)))
    step = max(1, (1 << 22) // max(1, block.shape[1]))
    q64 = query.astype(np.float64) if free else None
    for c0 in range(0, len(block), step):
        part = block[c0 : c0 + step]
        out[:, c0 : c0 + step] = q64 @ part.astype(np.float64).T if free else similarity(query, part)
    return out


def _pair_sims(query: np.ndarray, rows: np.ndarray, block: np.ndarray, cols: np.ndarray, free: bool) -> np.ndarray:
    """Exact s(query[rows[p]], block[cols[p]]) for every p, gathered a few thousand pairs at a time."""
    out = np.empty(len(rows))
    step = max(1, (1 << 20) // max(1, query.shape[1]))
    for p0 in range(0, len(rows), step):
        x, y = query[rows[p0 : p0 + step]], block[cols[p0 : p0 + step]]
        out[p0 : p0 + step] = (
            np.einsum("ij,ij->i", x.astype(np.float64), y.astype(np.float64)) if free else pair_similarity(x, y)
        )
    return out


def _exact_topk(query, block, k: int, free: bool, temp_bytes: int):
    """Top-k of whole-block exact similarities, a few query rows at a time (``temp_bytes`` of scores)."""
    nb = len(block)
    sim = np.full((len(query), k), -np.inf)
    idx = np.full((len(query), k), -1, dtype=np.int64)
    step = max(1, temp_bytes // max(1, 24 * nb))
    for r0 in range(0, len(query), step):
        s = _exact_sims(query[r0 : r0 + step], block, free)
        if nb > k:  # keep every entry >= the k-th largest (ties included), then order those
            kth = np.partition(s, nb - k, axis=1)[:, nb - k]
            rr, cc = np.nonzero(s >= kth[:, None])
        else:
            rr, cc = np.nonzero(np.ones(s.shape, dtype=bool))
        sim[r0 : r0 + step], idx[r0 : r0 + step] = topk_pairs(len(s), rr, s[rr, cc], cc.astype(np.int64), k)
    return sim, idx


def block_topk(
    query: np.ndarray,
    block: np.ndarray,
    offset: int,
    k: int,
    *,
    margin: int = MARGIN,
    query_norms: np.ndarray | None = None,
    temp_bytes: int = 64 << 20,
):
    """Exact top-k (sim desc, row asc) of every query row among the rows ``offset ..`` of one gallery block.

    Steps 1-3 of the module docstring; returns float64 (Q, k) similarities and int64 (Q, k)
    gallery rows (-inf / -1 where the block has fewer than k rows).
    """
    query, block = np.asarray(query), np.asarray(block)
    if query.ndim != 2 or block.ndim != 2 or query.shape[1] != block.shape[1]:
        raise StoreError(f"expected query and gallery rows of one dimension, found {query.shape} and {block.shape}")
    if k < 1 or margin < 0:
        raise ConfigError(f"expected k >= 1 and margin >= 0, found k={k} and margin={margin}")
    nq, nb = len(query), len(block)
    if nb == 0 or nq == 0:
        return np.full((nq, k), -np.inf), np.full((nq, k), -1, dtype=np.int64)
    qn = query_norms if query_norms is not None else check_features(query, what="query")
    validate_rows(block, np.arange(offset, offset + nb), what="gallery")
    b32 = np.ascontiguousarray(block, dtype=np.float32)
    bmax = _max_norm(b32)
    # every summation order exact for these rows (module docstring of wildreid.knn)
    free = query.dtype == np.float16 and block.dtype == np.float16 and float(qn.max()) * bmax < 16.0
    width = min(k + margin, nb)
    if width == nb:  # every row of the block is a candidate
        sim, idx = _exact_topk(query, block, k, free, temp_bytes)
    else:
        f32, cand = faiss.knn(np.ascontiguousarray(query, dtype=np.float32), b32, width, faiss.METRIC_INNER_PRODUCT)
        exact = _pair_sims(query, np.repeat(np.arange(nq), width), block, cand.reshape(-1), free).reshape(nq, width)
        sim, idx = topk_rows(exact, cand, k)
        unsafe = np.flatnonzero(f32[:, -1].astype(np.float64) + _slack(block.shape[1], qn, bmax) >= sim[:, k - 1])
        if len(unsafe):
            sim[unsafe], idx[unsafe] = _exact_topk(query[unsafe], block, k, free, temp_bytes)
    return sim, np.where(idx >= 0, idx + offset, -1)


# --------------------------------------------------------------------------- rows of a gallery


class ArrayRows(ArrayFeatures):
    """The row interface of a search over an in-memory (N, D) array (tests, benchmarks): rows in their own dtype."""

    @property
    def dtype(self) -> np.dtype:
        return self.x.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.x[start:stop]

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(rows, dtype=np.int64)]

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.count(), rows):
            yield start, self.x[start : start + rows]


class StoreRows(ArrayRows):
    """The same interface over a FeatureStore's ``features``: byte-range reads in the stored dtype."""

    def __init__(self, store):
        self.store = store
        self.reader = store.row_reader()

    def count(self) -> int:
        return self.store.count()

    def dim(self) -> int:
        return self.store.dim()

    @property
    def dtype(self) -> np.dtype:
        return self.reader.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.reader.read(start, stop)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return self.reader.gather(rows)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        buf = np.empty((min(rows, max(1, self.count())), self.dim()), dtype=self.dtype)  # one buffer, reused
        for start in range(0, self.count(), rows):
            stop = min(self.count(), start + rows)
            yield start, self.reader.read(start, stop, buf[: stop - start])


# --------------------------------------------------------------------------- exact and IVF search


@dataclass(frozen=True)
class SearchPlan:
    query_rows: int  # queries searched together (each block of them streams the gallery once)
    gallery_rows: int  # gallery rows per block
    temp_bytes: int  # scores of the exact whole-block rescoring


def plan_search(budget: int, *, n_query: int, n_gallery: int, dim: int, k: int, itemsize: int) -> SearchPlan:
    """Query and gallery block sizes within ``budget`` (module docstring); ConfigError with the smallest that works."""
    width = k + MARGIN
    per_query = dim * (itemsize + 4 + 8) + width * 40 + k * 64
    per_gallery = dim * (itemsize + 4 + 2)  # as stored, as float32, and the finiteness checks' masks
    least = min(n_gallery, width + 1)
    room = budget - FIXED_BYTES
    query_rows = min(n_query, room // 4 // per_query) if room > 0 else 0
    gallery_rows = min(n_gallery, room // 2 // per_gallery) if room > 0 else 0
    temp = room // 4
    if query_rows < 1 or gallery_rows < least or temp < 24 * gallery_rows:
        need = FIXED_BYTES + 4 * per_query + 2 * least * per_gallery + 4 * 24 * least
        raise ConfigError(
            f"memory budget of {budget / 2**20:,.1f} MiB is too small to search: one query and a block of "
            f"{least} gallery rows need {need / 2**20:,.1f} MiB with FAISS's tiles; raise --memory-budget "
            f"to at least {-(-need >> 20):,} MiB"
        )
    return SearchPlan(int(query_rows), int(gallery_rows), int(temp))


def exact_search(
    query: ArrayRows,
    gallery: ArrayRows,
    k: int,
    *,
    plan: SearchPlan,
    margin: int = MARGIN,
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
):
    """Exact top-k of every query row over the gallery, streamed in ``plan``'s blocks: float64 (Q, k), int64 (Q, k)."""
    nq, ng = query.count(), gallery.count()
    sims, ids = np.full((nq, k), -np.inf), np.full((nq, k), -1, dtype=np.int64)
    passes = -(-nq // plan.query_rows)
    for q0 in range(0, nq, plan.query_rows):
        q1 = min(nq, q0 + plan.query_rows)
        q = np.asarray(query.read(q0, q1))
        qn = check_features(q, np.arange(q0, q1), what="query")
        run = (sims[q0:q1], ids[q0:q1])
        for offset, block in gallery.blocks(plan.gallery_rows):
            found = block_topk(q, block, offset, k, margin=margin, query_norms=qn, temp_bytes=plan.temp_bytes)
            run = merge_topk(run, found, k)
            progress("searching", len(block), ng * passes)
        sims[q0:q1], ids[q0:q1] = run
    return sims, ids


def default_nlist(n: int) -> int:
    """sqrt(N) lists, with at least 39 training rows each (FAISS's k-means asks for that many)."""
    return int(max(1, min(round(np.sqrt(n)), n // 39)))


def ivf_bytes(n: int, dim: int, nlist: int) -> int:
    """Memory of the IVF index: float16 codes and int64 ids of every row, float32 centroids."""
    return n * (2 * dim + 8) + nlist * dim * 4


def build_ivf(
    gallery: ArrayRows,
    *,
    nlist: int,
    block_rows: int,
    train_rows: int | None = None,
    seed: int = 0,
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
):
    """An inner-product IVF index (float16 codes) of the gallery: k-means on a seeded sample, rows added blockwise."""
    n, dim = gallery.count(), gallery.dim()
    if not 1 <= nlist <= n:
        raise ConfigError(f"expected --nlist between 1 and the gallery's {n:,} rows, found {nlist}")
    sample = min(n, train_rows if train_rows is not None else TRAIN_PER_LIST * nlist)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.seed = seed
    index.train(np.ascontiguousarray(gallery.gather(rows), dtype=np.float32))  # faiss keeps the quantizer alive
    for start, block in gallery.blocks(block_rows):
        validate_rows(block, np.arange(start, start + len(block)), what="gallery")
        index.add(np.ascontiguousarray(block, dtype=np.float32))  # ids are the row numbers, in order
        progress("building IVF", len(block), n)
    return index


def ivf_search(index, query: ArrayRows, k: int, *, nprobe: int, query_rows: int):
    """Top-k of every query row from the IVF index, ordered by (similarity desc, row asc)."""
    if not 1 <= nprobe <= index.nlist:
        raise ConfigError(f"expected --nprobe between 1 and --nlist ({index.nlist}), found {nprobe}")
    index.nprobe = nprobe
    nq = query.count()
    sims, ids = np.full((nq, k), -np.inf), np.full((nq, k), -1, dtype=np.int64)
    for q0 in range(0, nq, query_rows):
        q = np.ascontiguousarray(query.read(q0, min(nq, q0 + query_rows)), dtype=np.float32)
        d, i = index.search(q, k)
        sims[q0 : q0 + len(q)], ids[q0 : q0 + len(q)] = topk_rows(np.where(i >= 0, d, -np.inf), i, k)
    return sims, ids


# --------------------------------------------------------------------------- groups and images


def open_group(path, what: str):
    """A feature group to search, checked whole: it exists, has rows, and its embedding finished."""
    path = Path(path)
    if not path.exists():
        raise StoreError(
            f"{what} group {path} does not exist; make it with 'wildreid embed SRC --checkpoint CKPT --output {path}'"
        )
    store = FeatureStore.open(path)
    if store.count() == 0:
        raise StoreError(f"{what} group {path} has 0 rows; expected the features of at least one image")
    state = store.meta("extraction")
    if state is None and store.meta("source") is not None:
        state = {"rows_done": 0}  # embedding began (keys, source written) and was stopped before its first chunk
    if state is not None and int(state.get("rows_done", 0)) < store.count():
        raise StoreError(
            f"{what} group {path} is embedded up to row {int(state.get('rows_done', 0)):,} of {store.count():,}; "
            "run the same 'wildreid embed' command again to finish it"
        )
    return store


def _model_of(store) -> tuple[str | None, str]:
    """(checkpoint label, feature) that made a group's rows, when recorded."""
    meta = (store.meta("extraction") or {}).get("meta") or {}
    return meta.get("label") or None, meta.get("feature", "bnneck")


@dataclass
class Queries:
    rows: ArrayRows
    keys: list[str]
    store: object | None  # the query group, or None for an image
    image: Path | None


def load_queries(query, gallery_store, *, checkpoint=None, device: str = "cpu") -> Queries:
    """The query rows: every row of a feature group, or one image embedded as ``wildreid embed`` stores it."""
    query = Path(query)
    g_label, g_feature = _model_of(gallery_store)
    if query.is_dir():
        store = open_group(query, "query")
        if store.dim() != gallery_store.dim():
            raise StoreError(
                f"query features {query} have dimension {store.dim()} but gallery {gallery_store.path} has "
                f"{gallery_store.dim()}; embed both with one model"
            )
        label, feature = _model_of(store)
        if g_label and label and (g_label, g_feature) != (label, feature):
            raise StoreError(
                f"query group {query} was embedded by checkpoint {label} ({feature}) but gallery "
                f"{gallery_store.path} by {g_label} ({g_feature}); embed both with one checkpoint"
            )
        return Queries(StoreRows(store), [str(key) for key in store.keys()], store, None)
    if not query.is_file():
        raise StoreError(f"query {query} does not exist; expected an image file or a feature group (wildreid embed)")
    if checkpoint is None:
        raise ConfigError(
            f"query {query} is an image: pass --checkpoint, the model.pt that embedded the gallery, to embed it"
        )
    label = checkpoint_digest(checkpoint)
    if g_label and g_label != label:
        raise StoreError(
            f"gallery {gallery_store.path} was embedded by checkpoint {g_label} but --checkpoint {checkpoint} is "
            f"{label}; pass the checkpoint that embedded the gallery"
        )
    model, config = load_model(checkpoint, device)
    if model.feature_dim != gallery_store.dim():
        raise StoreError(
            f"--checkpoint {checkpoint} gives features of dimension {model.feature_dim} but gallery "
            f"{gallery_store.path} has {gallery_store.dim()}; pass the checkpoint that embedded the gallery"
        )
    feature = g_feature if g_label else config["model"].get("eval_feature", "bnneck")
    image = load_image(query, tuple(int(s) for s in config["model"]["image_size"]))
    with torch.no_grad():
        x = extract_features(model.eval(), image[None], device, feature)
    # stored as the gallery stores its rows, so an image searches as its embedded row would
    return Queries(ArrayRows(x.astype(StoreRows(gallery_store).dtype)), [str(query)], None, query)


@dataclass
class SearchResult:
    results: list[dict]  # per query: {"query": key, "results": [{"rank", "key", "row", "similarity"}]}
    info: dict  # index, sizes, seconds, the plan
    queries: Queries
    gallery: object  # the gallery FeatureStore


def search(
    gallery,
    query,
    *,
    checkpoint=None,
    k: int = 20,
    index: str = "exact",
    nlist: int | None = None,
    nprobe: int | None = None,
    memory_budget: int | None = None,
    device: str = "cpu",
    progress: Callable[[str, int, int], None] = lambda phase, advance, total: None,
) -> SearchResult:
    """Ranked gallery keys of every query (``SearchResult.results``: one dict per query, JSON-ready).

    ``gallery``: a feature group; ``query``: an image file (with ``checkpoint``) or a feature group.
    """
    if k < 1:
        raise ConfigError(f"expected --top-k >= 1, found {k}")
    if index not in ("exact", "ivf"):
        raise ConfigError(f"expected --index exact or ivf, found {index!r}")
    gstore = open_group(gallery, "gallery")
    queries = load_queries(query, gstore, checkpoint=checkpoint, device=device)
    budget = memory_budget if memory_budget is not None else default_budget()
    rows = StoreRows(gstore)
    k_eff = min(k, rows.count())
    n, dim, itemsize = rows.count(), rows.dim(), rows.dtype.itemsize
    reserved = 0  # the IVF index and its training sample, beside the blocks
    if index == "ivf":
        nlist = nlist if nlist is not None else default_nlist(n)
        nprobe = nprobe if nprobe is not None else min(DEFAULT_NPROBE, nlist)
        reserved = ivf_bytes(n, dim, nlist) + min(n, TRAIN_PER_LIST * nlist) * dim * (itemsize + 4)
    try:
        plan = plan_search(
            budget - reserved, n_query=queries.rows.count(), n_gallery=n, dim=dim, k=k_eff, itemsize=itemsize
        )
    except ConfigError:
        if not reserved:
            raise
        raise ConfigError(
            f"an IVF index of {n:,} rows x {dim} and its training sample need {reserved / 2**20:,.1f} MiB "
            f"(float16 codes, ids, centroids), and searching needs room beside it: more than --memory-budget "
            f"{budget / 2**20:,.1f} MiB; raise it or use --index exact (it streams the gallery)"
        ) from None
    began = time.perf_counter()
    info: dict = {"index": index}
    if index == "exact":
        sims, ids = exact_search(queries.rows, rows, k_eff, plan=plan, progress=progress)
    else:
        ivf = build_ivf(rows, nlist=nlist, block_rows=plan.gallery_rows, progress=progress)
        info.update(nlist=nlist, nprobe=nprobe, index_bytes=ivf_bytes(n, dim, nlist))
        info["build_s"] = time.perf_counter() - began
        sims, ids = ivf_search(ivf, queries.rows, k_eff, nprobe=nprobe, query_rows=plan.query_rows)
    seconds = time.perf_counter() - began
    found = np.unique(ids[ids >= 0])
    keys = dict(zip(found.tolist(), gstore.keys(found).tolist()))
    results = []
    for q, key in enumerate(queries.keys):
        ranked = [
            {"rank": r + 1, "key": keys[int(j)], "row": int(j), "similarity": float(s)}
            for r, (s, j) in enumerate(zip(sims[q], ids[q]))
            if j >= 0
        ]
        results.append({"query": key, "results": ranked})
    info.update(
        gallery=str(gallery),
        gallery_rows=rows.count(),
        queries=len(results),
        k=k_eff,
        seconds=seconds,
        query_rows=plan.query_rows,
        gallery_block_rows=plan.gallery_rows,
        memory_budget_bytes=budget,
    )
    return SearchResult(results, info, queries, gstore)


# --------------------------------------------------------------------------- pictures


def _shard_images(root: Path, split: str, rows: list[int]) -> dict:
    """Decoded images of samples ``rows`` of a shard split, each read alone by its offset."""
    shards = split_entry(root, split)["shards"]
    firsts = np.cumsum([0] + [s["samples"] for s in shards])
    found = {}
    for row in sorted(set(rows)):
        s = int(np.searchsorted(firsts, row, side="right")) - 1
        if not 0 <= s < len(shards):
            raise StoreError(f"split {split!r} of {root} has no sample {row}; pass the group embedded from it")
        entry = shards[s]
        path = root / entry["file"]
        shard = IndexedShard(path, load_sample_offsets(path, entry["samples"], sha256=entry.get("index_sha256")))
        try:
            sample = next(parse_meta([shard.sample(row - int(firsts[s]))]))
        finally:
            shard.close()
        if int(sample["index"]) != row:
            raise StoreError(f"split {split!r} of {root} holds sample {sample['index']} where {row} was expected")
        found[row] = Image.open(io.BytesIO(sample["image"])).convert("RGB")
    return found


def _image_source(store) -> dict:
    source = store.meta("source")
    if not source:
        raise StoreError(
            f"{store.path} does not record where its images are (only groups made by 'wildreid embed' do); "
            "--picture needs them: embed the images with 'wildreid embed'"
        )
    return source


def check_pictures(gallery, query) -> None:
    """Refuse ``--picture`` before searching when the gallery, or a query group, does not record its images."""
    for path in (Path(gallery), Path(query)):
        if path.is_dir() and (path / "features").exists():
            _image_source(FeatureStore.open(path))


def row_images(store, rows: list[int]) -> dict:
    """The images of ``rows`` of a group, found through its ``source`` attribute (``wildreid embed``)."""
    from PIL import Image

    source = _image_source(store)
    root = Path(source["root"])
    if source["kind"] == "shards":
        return _shard_images(root, source["split"], rows)
    keys = store.keys(np.asarray(sorted(set(rows)), dtype=np.int64))
    out = {}
    for row, key in zip(sorted(set(rows)), keys.tolist()):
        try:
            out[row] = Image.open(root / key).convert("RGB")
        except OSError as exc:
            raise StoreError(f"image {root / key} of row {row} of {store.path} cannot be read ({exc})") from None
    return out


def render_search(result: SearchResult, path, *, max_queries: int = 8) -> Path:
    """The first ``max_queries`` queries and their ranked gallery images, drawn by ``plots.search_grid``."""
    from PIL import Image

    queries, gstore = result.queries, result.gallery
    shown = result.results[:max_queries]
    if queries.image is not None:
        q_images = [Image.open(queries.image).convert("RGB")]
        q_ids = [-1]
    else:
        got = row_images(queries.store, list(range(len(shown))))
        q_images = [got[q] for q in range(len(shown))]
        q_ids = queries.store.ids()[: len(shown)].tolist()
    rows = [r["row"] for entry in shown for r in entry["results"]]
    g_images = row_images(gstore, rows)
    g_ids = gstore.ids()
    flags = [
        [None if q_id < 0 or g_ids[r["row"]] < 0 else bool(g_ids[r["row"]] == q_id) for r in entry["results"]]
        for q_id, entry in zip(q_ids, shown)
    ]
    return search_grid(
        q_images,
        [[g_images[r["row"]] for r in entry["results"]] for entry in shown],
        [[f"{r['rank']}  {r['similarity']:.3f}" for r in entry["results"]] for entry in shown],
        flags,
        path,
        labels=[entry["query"] for entry in shown],
    )
