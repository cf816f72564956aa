"""The sample order of an epoch, as pure functions of (shard sizes, seed, epoch).

Reading stays sequential (whole shards), yet the order is fully determined,
so training can resume mid-epoch on exactly the samples it would have seen:

1. shards are permuted with a generator seeded by (seed, epoch);
2. lane ``l`` (one per DataLoader worker) takes every ``lanes``-th shard of that
   permutation, in groups of ``group`` consecutive shards;
3. the samples of a group are permuted together, seeded by (seed, epoch, first shard);
4. the epoch is the round-robin of the lanes, ``chunk`` samples at a time
   (``chunk`` = the DataLoader batch size), skipping lanes that ran out, which
   is how a PyTorch DataLoader merges its workers' batches.

In a distributed run ``chunk`` is the global batch and process r of W takes its
``batch_share`` of each one, so the order never depends on W: a run resumed with
another number of processes goes on with the samples the first one would have used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Group", "batch_share", "epoch_order", "lane_groups", "merge_lanes", "schedule_from"]


@dataclass(frozen=True)
class Group:
    shards: tuple[int, ...]  # shard numbers, in reading order
    permutation: np.ndarray  # order of the group's samples, as positions in the concatenated shards

    def __len__(self) -> int:
        return len(self.permutation)


def lane_groups(
    shard_sizes: Sequence[int], *, seed: int, epoch: int, lanes: int, group: int, shuffle: bool
) -> list[list[Group]]:
    """The groups every lane reads, in order."""
    n = len(shard_sizes)
    shards = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    result = []
    for lane in range(lanes):
        mine = [int(s) for s in shards[lane::lanes]]
        groups = []
        for g in range(0, len(mine), group):
            members = tuple(mine[g : g + group])
            size = sum(shard_sizes[s] for s in members)
            if shuffle:
                perm = np.random.default_rng([seed, epoch, 1, members[0]]).permutation(size)
            else:
                perm = np.arange(size)
            groups.append(Group(members, perm))
        result.append(groups)
    return result


def merge_lanes(lane_lengths: Sequence[int], chunk: int) -> list[tuple[int, int, int]]:
    """Round-robin schedule: (lane, start, stop) slices of the lanes, in epoch order."""
    done = [0] * len(lane_lengths)
    schedule = []
    while True:
        progressed = False
        for lane, length in enumerate(lane_lengths):
            if done[lane] < length:
                stop = min(done[lane] + chunk, length)
                schedule.append((lane, done[lane], stop))
                done[lane] = stop
                progressed = True
        if not progressed:
            return schedule


def schedule_from(lane_lengths: Sequence[int], chunk: int, start: int) -> list[tuple[int, int, int]]:
    """The round-robin schedule from epoch position ``start`` on.

    A start inside a chunk keeps the rest of that chunk as a short first batch,
    so batch boundaries after it are the ones an uninterrupted epoch has.
    """
    remaining = []
    position = 0
    for lane, lo, hi in merge_lanes(lane_lengths, chunk):
        if position + (hi - lo) > start:
            remaining.append((lane, lo + max(0, start - position), hi))
        position += hi - lo
    return remaining


def epoch_order(
    shard_sizes: Sequence[int],
    *,
    seed: int,
    epoch: int,
    lanes: int = 1,
    chunk: int = 1,
    group: int = 2,
    shuffle: bool = True,
) -> np.ndarray:
    """Dense sample indices of the whole epoch, in the order a reader yields them."""
    firsts = np.concatenate([[0], np.cumsum(shard_sizes)])
    streams = []
    for groups in lane_groups(shard_sizes, seed=seed, epoch=epoch, lanes=lanes, group=group, shuffle=shuffle):
        parts = []
        for g in groups:
            indices = np.concatenate([np.arange(firsts[s], firsts[s + 1]) for s in g.shards])
            parts.append(indices[g.permutation])
        streams.append(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
    schedule = merge_lanes([len(s) for s in streams], chunk)
    if not schedule:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([streams[lane][lo:hi] for lane, lo, hi in schedule]).astype(np.int64)


def batch_share(count: int, rank: int, size: int) -> tuple[int, int]:
    """Positions [lo, hi) of a global batch of ``count`` samples that process ``rank`` of ``size`` takes."""
    return count * rank // size, count * (rank + 1) // size
