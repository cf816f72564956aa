"""The processes of one training run: torch.distributed under torchrun, or one process.

A run of W processes ("ranks") is the run of one process cut in W, not W copies:

- **data**: ``train.batch_size`` is the global batch. The epoch's order is the
  reader's canonical order (a pure function of seed, epoch and shard sizes), and
  rank r takes its share ``batch_share`` of every global batch, so global step s
  sees the same samples whatever W is;
- **dictionary**: rank r owns a contiguous, chunk-aligned range of rows
  (``owned_rows``), reads and writes only those, through its own page cache;
- **communication** goes through torch.distributed collectives only (gloo on the
  CPU, nccl on CUDA). ``gather_batch`` all-gathers the batch features with their
  gradient (the backward sums every rank's gradient and hands each rank the
  gradient of its own rows, as fast-reid's ``GatherLayer`` does).

Every collective has the group's timeout (``--collective-timeout``): a rank that
died or hangs makes the others fail within it, and ``DistributedError`` says so
in one line naming the rank that saw it. ``World()`` is the one-process run; its
collectives return their input, so the single-process path is the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from wildreid.core.errors import ConfigError
from wildreid.shards.order import batch_share

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "GlobalBatchNorm",
    "World",
    "batch_share",
    "check_world_size",
    "join_world",
    "leave_world",
    "owned_rows",
    "sync_batchnorm",
]

# Long enough for a slow rank's checkpoint write, short enough that a dead peer does not hold a GPU node for hours.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class World:
    """This process's place in the run: ``rank`` of ``size``, on ``device``."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    timeout_s: float = DEFAULT_TIMEOUT_S
    # bytes this rank put into each kind of collective (its payload, not the wire's): what bench_ddp reports
    traffic: dict[str, int] = field(default_factory=dict, compare=False)

    def _count(self, kind: str, value: torch.Tensor) -> None:
        self.traffic[kind] = self.traffic.get(kind, 0) + value.numel() * value.element_size()

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, writes the model and the run's shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owned_rows(self, n: int, chunk_rows: int) -> tuple[int, int]:
        return owned_rows(n, chunk_rows, self.rank, self.size)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (a stop asked of one rank stops all at the same step)."""
        return bool(self._reduce(int(flag), dist.ReduceOp.MAX))

    def least(self, value: int) -> int:
        """The smallest of the ranks' values (a plan every rank must make alike, sized for the tightest)."""
        return self._reduce(value, dist.ReduceOp.MIN)

    def total(self, value: int) -> int:
        """The sum of the ranks' values (e.g. the samples of a global batch, from each rank's share)."""
        return self._reduce(value, dist.ReduceOp.SUM)

    def _reduce(self, value: int, op) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        self._count("flags", t)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of a tensor without grad (a copy; the input is left alone)."""
        total = value.detach().clone()
        if self.distributed:
            self._count("sums", total)
            dist.all_reduce(total)
        return total

    def cat(self, value: torch.Tensor, dim: int = 0, kind: str = "gathers") -> torch.Tensor:
        """Equal-shaped tensors of every rank, concatenated in rank order along ``dim`` (no grad)."""
        if not self.distributed:
            return value
        self._count(kind, value)
        parts = [torch.empty_like(value) for _ in range(self.size)]
        dist.all_gather(parts, value.contiguous())
        return torch.cat(parts, dim)

    def from_main(self, value: str | None) -> str | None:
        """Rank 0's ``value`` on every rank (a choice only rank 0 may make, e.g. the checkpoint to resume)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        return box[0]

    def gather_batch(self, x: torch.Tensor, idx: torch.Tensor, share: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch from every rank's ``(x, idx)``, in rank order: ``(features with grad, rows)``.

        Each rank's part is padded to ``share`` rows (the last batch of an epoch may split
        unevenly); padding is dropped after the gather. The backward of the features sums the
        gradient over ranks and returns each rank the gradient of its own rows.
        """
        if not self.distributed:
            return x, idx
        if len(x) > share:
            raise ConfigError(f"expected at most {share} rows of the batch on rank {self.rank}, found {len(x)}")
        pad = share - len(x)
        padded_x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) if pad else x
        rows = idx.to(device=x.device, dtype=torch.long)
        padded_rows = torch.cat([rows, rows.new_full((pad,), -1)]) if pad else rows
        gathered = _GatherWithGrad.apply(padded_x.contiguous(), self.rank, self.size)
        self._count("features", padded_x)  # and as much again in the backward's reduction
        gathered_rows = self.cat(padded_rows, kind="rows")
        keep = gathered_rows >= 0
        return gathered[keep], gathered_rows[keep]

    @property
    def comm_device(self) -> torch.device:
        """Where this rank's collectives' tensors live: its GPU for nccl, the CPU for gloo."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along rows whose backward gives each rank the sum over ranks of its rows' gradient.

    Written here because torch 2.14 marks both of its autograd gathers deprecated
    (``torch.distributed.nn.functional.all_gather`` and ``all_gather_tensor_autograd``);
    this uses only the public collectives, on every backend.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        ctx.rank, ctx.rows = rank, len(x)
        out = x.new_empty((size * len(x), *x.shape[1:]))
        dist.all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        if grad.device.type == "cuda":  # nccl: each rank receives only its rows' sum
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_single(mine, grad)
            return mine, None, None
        dist.all_reduce(grad)  # gloo has no reduce-scatter of tensors: the whole sum, then this rank's rows
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows].clone(), None, None


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch.

    Each rank's count, mean and sum of squared deviations per channel are gathered (with their
    gradient) and merged as Chan et al.'s parallel variance does, which keeps the precision of a
    two-pass variance (E[x^2] - E[x]^2 in float32 would not). torch's SyncBatchNorm does this on GPUs
    only (2.14 refuses CPU tensors), so CPU ranks (gloo, and the tests) use this and CUDA ranks use
    torch's (``sync_batchnorm``). Outside a distributed training pass it is BatchNorm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ConfigError(f"expected a batch of at least 2 dimensions, found {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        rows = x.numel() // channels
        if rows:
            local_mean = x.mean(dims)
            local_m2 = ((x - local_mean.view(shape)) ** 2).sum(dims)
        else:  # an empty share: nothing to add, but still part of the graph and of the gather
            local_mean = local_m2 = x.sum(dims)
        count = torch.full((1,), float(rows), dtype=x.dtype, device=x.device)
        every = _GatherWithGrad.apply(
            torch.cat([count, local_mean, local_m2])[None], dist.get_rank(), dist.get_world_size()
        )
        n, means = every[:, :1], every[:, 1 : channels + 1]
        total = n.sum()
        mean = (n * means).sum(0) / total
        var = (every[:, channels + 1 :].sum(0) + (n * (means - mean) ** 2).sum(0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1).clamp(min=1))
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batchnorm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with every BatchNorm layer computing global-batch statistics (the same parameters, buffers and
    state_dict keys): torch's SyncBatchNorm on CUDA, ``GlobalBatchNorm`` on the CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            synced = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            synced.load_state_dict(child.state_dict())
            if child.affine:  # the same Parameter objects: an optimizer made before still updates them
                synced.weight, synced.bias = child.weight, child.bias
            synced.train(child.training)
            setattr(model, name, synced.to(next(child.buffers()).device))
        else:
            sync_batchnorm(child, device)
    return model


def owned_rows(n: int, chunk_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of an ``n``-row dictionary that ``rank`` of ``size`` owns: whole chunks of ``chunk_rows``,
    contiguous, as even as whole chunks allow (a rank may own none when there are fewer chunks than ranks)."""
    if not 0 <= rank < size or chunk_rows < 1:
        raise ConfigError(f"expected 0 <= rank < size and chunk_rows >= 1, found rank {rank} of {size}, {chunk_rows}")
    chunks = -(-n // chunk_rows)
    lo, hi = chunks * rank // size, chunks * (rank + 1) // size
    return min(lo * chunk_rows, n), min(hi * chunk_rows, n)


def check_world_size(batch_size: int, size: int) -> None:
    """ConfigError unless ``size`` processes split the global batch evenly, naming the sizes that would."""
    if batch_size % size == 0:
        return
    fits = [w for w in range(1, min(batch_size, 64) + 1) if batch_size % w == 0]
    raise ConfigError(
        f"train.batch_size is the global batch and {batch_size} does not split evenly over {size} processes; "
        f"use a number of processes in {fits}, or a train.batch_size that is a multiple of {size}"
    )


def join_world(device: str | torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """This process's World: from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or one process.

    CUDA ranks run on ``cuda:LOCAL_RANK`` with nccl; CPU ranks use gloo.
    """
    if timeout_s <= 0:
        raise ConfigError(f"expected a collective timeout > 0 seconds, found {timeout_s}")
    device = torch.device(device)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=device, timeout_s=timeout_s)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {rank} is local rank {local_rank} but this node has {torch.cuda.device_count()} CUDA "
                "devices; start at most that many processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if device.type == "cuda":
        # a timed-out NCCL collective raises in the waiting rank (one line, exit 10) instead of the watchdog
        # aborting the process; not run on a GPU yet
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=timedelta(seconds=timeout_s),
            rank=rank,
            world_size=size,
        )
    return World(rank=rank, size=size, local_rank=local_rank, device=device, timeout_s=timeout_s)


def leave_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
