"""Out-of-core DPLM: the k-NN graph and the positives of a feature store, block by block on dask.

Stages, each resumable (a block's outputs are whole Zarr chunks, written
atomically, and a per-block flag is set after them):

1. ``knn``: one task per query block streams the dictionary and writes
   ``knn/indices``, ``knn/similarities`` and ``knn/counts`` for its rows;
2. ``rules``: one task per row block applies the DPLM rules (pure functions in
   :mod:`wildreid.dplm`), runs the exact counting pass for its pending pairs,
   and writes its positives to ``positives/parts/<block>``;
3. ``assemble``: the parts are concatenated into ``positives/indptr`` and
   ``positives/indices`` and removed.

A fingerprint of the dictionary and the parameters is kept in each group's
attributes; results of another dictionary or other parameters are discarded,
never mixed in. The candidate order (``MineParams.order``) is a parameter of the
positives only: the graph is the same for both orders, and its fingerprint
leaves the order out, so a graph is reused across orders but positives are not.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np
from threadpoolctl import ThreadpoolController

from wildreid.budget import default_budget, peak_rss_bytes
from wildreid.dplm import (
    check_dplm_args,
    check_order,
    finish_rows,
    pending_ranks,
    plan_rows,
    quality_sums,
)
from wildreid.errors import ConfigError, Stopped, StoreError
from wildreid.knn import knn_rows, set_temp_elements
from wildreid.signals import signal_point
from wildreid.stores import FeatureStore, PageCache, WriterLock
from wildreid.stores.derived import (
    assemble_positives,
    graph_reader,
    knn_pending,
    mark_complete,
    open_derived,
    parts_pending,
    positives_quality,
    prepare_knn,
    write_knn_rows,
    write_positives_part,
)
from wildreid.tasks import run_tasks

__all__ = ["MineParams", "block_plan", "graph_reader", "mine"]

GRAPH_CHUNK_ROWS = 2048
_FIXED_BYTES = 8 << 20  # interpreter-side temporaries of one task that do not scale with the blocks
# Once per process, whatever the blocks: the BLAS libraries' work buffers on first use, Zarr's
# I/O buffers, thread stacks (measured: about 16 MiB above an idle interpreter with numpy and faiss loaded)
_PROCESS_BYTES = 16 << 20
_TEMP_SHARE = 8  # the exact kernel keeps about 3 temporaries of float64: give them 3/8 of a task's bytes


@dataclass(frozen=True)
class MineParams:
    k: int = 101  # graph width K, self included (>= adjacency + 1)
    threshold: float = 0.6
    min_candidates: int = 10
    adjacency: int = 100
    margin: int = 16
    order: str = "similarity"  # DPLM candidate order: "similarity" or "published" (see wildreid.dplm)


@dataclass(frozen=True)
class BlockPlan:
    temp_elements: int  # size cap of the exact kernel's temporary arrays
    query_rows: int  # rows per k-NN task (whole graph chunks)
    base_rows: int  # dictionary rows streamed per step
    rule_rows: int  # rows per rules task
    cache_bytes: int  # page cache of one worker process
    workers: int


def block_plan(
    n: int, dim: int, itemsize: int, k: int, adjacency: int, budget: int, workers: int, chunk_rows: int
) -> BlockPlan:
    """Block sizes that keep ``workers`` concurrent tasks and the page cache inside ``budget`` bytes.

    Zarr decodes a whole chunk (``chunk_rows`` rows) to return any of its rows,
    so every task also holds one decoded chunk next to its blocks.
    """
    chunk_bytes = min(chunk_rows, n) * dim * itemsize
    query = min(GRAPH_CHUNK_ROWS, max(n, 1))

    def task_bytes(query_rows: int, base_rows: int) -> int:
        # FAISS scores min(query, 4096) x 1024 tiles; the exact passes bound theirs by the temp share
        faiss_tile = min(query_rows, 4096) * 1024 * 4 * 2
        rows = (query_rows + base_rows) * dim * (itemsize + 12) + query_rows * (k + 16) * 48
        return _FIXED_BYTES + faiss_tile + chunk_bytes + rows * _TEMP_SHARE // (_TEMP_SHARE - 3)

    cache = 2 * chunk_bytes  # at least a page of features and one of the graph
    per_task = (budget - _PROCESS_BYTES - cache) // workers
    least = min(256, n)
    while task_bytes(query, least) > per_task and query > 64:
        query //= 2  # smaller query blocks (and graph chunks) before giving up
    if task_bytes(query, least) > per_task:
        smallest = _PROCESS_BYTES + cache + workers * task_bytes(query, least)
        raise ConfigError(
            f"memory budget of {budget / 2**20:.0f} MiB cannot hold one block of {dim}-d rows "
            f"(Zarr chunks of {chunk_rows} rows) with {workers} worker(s); the smallest budget "
            f"that works is {-(-smallest >> 20)} MiB"
        )
    base = least
    while base < n and task_bytes(query, min(2 * base, n)) <= per_task and base < (1 << 16):
        base = min(2 * base, n)
    task = task_bytes(query, base)
    cache = max(cache, budget - _PROCESS_BYTES - workers * task)
    temp = max(1 << 12, (task - _FIXED_BYTES - chunk_bytes) * 3 // _TEMP_SHARE // 3 // 8)
    # a rules task holds, per row, its A_i rows and their rank-check window, and streams base blocks
    rule_bytes = adjacency * (k * 9 + dim * itemsize) + k * 32
    rule_room = task - _FIXED_BYTES - chunk_bytes - base * dim * (itemsize + 4)
    rule = int(max(16, min(4096, rule_room // 2 // rule_bytes)))
    return BlockPlan(int(temp), query, base, rule, int(cache), workers)


# --------------------------------------------------------------------------- store layout


def _fingerprint(store: FeatureStore, params: MineParams, plan: BlockPlan, stage: str) -> dict:
    """What decides whether a stage's stored results can be reused: the order only for the positives."""
    values = asdict(params)
    if stage != "rules":
        del values["order"]  # the graph does not depend on it
    out = {"store": store.fingerprint(), "params": values, "query_rows": plan.query_rows}
    if stage == "rules":
        out["rule_rows"] = plan.rule_rows
    return out


def _crash_point(name: str) -> None:
    """Test hook: WILDREID_CRASH_AT=<name> kills the process (SIGKILL) right here."""
    if os.environ.get("WILDREID_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


_BUFFERS: dict[tuple[int, str], np.ndarray] = {}
_BUFFERS_LOCK = threading.Lock()


def _buffer(name: str, shape: tuple[int, int], dtype) -> np.ndarray:
    """A per-thread scratch array, kept between the tasks of a stage.

    Every query block streams the whole dictionary twice; fresh arrays for its
    blocks cost ~270 MB of newly zeroed pages per block at N = 100k, D = 256
    (measured: 3.3 million page faults in one k-NN stage). The task plan already
    counts these buffers (``task_bytes``); ``_release_buffers`` drops them.
    """
    key = (threading.get_ident(), name)
    size = shape[0] * shape[1]
    with _BUFFERS_LOCK:
        held = _BUFFERS.get(key)
        if held is None or held.size < size or held.dtype != np.dtype(dtype):
            held = _BUFFERS[key] = np.empty(size, dtype=dtype)
    return held[:size].reshape(shape)


def _release_buffers() -> None:
    with _BUFFERS_LOCK:
        _BUFFERS.clear()


def _base_blocks(store: FeatureStore, base_rows: int, cache: PageCache | None = None, dtype=None):
    """(ids, rows) of the whole dictionary in blocks, in ``dtype`` (None: as stored; conversions of stored
    values are exact). Through ``cache`` the blocks land in this thread's scratch buffers (``_buffer``),
    so each block must be used before the next is asked for."""
    n = store.count()
    for start in range(0, n, base_rows):
        stop = min(start + base_rows, n)
        if cache is None:
            yield np.arange(start, stop), np.asarray(store.features[start:stop], dtype=dtype)
            continue
        # the copy under the cache's lock stays a plain one; the conversion runs outside it
        rows = cache.read_range(start, stop, out=_buffer("stored", (stop - start, store.dim()), cache.dtype))
        if dtype is not None and np.dtype(dtype) != rows.dtype:
            converted = _buffer(np.dtype(dtype).name, rows.shape, dtype)
            np.copyto(converted, rows)
            rows = converted
        yield np.arange(start, stop), rows


# --------------------------------------------------------------------------- tasks


def _numpy_blas() -> list:
    """NumPy's own BLAS pools (FAISS brings another one, driven by its per-thread OpenMP setting)."""
    numpy_dir = os.path.dirname(np.__file__)
    return [
        lib
        for lib in ThreadpoolController().lib_controllers
        if lib.user_api == "blas" and os.path.dirname(lib.filepath).startswith(numpy_dir)
    ]


@contextlib.contextmanager
def _one_blas_thread():
    """Hold NumPy's BLAS at one thread, then restore it.

    Its calls here are small (rule 4's 100 x 100 Gram matrices) and run inside
    concurrent tasks; with its pool's threads competing against the other tasks
    (or another process) they ran up to ten times slower in a measurement.
    Parallelism comes from the tasks instead (``workers``, one per core by default).
    """
    pools = _numpy_blas()
    before = [lib.num_threads for lib in pools]
    for lib in pools:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, threads in zip(pools, before):
            lib.set_num_threads(threads)


_LIMITED: list[bool] = []  # this process holds NumPy's BLAS at one thread


def _share_cores(workers: int) -> None:
    """Each of the concurrent tasks runs its own FAISS/BLAS calls: share the cores, do not oversubscribe.

    OpenMP's thread count (FAISS) is a per-thread setting, so every task sets it for
    its own thread. NumPy's BLAS pool is process-wide: ``mine`` holds it at one
    thread in its own process; a dask.distributed worker process does it here, once.
    """
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    if not _LIMITED:
        for lib in _numpy_blas():
            lib.set_num_threads(1)
        _LIMITED.append(True)


def _knn_task(path: str, block: int, params: MineParams, plan: BlockPlan) -> int:
    _share_cores(plan.workers)
    set_temp_elements(plan.temp_elements)
    store = FeatureStore.open(path, mode="r+")
    q0 = block * plan.query_rows
    q1 = min(q0 + plan.query_rows, store.count())
    query = np.asarray(store.features[q0:q1])
    # when the dictionary fits the cache, every query block after the first reads it from memory
    cache = _cache(store, "features", plan.cache_bytes)
    sim, idx, counts = knn_rows(
        query,
        np.arange(q0, q1),
        lambda dtype: _base_blocks(store, plan.base_rows, cache, dtype),
        params.k,
        threshold=params.threshold,
        margin=params.margin,
        stored_dtype=store.features.dtype,
    )
    write_knn_rows(store, block, q0, idx, sim, counts)
    _crash_point(f"knn:{block}")
    signal_point(f"knn:{block}")
    return block


_CACHES: dict[tuple, PageCache] = {}
_CACHES_LOCK = threading.Lock()


def _cache(store: FeatureStore, name: str, budget: int) -> PageCache:
    """One page cache per array per worker process, shared by its threads."""
    key = (str(store.path), name, repr(store.fingerprint()), budget)
    with _CACHES_LOCK:
        if key not in _CACHES:
            # pages of another store, dictionary, array version or budget are of no use any more
            for old in [k for k in _CACHES if k[:2] == key[:2] or k[0] != key[0] or k[2] != key[2]]:
                del _CACHES[old]
            array = store.array(name)
            budget = max(budget, array.chunks[0] * array.shape[1] * array.dtype.itemsize)
            _CACHES[key] = PageCache(array, host_budget=budget, dtype=array.dtype)
        return _CACHES[key]


@functools.lru_cache(maxsize=2)
def _labels(path: str, fingerprint: str) -> tuple[np.ndarray, np.ndarray]:
    """Vehicle ids and images per id, read once per worker process rather than once per block."""
    ids = FeatureStore.open(path).ids()
    return ids, np.bincount(np.maximum(ids, 0))


def _rules_task(path: str, block: int, params: MineParams, plan: BlockPlan) -> int:
    _share_cores(plan.workers)
    set_temp_elements(plan.temp_elements)
    store = FeatureStore.open(path, mode="r+")
    n = store.count()
    graph = {name: store.array(f"knn/{name}") for name in ("indices", "similarities", "counts")}
    r0, r1 = block * plan.rule_rows, min((block + 1) * plan.rule_rows, n)
    features = _cache(store, "features", plan.cache_bytes // 2)
    neighbours = _cache(store, "knn/indices", plan.cache_bytes // 2)
    row_plan = plan_rows(
        np.arange(r0, r1),
        graph["indices"][r0:r1],
        graph["similarities"][r0:r1],
        graph["counts"][r0:r1],
        neighbours.get_rows,
        features.get_rows,
        n=n,
        threshold=params.threshold,
        min_candidates=params.min_candidates,
        adjacency=params.adjacency,
        order=params.order,
        validated=True,  # the k-NN graph of these very features (its fingerprint) checked every row
    )
    ranks = pending_ranks(row_plan, features.get_rows(row_plan.pending_j), _base_blocks(store, plan.base_rows))
    indptr, indices = finish_rows(row_plan, ranks)
    ids, id_sizes = _labels(str(store.path), repr(store.fingerprint()))
    quality = quality_sums(np.arange(r0, r1), indptr, indices, ids, id_sizes)
    write_positives_part(store, block, np.diff(indptr), indices, {**quality, "pending": row_plan.n_pending})
    _crash_point(f"rules:{block}")
    signal_point(f"rules:{block}")
    return block


# --------------------------------------------------------------------------- driver


def mine(
    path: str,
    params: MineParams = MineParams(),
    *,
    memory_budget: int | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress=lambda phase, advance, total: None,
    graph_only: bool = False,
    should_stop: Callable[[], bool] = lambda: False,
    locked: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Compute the k-NN graph and the DPLM positives of the store at ``path``; returns a report.

    ``graph_only`` stops after the k-NN stage (the positives group is left as it is).
    The store's writer lock is taken for the run unless the caller holds it (``locked``).
    When ``should_stop()`` turns true, blocks not yet started are skipped and
    :class:`Stopped` is raised: a re-run resumes after the finished blocks.
    """
    started = time.perf_counter()
    check_order(params.order)
    lock = None if locked else WriterLock(path, log=log)
    try:
        store = FeatureStore.open(path, mode="r+")
        n, dim = store.count(), store.dim()
        if n == 0:
            raise StoreError(f"{path}/features has no rows")
        if params.k > n:
            raise ConfigError(f"graph width K={params.k} is larger than the {n} rows of {path}; use --k {n} or less")
        check_dplm_args(
            n=n,
            graph_width=params.k,
            threshold=params.threshold,
            min_candidates=params.min_candidates,
            adjacency=params.adjacency,
            order=params.order,
        )
        budget = memory_budget or default_budget()
        plan = block_plan(
            n, dim, store.features.dtype.itemsize, params.k, params.adjacency, budget, workers, store.chunk_rows
        )
        with _one_blas_thread():
            _LIMITED.append(True)
            try:
                timings = _run_stages(store, params, plan, workers, scheduler, progress, graph_only, should_stop)
            finally:
                _LIMITED.clear()
        if graph_only:
            report = {"n": n, "dim": dim, **asdict(params), "memory_budget_bytes": budget, "blocks": asdict(plan)}
        else:
            report = _report(store, params, plan, budget)
    finally:
        if lock is not None:
            lock.release()
    report.update(timings, total_s=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes())
    return report


def _stop_if_asked(should_stop: Callable[[], bool], stage: str) -> None:
    if should_stop():
        raise Stopped(
            f"mining stopped during the {stage} stage after its finished blocks; run the same command again to resume"
        )


def _run_stages(
    store: FeatureStore,
    params: MineParams,
    plan: BlockPlan,
    workers: int,
    scheduler,
    progress,
    graph_only: bool,
    should_stop: Callable[[], bool],
) -> dict:
    n = store.count()
    timings = {}
    complete = open_derived(store, "knn", _fingerprint(store, params, plan, "knn"))
    blocks = -(-n // plan.query_rows)
    if not complete:
        prepare_knn(store, params.k, plan.query_rows)
        todo = knn_pending(store)
        progress("k-NN graph", blocks - len(todo), blocks)
        began = time.perf_counter()
        run_tasks(
            "knn",
            [(_knn_task, (str(store.path), b, params, plan)) for b in todo],
            scheduler=scheduler,
            workers=workers,
            on_done=lambda: progress("k-NN graph", 1, blocks),
            cleanup=_release_buffers,
            should_stop=should_stop,
        )
        _stop_if_asked(should_stop, "k-NN")
        timings["knn_s"] = time.perf_counter() - began
        mark_complete(store, "knn")
    _crash_point("knn-complete")
    if graph_only:
        return timings

    complete = open_derived(store, "positives", _fingerprint(store, params, plan, "rules"))
    if not complete:
        rule_blocks = -(-n // plan.rule_rows)
        todo = parts_pending(store, rule_blocks)
        progress("DPLM rules", rule_blocks - len(todo), rule_blocks)
        began = time.perf_counter()
        run_tasks(
            "rules",
            [(_rules_task, (str(store.path), b, params, plan)) for b in todo],
            scheduler=scheduler,
            workers=workers,
            on_done=lambda: progress("DPLM rules", 1, rule_blocks),
            should_stop=should_stop,
        )
        _stop_if_asked(should_stop, "rules")
        timings["rules_s"] = time.perf_counter() - began
        assemble_positives(store, rule_blocks)
    return timings


def _report(store: FeatureStore, params: MineParams, plan: BlockPlan, budget: int) -> dict:
    quality = positives_quality(store)
    return {
        "n": store.count(),
        "dim": store.dim(),
        **asdict(params),
        **quality,
        "memory_budget_bytes": budget,
        "blocks": asdict(plan),
    }
