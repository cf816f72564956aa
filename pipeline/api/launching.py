"""The API's part of ``wildreid train`` that runs before the model code is needed: the config overrides its
shortcut options stand for, and starting its ranks (torch, not torchvision: the launching process trains
nothing)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from wildreid.api.common import Log
from wildreid.config import load_config
from wildreid.launch import launch, without_option
from wildreid.world import check_world_size

__all__ = ["launch_ranks", "train_overrides"]


def train_overrides(
    overrides: Sequence[str] = (),
    *,
    epochs: int | None = None,
    checkpoint_every: int | None = None,
    pretrained: str | None = None,
    transductive: bool = False,
    decode_on_device: bool = False,
) -> list[str]:
    """The config overrides that ``train``'s shortcut options stand for, after ``overrides``."""
    extra = list(overrides)
    if epochs is not None:
        extra.append(f"train.epochs={epochs}")
    if checkpoint_every is not None:
        extra.append(f"train.checkpoint_every_steps={checkpoint_every}")
    if pretrained is not None:
        extra.append(f"model.pretrained={json.dumps(pretrained)}")
    if transductive:
        extra.append("train.transductive=true")
    if decode_on_device:
        extra.append("train.decode_on_device=true")
    return extra


def launch_ranks(nproc_per_node: int, options: dict, argv: Sequence[str], log: Log) -> int:
    """Start ``nproc_per_node`` ranks, each running ``train``'s command line ``argv`` without its
    --nproc-per-node; ``options``: ``train``'s keyword arguments. Returns the exit code of the ranks."""
    shortcuts = ("epochs", "checkpoint_every", "pretrained", "transductive", "decode_on_device")
    overrides = train_overrides(options["overrides"], **{name: options[name] for name in shortcuts})
    check_world_size(load_config(options["config"], overrides).train.batch_size, nproc_per_node)  # one line, not N
    return launch(nproc_per_node, without_option(argv, "--nproc-per-node"), log)
