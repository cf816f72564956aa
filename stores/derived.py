"""What mining derives from a store's features, and how it is laid out in the store.

    knn/indices       (N, K) int64   sigma_i[0:K]: self first, then by similarity
    knn/similarities  (N, K) float64
    knn/counts        (N,)   int64   C_i, rows with similarity >= threshold (self included)
    knn/done          (blocks,) uint8  query blocks finished (resume)
    positives/indptr  (N+1,) int64   CSR of the mined positives, ascending
    positives/indices (nnz,) int64
    positives/parts/<block>/{counts,indices}   rules-stage output until assembled

Each group carries the fingerprint it was computed from (the features' version,
the parameters, the block plan) and a ``complete`` flag; a group of another
fingerprint is removed before anything is written, never mixed in.
"""

from __future__ import annotations

import numpy as np

from wildreid.core.errors import ConfigError
from wildreid.stores.dictionary import FeatureStore, create_checked_array
from wildreid.stores.page_cache import PageCache

__all__ = [
    "assemble_positives",
    "complete_fingerprint",
    "graph_reader",
    "knn_pending",
    "mark_complete",
    "open_derived",
    "parts_pending",
    "positives_quality",
    "prepare_knn",
    "read_positives",
    "write_knn_rows",
    "write_positives_part",
]


def open_derived(store: FeatureStore, name: str, fingerprint: dict) -> bool:
    """Make sure group ``name`` holds results of ``fingerprint`` (emptied first if it was computed from
    something else); returns whether it is complete."""
    if store.has(name):
        group = store.group_of(name)
        if dict(group.attrs).get("fingerprint") == fingerprint:
            return bool(group.attrs.get("complete", False))
        store.remove(name)
    group = store.group.create_group(name)
    group.attrs["fingerprint"] = fingerprint
    group.attrs["complete"] = False
    return False


def complete_fingerprint(store: FeatureStore, name: str) -> dict | None:
    """The fingerprint of the derived group ``name`` if it is complete, else None."""
    if not store.has(name):
        return None
    group = store.group_of(name)
    return dict(group.attrs["fingerprint"]) if group.attrs.get("complete", False) else None


def mark_complete(store: FeatureStore, name: str) -> None:
    store.group_of(name).attrs["complete"] = True


# --------------------------------------------------------------------------- the k-NN graph


def prepare_knn(store: FeatureStore, k: int, block_rows: int) -> None:
    """Create the graph's arrays (if missing) in chunks of ``block_rows`` rows: one query block, one chunk."""
    n, graph = store.count(), store.group_of("knn")
    for name, dtype, fill in (("indices", "int64", -1), ("similarities", "float64", 0.0)):
        if name not in graph:
            create_checked_array(graph, name, shape=(n, k), chunks=(block_rows, k), dtype=dtype, fill_value=fill)
    if "counts" not in graph:
        create_checked_array(graph, "counts", shape=(n,), chunks=(block_rows,), dtype="int64", fill_value=0)
        create_checked_array(graph, "done", shape=(-(-n // block_rows),), chunks=(1,), dtype="uint8", fill_value=0)


def knn_pending(store: FeatureStore) -> list[int]:
    """Query blocks whose rows are not written yet."""
    done = store.array("knn/done")[:]
    return [int(b) for b in np.flatnonzero(done == 0)]


def write_knn_rows(store: FeatureStore, block: int, start: int, idx, sim, counts) -> None:
    """One query block's graph rows (whole chunks), then its done flag."""
    graph = store.group_of("knn")
    graph["indices"][start : start + len(idx)] = idx
    graph["similarities"][start : start + len(idx)] = sim
    graph["counts"][start : start + len(idx)] = counts
    graph["done"][block] = 1


def graph_reader(store: FeatureStore, k: int, host_budget: int):
    """``rows -> (len(rows), K)`` int64 graph rows of the store's latest complete k-NN graph.

    Reads go through a page cache of ``host_budget`` bytes over ``knn/indices``, so
    memory is bounded whatever N; when the N x K array fits the budget it ends up
    wholly resident. ConfigError when the graph is missing, incomplete, of another
    dictionary size or of another width than ``k``.
    """
    graph = store.group_of("knn") if store.has("knn") else None
    if graph is None or "indices" not in graph or not graph.attrs.get("complete", False):
        found = "none" if graph is None else "an unfinished one"
        raise ConfigError(
            f"expected a complete k-NN graph in {store.path}/knn, found {found}; run the mining (wildreid mine) first"
        )
    array = store.array("knn/indices")
    if tuple(array.shape) != (store.count(), k):
        raise ConfigError(
            f"expected a k-NN graph of shape ({store.count()}, {k}) (rows, mining.k), found "
            f"{tuple(array.shape)}: it belongs to another dictionary or mining; "
            "mine this store again"
        )
    cache = PageCache(array, host_budget=max(host_budget, array.chunks[0] * k * 8), dtype=array.dtype)
    return cache.gather


# --------------------------------------------------------------------------- positives


def _part_name(block: int) -> str:
    return f"{block:06d}"


def parts_pending(store: FeatureStore, blocks: int) -> list[int]:
    """Rules blocks without a complete part (creates ``positives/parts`` when missing)."""
    parts = store.group_of("positives").require_group("parts")
    return [
        b for b in range(blocks) if _part_name(b) not in parts or not parts[_part_name(b)].attrs.get("complete", False)
    ]


def write_positives_part(
    store: FeatureStore, block: int, counts: np.ndarray, indices: np.ndarray, quality: dict
) -> None:
    part = store.group_of("positives")["parts"].create_group(_part_name(block), overwrite=True)
    create_checked_array(part, "counts", data=counts, chunks=(max(1, len(counts)),), compress=True)
    indices = indices if len(indices) else np.zeros(0, np.int64)
    create_checked_array(part, "indices", data=indices, chunks=(max(1, len(indices)),), compress=True)
    part.attrs["quality"] = quality
    part.attrs["complete"] = True


POSITIVES_CHUNK = 1 << 18  # 2 MiB of int64: what one chunk's compression holds stays small


def assemble_positives(store: FeatureStore, blocks: int) -> None:
    """Concatenate the parts into ``positives/indptr`` and ``indices`` (one part in memory at a time)."""
    n = store.count()
    group = store.group_of("positives")
    sizes = np.concatenate([store.array(f"positives/parts/{_part_name(b)}/counts")[:] for b in range(blocks)])
    sums = [dict(group["parts"][_part_name(b)].attrs["quality"]) for b in range(blocks)]
    known = all(q["precision"] is not None for q in sums)
    group.attrs["quality"] = {
        "precision": sum(q["precision"] for q in sums) / n if known else None,
        "recall": sum(q["recall"] for q in sums) / n if known else None,
        "mean_positives": sum(q["positives"] for q in sums) / n,
        "pending_pairs": sum(q["pending"] for q in sums),
        # pairs that needed a counting pass (parts written before this was recorded: all pending ones)
        "counted_pairs": sum(q.get("counted", q["pending"]) for q in sums),
    }
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    for name in ("indptr", "indices"):
        if name in group:
            store.remove(f"positives/{name}")
    group = store.group_of("positives")
    create_checked_array(group, "indptr", data=indptr, chunks=(min(n + 1, 1 << 20),), compress=True)
    nnz = int(indptr[-1])
    chunk = max(1, min(nnz, POSITIVES_CHUNK))
    indices = create_checked_array(
        group, "indices", shape=(nnz,), chunks=(chunk,), dtype="int64", fill_value=-1, compress=True
    )
    # the parts are gathered into whole chunks, each written once: a part written into a chunk
    # in place would decode, merge and encode that chunk again for every part it holds
    pending, held, position = np.empty(chunk, dtype=np.int64), 0, 0
    for b in range(blocks):
        part = store.array(f"positives/parts/{_part_name(b)}/indices")[:]
        while len(part):
            take = min(chunk - held, len(part))
            pending[held : held + take], part, held = part[:take], part[take:], held + take
            if held == chunk or position + held == nnz:
                indices[position : position + held] = pending[:held]
                position, held = position + held, 0
    mark_complete(store, "positives")
    store.remove("positives/parts")


def read_positives(store: FeatureStore) -> tuple[np.ndarray, np.ndarray]:
    """The mined positives as CSR (indptr, indices)."""
    return store.array("positives/indptr")[:], store.array("positives/indices")[:]


def positives_quality(store: FeatureStore) -> dict:
    return dict(store.group_of("positives").attrs["quality"])
