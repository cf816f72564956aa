"""Camera-aware SSML-FD (the ``camera:`` section) and the oracle ceiling (``mining.oracle``)."""

from __future__ import annotations

import dataclasses
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    RUN,
    SMALL,
    SMALL_BLOCKS,
    TWO,
    final_json,
    grad_of,
    graph,
    mined_positives,
    span_blocks,
    train_cli,
    train_ranks,
)

import wildreid.mining as mining
from wildreid.camera import CAMERA_STORE, camera_normalise, normalised_dictionary
from wildreid.checkpoint import latest_checkpoint, load_model, load_state
from wildreid.core.errors import ConfigError, Stopped, StoreError
from wildreid.dplm import _sigma_rows, camera_similarity, dplm_dense, oracle_positives
from wildreid.dtl import (
    Cameras,
    combine_own,
    dtl_dense,
    dtl_partial,
    dtl_streaming,
    hard_negatives,
    select_hard,
    span_candidates,
    tensor_blocks,
    tensor_rows,
)
from wildreid.mining import MineParams, mine
from wildreid.stores import FeatureStore
from wildreid.stores.derived import read_positives

# The digests of test_train's SMALL run on the conftest data, from the code before the camera section existed
# (commit 00bc2d6). Float results depend on the library builds and on the kernels they pick for the CPU, so the
# run pins the kernels and threads to what any x86-64 machine since 2013 runs alike (AVX2, 2 threads), and the
# digests belong to one set of builds: recorded on 2026-12-05 with torch 2.14.1, torchvision 0.29.1, numpy 2.4.6,
# faiss-cpu 1.15.1, zarr 3.1.6, pillow 13.0.0, numcodecs 0.16.6, where commit 00bc2d6 and this code gave the same
# (docs/contributing.md says how to record them again when a build changes).
PINNED_CPU = {
    "OMP_NUM_THREADS": "2",
    "MKL_NUM_THREADS": "2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
    "FAISS_SIMD_LEVEL": "AVX2",  # faiss-cpu dispatches at run time (AVX512_SPR on a Sapphire Rapids machine)
}
ALL_PIECES = ["camera.aware=true", "camera.own_negatives=0.5", "camera.inter_weight=0.5", "camera.intra_penalty=0.25"]
EVERY_PIECE = ["candidates", "inter", "normalise", "own_negatives"]
CAMERA_SMALL = [*SMALL, *ALL_PIECES]
RECORDED = {
    "weights_sha256": "e9bf9463df0b325d43fa49564f013cd98c36c735570636520c244da43ce64046",
    "dictionary_sha256": "1b3df5717dea0eea348ca6abdedbce6ed92c0f2243041609f2ec2afd7b949096",
}


# --------------------------------------------------------------------------- DTL: own-camera negatives, inter term


def _camera_case(seed: int, *, n=240, d=12, b=10, cameras=4, max_extra=6):
    rng = np.random.default_rng(seed)
    m = F.normalize(torch.from_numpy(rng.standard_normal((n, d))), dim=1)
    x = F.normalize(torch.from_numpy(rng.standard_normal((b, d))), dim=1)
    # ties: a few dictionary rows repeated, so the (z, row) order decides
    m[n - 5 :] = m[:5]
    row_cams = torch.from_numpy(rng.choice(cameras, size=n, p=np.r_[0.55, np.full(cameras - 1, 0.45 / (cameras - 1))]))
    rows = torch.tensor(rng.choice(n, size=b, replace=False))
    indptr, indices = mined_positives(rng, rows, n, max_extra)
    return m, x, rows, indptr, indices, row_cams


def _sorted_rows(hard: torch.Tensor) -> list[list[int]]:
    return [sorted(v for v in row.tolist() if v >= 0) for row in hard]


@pytest.mark.parametrize("own_share", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("block_rows", [1, 13, 240])
def test_own_camera_negatives_equal_the_dense_rule(own_share, block_rows):
    m, x, rows, indptr, indices, row_cams = _camera_case(7)
    cameras = Cameras(row_cams, own_share=own_share)
    r = 0.1
    dense = dtl_dense(x, m, rows, indptr, indices, r, 0.4, cameras)
    for dtype in (torch.float64, torch.float32):  # float32: the packed-key path training takes
        got, h = hard_negatives(
            x.to(dtype), tensor_blocks(m.to(dtype), block_rows), indptr, indices, rows, r, count=len(m), cameras=cameras
        )
        assert _sorted_rows(got) == _sorted_rows(dense["hard"])
    # a share of them from the anchor's camera, the rest as before: |H_b| = h_b
    plain = dtl_dense(x, m, rows, indptr, indices, r, 0.4)["hard"]
    cams = row_cams[rows]
    for b, (new, old) in enumerate(zip(_sorted_rows(dense["hard"]), _sorted_rows(plain))):
        assert len(new) == len(old) == int(h[b])
        positives = set(indices[indptr[b] : indptr[b + 1]].tolist())
        available = sum(int(row_cams[j] == cams[b]) for j in range(len(m)) if j not in positives)
        own_new, own_old = (sum(int(row_cams[j] == cams[b]) for j in hs) for hs in (new, old))
        assert own_new >= min(int(np.floor(own_share * int(h[b]))), available)  # at least the quota
        assert own_new >= own_old  # the quota only swaps other cameras' rows for own-camera ones


def test_own_camera_quota_is_met_exactly_where_the_camera_has_enough_rows():
    m, x, rows, indptr, indices, row_cams = _camera_case(3, cameras=3)
    cameras = Cameras(row_cams, own_share=0.5)
    hard, h = hard_negatives(x, tensor_blocks(m, 16), indptr, indices, rows, 0.2, count=len(m), cameras=cameras)
    cams = row_cams[rows]
    for b, row in enumerate(_sorted_rows(hard)):
        positives = set(indices[indptr[b] : indptr[b + 1]].tolist())
        own = sum(int(row_cams[j] == cams[b]) for j in row)
        assert own >= int(np.floor(0.5 * int(h[b])))  # the camera has ~80 rows: the quota is always met
        assert not positives & set(row)


@pytest.mark.parametrize(("own_share", "inter_weight"), [(0.0, 0.7), (0.5, 0.0), (0.5, 0.7)])
def test_camera_aware_streaming_dtl_equals_the_dense_reference(own_share, inter_weight):
    m, x, rows, indptr, indices, row_cams = _camera_case(11)
    cameras = Cameras(row_cams, own_share=own_share, inter_weight=inter_weight)
    r, delta = 0.08, 0.4
    dense, g_dense = grad_of(lambda v: dtl_dense(v, m, rows, indptr, indices, r, delta, cameras), x)
    stream, g_stream = grad_of(
        lambda v: dtl_streaming(
            v, tensor_blocks(m, 17), tensor_rows(m), rows, indptr, indices, r, delta, count=len(m), cameras=cameras
        ),
        x,
    )
    assert _sorted_rows(stream["hard"]) == _sorted_rows(dense["hard"])
    keys = ("loss", "positive", "negative") + (("inter",) if inter_weight else ())
    for key in keys:
        torch.testing.assert_close(stream[key], dense[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_stream, g_dense, rtol=1e-12, atol=1e-14)
    plain = dtl_dense(x, m, rows, indptr, indices, r, delta)
    assert not torch.isclose(dense["loss"], plain["loss"])  # the terms change the loss
    if inter_weight:
        assert dense["inter"] > 0


def test_the_inter_term_is_the_mean_over_positives_of_other_cameras():
    m, x, rows, indptr, indices, row_cams = _camera_case(2)
    weight = 0.6
    out = dtl_dense(x, m, rows, indptr, indices, 0.05, 0.4, Cameras(row_cams, inter_weight=weight))
    plain = dtl_dense(x, m, rows, indptr, indices, 0.05, 0.4)
    z = x @ m.T
    terms = []
    for b in range(len(x)):
        pos = indices[indptr[b] : indptr[b + 1]]
        other = pos[row_cams[pos] != row_cams[rows[b]]]
        terms.append(float(((1 - z[b, other]) ** 2).mean()) if len(other) else 0.0)
    assert 0.0 in terms and max(terms) > 0  # anchors without positives from other cameras add 0
    np.testing.assert_allclose(float(out["inter"]), np.mean(terms), rtol=1e-12)
    np.testing.assert_allclose(float(out["loss"]), float(plain["loss"]) + weight * np.mean(terms), rtol=1e-12)


@pytest.mark.parametrize("cuts", [(0, 240), (0, 100, 240), (0, 8, 120, 121, 240)])
def test_camera_aware_spans_of_a_partition_add_up_to_the_dense_loss(cuts):
    """What the ranks of a distributed run compute over their rows, merged, is the dense camera-aware DTL."""
    m, x, rows, indptr, indices, row_cams = _camera_case(5)
    cameras = Cameras(row_cams, own_share=0.5, inter_weight=0.7)
    r, delta, n = 0.08, 0.4, len(m)
    dense, g_dense = grad_of(lambda v: dtl_dense(v, m, rows, indptr, indices, r, delta, cameras), x)
    for dtype in (torch.float64, torch.float32):
        spans = list(zip(cuts[:-1], cuts[1:]))
        xs = x.to(dtype).clone().requires_grad_(True)
        blocks = [span_blocks(m.to(dtype), lo, hi, 7) for lo, hi in spans]
        found = [
            span_candidates(xs, b, indptr, indices, rows, r, count=n, span=s, cameras=cameras)
            for b, s in zip(blocks, spans)
        ]
        h, h_own = found[0].h, found[0].own_h
        hard = select_hard(torch.cat([f[0] for f in found], 1), torch.cat([f[1] for f in found], 1), h)
        own = select_hard(torch.cat([f[3] for f in found], 1), torch.cat([f[4] for f in found], 1), h_own)
        hard = combine_own(hard, own, h, h_own, n)
        assert _sorted_rows(hard) == _sorted_rows(dense["hard"])
        parts = [
            dtl_partial(
                xs, tensor_rows(m.to(dtype)), rows, indptr, indices, hard, delta, span=s, chunk_rows=3, cameras=cameras
            )
            for s in spans
        ]
        total = {key: sum(p[key] for p in parts) for key in ("loss", "positive", "negative", "inter")}
        total["loss"].backward()
        tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-6}
        for key in total:
            torch.testing.assert_close(total[key].double(), dense[key], **tol)
        torch.testing.assert_close(xs.grad.double(), g_dense, **tol)


# --------------------------------------------------------------------------- the oracle


def test_oracle_positives_are_the_rows_of_each_vehicle_id():
    ids = np.random.default_rng(0).integers(0, 9, 200)
    indptr, indices = oracle_positives(ids)
    for i in range(len(ids)):
        assert indices[indptr[i] : indptr[i + 1]].tolist() == np.flatnonzero(ids == ids[i]).tolist()
    assert oracle_positives(np.zeros(0, np.int64))[0].tolist() == [0]
    with pytest.raises(ConfigError, match="3 of 200 are unknown"):
        oracle_positives(np.r_[ids[:197], -1, -1, -1])


def _one_error_line(run, code: int, text: str) -> None:
    assert run.returncode == code, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], run.stderr


@pytest.mark.slow
def test_the_oracle_is_refused_without_vehicle_ids_before_anything_is_written(photo_shards, tmp_path):
    run = train_cli(photo_shards, tmp_path / "store", overrides=[*SMALL, "mining.oracle=true"])
    _one_error_line(run, 2, "mining.oracle=true needs the vehicle id of every training image, but 80 of 80")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


@pytest.mark.slow
def test_the_oracle_trains_on_the_ids_and_says_so(shard_root, tmp_path):
    report = final_json(train_cli(shard_root, tmp_path / "store", overrides=[*SMALL, "mining.oracle=true"]))
    history = report["history"]
    assert [h["oracle"] for h in history] == [True] * 3
    assert history[0]["mean_positives"] == 1.0  # the warm-up is the same
    assert [(h["precision"], h["recall"]) for h in history[1:]] == [(1.0, 1.0)] * 2
    _, config = load_model(report["checkpoint"])
    assert config["mining"]["oracle"] is True
    ckpt = latest_checkpoint(tmp_path / "store" / "train")
    assert load_state(ckpt)["config"]["mining"]["oracle"] is True


# --------------------------------------------------------------------------- the switch


@pytest.mark.slow
def test_camera_aware_off_keeps_the_recorded_digests(shard_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU} | PINNED_CPU
    off = [*SMALL, "camera.aware=false", "camera.own_negatives=0.5", "camera.inter_weight=0.5"]
    report = final_json(train_cli(shard_root, tmp_path / "store", overrides=off, env=env))
    assert {k: report[k] for k in RECORDED} == RECORDED
    assert all(h["camera"] == [] for h in report["history"])


@pytest.mark.slow
def test_unknown_cameras_train_camera_agnostic_and_say_so_once(photo_shards, tmp_path):
    plain = final_json(train_cli(photo_shards, tmp_path / "plain", overrides=SMALL))
    run = train_cli(photo_shards, tmp_path / "aware", overrides=[*SMALL, *ALL_PIECES])
    report = final_json(run)
    assert run.stderr.count("camera.aware=true, but the camera ids of 80 of 80 training images are unknown") == 1
    assert {k: report[k] for k in RECORDED} == {k: plain[k] for k in RECORDED}
    assert all(h["camera"] == [] for h in report["history"])
    assert not (tmp_path / "aware" / CAMERA_STORE).exists()


# --------------------------------------------------------------------------- camera-normalised mining


def _camera_store(path, seed=0, n=600, d=24, cameras=5):
    """Rows of 60 vehicles seen by 5 cameras, each camera adding its own offset: a camera's rows look alike."""
    rng = np.random.default_rng(seed)
    vids = rng.integers(0, 60, n)
    cams = rng.integers(0, cameras, n)
    x = rng.standard_normal((60, d))[vids] + 1.6 * rng.standard_normal((cameras, d))[cams]
    x += 0.5 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    store = FeatureStore.create(path, n, d, ids=vids, camids=cams, chunk_bytes=128 * d * 2)
    store.write_rows(0, x)
    return store, x, vids, cams


def test_the_normalised_copy_equals_the_dense_normalisation_and_follows_the_dictionary(tmp_path):
    store, x, _, cams = _camera_store(tmp_path / "s")
    copy = normalised_dictionary(store)
    table = copy.array("means")[:]
    dense = {c: x[cams == c].astype(np.float64).mean(axis=0) for c in np.unique(cams)}
    np.testing.assert_allclose(table, np.stack([dense[c] for c in sorted(dense)]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(copy.array("mean_cams")[:], sorted(dense))
    expected = camera_normalise(x, cams, dense).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(copy.features[:]), expected)
    assert np.array_equal(copy.camids(), cams) and np.array_equal(copy.ids(), store.ids())
    # unchanged dictionary: the copy is reused; a write: it is made again from the new rows
    version = copy.features_version
    assert normalised_dictionary(store).features_version == version
    store.write_rows(0, x[::-1].copy())
    again = normalised_dictionary(store)
    assert again.features_version > version
    flipped = {c: x[::-1][cams == c].astype(np.float64).mean(axis=0) for c in np.unique(cams)}
    np.testing.assert_array_equal(np.asarray(again.features[:]), camera_normalise(x[::-1], cams, flipped).astype("f2"))


def test_camera_normalised_mining_equals_dense_dplm_on_the_normalised_rows(tmp_path):
    store, x, vids, cams = _camera_store(tmp_path / "s", seed=4)
    params = MineParams(k=21, adjacency=20, min_candidates=5, threshold=0.5)
    copy = normalised_dictionary(store)
    mine(str(copy.path), params, memory_budget=200 << 20)
    got = read_positives(copy)
    normalised = np.asarray(copy.features[:])
    ref = dplm_dense(normalised, threshold=0.5, min_candidates=5, adjacency=20)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    # on these rows the camera offsets dominate: normalised, the positives cross cameras far more often
    plain = dplm_dense(x, threshold=0.5, min_candidates=5, adjacency=20)

    def cross_camera_precision(indptr, indices):
        seg = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        other = indices != seg
        return float(np.mean(vids[indices[other]] == vids[seg[other]])), float(np.mean(cams[indices] != cams[seg]))

    (p_norm, cross_norm), (p_plain, cross_plain) = cross_camera_precision(*ref), cross_camera_precision(*plain)
    assert p_norm > p_plain and cross_norm > cross_plain


# --------------------------------------------------------------------------- camera-aware candidate lists


def _lists_case(tmp_path, dtype: str, seed: int = 4):
    store, x, vids, cams = _camera_store(tmp_path / "s", seed=seed)
    if dtype == "float32":
        x = x.astype(np.float32) + np.float32(1e-3) * np.random.default_rng(seed).standard_normal(x.shape, np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store = FeatureStore.create(tmp_path / "s32", len(x), x.shape[1], dtype="float32", ids=vids, camids=cams)
        store.write_rows(0, x)
    return store, x, vids, cams


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("penalty", [0.25, 0.1])
@pytest.mark.parametrize("small_blocks", [False, True])
def test_camera_aware_lists_equal_the_dense_reference(tmp_path, monkeypatch, dtype, penalty, small_blocks):
    """Blockwise camera-aware mining (own-camera neighbours ranked by s - delta) equals the dense DPLM on the
    N x N camera-aware similarity: graph rows, C_i and positives; with small blocks on two threads the rank
    checks run several counting passes through the widened buffers."""
    if small_blocks:
        plan = mining.block_plan
        monkeypatch.setattr(mining, "block_plan", lambda *a, **k: dataclasses.replace(plan(*a, **k), **SMALL_BLOCKS))
    store, x, vids, cams = _lists_case(tmp_path, dtype)
    params = MineParams(k=21, adjacency=20, min_candidates=5, threshold=0.3, camera_penalty=penalty)
    report = mine(str(store.path), params, memory_budget=200 << 20, workers=2)
    assert report["counted_pairs"] > 0  # the exact counting pass ran on widened rows
    s = camera_similarity(x, cams, penalty)
    sigma = _sigma_rows(s, np.arange(len(x)))[:, : params.k]
    idx, sim, counts = graph(store.path)
    assert np.array_equal(idx, sigma)
    assert np.array_equal(sim[:, 1:], np.take_along_axis(s, sigma[:, 1:], axis=1))
    assert np.array_equal(counts, 1 + np.count_nonzero(s >= 0.3, axis=1) - (np.diagonal(s) >= 0.3))
    ref = dplm_dense(x, threshold=0.3, min_candidates=5, adjacency=20, camids=cams, camera_penalty=penalty)
    got = read_positives(store)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])
    # the merged lists hold more rows of other cameras than the plain ones, and the rule is s - delta
    plain = dplm_dense(x, threshold=0.3, min_candidates=5, adjacency=20)
    assert _cross_camera(ref, cams) > _cross_camera(plain, cams)
    c = float(np.asarray(np.sqrt(penalty)).astype(x.dtype))
    same = cams[:, None] == cams[None, :]
    np.testing.assert_allclose(s, x.astype(np.float64) @ x.astype(np.float64).T - c * c * same, atol=1e-12)


def _cross_camera(csr, cams) -> float:
    indptr, indices = csr
    seg = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    return float(np.mean(cams[indices[indices != seg]] != cams[seg[indices != seg]]))


@pytest.mark.slow
def test_camera_aware_lists_on_a_dask_cluster_equal_local_threads(tmp_path):
    from distributed import LocalCluster

    local, x, _, cams = _lists_case(tmp_path / "a", "float16")
    remote, _, _, _ = _lists_case(tmp_path / "b", "float16")
    params = MineParams(k=21, adjacency=20, min_candidates=5, threshold=0.3, camera_penalty=0.25)
    mine(str(local.path), params, memory_budget=200 << 20)
    saved = dict(os.environ)
    try:
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            mine(str(remote.path), params, memory_budget=200 << 20, scheduler=cluster.scheduler_address)
    finally:
        os.environ.clear()  # the nannies leave OMP_NUM_THREADS=1 behind (see tests/test_mining.py)
        os.environ.update(saved)
    for a, b in zip(read_positives(local), read_positives(remote)):
        assert np.array_equal(a, b)


def test_wildreid_mine_camera_penalty(tmp_path):
    """``wildreid mine --camera-penalty`` mines the camera-aware lists; unknown cameras and a bad penalty are
    refused in one line before anything is written."""
    from typer.testing import CliRunner

    from wildreid.cli import app

    store, x, _, cams = _camera_store(tmp_path / "s")
    options = ["--k", "21", "--adjacency", "20", "--min-candidates", "5", "--threshold", "0.3"]
    result = CliRunner().invoke(app, ["mine", "--store", str(store.path), *options, "--camera-penalty", "0.25"])
    assert result.exit_code == 0, result.output
    ref = dplm_dense(x, threshold=0.3, min_candidates=5, adjacency=20, camids=cams, camera_penalty=0.25)
    assert all(np.array_equal(a, b) for a, b in zip(read_positives(store), ref))
    cams = cams.copy()
    cams[:7] = -1
    odd = FeatureStore.create(tmp_path / "odd", len(x), x.shape[1], camids=cams)
    odd.write_rows(0, x)
    for penalty, code, message in [("0.25", StoreError.exit_code, "7 of 600 are unknown"), ("2.5", 2, "[0, 2)")]:
        result = CliRunner().invoke(app, ["mine", "--store", str(odd.path), *options, "--camera-penalty", penalty])
        assert result.exit_code == code and message in result.output, result.output
        assert "Traceback" not in result.output and not odd.has("knn/indices")


# --------------------------------------------------------------------------- camera-aware runs: resume, ranks


@pytest.fixture(scope="module")
def camera_run(shard_root, tmp_path_factory) -> dict:
    """One uninterrupted run with every camera-aware piece on (SMALL settings; read only)."""
    return final_json(train_cli(shard_root, tmp_path_factory.mktemp("camera") / "store", overrides=CAMERA_SMALL))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "code"),
    [
        ({"WILDREID_KILL_AT": "knn:0"}, -signal.SIGKILL),  # inside the first mining of the normalised copy
        ({"WILDREID_SIGNAL_AT": "step:7"}, Stopped.exit_code),  # SIGTERM between checkpoints
    ],
)
def test_camera_aware_runs_resume_to_the_uninterrupted_digests(camera_run, shard_root, tmp_path, env, code):
    assert camera_run["history"][-1]["camera"] == EVERY_PIECE
    store = tmp_path / "store"
    stopped = train_cli(shard_root, store, overrides=CAMERA_SMALL, env=env)
    assert stopped.returncode == code, stopped.stderr[-2000:]
    resumed = final_json(train_cli(shard_root, store, "--resume", overrides=CAMERA_SMALL))
    assert {k: resumed[k] for k in RECORDED} == {k: camera_run[k] for k in RECORDED}
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in camera_run["history"]]
    assert (store / CAMERA_STORE / "means").exists()
    # the checkpoint keeps the means table the last mining removed (the copy's, of the dictionary it came from)
    kept = load_state(latest_checkpoint(store / "train"))["camera_means"]
    copy = FeatureStore.open(store / CAMERA_STORE)
    assert kept["source"] == copy.meta("source") and kept["cameras"] == copy.array("mean_cams")[:].tolist()
    np.testing.assert_array_equal(kept["means"].numpy(), copy.array("means")[:])


@pytest.mark.slow
def test_camera_aware_training_on_two_ranks(shard_root, tmp_path):
    """Two processes with every piece on: normalised mining split over the ranks, the own-camera candidates
    gathered; the step itself equals the dense reference (tests/test_world.py); here the run as a whole."""
    run = train_ranks(shard_root, tmp_path / "store", *TWO, overrides=[*RUN, *ALL_PIECES])
    report = final_json(run)
    assert report["world"]["size"] == 2
    history = report["history"]
    assert [h["camera"] for h in history] == [EVERY_PIECE] * 2
    assert history[-1]["mean_positives"] >= 1.0 and np.isfinite(history[-1]["loss"])
    copy = FeatureStore.open(tmp_path / "store" / CAMERA_STORE)
    assert copy.meta("source") is not None and copy.has("positives/indptr")
