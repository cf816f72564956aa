"""SIGTERM / SIGINT: training, mining and sharding stop at a safe point, exit 75, and resume exactly."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import clustered, final_json, graph, make_store, positives, run_cli, train_cli, train_command, tree_digest

from wildreid.core.errors import Stopped
from wildreid.stores import LOCK_NAME

STOPPED = Stopped.exit_code


def _stop_line(run: subprocess.CompletedProcess) -> str:
    lines = [line for line in run.stderr.splitlines() if line.startswith("stopped at epoch")]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    return lines[0]


# 5 steps an epoch (80 images, batch 16), epochs 0 (warm-up), 1, 2; the dictionary rebuilt at epoch 2
@pytest.mark.slow
@pytest.mark.parametrize(
    "point, expected",
    [
        ("step:2", "stopped at epoch 0 step 2; resume with --resume"),  # before the first periodic checkpoint
        ("step:7", "stopped at epoch 1 step 7; resume with --resume"),  # a DPLM epoch, between checkpoints
        (
            "refresh:2:2",
            "stopped at epoch 2 step 10, in the dictionary rebuild (32 of 80 samples); resume with --resume",
        ),
        ("mine:1", "stopped at epoch 1 step 5, before the epoch's first step; resume with --resume"),
    ],
)
def test_sigterm_stops_after_the_step_and_resume_is_exact(point, expected, uninterrupted, shard_root, tmp_path):
    store = tmp_path / "store"
    stopped = train_cli(shard_root, store, env={"WILDREID_SIGNAL_AT": point})
    assert stopped.returncode == STOPPED, stopped.stderr[-3000:]
    assert _stop_line(stopped) == expected
    if point.startswith("step:"):  # no step is lost: the checkpoint is of the step the signal came in
        step = int(point.split(":")[1])
        assert (store / "train" / "LATEST").read_text() == f"ckpt-{step:010d}"
    assert (store / LOCK_NAME).read_text() == ""  # released on the way out
    resumed = final_json(train_cli(shard_root, store, "--resume"))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["dictionary_sha256"] == uninterrupted["dictionary_sha256"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]


@pytest.mark.slow
def test_sigterm_at_random_moments(uninterrupted, shard_root, tmp_path):
    """A scheduler's SIGTERM from outside at random moments of two attempts, then --resume: the uninterrupted
    digests, and every stop kept the step it stopped at (its checkpoint is the one LATEST names)."""
    rng = random.Random(11)
    store = tmp_path / "store"
    for attempt in range(2):
        args = ["--resume"] if attempt else []
        with subprocess.Popen(
            train_command(shard_root, store, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc:
            latest = store / "train" / "LATEST"
            first = latest.read_text() if latest.exists() else ""
            # the handler is in place once training runs: wait for a new checkpoint, then a random moment
            while (latest.read_text() if latest.exists() else "") == first and proc.poll() is None:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=600)
        if attempt == 0:
            assert proc.returncode == STOPPED, err[-3000:]
        assert proc.returncode in (0, STOPPED) and "Traceback" not in err, err[-3000:]
        if proc.returncode == STOPPED:
            line = next(line for line in err.splitlines() if line.startswith("stopped at epoch"))
            step = int(line.split(" step ")[1].split(";")[0].split(",")[0])
            named = f"ckpt-{step:010d}"
            if "dictionary rebuild" in line:  # "(K of N samples)": the rebuild's checkpoint of sample K
                named += f"-refresh-{int(line.split('(')[1].split(' of ')[0]):010d}"
            # stopped in the mining after a rebuild: the last checkpoint may be one inside that rebuild
            rebuilt = "before the epoch's first step" in line and latest.read_text().startswith(f"{named}-refresh-")
            assert latest.read_text() == named or rebuilt, line
    resumed = final_json(train_cli(shard_root, store, "--resume"))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["dictionary_sha256"] == uninterrupted["dictionary_sha256"]


def test_a_second_signal_stops_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from wildreid.core.signals import GracefulStop\n"
        "with GracefulStop() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "    print('asked', stop(), stop.name, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    print('not reached', flush=True)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == ["asked True SIGTERM"]
    assert run.returncode == -signal.SIGTERM


def _mine_cmd(store) -> list[str]:
    return [
        "mine",
        "--store",
        str(store),
        "--k",
        "11",
        "--adjacency",
        "10",
        "--memory-budget",
        "200MiB",
        "--workers",
        "1",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["knn:1", "rules:0"])
def test_mining_stops_after_the_block_and_resumes_identically(tmp_path, point):
    x, labels = clustered(2500, 16, clusters=40, noise=0.5)
    clean, stopped = make_store(tmp_path / "clean.zarr", x, labels), make_store(tmp_path / "stopped.zarr", x, labels)
    assert run_cli(_mine_cmd(clean)).returncode == 0
    run = run_cli(_mine_cmd(stopped), {"WILDREID_SIGNAL_AT": point})
    assert run.returncode == STOPPED, run.stderr
    assert "mining stopped during the" in run.stderr and "Traceback" not in run.stderr
    if point.startswith("knn"):
        # stopped after its block, before the stage's end
        assert json.loads((stopped / "knn" / "zarr.json").read_text())["attributes"]["complete"] is False
    run = run_cli(_mine_cmd(stopped))
    assert run.returncode == 0, run.stderr
    for a, b in zip(graph(clean) + positives(clean), graph(stopped) + positives(stopped)):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_sharding_stops_after_the_shard_and_resumes_byte_identically(veriwild_root, shard_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wildreid.cli", "shard", str(veriwild_root), str(out), "--max-samples", "12"]
    run = subprocess.run(
        cmd, env={**os.environ, "WILDREID_SIGNAL_AT": "shard:train/train-000002.tar"}, capture_output=True, text=True
    )
    assert run.returncode == STOPPED, run.stderr
    assert "sharding stopped after train/train-000002.tar" in run.stderr and "Traceback" not in run.stderr
    assert (out / "train" / "train-000002.tar").is_file() and not (out / "manifest.json").exists()
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert tree_digest(out) == tree_digest(Path(shard_root))
