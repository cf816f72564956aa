"""Running a list of independent block tasks on dask: local threads or a dask.distributed cluster.

Every task is a plain function call whose result is small (the data goes to
the store, not through the scheduler), so the same graph runs anywhere that
sees the store's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dask
import distributed  # noqa: F401  dask.compute imports it on first use (10 MiB): part of the idle interpreter
from dask.callbacks import Callback

__all__ = ["run_tasks"]


class _Progress(Callback):
    def __init__(self, on_done: Callable[[], None]):
        super().__init__()
        self.on_done = on_done

    def _posttask(self, key, result, dsk, state, worker_id):
        if isinstance(key, tuple) and str(key[0]).startswith("wildreid-"):
            self.on_done()


def _unless_stopped(should_stop: Callable[[], bool], fn: Callable, *args):
    return None if should_stop() else fn(*args)


def run_tasks(
    name: str,
    calls: Sequence[tuple[Callable, tuple]],
    *,
    scheduler: str | None = None,
    workers: int = 2,
    on_done: Callable[[], None] = lambda: None,
    cleanup: Callable[[], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> list:
    """Run ``fn(*args)`` for every (fn, args) as one dask task each; results in order.

    Once ``should_stop()`` is true, tasks not yet started are skipped (their result is
    None) and the tasks that are running finish before this returns: on local threads
    each task asks before it starts; on a cluster tasks are handed out a few more than
    the cluster has threads, and no more are handed out (a running dask task cannot
    be cancelled, so none may be left running once the caller lets go of the store).

    ``scheduler`` None runs on local threads (``workers`` of them); otherwise it
    is the address of a dask.distributed scheduler (e.g. tcp://host:8786).
    ``cleanup`` runs once the tasks are done, in this process and, on a cluster,
    in every worker process (what the tasks kept between them, e.g. scratch buffers).
    """
    if not calls:
        return []
    if scheduler is None:
        tasks = [
            dask.delayed(_unless_stopped, pure=False)(should_stop, fn, *args, dask_key_name=(f"wildreid-{name}", i))
            for i, (fn, args) in enumerate(calls)
        ]
        try:
            with _Progress(on_done):
                return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))
        finally:
            if cleanup is not None:
                cleanup()
    from distributed import Client, as_completed

    with Client(scheduler) as client:
        try:
            results: list = [None] * len(calls)
            queue = iter(enumerate(calls))
            running: dict = {}
            finished = as_completed()

            def hand_out() -> None:
                i, (fn, args) = next(queue, (None, (None, None)))
                if i is not None:
                    future = client.submit(fn, *args, key=f"wildreid-{name}-{i}", pure=False)
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
            if cleanup is not None:
                client.run(cleanup)
