"""One rank of the global-batch BatchNorm check in tests/test_world.py, started by torchrun (gloo, CPU).

Rank 0 first computes the one-process reference (plain BatchNorm, the whole batch). Then every rank
runs its share of the same batch through the same model with ``sync_batchnorm`` under DDP (summed
gradients); with ``split`` "last" the last rank takes the whole batch and the others an empty share.
Rank 0 saves the largest differences of outputs, gradients and running statistics."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

from wildreid.model import build_model
from wildreid.sharded import ddp_model
from wildreid.shards.order import batch_share
from wildreid.world import join_world, leave_world, sync_batchnorm


def grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])


def stats(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([b.flatten().float() for name, b in model.named_buffers() if "running" in name])


def main(out: Path, split: str) -> None:
    world = join_world("cpu", timeout_s=60)
    torch.manual_seed(0)
    model = build_model("resnet18").train()
    x, w = torch.randn(8, 3, 64, 32), torch.randn(8, 512)
    reference = copy.deepcopy(model)
    expected = reference(x)
    (expected * w).sum().backward()
    lo, hi = batch_share(8, world.rank, world.size)
    if split == "last":
        lo, hi = (0, 8) if world.rank == world.size - 1 else (0, 0)
    net = ddp_model(sync_batchnorm(model, world.device), world)
    got = net(x[lo:hi])
    (got * w[lo:hi]).sum().backward()
    outputs = world.cat(torch.nn.functional.pad(got.detach(), (0, 0, lo, 8 - hi))[None]).sum(0)
    if world.main:
        torch.save(
            {
                "outputs": float((outputs - expected.detach()).abs().max()),
                "grads": float((grads(model) - grads(reference)).norm() / grads(reference).norm()),
                "stats": float((stats(model) - stats(reference)).abs().max()),
            },
            out / "bn.pt",
        )
    leave_world(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
