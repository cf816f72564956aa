"""Feature groups: the one way to open one for reading and the one way to open or make one for writing.

A feature group is a :class:`~wildreid.stores.dictionary.FeatureStore` holding the
features of a set of images (``wildreid embed``, the extraction of ``wildreid eval``),
as opposed to a training store with its dictionary, graph and checkpoints. Readers
(eval, search) take only whole groups: they exist, have rows, and their extraction
finished; writers resume a group of the same shape or make a new one.
"""

from __future__ import annotations

from pathlib import Path

from wildreid.core.errors import StoreError
from wildreid.stores.dictionary import FeatureStore
from wildreid.stores.lock import LOCK_NAME

__all__ = ["open_group", "writable_group"]


def open_group(path, what: str, *, labels: bool = False) -> FeatureStore:
    """The ``what`` group at ``path`` checked whole: it exists, has rows, its extraction finished and, with
    ``labels``, it has the ids and camera ids of its rows (the evaluation needs them)."""
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
    if labels:
        for name in ("ids", "camids"):
            if not store.has(name):
                raise StoreError(
                    f"{what} group {path} has no '{name}' array; expected vehicle ids and camera ids "
                    "per row: extract features from shards that carry them"
                )
        if (store.ids() < 0).all():
            raise StoreError(
                f"{what} group {path} has only unknown ids (-1); expected the vehicle id of each row "
                "to evaluate: extract features from labelled shards"
            )
    return store


def writable_group(path: Path, rows: int, dim: int, *, chunk_bytes: int | None = None, other: str) -> FeatureStore:
    """The group at ``path`` for writing: made when new (the writer's lock file aside), else opened and checked
    to hold ``rows`` x ``dim`` features; ``other`` names the option that picks another place."""
    path = Path(path)
    if not any(p.name != LOCK_NAME for p in path.iterdir()):
        return FeatureStore.create(path, rows, dim, **({} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}))
    store = FeatureStore.open(path, mode="r+")
    if (store.count(), store.dim()) != (rows, dim):
        raise StoreError(
            f"{path} holds {store.count():,} x {store.dim()} features but needs {rows:,} x {dim}; "
            f"delete it or choose another {other}"
        )
    return store
