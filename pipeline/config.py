"""Run configuration: defaults -> YAML file (one shallow ``_base_``) -> CLI overrides -> frozen dataclass.

A YAML file holds any of the sections ``model``, ``train``, ``loss``, ``mining``,
``dictionary``, ``camera`` with any of their keys; a file may name one base file (``_base_: veriwild.yaml``,
relative to itself) whose values it overrides, and the base may not name another.
Overrides are ``section.key=value`` strings whose value is parsed as YAML
(``train.lr_steps=[30,45]``, ``model.pretrained=null``). Every value is checked
for its type and range when the frozen ``Config`` is built; unknown sections or
keys name the valid ones. Components receive plain values from it, never the
whole config. ``save_config`` dumps it (atomically) to the run folder and
``config_digest`` fingerprints it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wildreid.core.durable import atomic_write
from wildreid.core.errors import ConfigError

__all__ = [
    "CameraConfig",
    "Config",
    "DictionaryConfig",
    "LossConfig",
    "MiningConfig",
    "ModelConfig",
    "TrainConfig",
    "config_digest",
    "load_config",
    "save_config",
]

ARCHS = ("resnet18", "resnet34", "resnet50")
NEGATIVES = ("exact", "graph")  # how DTL finds hard negatives (wildreid.dtl)
MINING_SCHEDULES = ("epoch", "batch")
REFRESHES = ("published", "eval")  # how the dictionary is rebuilt (wildreid.training)
MINING_ORDERS = ("similarity", "published")  # the DPLM candidate order (wildreid.dplm)
EVAL_FEATURES = ("bnneck", "pool5")  # what evaluation extracts (wildreid.model.ReidNet)
DICTIONARY_DTYPES = ("float16", "float32")


def _need(ok: bool, name: str, expected: str, found) -> None:
    if not ok:
        raise ConfigError(f"{name}: expected {expected}, found {found!r}; fix it in the config file or with {name}=...")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"
    last_stride: int = 1
    image_size: tuple[int, int] = (256, 128)  # H, W
    pretrained: str | None = None  # a local torchvision state dict or "imagenet"; None = random weights
    # the feature evaluation extracts: the L2-normalised BN-neck output (what the dictionary holds)
    # or the L2-normalised pooled feature before the neck (what the published code evaluates)
    eval_feature: str = "bnneck"

    def __post_init__(self):
        _need(self.arch in ARCHS, "model.arch", f"one of {list(ARCHS)}", self.arch)
        _need(self.last_stride in (1, 2), "model.last_stride", "1 or 2", self.last_stride)
        _need(
            len(self.image_size) == 2 and all(s >= 16 for s in self.image_size),
            "model.image_size",
            "[H, W] with both >= 16",
            list(self.image_size),
        )
        _need(self.pretrained != "", "model.pretrained", "a file path, 'imagenet' or null", self.pretrained)
        _need(
            self.eval_feature in EVAL_FEATURES,
            "model.eval_feature",
            " or ".join(map(repr, EVAL_FEATURES)),
            self.eval_feature,
        )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.1  # the neck's; the backbone trains at lr * backbone_lr_factor
    backbone_lr_factor: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_steps: tuple[int, ...] = (40,)  # epochs at which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    warmup_epochs: int = 6  # epochs 0..warmup_epochs-1 use only the sample itself as positive ("epochs 0-5")
    remine_every: int = 1  # epochs between DPLM runs after warm-up
    reextract_every: int = 5  # epochs between full re-extractions of the dictionary
    checkpoint_every_steps: int = 500  # 0 = only at the end of each epoch
    seed: int = 0
    workers: int = 2
    # also train on the test gallery (the published VeRi-776 run did): results are then not inductive
    transductive: bool = False
    # DataLoader workers only read; JPEGs are decoded in batches on the training device (nvJPEG on CUDA)
    decode_on_device: bool = False
    # "epoch": DPLM once per epoch from the k-NN graph (this project); "batch": every step's positives
    # mined against the live dictionary (the published implementation; small N only)
    mining: str = "epoch"
    # "published": the dictionary starts at zeros and is rebuilt every reextract_every epochs (not at
    # epoch 0) by a no-grad pass in train mode on augmented images, as the published code does;
    # "eval": extracted in eval mode without augmentation at epoch 0 and every reextract_every epochs
    refresh: str = "published"
    # SyncBatchNorm in runs of several processes: BatchNorm statistics of the global batch, as one process has
    sync_bn: bool = True

    def __post_init__(self):
        _need(self.epochs >= 0, "train.epochs", "an int >= 0 (0 writes the untrained model)", self.epochs)
        for name in ("batch_size", "remine_every", "reextract_every"):
            _need(getattr(self, name) >= 1, f"train.{name}", "an int >= 1", getattr(self, name))
        for name in ("warmup_epochs", "checkpoint_every_steps", "seed", "workers", "weight_decay"):
            _need(getattr(self, name) >= 0, f"train.{name}", "a value >= 0", getattr(self, name))
        _need(self.batch_size >= 2, "train.batch_size", "an int >= 2 (BatchNorm needs two samples)", self.batch_size)
        _need(self.lr > 0, "train.lr", "a float > 0", self.lr)
        _need(self.mining in MINING_SCHEDULES, "train.mining", " or ".join(map(repr, MINING_SCHEDULES)), self.mining)
        _need(self.refresh in REFRESHES, "train.refresh", " or ".join(map(repr, REFRESHES)), self.refresh)
        _need(
            0 <= self.backbone_lr_factor <= 1, "train.backbone_lr_factor", "a float in [0, 1]", self.backbone_lr_factor
        )
        _need(0 <= self.momentum < 1, "train.momentum", "a float in [0, 1)", self.momentum)
        _need(not self.nesterov or self.momentum > 0, "train.nesterov", "false when momentum is 0", self.nesterov)
        _need(0 < self.lr_gamma <= 1, "train.lr_gamma", "a float in (0, 1]", self.lr_gamma)
        steps = list(self.lr_steps)
        _need(
            all(s >= 1 for s in steps) and steps == sorted(set(steps)),
            "train.lr_steps",
            "strictly ascending epochs >= 1",
            steps,
        )

    def is_warmup(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains with P_b = {y_b} only."""
        return epoch < self.warmup_epochs

    def decay_at(self, epoch: int) -> float:
        """The learning rates' factor in ``epoch`` (0-based): ``lr_gamma`` for each of ``lr_steps`` passed."""
        return self.lr_gamma ** sum(epoch >= s for s in self.lr_steps)

    def lr_at(self, epoch: int) -> float:
        """The neck's learning rate in ``epoch`` (0-based): step decay at each of ``lr_steps``."""
        return self.lr * self.decay_at(epoch)


@dataclass(frozen=True)
class LossConfig:
    r: float = 0.01  # share of the negatives taken as hard negatives
    delta: float = 0.4  # weight of the negative term
    # "exact": stream the whole dictionary for the top-h negatives; "graph": pick them among the
    # row's k-NN graph neighbours (mining.k of them) only, for dictionaries beyond the device budget
    negatives: str = "exact"

    def __post_init__(self):
        _need(0 <= self.r < 1, "loss.r", "a float in [0, 1)", self.r)
        _need(self.delta >= 0, "loss.delta", "a float >= 0", self.delta)
        _need(self.negatives in NEGATIVES, "loss.negatives", f"one of {list(NEGATIVES)}", self.negatives)


@dataclass(frozen=True)
class MiningConfig:
    k: int = 101  # k-NN graph width, self included (>= adjacency + 1)
    threshold: float = 0.6
    min_candidates: int = 10
    adjacency: int = 100
    # "similarity": candidates and adjacency by true similarity; "published": rows below the
    # threshold follow id order, as the published code's clamp-then-sort leaves them
    order: str = "similarity"
    # a ceiling for studies, never a default: positives are the rows of the same vehicle id (read from the
    # shards) instead of DPLM's, through the same DTL; refused where any id is unknown
    oracle: bool = False

    def __post_init__(self):
        _need(-1 < self.threshold <= 1, "mining.threshold", "a float in (-1, 1]", self.threshold)
        _need(self.min_candidates >= 1, "mining.min_candidates", "an int >= 1", self.min_candidates)
        _need(self.adjacency >= 1, "mining.adjacency", "an int >= 1", self.adjacency)
        _need(self.k >= self.adjacency + 1, "mining.k", f"an int >= adjacency + 1 = {self.adjacency + 1}", self.k)
        _need(self.order in MINING_ORDERS, "mining.order", " or ".join(map(repr, MINING_ORDERS)), self.order)


@dataclass(frozen=True)
class DictionaryConfig:
    dtype: str = "float16"  # the stored feature dictionary's dtype (the published code holds float32)

    def __post_init__(self):
        _need(
            self.dtype in DICTIONARY_DTYPES, "dictionary.dtype", " or ".join(map(repr, DICTIONARY_DTYPES)), self.dtype
        )


@dataclass(frozen=True)
class CameraConfig:
    """Camera-aware SSML-FD (``wildreid.camera``); off (``aware: false``) trains exactly as without it.

    On by default with every piece: together they won the study of docs/camera.md."""

    aware: bool = True
    # DPLM on camera-normalised dictionary rows: each camera's mean removed, then L2-normalised again
    normalise: bool = True
    # share of each row's hard negatives taken among its own camera's rows (the same-camera confusers), on top
    # of the usual top r of all negatives; 0 leaves the negatives as they are
    own_negatives: float = 0.5
    # weight of the inter-camera term: mean (1 - z)^2 over the positives seen by other cameras than the anchor's
    inter_weight: float = 0.5
    # camera-aware candidate lists: DPLM ranks a row's own-camera neighbours by s - intra_penalty against the
    # other cameras' by s (the two lists merged by that rule); 0 ranks every row by s alone
    intra_penalty: float = 0.25

    def __post_init__(self):
        _need(0 <= self.own_negatives < 1, "camera.own_negatives", "a float in [0, 1)", self.own_negatives)
        _need(self.inter_weight >= 0, "camera.inter_weight", "a float >= 0", self.inter_weight)
        _need(0 <= self.intra_penalty < 2, "camera.intra_penalty", "a float in [0, 2)", self.intra_penalty)

    @property
    def pieces(self) -> dict[str, bool]:
        """Which camera-aware pieces a run uses (none unless ``aware``)."""
        on = self.aware
        return {
            "normalise": on and self.normalise,
            "candidates": on and self.intra_penalty > 0,
            "own_negatives": on and self.own_negatives > 0,
            "inter": on and self.inter_weight > 0,
        }


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    dictionary: DictionaryConfig = field(default_factory=DictionaryConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)

    def __post_init__(self):
        if self.train.refresh == "published" and self.loss.negatives == "graph" and self.train.epochs > 0:
            raise ConfigError(
                "loss.negatives=graph needs a k-NN graph of the dictionary from epoch 0, but "
                "train.refresh=published starts the dictionary at zeros; use train.refresh=eval "
                "with graph negatives"
            )
        if self.mining.oracle and self.train.mining == "batch":
            raise ConfigError(
                "mining.oracle replaces the epoch's DPLM positives, but train.mining=batch mines every step; "
                "use train.mining=epoch with mining.oracle=true"
            )
        if self.camera.aware and self.loss.negatives == "graph":
            raise ConfigError(
                "camera.aware=true runs with loss.negatives=exact only for now (graph negatives read the "
                "camera-agnostic k-NN graph); use loss.negatives=exact or camera.aware=false"
            )
        if self.camera.aware and self.train.mining == "batch":
            raise ConfigError(
                "camera.aware=true mines once per epoch (train.mining=epoch); use train.mining=epoch or "
                "camera.aware=false"
            )

    def to_dict(self) -> dict:
        """Plain nested dict (tuples as lists): what ``save_config`` writes and ``load_config`` reads back."""
        return {
            s.name: {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, s.name)).items()
            }
            for s in dataclasses.fields(self)
        }


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "loss": LossConfig,
    "mining": MiningConfig,
    "dictionary": DictionaryConfig,
    "camera": CameraConfig,
}


# --------------------------------------------------------------------------- values


def _coerce(name: str, value, annotation):
    """``value`` as the annotated type, or ConfigError; an int is accepted as a float, a bool never as a number."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner)
    if origin is tuple:
        _need(isinstance(value, (list, tuple)), name, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        _need(len(value) == len(args), name, f"a list of {len(args)} values", value)
        return tuple(_coerce(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        _need(isinstance(value, bool), name, "true or false", value)
    elif annotation is int:
        _need(isinstance(value, int) and not isinstance(value, bool), name, "an int", value)
    elif annotation is float:
        _need(isinstance(value, (int, float)) and not isinstance(value, bool), name, "a number", value)
        return float(value)
    elif annotation is str:
        _need(isinstance(value, (str, os.PathLike)), name, "a string", value)
        return str(value)
    return value


def _section(name: str, cls: type, values) -> object:
    _need(isinstance(values, dict), name, "a mapping of keys", values)
    hints = typing.get_type_hints(cls)  # keys were checked by _merge
    return cls(**{k: _coerce(f"{name}.{k}", v, hints[k]) for k, v in values.items()})


def _merge(into: dict, values, where: str) -> None:
    _need(isinstance(values, dict), where, "a mapping of sections", values)
    for section, keys in values.items():
        if section not in SECTIONS:
            raise ConfigError(f"unknown section {section!r} in {where}; valid sections: {', '.join(SECTIONS)}")
        _need(isinstance(keys, dict), f"{section} in {where}", "a mapping of keys", keys)
        valid = [f.name for f in dataclasses.fields(SECTIONS[section])]
        unknown = sorted(set(keys) - set(valid))
        if unknown:
            raise ConfigError(
                f"unknown key {section}.{unknown[0]} in {where}; valid keys of {section}: {', '.join(valid)}"
            )
        into.setdefault(section, {}).update(keys)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist; pass an existing YAML file, e.g. configs/veriwild.yaml"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"cannot parse {where}: {problem}; expected YAML sections of key: value") from None
    if data is None:
        return {}
    _need(isinstance(data, dict), str(path), "a mapping of sections at the top level", type(data).__name__)
    return data


def _file_values(path: Path) -> dict:
    data = _read_yaml(path)
    merged: dict = {}
    base = data.pop("_base_", None)
    if base is not None:
        base_path = path.parent / str(base)
        base_data = _read_yaml(base_path)
        if "_base_" in base_data:
            raise ConfigError(
                f"{base_path} (the base of {path}) names a base of its own; only one level of _base_ is allowed"
            )
        _merge(merged, base_data, str(base_path))
    _merge(merged, data, str(path))
    return merged


def _override_values(overrides: list[str]) -> dict:
    merged: dict = {}
    for item in overrides:
        key, eq, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not eq or not dot or not name:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.epochs=3")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _merge(merged, {section: {name: value}}, f"override {item!r}")
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``: a frozen, checked ``Config``."""
    values = Config().to_dict()
    for layer in (_file_values(Path(path)) if path is not None else {}, _override_values(list(overrides))):
        for section, keys in layer.items():
            values[section].update(keys)
    return Config(**{name: _section(name, cls, values[name]) for name, cls in SECTIONS.items()})


# where work runs, not what it computes: a run may be resumed with these changed
_OPERATIONAL = {"train": ("decode_on_device",)}
# keys added after stores were written: left out of the digest while at these values (what every run before
# them did), so a run started before they existed still resumes
_ADDED = {
    "mining": {"oracle": False},
    "camera": {"aware": False, "normalise": True, "own_negatives": 0.0, "inter_weight": 0.0, "intra_penalty": 0.0},
}


def config_digest(config: Config) -> str:
    """SHA-256 of the canonical JSON of ``config.to_dict()`` without its operational keys
    (``_OPERATIONAL``) and the later keys at their old behaviour (``_ADDED``): configs that train the
    same model, equal digests."""
    values = config.to_dict()
    for section, keys in _OPERATIONAL.items():
        values[section] = {k: v for k, v in values[section].items() if k not in keys}
    for section, defaults in _ADDED.items():
        values[section] = {k: v for k, v in values[section].items() if defaults.get(k, object()) != v}
        if not values[section]:
            del values[section]
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def save_config(config: Config, path: str | Path) -> Path:
    """Write ``config`` as YAML to ``path`` atomically and durably."""
    return atomic_write(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
