"""Search: the gallery rows most similar to each query, exact and blockwise, or through an IVF index.

Similarity is cosine: the inner product of L2-normalised rows, with the exact value
:mod:`wildreid.knn` defines (float64 of the stored values; for float16 rows every
summation order gives it, so BLAS is used). Results are ordered by similarity,
descending, then gallery row, ascending: the exact search returns what a dense
reference (the whole query x gallery matrix in float64, sorted) returns, bit for bit.

Exact search is the blockwise exact top-k that mining's k-NN graph uses
(``wildreid.knn.knn_rows``, with the queries apart from the gallery): for a block of
queries, FAISS (float32 BLAS) proposes the top k + ``margin`` rows over the gallery
streamed in blocks (``RowReader`` byte ranges of the Zarr chunks); a second stream
gives the proposals' exact similarities; a query whose last proposal is within
float32's proven error band of its k-th exact value might miss a row, ties included,
and gets an exact pass of its own.

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
the exact rescoring of unsafe queries a quarter (a few rows at a time).
Queries beyond one block each stream the gallery again. With ``--index ivf`` the index
and its k-means sample are taken off first, and a budget that cannot hold them is
refused with what they need.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from wildreid.budget import default_budget
from wildreid.checkpoint import load_model
from wildreid.core.errors import ConfigError, StoreError
from wildreid.embedding import checkpoint_digest, load_image
from wildreid.extract import extract_features
from wildreid.knn import knn_rows, topk_pairs, validate_rows
from wildreid.plots import search_grid
from wildreid.shards.reader import IndexedShard, parse_meta, split_entry
from wildreid.shards.writer import load_sample_offsets
from wildreid.stores import FeatureStore
from wildreid.stores.groups import open_group
from wildreid.stores.rows import ArrayRows, Rows

__all__ = [
    "check_pictures",
    "SearchPlan",
    "SearchResult",
    "build_ivf",
    "exact_search",
    "ivf_search",
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
    query: Rows,
    gallery: Rows,
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

    def blocks(dtype=None):  # knn_rows converts what it needs; the stored rows are what it is given
        for offset, block in gallery.blocks(plan.gallery_rows):
            validate_rows(block, np.arange(offset, offset + len(block)), what="gallery")
            yield np.arange(offset, offset + len(block)), block

    for q0 in range(0, nq, plan.query_rows):
        q1 = min(nq, q0 + plan.query_rows)
        sim, idx, _ = knn_rows(
            np.asarray(query.read(q0, q1)),
            np.arange(q0, q1),
            blocks,
            k,
            threshold=np.inf,
            margin=margin,
            stored_dtype=gallery.dtype,
            temp=max(1, plan.temp_bytes // 24),
            self_in_base=False,
        )
        sims[q0:q1], ids[q0:q1] = sim, idx
        progress("searching", ng, ng * passes)
    return sims, ids


def default_nlist(n: int) -> int:
    """sqrt(N) lists, with at least 39 training rows each (FAISS's k-means asks for that many)."""
    return int(max(1, min(round(np.sqrt(n)), n // 39)))


def ivf_bytes(n: int, dim: int, nlist: int) -> int:
    """Memory of the IVF index: float16 codes and int64 ids of every row, float32 centroids."""
    return n * (2 * dim + 8) + nlist * dim * 4


def build_ivf(
    gallery: Rows,
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


def ivf_search(index, query: Rows, k: int, *, nprobe: int, query_rows: int):
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


def _model_of(store) -> tuple[str | None, str]:
    """(checkpoint label, feature) that made a group's rows, when recorded."""
    meta = (store.meta("extraction") or {}).get("meta") or {}
    return meta.get("label") or None, meta.get("feature", "bnneck")


@dataclass
class Queries:
    rows: Rows
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
        return Queries(store, [str(key) for key in store.keys()], store, None)
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
    return Queries(ArrayRows(x.astype(gallery_store.dtype)), [str(query)], None, query)


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
    rows = gstore
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
