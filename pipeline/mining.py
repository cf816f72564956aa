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

import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from wildreid.budget import default_budget, peak_rss_bytes, release_free_memory
from wildreid.camera import camera_columns, camera_rows, camera_scale
from wildreid.core.errors import ConfigError, Stopped, StoreError
from wildreid.core.signals import fault_point
from wildreid.dplm import (
    check_dplm_args,
    check_order,
    check_sizes,
    concat_plans,
    finish_rows,
    graph_positions,
    pending_ranks,
    plan_rows,
    quality_sums,
    reverse_index,
    settled_pending,
)
from wildreid.knn import knn_rows
from wildreid.stores import FeatureStore, WriterLock
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
from wildreid.stores.rows import GATHER_WINDOW_BYTES, Rows
from wildreid.tasks import Workspace, one_blas_thread, run_tasks
from wildreid.world import World

__all__ = ["MineParams", "block_plan", "graph_reader", "mine", "smallest_budget"]

GRAPH_CHUNK_ROWS = 2048
# Measured above an idle interpreter with numpy, faiss and zarr loaded, whatever the blocks: the BLAS
# libraries' work buffers on first use, Zarr's I/O buffers, thread stacks.
_PROCESS_BYTES = 16 << 20
_TASK_BYTES = 2 << 20  # per running task, whatever its blocks: its interpreter-side small objects
# Bytes a k-NN task holds per query row, over and above the row itself: FAISS's score tile (1,024
# base rows) and its reservoir of 2 x (K + margin) results, the heap, candidates and exact values.
_KNN_ROW = 4096
_KNN_SLOT = 112  # ... and per row per graph slot (K + margin of them)
# Preferred sizes (measured on 100,000 x 128 rows, 1 thread): FAISS costs 1.3-1.5 ms per query row
# for blocks of 512 rows or fewer and 0.56-0.8 for 1,024 or more; base blocks of 8,192 rows cost
# 0.8, of 32,768 0.56. Below them a stage runs on fewer workers (FAISS and BLAS then get their cores).
_GOOD_QUERY, _GOOD_BASE, _GOOD_RULES = 1024, 8192, 1024
_MAX_BASE = 1 << 16


@dataclass(frozen=True)
class MineParams:
    k: int = 101  # graph width K, self included (>= adjacency + 1)
    threshold: float = 0.6
    min_candidates: int = 10
    adjacency: int = 100
    margin: int = 16
    order: str = "similarity"  # DPLM candidate order: "similarity" or "published" (see wildreid.dplm)
    # delta of the camera-aware candidate lists (wildreid.camera): own-camera neighbours rank by s - delta
    camera_penalty: float = 0.0


@dataclass(frozen=True)
class BlockPlan:
    temp_elements: int  # size cap of the exact kernel's temporary arrays
    query_rows: int  # rows per k-NN task (whole graph chunks)
    base_rows: int  # dictionary rows streamed per step
    rule_rows: int  # rows per rules task
    rule_base_rows: int  # dictionary rows streamed per step of a rules task's counting pass
    plan_rows: int  # rows of a rules task whose candidates are checked at once
    pending_pairs: int  # pending pairs counted per pass over the dictionary
    resident_rows: int  # dictionary rows a worker process holds in memory (the rest is read on use)
    graph_rows: int  # k-NN graph rows scanned at a time (rules stage)
    workers: int  # concurrent k-NN tasks
    rule_workers: int  # concurrent rules tasks


def _knn_task_bytes(q: int, b: int, dim: int, itemsize: int, width: int, temp: int, cameras: int = 0) -> int:
    rows = q * (_KNN_ROW + width * _KNN_SLOT + dim * (itemsize + (4 if itemsize != 4 else 0)))
    # a streamed base block, its float32 copy for FAISS, and for float16 rows a float64 one (exact pass)
    base = b * dim * (itemsize + (4 if itemsize != 4 else 0) + (8 if itemsize == 2 else 0))
    # camera-aware lists: the query block and each base block widened by a column per camera (float64 at most)
    widened = (q + b) * (dim + cameras) * 8 if cameras else 0
    return _TASK_BYTES + rows + base + widened + 3 * 8 * temp


def _rules_task_bytes(
    rows: int,
    sub: int,
    pairs: int,
    b: int,
    dim: int,
    itemsize: int,
    k: int,
    a: int,
    temp: int,
    graph_rows: int,
    cameras: int = 0,
) -> int:
    # the task's graph rows and row plans, and its reverse index (each row sits in ~K graph rows)
    block = rows * (k * 16 + a * 18 + 64 + k * 32)
    scan = graph_rows * k * (8 + 2)  # a block of graph rows being scanned, and its masks
    sub_rows = sub * a * (dim * itemsize + 80)  # A_i features of the rows checked at once, and their checks
    pending = pairs * (dim * (itemsize + 4 + 8) + 64)  # j rows, as float32 and float64
    base = b * dim * (itemsize + (4 if itemsize != 4 else 0))
    widened = (pairs + b) * (dim + cameras) * (itemsize + 4) if cameras else 0  # camera-aware j and base rows
    return _TASK_BYTES + GATHER_WINDOW_BYTES + block + scan + sub_rows + pending + base + widened + 3 * 8 * temp


def block_plan(
    n: int,
    dim: int,
    itemsize: int,
    k: int,
    adjacency: int,
    budget: int,
    workers: int,
    chunk_rows: int,
    *,
    partial_reads: bool = True,
    margin: int = 16,
    cameras: int = 0,
) -> BlockPlan:
    """Block sizes and concurrency that keep one mining process inside ``budget`` bytes.

    Rows are read by byte range (``wildreid.stores.rows``); a store that cannot be
    (compressed) costs one decoded Zarr chunk of ``chunk_rows`` rows at a time.
    Each stage runs ``workers`` tasks at once when their blocks reach the sizes
    FAISS and the exact kernel are efficient at, else fewer (each then gets more
    threads), and only below that smaller blocks. What the tasks leave of the
    budget holds dictionary rows in memory for the whole run. ``cameras`` > 0: the
    camera-aware lists widen the rows they compare by that many columns.
    """
    room = budget - _PROCESS_BYTES - (0 if partial_reads else 2 * min(chunk_rows, n) * dim * itemsize)
    width = min(k, n) - 1 + margin
    temp = int(max(1 << 12, min(1 << 20, room // 16 // (3 * 8))))  # the exact kernel's temporaries: 1/16
    pairs_per_row = 2  # pending pairs counted per pass, per row of a rules task (more take more passes)

    def sizes(good: list[int], top: int) -> list[int]:
        return sorted({min(top, s) for s in good}, reverse=True)

    def knn_bytes(w: int, q: int, b: int) -> int:
        return w * _knn_task_bytes(q, b, dim, itemsize, width, temp, cameras) + (n * 8 if cameras else 0)

    graph_rows = int(max(1, min(n, (2 << 20) // (k * 8))))  # graph rows scanned at a time (2 MiB)

    def rules_bytes(w: int, rows: int, sub: int, b: int) -> int:
        pairs = pairs_per_row * rows
        # ... and C_j of every row, held once per process (settled_pending)
        held = n * 8 + (n * 8 if cameras else 0)  # ... and each row's camera column
        return w * _rules_task_bytes(rows, sub, pairs, b, dim, itemsize, k, adjacency, temp, graph_rows, cameras) + held

    def budget_for(need: int) -> int:  # in MiB, for the error messages
        return -(-(budget - room + need) >> 20)

    queries = sizes([2048, 1024, 512, 256, 128, 64], min(GRAPH_CHUNK_ROWS, n))
    bases = sizes([_MAX_BASE >> i for i in range(9)], n)
    choice = None
    for w in range(max(1, workers), 0, -1):  # every worker at efficient sizes, else fewer workers
        fitting = [
            (q, b)
            for q in queries
            for b in bases
            if q >= min(_GOOD_QUERY, n) and b >= min(_GOOD_BASE, n) and knn_bytes(w, q, b) <= room
        ]
        if fitting:  # wide base blocks first (per-block costs), then large query blocks
            choice = (w, *max(fitting, key=lambda qb: (min(qb[1], 32768), qb[0], qb[1])))
            break
    if choice is None:  # one worker, smaller blocks
        fitting = [(q, b) for q in queries for b in bases if knn_bytes(1, q, b) <= room]
        if not fitting:
            raise ConfigError(
                f"memory budget of {budget / 2**20:.0f} MiB cannot hold one block of {dim}-d rows (K = {k}); "
                f"the smallest budget that works is {budget_for(knn_bytes(1, queries[-1], bases[-1]))} MiB"
            )
        choice = (1, *max(fitting, key=lambda qb: (min(qb[0], _GOOD_QUERY) * qb[1], qb[0])))
    workers_knn, query, base = choice

    rule_sizes = sizes([4096, 2048, 1024, 512, 256, 128, 64, 32, 16], n)
    rule_options = [
        (rows, sub, b)
        for rows in rule_sizes
        for sub in (256, 128, 64, 32, 16, 8, 4, 2, 1)
        if sub <= rows
        for b in bases
        if b <= base
    ]
    rule_choice = None
    for w in range(max(1, workers), 0, -1):
        fitting = [
            option for option in rule_options if option[0] >= min(_GOOD_RULES, n) and rules_bytes(w, *option) <= room
        ]
        if fitting:  # rows checked at once (per-call costs), then base blocks, then rows per task
            rule_choice = (w, *max(fitting, key=lambda o: (min(o[1], 128), min(o[2], 16384), o[0], o[2], o[1])))
            break
    if rule_choice is None:
        fitting = [option for option in rule_options if rules_bytes(1, *option) <= room]
        if not fitting:
            raise ConfigError(
                f"memory budget of {budget / 2**20:.0f} MiB cannot hold one rules block of {dim}-d rows "
                f"(K = {k}); the smallest budget that works is "
                f"{budget_for(rules_bytes(1, *rule_options[-1]))} MiB"
            )
        rule_choice = (1, *max(fitting, key=lambda o: (o[0] * o[2], o[1])))
    rule_workers, rule_rows, plan_rows, rule_base = rule_choice
    left = room - max(knn_bytes(workers_knn, query, base), rules_bytes(*rule_choice))
    resident = int(min(n, left // (dim * itemsize)))  # what the tasks leave holds dictionary rows
    return BlockPlan(
        temp_elements=temp,
        query_rows=query,
        base_rows=base,
        rule_rows=rule_rows,
        rule_base_rows=rule_base,
        plan_rows=plan_rows,
        pending_pairs=pairs_per_row * rule_rows,
        resident_rows=resident,
        graph_rows=graph_rows,
        workers=workers_knn,
        rule_workers=rule_workers,
    )


def smallest_budget(n: int, dim: int, itemsize: int, k: int, adjacency: int, workers: int, chunk_rows: int) -> int:
    """The smallest ``memory_budget`` (in whole MiB) that ``block_plan`` accepts for these sizes."""
    lo, hi = 1, 1 << 20  # MiB
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            block_plan(n, dim, itemsize, k, adjacency, mid << 20, workers, chunk_rows)
            hi = mid
        except ConfigError:
            lo = mid + 1
    return lo << 20


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


class DictionaryRows(Rows):
    """The dictionary as a mining process reads it, shared by its tasks (threads).

    Rows [0, ``resident``) are read once and held; the rest are read by byte range
    on every use (``wildreid.stores.rows``; from the OS page cache when the machine
    has room for it), so no task ever holds a decoded Zarr chunk.
    """

    def __init__(self, store: FeatureStore, resident: int):
        self.store = store
        self.dtype = store.dtype
        self.resident_rows = min(int(resident), store.count())
        self._held: np.ndarray | None = None
        self._lock = threading.Lock()

    def count(self) -> int:
        return self.store.count()

    def dim(self) -> int:
        return self.store.dim()

    def held(self) -> np.ndarray:
        with self._lock:
            if self._held is None:
                self._held = self.store.read(0, self.resident_rows)
            return self._held

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop): a read-only view of held rows, else read into ``out`` (or a new array)."""
        held = self.held()
        if stop <= len(held) and out is None:
            view = held[start:stop]
            view.flags.writeable = False
            return view
        out = np.empty((stop - start, self.dim()), dtype=self.dtype) if out is None else out
        split = min(max(start, len(held)), stop)
        out[: split - start] = held[start:split]
        self.store.read(split, stop, out[split - start :])
        return out

    def gather(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        held = self.held()
        out = np.empty((len(ids), self.dim()), dtype=self.dtype)
        near = ids < len(held)
        out[near] = held[ids[near]]
        if not near.all():
            out[~near] = self.store.gather(ids[~near])
        return out


@dataclass(frozen=True)
class CameraSides:
    """What widens rows for the camera-aware lists (``wildreid.camera``): each row's camera column, the
    number of cameras and c = sqrt(delta) in the stored dtype; queries get +c, the rows they meet -c."""

    columns: np.ndarray
    cameras: int
    scale: float

    def query(self, ids: np.ndarray, block: np.ndarray) -> np.ndarray:
        return camera_rows(block, self.columns[ids], self.cameras, self.scale)

    def base(self, blocks, workspace: Workspace, dtype=None):
        """Widen ``(ids, rows)`` blocks (-c) into this thread's buffer, converting to ``dtype`` on the way."""
        for ids, block in blocks:
            target = block.dtype if dtype is None else np.dtype(dtype)
            out = workspace.buffer(f"camera-{target.name}", (len(block), block.shape[1] + self.cameras), target)
            yield ids, camera_rows(block, self.columns[ids], self.cameras, -self.scale, out=out)


def _camera_sides(store: FeatureStore, penalty: float, workspace: Workspace) -> CameraSides | None:
    if penalty <= 0:
        return None

    def make() -> CameraSides:
        columns = camera_columns(store.camids())
        return CameraSides(columns, int(columns.max(initial=-1)) + 1, camera_scale(penalty, store.features.dtype))

    return workspace.shared("camera-sides", make)


def _pass_blocks(rows: DictionaryRows, base_rows: int, sides: CameraSides | None, workspace: Workspace):
    """``knn_rows``'s ``(dtype) -> blocks``: the stored rows, or widened straight from them (one buffer less)."""
    if sides is None:
        return lambda dtype: _base_blocks(rows, base_rows, workspace, dtype)
    return lambda dtype: sides.base(_base_blocks(rows, base_rows, workspace), workspace, dtype)


def _base_blocks(rows: DictionaryRows, base_rows: int, workspace: Workspace, dtype=None):
    """(ids, rows) of the whole dictionary in blocks, in ``dtype`` (None: as stored; conversions of stored
    values are exact). Blocks not held in memory land in this thread's scratch buffers (``Workspace.buffer``), so
    each block must be used before the next is asked for."""
    for start in range(0, rows.count(), base_rows):
        stop = min(start + base_rows, rows.count())
        out = None if stop <= rows.resident_rows else workspace.buffer("stored", (stop - start, rows.dim()), rows.dtype)
        block = rows.read(start, stop, out)
        if dtype is not None and np.dtype(dtype) != block.dtype:
            converted = workspace.buffer(np.dtype(dtype).name, block.shape, dtype)
            np.copyto(converted, block)
            block = converted
        yield np.arange(start, stop), block


# --------------------------------------------------------------------------- tasks


def _share_cores(workers: int) -> None:
    """Each of the concurrent tasks runs its own FAISS calls: share the cores, do not oversubscribe.

    OpenMP's thread count (FAISS) is a per-thread setting, so every task sets it for
    its own thread; NumPy's process-wide BLAS pool is held at one thread around the
    tasks (``wildreid.tasks.one_blas_thread``).
    """
    faiss.omp_set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))


def _knn_task(path: str, block: int, params: MineParams, plan: BlockPlan, *, workspace: Workspace) -> int:
    _share_cores(plan.workers)
    store = FeatureStore.open(path, mode="r+")
    rows = _dictionary_rows(store, plan.resident_rows, workspace)
    q0 = block * plan.query_rows
    q1 = min(q0 + plan.query_rows, store.count())
    query = rows.read(q0, q1, np.empty((q1 - q0, rows.dim()), dtype=rows.dtype))
    sides = _camera_sides(store, params.camera_penalty, workspace)
    if sides is not None:
        query = sides.query(np.arange(q0, q1), query)
    sim, idx, counts = knn_rows(
        query,
        np.arange(q0, q1),
        _pass_blocks(rows, plan.base_rows, sides, workspace),
        params.k,
        threshold=params.threshold,
        margin=params.margin,
        stored_dtype=rows.dtype,
        temp=plan.temp_elements,
    )
    write_knn_rows(store, block, q0, idx, sim, counts)
    del query, sim, idx, counts
    release_free_memory()
    fault_point(f"knn:{block}")
    return block


def _dictionary_rows(store: FeatureStore, resident: int, workspace: Workspace) -> DictionaryRows:
    return workspace.shared("features", lambda: DictionaryRows(store, resident))


def _labels(store: FeatureStore, workspace: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """Vehicle ids and images per id, read once per process and stage rather than once per block."""

    def read() -> tuple[np.ndarray, np.ndarray]:
        ids = store.ids()
        return ids, np.bincount(np.maximum(ids, 0))

    return workspace.shared("labels", read)


def _graph_blocks(reader, rows: int, workspace: Workspace):
    """(start, graph rows) over the whole k-NN graph in order, read by byte range into one reused buffer."""
    buffer = workspace.buffer("graph", (min(rows, reader.n), reader.width), reader.dtype)
    for start in range(0, reader.n, rows):
        stop = min(start + rows, reader.n)
        yield start, reader.read(start, stop, buffer[: stop - start])


def _rules_task(path: str, block: int, params: MineParams, plan: BlockPlan, *, workspace: Workspace) -> int:
    """DPLM rules for ``rule_rows`` rows.

    Rule 6 asks where row i sits in the graph rows of its candidates j: one pass over
    the graph collects, for this task's rows, every (j, position) where they appear
    (a reverse index), instead of fetching the graph rows of ~100 random j per row.
    Candidates are checked ``plan_rows`` rows at a time (their A_i features gathered
    at once), then the pending pairs of all of them are counted together,
    ``pending_pairs`` per pass over the dictionary.
    """
    _share_cores(plan.rule_workers)
    store = FeatureStore.open(path, mode="r+")
    n = store.count()
    r0, r1 = block * plan.rule_rows, min((block + 1) * plan.rule_rows, n)
    graph_idx, graph_sim = (store.array(f"knn/{name}")[r0:r1] for name in ("indices", "similarities"))
    all_counts = workspace.shared("knn/counts", lambda: store.array("knn/counts")[:])  # C_j of any j
    counts = all_counts[r0:r1]
    rows = _dictionary_rows(store, plan.resident_rows, workspace)
    _, window = check_sizes(counts, width=graph_idx.shape[1], min_candidates=params.min_candidates, n=n)
    graph = workspace.shared("knn/indices", lambda: store.row_reader("knn/indices"))
    keys, positions = reverse_index(_graph_blocks(graph, plan.graph_rows, workspace), r0, r1, window, n)
    neighbour_positions = graph_positions(keys, positions, n)
    plans = []
    for s0 in range(r0, r1, plan.plan_rows):
        s1 = min(s0 + plan.plan_rows, r1)
        plans.append(
            plan_rows(
                np.arange(s0, s1),
                graph_idx[s0 - r0 : s1 - r0],
                graph_sim[s0 - r0 : s1 - r0],
                counts[s0 - r0 : s1 - r0],
                None,
                rows.gather,
                n=n,
                threshold=params.threshold,
                min_candidates=params.min_candidates,
                adjacency=params.adjacency,
                order=params.order,
                validated=True,  # the k-NN graph of these very features (its fingerprint) checked every row
                neighbour_positions=neighbour_positions,
            )
        )
    del keys, positions, neighbour_positions
    row_plan = concat_plans(plans)
    counted = np.flatnonzero(~settled_pending(row_plan, all_counts[row_plan.pending_j], params.threshold))
    ranks = np.full(row_plan.n_pending, row_plan.width, dtype=np.int64)  # settled pairs: see settled_pending
    sides = _camera_sides(store, params.camera_penalty, workspace)
    for p0 in range(0, len(counted), plan.pending_pairs):
        pairs = counted[p0 : p0 + plan.pending_pairs]
        j_rows = rows.gather(row_plan.pending_j[pairs])
        base = _base_blocks(rows, plan.rule_base_rows, workspace)
        if sides is not None:  # the ranks in the camera-aware lists sigma_j
            j_rows, base = sides.query(row_plan.pending_j[pairs], j_rows), sides.base(base, workspace)
        ranks[pairs] = pending_ranks(row_plan, j_rows, base, pairs=pairs, chunk=plan.temp_elements)
    indptr, indices = finish_rows(row_plan, ranks)
    ids, id_sizes = _labels(store, workspace)
    quality = quality_sums(np.arange(r0, r1), indptr, indices, ids, id_sizes)
    sums = {**quality, "pending": row_plan.n_pending, "counted": len(counted)}
    write_positives_part(store, block, np.diff(indptr), indices, sums)
    del plans, row_plan, ranks, indptr, indices, graph_idx, graph_sim, counts
    release_free_memory()
    fault_point(f"rules:{block}")
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
    world: World = World(),
) -> dict:
    """Compute the k-NN graph and the DPLM positives of the store at ``path``; returns a report.

    ``graph_only`` stops after the k-NN stage (the positives group is left as it is).
    The store's writer lock is taken for the run unless the caller holds it (``locked``).
    When ``should_stop()`` turns true, blocks not yet started are skipped and
    :class:`Stopped` is raised: a re-run resumes after the finished blocks.

    In a distributed training run every rank calls this with its ``world``: rank r runs
    the blocks b with b % W == r of each stage (each block writes whole chunks of its own
    rows and its own done flag), and rank 0 alone writes the groups' attributes and
    assembles the positives, between barriers. A stop asked of any rank stops all of them
    after the stage's blocks.
    """
    started = time.perf_counter()
    check_order(params.order)
    if not 0 <= params.camera_penalty < 2:
        raise ConfigError(f"expected a camera penalty in [0, 2), found {params.camera_penalty}")
    lock = None if locked or not world.main else WriterLock(path, log=log)  # the ranks of a run are one writer
    try:
        world.barrier()  # every rank's writes to the dictionary are done before any rank reads its version
        store = FeatureStore.open(path, mode="r+", meta_writer=world.main)
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
        # every rank plans the same blocks (the plan is in the results' fingerprint): for the tightest budget
        budget = world.least(memory_budget or default_budget())
        plan = block_plan(
            n,
            dim,
            store.features.dtype.itemsize,
            params.k,
            params.adjacency,
            budget,
            workers,
            store.chunk_rows,
            partial_reads=store.row_reader().partial,
            margin=params.margin,
            cameras=_cameras(store, params.camera_penalty),
        )
        with one_blas_thread():
            timings = _run_stages(store, params, plan, workers, scheduler, progress, graph_only, should_stop, world)
        if graph_only:
            report = {"n": n, "dim": dim, **asdict(params), "memory_budget_bytes": budget, "blocks": asdict(plan)}
        else:
            report = _report(store, params, plan, budget)
    finally:
        if lock is not None:
            lock.release()
    report.update(timings, total_s=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes())
    return report


def _cameras(store: FeatureStore, penalty: float) -> int:
    """Columns the camera-aware lists add (0 when off); refuses a store with unknown cameras up front."""
    return 0 if penalty <= 0 else int(camera_columns(store.camids()).max(initial=-1)) + 1


def _stop_if_asked(should_stop: Callable[[], bool], stage: str, world: World = World()) -> None:
    if world.any(should_stop()):
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
    world: World = World(),
) -> dict:
    n = store.count()
    timings = {}
    if world.main:
        open_derived(store, "knn", _fingerprint(store, params, plan, "knn"))
    world.barrier()
    if not open_derived(store, "knn", _fingerprint(store, params, plan, "knn")):  # (now the same on every rank)
        blocks = -(-n // plan.query_rows)
        if world.main:
            prepare_knn(store, params.k, plan.query_rows)
        world.barrier()
        todo = _my_blocks(knn_pending(store), world)
        progress("k-NN graph", blocks - len(todo) * world.size, blocks)
        began = time.perf_counter()
        run_tasks(
            "knn",
            [(_knn_task, (str(store.path), b, params, plan)) for b in todo],
            scheduler=scheduler,
            workers=plan.workers,
            on_done=lambda: progress("k-NN graph", world.size, blocks),
            should_stop=should_stop,
        )
        _stop_if_asked(should_stop, "k-NN", world)
        timings["knn_s"] = time.perf_counter() - began
        if world.main:
            mark_complete(store, "knn")
        world.barrier()
    fault_point("knn-complete")
    if graph_only:
        return timings

    if world.main and not open_derived(store, "positives", _fingerprint(store, params, plan, "rules")):
        parts_pending(store, -(-n // plan.rule_rows))  # creates the parts group: one rank, before the others look
    world.barrier()
    if not open_derived(store, "positives", _fingerprint(store, params, plan, "rules")):
        rule_blocks = -(-n // plan.rule_rows)
        todo = _my_blocks(parts_pending(store, rule_blocks), world)
        world.barrier()  # every rank has listed the parts before any rank rewrites one
        progress("DPLM rules", rule_blocks - len(todo) * world.size, rule_blocks)
        began = time.perf_counter()
        run_tasks(
            "rules",
            [(_rules_task, (str(store.path), b, params, plan)) for b in todo],
            scheduler=scheduler,
            workers=plan.rule_workers,
            on_done=lambda: progress("DPLM rules", world.size, rule_blocks),
            should_stop=should_stop,
        )
        _stop_if_asked(should_stop, "rules", world)
        timings["rules_s"] = time.perf_counter() - began
        if world.main:
            assemble_positives(store, rule_blocks)
        world.barrier()
    return timings


def _my_blocks(pending: list[int], world: World) -> list[int]:
    """This rank's pending blocks: block b goes to rank b % W, whatever was done before a resume."""
    return [b for b in pending if b % world.size == world.rank]


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
