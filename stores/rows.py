"""Row ranges of a store's features read by byte range, without decoding whole Zarr chunks.

Zarr decodes a whole chunk to return any of its rows: reading 2,048 rows (1 MiB)
of a 16 MiB chunk held 16 MiB with an ``out`` array and 32 MiB without (measured,
zarr 3.1.6). Zarr's sharding codec reads parts of a shard, but scanned 2.8x slower
than whole 16 MiB chunks (851 against 2,377 MiB/s, measured) and rewrites a whole
shard for every page a cache writes back. Features are stored uncompressed (the
``bytes`` codec, little-endian, then ``crc32c``), so a row range is a byte range of
its chunk file: :class:`RowReader` reads it straight into the caller's array.

Integrity is not given up: each chunk file is checked once per reader before its
first use, by streaming its crc32c through a small buffer (never a chunk-sized
one); a wrong size or checksum is the same one-line ``DamagedDataError`` a Zarr
read gives. A missing chunk file holds the fill value, as in Zarr. The store's
writer lock keeps other writers out while a reader is in use. Any other layout
(compressed, another codec chain, another byte order) falls back to Zarr's own
whole-chunk reads, one at a time (``partial`` is then false).

:class:`Rows` is the one row interface of wildreid: a row count, a dimension, a dtype,
a row range, ids, and blocks in order. The feature store (a training store or a
feature group), the page cache, the mining dictionary and :class:`ArrayRows` (an
in-memory array) implement it, and evaluation, search, mining, re-ranking and the
camera means read rows only through it.
"""

from __future__ import annotations

import abc
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.codecs import BytesCodec, Crc32cCodec

from wildreid.core.errors import ConfigError, DamagedDataError

__all__ = ["ArrayRows", "RowReader", "Rows", "as_rows", "damage_remedy", "damaged_chunk_error"]

_VERIFY_PIECE = 1 << 20  # bytes read at a time while checking a chunk's crc32c
GATHER_WINDOW_BYTES = 256 << 10  # ids within this span of rows are fetched with one read


class Rows(abc.ABC):
    """Rows of features: ``count()``, ``dim()``, ``dtype`` and ``read(start, stop, out=None)`` (rows in
    ``dtype``) are what an implementation gives; ``read_rows`` (float32), ``gather`` and ``blocks`` follow."""

    dtype: np.dtype

    @abc.abstractmethod
    def count(self) -> int:
        """The number of rows."""

    @abc.abstractmethod
    def dim(self) -> int:
        """The length of a row."""

    @abc.abstractmethod
    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) in ``dtype``, into ``out`` when given."""

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as float32 (the distances of wildreid.distances are float32)."""
        return np.ascontiguousarray(self.read(start, stop), dtype=np.float32)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order, repeats allowed) as a new array: one range read per run of ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(uniq), self.dim()), dtype=self.dtype)
        runs = np.r_[0, np.flatnonzero(np.diff(uniq) != 1) + 1, len(uniq)]
        for a, b in zip(runs[:-1], runs[1:]):
            self.read(int(uniq[a]), int(uniq[b - 1]) + 1, rows[a:b])
        return rows[inverse.reshape(-1)]

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows [start, start + rows))`` over all rows in order; a block is valid until the next one is
        asked for (a store reads every block into one buffer)."""
        if rows < 1:
            raise ConfigError(f"expected blocks of at least 1 row, found {rows}")
        for start in range(0, self.count(), rows):
            yield start, self.read(start, min(self.count(), start + rows))


class ArrayRows(Rows):
    """The row interface over an in-memory (N, D) array: its rows in its own dtype."""

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x)
        if self.x.ndim != 2:
            raise ConfigError(f"expected features of shape (N, D), found shape {self.x.shape}")
        self.dtype = self.x.dtype

    def count(self) -> int:
        return len(self.x)

    def dim(self) -> int:
        return self.x.shape[1]

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        if out is None:
            return self.x[start:stop]
        out[...] = self.x[start:stop]
        return out

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self.x[np.asarray(ids, dtype=np.int64)]


def as_rows(x) -> Rows:
    """``x`` itself when it is :class:`Rows` (a store, a feature group, a page cache), else ArrayRows over it."""
    return x if isinstance(x, Rows) else ArrayRows(x)


def _layout(array) -> bool | None:
    """Whether chunk files end with a crc32c (True / False); None when rows are not plain byte ranges."""
    meta = getattr(array, "metadata", None)
    codecs = tuple(getattr(meta, "codecs", ()) or ())
    if getattr(meta, "zarr_format", None) != 3 or not codecs or sys.byteorder != "little":
        return None
    first, rest = codecs[0], codecs[1:]
    if not isinstance(first, BytesCodec) or (first.endian is not None and first.endian.value != "little"):
        return None
    if rest not in ((), (Crc32cCodec(),)):
        return None
    if not np.dtype(array.dtype).isnative or len(array.shape) != 2 or array.chunks[1] != array.shape[1]:
        return None
    return bool(rest)


def damage_remedy(store_path: Path, name: str) -> str:
    """What to do about a damaged array of a store, by the array's top-level name."""
    top = name.split("/")[0]
    if top == "features":
        return (
            "resume training from its last checkpoint (wildreid train --resume restores the dictionary), "
            "or extract the features again into a new store"
        )
    if top in ("knn", "positives"):
        return f"remove {store_path / top} and run 'wildreid mine' (or training with --resume) to compute it again"
    return "extract the features again into a new store"


def damaged_chunk_error(store_path: Path, name: str, chunk: int, lo: int, hi: int, file: Path, why: str):
    """The one line for a damaged chunk: the array, its rows and file, what is wrong and what to do."""
    return DamagedDataError(
        f"chunk {chunk} of {name} (rows {lo}-{hi - 1}, file {file}) {why}: the store is damaged; "
        f"{damage_remedy(store_path, name)}"
    )


class RowReader:
    """Rows [start, stop) or any ids of a 2-D row-chunked array (a ``CheckedArray``) of the store at ``store_path``.

    Thread-safe: byte-range reads are ``os.pread`` calls; the whole-chunk fallback
    reads one chunk at a time.
    """

    def __init__(self, array, store_path: str | Path):
        self.array = array
        self.store_path = Path(store_path)
        self.n, self.width = array.shape
        self.rows_per_chunk = array.chunks[0]
        self.dtype = np.dtype(array.dtype)
        self.row_bytes = self.width * self.dtype.itemsize
        self.chunk_bytes = self.rows_per_chunk * self.row_bytes
        zarr_array = getattr(array, "array", array)
        checksum = _layout(zarr_array) if os.path.isdir(self.store_path / zarr_array.path) else None
        self.partial = checksum is not None
        self._checksum = bool(checksum)
        self._meta = getattr(zarr_array, "metadata", None)
        self._name = zarr_array.path
        self._fill = array.fill_value if array.fill_value is not None else 0
        self._verified: set[int] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ chunk files

    def _file(self, chunk: int) -> Path:
        return self.store_path / self._name / self._meta.encode_chunk_key((chunk, 0))

    def _damaged(self, chunk: int, why: str) -> DamagedDataError:
        lo, hi = chunk * self.rows_per_chunk, min((chunk + 1) * self.rows_per_chunk, self.n)
        return damaged_chunk_error(self.store_path, self._name, chunk, lo, hi, self._file(chunk), why)

    def _verify(self, chunk: int, fd: int) -> None:
        """Size and crc32c of the chunk file, once per reader (streamed: no chunk-sized buffer)."""
        if chunk in self._verified:
            return
        size = os.fstat(fd).st_size
        expected = self.chunk_bytes + (4 if self._checksum else 0)
        if size != expected:
            raise self._damaged(chunk, f"is truncated or padded ({size} bytes, expected {expected})")
        if self._checksum:
            crc = 0
            for offset in range(0, self.chunk_bytes, _VERIFY_PIECE):
                crc = google_crc32c.extend(crc, os.pread(fd, min(_VERIFY_PIECE, self.chunk_bytes - offset), offset))
            stored = int.from_bytes(os.pread(fd, 4, self.chunk_bytes), "little")
            if crc != stored:
                raise self._damaged(chunk, "fails its checksum")
        with self._lock:
            self._verified.add(chunk)

    def _read_chunk_part(self, chunk: int, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows [lo, hi) of the array (inside ``chunk``) into ``out`` (hi - lo rows, C-contiguous)."""
        try:
            fd = os.open(self._file(chunk), os.O_RDONLY)
        except FileNotFoundError:
            out[...] = self._fill  # Zarr does not write chunks that hold only the fill value
            return
        try:
            self._verify(chunk, fd)
            offset = (lo - chunk * self.rows_per_chunk) * self.row_bytes
            want = (hi - lo) * self.row_bytes
            got = os.preadv(fd, [memoryview(out.reshape(-1).view(np.uint8))], offset)
            if got != want:
                raise self._damaged(chunk, f"became shorter while it was read ({got} of {want} bytes)")
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ rows

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) in the stored dtype, into ``out`` when given (of that dtype and shape)."""
        if out is None:
            out = np.empty((stop - start, self.width), dtype=self.dtype)
        if out.shape != (stop - start, self.width) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous {self.dtype} out array of shape {(stop - start, self.width)}")
        if not self.partial:
            with self._lock:  # one decoded chunk at a time in this process
                out[...] = self.array[start:stop]
            return out
        for chunk in range(start // self.rows_per_chunk, -(-stop // self.rows_per_chunk)):
            lo = max(start, chunk * self.rows_per_chunk)
            hi = min(stop, (chunk + 1) * self.rows_per_chunk)
            self._read_chunk_part(chunk, lo, hi, out[lo - start : hi - start])
        return out

    def gather(self, ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``ids`` (any order, repeats allowed); ids close together are fetched with one read."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if out is None:
            out = np.empty((len(ids), self.width), dtype=self.dtype)
        if not len(ids):
            return out
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        window = self.rows_per_chunk if not self.partial else max(1, GATHER_WINDOW_BYTES // self.row_bytes)
        # one read per aligned window of rows that holds wanted ids, spanning just those ids
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_ids // window)) + 1, len(ids)]
        scratch = np.empty((window, self.width), dtype=self.dtype)
        for a, b in zip(starts[:-1], starts[1:]):
            lo, hi = int(sorted_ids[a]), int(sorted_ids[b - 1]) + 1
            rows = self.read(lo, hi, scratch[: hi - lo])
            out[order[a:b]] = rows[sorted_ids[a:b] - lo]
        return out
