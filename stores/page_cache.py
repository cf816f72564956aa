"""A row-page cache over a chunked 2-D Zarr array, bounded by a byte budget.

A page is one Zarr chunk of rows. Two tiers: host pages (numpy, least recently
used evicted first) and, when ``device_budget`` > 0, "device" pages held as
torch tensors on ``device`` (the pages used most often; on a CUDA machine they
live on the GPU, on the CPU the same code runs with CPU tensors so the tests
cover it). A page lives in exactly one tier. Writes mark a page dirty; dirty
pages are written back when evicted and on :meth:`flush`. :meth:`blocks` reads
pages that are not resident straight from the store without caching them, so a
full pass does not flush the hot set.

Readers that want tensors (:meth:`get_rows_tensor`, :meth:`scan_tensors`) take
device pages as they are, on the device, with no host copy; when the whole array
fits the device budget, :meth:`load_all_to_device` puts it there for good.
``stats`` counts hits per tier, misses, promotions and evictions.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np

from wildreid.core.errors import ConfigError
from wildreid.stores.rows import Rows

__all__ = ["PageCache"]


def _torch():
    # torch only for the device tier: every shard-writing and store-reading process imports wildreid.stores,
    # and a module-level import would cost each of them 1.7 s and about 500 MiB (measured: import of
    # wildreid.stores 0.3 s without torch).
    import torch

    return torch


def _torch_dtype(dtype: np.dtype):
    torch = _torch()

    return {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]


class PageCache(Rows):
    """Pages of a row-chunked array held in a host budget (and hot pages on the device): the row interface
    (``wildreid.stores.rows.Rows``) over the rows it may touch, ``span``."""

    def __init__(
        self,
        array,
        *,
        host_budget: int,
        device_budget: int = 0,
        device="cpu",
        dtype=np.float32,
        promote_after: int = 2,
        span: tuple[int, int] | None = None,
    ):
        self.array = array
        self.rows_per_page = array.chunks[0]
        self.n = array.shape[0]
        # the rows this cache may touch: a rank of a distributed run owns whole pages of its span (wildreid.world)
        self.span = (0, self.n) if span is None else (int(span[0]), int(span[1]))
        lo, hi = self.span
        if not 0 <= lo <= hi <= self.n or lo % self.rows_per_page or (hi % self.rows_per_page and hi != self.n):
            raise ConfigError(
                f"expected a span of whole pages of {self.rows_per_page} rows inside 0..{self.n}, found {lo}..{hi}"
            )
        self.width = array.shape[1]
        self.dtype = np.dtype(dtype)
        self.page_bytes = self.rows_per_page * self.width * self.dtype.itemsize
        if host_budget < self.page_bytes:
            raise ConfigError(
                f"page cache budget {host_budget} bytes cannot hold one page; "
                f"the smallest budget that works is {self.page_bytes} bytes"
            )
        self.host_capacity = host_budget // self.page_bytes
        self.device_capacity = device_budget // self.page_bytes
        self.device = device
        self.promote_after = promote_after
        self.host: OrderedDict[int, np.ndarray] = OrderedDict()
        self.on_device: dict[int, object] = {}
        self.dirty: set[int] = set()
        self.uses: dict[int, int] = {}
        self.stats = {"hits": 0, "device_hits": 0, "misses": 0, "promotions": 0, "evictions": 0, "writebacks": 0}
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ pages

    def _bounds(self, page: int) -> tuple[int, int]:
        start = page * self.rows_per_page
        return start, min(start + self.rows_per_page, self.n)

    def _read_page(self, page: int) -> np.ndarray:
        start, stop = self._bounds(page)
        return np.asarray(self.array[start:stop], dtype=self.dtype)

    def _write_back(self, page: int, values: np.ndarray) -> None:
        start, stop = self._bounds(page)
        self.array[start:stop] = values.astype(self.array.dtype)
        self.dirty.discard(page)
        self.stats["writebacks"] += 1

    def _page(self, page: int) -> np.ndarray:
        """The page's rows as a host array (a copy of the device tensor when it lives there)."""
        resident = self._resident(page)
        return resident if isinstance(resident, np.ndarray) else resident.cpu().numpy()

    def _resident(self, page: int):
        """The page where it lives after this use: a host array, or a tensor on the device."""
        self.uses[page] = self.uses.get(page, 0) + 1
        if page in self.on_device:
            self.stats["hits"] += 1
            self.stats["device_hits"] += 1
            return self.on_device[page]
        if page in self.host:
            self.stats["hits"] += 1
            self.host.move_to_end(page)
            values = self.host[page]
        else:
            self.stats["misses"] += 1
            values = self._read_page(page)
            self._make_room()
            self.host[page] = values
        if self.device_capacity and self.uses[page] >= self.promote_after:
            self._promote(page)
            return self.on_device.get(page, values)
        return values

    def _make_room(self) -> None:
        while len(self.host) >= self.host_capacity:
            page, values = self.host.popitem(last=False)
            self.stats["evictions"] += 1
            if page in self.dirty:
                self._write_back(page, values)

    def _promote(self, page: int) -> None:
        torch = _torch()

        if len(self.on_device) >= self.device_capacity:
            coldest = min(self.on_device, key=lambda p: self.uses.get(p, 0))
            if self.uses.get(coldest, 0) >= self.uses[page]:
                return
            values = self.on_device.pop(coldest).cpu().numpy()
            self._make_room()
            self.host[coldest] = values  # demoted pages keep their dirty mark
        self.on_device[page] = torch.from_numpy(self.host.pop(page)).to(self.device)
        self.stats["promotions"] += 1

    def _pages(self) -> range:
        """The pages of the span."""
        return range(self.span[0] // self.rows_per_page, -(-self.span[1] // self.rows_per_page))

    def _check_rows(self, idx: np.ndarray) -> None:
        lo, hi = self.span
        if len(idx) and (int(idx.min()) < lo or int(idx.max()) >= hi):
            raise ConfigError(
                f"expected rows in this cache's span {lo}..{hi - 1}, found {int(idx.min())}..{int(idx.max())}; "
                "a rank reads and writes only the rows it owns"
            )

    def load_all_to_device(self) -> bool:
        """Put every page of the span on the device when the device budget holds them all (then they stay);
        whether it did."""
        torch = _torch()

        pages = self._pages()
        if not self.device_capacity or len(pages) > self.device_capacity:
            return False
        with self.lock:
            for page in pages:
                if page not in self.on_device:
                    values = self.host.pop(page) if page in self.host else self._read_page(page)
                    self.on_device[page] = torch.from_numpy(values).to(self.device)
                    self.stats["promotions"] += 1
        return True

    # ------------------------------------------------------------------ rows

    def count(self) -> int:
        return self.n

    def dim(self) -> int:
        return self.width

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows ``idx`` (any order, repeats allowed) as a (len(idx), width) array."""
        idx = np.asarray(idx, dtype=np.int64)
        self._check_rows(idx)
        out = np.empty((len(idx), self.width), dtype=self.dtype)
        with self.lock:
            pages = idx // self.rows_per_page
            for page in np.unique(pages):
                sel = np.flatnonzero(pages == page)
                out[sel] = self._page(int(page))[idx[sel] - page * self.rows_per_page]
        return out

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) through the cache (pages stay resident while the budget allows).

        ``out`` (stop - start, width), of any dtype, receives them (converted while copied)
        and is returned; without it a new array of the cache's dtype is.
        """
        if stop > start:
            self._check_rows(np.array([start, stop - 1]))
        if out is None:
            out = np.empty((stop - start, self.width), dtype=self.dtype)
        elif out.shape != (stop - start, self.width):
            raise ConfigError(f"expected an out array of shape {(stop - start, self.width)}, found {out.shape}")
        with self.lock:
            for page in range(start // self.rows_per_page, -(-stop // self.rows_per_page)):
                lo, hi = self._bounds(page)
                a, b = max(lo, start), min(hi, stop)
                out[a - start : b - start] = self._page(page)[a - lo : b - lo]
        return out

    def get_rows_tensor(self, idx: np.ndarray, device=None):
        """Rows ``idx`` as a torch tensor on ``device`` (default: the cache's device), in the cache's dtype.

        Rows of device pages are gathered on the device; only host rows cross over.
        """
        torch = _torch()

        device = torch.device(device or self.device)
        idx = np.asarray(idx, dtype=np.int64)
        self._check_rows(idx)
        if not self.on_device and not self.device_capacity:
            return torch.from_numpy(self.gather(idx)).to(device)
        out = torch.empty((len(idx), self.width), dtype=_torch_dtype(self.dtype), device=device)
        with self.lock:
            pages = idx // self.rows_per_page
            for page in np.unique(pages):
                sel = np.flatnonzero(pages == page)
                resident = self._resident(int(page))
                local = idx[sel] - page * self.rows_per_page
                if isinstance(resident, np.ndarray):
                    rows = torch.from_numpy(resident[local]).to(device)
                else:
                    rows = resident[torch.from_numpy(local).to(resident.device)].to(device)
                out[torch.from_numpy(sel).to(device)] = rows
        return out

    def set_rows(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Overwrite rows; the store sees them at eviction or :meth:`flush`."""
        idx = np.asarray(idx, dtype=np.int64)
        self._check_rows(idx)
        values = np.asarray(values, dtype=self.dtype)
        with self.lock:
            pages = idx // self.rows_per_page
            for page in np.unique(pages):
                page = int(page)
                sel = np.flatnonzero(pages == page)
                self._page(page)
                local = idx[sel] - page * self.rows_per_page
                if page in self.on_device:
                    torch = _torch()

                    self.on_device[page][torch.from_numpy(local)] = torch.from_numpy(values[sel]).to(self.device)
                else:
                    self.host[page][local] = values[sel]
                self.dirty.add(page)

    def blocks(self, block_rows: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, rows) over the span in order, resident (possibly dirty) pages included."""
        block_rows = block_rows or self.rows_per_page
        if block_rows % self.rows_per_page:
            raise ConfigError(f"blocks must be whole pages of {self.rows_per_page} rows, found {block_rows}")
        for start in range(self.span[0], self.span[1], block_rows):
            stop = min(start + block_rows, self.span[1])
            with self.lock:
                block = np.empty((stop - start, self.width), dtype=self.dtype)
                for page in range(start // self.rows_per_page, -(-stop // self.rows_per_page)):
                    lo, hi = self._bounds(page)
                    resident = self.on_device.get(page)
                    resident = resident.cpu().numpy() if resident is not None else self.host.get(page)
                    # resident pages may be dirty: they, not the store, hold the rows
                    block[lo - start : hi - start] = resident if resident is not None else self._read_page(page)
            yield start, block

    def scan_tensors(self, device) -> Iterator[tuple[int, object]]:
        """(start, float32 tensor on ``device``) page by page, as :meth:`blocks`; device pages are used in place."""
        torch = _torch()

        device = torch.device(device)
        for start in range(self.span[0], self.span[1], self.rows_per_page):
            page = start // self.rows_per_page
            with self.lock:
                resident = self.on_device.get(page)
                if resident is not None:
                    block = resident.to(device).float()
                else:
                    values = self.host.get(page)
                    values = values if values is not None else self._read_page(page)
                    block = torch.from_numpy(values).to(device).float()
            yield start, block

    def flush(self) -> None:
        with self.lock:
            for page in sorted(self.dirty):
                values = self.on_device[page].cpu().numpy() if page in self.on_device else self.host[page]
                self._write_back(page, values)

    @property
    def resident_bytes(self) -> int:
        return (len(self.host) + len(self.on_device)) * self.page_bytes
