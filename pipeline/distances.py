"""The one distance every evaluation, re-ranking and search path computes.

Distance, defined once (``grid_distances``): squared Euclidean
``d = max(0, (|q|^2 + |g|^2) - 2 q.g)`` in float32 (for L2-normalised features
the same order as Euclidean distance and as descending cosine similarity),
with ``q.g`` from a float32 matrix product over *tiles of a fixed grid*:
query rows in tiles of ``tile[0]`` from row 0, gallery rows in tiles of
``tile[1]`` from row 0. BLAS may round one pair differently depending on the
shape of the product, so every path computes every tile whole with the same
shape, and a pair's distance is the same bits in the dense reference and in
any blocking of the blockwise path (blocks are multiples of the tiles). A
``device`` other than "cpu" computes the tiles with torch on that device; its
rounding may differ from the CPU's, so compare results within one device.
"""

from __future__ import annotations

import numpy as np
import torch

from wildreid.core.errors import BudgetError, ConfigError, StoreError

__all__ = [
    "COUNT_CHUNK",
    "TILE",
    "check_tile",
    "grid_distances",
    "plan_query_rows",
    "squared_norms",
]

TILE = (256, 16384)  # (query rows, gallery rows) of one matrix product: few BLAS calls, each near full speed
COUNT_CHUNK = 1 << 17  # strip elements per counting step of the evaluation: 12 bytes of temporaries each


def squared_norms(x: np.ndarray) -> np.ndarray:
    """|x|^2 per row: float64 sums (a fixed order per row) rounded to float32; float64 copies of 2M values at most."""
    x = np.asarray(x)
    out = np.empty(len(x), dtype=np.float32)
    step = max(1, (1 << 21) // max(1, x.shape[1] if x.ndim == 2 else 1))
    for a in range(0, len(x), step):
        x64 = x[a : a + step].astype(np.float64)
        out[a : a + step] = np.einsum("ij,ij->i", x64, x64)
    return out


def check_tile(tile) -> tuple[int, int]:
    tq, tg = (int(t) for t in tile)
    if tq < 1 or tg < 1:
        raise ConfigError(f"expected tile sizes >= 1, found {tile}")
    return tq, tg


def grid_distances(x, x0: int, y, y0: int, *, tile=TILE, device: str = "cpu", y_norms=None, out=None) -> np.ndarray:
    """Float32 squared distances of rows x[x0:...] to rows y[y0:...] of two row spaces, tile by tile.

    ``x0`` must be a multiple of ``tile[0]`` and ``y0`` of ``tile[1]``; a block that does not end at the
    end of its row space must end on a tile boundary too (the caller guarantees it), so each pair is
    computed inside the very tile the dense reference uses. ``y_norms``: ``squared_norms(y)`` when the
    caller keeps them (a cached gallery); ``out``: a float32 (len(x), len(y)) array (or view) to fill.
    """
    tq, tg = check_tile(tile)
    if x0 % tq or y0 % tg:
        raise ConfigError(f"blocks must start on the tile grid {tile}, found starts {x0} and {y0}")
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise StoreError(f"expected two (n, D) blocks with the same D, found shapes {x.shape} and {y.shape}")
    xn, yn = squared_norms(x), squared_norms(y) if y_norms is None else y_norms
    if out is None:
        out = np.empty((len(x), len(y)), dtype=np.float32)
    elif out.shape != (len(x), len(y)) or out.dtype != np.float32:
        raise ConfigError(f"expected out of shape {(len(x), len(y))} float32, found {out.shape} {out.dtype}")
    if device == "cpu":
        xm2 = x * np.float32(-2.0)  # exact: -2 (q.g) is the product of -2q and g
        buf = np.empty(min(tq, len(x)) * min(tg, len(y)), dtype=np.float32)
        for a in range(0, len(x), tq):
            for b in range(0, len(y), tg):
                xa, yb = xm2[a : a + tq], y[b : b + tg]
                t = buf[: len(xa) * len(yb)].reshape(len(xa), len(yb))  # contiguous: a strided out= skips BLAS
                np.matmul(xa, yb.T, out=t)
                t += xn[a : a + tq, None]
                o = out[a : a + tq, b : b + tg]
                np.add(t, yn[None, b : b + tg], out=o)
                np.maximum(o, 0.0, out=o)
        return out
    xt, yt = torch.from_numpy(x).to(device) * -2.0, torch.from_numpy(y).to(device)
    xnt, ynt = torch.from_numpy(xn).to(device), torch.from_numpy(yn).to(device)
    res = torch.empty((len(x), len(y)), dtype=torch.float32, device=device)
    for a in range(0, len(x), tq):
        for b in range(0, len(y), tg):
            t = xt[a : a + tq] @ yt[b : b + tg].T
            res[a : a + tq, b : b + tg] = ((t + xnt[a : a + tq, None]) + ynt[None, b : b + tg]).clamp_min_(0.0)
    out[...] = res.cpu().numpy()
    return out


def plan_query_rows(row_bytes: int, budget: int, *, tile_q: int, n_query: int, fixed: int = 0) -> int:
    """Queries per strip: the most multiples of ``tile_q`` whose strips (``row_bytes`` per query) fit the budget left.

    Never more than the queries need; a query set shorter than a tile needs room for its own rows only.
    """
    room = budget - fixed - COUNT_CHUNK * 24
    rows = room // max(1, row_bytes) // tile_q * tile_q
    least = max(1, min(tile_q, n_query))
    if rows < tile_q and room < least * row_bytes:
        need = fixed + COUNT_CHUNK * 24 + least * row_bytes
        raise BudgetError(
            f"memory budget of {budget} bytes is too small: a strip of {least} queries against the "
            f"gallery needs {need} bytes; raise --memory-budget to at least that",
            need,
        )
    return int(max(tile_q, min(rows, -(-n_query // tile_q) * tile_q)))
