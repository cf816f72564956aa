"""``wildreid export``: ONNX and TorchScript exports checked against PyTorch on real shard images.

The model is an untrained resnet18 at the demo config's 64x32 input, its BN-neck
statistics set to random values so that the bnneck feature (the config's
``model.eval_feature``) and pool5 differ clearly.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from wildreid.checkpoint import save_model
from wildreid.cli import app
from wildreid.config import load_config
from wildreid.core.errors import ExportError
from wildreid.exporting import (
    ATOL,
    CHECK_BATCHES,
    EXPORT_BATCH,
    EmbeddingExport,
    check_export,
    check_images,
    default_check_split,
    export_model,
    export_torchscript,
)
from wildreid.extract import extract_features
from wildreid.model import build_model
from wildreid.transforms import IMAGENET_MEAN, IMAGENET_STD

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SIZE = (64, 32)  # configs/demo.yaml's model.image_size
# torch 2.14 deprecates torch.jit (a FutureWarning on load); the tests load TorchScript files all the same
jit_load_warns = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


def _model():
    torch.manual_seed(0)
    model = build_model("resnet18")
    model.neck.running_mean.normal_(0.0, 0.2)
    model.neck.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export-model") / "model.pt"
    config = load_config(REPO / "configs" / "demo.yaml").to_dict()
    assert tuple(config["model"]["image_size"]) == SIZE and config["model"]["eval_feature"] == "bnneck"
    return save_model(path, _model(), config)


@pytest.fixture(scope="module")
def exported(model_file, shard_root, tmp_path_factory) -> dict:
    """``wildreid export --json`` in both formats: {format: (file, report)}."""
    folder = tmp_path_factory.mktemp("exported")
    done = {}
    for fmt in ("onnx", "torchscript"):
        path = folder / f"model.{fmt}"
        args = ["export", model_file, "--format", fmt, "--output", path, "--shards", shard_root, "--json"]
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        assert f"largest |{fmt} - PyTorch| = " in result.stdout and "tolerance 0.0001" in result.stdout
        done[fmt] = (path, json.loads(result.stdout.strip().splitlines()[-1]))
    return done


def _real_batches(shard_root, sizes):
    """Images of a query split (not the train split the command checked on), in batches of ``sizes``."""
    images, split = check_images(shard_root, "query-small", SIZE, sum(sizes))
    assert split == "query-small" and images.dtype == torch.uint8 and images.shape[1:] == (3, *SIZE)
    starts = np.cumsum((0, *sizes))
    return [images[a:b] for a, b in zip(starts[:-1], starts[1:])]


def _onnx_runner(path: Path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, lambda images: session.run(None, {"images": images.numpy()})[0]


def _torchscript_runner(path: Path):
    module = torch.jit.load(str(path))
    return module, lambda images: module(images).detach().numpy()


@pytest.mark.slow
@jit_load_warns
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_equals_pytorch_on_shard_images_at_any_batch_size(exported, shard_root, fmt):
    path, report = exported[fmt]
    assert report["written"] and report["check_split"] == "train" and report["feature"] == "bnneck"
    assert report["checked_batches"] == [EXPORT_BATCH, 1, 7] and report["tolerance"] == ATOL == 1e-4
    assert 0.0 <= report["max_abs_diff"] <= ATOL
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    model = _model()
    _, run = (_onnx_runner if fmt == "onnx" else _torchscript_runner)(path)
    for images in _real_batches(shard_root, (2, 5, 1)):  # none the export batch's size
        got = run(images)
        expected = extract_features(model, images, "cpu", "bnneck")
        assert got.shape == (len(images), 512) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= ATOL
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        # the config's feature: pool5 differs by far more than the tolerance
        assert np.abs(got - extract_features(model, images, "cpu", "pool5")).max() > 100 * ATOL


def test_onnx_graph_takes_uint8_images_with_a_free_batch_axis(exported):
    session, _ = _onnx_runner(exported["onnx"][0])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, *SIZE]
    assert out.name == "features" and isinstance(out.shape[0], str) and out.shape[1] == 512


@jit_load_warns
def test_torchscript_refuses_normalised_floats_and_other_sizes(exported):
    module, _ = _torchscript_runner(exported["torchscript"][0])
    pixels = torch.randint(0, 256, (2, 3, *SIZE), dtype=torch.uint8)
    normalised = (pixels.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(
        3, 1, 1
    )
    with pytest.raises(torch.jit.Error, match="expected uint8 RGB pixels"):
        module(normalised)
    with pytest.raises(torch.jit.Error, match=r"expected images \(N, 3, 64, 32\)"):
        module(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


@pytest.mark.slow
def test_check_refuses_an_export_of_the_wrong_feature(exported, shard_root):
    """The ONNX file holds the bnneck feature: checked as pool5 it is a real mismatch."""
    data = exported["onnx"][0].read_bytes()
    batches = _real_batches(shard_root, CHECK_BATCHES)
    assert check_export(data, "onnx", _model(), "bnneck", batches) <= ATOL
    with pytest.raises(ExportError, match=r"disagrees with PyTorch: largest absolute difference .*tolerance 0.0001"):
        check_export(data, "onnx", _model(), "pool5", batches)


class _NormalisedTwice(torch.nn.Module):
    """fast-reid #147's bug: the exported graph normalises input that its caller had normalised already."""

    def __init__(self, inner: EmbeddingExport):
        super().__init__()
        self.inner = inner

    def forward(self, images):
        x = images.to(torch.float32).mul(1.0 / 255).sub(self.inner.mean).div(self.inner.std)
        return self.inner.model(x.sub(self.inner.mean).div(self.inner.std), self.inner.feature)


def _onnx_fixed_batch(wrapper, example):
    """An ONNX export without the dynamic batch axis (fast-reid's onnx_export.py does this)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fixed.onnx"
        torch.onnx.export(wrapper, (example,), path, dynamo=True, external_data=False, verbose=False)
        return path.read_bytes()


@pytest.mark.slow
@jit_load_warns
@pytest.mark.parametrize(
    "fmt, broken, message",
    [
        ("torchscript", lambda w, x: export_torchscript(_NormalisedTwice(w), x), "disagrees with PyTorch"),
        ("onnx", _onnx_fixed_batch, "fails on a batch of 1 images"),
    ],
    ids=["normalised-twice", "fixed-batch"],
)
def test_export_refuses_to_write_a_broken_export(shard_root, tmp_path, fmt, broken, message):
    images, _ = check_images(shard_root, None, SIZE)
    output = tmp_path / "out" / f"model.{fmt}"
    with pytest.raises(ExportError, match=message) as caught:
        export_model(_model(), fmt, output, images, exporter=broken)
    assert f"refusing to write {output}" in str(caught.value)
    # nothing at all below tmp_path: no file, no partial file (the same images pass: see `exported`)
    assert not output.exists() and not any(p.is_file() for p in tmp_path.rglob("*"))


def _one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.output
    assert text in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output


def test_cli_errors_are_one_line(model_file, shard_root, tmp_path, monkeypatch):
    output = tmp_path / "model.onnx"
    base = ["export", "--output", output, "--shards", shard_root]
    cases = [
        ([tmp_path / "missing.pt", "--format", "torchscript"], 7, "does not exist"),
        ([model_file, "--format", "tensorrt"], 2, "expected --format onnx or torchscript, found 'tensorrt'"),
        ([model_file, "--format", "torchscript", "--split", "nope"], 5, "split 'nope' is not in"),
        ([model_file, "--format", "torchscript", "--feature", "fc"], 2, "expected --feature bnneck or pool5"),
        ([model_file, "--format", "torchscript", "--output", model_file], 2, "is the checkpoint itself"),
    ]
    for args, code, text in cases:
        _one_line_error(runner.invoke(app, [str(a) for a in [*base, *args]]), code, text)
    # onnxruntime missing: an import that fails, as in an environment without it
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = runner.invoke(app, [str(a) for a in [*base, model_file, "--format", "onnx"]])
    _one_line_error(result, 2, "needs onnxruntime, not installed here; pip install onnx onnxscript onnxruntime")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@jit_load_warns
def test_dry_run_checks_and_writes_nothing(model_file, shard_root, tmp_path):
    output = tmp_path / "model.ts"
    args = ["export", model_file, "--format", "torchscript", "--output", output, "--shards", shard_root]
    result = runner.invoke(app, [str(a) for a in [*args, "--split", "query-small", "--dry-run", "--json"]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["check_split"] == "query-small" and not report["written"] and report["max_abs_diff"] <= ATOL
    assert "would write" in result.stdout and not output.exists()


@pytest.mark.slow
@jit_load_warns
def test_the_shards_default_to_those_the_model_was_trained_on(uninterrupted, shard_root, model_file, tmp_path):
    output = tmp_path / "model.ts"
    args = ["export", uninterrupted["checkpoint"], "--format", "torchscript", "--output", output, "--dry-run"]
    result = runner.invoke(app, [str(a) for a in [*args, "--json"]])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["check_split"] == "train" and report["max_abs_diff"] <= ATOL
    # a model.pt that records no shards (saved by hand, or by an older wildreid) asks for --shards
    bare = ["export", model_file, "--format", "torchscript", "--output", output]
    refused = runner.invoke(app, [str(a) for a in bare])
    _one_line_error(refused, 2, "records none; pass --shards SHARDS")


@pytest.mark.parametrize(
    "splits, expected",
    [
        (["train", "query-small", "gallery-small"], "train"),
        (["gallery", "query", "train"], "train"),
        (["gallery-small", "query-small", "query-large"], "query-small"),
        (["gallery"], "gallery"),
    ],
)
def test_default_check_split(splits, expected):
    assert default_check_split(splits) == expected


def test_embedding_export_equals_the_eval_path_bit_for_bit():
    """The wrapper's normalisation is transforms.normalise's, step for step."""
    model = _model()
    images = torch.randint(0, 256, (3, 3, *SIZE), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = EmbeddingExport(model, "pool5").eval()(images).numpy()
    assert np.array_equal(got, extract_features(model, images, "cpu", "pool5"))
