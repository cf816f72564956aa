"""Running a list of independent block tasks on dask: local threads or a dask.distributed cluster.

Every task is a plain function call whose result is small (the data goes to
the store, not through the scheduler), so the same graph runs anywhere that
sees the store's path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import dask
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
    None): on local threads each task asks before it starts; on a cluster the
    futures not yet finished are cancelled. Tasks that are running finish.

    ``scheduler`` None runs on local threads (``workers`` of them); otherwise it
    is the address of a dask.distributed scheduler (e.g. tcp://host:8786).
    ``cleanup`` runs once the tasks are done, in this process and, on a cluster,
    in every worker process (what the tasks kept between them, e.g. scratch buffers).
    """
    if not calls:
        return []
    if scheduler is None:
        tasks = [dask.delayed(_unless_stopped, pure=False)(should_stop, fn, *args,
                                                           dask_key_name=(f"wildreid-{name}", i))
                 for i, (fn, args) in enumerate(calls)]  # fmt: skip
        try:
            with _Progress(on_done):
                return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))
        finally:
            if cleanup is not None:
                cleanup()
    from distributed import Client, as_completed

    tasks = [dask.delayed(fn, pure=False)(*args, dask_key_name=(f"wildreid-{name}", i))
             for i, (fn, args) in enumerate(calls)]  # fmt: skip
    with Client(scheduler) as client:
        try:
            futures = client.compute(tasks)
            for future in as_completed(futures):
                on_done()
                if should_stop():
                    client.cancel([f for f in futures if not f.done()])
                    return [f.result() if f.status == "finished" else None for f in futures]
            return client.gather(futures)
        finally:
            if cleanup is not None:
                client.run(cleanup)
