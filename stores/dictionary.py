"""The feature dictionary: a Zarr v3 group every stage reads and writes through this class.

Layout (all arrays chunked by rows; every array wildreid writes ends its codec
chain with crc32c, so a damaged chunk is found on read):

    features          (N, D) float16 (or float32)   one L2-normalised row per image
    ids               (N,)   int64   vehicle id, -1 when unknown (diagnostics only)
    camids            (N,)   int64   camera id, -1 when unknown
    keys              (N,)   str     the row's image: its source path (wildreid embed), or sample key
    knn/, positives/  the k-NN graph and the DPLM positives (wildreid.stores.derived)
    .wildreid.lock    the writer lock (wildreid.stores.lock)

Any group with ``features`` (and optionally ``ids``, ``camids``) is a valid
input, so features of other models can be mined or evaluated; stores written
before checksums existed open and read as before.

``features_version`` (a root attribute) is bumped before every write to the
features (rows, page write-backs, a restored checkpoint), so a k-NN graph whose
fingerprint names an older version is never taken for one of these features.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from wildreid.core.durable import DurableLocalStore, fsync_dir, fsync_tree, remove_tree
from wildreid.core.errors import DamagedDataError, StoreError, WildreidError
from wildreid.stores.lock import LOCK_NAME
from wildreid.stores.rows import RowReader, Rows, damage_remedy, damaged_chunk_error

__all__ = ["CHUNK_BYTES", "CheckedArray", "FeatureStore", "create_checked_array", "rows_per_chunk"]

CHUNK_BYTES = 16 << 20  # 8-32 MB row chunks: large sequential reads, few files (see README)


def rows_per_chunk(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // max(1, row_bytes))


def create_checked_array(group: zarr.Group, name: str, *, compress: bool = False, **kwargs) -> zarr.Array:
    """``group.create_array`` with a crc32c checksum after the (optional) zstd compression."""
    codecs = [ZstdCodec(), Crc32cCodec()] if compress else [Crc32cCodec()]
    return group.create_array(name, compressors=codecs, **kwargs)


class CheckedArray:
    """A Zarr array whose reads turn a damaged chunk (checksum, truncation) into one DamagedDataError.

    Everything else (``shape``, ``chunks``, ``dtype``, writes) is the array's own; ``on_write``
    runs before every write.
    """

    def __init__(self, array: zarr.Array, store_path: Path, on_write=None):
        self.array = array
        self.store_path = store_path
        self.on_write = on_write

    def __getattr__(self, name):
        return getattr(self.array, name)

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getitem__(self, selection):
        try:
            return self.array[selection]
        except WildreidError:
            raise
        except Exception:  # zarr's decoders raise ValueError, RuntimeError, ... for a bad chunk
            damaged = self._find_damage(selection)
            if damaged is None:
                raise  # every chunk reads alone: not damage, a real bug
            raise damaged from None

    def __setitem__(self, selection, values) -> None:
        if self.on_write is not None:
            self.on_write()
        self.array[selection] = values

    def _find_damage(self, selection) -> DamagedDataError | None:
        rows = self.array.chunks[0]
        first = selection[0] if isinstance(selection, tuple) else selection
        if isinstance(first, slice):
            start, stop, _ = first.indices(self.array.shape[0])
            chunks = range(start // rows, -(-stop // rows))
        elif first is Ellipsis:
            chunks = range(-(-self.array.shape[0] // rows))
        else:
            chunks = np.unique(np.atleast_1d(np.asarray(first, dtype=np.int64)) // rows).tolist()
        for chunk in chunks:
            lo, hi = chunk * rows, min((chunk + 1) * rows, self.array.shape[0])
            try:
                self.array[lo:hi]
            except Exception as exc:
                why = "fails its checksum" if "checksum" in str(exc) else f"cannot be decoded ({exc})"
                key = "/".join(["c", str(chunk)] + ["0"] * (len(self.array.shape) - 1))
                name = self.array.path
                return damaged_chunk_error(self.store_path, name, chunk, lo, hi, self.store_path / name / key, why)
        return None


class FeatureStore(Rows):
    """The only door to a store's Zarr group; ``read_only`` is checked in one place.

    Its ``features`` are :class:`~wildreid.stores.rows.Rows`, read by byte range (``RowReader``).
    """

    def __init__(self, path: str | Path, group: zarr.Group, read_only: bool, meta_writer: bool = True):
        self.path = Path(path)
        self.group = group
        self.read_only = read_only
        # False on the other ranks of a distributed run: they write their own feature chunks only, while
        # rank 0 alone rewrites the group's attributes (two writers of one zarr.json would lose updates)
        self.meta_writer = meta_writer
        if not self.has("features") or len(self._node("features").shape) != 2:
            raise StoreError(
                f"{path} has no 2-D 'features' array; expected a store written by wildreid or "
                "any Zarr group with features (N, D)"
            )
        self.features = self.array("features")
        self._reader: RowReader | None = None
        n = self.features.shape[0]
        for name in ("ids", "camids", "keys"):
            if self.has(name) and self._node(name).shape != (n,):
                raise StoreError(f"{path}/{name} has shape {self._node(name).shape}, expected ({n},) to match features")

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | Path, mode: str = "r", *, meta_writer: bool = True) -> FeatureStore:
        if not Path(path).exists():
            raise StoreError(f"store {path} does not exist; create it with 'wildreid train' or pass a Zarr group")
        if mode != "r":
            _finish_features_swap(Path(path))
        elif not (Path(path) / "features").exists() and (Path(path) / "features.old").exists():
            raise StoreError(
                f"{path} was interrupted while restoring a checkpoint's dictionary; "
                "run 'wildreid train --resume' (or open it for writing) to finish that"
            )
        try:
            read_only = mode == "r"
            group = zarr.open_group(
                store=DurableLocalStore(str(path), read_only=read_only), mode="r" if read_only else "r+"
            )
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise StoreError(f"{path} is not a Zarr group ({exc})") from None
        return cls(path, group, read_only=mode == "r", meta_writer=meta_writer)

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
        path = Path(path)
        if path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
            raise StoreError(f"{path} exists and is not empty; choose a new store path")
        path.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(store=DurableLocalStore(str(path)), mode="a")  # "w" would also clear the lock file
        rows = rows_per_chunk(dim * np.dtype(dtype).itemsize, chunk_bytes)
        create_checked_array(
            group, "features", shape=(n, dim), chunks=(min(rows, max(n, 1)), dim), dtype=dtype, fill_value=0
        )
        for name, values in (("ids", ids), ("camids", camids)):
            arr = create_checked_array(
                group, name, shape=(n,), chunks=(max(min(n, 1 << 20), 1),), dtype="int64", fill_value=-1
            )
            if values is not None:
                arr[:] = np.asarray(values, dtype=np.int64)
        if keys is not None:
            arr = create_checked_array(group, "keys", shape=(n,), chunks=(max(min(n, 1 << 18), 1),), dtype=str)
            arr[:] = np.asarray(keys, dtype=str)
        group.attrs["wildreid"] = {"format": "wildreid-store", "version": 1, "features_version": 0}
        return cls(path, group, read_only=False)

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreError(f"store {self.path} is open read-only")

    def _node(self, name: str):
        """The array or group ``name``; damaged metadata (``zarr.json``) is one DamagedDataError."""
        try:
            return self.group[name]
        except KeyError:
            raise
        except Exception as exc:  # a truncated or garbled zarr.json: JSON, codec or shape errors
            raise DamagedDataError(
                f"{self.path / name / 'zarr.json'} cannot be read ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:120] if str(exc) else ''}): the store's metadata "
                f"is damaged; {damage_remedy(self.path, name)}"
            ) from None

    def has(self, name: str) -> bool:
        """Whether the store holds the array or group ``name`` (e.g. ``ids``, ``knn/indices``)."""
        try:
            self._node(name)
        except KeyError:
            return False
        return True

    def array(self, name: str) -> CheckedArray:
        """The array ``name`` (e.g. ``knn/indices``), its reads checked; writes to ``features`` bump its version."""
        try:
            node = self._node(name)
        except KeyError:
            raise StoreError(f"{self.path} has no array {name!r}; expected it from an earlier stage") from None
        on_write = self.bump_features_version if name == "features" and self.meta_writer else None
        return CheckedArray(node, self.path, on_write)

    def group_of(self, name: str) -> zarr.Group:
        """The derived group ``name`` (``knn``, ``positives``), its metadata checked."""
        return self._node(name)

    # ------------------------------------------------------------------ the data interface

    def count(self) -> int:
        return self.features.shape[0]

    def dim(self) -> int:
        return self.features.shape[1]

    @property
    def chunk_rows(self) -> int:
        return self.features.chunks[0]

    def row_reader(self, name: str = "features") -> RowReader:
        """Byte-range reads of the 2-D array ``name`` (``wildreid.stores.rows``): no whole-chunk buffers."""
        return RowReader(self.array(name), self.path)

    def ids(self) -> np.ndarray:
        return self.array("ids")[:] if self.has("ids") else np.full(self.count(), -1, dtype=np.int64)

    def camids(self) -> np.ndarray:
        return self.array("camids")[:] if self.has("camids") else np.full(self.count(), -1, dtype=np.int64)

    def keys(self, rows=None) -> np.ndarray:
        """The ``keys`` of all rows (or of the row numbers ``rows``), strings; the row numbers as text without them."""
        rows = np.arange(self.count()) if rows is None else np.asarray(rows, dtype=np.int64)
        if not self.has("keys"):
            return rows.astype(str)
        return np.asarray(self.array("keys")[rows]) if len(rows) else np.array([], dtype=str)

    def write_keys(self, keys) -> None:
        """Replace the whole ``keys`` array with one string per row (the array is made when missing)."""
        self._check_writable()
        keys = np.asarray(keys)
        keys = keys.astype(str) if keys.dtype == object or not len(keys) else keys
        n = self.count()
        if keys.shape != (n,):
            raise StoreError(f"expected {n} keys (one per row) for {self.path}, found shape {keys.shape}")
        if not self.has("keys"):
            create_checked_array(self.group, "keys", shape=(n,), chunks=(max(min(n, 1 << 18), 1),), dtype=str)
        self.group["keys"][:] = keys

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.features.dtype)

    def _rows(self) -> RowReader:
        if self._reader is None:  # one reader: each chunk file's crc32c is checked once, at its first read
            self._reader = self.row_reader()
        return self._reader

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of ``features`` in the stored dtype."""
        return self._rows().read(start, stop, out)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        return self._rows().gather(ids)

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        if rows < 1:
            raise StoreError(f"expected blocks of at least 1 row, found {rows}")
        buf = np.empty((max(1, min(rows, self.count())), self.dim()), dtype=self.dtype)  # one buffer, reused
        for start in range(0, self.count(), rows):
            stop = min(self.count(), start + rows)
            yield start, self.read(start, stop, buf[: stop - start])

    def write_rows(self, start: int, block: np.ndarray) -> None:
        self._check_writable()
        if block.ndim != 2 or block.shape[1] != self.dim():
            raise StoreError(f"expected rows of dimension {self.dim()}, found shape {block.shape}")
        self.features[start : start + len(block)] = block.astype(self.features.dtype)
        self._reader = None  # the chunks written are checked again at their next read

    def write_labels(self, start: int, ids: np.ndarray, camids: np.ndarray) -> None:
        self._check_writable()
        self.group["ids"][start : start + len(ids)] = ids
        self.group["camids"][start : start + len(camids)] = camids

    # ------------------------------------------------------------------ attributes

    def meta(self, name: str, default=None):
        """The root attribute ``name`` (e.g. ``train_run``, ``extraction``)."""
        return dict(self.group.attrs).get(name, default)

    def set_meta(self, name: str, value) -> None:
        self._check_meta_writer()
        self.group.attrs[name] = value

    def _check_meta_writer(self) -> None:
        self._check_writable()
        if not self.meta_writer:
            raise StoreError(f"{self.path}: only rank 0 of a distributed run writes the store's attributes")

    # ------------------------------------------------------------------ provenance

    @property
    def features_version(self) -> int:
        """Bumped by every writer that changes the dictionary, so derived arrays know they are stale."""
        return int(self.meta("wildreid", {}).get("features_version", 0))

    def bump_features_version(self) -> None:
        self._check_meta_writer()
        meta = dict(self.meta("wildreid", {}))
        meta["features_version"] = int(meta.get("features_version", 0)) + 1
        self.group.attrs["wildreid"] = meta

    def fingerprint(self) -> dict:
        """What derived results (k-NN graph, positives) depend on."""
        return {
            "n": self.count(),
            "dim": self.dim(),
            "dtype": str(self.features.dtype),
            "features_version": self.features_version,
        }

    # ------------------------------------------------------------------ features as a whole

    def replace_features(self, source: Path) -> None:
        """Make a copy of the array folder ``source`` (a checkpoint's dictionary) the store's ``features``.

        Crash-safe: the copy is made and fsynced as ``features.restore`` first; a kill -9
        between the two renames that follow leaves ``features.old`` or ``features.restore``,
        and the next opening for writing finishes or undoes the swap, so the store is never
        left without features.
        """
        self._check_writable()
        self.bump_features_version()
        building, incoming = self.path / "features.copying", self.path / "features.restore"
        remove_tree(building)
        shutil.copytree(source, building)
        fsync_tree(building)
        building.rename(incoming)
        fsync_dir(self.path)
        outgoing = self.path / "features.old"
        remove_tree(outgoing)
        (self.path / "features").rename(outgoing)
        fsync_dir(self.path)
        incoming.rename(self.path / "features")
        fsync_dir(self.path)
        remove_tree(outgoing)
        self.group = zarr.open_group(store=DurableLocalStore(str(self.path)), mode="r+")
        self.features = self.array("features")
        self._reader = None

    def remove(self, name: str) -> None:
        """Remove a derived group or array (``knn``, ``positives``, ``positives/parts``), durably."""
        self._check_writable()
        remove_tree(self.path / name)
        self.group = zarr.open_group(store=DurableLocalStore(str(self.path)), mode="r+")
        self.features = self.array("features")
        self._reader = None


def _finish_features_swap(path: Path) -> None:
    """Complete or undo a ``replace_features`` that a crash interrupted (see there)."""
    features, incoming, outgoing = path / "features", path / "features.restore", path / "features.old"
    if not features.exists():
        if incoming.exists():
            incoming.rename(features)  # the copy was whole before the first rename: finish the swap
        elif outgoing.exists():
            outgoing.rename(features)
        else:
            return
        fsync_dir(path)
    for leftover in (path / "features.copying", incoming, outgoing):
        remove_tree(leftover)
