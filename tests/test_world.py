"""Distributed training pieces: row ownership, batch shares, and a 2-rank sharded DTL step (torchrun, gloo)
against the dense single-process reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wildreid.core.errors import ConfigError
from wildreid.dtl import batch_positives, dtl_dense, momentum_update
from wildreid.shards.order import batch_share
from wildreid.stores import FeatureStore
from wildreid.world import World, check_world_size, owned_rows

sys.path.insert(0, str(Path(__file__).parent))
from ddp_dtl_worker import problem, problem_cameras  # noqa: E402
from helpers import clustered, graph, make_store, positives

HERE = Path(__file__).parent


def torchrun(nproc: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {"GLOO_SOCKET_IFNAME": "lo", **os.environ, "OMP_NUM_THREADS": "1"}  # all ranks here: loopback
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize(("n", "chunk", "size"), [(250, 16, 2), (250, 16, 3), (10, 4, 4), (0, 4, 2), (64, 64, 2)])
def test_owned_rows_are_whole_chunks_covering_the_dictionary_once(n, chunk, size):
    spans = [owned_rows(n, chunk, rank, size) for rank in range(size)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(lo % chunk == 0 for lo, _ in spans)
    chunks = [-(-(hi - lo) // chunk) for lo, hi in spans]
    assert max(chunks) - min(chunks) <= 1


def test_batch_shares_split_a_batch_in_order():
    for count in range(0, 12):
        for size in (1, 2, 3, 4):
            shares = [batch_share(count, rank, size) for rank in range(size)]
            assert shares[0][0] == 0 and shares[-1][1] == count
            assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused():
    check_world_size(64, 4)
    with pytest.raises(ConfigError, match=r"64 does not split evenly over 3 processes.*\[1, 2, 4, 8, 16, 32, 64\]"):
        check_world_size(64, 3)


def test_one_process_collectives_return_their_input():
    world = World()
    x, idx = torch.ones(3, 2, requires_grad=True), torch.arange(3)
    assert world.gather_batch(x, idx, 3) == (x, idx)
    assert world.any(True) and not world.any(False)
    assert torch.equal(world.sum(torch.tensor(2.0)), torch.tensor(2.0))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "r", "delta", "split", "camera"),
    [(2, 0.05, 0.4, "even", False), (3, 0.3, 1.0, "last", False), (2, 0.08, 0.4, "even", True)],
)
def test_a_sharded_step_equals_the_dense_single_process_dtl(tmp_path, nproc, r, delta, split, camera):
    """Each rank owns part of a real Zarr dictionary; loss, gradients and the momentum-updated dictionary
    equal the dense reference (float32 against float64: a few ulps). "last": only the last rank has batch
    rows, the others an empty share, as in a short last batch. ``camera``: with own-camera negatives and
    the inter-camera term (``problem_cameras``)."""
    args = [str(tmp_path), str(r), str(delta), split, *(["camera"] if camera else [])]
    done = torchrun(nproc, str(HERE / "ddp_dtl_worker.py"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    m, x, rows, positives = problem()
    reference = x.double().clone().requires_grad_(True)
    pos_ptr, pos_idx = batch_positives(positives[0], positives[1], rows)
    cameras = problem_cameras() if camera else None
    dense = dtl_dense(reference, m.double(), rows, pos_ptr, pos_idx, r, delta, cameras)
    dense["loss"].backward()
    ranks = [torch.load(tmp_path / f"rank-{k}.pt") for k in range(nproc)]
    spans = [tuple(k["span"]) for k in ranks]
    assert spans[0][0] == 0 and spans[-1][1] == len(m) and all(lo < hi for lo, hi in spans)  # every rank owns rows
    for k in ranks:
        assert k["loss"] == pytest.approx(dense["loss"].item(), rel=1e-6)
    grad = torch.cat([k["grad"] for k in ranks]).double()
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, reference.grad, rtol=1e-5, atol=1e-7)
    expected = m.clone()
    expected[rows] = momentum_update(m[rows], x, rows)  # the batch repeats a row: updated twice, in batch order
    assert len(np.unique(rows.numpy())) < len(rows)
    torch.testing.assert_close(torch.load(tmp_path / "dictionary.pt"), expected, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("camera_penalty", [0.0, 0.25])
def test_two_ranks_mine_the_graph_and_positives_one_process_mines(tmp_path, camera_penalty):
    """Each rank runs its share of the k-NN and rules blocks of one store; rank 0 assembles the positives
    (with ``camera_penalty``: the camera-aware candidate lists, five cameras)."""
    from wildreid.mining import MineParams, mine

    x, labels = clustered(2500, 16, clusters=40, noise=0.5)
    one, two = make_store(tmp_path / "one.zarr", x, labels), make_store(tmp_path / "two.zarr", x, labels)
    if camera_penalty:
        cams = np.random.default_rng(1).integers(0, 5, len(x))
        for path in (one, two):
            FeatureStore.open(path, mode="r+").write_labels(0, labels, cams)
    budget = 24 << 20
    mine(str(one), MineParams(k=11, adjacency=10, camera_penalty=camera_penalty), memory_budget=budget, workers=1)
    args = [str(two), str(budget), "11", "10", str(camera_penalty)]
    done = torchrun(2, str(HERE / "ddp_mine_worker.py"), *args)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["query_rows"] < len(x) / 2  # several k-NN blocks: both ranks had some
    for a, b in zip(graph(one) + positives(one), graph(two) + positives(two)):
        assert np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("split", ["even", "last"])
def test_global_batchnorm_under_ddp_equals_one_process_on_the_whole_batch(tmp_path, split):
    """ResNet-18 with sync_batchnorm (GlobalBatchNorm on the CPU) and DDP summing gradients, the batch split over
    2 ranks (or all of it on one, an empty share on the other): outputs, gradients and running statistics
    of one process on the whole batch, up to float rounding."""
    done = torchrun(2, str(HERE / "ddp_bn_worker.py"), str(tmp_path), split)
    assert done.returncode == 0, done.stderr[-3000:]
    differences = torch.load(tmp_path / "bn.pt")
    assert differences["outputs"] < 1e-4 and differences["stats"] < 1e-4
    assert differences["grads"] < 1e-4  # relative


def test_a_checkpoint_of_several_ranks_is_published_only_with_every_part(tmp_path):
    """The phases each rank of a run writes: without rank 1's part the checkpoint is refused and LATEST stays."""
    from wildreid.checkpoint import begin_checkpoint, finish_checkpoint, latest_checkpoint, resume_checkpoint, save_part
    from wildreid.core.errors import StoreError
    from wildreid.stores import FeatureStore

    store = FeatureStore.create(tmp_path / "store", 40, 8, dtype="float32", chunk_bytes=10 * 8 * 4)  # 4 chunks
    store.write_rows(0, np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    run, features = tmp_path / "run", store.path / "features"
    state = {"model": {}, "optimizer": {}, "rng": {}, "epoch": 0, "step": 3, "position": 8, "history": []}
    positives = (np.arange(41), np.arange(40))
    tmp = begin_checkpoint(run, 3, features)
    save_part(run, tmp, features, (0, 2), 0)
    with pytest.raises(StoreError, match="expected 2 parts holding 4 dictionary chunks, found 1 parts and 2 chunks"):
        finish_checkpoint(run, tmp, 3, state, positives, features, parts=2)
    assert latest_checkpoint(run) is None
    save_part(run, tmp, features, (2, None), 1, rng={"torch": torch.get_rng_state()})
    final = finish_checkpoint(run, tmp, 3, state, positives, features, parts=2)
    assert latest_checkpoint(run) == final
    complete = json.loads((final / "COMPLETE").read_text())["sha256"]
    assert {f"dictionary/c/{i}/0" for i in range(4)} | {"rng-1.pt"} <= set(complete)
    ckpt, loaded = resume_checkpoint(run)
    assert ckpt == final and loaded["position"] == 8
