"""Config lifecycle: defaults, YAML with one base, overrides, validation, digest and the round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from wildreid.config import Config, config_digest, load_config, save_config
from wildreid.core.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_published_schedule():
    c = load_config()
    assert c == Config()
    assert (c.model.arch, c.model.image_size, c.model.last_stride, c.model.pretrained) == (
        "resnet50",
        (256, 128),
        1,
        None,
    )
    assert (c.train.batch_size, c.train.lr, c.train.backbone_lr_factor, c.train.lr_steps) == (128, 0.1, 0.1, (40,))
    assert (c.loss.r, c.loss.delta, c.loss.negatives) == (0.01, 0.4, "exact")
    assert (c.mining.k, c.mining.threshold, c.mining.min_candidates, c.mining.adjacency) == (101, 0.6, 10, 100)
    assert [e for e in range(10) if c.train.is_warmup(e)] == [0, 1, 2, 3, 4, 5]
    assert c.train.lr_at(39) == 0.1 and c.train.lr_at(40) == pytest.approx(0.01)
    batch = load_config(None, ["train.mining=batch", "camera.aware=false"])
    assert c.train.mining == "epoch" and batch.train.mining == "batch"
    assert c.camera.pieces == dict.fromkeys(("normalise", "candidates", "own_negatives", "inter"), True)
    assert (c.camera.own_negatives, c.camera.inter_weight, c.camera.intra_penalty) == (0.5, 0.5, 0.25)


@pytest.mark.parametrize(
    ("name", "arch", "epochs", "size", "batch"),
    [
        ("veriwild", "resnet50", 50, (256, 128), 128),
        ("veri776", "resnet50", 60, (256, 128), 128),
        ("demo", "resnet18", 20, (64, 32), 32),
    ],
)
def test_shipped_configs(name, arch, epochs, size, batch):
    c = load_config(CONFIGS / f"{name}.yaml")
    assert (c.model.arch, c.train.epochs, c.model.image_size, c.train.batch_size) == (arch, epochs, size, batch)
    assert c.train.lr_steps[0] < c.train.epochs and c.train.warmup_epochs < c.train.epochs


def test_overrides_parse_yaml_values():
    c = load_config(
        CONFIGS / "demo.yaml",
        [
            "train.epochs=3",
            "loss.delta=0.5",
            "train.lr_steps=[1, 2]",
            "model.pretrained=/w/r18.pth",
            "train.nesterov=false",
            "loss.r=0",
        ],
    )
    assert (c.train.epochs, c.loss.delta, c.train.lr_steps, c.model.pretrained) == (3, 0.5, (1, 2), "/w/r18.pth")
    assert c.train.nesterov is False and c.loss.r == 0.0 and isinstance(c.loss.r, float)
    assert c.model.arch == "resnet18"  # the file's value survives


def test_config_is_frozen_and_digest_is_stable(tmp_path):
    c = load_config(CONFIGS / "veriwild.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.epochs = 3
    assert config_digest(c) == config_digest(load_config()) == config_digest(Config())
    assert config_digest(load_config(None, ["loss.delta=0.41"])) != config_digest(c)
    # where decoding runs does not change what is trained: a run resumes with it switched
    assert config_digest(load_config(None, ["train.decode_on_device=true"])) == config_digest(c)
    assert config_digest(load_config(None, ["train.transductive=true"])) != config_digest(c)
    saved = save_config(load_config(CONFIGS / "demo.yaml", ["train.seed=9"]), tmp_path / "config.yaml")
    again = load_config(saved)
    assert again == load_config(CONFIGS / "demo.yaml", ["train.seed=9"])
    assert config_digest(again) == config_digest(load_config(CONFIGS / "demo.yaml", ["train.seed=9"]))
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["train.epoch=3"], r"unknown key train.epoch .*valid keys of train: epochs, batch_size"),
        (["optim.lr=3"], r"unknown section 'optim'.*valid sections: model, train, loss, mining"),
        (["train.epochs"], r"expected section.key=value"),
        (["train.epochs=three"], r"train.epochs: expected an int, found 'three'"),
        (["train.epochs=2.5"], r"train.epochs: expected an int"),
        (["train.epochs=-1"], r"train.epochs: expected an int >= 0"),
        (["train.nesterov=1"], r"train.nesterov: expected true or false"),
        (["train.lr=true"], r"train.lr: expected a number"),
        (["train.lr=-1"], r"train.lr: expected a float > 0"),
        (["train.lr_steps=[40, 10]"], r"strictly ascending"),
        (["model.arch=vgg16"], r"model.arch: expected one of \['resnet18', 'resnet34', 'resnet50'\]"),
        (["model.image_size=[256]"], r"model.image_size: expected a list of 2 values"),
        (["loss.r=1.0"], r"loss.r: expected a float in \[0, 1\)"),
        (["loss.delta=-0.1"], r"loss.delta"),
        (["loss.negatives=knn"], r"loss.negatives: expected one of \['exact', 'graph'\], found 'knn'"),
        (["mining.k=50"], r"mining.k: expected an int >= adjacency \+ 1 = 101"),
        (["mining.threshold=1.5"], r"mining.threshold"),
        (["train.mining=step"], r"train.mining: expected 'epoch' or 'batch', found 'step'"),
        (["train.mining=1"], r"train.mining: expected a string"),
    ],
)
def test_bad_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_file_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"cannot parse .*bad.yaml:\d+"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochs: 3\n  lr_step: [4]\n")
    with pytest.raises(ConfigError, match=r"unknown key train.lr_step in .*unknown.yaml"):
        load_config(unknown)
    flat = tmp_path / "flat.yaml"
    flat.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="a mapping of sections"):
        load_config(flat)


def test_only_one_level_of_base(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  seed: 1\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\ntrain:\n  seed: 2\n")
    (tmp_path / "c.yaml").write_text("_base_: b.yaml\n")
    b = load_config(tmp_path / "b.yaml")
    assert (b.train.epochs, b.train.seed) == (7, 2)
    with pytest.raises(ConfigError, match="only one level of _base_"):
        load_config(tmp_path / "c.yaml")


def test_empty_file_gives_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()
