"""wildreid.tasks: one workspace per stage and process, handed to every task, dropped when the stage ends."""

from __future__ import annotations

import threading

import numpy as np

from wildreid.tasks import Workspace, run_tasks


def _task(i: int, seen: list, *, workspace: Workspace) -> int:
    a = workspace.buffer("scratch", (4, 8), np.float32)
    a[:] = i
    b = workspace.buffer("scratch", (2, 8), np.float32)  # a smaller ask reuses the same memory
    rows = workspace.shared("rows", lambda: np.arange(10))
    seen.append((threading.get_ident(), workspace, a.__array_interface__["data"][0], b.__array_interface__["data"][0]))
    return int(rows[i])


def test_local_tasks_share_one_workspace_and_it_is_closed():
    seen: list = []
    made: list = []
    results = run_tasks("t", [(_task, (i, seen)) for i in range(6)], workers=2)
    assert results == list(range(6))
    workspaces = {id(w) for _, w, _, _ in seen}
    assert len(workspaces) == 1
    for _, _, a, b in seen:
        assert a == b
    by_thread: dict = {}
    for thread, _, a, _ in seen:
        by_thread.setdefault(thread, set()).add(a)
    assert all(len(addresses) == 1 for addresses in by_thread.values())  # one buffer per thread, reused
    workspace = seen[0][1]
    assert workspace.held_bytes() == 0
    assert workspace.shared("rows", lambda: made.append(1) or np.zeros(1)).shape == (1,) and made  # made again


def test_a_stopped_stage_skips_tasks_and_still_closes_its_workspace():
    seen: list = []
    results = run_tasks("t", [(_task, (i, seen)) for i in range(4)], workers=1, should_stop=lambda: len(seen) >= 2)
    assert sum(r is not None for r in results) == 2  # (dask picks the order)
    assert seen[0][1].held_bytes() == 0


def test_workspace_buffer_grows_and_changes_dtype():
    workspace = Workspace()
    small = workspace.buffer("x", (2, 2), np.float32)
    big = workspace.buffer("x", (8, 8), np.float32)
    assert big.shape == (8, 8) and workspace.held_bytes() == 64 * 4
    other = workspace.buffer("x", (2, 2), np.float16)
    assert other.dtype == np.float16 and workspace.held_bytes() == 4 * 2
    assert small.base is not big.base
    workspace.close()
    assert workspace.held_bytes() == 0
