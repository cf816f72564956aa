"""One rank of the sharded-DTL check in tests/test_world.py, started by torchrun (gloo, CPU).

Every rank builds the same data from one seed; rank 0 writes the dictionary into a
real Zarr store, each rank opens it through a page cache over the rows it owns, takes
its share of the batch and runs ``sharded_step``. Each rank saves the global loss and
its elements' gradients; rank 0 the dictionary after every rank's momentum update.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wildreid.dtl import Cameras
from wildreid.sharded import sharded_step
from wildreid.shards.order import batch_share
from wildreid.stores import FeatureStore, PageCache
from wildreid.world import join_world, leave_world


def problem(seed: int = 9, n: int = 250, d: int = 16, b: int = 10, extra: int = 5):
    """The shared data: dictionary (n, d), batch features (b, d), batch rows, positives CSR over all n rows."""
    rng = np.random.default_rng(seed)
    m = F.normalize(torch.from_numpy(rng.standard_normal((n, d))), dim=1).float()
    x = F.normalize(torch.from_numpy(rng.standard_normal((b, d))), dim=1).float()
    rows = np.array([*rng.choice(n, size=b - 1, replace=False), 0])  # a repeated row: momentum in batch order
    rows[-1] = rows[0]
    lists = []
    for y in range(n):
        others = rng.choice(np.setdiff1d(np.arange(n), [y]), size=int(rng.integers(0, extra + 1)), replace=False)
        lists.append(np.concatenate([[y], others]))
    indptr = np.cumsum([0] + [len(p) for p in lists]).astype(np.int64)
    return m, x, torch.from_numpy(rows), (indptr, np.concatenate(lists).astype(np.int64))


def problem_cameras(seed: int = 9, n: int = 250) -> Cameras:
    """The camera-aware terms for ``problem``'s dictionary: 4 cameras, one of them holding half the rows."""
    cams = np.random.default_rng(seed + 1).choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])
    return Cameras(torch.from_numpy(cams), own_share=0.5, inter_weight=0.7)


def main(out: Path, r: float, delta: float, split: str, camera: bool = False) -> None:
    world = join_world("cpu", timeout_s=60)
    m, x, rows, positives = problem()
    store_path = out / "store"
    if world.main:
        store = FeatureStore.create(store_path, len(m), m.shape[1], dtype="float32", chunk_bytes=16 * 16 * 4)
        store.write_rows(0, m.numpy())
    world.barrier()
    store = FeatureStore.open(store_path, mode="r+", meta_writer=world.main)
    span = world.owned_rows(len(m), store.chunk_rows)
    cache = PageCache(store.features, host_budget=1 << 20, span=span, dtype=np.float32)
    if split == "even":
        lo, hi = batch_share(len(x), world.rank, world.size)
        share = -(-len(x) // world.size)
    else:  # the last rank takes the whole batch, the others an empty share (a short last batch)
        lo, hi = (0, len(x)) if world.rank == world.size - 1 else (0, 0)
        share = len(x)
    mine = x[lo:hi].clone().requires_grad_(True)
    cameras = problem_cameras() if camera else None
    loss = sharded_step(
        world, mine, rows[lo:hi], cache, positives, r, delta, None, share=share, gather_rows=3, cameras=cameras
    )
    cache.flush()
    torch.save({"loss": loss, "grad": mine.grad, "span": span}, out / f"rank-{world.rank}.pt")
    world.barrier()
    if world.main:
        torch.save(torch.from_numpy(np.asarray(store.features[:])), out / "dictionary.pt")
    leave_world(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5:] == ["camera"])
