"""wildreid mine on real Zarr stores: equal to the dense reference, resumable, on dask local and distributed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from helpers import SMALL_BLOCKS, clustered, graph, make_store, positives, run_cli
from typer.testing import CliRunner

from wildreid.cli import app
from wildreid.core.errors import ConfigError, StoreError
from wildreid.dplm import dplm_dense, dplm_published_dense
from wildreid.mining import MineParams, graph_reader, mine
from wildreid.stores import FeatureStore

runner = CliRunner()
BUDGET = 200 << 20


@pytest.mark.parametrize(
    "regime, params, clusters, noise",
    [
        ("sparse", MineParams(k=21, adjacency=20), 100, 0.6),
        ("dense", MineParams(k=11, adjacency=10, threshold=0.3), 25, 0.3),
    ],
)
def test_mine_equals_the_dense_reference(tmp_path, regime, params, clusters, noise):
    x, labels = clustered(700, 32, clusters=clusters, noise=noise)
    path = make_store(tmp_path / "s.zarr", x, labels)
    report = mine(str(path), params, memory_budget=BUDGET)
    ref = dplm_dense(x, threshold=params.threshold, min_candidates=params.min_candidates, adjacency=params.adjacency)
    got = positives(path)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    if regime == "dense":
        assert report["counted_pairs"] > 0  # the exact counting pass ran
        assert (graph(path)[2] > params.k).sum() > 100  # many rows with C_i > K
    else:
        assert report["pending_pairs"] == 0 and (graph(path)[2] < params.k).all()
    assert 0 < report["precision"] <= 1 and 0 < report["recall"] <= 1
    assert report["mean_positives"] == pytest.approx(len(ref[1]) / 700)


@pytest.mark.parametrize(
    "params, clusters, noise",
    [
        (MineParams(k=21, adjacency=20), 100, 0.6),
        (MineParams(k=11, adjacency=10, threshold=0.3), 25, 0.3),
        (MineParams(k=11, adjacency=10, threshold=0.3, order="published"), 25, 0.3),
    ],
)
def test_many_small_blocks_on_two_threads(tmp_path, monkeypatch, params, clusters, noise):
    """Small blocks everywhere: every pass streams several base blocks through each thread's reused float16,
    float32 and float64 buffers, part of the dictionary is held and the rest read by byte range, the graph
    is scanned in pieces for the reverse index, candidates are checked a few rows at a time and pending
    pairs counted in several passes (the production paths at scale); graph and positives equal the references."""
    import dataclasses

    import wildreid.mining as mining
    from wildreid.knn import knn_graph

    plan = mining.block_plan
    monkeypatch.setattr(mining, "block_plan", lambda *a, **k: dataclasses.replace(plan(*a, **k), **SMALL_BLOCKS))
    x, labels = clustered(1100, 32, clusters=clusters, noise=noise)
    path = make_store(tmp_path / "s.zarr", x, labels)
    report = mine(str(path), params, memory_budget=BUDGET, workers=2)
    assert all(report["blocks"][name] == value for name, value in SMALL_BLOCKS.items())
    sim, idx, counts = knn_graph(x, params.k, threshold=params.threshold)
    got_idx, got_sim, got_counts = graph(path)
    assert np.array_equal(got_idx, idx) and np.array_equal(got_sim, sim) and np.array_equal(got_counts, counts)
    dense = dplm_published_dense if params.order == "published" else dplm_dense
    ref = dense(x, threshold=params.threshold, min_candidates=params.min_candidates, adjacency=params.adjacency)
    got = positives(path)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    if params.threshold < 0.5:
        assert report["counted_pairs"] > 4 * SMALL_BLOCKS["pending_pairs"]  # several counting passes per task


def test_the_fully_dense_regime_needs_no_counting_pass(tmp_path):
    """Every pair above the threshold (the features of an untrained network look like this: C_i = N): each
    pending pair is settled by C_j, no counting pass over the dictionary runs, and the positives are the
    dense reference's."""
    x, labels = clustered(600, 16, clusters=1, noise=0.05)
    params = MineParams(k=11, adjacency=10, threshold=0.3)
    path = make_store(tmp_path / "s.zarr", x, labels)
    report = mine(str(path), params, memory_budget=BUDGET)
    assert (graph(path)[2] == len(x)).all()  # C_i = N for every row
    assert report["pending_pairs"] > 1000 and report["counted_pairs"] == 0
    ref = dplm_dense(x, threshold=params.threshold, min_candidates=params.min_candidates, adjacency=params.adjacency)
    got = positives(path)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


def test_mine_published_order(tmp_path):
    """``--order published`` mines what the transcription of the published code finds; the graph is shared by
    both orders, the positives are not: switching the order recomputes them and nothing else."""
    import dataclasses

    x, labels = clustered(600, 32, clusters=100, noise=0.6)
    path = make_store(tmp_path / "s.zarr", x, labels)
    options = ["--k", "21", "--adjacency", "20", "--min-candidates", "5", "--memory-budget", "200MiB"]
    result = runner.invoke(app, ["mine", "--store", str(path), *options, "--order", "published", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["order"] == "published"
    args = {"threshold": 0.6, "min_candidates": 5, "adjacency": 20}
    published, similarity = dplm_published_dense(x, **args), dplm_dense(x, **args)
    assert not np.array_equal(np.diff(published[0]), np.diff(similarity[0]))  # the order matters on this store
    assert all(np.array_equal(a, b) for a, b in zip(positives(path), published))

    params = MineParams(k=21, adjacency=20, min_candidates=5, order="published")
    report = mine(str(path), dataclasses.replace(params, order="similarity"), memory_budget=BUDGET)
    assert "knn_s" not in report and "rules_s" in report  # the same graph, new positives
    assert all(np.array_equal(a, b) for a, b in zip(positives(path), similarity))
    report = mine(str(path), params, memory_budget=BUDGET)
    assert "knn_s" not in report and "rules_s" in report
    assert all(np.array_equal(a, b) for a, b in zip(positives(path), published))

    bad = runner.invoke(app, ["mine", "--store", str(path), *options, "--order", "nearest"])
    assert bad.exit_code == ConfigError.exit_code and "similarity or published, found 'nearest'" in bad.output


def test_graph_only_mining_and_its_reader(tmp_path):
    x, labels = clustered(300, 16, clusters=10, noise=0.5)
    path = make_store(tmp_path / "s.zarr", x, labels)
    store = FeatureStore.open(path)
    with pytest.raises(ConfigError, match=r"expected a complete k-NN graph .* found none; run the mining"):
        graph_reader(store, 11, 1 << 20)
    report = mine(str(path), MineParams(k=11, adjacency=10), memory_budget=BUDGET, graph_only=True)
    assert "knn_s" in report and "positives" not in zarr.open_group(str(path), mode="r")
    rows = np.array([5, 0, 299, 5])
    assert np.array_equal(graph_reader(store, 11, 1 << 20)(rows), graph(path)[0][rows])
    with pytest.raises(ConfigError, match=r"shape \(300, 12\) \(rows, mining.k\), found \(300, 11\)"):
        graph_reader(store, 12, 1 << 20)


def test_mine_twice_reuses_the_results(tmp_path):
    x, labels = clustered(300, 16, clusters=10, noise=0.5)
    path = make_store(tmp_path / "s.zarr", x, labels)
    mine(str(path), MineParams(k=11, adjacency=10), memory_budget=BUDGET)
    first = positives(path)
    report = mine(str(path), MineParams(k=11, adjacency=10), memory_budget=BUDGET)
    assert "knn_s" not in report and "rules_s" not in report  # nothing recomputed
    assert all(np.array_equal(a, b) for a, b in zip(first, positives(path)))
    # other parameters: the old graph is discarded, never mixed in
    mine(str(path), MineParams(k=16, adjacency=15), memory_budget=BUDGET)
    assert graph(path)[0].shape == (300, 16)


@pytest.mark.slow
def test_distributed_cluster_equals_local_threads(tmp_path):
    from distributed import Client, LocalCluster

    x, labels = clustered(400, 16, clusters=12, noise=0.5)
    local = make_store(tmp_path / "local.zarr", x, labels)
    remote = make_store(tmp_path / "remote.zarr", x, labels)
    params = MineParams(k=11, adjacency=10)
    mine(str(local), params, memory_budget=BUDGET)
    saved = dict(os.environ)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            mine(str(remote), params, memory_budget=BUDGET, scheduler=cluster.scheduler_address)
            with Client(cluster) as client:  # each stage's workspace was dropped from the workers when it ended
                held = client.run(lambda dask_worker: [p for p in dask_worker.plugins if "wildreid" in p])
            assert len(held) == 2 and not any(held.values())
    finally:
        # the nannies set OMP_NUM_THREADS=1 (and more) in this process's environment and leave it there: later
        # training subprocesses would then sum in another order and miss the digests of earlier runs
        os.environ.clear()
        os.environ.update(saved)
    for a, b in zip(graph(local) + positives(local), graph(remote) + positives(remote)):
        assert np.array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["knn:1", "knn-complete", "rules:0"])
def test_kill_9_then_rerun_is_identical(tmp_path, crash_at):
    x, labels = clustered(2500, 16, clusters=40, noise=0.5)
    clean = make_store(tmp_path / "clean.zarr", x, labels)
    crashed = make_store(tmp_path / "crashed.zarr", x, labels)
    args = ["--k", "11", "--adjacency", "10", "--memory-budget", "200MiB", "--workers", "1"]
    assert runner.invoke(app, ["mine", "--store", str(clean), *args]).exit_code == 0
    cmd = ["mine", "--store", str(crashed), *args]
    run = run_cli(cmd, {"WILDREID_KILL_AT": crash_at})
    assert run.returncode == -9, run.stderr
    run = run_cli([*cmd, "--json"])
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    if crash_at != "knn-complete":
        assert report.get("knn_s", 0) >= 0
    for a, b in zip(graph(clean) + positives(clean), graph(crashed) + positives(crashed)):
        assert np.array_equal(a, b)
    assert not (crashed / "positives" / "parts").exists()


@pytest.mark.slow
def test_store_larger_than_the_budget(tmp_path):
    """A 64 MiB dictionary mined under a 48 MiB budget in a subprocess: peak RSS above idle (an interpreter
    with wildreid.mining loaded) stays within the budget, and the positives equal those of a run whose
    blocks hold the whole dictionary (blockwise == dense is tested above on smaller stores)."""
    x, labels = clustered(8192, 2048, clusters=820, noise=0.9)
    x = x.astype(np.float32)
    path = make_store(tmp_path / "big.zarr", x, labels, chunk_rows=128)
    budget = 48 << 20
    assert x.nbytes > budget
    probe = (
        "import json, sys\n"
        "from wildreid.budget import peak_rss_bytes\n"
        "from wildreid.mining import MineParams, graph_reader, mine\n"
        "idle = int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "r = mine(sys.argv[1], MineParams(k=21, adjacency=20), memory_budget=int(sys.argv[2]))\n"
        "print(json.dumps({'above': peak_rss_bytes() - idle, 'blocks': r['blocks']}))\n"
    )
    run = subprocess.run([sys.executable, "-c", probe, str(path), str(budget)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["blocks"]["base_rows"] < len(x)  # the dictionary really was streamed
    print(f"{report['above'] / 2**20:.1f} MiB above idle for a 48 MiB budget, blocks {report['blocks']}")
    assert report["above"] <= budget, f"{report['above'] / 2**20:.1f} MiB above idle for a 48 MiB budget"
    assert report["blocks"]["resident_rows"] < len(x)  # part of the dictionary was read on use
    small_budget = positives(path)
    copy = make_store(tmp_path / "copy.zarr", x, labels, chunk_rows=128)
    mine(str(copy), MineParams(k=21, adjacency=20), memory_budget=2 << 30)
    for a, b in zip(small_budget, positives(copy)):
        np.testing.assert_array_equal(a, b)
    assert np.diff(small_budget[0]).max() > 1  # some rows found positives besides themselves


def test_errors(tmp_path):
    group = zarr.open_group(str(tmp_path / "empty.zarr"), mode="w")
    group.create_array("ids", shape=(3,), dtype="int64")
    result = runner.invoke(app, ["mine", "--store", str(tmp_path / "empty.zarr")])
    assert result.exit_code == StoreError.exit_code and "no 2-D 'features'" in result.output

    x, _ = clustered(50, 8, clusters=3, noise=0.3)
    with pytest.raises(ConfigError, match="larger than the 50 rows"):
        mine(str(make_store(tmp_path / "small.zarr", x)), MineParams(k=101))

    bad = x.copy()
    bad[17] = np.nan
    with pytest.raises(StoreError, match="row 17 has NaN"):
        mine(str(make_store(tmp_path / "nan.zarr", bad)), MineParams(k=11, adjacency=10), memory_budget=BUDGET)
    bad[17] = 0
    with pytest.raises(StoreError, match="row 17 is all zeros"):
        mine(str(make_store(tmp_path / "zero.zarr", bad)), MineParams(k=11, adjacency=10), memory_budget=BUDGET)

    result = runner.invoke(
        app,
        ["mine", "--store", str(tmp_path / "small.zarr"), "--k", "11", "--adjacency", "10", "--memory-budget", "1MiB"],
    )
    assert result.exit_code == ConfigError.exit_code and "the smallest budget that works is" in result.output
