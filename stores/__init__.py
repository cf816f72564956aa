"""Zarr feature dictionary, page cache, k-NN graph and positives (see the mining issue)."""
