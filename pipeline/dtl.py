"""Dictionary-based triplet loss (DTL) of SSML-FD, dense reference and streaming form.

For a batch of features x (B, D) (L2-normalised, with grad), the dictionary
M (N, D), each x_b's own row y_b and its positives P_b (y_b always in P_b),
ratio r and margin weight delta:

1. z_bj = x_b . m_j for every row j;
2. the negatives of b are the rows not in P_b; h_b = floor(r * (N - |P_b|));
3. H_b = the h_b negatives with the largest z_bj, ties by ascending row index;
4. loss_b = mean_{j in P_b} (1 - z_bj)^2 + delta * mean_{j in H_b} (1 + z_bj)^2
   (the second term is 0 when H_b is empty); loss = mean_b loss_b.

``dtl_dense`` computes all of z with grad (tests, small N). The streaming form
splits the work: ``hard_negatives`` streams dictionary blocks without grad and
keeps a running top-h_max per batch element; ``dtl_loss`` then recomputes z with
grad on the positives and the selected rows only, fetched through a
``rows_fn(indices) -> (len(indices), D)`` callback, in chunks, both forward and
backward (``gathered_dot``), so device memory holds a chunk of rows and not the
(B, h, D) gather. Both forms give the same loss and the same gradient.

Ties are decided on the z values as computed: rows with exactly equal z go by
ascending index in both forms. Blocked and full products round alike for exactly
representable data; for general floats a block may round z one ulp differently
from the full product, which only matters for rows whose z differ by an ulp.

``graph_negatives`` is the approximate selection for dictionaries beyond the
device budget: H_b is taken among the candidates C_b = the row's k-NN graph
neighbours minus P_b, as the min(h_b, |C_b|) candidates with the largest z
(same order), with z computed live for those rows only; with C_b = every
negative it is the exact H_b.

Over a dictionary split in spans of rows (the ranks of a distributed run): ``span_candidates``
gives each span's best h_b candidates, ``select_hard`` merges them into exactly H_b, and
``dtl_partial`` gives each span's share of the loss (its terms over the global |P_b| and |H_b|),
so the shares and their gradients add up to ``dtl_loss``.

Camera-aware terms (``Cameras``: the camera of every dictionary row, ``camera:`` in the config):

* own-camera negatives: with share o > 0, O_b = the h^o_b = min(floor(o * h_b), negatives in
  the anchor's camera) rows of the anchor's camera outside P_b with the largest z (same order),
  and H_b = O_b plus the first h_b - |O_b| rows of the usual order that are not in O_b, so
  |H_b| stays h_b and a share of it is the same-camera confusers;
* inter-camera term: with weight w > 0, loss_b gains w * mean_{j in P_b, cam_j != cam_b} (1 - z_bj)^2
  (0 when every positive shares the anchor's camera): positives seen by other cameras are pulled in.

Positives come as a CSR over the batch: ``pos_indices[pos_indptr[b]:pos_indptr[b + 1]]``
are P_b (unique, any order). ``batch_positives`` cuts it from the store's CSR;
``self_positives`` gives the warm-up {y_b}.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from wildreid.core.errors import ConfigError

__all__ = [
    "Cameras",
    "Candidates",
    "batch_positives",
    "combine_own",
    "dtl_dense",
    "dtl_loss",
    "dtl_partial",
    "dtl_streaming",
    "gathered_dot",
    "graph_negatives",
    "hard_negative_counts",
    "hard_negatives",
    "momentum_update",
    "own_negative_counts",
    "select_hard",
    "self_positives",
    "span_candidates",
    "tensor_blocks",
    "tensor_rows",
]

RowsFn = Callable[[torch.Tensor], "torch.Tensor | np.ndarray"]

DEFAULT_CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Cameras:
    """The camera-aware pieces of DTL: ``row_cams`` (N,) the camera of every dictionary row (a tensor on the
    loss's device), ``own_share`` o of the hard negatives from the anchor's camera, ``inter_weight`` w."""

    row_cams: torch.Tensor
    own_share: float = 0.0
    inter_weight: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.own_share < 1.0:
            raise ConfigError(f"expected an own-camera share in [0, 1), found {self.own_share}")
        if self.inter_weight < 0:
            raise ConfigError(f"expected an inter-camera weight >= 0, found {self.inter_weight}")
        if self.row_cams.ndim != 1:
            raise ConfigError(f"expected one camera per dictionary row, found shape {tuple(self.row_cams.shape)}")

    def of(self, rows: torch.Tensor) -> torch.Tensor:
        return self.row_cams[rows.to(self.row_cams.device)].to(rows.device)

    @functools.cached_property
    def sizes(self) -> torch.Tensor:
        """Rows per camera, indexed by camera id (counted once: the hard-negative scan asks every step)."""
        return torch.bincount(self.row_cams.long())


# --------------------------------------------------------------------------- positives


def _long(a, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a, device=device).long()


def self_positives(rows, device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Warm-up positives P_b = {y_b}: CSR ``(indptr (B+1,), indices (B,))``."""
    rows = _long(rows, torch.device(device) if device is not None else _device_of(rows))
    return torch.arange(len(rows) + 1, device=rows.device), rows.clone()


def batch_positives(indptr, indices, rows, device: str | torch.device | None = None):
    """The batch's slice ``(pos_indptr, pos_indices)`` of the store's CSR of positives (numpy or torch).

    Only the batch's rows of the CSR are touched, where the CSR lives (O(B + its positives) per
    step, never a conversion of the N-row CSR); the slice then moves to ``device``.
    """
    device = torch.device(device) if device is not None else _device_of(rows)
    home = indptr.device if isinstance(indptr, torch.Tensor) else torch.device("cpu")
    rows = _long(rows, home)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= len(indptr) - 1):
        raise ConfigError(
            f"expected batch rows in 0..{len(indptr) - 2}, found {rows.min()}..{rows.max()}; "
            "the positives belong to another dictionary"
        )
    starts, stops = _take(indptr, rows), _take(indptr, rows + 1)
    counts = stops - starts
    out_ptr = torch.zeros(len(rows) + 1, dtype=torch.long, device=home)
    out_ptr[1:] = torch.cumsum(counts, 0)
    seg = torch.repeat_interleave(torch.arange(len(rows), device=home), counts)
    offsets = torch.arange(int(out_ptr[-1]), device=home) - out_ptr[seg]
    return out_ptr.to(device), _take(indices, starts[seg] + offsets).to(device)


def _take(a, at: torch.Tensor) -> torch.Tensor:
    """``a[at]`` as a long tensor beside ``at``, for ``a`` a numpy array or a tensor on ``at``'s device."""
    if isinstance(a, torch.Tensor):
        return a[at].long()
    return torch.from_numpy(np.asarray(a[at.numpy()], dtype=np.int64))


def _device_of(a) -> torch.device:
    return a.device if isinstance(a, torch.Tensor) else torch.device("cpu")


def _segments(indptr: torch.Tensor) -> torch.Tensor:
    """Batch element of each CSR entry."""
    b = len(indptr) - 1
    return torch.repeat_interleave(torch.arange(b, device=indptr.device), indptr[1:] - indptr[:-1])


def _check_positives(rows: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, n: int) -> torch.Tensor:
    """Segment of every positive; ConfigError unless the CSR is well formed, unique per row and holds y_b."""
    b = len(rows)
    if len(indptr) != b + 1 or int(indptr[0]) != 0 or int(indptr[-1]) != len(indices):
        raise ConfigError(
            f"expected a positives CSR with indptr of length {b + 1} from 0 to {len(indices)}, "
            f"found length {len(indptr)} ending at {int(indptr[-1]) if len(indptr) else None}"
        )
    if bool((indptr[1:] < indptr[:-1]).any()):
        raise ConfigError("expected a non-decreasing positives indptr; build it with batch_positives")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ConfigError(
            f"expected positive rows in 0..{n - 1}, found {int(indices.min())}..{int(indices.max())}; "
            "mine the positives of this dictionary again"
        )
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ConfigError(f"expected batch rows in 0..{n - 1}, found {int(rows.min())}..{int(rows.max())}")
    seg = _segments(indptr)
    keys = seg * n + indices
    if torch.unique(keys).numel() != keys.numel():
        raise ConfigError("expected unique positives per batch element, found a row listed twice")
    has_self = torch.zeros(b, dtype=torch.long, device=rows.device).index_add_(0, seg, (indices == rows[seg]).long())
    if bool((has_self == 0).any()):
        bad = int(torch.nonzero(has_self == 0)[0])
        raise ConfigError(
            f"expected every batch element's own row among its positives, row {int(rows[bad])} "
            f"(batch element {bad}) is missing; positives must include y_b"
        )
    return seg


# --------------------------------------------------------------------------- selection


def hard_negative_counts(n_negatives, r: float) -> torch.Tensor:
    """h = floor(r * n_negatives) per element (a 1e-9 guard keeps 0.29 * 100 at 29)."""
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"expected a hard-negative ratio r in [0, 1), found {r}")
    n = torch.as_tensor(n_negatives)
    return torch.floor(n.double() * r + 1e-9).long().clamp(min=0)


def _merge_top(values, idx, new_values, new_idx, h: int):
    """Top h of the union per row by (value descending, index ascending)."""
    v, i = torch.cat([values, new_values], 1), torch.cat([idx, new_idx], 1)
    order = torch.sort(i, dim=1, stable=True).indices
    v, i = v.gather(1, order), i.gather(1, order)
    order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :h]
    return v.gather(1, order), i.gather(1, order)


_LOW32 = (1 << 32) - 1
_NO_KEY = torch.iinfo(torch.int64).min  # below every real key: an empty slot


def order_keys(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """int64 keys of float32 ``values`` at row ``idx`` (0 <= idx < 2**32) whose descending order is
    (value descending, index ascending), every key distinct.

    The float's bits, read as int32 with the magnitude bits of negatives flipped,
    order like the floats (-0.0 is first made +0.0, which compares equal to it);
    the row index fills the low 32 bits, inverted. So ``torch.topk`` on the keys
    picks exactly what a stable two-key sort picks, without sorting a whole block.
    """
    bits = (values + 0.0).view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << 32) | (_LOW32 - idx)


def keys_to_rows(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, idx)`` of ``order_keys`` output; empty slots give (-inf, -1)."""
    ordered = keys >> 32
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    values = bits.view(torch.float32)
    idx = _LOW32 - (keys & _LOW32)
    empty = keys == _NO_KEY
    return torch.where(empty, -math.inf, values), torch.where(empty, -1, idx)


def _merge_top_keys(top: torch.Tensor, z: torch.Tensor, start: int, h: int) -> torch.Tensor:
    """The h largest keys of ``top`` and of block ``z`` (float32, rows start..start+len)."""
    idx = torch.arange(start, start + z.shape[1], device=z.device)
    block = order_keys(z, idx.expand(len(z), -1))
    if block.shape[1] > h:
        block = torch.topk(block, h, dim=1, sorted=False).values
    return torch.topk(torch.cat([top, block], 1), h, dim=1).values


def _as_block(block, like: torch.Tensor) -> torch.Tensor:
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.ascontiguousarray(block))
    return block.to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def hard_negatives(
    x: torch.Tensor,
    dictionary_blocks: Iterable[tuple[int, torch.Tensor | np.ndarray]],
    pos_indptr,
    pos_indices,
    rows,
    r: float,
    *,
    count: int,
    device: str | torch.device | None = None,
    cameras: Cameras | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives H_b of every batch element: ``(indices (B, h_max) padded with -1, counts (B,))``.

    ``dictionary_blocks`` yields ``(start, block)`` covering rows 0..count-1 once, in any
    order; blocks may be numpy (e.g. float16 from the store) and go to ``device``
    (default: x's) in x's dtype. Rows of H_b are sorted by (z descending, index ascending);
    with ``cameras`` of a positive own share, the own-camera ones O_b come first (module docstring).
    """
    found = span_candidates(
        x,
        dictionary_blocks,
        pos_indptr,
        pos_indices,
        rows,
        r,
        count=count,
        span=(0, count),
        device=device,
        cameras=cameras,
    )
    hard = select_hard(found.values, found.indices, found.h)
    if found.own_h is not None:
        hard = combine_own(
            hard, select_hard(found.own_values, found.own_indices, found.own_h), found.h, found.own_h, count
        )
    return hard, found.h


class Candidates(NamedTuple):
    """``span_candidates``: the best candidates of every batch element by (z descending, row ascending),
    (-inf, -1) padded, and their counts; the own-camera ones only with an own-camera share (else None)."""

    values: torch.Tensor  # (B, max h)
    indices: torch.Tensor
    h: torch.Tensor  # (B,)
    own_values: torch.Tensor | None = None  # (B, max h_own): rows of the anchor's camera outside P_b
    own_indices: torch.Tensor | None = None
    own_h: torch.Tensor | None = None


@torch.no_grad()
def span_candidates(
    x: torch.Tensor,
    dictionary_blocks: Iterable[tuple[int, torch.Tensor | np.ndarray]],
    pos_indptr,
    pos_indices,
    rows,
    r: float,
    *,
    count: int,
    span: tuple[int, int],
    device: str | torch.device | None = None,
    cameras: Cameras | None = None,
) -> Candidates:
    """The best hard-negative candidates among the rows of ``span`` = (lo, hi) of a ``count``-row dictionary.

    ``dictionary_blocks`` covers the span once. h_b = floor(r * (count - |P_b|)) counts the
    whole dictionary, so the candidates of every span of a partition, merged by
    ``select_hard``, give exactly the H_b of the whole dictionary: the rows a
    distributed run's ranks own are such spans (``wildreid.world``). With ``cameras`` of a positive
    own share the same scan also keeps the best h^o_b rows of each anchor's camera
    (``own_negative_counts``), merged over spans by ``select_hard`` with their own counts, then
    joined to the others by ``combine_own``.
    """
    device = torch.device(device) if device is not None else x.device
    xq = x.detach().to(device)
    rows, indptr, indices = _long(rows, device), _long(pos_indptr, device), _long(pos_indices, device)
    seg = _check_positives(rows, indptr, indices, count)
    h = hard_negative_counts(count - (indptr[1:] - indptr[:-1]), r).to(device)
    h_max = int(h.max()) if len(rows) else 0
    if cameras is None or cameras.own_share == 0:
        (top_v, top_i), _ = _scan(xq, dictionary_blocks, seg, indices, span, h_max, count)
        return Candidates(top_v, top_i, h)
    h_own = own_negative_counts(h, cameras, rows, seg, indices)
    own = (cameras.row_cams.to(device), cameras.of(rows), int(h_own.max()) if len(rows) else 0)
    (top_v, top_i), (own_v, own_i) = _scan(xq, dictionary_blocks, seg, indices, span, h_max, count, own)
    return Candidates(top_v, top_i, h, own_v, own_i, h_own)


def own_negative_counts(h: torch.Tensor, cameras: Cameras, rows, seg, indices) -> torch.Tensor:
    """h^o_b = min(floor(o * h_b), the negatives in the anchor's camera) per batch element."""
    cams = cameras.of(rows)
    sizes = cameras.sizes.to(h.device)
    own_pos = torch.zeros(len(rows), dtype=torch.long, device=h.device).index_add_(
        0, seg, (cameras.of(indices) == cams[seg]).long()
    )
    available = sizes[cams] - own_pos
    return torch.minimum(hard_negative_counts(h, cameras.own_share).to(h.device), available)


def _scan(xq, dictionary_blocks, seg, indices, span, h_max: int, count: int, own=None):
    """One pass over the span's blocks: the top ``h_max`` negatives of every element and, with ``own`` =
    (row cameras, batch cameras, width), the top ``width`` among the anchor's camera: two (values, idx) pairs."""
    device, b = xq.device, len(xq)
    own_max = own[2] if own is not None else 0
    # float32 (training) keeps packed keys and a top-k per block; other dtypes sort (the reference)
    keyed = xq.dtype == torch.float32 and count <= _LOW32
    tops = [_empty_top(b, width, xq.dtype, device, keyed) for width in (h_max, own_max)]
    lo, hi = span
    spans = []
    for start, block in dictionary_blocks:
        stop = start + len(block)
        if start < lo or stop > hi:
            raise ConfigError(f"expected dictionary blocks inside rows {lo}..{hi - 1}, found rows {start}..{stop - 1}")
        spans.append((start, stop))
        if max(h_max, own_max) == 0 or len(block) == 0:
            continue
        block = _as_block(block, xq)
        z = xq @ block.T
        inside = (indices >= start) & (indices < stop)
        z[seg[inside], indices[inside] - start] = -math.inf  # positives are never negatives
        if keyed and bool(torch.isnan(z).any()):  # a NaN of either sign; its key would not sort as NaN
            raise ConfigError("expected finite similarities, found NaN: the features or dictionary hold bad rows")
        tops[0] = _merge_block(tops[0], z, start, h_max, keyed)
        if own_max:
            other = own[0][start:stop][None, :] != own[1][:, None]
            tops[1] = _merge_block(tops[1], z.masked_fill(other, -math.inf), start, own_max, keyed)
    _check_cover(spans, lo, hi)
    return [keys_to_rows(t) if keyed else t for t in tops]


def _empty_top(b: int, width: int, dtype, device, keyed: bool):
    if keyed:
        return torch.full((b, width), _NO_KEY, dtype=torch.long, device=device)
    return (
        torch.full((b, width), -math.inf, dtype=dtype, device=device),
        torch.full((b, width), -1, dtype=torch.long, device=device),
    )


def _merge_block(top, z: torch.Tensor, start: int, width: int, keyed: bool):
    if width == 0:
        return top
    if keyed:
        return _merge_top_keys(top, z, start, width)
    idx = torch.arange(start, start + z.shape[1], device=z.device).expand(len(z), -1)
    return _merge_top(*top, z, idx, width)


def combine_own(hard: torch.Tensor, own: torch.Tensor, h: torch.Tensor, h_own: torch.Tensor, count: int):
    """H_b from the usual selection ``hard`` (B, >= max h, by rank) and the own-camera one ``own`` (B, >= max
    h_own, by rank), both -1 padded: O_b = own[b, :h_own_b], then the first h_b - |O_b| of ``hard[b]``
    not in O_b; (B, max h) indices, -1 padded."""
    b = len(h)
    width = int(h.max()) if b else 0
    own = own[:, : int(h_own.max()) if b else 0]
    own = torch.where(torch.arange(own.shape[1], device=own.device) < h_own[:, None], own, -1)
    batch = torch.arange(b, device=hard.device)[:, None]
    taken = torch.isin(batch * count + hard, (batch * count + own)[own >= 0]) | (hard < 0)
    rank = torch.cumsum(~taken, 1)
    rest = torch.where(~taken & (rank <= (h - h_own)[:, None]), hard, -1)
    both = torch.cat([own, rest], 1)
    order = torch.sort((both < 0).to(torch.int8), dim=1, stable=True).indices[:, :width]  # the valid ones first
    return both.gather(1, order)


def select_hard(values: torch.Tensor, idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """H_b from candidates ``(values, idx)`` (B, K), gathered from one or more spans: the h_b best by
    (value descending, index ascending), as (B, max h) indices padded with -1."""
    h_max = int(h.max()) if len(h) else 0
    if values.shape[1] > h_max:  # candidates of several spans: keep the best h_max of their union
        values, idx = _merge_top(values[:, :0], idx[:, :0], values, idx, h_max)
    keep = torch.arange(h_max, device=values.device) < h[:, None]
    if bool(torch.isnan(values[keep]).any() | torch.isinf(values[keep]).any()):
        raise ConfigError("expected finite similarities, found NaN or inf: the features or dictionary hold bad rows")
    return torch.where(keep, idx, -1)


def _check_cover(spans: list[tuple[int, int]], lo: int, hi: int) -> None:
    covered = lo
    for start, stop in sorted(s for s in spans if s[1] > s[0]):
        if start != covered:
            break
        covered = stop
    else:
        if covered == hi:
            return
    raise ConfigError(
        f"expected dictionary blocks covering rows {lo}..{hi - 1} once each, found rows {lo}..{covered - 1} "
        "covered in order; pass every block of the dictionary once"
    )


@torch.no_grad()
def graph_negatives(
    x: torch.Tensor,
    candidates,
    rows_fn: RowsFn,
    pos_indptr,
    pos_indices,
    rows,
    r: float,
    *,
    count: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives among graph candidates: ``(indices (B, h_max) padded with -1, counts (B,))``.

    ``candidates`` (B, K) holds each element's k-NN graph row (-1 for none; repeats and
    positives are dropped). H_b = the min(h_b, |C_b|) candidates with the largest
    z = x_b . M_j, ties by ascending row, h_b = floor(r * (count - |P_b|)) as in
    ``hard_negatives``; ``counts`` is min(h_b, |C_b|), the number taken. z comes
    from the rows of ``rows_fn`` (chunks of ``chunk_rows``), one dot per (b, candidate) pair,
    never the whole dictionary.
    """
    xq = x.detach()
    device = xq.device
    rows, indptr, indices = _long(rows, device), _long(pos_indptr, device), _long(pos_indices, device)
    seg = _check_positives(rows, indptr, indices, count)
    cand = _long(candidates, device)
    if cand.ndim != 2 or len(cand) != len(rows):
        raise ConfigError(f"expected graph candidates of shape ({len(rows)}, K), found {tuple(cand.shape)}")
    if cand.numel() and (int(cand.min()) < -1 or int(cand.max()) >= count):
        raise ConfigError(
            f"expected graph rows in 0..{count - 1} (or -1), found {int(cand.min())}..{int(cand.max())}; "
            "the k-NN graph belongs to another dictionary: mine this one again"
        )
    b = len(rows)
    h = hard_negative_counts(count - (indptr[1:] - indptr[:-1]), r).to(device)
    cand = torch.sort(cand, dim=1).values  # ascending rows: a stable sort by z then breaks ties by row
    valid = cand >= 0
    valid[:, 1:] &= cand[:, 1:] != cand[:, :-1]
    batch = torch.arange(b, device=device)[:, None]
    valid &= ~torch.isin(batch * count + cand, seg * count + indices)
    n_cand = valid.sum(1)
    starved = (h > 0) & (n_cand == 0)
    if bool(starved.any()):
        e = int(torch.nonzero(starved)[0])
        raise ConfigError(
            f"expected at least one hard-negative candidate beyond the positives in the k-NN graph row of "
            f"row {int(rows[e])}, found none among its {cand.shape[1]} neighbours; raise mining.k "
            "above mining.adjacency or use loss.negatives=exact"
        )
    pair_b, pair_k = torch.nonzero(valid, as_tuple=True)
    z = torch.full(cand.shape, -math.inf, dtype=xq.dtype, device=device)
    z[pair_b, pair_k] = _pair_dots(xq, pair_b, cand[pair_b, pair_k], rows_fn, chunk_rows)
    if bool(torch.isnan(z).any() | torch.isinf(z[valid]).any()):
        raise ConfigError("expected finite similarities, found NaN or inf: the features or dictionary hold bad rows")
    take = torch.minimum(h, n_cand)
    width = int(take.max()) if b else 0
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :width]
    keep = torch.arange(width, device=device) < take[:, None]
    return torch.where(keep, cand.gather(1, order), -1), take


def _pair_dots(x: torch.Tensor, pairs_b: torch.Tensor, pairs_j: torch.Tensor, rows_fn: RowsFn, chunk_rows: int):
    """z_e = x[pairs_b[e]] . M[pairs_j[e]], one dot per pair (not the (B, rows) product), rows in chunks."""
    if chunk_rows < 1:
        raise ConfigError(f"expected chunk_rows >= 1, found {chunk_rows}")
    uniq, inv = torch.unique(pairs_j, return_inverse=True)
    z = torch.empty(len(pairs_j), dtype=x.dtype, device=x.device)
    for c0 in range(0, len(uniq), chunk_rows):
        block = _as_block(rows_fn(uniq[c0 : c0 + chunk_rows]), x)
        sel = torch.nonzero((inv >= c0) & (inv < c0 + len(block)), as_tuple=True)[0]
        z[sel] = (x[pairs_b[sel]] * block[inv[sel] - c0]).sum(1)
    return z


def _dense_select(z: torch.Tensor, seg: torch.Tensor, indices: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    masked = z.detach().clone()
    masked[seg, indices] = -math.inf
    h_max = int(h.max()) if len(h) else 0
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :h_max]
    keep = torch.arange(h_max, device=z.device) < h[:, None]
    return torch.where(keep, order, -1)


def _dense_select_own(z, seg, indices, h, rows, cameras: Cameras) -> torch.Tensor:
    """The own-camera rule of the module docstring, row by row over the full z (the reference)."""
    cams, row_cams = cameras.of(rows), cameras.row_cams.to(z.device)
    out = torch.full((len(z), int(h.max()) if len(h) else 0), -1, dtype=torch.long, device=z.device)
    for b in range(len(z)):
        positives = set(indices[seg == b].tolist())
        order = torch.sort(z[b].detach(), descending=True, stable=True).indices.tolist()
        negatives = [j for j in order if j not in positives]
        own = [j for j in negatives if row_cams[j] == cams[b]]
        o = min(int(math.floor(cameras.own_share * int(h[b]) + 1e-9)), len(own))
        chosen = own[:o] + [j for j in negatives if j not in set(own[:o])][: int(h[b]) - o]
        out[b, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- loss


def _per_element_mean(values: torch.Tensor, seg: torch.Tensor, b: int) -> torch.Tensor:
    sums = torch.zeros(b, dtype=values.dtype, device=values.device).index_add(0, seg, values)
    counts = torch.zeros(b, dtype=values.dtype, device=values.device).index_add_(0, seg, torch.ones_like(values))
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))


def _combine(z_pos, pos_seg, z_neg, neg_seg, b: int, delta: float, inter=None) -> dict[str, torch.Tensor]:
    """The loss from the positives' and negatives' z; ``inter`` = (which positives are seen by another
    camera than their anchor's, weight w) adds the inter-camera term."""
    positive = _per_element_mean((1.0 - z_pos) ** 2, pos_seg, b)
    negative = _per_element_mean((1.0 + z_neg) ** 2, neg_seg, b)
    loss = positive + delta * negative
    out = {"positive": positive.mean(), "negative": negative.mean()}
    if inter is not None:
        other, weight = inter
        term = _per_element_mean((1.0 - z_pos[other]) ** 2, pos_seg[other], b)
        loss = loss + weight * term
        out["inter"] = term.mean()
    return {"loss": loss.mean(), **out}


def _inter(cameras: Cameras | None, rows, seg, indices):
    """``_combine``'s ``inter`` argument: (positives from another camera than the anchor's, w), or None."""
    if cameras is None or cameras.inter_weight == 0:
        return None
    return cameras.of(indices) != cameras.of(rows)[seg], cameras.inter_weight


def _check_inputs(x: torch.Tensor, delta: float) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(f"expected batch features of shape (B, D) with B >= 1, found {tuple(x.shape)}")
    if delta < 0:
        raise ConfigError(f"expected delta >= 0, found {delta}")


def dtl_dense(
    x: torch.Tensor,
    dictionary: torch.Tensor,
    rows,
    pos_indptr,
    pos_indices,
    r: float,
    delta: float,
    cameras: Cameras | None = None,
):
    """Reference DTL over the full (B, N) z with grad: ``{"loss", "positive", "negative", "hard"}``
    (and ``"inter"`` with an inter-camera weight).

    ``hard`` is the (B, h_max) selection, -1 padded, as ``hard_negatives`` returns it (with own-camera
    negatives: the same rows, in another order within a row).
    """
    _check_inputs(x, delta)
    device = x.device
    m = _as_block(dictionary, x)
    rows, indptr, indices = _long(rows, device), _long(pos_indptr, device), _long(pos_indices, device)
    seg = _check_positives(rows, indptr, indices, len(m))
    h = hard_negative_counts(len(m) - (indptr[1:] - indptr[:-1]), r).to(device)
    z = x @ m.T
    if cameras is not None and cameras.own_share > 0:
        hard = _dense_select_own(z, seg, indices, h, rows, cameras)
    else:
        hard = _dense_select(z, seg, indices, h)
    neg_b, neg_k = torch.nonzero(hard >= 0, as_tuple=True)
    inter = _inter(cameras, rows, seg, indices)
    out = _combine(z[seg, indices], seg, z[neg_b, hard[neg_b, neg_k]], neg_b, len(x), delta, inter)
    return {**out, "hard": hard}


class _GatheredDot(torch.autograd.Function):
    """z_e = x[pairs_b[e]] . M[pairs_j[e]], with the rows of M fetched in chunks forward and backward."""

    @staticmethod
    def forward(ctx, x, pairs_b, pairs_j, rows_fn, chunk_rows):
        uniq, inv = torch.unique(pairs_j, return_inverse=True)
        z = torch.zeros(len(pairs_j), dtype=x.dtype, device=x.device)
        for c0 in range(0, len(uniq), chunk_rows):
            block = _as_block(rows_fn(uniq[c0 : c0 + chunk_rows]), x)
            sel = torch.nonzero((inv >= c0) & (inv < c0 + len(block)), as_tuple=True)[0]
            z[sel] = (x @ block.T)[pairs_b[sel], inv[sel] - c0]
        ctx.save_for_backward(pairs_b, uniq, inv)
        ctx.rows_fn, ctx.chunk_rows, ctx.x_shape, ctx.x_dtype = rows_fn, chunk_rows, x.shape, x.dtype
        return z

    @staticmethod
    def backward(ctx, grad_z):
        pairs_b, uniq, inv = ctx.saved_tensors
        grad_x = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=grad_z.device)
        for c0 in range(0, len(uniq), ctx.chunk_rows):
            block = _as_block(ctx.rows_fn(uniq[c0 : c0 + ctx.chunk_rows]), grad_x)
            sel = torch.nonzero((inv >= c0) & (inv < c0 + len(block)), as_tuple=True)[0]
            g = torch.zeros(len(grad_x), len(block), dtype=grad_x.dtype, device=grad_x.device)
            g.index_put_((pairs_b[sel], inv[sel] - c0), grad_z[sel], accumulate=True)
            grad_x += g @ block
        return grad_x, None, None, None, None


def gathered_dot(
    x: torch.Tensor, pairs_b: torch.Tensor, pairs_j: torch.Tensor, rows_fn: RowsFn, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> torch.Tensor:
    """z_e = x[pairs_b[e]] . M[pairs_j[e]] with grad w.r.t. x; M rows come from ``rows_fn`` in chunks.

    ``rows_fn(indices)`` gets ascending unique row indices (a tensor on x's device) and
    returns those rows (torch or numpy, any float dtype). It is called again in backward.
    """
    if chunk_rows < 1:
        raise ConfigError(f"expected chunk_rows >= 1, found {chunk_rows}")
    if len(pairs_j) == 0:
        return (x.reshape(-1)[:0] * 0).reshape(0)
    return _GatheredDot.apply(x, pairs_b, pairs_j, rows_fn, chunk_rows)


def dtl_loss(
    x: torch.Tensor,
    rows_fn: RowsFn,
    rows,
    pos_indptr,
    pos_indices,
    hard: torch.Tensor,
    delta: float,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cameras: Cameras | None = None,
) -> dict[str, torch.Tensor]:
    """DTL of ``x`` given its positives and the hard negatives ``hard`` (B, h_max), -1 padded.

    z is recomputed with grad only on those rows (``gathered_dot``). Returns
    ``{"loss", "positive", "negative"}``: the loss and the batch means of both terms (and ``"inter"``,
    the inter-camera term, with a weight in ``cameras``).
    """
    _check_inputs(x, delta)
    device = x.device
    rows, indptr, indices = _long(rows, device), _long(pos_indptr, device), _long(pos_indices, device)
    seg = _segments(indptr)
    hard = _long(hard, device)
    if hard.ndim != 2 or len(hard) != len(x):
        raise ConfigError(f"expected hard negatives of shape ({len(x)}, h), found {tuple(hard.shape)}")
    neg_b, neg_k = torch.nonzero(hard >= 0, as_tuple=True)
    neg_j = hard[neg_b, neg_k]
    z = gathered_dot(x, torch.cat([seg, neg_b]), torch.cat([indices, neg_j]), rows_fn, chunk_rows)
    inter = _inter(cameras, rows, seg, indices)
    return _combine(z[: len(indices)], seg, z[len(indices) :], neg_b, len(x), delta, inter)


def dtl_partial(
    x: torch.Tensor,
    rows_fn: RowsFn,
    rows,
    pos_indptr,
    pos_indices,
    hard: torch.Tensor,
    delta: float,
    *,
    span: tuple[int, int],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cameras: Cameras | None = None,
) -> dict[str, torch.Tensor]:
    """The share of ``dtl_loss`` that the dictionary rows of ``span`` = (lo, hi) contribute.

    Each element's terms over the positives and hard negatives inside the span are
    summed and divided by its whole |P_b| and |H_b|, then by B, so the shares of the
    spans of a partition add up to ``dtl_loss`` (``{"loss", "positive", "negative"}``)
    and so do their gradients: a distributed run's ranks each compute their own span's
    share and the all-gather's backward sums the gradients (``wildreid.world``).
    ``rows_fn`` is only asked for rows inside the span.
    """
    _check_inputs(x, delta)
    device = x.device
    lo, hi = span
    rows, indptr, indices = _long(rows, device), _long(pos_indptr, device), _long(pos_indices, device)
    seg = _segments(indptr)
    hard = _long(hard, device)
    if hard.ndim != 2 or len(hard) != len(x):
        raise ConfigError(f"expected hard negatives of shape ({len(x)}, h), found {tuple(hard.shape)}")
    b = len(x)
    pos_counts = (indptr[1:] - indptr[:-1]).to(x.dtype)
    neg_counts = (hard >= 0).sum(1).to(x.dtype)
    pos_in = (indices >= lo) & (indices < hi)
    neg_b, neg_k = torch.nonzero((hard >= lo) & (hard < hi), as_tuple=True)
    pos_seg, pos_j = seg[pos_in], indices[pos_in]
    z = gathered_dot(x, torch.cat([pos_seg, neg_b]), torch.cat([pos_j, hard[neg_b, neg_k]]), rows_fn, chunk_rows)
    zero = torch.zeros(b, dtype=x.dtype, device=device)
    positive = zero.index_add(0, pos_seg, (1.0 - z[: len(pos_j)]) ** 2) / pos_counts.clamp(min=1)
    negative = zero.index_add(0, neg_b, (1.0 + z[len(pos_j) :]) ** 2) / neg_counts.clamp(min=1)
    loss = positive + delta * negative
    out = {"positive": positive.sum() / b, "negative": negative.sum() / b}
    inter = _inter(cameras, rows, seg, indices)
    if inter is not None:  # over each anchor's inter-camera positives of the whole dictionary
        other, weight = inter
        inter_counts = zero.index_add(0, seg, other.to(x.dtype))
        mine = other[pos_in]
        term = zero.index_add(0, pos_seg[mine], (1.0 - z[: len(pos_j)][mine]) ** 2) / inter_counts.clamp(min=1)
        loss = loss + weight * term
        out["inter"] = term.sum() / b
    return {"loss": loss.sum() / b, **out}


def dtl_streaming(
    x: torch.Tensor,
    dictionary_blocks: Iterable[tuple[int, torch.Tensor | np.ndarray]],
    rows_fn: RowsFn,
    rows,
    pos_indptr,
    pos_indices,
    r: float,
    delta: float,
    *,
    count: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cameras: Cameras | None = None,
) -> dict[str, torch.Tensor]:
    """``hard_negatives`` then ``dtl_loss``: ``{"loss", "positive", "negative", "hard"}`` (camera-aware
    with ``cameras``)."""
    hard, _ = hard_negatives(x, dictionary_blocks, pos_indptr, pos_indices, rows, r, count=count, cameras=cameras)
    out = dtl_loss(x, rows_fn, rows, pos_indptr, pos_indices, hard, delta, chunk_rows=chunk_rows, cameras=cameras)
    return {**out, "hard": hard}


# --------------------------------------------------------------------------- in-memory dictionary


def tensor_blocks(dictionary: torch.Tensor | np.ndarray, block_rows: int):
    """``(start, block)`` of an in-memory dictionary, as the ``blocks`` of a ``Rows`` source yield them."""
    if block_rows < 1:
        raise ConfigError(f"expected block_rows >= 1, found {block_rows}")
    for start in range(0, len(dictionary), block_rows):
        yield start, dictionary[start : start + block_rows]


def tensor_rows(dictionary: torch.Tensor | np.ndarray) -> RowsFn:
    """``rows_fn`` of an in-memory dictionary."""

    def rows_fn(indices: torch.Tensor):
        if isinstance(dictionary, np.ndarray):
            return dictionary[indices.cpu().numpy()]
        return dictionary[indices.to(dictionary.device)]

    return rows_fn


# --------------------------------------------------------------------------- dictionary update


@torch.no_grad()
def momentum_update(dictionary_rows: torch.Tensor, x: torch.Tensor, rows=None) -> torch.Tensor:
    """New dictionary rows normalise(M[y_b] + x_b), without grad, in x's dtype and device.

    ``dictionary_rows`` is M[rows] (B, D). A row listed more than once is updated
    sequentially in batch order, v <- normalise(v + x_b) for each of its elements,
    and every one of its elements gets the final value, so writing the result back
    in any order gives the same dictionary. Without ``rows`` every row is taken as distinct.
    """
    if dictionary_rows.shape != x.shape or x.ndim != 2:
        raise ConfigError(
            f"expected dictionary rows and features of one shape (B, D), found "
            f"{tuple(dictionary_rows.shape)} and {tuple(x.shape)}"
        )
    x = x.detach()
    current = _as_block(dictionary_rows, x)
    if rows is None:
        return F.normalize(current + x, dim=1)
    rows = _long(rows, x.device)
    if rows.shape != (len(x),):
        raise ConfigError(f"expected rows of shape ({len(x)},), found {tuple(rows.shape)}")
    uniq, inv = torch.unique(rows, return_inverse=True)
    order = torch.sort(inv, stable=True).indices  # batch elements grouped by row, batch order within
    sorted_inv = inv[order]
    first = torch.searchsorted(sorted_inv, sorted_inv)
    rank = torch.empty_like(inv)
    rank[order] = torch.arange(len(inv), device=x.device) - first  # occurrence number of each element
    value = current[order[torch.searchsorted(sorted_inv, torch.arange(len(uniq), device=x.device))]]  # first M[y]
    for t in range(int(rank.max()) + 1 if len(rank) else 0):
        b = torch.nonzero(rank == t, as_tuple=True)[0]
        value[inv[b]] = F.normalize(value[inv[b]] + x[b], dim=1)
    return value[inv]
