"""The feature dictionary: a Zarr v3 group every stage reads and writes.

Layout (all arrays chunked by rows, uncompressed: features do not compress):

    features          (N, D) float16 (or float32)   one L2-normalised row per image
    ids               (N,)   int64   vehicle id, -1 when unknown (diagnostics only)
    camids            (N,)   int64   camera id, -1 when unknown
    keys              (N,)   str     sample key in the shards
    knn/indices       (N, K) int64   sigma_i[0:K]: self first, then by similarity
    knn/similarities  (N, K) float64
    knn/counts        (N,)   int64   C_i, rows with similarity >= threshold (self included)
    positives/indptr  (N+1,) int64   CSR of the mined positives, ascending
    positives/indices (nnz,) int64

Any group with ``features`` (and optionally ``ids``, ``camids``) is a valid
input, so features of other models can be mined or evaluated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from wildreid.errors import StoreError

__all__ = ["CHUNK_BYTES", "FeatureStore", "rows_per_chunk"]

CHUNK_BYTES = 16 << 20  # 8-32 MB row chunks: large sequential reads, few files (see README)


def rows_per_chunk(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // max(1, row_bytes))


class FeatureStore:
    """A thin synchronous wrapper over the Zarr group; ``read_only`` is checked in one place."""

    def __init__(self, path: str | Path, group: zarr.Group, read_only: bool):
        self.path = Path(path)
        self.group = group
        self.read_only = read_only
        if "features" not in group or len(group["features"].shape) != 2:
            raise StoreError(f"{path} has no 2-D 'features' array; expected a store written by wildreid or "
                             "any Zarr group with features (N, D)")  # fmt: skip
        self.features = group["features"]
        n = self.features.shape[0]
        for name in ("ids", "camids"):
            if name in group and group[name].shape != (n,):
                raise StoreError(f"{path}/{name} has shape {group[name].shape}, expected ({n},) to match features")

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> FeatureStore:
        if not Path(path).exists():
            raise StoreError(f"store {path} does not exist; create it with 'wildreid train' or pass a Zarr group")
        try:
            group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+")
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise StoreError(f"{path} is not a Zarr group ({exc})") from None
        return cls(path, group, read_only=mode == "r")

    @classmethod
    def create(
        cls,
        path: str | Path,
        n: int,
        dim: int,
        *,
        dtype: str = "float16",
        ids: np.ndarray | None = None,
        camids: np.ndarray | None = None,
        keys: list[str] | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> FeatureStore:
        if dtype not in ("float16", "float32"):
            raise StoreError(f"feature dtype must be float16 or float32, found {dtype}")
        if Path(path).exists() and any(Path(path).iterdir()):
            raise StoreError(f"{path} exists and is not empty; choose a new store path")
        group = zarr.open_group(str(path), mode="w")
        rows = rows_per_chunk(dim * np.dtype(dtype).itemsize, chunk_bytes)
        group.create_array("features", shape=(n, dim), chunks=(min(rows, max(n, 1)), dim), dtype=dtype,
                           compressors=None, fill_value=0)  # fmt: skip
        for name, values in (("ids", ids), ("camids", camids)):
            arr = group.create_array(name, shape=(n,), chunks=(max(min(n, 1 << 20), 1),), dtype="int64",
                                     compressors=None, fill_value=-1)  # fmt: skip
            if values is not None:
                arr[:] = np.asarray(values, dtype=np.int64)
        if keys is not None:
            arr = group.create_array("keys", shape=(n,), chunks=(max(min(n, 1 << 18), 1),), dtype=str)
            arr[:] = np.asarray(keys, dtype=str)
        group.attrs["wildreid"] = {"format": "wildreid-store", "version": 1, "features_version": 0}
        return cls(path, group, read_only=False)

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")

    # ------------------------------------------------------------------ the data interface

    def count(self) -> int:
        return self.features.shape[0]

    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def chunk_rows(self) -> int:
        return self.features.chunks[0]

    def ids(self) -> np.ndarray:
        return self.group["ids"][:] if "ids" in self.group else np.full(self.count(), -1, dtype=np.int64)

    def camids(self) -> np.ndarray:
        return self.group["camids"][:] if "camids" in self.group else np.full(self.count(), -1, dtype=np.int64)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32."""
        return np.asarray(self.features[start:stop], dtype=np.float32)

    def iter_blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.count(), block_rows):
            yield start, self.read_rows(start, min(start + block_rows, self.count()))

    def write_rows(self, start: int, block: np.ndarray) -> None:
        self._check_writable()
        if block.ndim != 2 or block.shape[1] != self.dim():
            raise StoreError(f"expected rows of dimension {self.dim()}, found shape {block.shape}")
        self.features[start : start + len(block)] = block.astype(self.features.dtype)

    # ------------------------------------------------------------------ provenance

    @property
    def features_version(self) -> int:
        """Bumped by every writer that changes the dictionary, so derived arrays know they are stale."""
        return int(dict(self.group.attrs).get("wildreid", {}).get("features_version", 0))

    def bump_features_version(self) -> None:
        self._check_writable()
        meta = dict(dict(self.group.attrs).get("wildreid", {}))
        meta["features_version"] = int(meta.get("features_version", 0)) + 1
        self.group.attrs["wildreid"] = meta

    def fingerprint(self) -> dict:
        """What derived results (k-NN graph, positives) depend on."""
        return {"n": self.count(), "dim": self.dim(), "dtype": str(self.features.dtype),
                "features_version": self.features_version}  # fmt: skip
