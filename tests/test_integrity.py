"""Nothing lost, nothing silently wrong: writer locks, checksums, damaged checkpoints, safe loading, durable swaps."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from helpers import SMALL, clustered, final_json, make_store, run_cli, train_cli, train_command, tree_digest
from typer.testing import CliRunner

from wildreid.checkpoint import latest_checkpoint, load_model
from wildreid.cli import app
from wildreid.core.errors import DamagedDataError, LockedError, ResumeError, StoreError
from wildreid.mining import mine
from wildreid.stores import LOCK_NAME, FeatureStore, PageCache, WriterLock, atomic_write
from wildreid.stores.derived import read_positives

runner = CliRunner()
MINE = ["--k", "11", "--adjacency", "10", "--memory-budget", "200MiB", "--workers", "1"]


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


# --------------------------------------------------------------------------- writer locks


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    with WriterLock(folder, "wildreid train --store store") as held:
        assert held.took_over is None
        probe = "from wildreid.stores import WriterLock; import sys; WriterLock(sys.argv[1])"
        run = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True)
        assert run.returncode != 0 and "LockedError" in run.stderr
        assert f"pid {os.getpid()}" in run.stderr and "wildreid train --store store" in run.stderr
    assert (folder / LOCK_NAME).read_text() == ""  # released: empty, and free for the next writer
    with WriterLock(folder) as again:
        assert again.took_over is None


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path):
    folder = tmp_path / "store"
    folder.mkdir()
    holder = (
        "from wildreid.stores import WriterLock; import os, sys; WriterLock(sys.argv[1], 'victim'); "
        "os.kill(os.getpid(), 9)"
    )
    run = subprocess.run([sys.executable, "-c", holder, str(folder)], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL
    assert '"command": "victim"' in (folder / LOCK_NAME).read_text()  # the dead holder's record is still there
    with WriterLock(folder) as lock:
        assert lock.took_over["command"] == "victim"
        assert "victim" in lock.took_over_message and "without releasing it" in lock.took_over_message


@pytest.mark.parametrize(
    "args",
    [
        ["shard", "{tmp}/nowhere", "{tmp}/new"],  # no data set
        ["embed", "{tmp}/nowhere", "--checkpoint", "{tmp}/none.pt", "--output", "{tmp}/new"],  # no source
        ["train", "--shards", "{tmp}/nowhere", "--store", "{tmp}/new"],  # no shards
    ],
)
def test_a_failed_command_leaves_no_folder_behind(tmp_path, args):
    """A command refused before its work (one line, non-zero exit) leaves its new output folder absent, lock
    included: the lock of a folder it created goes with the folder."""
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code not in (0, 1), result.output  # one of wildreid's codes, not a traceback
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "new").exists()
    with WriterLock(tmp_path / "new"):  # the lock alone, taken and released
        pass
    assert not (tmp_path / "new").exists()


@contextlib.contextmanager
def _held_by_another_process(folder: Path, command: str):
    """The writer lock of ``folder`` held by a live child process (POSIX locks belong to processes)."""
    holder = (
        "from wildreid.stores import WriterLock; import sys, time; WriterLock(sys.argv[1], sys.argv[2]); "
        "print('held', flush=True); time.sleep(120)"
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder, str(folder), command], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout.readline().strip() == "held"
            yield proc
        finally:
            proc.kill()


@pytest.mark.slow
def test_shard_and_mine_refuse_a_folder_being_written(veriwild_root, tmp_path):
    out = tmp_path / "shards"
    with _held_by_another_process(out, "wildreid shard (the other one)"):
        result = runner.invoke(app, ["shard", str(veriwild_root), str(out), "--max-samples", "12"])
    assert result.exit_code == LockedError.exit_code
    assert "wildreid shard (the other one)" in _one_error_line(result.output)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing was written

    x, labels = clustered(600, 16, clusters=20, noise=0.5)
    store = make_store(tmp_path / "s.zarr", x, labels)
    with _held_by_another_process(store, "wildreid train (the other one)"):
        result = runner.invoke(app, ["mine", "--store", str(store), *MINE])
    assert result.exit_code == LockedError.exit_code
    assert "wildreid train (the other one)" in _one_error_line(result.output)
    assert "knn" not in zarr.open_group(str(store), mode="r")


@pytest.mark.slow
def test_two_shard_commands_on_one_folder(veriwild_root, shard_root, tmp_path):
    """The first is frozen (SIGSTOP) while it holds the lock; the second exits 8; the first then ends as if alone."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "wildreid.cli", "shard", str(veriwild_root), str(out), "--max-samples", "12"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as first:
        for _ in range(20000):
            if (out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text() or first.poll() is not None:
                break
            time.sleep(0.001)
        first.send_signal(signal.SIGSTOP)
        try:
            assert first.poll() is None, "the first shard command finished before it could be frozen"
            second = subprocess.run(cmd, capture_output=True, text=True)
        finally:
            first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=300)
    assert second.returncode == LockedError.exit_code, second.stderr
    line = _one_error_line(second.stderr)
    assert f"pid {first.pid}" in line and "shard" in line
    assert first.returncode == 0, err
    assert tree_digest(out) == tree_digest(shard_root)


def _wait_for_lock(folder: Path, proc: subprocess.Popen) -> None:
    for _ in range(600):
        if (folder / LOCK_NAME).exists() and (folder / LOCK_NAME).read_text():
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError("the first writer never took the lock")


@pytest.mark.slow
def test_two_trainings_and_a_mining_on_one_store(uninterrupted, shard_root, tmp_path):
    """train/train and train/mine: the second writer exits 8 at once, the first ends as if alone."""
    store = tmp_path / "store"
    first = subprocess.Popen(
        train_command(shard_root, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_lock(store, first)
    # both at once, while the first surely runs (one after the other, the second could start after it ended)
    writers = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for cmd in (
            train_command(shard_root, store, "--resume"),
            [sys.executable, "-m", "wildreid.cli", "mine", "--store", str(store), *MINE],
        )
    ]
    outputs = [w.communicate(timeout=600) for w in writers]
    second, mining = (subprocess.CompletedProcess(w.args, w.returncode, *o) for w, o in zip(writers, outputs))
    out, err = first.communicate(timeout=600)
    for refused in (second, mining):
        assert refused.returncode == LockedError.exit_code, refused.stderr[-2000:]
        line = _one_error_line(refused.stderr)
        assert f"pid {first.pid}" in line and "train" in line
    assert first.returncode == 0, err[-3000:]
    alone = final_json(subprocess.CompletedProcess(first.args, 0, out, err))
    assert alone["weights_sha256"] == uninterrupted["weights_sha256"]
    assert alone["dictionary_sha256"] == uninterrupted["dictionary_sha256"]


# --------------------------------------------------------------------------- checksums


def _chunk_file(store: Path, name: str, chunk: int = 0) -> Path:
    ndim = len(zarr.open_group(str(store), mode="r")[name].shape)
    return store / name / "c" / str(chunk) / Path(*(["0"] * (ndim - 1)))


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 3] ^= 0x10
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def mined_store(tmp_path_factory) -> Path:
    x, labels = clustered(700, 16, clusters=25, noise=0.5)
    store = make_store(tmp_path_factory.mktemp("mined") / "s.zarr", x, labels)
    mine(str(store), params_from(MINE), memory_budget=200 << 20, workers=1)
    return store


def params_from(args: list[str]):
    from wildreid.mining import MineParams

    return MineParams(k=int(args[1]), adjacency=int(args[3]))


@pytest.mark.parametrize(
    "name",
    ["features", "ids", "knn/indices", "knn/similarities", "knn/counts", "positives/indptr", "positives/indices"],
)
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_damaged_chunk_is_found_and_named(mined_store, tmp_path, name, how):
    store = tmp_path / "s.zarr"
    shutil.copytree(mined_store, store)
    chunk = 1 if name == "features" else 0  # features in chunks of 128 rows; the others in one chunk
    _damage(_chunk_file(store, name, chunk), how)
    opened = FeatureStore.open(store)
    with pytest.raises(DamagedDataError) as caught:
        opened.array(name)[:]
    message = str(caught.value)
    assert f"chunk {chunk} of {name}" in message and str(_chunk_file(store, name, chunk)) in message
    assert "fails its checksum" in message  # a truncated chunk's last 4 bytes are not its checksum either
    top = name.split("/")[0]
    expected = {
        "features": "wildreid train --resume",
        "knn": "run 'wildreid mine'",
        "positives": "run 'wildreid mine'",
        "ids": "extract the features again",
    }[top]
    assert expected in message
    assert "\n" not in message
    if name == "features":  # the rows of the other chunks still read
        assert opened.read_rows(0, 128).shape == (128, 16) and opened.read_rows(256, 700).shape == (444, 16)


@pytest.mark.slow
def test_mine_reports_damaged_features_and_graph_in_one_line(tmp_path):
    x, labels = clustered(700, 16, clusters=25, noise=0.5)
    store = make_store(tmp_path / "s.zarr", x, labels)
    _damage(_chunk_file(store, "features", 2), "flip")
    result = runner.invoke(app, ["mine", "--store", str(store), *MINE])
    assert result.exit_code == StoreError.exit_code
    assert "chunk 2 of features" in _one_error_line(result.output)

    store = make_store(tmp_path / "t.zarr", x, labels)
    cmd = ["mine", "--store", str(store), *MINE]
    crashed = run_cli(cmd, {"WILDREID_KILL_AT": "knn-complete"})
    assert crashed.returncode == -signal.SIGKILL
    _damage(_chunk_file(store, "knn/indices", 0), "truncate")
    run = run_cli(cmd)
    assert run.returncode == StoreError.exit_code
    line = _one_error_line(run.stderr)
    assert "chunk 0 of knn/indices" in line and f"remove {store / 'knn'}" in line
    shutil.rmtree(store / "knn")  # what the message says to do
    assert run_cli(cmd).returncode == 0
    clean = make_store(tmp_path / "clean.zarr", x, labels)
    mine(str(clean), params_from(MINE), memory_budget=200 << 20, workers=1)
    assert np.array_equal(read_positives(FeatureStore.open(clean))[1], read_positives(FeatureStore.open(store))[1])


def test_stores_without_checksums_still_open_and_damage_is_still_caught(tmp_path):
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    array = group.create_array("features", shape=(8, 4), chunks=(4, 4), dtype="float32", compressors=None)
    array[:] = np.arange(32, dtype=np.float32).reshape(8, 4)
    store = FeatureStore.open(tmp_path / "old.zarr")
    assert store.read_rows(0, 8).sum() == np.arange(32).sum()
    _damage(tmp_path / "old.zarr" / "features" / "c" / "1" / "0", "truncate")
    with pytest.raises(DamagedDataError, match=r"chunk 1 of features \(rows 4-7, .*\) is truncated or padded"):
        FeatureStore.open(tmp_path / "old.zarr").read_rows(0, 8)


@pytest.mark.slow
def test_every_write_path_changes_the_fingerprint(tmp_path):
    """A k-NN graph is reused only for the very features it was computed from."""
    x, labels = clustered(600, 16, clusters=20, noise=0.5)
    path = make_store(tmp_path / "s.zarr", x, labels)
    store = FeatureStore.open(path, mode="r+")
    seen = [store.fingerprint()]
    store.write_rows(0, x[:10])
    seen.append(store.fingerprint())
    cache = PageCache(store.features, host_budget=1 << 20, dtype=store.features.dtype)
    cache.set_rows(np.arange(5), -x[:5])
    cache.flush()
    seen.append(store.fingerprint())
    shutil.copytree(path / "features", tmp_path / "copy")
    store.replace_features(tmp_path / "copy")
    seen.append(store.fingerprint())
    assert len({repr(f) for f in seen}) == len(seen)
    # mining after a page-cache write recomputes the graph instead of reusing it
    mine(str(path), params_from(MINE), memory_budget=200 << 20, workers=1)
    before = FeatureStore.open(path).array("knn/indices")[:]
    store = FeatureStore.open(path, mode="r+")
    flipped = np.ascontiguousarray(x[::-1])
    cache = PageCache(store.features, host_budget=1 << 20, dtype=store.features.dtype)
    cache.set_rows(np.arange(len(x)), flipped)
    cache.flush()
    mine(str(path), params_from(MINE), memory_budget=200 << 20, workers=1)
    after = FeatureStore.open(path).array("knn/indices")[:]
    fresh = make_store(tmp_path / "fresh.zarr", flipped, labels[::-1])
    mine(str(fresh), params_from(MINE), memory_budget=200 << 20, workers=1)
    assert not np.array_equal(before, after)
    assert np.array_equal(after, FeatureStore.open(fresh).array("knn/indices")[:])


# --------------------------------------------------------------------------- a crash-safe features swap


@pytest.mark.parametrize(
    "killed, expected",
    [
        ("copying", "old"),  # while copying the checkpoint's dictionary
        ("copied", "old"),  # the copy complete (features.restore), before the first rename: undone
        ("between", "new"),  # after features -> features.old, before features.restore -> features: finished
        ("renamed", "new"),
    ],  # both renames done, features.old not yet removed
)
def test_a_features_swap_killed_anywhere_leaves_whole_features(tmp_path, killed, expected):
    x, labels = clustered(300, 16, clusters=10, noise=0.5)
    path = make_store(tmp_path / "s.zarr", x, labels)
    new = make_store(tmp_path / "new.zarr", -x, labels)
    old_rows, new_rows = x.astype(np.float32), -x.astype(np.float32)
    if killed == "copying":
        shutil.copytree(new / "features", path / "features.copying")
        shutil.rmtree(next((path / "features.copying" / "c").iterdir()))  # half copied
    elif killed == "copied":
        shutil.copytree(new / "features", path / "features.restore")
    elif killed == "between":
        shutil.copytree(new / "features", path / "features.restore")
        os.replace(path / "features", path / "features.old")
        with pytest.raises(StoreError, match="interrupted while restoring"):
            FeatureStore.open(path)  # a reader does not repair; it says what to run
    else:
        os.replace(path / "features", path / "features.old")
        shutil.copytree(new / "features", path / "features")
    store = FeatureStore.open(path, mode="r+")
    assert np.array_equal(store.read_rows(0, len(x)), old_rows if expected == "old" else new_rows)
    assert sorted(p.name for p in path.iterdir() if p.name.startswith("features")) == ["features"]


def test_damaged_metadata_is_one_line(tmp_path):
    x, labels = clustered(300, 16, clusters=10, noise=0.5)
    path = make_store(tmp_path / "s.zarr", x, labels)
    meta = path / "features" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:40])
    result = runner.invoke(app, ["mine", "--store", str(path), *MINE])
    assert result.exit_code == StoreError.exit_code
    line = _one_error_line(result.output)
    assert f"{meta} cannot be read" in line and "metadata is damaged" in line


def test_extraction_does_not_resume_over_rows_written_since(shard_root, tmp_path):
    """kill -9 mid-epoch before any checkpoint: the written-back rows make the recorded extraction stale."""
    from wildreid.extract import extract_split
    from wildreid.model import build_model

    model = build_model("resnet18")
    store = FeatureStore.create(tmp_path / "s.zarr", 80, 512)
    extract_split(shard_root, "train", model, store, image_size=(64, 32), label="epoch-0")
    extracted = store.read_rows(0, 80)
    cache = PageCache(store.features, host_budget=1 << 20, dtype=store.features.dtype)
    cache.set_rows(np.arange(4), np.zeros((4, 512), np.float32))  # a training step's momentum update
    cache.flush()
    extract_split(shard_root, "train", model, store, image_size=(64, 32), label="epoch-0")
    assert np.array_equal(store.read_rows(0, 80), extracted)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(uninterrupted, shard_root, tmp_path):
    store = tmp_path / "store"
    killed = train_cli(shard_root, store, env={"WILDREID_KILL_AT": "after-step:8"})  # checkpoints at 3, 5, 6
    assert killed.returncode == -signal.SIGKILL
    latest = latest_checkpoint(store / "train")
    chunk = next(p for p in sorted((latest / "dictionary").rglob("*")) if p.is_file() and p.name != "zarr.json")
    _damage(chunk, "flip")
    resumed = train_cli(shard_root, store, "--resume")
    report = final_json(resumed)
    assert f"checkpoint {latest.name} is damaged (dictionary/" in resumed.stderr
    assert "resuming from the previous one, ckpt-0000000005" in resumed.stderr
    assert (latest.parent / f"damaged-{latest.name}").is_dir()
    assert report["weights_sha256"] == uninterrupted["weights_sha256"]
    assert report["dictionary_sha256"] == uninterrupted["dictionary_sha256"]
    assert "took over the writer lock" in resumed.stderr  # the killed run's lock record


@pytest.mark.slow
def test_graph_negatives_after_a_fallback_mine_the_graph_again(shard_root, tmp_path):
    """Falling back past a later mining: the stored k-NN graph is not the one the checkpoint trained with."""
    graph = [*SMALL, "train.refresh=eval", "loss.negatives=graph", "loss.r=0.2"]
    store = tmp_path / "store"
    # 5 steps an epoch, a checkpoint every 3 steps and at epoch ends: killed after step 11 (epoch 2, its graph
    # mined at step 10) with checkpoints 9 (mid epoch 1) and 10 (end of epoch 1) on disk
    killed = train_cli(shard_root, store, overrides=graph, env={"WILDREID_KILL_AT": "after-step:11"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _damage(latest_checkpoint(store / "train") / "state.pt", "flip")
    resumed = train_cli(shard_root, store, "--resume", overrides=graph)
    report = final_json(resumed)
    assert "resuming from the previous one, ckpt-0000000009" in resumed.stderr
    assert "the k-NN graph of epoch 1 was replaced after ckpt-0000000009; mining it again" in resumed.stderr
    assert [h["epoch"] for h in report["history"]] == [0, 1, 2]


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_error(shard_root, tmp_path):
    store = tmp_path / "store"
    assert train_cli(shard_root, store, env={"WILDREID_KILL_AT": "after-step:4"}).returncode == -signal.SIGKILL
    for ckpt in (store / "train" / "checkpoints").glob("ckpt-*"):
        _damage(ckpt / "state.pt", "truncate")
    run = train_cli(shard_root, store, "--resume")
    assert run.returncode == ResumeError.exit_code
    assert "no intact checkpoint to resume from" in _one_error_line(run.stderr)


@pytest.mark.slow
def test_a_checkpoint_of_an_older_wildreid_is_refused_and_kept(shard_root, tmp_path):
    store = tmp_path / "store"
    assert train_cli(shard_root, store, env={"WILDREID_KILL_AT": "after-step:4"}).returncode == -signal.SIGKILL
    latest = latest_checkpoint(store / "train")
    (latest / "COMPLETE").write_text("ok\n")  # what checkpoints held before checksums
    run = train_cli(shard_root, store, "--resume")
    assert run.returncode == ResumeError.exit_code
    assert "written by an older wildreid" in _one_error_line(run.stderr)
    assert latest.is_dir() and not (latest.parent / f"damaged-{latest.name}").exists()


def test_a_torch_file_that_is_not_a_wildreid_model(tmp_path):
    other = tmp_path / "other.pt"
    torch.save({"config": {}, "state_dict": {}}, other)
    with pytest.raises(ResumeError, match="expected model weights and a config naming the model"):
        load_model(other)
    torch.save(
        {"config": {"model": {"arch": "resnet18", "last_stride": 1}}, "state_dict": {"w": torch.zeros(2)}}, other
    )
    result = runner.invoke(app, ["eval", "--shards", str(tmp_path), "--checkpoint", str(other)])
    assert result.exit_code != 0
    with pytest.raises(ResumeError, match="holds weights that do not fit its model"):
        load_model(other)


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {_RunsCode.marker}",))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip", "text", "garbage", "empty"])
def test_eval_refuses_files_that_are_not_checkpoints(shard_root, tmp_path, kind):
    bad = tmp_path / "model.pt"
    _RunsCode.marker = tmp_path / "pwned"
    if kind == "pickle":
        bad.write_bytes(pickle.dumps({"config": {}, "state_dict": _RunsCode()}))
    elif kind == "torch-zip":
        torch.save({"config": {}, "state_dict": _RunsCode()}, bad)
    elif kind == "text":
        bad.write_text("not a checkpoint at all\n" * 20)
    elif kind == "garbage":
        bad.write_bytes(b"hello")  # the weights-only unpickler fails on this with a bare KeyError
    else:
        bad.write_bytes(b"")
    result = runner.invoke(app, ["eval", "--shards", str(shard_root), "--checkpoint", str(bad), "--split", "small"])
    assert result.exit_code == ResumeError.exit_code
    line = _one_error_line(result.output)
    assert f"{bad} is not a readable wildreid model" in line and "found" in line
    assert not _RunsCode.marker.exists()  # nothing in the file ran


def test_a_model_file_loads_safely(uninterrupted):
    model, config = load_model(uninterrupted["checkpoint"])
    assert config["train"]["epochs"] == 3 and model.feature_dim == 512


# --------------------------------------------------------------------------- the atomic-write helper


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "f.json"
    atomic_write(target, "old")

    def fails(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fails)
    assert target.read_text() == "old" and sorted(p.name for p in target.parent.iterdir()) == ["f.json"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_text() == "new"


def test_extraction_writes_each_chunk_once(shard_root, tmp_path, monkeypatch):
    """O(N) bytes of writes: every features chunk once, the labels once (whole), whatever the batch size."""
    from wildreid.core import durable
    from wildreid.extract import extract_split
    from wildreid.model import build_model

    written: list[tuple[str, int]] = []
    real_put = durable._put_durably

    def counting_put(path, value, exclusive):  # the real durable write, counted
        written.append((str(Path(path).relative_to(tmp_path / "s.zarr")), len(value)))
        return real_put(path, value, exclusive)

    model = build_model("resnet18")
    # 16-row feature chunks over 80 rows (5 chunks); the label arrays are one 80-row chunk each
    store = FeatureStore.create(tmp_path / "s.zarr", 80, 512, chunk_bytes=16 * 512 * 2)
    monkeypatch.setattr(durable, "_put_durably", counting_put)
    extract_split(shard_root, "train", model, store, image_size=(64, 32), label="once")
    chunks = [key for key, _ in written if "/c/" in key]
    assert sorted(k for k in chunks if k.startswith("features/")) == [f"features/c/{i}/0" for i in range(5)]
    assert sorted(k for k in chunks if not k.startswith("features/")) == ["camids/c/0", "ids/c/0"]
    label_bytes = sum(size for key, size in written if key.startswith(("ids/c", "camids/c")))
    assert label_bytes <= 2 * 80 * 8 + 64  # each label array written once (at most its raw size, plus framing)
    written.clear()
    extract_split(shard_root, "train", model, store, image_size=(64, 32), label="again")  # labels already there
    assert not [key for key, _ in written if key.startswith(("ids/", "camids/"))]
