"""``wildreid train --nproc-per-node 2`` on the CPU (gloo): a run of two ranks, killed and resumed, resumed with
one process, and a stuck rank that the collective timeout ends."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from helpers import RUN, TWO, final_json, traced, train_ranks

RUN.append("train.reextract_every=1")


@pytest.fixture(scope="module")
def two_ranks(shard_root, tmp_path_factory) -> dict:
    """An uninterrupted run of two processes (RUN: 2 epochs of 5 steps), its steps' rows traced."""
    root = tmp_path_factory.mktemp("two_ranks")
    run = train_ranks(shard_root, root / "run", *TWO, env={"WILDREID_TRACE_ROWS": str(root / "trace")})
    return {"report": final_json(run), "trace": traced(root / "trace", 2), "stderr": run.stderr, "root": root}


@pytest.mark.slow
def test_two_ranks_train_evaluate_and_each_holds_half_the_dictionary(two_ranks, shard_root, tmp_path):
    report = two_ranks["report"]
    assert [h["epoch"] for h in report["history"]] == [0, 1] and report["history"][-1]["loss"] < 1.0
    world = report["world"]
    assert world["size"] == 2 and world["rows"] == [[0, 40], [40, 80]]
    row_bytes = 512 * 2  # resnet18 features, float16
    assert world["dictionary_bytes_held"] == [40 * row_bytes, 40 * row_bytes]  # each rank its own half
    assert all(step["gradients"] > 0 and step["features"] > 0 for step in world["bytes_per_step"])
    assert two_ranks["stderr"].count("memory budget") == 1  # only rank 0 speaks
    # every global step trained on a batch of 16: 8 rows from each rank
    assert len(two_ranks["trace"]) == 10 and all(len(rows) == 16 for rows in two_ranks["trace"].values())
    evaluated = subprocess.run(
        [sys.executable, "-m", "wildreid.cli", "eval", "--shards", str(shard_root), "--checkpoint"]
        + [report["checkpoint"], "--split", "small", "--memory-budget", "2GiB", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert 0.0 <= json.loads(evaluated.stdout.strip().splitlines()[-1])["small"]["mAP"] <= 1.0


@pytest.mark.slow
def test_a_killed_rank_then_a_sigterm_to_one_rank_then_resume_end_as_the_uninterrupted_run(
    two_ranks, shard_root, tmp_path
):
    """kill -9 of rank 1 mid-epoch ends the group at once; resumed, a SIGTERM that reaches rank 1 only stops
    every rank after the same step, at one checkpoint; resumed again, the run ends as if never stopped."""
    store = tmp_path / "run"
    began = time.monotonic()
    kill = {"WILDREID_KILL_AT": "step:7", "WILDREID_SIGNAL_RANK": "1"}  # in epoch 1; the last checkpoint: step 6
    killed = train_ranks(shard_root, store, *TWO, env=kill)
    assert killed.returncode == 128 + 9, killed.stderr[-2000:]
    assert "rank 1 was killed by SIGKILL; the other ranks were stopped" in killed.stderr
    assert "Traceback" not in killed.stderr
    assert time.monotonic() - began < 120  # rank 0 did not wait out the 600 s collective timeout
    term = {"WILDREID_SIGNAL_AT": "step:3", "WILDREID_SIGNAL_RANK": "1"}  # this invocation's 3rd step: step 9
    stopped = train_ranks(shard_root, store, *TWO, "--resume", env=term)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert stopped.stderr.count("stopped at epoch 1 step 9; resume with --resume") == 1  # rank 0 says it, once
    assert "Traceback" not in stopped.stderr and "error" not in stopped.stderr
    resumed = final_json(train_ranks(shard_root, store, *TWO, "--resume"))
    for key in ("weights_sha256", "dictionary_sha256"):
        assert resumed[key] == two_ranks["report"][key]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumed_by_one_process_trains_on_the_same_samples(two_ranks, shard_root, tmp_path):
    store, trace = tmp_path / "run", tmp_path / "trace"
    stopped = train_ranks(shard_root, store, *TWO, "--max-steps", "7")
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    resumed = train_ranks(shard_root, store, "--resume", env={"WILDREID_TRACE_ROWS": str(trace)})
    report = final_json(resumed)
    assert [h["epoch"] for h in report["history"]] == [0, 1] and report["world"]["size"] == 1
    one = traced(trace, 1)
    assert sorted(one) == [(e, s) for e, s in sorted(two_ranks["trace"]) if s > 7]
    for key, rows in one.items():
        assert rows == two_ranks["trace"][key]  # the same global batch, in the same order


@pytest.mark.slow
def test_a_stuck_rank_ends_the_group_within_the_collective_timeout(shard_root, tmp_path):
    began = time.monotonic()
    stuck = train_ranks(
        shard_root,
        tmp_path / "run",
        *TWO,
        "--collective-timeout",
        "5",
        env={"WILDREID_HANG_AT": "step:2", "WILDREID_SIGNAL_RANK": "1"},
    )
    took = time.monotonic() - began
    assert stuck.returncode == 10, stuck.stderr[-2000:]
    assert "error: rank 0: a collective with the other ranks failed" in stuck.stderr
    assert "did not answer within --collective-timeout 5 s" in stuck.stderr
    assert "rank 0 exited with code 10; the other ranks were stopped" in stuck.stderr
    assert "Traceback" not in stuck.stderr
    assert took < 120  # start-up and two steps, then 5 s of waiting: not the default 600 s


@pytest.mark.slow
def test_a_world_size_that_does_not_divide_the_batch_is_refused(shard_root, tmp_path):
    refused = train_ranks(shard_root, tmp_path / "run", "--nproc-per-node", "3")
    assert refused.returncode == 2
    assert "16 does not split evenly over 3 processes; use a number of processes in [1, 2, 4, 8, 16]" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run" / "features").exists()
