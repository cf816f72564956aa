"""The Re-ID network (shapes, last stride, BN neck, weights) and the image transforms."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import models
from torchvision.transforms.v2 import functional as tvf

from wildreid.core.errors import ConfigError
from wildreid.model import build_model, imagenet_weights_file, param_groups, weights_sha256
from wildreid.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_params_batch,
    augment,
    augment_batch,
    draw_params,
    sample_seed,
    test_transform,
    train_transform,
)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return build_model("resnet18")


def test_output_is_normalised_in_train_and_eval(resnet18):
    x = torch.randn(3, 3, 64, 32)
    for train in (True, False):
        resnet18.train(train)
        with torch.no_grad():
            out = resnet18(x)
        assert out.shape == (3, 512) and resnet18.feature_dim == 512
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3), rtol=1e-5, atol=1e-5)
    assert resnet18.pretrained_from is None


@pytest.mark.parametrize(("last_stride", "hw"), [(1, (4, 2)), (2, (2, 1))])
def test_last_stride_sets_the_map_size(last_stride, hw):
    model = build_model("resnet18", last_stride=last_stride).eval()
    with torch.no_grad():
        assert model.feature_map(torch.zeros(1, 3, 64, 32)).shape[-2:] == hw


def test_resnet50_gives_a_16_by_8_map_for_256_by_128():
    model = build_model("resnet50").eval()
    block = model.backbone.layer4[0]
    assert model.feature_dim == 2048
    assert block.conv2.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    with torch.no_grad():
        assert model.feature_map(torch.zeros(1, 3, 256, 128)).shape == (1, 2048, 16, 8)


def test_neck_bias_is_frozen_and_groups_split_the_lr(resnet18):
    assert not resnet18.neck.bias.requires_grad and resnet18.neck.weight.requires_grad
    groups = param_groups(resnet18, 0.1, backbone_factor=0.1)
    assert [g["name"] for g in groups] == ["backbone", "neck"]
    assert groups[0]["lr"] == pytest.approx(0.01) and groups[1]["lr"] == 0.1
    assert [id(p) for p in groups[1]["params"]] == [id(resnet18.neck.weight)]
    n_trainable = sum(p.requires_grad for p in resnet18.parameters())
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_trainable


def test_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    source = models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # with fc.*, as torchvision ships them
    model = build_model("resnet18", pretrained=path)
    assert model.pretrained_from == str(path)
    torch.testing.assert_close(model.backbone.conv1.weight, source.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert weights_sha256(model) == weights_sha256(build_model("resnet18", pretrained=path))
    assert weights_sha256(model) != weights_sha256(build_model("resnet18"))


def test_pretrained_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing.pth do not exist"):
        build_model("resnet18", pretrained=tmp_path / "missing.pth")
    wrong = tmp_path / "resnet34.pth"
    torch.save(models.resnet34(weights=None).state_dict(), wrong)
    with pytest.raises(ConfigError, match="resnet34.pth do not match"):
        build_model("resnet18", pretrained=wrong)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        build_model("resnet18", pretrained=junk)
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("vgg16")


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("WILDREID_OFFLINE", "1")  # a cache hit must not need the network
    url, cached = imagenet_weights_file("resnet18")
    assert cached == tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth" and url.endswith(cached.name)
    torch.manual_seed(2)
    source = models.resnet18(weights=None)
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    model = build_model("resnet18", pretrained="imagenet")
    assert model.pretrained_from == f"imagenet ({cached})"
    torch.testing.assert_close(model.backbone.layer3[0].conv1.weight, source.layer3[0].conv1.weight, rtol=0, atol=0)
    assert weights_sha256(model) == weights_sha256(build_model("resnet18", pretrained=cached))


def test_imagenet_weights_missing_offline_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv("WILDREID_OFFLINE", "1")
    folder = tmp_path / "empty" / "hub" / "checkpoints"
    with pytest.raises(ConfigError) as caught:
        build_model("resnet50", pretrained="imagenet")
    message = str(caught.value)
    assert "resnet50-0676ba61.pth" in message and str(folder) in message and "\n" not in message
    assert "WILDREID_OFFLINE" in message and not folder.exists()  # offline: nothing created, nothing fetched


@pytest.mark.slow
def test_imagenet_weights_cli_error_is_one_line(shard_root, tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "torch"), "WILDREID_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "wildreid.cli", "train", "--shards", str(shard_root), "--store", str(tmp_path / "run")]
    cmd += ["--config", str(Path(__file__).parent.parent / "configs" / "demo.yaml"), "--pretrained", "imagenet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ImageNet weights for resnet18"), done.stderr
    assert not (tmp_path / "run").exists()  # refused before the store was created


def test_weights_digest_follows_every_tensor(resnet18):
    before = weights_sha256(resnet18)
    assert len(before) == 64 and before == weights_sha256(resnet18)
    with torch.no_grad():
        resnet18.neck.running_mean[0] += 1
    assert weights_sha256(resnet18) != before
    with torch.no_grad():
        resnet18.neck.running_mean[0] -= 1


# --------------------------------------------------------------------------- transforms


def image(seed: int, h: int = 80, w: int = 60) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_augment_is_a_function_of_seed_epoch_index():
    img = image(0)
    a = augment(img, 7, 3, 12, (32, 16))
    assert a.shape == (3, 32, 16) and a.dtype == torch.float32
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(a, augment(img, 7, 3, 12, (32, 16)))
    for other in [(7, 3, 13), (7, 4, 12), (8, 3, 12)]:
        assert not torch.equal(a, augment(img, *other, (32, 16)))


def test_batch_matches_single_samples():
    imgs = torch.stack([image(s) for s in range(4)])
    transform = train_transform((32, 16), seed=5)
    out = transform(imgs, torch.tensor([10, 11, 12, 13]), epoch=2)
    assert out.shape == (4, 3, 32, 16)
    for k in range(4):
        assert torch.equal(out[k], augment(imgs[k], 5, 2, 10 + k, (32, 16)))
    assert torch.equal(augment_batch(list(imgs), 5, 2, [10, 11, 12, 13], (32, 16)), out)


def torchvision_reference(image: torch.Tensor, params, size) -> torch.Tensor:
    """The augmentation written image by image with torchvision's own functions."""
    top, left, ch, cw = params.crop
    bilinear = tvf.InterpolationMode.BILINEAR
    x = tvf.resized_crop(image, top, left, ch, cw, list(size), interpolation=bilinear, antialias=True)
    x = tvf.to_dtype(tvf.hflip(x) if params.flip else x, torch.float32, scale=True)
    for name, factor in params.jitter:
        x = getattr(tvf, f"adjust_{name}")(x, factor)
    x = tvf.rotate(x, params.angle, interpolation=bilinear, fill=list(IMAGENET_MEAN))
    x = tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    if params.erase is not None:
        i, j, h, w = params.erase
        x = tvf.erase(x, i, j, h, w, torch.zeros((3, 1, 1)))
    return x


def test_batched_augmentation_equals_torchvision_image_by_image():
    # the batch runs jitter with per-image factors and one grid_sample for all rotations
    imgs = torch.stack([image(s) for s in range(24)])
    params = [draw_params(torch.Generator().manual_seed(sample_seed(1, 0, i)), (80, 60), (32, 16)) for i in range(24)]
    assert max(abs(p.angle) for p in params) > 5 and any(p.flip for p in params) and any(p.erase for p in params)
    out = apply_params_batch(imgs, params, (32, 16))
    expected = torch.stack([torchvision_reference(img, p, (32, 16)) for img, p in zip(imgs, params)])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


def test_parameters_cover_every_step():
    draws = [draw_params(torch.Generator().manual_seed(sample_seed(0, 0, i)), (80, 60), (32, 16)) for i in range(200)]
    flips = sum(p.flip for p in draws)
    erased = sum(p.erase is not None for p in draws)
    assert 70 < flips < 130 and 70 < erased < 130
    assert all(abs(p.angle) <= 10 for p in draws) and max(abs(p.angle) for p in draws) > 8
    assert all(0.8 <= f <= 1.2 for p in draws for _, f in p.jitter)
    assert len({tuple(n for n, _ in p.jitter) for p in draws}) == 6  # every order of the three jitters
    for p in draws:
        top, left, h, w = p.crop
        assert 0 <= top and top + h <= 80 and 0 <= left and left + w <= 60 and 0.6 < h * w / 4800 <= 1.0
        if p.erase:
            i, j, eh, ew = p.erase
            assert i + eh <= 32 and j + ew <= 16


def test_test_transform_resizes_and_normalises():
    transform = test_transform((32, 16))
    white = torch.full((3, 64, 32), 255, dtype=torch.uint8)
    out = transform(white)
    assert out.shape == (3, 32, 16)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))
    assert transform(white.expand(2, -1, -1, -1)).shape == (2, 3, 32, 16)
    with pytest.raises(ConfigError, match="uint8"):
        transform(white.float())
    with pytest.raises(ConfigError, match="image size"):
        test_transform((32,))
