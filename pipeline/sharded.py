"""The training step of a distributed run over a dictionary sharded by rows (``wildreid.world``).

Each rank holds the rows ``cache.span`` of the dictionary. One step:

1. all-gather the batch features (with their gradient) and row ids: every rank then has the global batch;
2. each rank picks, for every element of the global batch, its best hard-negative
   candidates among its own rows (``span_candidates``, h_b of them: h_b counts the
   whole dictionary), and the candidates of all ranks are gathered and merged by
   (z descending, row ascending): exactly the global top-h_b (``select_hard``);
3. each rank computes its rows' share of the DTL (``dtl_partial``: its positives and
   hard negatives, divided by the global |P_b| and h_b); the shares add up to the
   single-process loss, and so do the gradients: the gather's backward sums them
   over ranks, and DDP sums (not averages) the parameter gradients (``sum_gradients``);
4. each rank updates the momentum of its own rows of the batch, in global batch order.

Bytes communicated per step: the features B x D x 4 and rows B x 8 (gather and the
backward's reduce-scatter), the candidates B x h_max x 16, the model's gradients
(DDP) and two scalars.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from wildreid.dtl import (
    Cameras,
    batch_positives,
    combine_own,
    dtl_partial,
    momentum_update,
    select_hard,
    span_candidates,
)
from wildreid.stores import PageCache
from wildreid.world import GlobalBatchNorm, World

__all__ = ["ddp_model", "owned", "sharded_step", "step_bytes", "sum_gradients", "update_owned"]


def sum_gradients(world: World, bucket):
    """DDP communication hook: the sum of the ranks' gradients (DDP's default averages them).

    Each rank's loss is its share of the global loss, so the global gradient is their sum.
    """
    world._count("gradients", bucket.buffer())
    future = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return future.then(lambda done: done.value()[0])


def ddp_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """``model`` for ``world``: itself for one process; else DistributedDataParallel summing the gradients.

    SyncBatchNorm (``train.sync_bn``) is converted by the caller before the optimizer is made."""
    if not world.distributed:
        return model
    synced = any(isinstance(m, (torch.nn.SyncBatchNorm, GlobalBatchNorm)) for m in model.modules())
    ids = [world.device.index] if world.device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=not synced)
    wrapped.register_comm_hook(world, sum_gradients)
    return wrapped


def sharded_step(
    world: World,
    x: torch.Tensor,
    idx: torch.Tensor,
    cache: PageCache,
    positives,
    r: float,
    delta: float,
    optimizer: torch.optim.Optimizer | None,
    *,
    share: int,
    gather_rows: int,
    cameras: Cameras | None = None,
) -> float:
    """One DTL step of this rank (module docstring); returns the global loss.

    ``x`` (this rank's features, with grad) and ``idx`` (their rows) are its share of the
    global batch, at most ``share`` rows; ``positives`` is the CSR over all N rows. ``cameras``: the
    camera-aware terms (``wildreid.dtl``); the own-camera candidates are gathered and merged as the others.
    """
    device = x.device
    features, rows = world.gather_batch(x, idx.to(device), share)
    pos_ptr, pos_idx = batch_positives(positives[0], positives[1], rows, device=device)
    hard = _hard(world, features, cache, pos_ptr, pos_idx, rows, r, cameras)
    rows_fn = lambda ids: cache.get_rows_tensor(ids.cpu().numpy(), device).float()  # noqa: E731
    out = dtl_partial(
        features, rows_fn, rows, pos_ptr, pos_idx, hard, delta, span=cache.span, chunk_rows=gather_rows, cameras=cameras
    )
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    if optimizer is not None:
        optimizer.step()
    update_owned(cache, features.detach().float(), rows)
    return float(world.sum(out["loss"].detach()))


def _hard(world: World, features, cache: PageCache, pos_ptr, pos_idx, rows, r: float, cameras: Cameras | None):
    """The global H_b: every rank's candidates over its own rows, gathered and merged."""
    device = features.device
    found = span_candidates(
        features, cache.scan_tensors(device), pos_ptr, pos_idx, rows, r, count=cache.n, span=cache.span, cameras=cameras
    )
    hard = select_hard(world.cat(found.values, 1, "candidates"), world.cat(found.indices, 1, "candidates"), found.h)
    if found.own_h is None:
        return hard
    own_v, own_i = (world.cat(t, 1, "candidates") for t in (found.own_values, found.own_indices))
    return combine_own(hard, select_hard(own_v, own_i, found.own_h), found.h, found.own_h, cache.n)


def owned(cache: PageCache, rows: torch.Tensor) -> np.ndarray:
    """Which of the global batch's ``rows`` this rank owns (its cache's span), as a boolean array."""
    lo, hi = cache.span
    return ((rows >= lo) & (rows < hi)).cpu().numpy()


def update_owned(cache: PageCache, features: torch.Tensor, rows: torch.Tensor) -> None:
    """The momentum update of the global batch's rows this rank owns, in batch order (repeated rows too)."""
    own = owned(cache, rows)
    if own.any():
        mine = rows.cpu().numpy()[own]
        current = cache.get_rows_tensor(mine, features.device).float()
        updated = momentum_update(current, features[torch.from_numpy(own).to(features.device)], mine)
        cache.set_rows(mine, updated.cpu().numpy())


def step_bytes(batch: int, dim: int, h_max: int, parameters: int, size: int) -> dict[str, int]:
    """Bytes one rank sends and receives per step over the collectives of ``sharded_step`` (ring algorithms:
    an all-gather or reduce-scatter moves (W - 1) / W of the gathered tensor, an all-reduce twice that)."""
    ring = (size - 1) / size
    features = batch * dim * 4
    return {
        "features": int(2 * ring * features),  # the gather, and its backward's reduce-scatter
        "rows": int(ring * batch * 8),
        "candidates": int(ring * batch * h_max * (4 + 8)),
        "gradients": int(2 * ring * parameters * 4),
        "scalars": int(2 * 2 * ring * 8),
    }
