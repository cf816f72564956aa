"""Zarr feature dictionary, page cache, k-NN graph and positives, writer locks and durable writes."""

from wildreid.core.durable import atomic_write, fsync_dir, fsync_tree, publish, remove_tree
from wildreid.stores.dictionary import CHUNK_BYTES, CheckedArray, FeatureStore, create_checked_array, rows_per_chunk
from wildreid.stores.groups import open_group, writable_group
from wildreid.stores.lock import LOCK_NAME, WriterLock
from wildreid.stores.page_cache import PageCache

__all__ = [
    "CHUNK_BYTES",
    "LOCK_NAME",
    "CheckedArray",
    "FeatureStore",
    "PageCache",
    "WriterLock",
    "atomic_write",
    "create_checked_array",
    "fsync_dir",
    "fsync_tree",
    "open_group",
    "publish",
    "remove_tree",
    "rows_per_chunk",
    "writable_group",
]
