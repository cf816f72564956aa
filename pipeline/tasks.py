"""Running a list of independent block tasks on dask: local threads or a dask.distributed cluster.

Every task is a plain function call whose result is small (the data goes to
the store, not through the scheduler), so the same graph runs anywhere that
sees the store's path. What the tasks of a stage share inside one process
(scratch buffers, readers, arrays read once) lives in a :class:`Workspace`
that ``run_tasks`` makes and hands to every task as ``workspace=``: one in this
process on local threads, one per worker process on a cluster (a worker plugin
owns it there), dropped when the stage is done.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence

import dask
import distributed  # dask.compute imports it on first use (10 MiB): part of the idle interpreter
import numpy as np
from dask.callbacks import Callback
from threadpoolctl import ThreadpoolController

from wildreid.budget import release_free_memory

__all__ = ["Workspace", "one_blas_thread", "run_tasks"]


class Workspace:
    """What the tasks of one stage keep between them in one process.

    ``buffer``: a scratch array per thread and name, reused by the next task on that
    thread (fresh arrays cost newly zeroed pages on every block: 3.3 million page
    faults in one k-NN stage at N = 100k, D = 256, measured). ``shared``: one object
    per name for all the threads (a reader, rows held in memory), made by the first
    task that asks. ``close`` drops both and hands the freed memory back.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], np.ndarray] = {}
        self._objects: dict[str, object] = {}
        self._lock = threading.Lock()

    def buffer(self, name: str, shape: tuple[int, int], dtype) -> np.ndarray:
        key = (threading.get_ident(), name)
        size = shape[0] * shape[1]
        with self._lock:
            held = self._buffers.get(key)
            if held is None or held.size < size or held.dtype != np.dtype(dtype):
                held = self._buffers[key] = np.empty(size, dtype=dtype)
        return held[:size].reshape(shape)

    def shared(self, name: str, make: Callable[[], object]):
        # made under the lock: two threads asking at once would otherwise both read the rows
        with self._lock:
            if name not in self._objects:
                self._objects[name] = make()
            return self._objects[name]

    def held_bytes(self) -> int:
        """Bytes of the scratch buffers held now (the shared objects are not counted)."""
        with self._lock:
            return sum(buffer.nbytes for buffer in self._buffers.values())

    def close(self) -> None:
        with self._lock:
            self._buffers.clear()
            self._objects.clear()
        release_free_memory()


def _numpy_blas() -> list:
    """NumPy's own BLAS pools (FAISS brings another one, driven by its per-thread OpenMP setting)."""
    numpy_dir = os.path.dirname(np.__file__)
    return [
        lib
        for lib in ThreadpoolController().lib_controllers
        if lib.user_api == "blas" and os.path.dirname(lib.filepath).startswith(numpy_dir)
    ]


@contextlib.contextmanager
def one_blas_thread():
    """Hold NumPy's BLAS at one thread, then restore it.

    The tasks' NumPy calls are small (rule 4's 100 x 100 Gram matrices) and run
    concurrently; with the pool's threads competing against the other tasks (or
    another process) they ran up to ten times slower in a measurement. Parallelism
    comes from the tasks instead. The pool is process-wide: the caller of
    ``run_tasks`` holds it for local threads, the worker plugin for a worker process.
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


class _WorkspacePlugin(distributed.WorkerPlugin):
    """A stage's workspace in a worker process, with the process's BLAS at one thread while it lasts."""

    def setup(self, worker) -> None:
        self.workspace = Workspace()
        self._blas = one_blas_thread()
        self._blas.__enter__()

    def teardown(self, worker) -> None:
        self.workspace.close()
        self._blas.__exit__(None, None, None)


def _on_worker(plugin: str, fn: Callable, *args):
    return fn(*args, workspace=distributed.get_worker().plugins[plugin].workspace)


class _Progress(Callback):
    def __init__(self, on_done: Callable[[], None]):
        super().__init__()
        self.on_done = on_done

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(key, tuple) and str(key[0]).startswith("wildreid-"):
            self.on_done()


def _unless_stopped(should_stop: Callable[[], bool], fn: Callable, workspace: Workspace, *args):
    return None if should_stop() else fn(*args, workspace=workspace)


def run_tasks(
    name: str,
    calls: Sequence[tuple[Callable, tuple]],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    on_done: Callable[[], None] = lambda: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list:
    """Run ``fn(*args, workspace=...)`` for every (fn, args) as one dask task each; results in order.

    Once ``should_stop()`` is true, tasks not yet started are skipped (their result is
    None) and the tasks that are running finish before this returns: on local threads
    each task asks before it starts; on a cluster tasks are handed out a few more than
    the cluster has threads, and no more are handed out (a running dask task cannot
    be cancelled, so none may be left running once the caller lets go of the store).

    ``scheduler`` None runs on local threads (``workers`` of them); otherwise it
    is the address of a dask.distributed scheduler (e.g. tcp://host:8786).
    """
    if not calls:
        return []
    if scheduler is None:
        workspace = Workspace()
        tasks = [
            dask.delayed(_unless_stopped, pure=False)(
                should_stop, fn, workspace, *args, dask_key_name=(f"wildreid-{name}", i)
            )
            for i, (fn, args) in enumerate(calls)
        ]
        try:
            with _Progress(on_done):
                return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))
        finally:
            workspace.close()
    plugin = f"wildreid-workspace-{name}"
    with distributed.Client(scheduler) as client:
        client.register_plugin(_WorkspacePlugin(), name=plugin)
        try:
            results: list = [None] * len(calls)
            queue = iter(enumerate(calls))
            running: dict = {}
            finished = distributed.as_completed()

            def hand_out() -> None:
                i, (fn, args) = next(queue, (None, (None, None)))
                if i is not None:
                    future = client.submit(_on_worker, plugin, fn, *args, key=f"wildreid-{name}-{i}", pure=False)
                    running[future] = i
                    finished.add(future)

            for _ in range(sum(client.nthreads().values()) + 2):
                hand_out()
            for future in finished:
                results[running.pop(future)] = future.result()
                on_done()
                if not should_stop():
                    hand_out()
            return results
        finally:
            client.unregister_worker_plugin(plugin)
