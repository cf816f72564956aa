"""Zarr feature dictionary, page cache, k-NN graph and positives."""

from wildreid.stores.dictionary import CHUNK_BYTES, FeatureStore, rows_per_chunk
from wildreid.stores.page_cache import PageCache

__all__ = ["CHUNK_BYTES", "FeatureStore", "PageCache", "rows_per_chunk"]
