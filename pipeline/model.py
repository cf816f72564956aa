"""The Re-ID network: a torchvision ResNet with last stride 1, average pooling and a BN neck.

``forward`` returns the L2-normalised BN-neck feature (B, feature_dim) in train and
eval mode alike: SSML-FD feeds the normalised feature to the dictionary triplet
loss and stores it in the dictionary. ``forward(x, "pool5")`` returns the
L2-normalised pooled feature before the neck instead, what the published code
evaluates (``model.eval_feature``). ``pretrained`` names a local torchvision
ImageNet state dict (``fc.*`` keys are ignored), or is ``"imagenet"``: torchvision's
IMAGENET1K_V1 weights of the arch (what the published code started from), taken
from the torch hub cache (``$TORCH_HOME/hub/checkpoints``) or downloaded there by
torch.hub where the machine is online and ``WILDREID_OFFLINE`` is not set. Without
``pretrained`` training starts from random weights, and ``model.pretrained_from``
is None.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import socket
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from wildreid.core.errors import ConfigError

__all__ = [
    "ARCHS",
    "FEATURES",
    "IMAGENET",
    "ReidNet",
    "build_model",
    "imagenet_weights",
    "imagenet_weights_file",
    "load_backbone_weights",
    "param_groups",
    "weights_sha256",
]

# arch -> (constructor, feature dim)
ARCHS: dict[str, tuple[Callable[..., models.ResNet], int]] = {
    "resnet18": (models.resnet18, 512),
    "resnet34": (models.resnet34, 512),
    "resnet50": (models.resnet50, 2048),
}

FEATURES = ("bnneck", "pool5")
IMAGENET = "imagenet"  # model.pretrained value: torchvision's ImageNet weights of the arch
DOWNLOAD_TIMEOUT_S = 30  # a connection that hangs (a firewall dropping packets) fails instead of blocking the run


def _set_last_stride(resnet: models.ResNet, stride: int) -> None:
    """Stride of the last stage: conv2 of a bottleneck (torchvision puts it there), conv1 of a basic block."""
    block = resnet.layer4[0]
    conv = block.conv2 if isinstance(block, models.resnet.Bottleneck) else block.conv1
    conv.stride = (stride, stride)
    block.downsample[0].stride = (stride, stride)


class ReidNet(nn.Module):
    """ResNet trunk -> global average pooling -> BatchNorm1d neck (bias frozen) -> L2 normalisation."""

    def __init__(self, arch: str, backbone: models.ResNet, feature_dim: int):
        super().__init__()
        backbone.avgpool, backbone.fc = (
            nn.Identity(),
            nn.Identity(),
        )  # parameter-free: state dict keys stay torchvision's
        self.arch = arch
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.neck = nn.BatchNorm1d(feature_dim)
        self.neck.bias.requires_grad_(False)
        nn.init.ones_(self.neck.weight)
        nn.init.zeros_(self.neck.bias)
        self.pretrained_from: str | None = None

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last-stage map (B, feature_dim, H/16, W/16) with last stride 1."""
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        return b.layer4(b.layer3(b.layer2(b.layer1(x))))

    def forward(self, x: torch.Tensor, feature: str = "bnneck") -> torch.Tensor:
        if feature not in FEATURES:
            raise ConfigError(f"expected a feature in {list(FEATURES)}, found {feature!r}")
        pooled = self.feature_map(x).mean(dim=(2, 3))
        return F.normalize(pooled if feature == "pool5" else self.neck(pooled), dim=1)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a torchvision ImageNet state dict from ``path`` into ``backbone``, ignoring ``fc.*``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights {path} do not exist; expected a torchvision state dict file "
            "(e.g. resnet50-0676ba61.pth), or leave model.pretrained empty to start from random weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(
            f"cannot read pretrained weights {path} ({type(exc).__name__}: {exc}); "
            "expected a file written by torch.save(state_dict)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"pretrained weights {path} are not a state dict of tensors; save model.state_dict()")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(
            f"pretrained weights {path} do not match this backbone: missing {missing[:3]} "
            f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all); "
            "use the torchvision weights of the same arch"
        )
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise ConfigError(
            f"pretrained weights {path} have other shapes: {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
            f"expected {tuple(own[wrong[0]].shape)}; use the torchvision weights of the same arch"
        )
    backbone.load_state_dict(state)


def imagenet_weights_file(arch: str) -> tuple[str, Path]:
    """The URL of torchvision's IMAGENET1K_V1 weights for ``arch`` and where torch.hub caches them."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    url = models.get_model_weights(arch)["IMAGENET1K_V1"].url
    return url, Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's downloader takes no timeout; the process-wide default is set only around the download
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def imagenet_weights(arch: str, *, offline: bool | None = None) -> Path:
    """The cached ImageNet state dict of ``arch``, downloaded into the torch hub cache first if missing and
    ``offline`` is false (default: true when the environment sets ``WILDREID_OFFLINE``)."""
    url, path = imagenet_weights_file(arch)
    if path.is_file():
        return path
    if offline is None:
        offline = os.environ.get("WILDREID_OFFLINE", "") not in ("", "0")
    why = "WILDREID_OFFLINE is set"
    if not offline:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                # writes a temporary file and renames it; checks the sha256 prefix that the file name carries
                torch.hub.download_url_to_file(url, str(path), hash_prefix=_hash_prefix(path.name), progress=True)
            return path
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            why = f"the download failed ({type(exc).__name__}: {exc})"
    raise ConfigError(
        f"ImageNet weights for {arch} are not in the torch hub cache and {why}: put {path.name} "
        f"(from {url}) into {path.parent} (the folder follows TORCH_HOME), or pass --pretrained FILE"
    )


def _hash_prefix(name: str) -> str | None:
    match = re.search(r"-([a-f0-9]{6,})\.", name)
    return match.group(1) if match else None


def build_model(arch: str = "resnet50", *, pretrained: str | Path | None = None, last_stride: int = 1) -> ReidNet:
    """A ``ReidNet`` on ``arch``, from ``pretrained`` (a local file or ``"imagenet"``) or random weights
    (``pretrained_from`` None)."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if last_stride not in (1, 2):
        raise ConfigError(f"expected last_stride 1 or 2, found {last_stride}")
    make, dim = ARCHS[arch]
    backbone = make(weights=None)
    _set_last_stride(backbone, last_stride)
    model = ReidNet(arch, backbone, dim)
    if pretrained is not None and str(pretrained) != "":
        path = imagenet_weights(arch) if str(pretrained) == IMAGENET else Path(pretrained)
        load_backbone_weights(model.backbone, path)
        model.pretrained_from = f"{IMAGENET} ({path})" if str(pretrained) == IMAGENET else str(path)
    return model


def param_groups(model: ReidNet, lr: float, backbone_factor: float = 0.1) -> list[dict]:
    """SGD groups: the backbone at ``lr * backbone_factor``, the neck at ``lr`` (frozen parameters left out)."""
    if lr <= 0 or backbone_factor < 0:
        raise ConfigError(f"expected lr > 0 and backbone_factor >= 0, found {lr} and {backbone_factor}")
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    neck = [p for p in model.neck.parameters() if p.requires_grad]
    return [
        {"name": "backbone", "params": backbone, "lr": lr * backbone_factor},
        {"name": "neck", "params": neck, "lr": lr},
    ]


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over the state dict in sorted key order: each key, dtype, shape and contiguous CPU bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
