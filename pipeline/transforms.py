"""Image transforms: a fixed test transform and a reproducible training augmentation.

Images arrive as uint8 tensors, (3, H, W) per sample or (B, 3, H, W) batches, on
any device; the result is float32 on the same device, ImageNet-normalised.

The training augmentation of a sample is a pure function of (seed, epoch, sample
index): every random parameter is drawn from a CPU ``torch.Generator`` seeded
from a hash of the three (``sample_seed``), never from the global RNG, so a run
resumed after a crash augments every sample exactly as the first attempt did.
The shard reader's per-image ``transform`` sees no index, so the reader only
resizes to a fixed size (its default) and the training loop augments the
batch with the dense sample indices the reader yields::

    augment = train_transform((256, 128), seed=cfg.train.seed)
    for images, indices, vids, camids in loader:
        x = augment(images.to(device), indices, epoch)

Steps, each with its parameters drawn first (``draw_params``) and applied to the
whole batch at once with per-image parameters (``apply_params_batch``; the
formulas are torchvision's, the rotation one ``grid_sample`` for the batch):
random resized crop
(area 64-100 %, aspect within 3/4-4/3 of the image's) to H x W, horizontal flip
p=0.5, rotation within +-10 degrees (corners filled with the mean colour),
brightness / contrast / saturation jitter 0.2 in a random order, ImageNet
normalisation, random erasing p=0.5 (area 2-33 %, aspect 0.3-3.3, value 0,
i.e. the mean colour) on the normalised tensor.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as tvf

from wildreid.core.errors import ConfigError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentParams",
    "TrainTransform",
    "apply_params",
    "apply_params_batch",
    "augment",
    "augment_batch",
    "draw_params",
    "normalise",
    "sample_seed",
    "test_transform",
    "train_transform",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BILINEAR = tvf.InterpolationMode.BILINEAR
_JITTERS = ("brightness", "contrast", "saturation")


@dataclass(frozen=True)
class AugmentParams:
    """Every random choice of one sample's augmentation."""

    crop: tuple[int, int, int, int]  # top, left, height, width in the input image
    flip: bool
    angle: float  # degrees, counter-clockwise
    jitter: tuple[tuple[str, float], ...]  # (brightness|contrast|saturation, factor) in the order applied
    erase: tuple[int, int, int, int] | None  # top, left, height, width in the output, or None


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise ConfigError(f"expected an image size (H, W) of two positive ints, found {tuple(size)}")
    return int(size[0]), int(size[1])


def _check_image(image: torch.Tensor, ndim: int) -> None:
    if image.dtype != torch.uint8 or image.ndim != ndim or image.shape[-3] != 3:
        shape = "(3, H, W)" if ndim == 3 else "(B, 3, H, W)"
        raise ConfigError(
            f"expected a {shape} uint8 image tensor, found {tuple(image.shape)} {image.dtype}; "
            "decode images with wildreid.shards.reader.decode_tensor"
        )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that is a pure function of (seed, epoch, index), stable across runs and machines."""
    digest = hashlib.blake2b(f"wildreid-augment:{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] -> ImageNet-normalised."""
    return tvf.normalize(tvf.to_dtype(image, torch.float32, scale=True), list(IMAGENET_MEAN), list(IMAGENET_STD))


def draw_params(
    generator: torch.Generator,
    image_hw: tuple[int, int],
    size: tuple[int, int],
    *,
    scale: tuple[float, float] = (0.64, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    degrees: float = 10.0,
    jitter: float = 0.2,
    erase_p: float = 0.5,
    erase_scale: tuple[float, float] = (0.02, 0.33),
    erase_ratio: tuple[float, float] = (0.3, 3.3),
) -> AugmentParams:
    """Draw one sample's parameters from ``generator`` (always in the same order)."""
    h0, w0 = image_hw
    out_h, out_w = size
    u = torch.rand(8, generator=generator, dtype=torch.float64).tolist()
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    ch = min(h0, max(1, round(h0 * math.sqrt(area / aspect))))
    cw = min(w0, max(1, round(w0 * math.sqrt(area * aspect))))
    top, left = min(h0 - ch, int(u[2] * (h0 - ch + 1))), min(w0 - cw, int(u[3] * (w0 - cw + 1)))
    flip = u[4] < 0.5
    angle = degrees * (2 * u[5] - 1)
    factors = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
    order = torch.randperm(3, generator=generator).tolist()
    jitters = tuple((_JITTERS[k], 1 - jitter + 2 * jitter * factors[k]) for k in order)
    erase = None
    if u[6] < erase_p:
        for _ in range(10):  # as torchvision's RandomErasing: give up after 10 boxes that do not fit
            e = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
            target = out_h * out_w * (erase_scale[0] + (erase_scale[1] - erase_scale[0]) * e[0])
            log_r = math.log(erase_ratio[0]) + (math.log(erase_ratio[1]) - math.log(erase_ratio[0])) * e[1]
            eh, ew = round(math.sqrt(target * math.exp(log_r))), round(math.sqrt(target / math.exp(log_r)))
            if 0 < eh < out_h and 0 < ew < out_w:
                erase = (int(e[2] * (out_h - eh + 1)), int(e[3] * (out_w - ew + 1)), eh, ew)
                break
    return AugmentParams(crop=(top, left, ch, cw), flip=flip, angle=angle, jitter=jitters, erase=erase)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1]; ``ratio`` is (B, 1, 1, 1), one per image."""
    return (x * ratio + other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


# torchvision's float formulas, with one factor per image of the batch
_ADJUST = {
    "brightness": lambda x, f: (x * f).clamp_(0.0, 1.0),
    "contrast": lambda x, f: _blend(x, _grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f),
    "saturation": lambda x, f: _blend(x, _grayscale(x), f),
}


def _rotate(x: torch.Tensor, degrees: Sequence[float], fill: Sequence[float]) -> torch.Tensor:
    """Rotate each image of (B, 3, H, W) float ``x`` counter-clockwise about its centre by its angle, in one
    bilinear ``grid_sample``; corners outside the source take ``fill`` (blended at the border, as torchvision)."""
    b, _, h, w = x.shape
    angle = torch.tensor(list(degrees), dtype=torch.float64) * (math.pi / 180)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output pixel (u, v) from the centre, y down, samples the source at (cos u - sin v, sin u + cos v);
    # in grid_sample's [-1, 1] coordinates the off-diagonal terms carry the aspect ratio
    theta = torch.zeros(b, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    grid = F.affine_grid(theta.to(x.dtype), [b, 3, h, w], align_corners=False).to(x.device)
    with_mask = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
    out = F.grid_sample(with_mask, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    image, mask = out[:, :3], out[:, 3:]
    colour = torch.tensor(list(fill), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (image - colour).mul_(mask).add_(colour)


def apply_params_batch(images, params: Sequence[AugmentParams], size: tuple[int, int]) -> torch.Tensor:
    """Augment uint8 images ((B, 3, H, W) or a list of (3, H, W)) with drawn parameters, one set per image:
    float32 (B, 3, *size), normalised, on their device.

    Crops differ in size, so they are cut and resized image by image; every later step
    runs once for the batch with per-image parameters, and each image's result depends
    on its own image and parameters only (so a batch of one gives the same bits).
    """
    crops = [
        tvf.resized_crop(img, *p.crop, list(size), interpolation=_BILINEAR, antialias=True)
        for img, p in zip(images, params)
    ]
    x = tvf.to_dtype(torch.stack(crops), torch.float32, scale=True)
    flip = [k for k, p in enumerate(params) if p.flip]
    if flip:
        x[flip] = x[flip].flip(-1)
    for position in range(len(_JITTERS)):
        for name in _JITTERS:
            chosen = [k for k, p in enumerate(params) if p.jitter[position][0] == name]
            if chosen:
                factor = torch.tensor([params[k].jitter[position][1] for k in chosen], dtype=x.dtype, device=x.device)
                x[chosen] = _ADJUST[name](x[chosen], factor.view(-1, 1, 1, 1))
    x = _rotate(x, [p.angle for p in params], IMAGENET_MEAN)
    x = tvf.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))
    for k, p in enumerate(params):
        if p.erase is not None:
            i, j, h, w = p.erase
            x[k, :, i : i + h, j : j + w] = 0.0  # the mean colour, once normalised
    return x


def apply_params(image: torch.Tensor, params: AugmentParams, size: tuple[int, int]) -> torch.Tensor:
    """Augment one (3, H, W) uint8 image with drawn parameters: float32 (3, *size), normalised, on its device."""
    return apply_params_batch([image], [params], size)[0]


def _params(image: torch.Tensor, seed: int, epoch: int, index: int, size: tuple[int, int]) -> AugmentParams:
    generator = torch.Generator(device="cpu").manual_seed(sample_seed(seed, epoch, index))
    return draw_params(generator, (image.shape[-2], image.shape[-1]), size)


def augment(image: torch.Tensor, seed: int, epoch: int, index: int, size: Sequence[int] = (256, 128)) -> torch.Tensor:
    """Training augmentation of one (3, H, W) uint8 image; a pure function of (image, seed, epoch, index)."""
    _check_image(image, 3)
    size = _check_size(size)
    return apply_params(image, _params(image, seed, epoch, index, size), size)


def augment_batch(images, seed: int, epoch: int, indices, size: Sequence[int] = (256, 128)) -> torch.Tensor:
    """``augment`` of each image ((B, 3, H, W) uint8 or a list of (3, H, W)) with its sample index: (B, 3, *size)."""
    indices = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    if isinstance(images, torch.Tensor):
        _check_image(images, 4)
    else:
        for img in images:
            _check_image(img, 3)
    if len(images) != len(indices) or len(indices) == 0:
        raise ConfigError(
            f"expected one sample index per image and at least one image, found {len(images)} images "
            f"and {len(indices)} indices"
        )
    size = _check_size(size)
    params = [_params(img, seed, epoch, i, size) for img, i in zip(images, indices)]
    return apply_params_batch(images, params, size)


@dataclass(frozen=True)
class TrainTransform:
    """``augment_batch`` bound to a size and a seed: call with (images, indices, epoch)."""

    size: tuple[int, int]
    seed: int

    def __call__(self, images, indices, epoch: int) -> torch.Tensor:
        return augment_batch(images, self.seed, epoch, indices, self.size)


def train_transform(size: Sequence[int] = (256, 128), *, seed: int = 0) -> TrainTransform:
    """The training augmentation for ``size`` (H, W), its randomness drawn from (seed, epoch, index)."""
    return TrainTransform(_check_size(size), int(seed))


def test_transform(size: Sequence[int] = (256, 128)):
    """Resize (bilinear, antialiased) to ``size`` + float + ImageNet normalisation, for (3, H, W) or (B, 3, H, W)."""
    size = _check_size(size)

    def transform(image: torch.Tensor) -> torch.Tensor:
        _check_image(image, image.ndim if image.ndim in (3, 4) else 3)
        if tuple(image.shape[-2:]) != size:
            image = tvf.resize(image, list(size), interpolation=_BILINEAR, antialias=True)
        return normalise(image)

    return transform


test_transform.__test__ = False  # not a pytest test when imported into a test module
