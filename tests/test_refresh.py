"""The training options that make wildreid train as the published SSML-FD code does, one at a time.

train.refresh (published rebuild in train mode vs eval-mode re-extraction), dictionary.dtype and
model.eval_feature: each changes what it says and nothing else, and resume stays exact for each.
The training runs use test_train's SMALL settings: 80 images, 5 steps an epoch, epochs 0 (warm-up),
1 and 2, the dictionary rebuilt at epoch 2.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
import zarr
from helpers import ROOT, SMALL, final_json, train_cli

from wildreid.checkpoint import load_state
from wildreid.config import load_config
from wildreid.dtl import momentum_update
from wildreid.extract import extract_split, refresh_key
from wildreid.model import build_model
from wildreid.shards.reader import ShardDataset, split_labels
from wildreid.stores import FeatureStore
from wildreid.training import refresh_features
from wildreid.transforms import train_transform

STOPPED = 75


def _bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}


@pytest.mark.slow
def test_published_rebuild_moves_batchnorm_as_train_mode_passes_and_writes_their_features(
    uninterrupted, shard_root, tmp_path
):
    """A stop after 3 batches of epoch 2's rebuild: its checkpoint holds the model of the epoch-1 checkpoint
    after exactly 3 train-mode forward passes over the rebuild's batches, and those batches' rows are their
    features; the weights did not move."""
    store = tmp_path / "store"
    stopped = train_cli(shard_root, store, env={"WILDREID_SIGNAL_AT": "refresh:2:3"})
    assert stopped.returncode == STOPPED, stopped.stderr[-3000:]
    assert (
        stopped.stderr.strip()
        .splitlines()[-1]
        .endswith("stopped at epoch 2 step 10, in the dictionary rebuild (48 of 80 samples); resume with --resume")
    )
    ckpts = sorted((store / "train" / "checkpoints").glob("ckpt-*"))
    assert [p.name for p in ckpts] == ["ckpt-0000000010", "ckpt-0000000010-refresh-0000000048"]
    before, after = (load_state(p) for p in ckpts)
    assert after["refreshed"] == 48 and after["epoch"] == 2 and after["position"] == 0

    config = load_config(ROOT / "configs" / "demo.yaml", SMALL)
    model = build_model("resnet18")
    model.load_state_dict(before["model"])
    model.train()
    dataset = ShardDataset(shard_root, "train", image_size=(64, 32), seed=config.train.seed, lanes=1, chunk=16)
    dataset.set_epoch(refresh_key(2))
    augment = train_transform((64, 32), seed=config.train.seed)
    expected = zarr.open_array(ckpts[0] / "dictionary", mode="r")[:].astype(np.float32)
    for b, (images, idx, _vid, _cam) in enumerate(dataset):
        if b == 3:
            break
        expected[idx.numpy()] = refresh_features(model, augment(images, idx, refresh_key(2))).numpy()
    state = after["model"]
    for key, value in _bn_buffers(model).items():
        assert torch.allclose(state[key].float(), value.float(), rtol=1e-4, atol=1e-5), key
        assert not torch.equal(before["model"][key], state[key]), key  # the rebuild moved them
    weights = [k for k in state if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(state[k], before["model"][k]) for k in weights)  # no gradient step
    rows = zarr.open_array(ckpts[1] / "dictionary", mode="r")[:].astype(np.float32)
    np.testing.assert_allclose(rows, expected.astype(np.float16).astype(np.float32), atol=2e-3)

    resumed = final_json(train_cli(shard_root, store, "--resume"))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["dictionary_sha256"] == uninterrupted["dictionary_sha256"]


@pytest.mark.slow
def test_kill_9_inside_the_rebuild_resumes_exactly(uninterrupted, shard_root, tmp_path):
    store = tmp_path / "store"
    killed = train_cli(shard_root, store, env={"WILDREID_KILL_AT": "refresh:2:4"})  # after its checkpoint at 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (store / "train" / "LATEST").read_text() == "ckpt-0000000010-refresh-0000000048"
    resumed = final_json(train_cli(shard_root, store, "--resume"))
    assert resumed["weights_sha256"] == uninterrupted["weights_sha256"]
    assert resumed["dictionary_sha256"] == uninterrupted["dictionary_sha256"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]


def test_eval_mode_extraction_leaves_batchnorm_alone(shard_root, tmp_path):
    model = build_model("resnet18")
    model.train()
    before = _bn_buffers(model)
    store = FeatureStore.create(tmp_path / "group", 80, 512)
    extract_split(shard_root, "train", model, store, image_size=(64, 32))
    assert model.training  # given back in the mode it came in
    assert all(torch.equal(before[k], v) for k, v in _bn_buffers(model).items())
    assert np.all(np.abs(np.linalg.norm(store.read_rows(0, 80).astype(np.float32), axis=1) - 1) < 1e-2)


@pytest.mark.slow
def test_refresh_eval_trains_another_model_and_resumes_exactly(uninterrupted, shard_root, tmp_path):
    """train.refresh=eval: extraction at epochs 0 and 2 (a stop there resumes exactly); another model."""
    overrides = [*SMALL, "train.refresh=eval"]
    reference = final_json(train_cli(shard_root, tmp_path / "reference", overrides=overrides))
    assert [h["refresh"] for h in reference["history"]] == ["eval"] * 3
    assert reference["weights_sha256"] != uninterrupted["weights_sha256"]
    store = tmp_path / "store"
    stopped = train_cli(shard_root, store, overrides=overrides, env={"WILDREID_SIGNAL_AT": "extract:2"})
    assert stopped.returncode == STOPPED, stopped.stderr[-3000:]
    assert "stopped at epoch 2 step 10, before the epoch's first step" in stopped.stderr
    resumed = final_json(train_cli(shard_root, store, "--resume", overrides=overrides))
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["dictionary_sha256"] == reference["dictionary_sha256"]


def test_published_dictionary_starts_at_zeros_and_steps_fill_it():
    """From a zero row the momentum update is the feature itself: the published initial memory."""
    x = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    assert torch.allclose(momentum_update(torch.zeros(4, 8), x, torch.arange(4)), x)


@pytest.mark.slow
def test_float32_dictionary_changes_only_the_dictionary_dtype(shard_root, tmp_path):
    """One warm-up epoch with each dtype: same rows up to float16 rounding, same labels, another digest."""
    one = [*SMALL, "train.epochs=1", "train.checkpoint_every_steps=0"]
    half = final_json(train_cli(shard_root, tmp_path / "half", overrides=one))
    full = final_json(train_cli(shard_root, tmp_path / "full", overrides=[*one, "dictionary.dtype=float32"]))
    a, b = FeatureStore.open(tmp_path / "half"), FeatureStore.open(tmp_path / "full")
    assert (str(a.features.dtype), str(b.features.dtype)) == ("float16", "float32")
    assert full["dictionary_sha256"] != half["dictionary_sha256"]
    np.testing.assert_array_equal(a.ids(), b.ids())
    np.testing.assert_array_equal(a.ids(), split_labels(shard_root, "train")[0])
    # the first step saw a zero dictionary in both: later steps differ by float16 rounding of the rows
    np.testing.assert_allclose(a.read_rows(0, 80).astype(np.float32), b.read_rows(0, 80), atol=5e-2)
    assert [h["loss"] for h in half["history"]] == pytest.approx([h["loss"] for h in full["history"]], rel=1e-2)


@pytest.mark.slow
def test_other_options_resume_exactly(shard_root, tmp_path):
    """The published mining order and a float32 dictionary with per-batch mining: kill -9 mid-epoch, resume."""
    overrides = [*SMALL, "mining.order=published", "dictionary.dtype=float32", "train.mining=batch"]
    reference = final_json(train_cli(shard_root, tmp_path / "reference", overrides=overrides))
    store = tmp_path / "store"
    killed = train_cli(shard_root, store, overrides=overrides, env={"WILDREID_KILL_AT": "after-step:8"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = final_json(train_cli(shard_root, store, "--resume", overrides=overrides))
    assert resumed["weights_sha256"] == reference["weights_sha256"]
    assert resumed["dictionary_sha256"] == reference["dictionary_sha256"]


def test_pool5_is_the_normalised_pooled_feature_before_the_neck():
    model = build_model("resnet18").eval()
    model.neck.running_mean.normal_(generator=torch.Generator().manual_seed(2))  # a neck that is not the identity
    x = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled = model.feature_map(x).mean(dim=(2, 3))
        assert torch.allclose(model(x, "pool5"), torch.nn.functional.normalize(pooled, dim=1))
        assert torch.allclose(model(x), torch.nn.functional.normalize(model.neck(pooled), dim=1))
        assert not torch.allclose(model(x, "pool5"), model(x))


def test_split_labels_read_only_the_label_members(shard_root):
    ids, camids = split_labels(shard_root, "train")
    dataset = ShardDataset(shard_root, "train", image_size=(64, 32), shuffle=False, chunk=80)
    _images, idx, vid, cam = next(iter(dataset))
    np.testing.assert_array_equal(ids[idx.numpy()], vid.numpy())
    np.testing.assert_array_equal(camids[idx.numpy()], cam.numpy())
