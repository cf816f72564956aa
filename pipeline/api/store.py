"""The mining command of the API: the k-NN graph and DPLM positives of a feature store (no model code)."""

from __future__ import annotations

from pathlib import Path

from wildreid.api.common import Log, Progress, StopAsked, as_bytes, never, no_log, no_progress
from wildreid.mining import MineParams
from wildreid.mining import mine as mine_store

__all__ = ["mine"]


def mine(
    store: str | Path,
    *,
    k: int = 101,
    threshold: float = 0.6,
    min_candidates: int = 10,
    adjacency: int = 100,
    order: str = "similarity",
    camera_penalty: float = 0.0,
    memory_budget: int | str | None = None,
    workers: int = 2,
    scheduler: str | None = None,
    progress: Progress = no_progress,
    should_stop: StopAsked = never,
    log: Log = no_log,
) -> dict:
    """The k-NN graph and DPLM positives of the feature store at ``store``, out of core; returns the report."""
    params = MineParams(
        k=k,
        threshold=threshold,
        min_candidates=min_candidates,
        adjacency=adjacency,
        order=order,
        camera_penalty=camera_penalty,
    )
    return mine_store(
        str(store),
        params,
        memory_budget=as_bytes(memory_budget),
        workers=workers,
        scheduler=scheduler,
        progress=progress,
        should_stop=should_stop,
        log=log,
    )
