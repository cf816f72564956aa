"""Deployment export: the embedding network, its input normalisation inside, as ONNX or TorchScript.

The exported model takes what a deployment has after decoding and resizing, uint8
RGB images (N, 3, H, W) at the model's input size (``model.image_size``), N free
(a dynamic batch axis), and returns the L2-normalised features (N, D) that
``wildreid eval`` extracts (``model.eval_feature``: bnneck or pool5). Normalising
inside the graph means no deployment normalises twice, or not at all (fast-reid
issue #147).

Nothing is written before the export has been checked. The serialised model is
loaded back from its bytes (onnxruntime, ``torch.jit.load``) and run on real images
from the shards, in three batches: one the size of the export example
(``EXPORT_BATCH``) and two of other sizes (1 and 7), so a batch axis baked in at
export fails here. Its output is compared with ``extract_features``, the function
``wildreid eval`` extracts with; the largest absolute difference must be within
``ATOL``. Only then is the file written, atomically (``stores.atomic_write``): a
model that disagrees leaves no file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import math
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wildreid.checkpoint import load_model, recorded_shards
from wildreid.core.errors import ConfigError, ExportError
from wildreid.extract import extract_features
from wildreid.model import FEATURES
from wildreid.shards.reader import ShardDataset
from wildreid.shards.writer import load_manifest
from wildreid.stores import atomic_write
from wildreid.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "ATOL",
    "CHECK_BATCHES",
    "EXPORT_BATCH",
    "FORMATS",
    "EmbeddingExport",
    "check_export",
    "check_images",
    "default_check_split",
    "export_checkpoint",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "require_onnx",
]

FORMATS = ("onnx", "torchscript")
EXPORT_BATCH = 4  # images in the example the exporter traces
CHECK_BATCHES = (EXPORT_BATCH, 1, 7)  # the export batch's size and two others: the batch axis must be free
# float32 on the CPU: the features are unit vectors, and exporters reorder a few float ops (measured
# differences are ~1e-7), while a wrong normalisation, feature or weight differs by 1e-2 or more
ATOL = 1e-4
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
INPUT, OUTPUT = "images", "features"  # the ONNX graph's input and output names


class EmbeddingExport(nn.Module):
    """uint8 RGB (N, 3, H, W) -> float in [0, 1] -> ImageNet normalisation -> ``model(x, feature)``, L2-normalised.

    The steps are ``wildreid.transforms.normalise``'s, in its order, so in eager mode the
    output equals ``extract_features`` on the CPU.
    """

    def __init__(self, model: nn.Module, feature: str = "bnneck"):
        super().__init__()
        if feature not in FEATURES:
            raise ConfigError(f"expected a feature in {list(FEATURES)}, found {feature!r}")
        self.model = model
        self.feature = feature
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(torch.float32).mul(1.0 / 255).sub(self.mean).div(self.std)
        return self.model(x, self.feature)


class _CheckedInput(nn.Module):
    """The TorchScript front of a traced export: a trace keeps no Python checks, and a float or
    wrongly sized input would otherwise run and give wrong features."""

    def __init__(self, traced: nn.Module, height: int, width: int):
        super().__init__()
        self.traced = traced
        self.height = height
        self.width = width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise RuntimeError(
                "expected uint8 RGB pixels (0-255), found another dtype; feed decoded images, "
                "not normalised floats: the model normalises them itself"
            )
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != self.height or images.shape[3] != self.width:
            raise RuntimeError(
                f"expected images (N, 3, {self.height}, {self.width}), found {images.shape}; "
                "resize to the model's input size first"
            )
        return self.traced(images)


def require_onnx() -> None:
    """ConfigError naming what to pip install when a package ``--format onnx`` needs is missing."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"--format onnx needs {', '.join(missing)}, not installed here; "
            f"pip install {' '.join(ONNX_PACKAGES)} (wildreid's 'export' extra)"
        )


@contextlib.contextmanager
def _jit_deprecation_silenced():
    # torch 2.14 announces torch.jit's deprecation (a FutureWarning on trace, script, save and load);
    # its files still load in libtorch (C++) and in Python without wildreid, what this format is for
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        yield


def export_torchscript(wrapper: EmbeddingExport, example: torch.Tensor) -> bytes:
    """A TorchScript file (bytes) of ``wrapper``: traced on ``example``, behind a scripted input check."""
    height, width = example.shape[-2:]
    buffer = io.BytesIO()
    with _jit_deprecation_silenced():
        traced = torch.jit.trace(wrapper.eval(), example, check_trace=False)  # check_export checks it
        torch.jit.save(torch.jit.script(_CheckedInput(traced, int(height), int(width))), buffer)
    return buffer.getvalue()


def export_onnx(wrapper: EmbeddingExport, example: torch.Tensor) -> bytes:
    """An ONNX file (bytes, weights inside) of ``wrapper`` with a dynamic batch axis.

    The exporter is torch.export-based (``dynamo=True``, torch's default since 2.9; it needs
    onnxscript): the TorchScript-based one (``dynamo=False``) also works with torch 2.14 but
    is deprecated there and warns that it will be removed.
    """
    require_onnx()
    with tempfile.TemporaryDirectory(prefix="wildreid-export-") as tmp:
        path = Path(tmp) / "model.onnx"  # the exporter writes files; BytesIO targets are deprecated
        torch.onnx.export(
            wrapper.eval(),
            (example,),
            path,
            dynamo=True,
            external_data=False,  # one self-contained file (ResNet-50 is ~95 MB, far below protobuf's 2 GB)
            verbose=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )
        return path.read_bytes()


EXPORTERS: dict[str, Callable[[EmbeddingExport, torch.Tensor], bytes]] = {
    "onnx": export_onnx,
    "torchscript": export_torchscript,
}


def _runner(data: bytes, fmt: str) -> Callable[[torch.Tensor], np.ndarray]:
    """The serialised model loaded back from its bytes, as a function of a uint8 batch."""
    if fmt == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its notes on graph rewrites are not ours to act on
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda images: session.run(None, {name: images.numpy()})[0]
    with _jit_deprecation_silenced():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return module(images).numpy()

    return run


def _reason(exc: BaseException) -> str:
    """The exception's type and the last line of its message (a TorchScript error ends with the raised one)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1][:200]}" if lines else type(exc).__name__


def check_export(
    data: bytes,
    fmt: str,
    model: nn.Module,
    feature: str,
    batches: Sequence[torch.Tensor],
    atol: float = ATOL,
) -> float:
    """The largest absolute difference between the exported model ``data`` and ``extract_features(model, ...)``
    over ``batches`` (uint8 (B, 3, H, W)); ExportError if it exceeds ``atol`` or the export does not run."""
    try:
        run = _runner(data, fmt)
    except Exception as exc:  # whatever the runtime finds wrong with the file: it is not deployable
        raise ExportError(f"the exported {fmt} model cannot be loaded back ({_reason(exc)})") from exc
    diffs = []
    for images in batches:
        expected = extract_features(model, images, "cpu", feature)
        try:
            got = np.asarray(run(images))
        except Exception as exc:  # e.g. a batch axis fixed at export
            raise ExportError(
                f"the exported {fmt} model fails on a batch of {len(images)} images ({_reason(exc)}); "
                "expected a dynamic batch axis"
            ) from exc
        if got.shape != expected.shape:
            raise ExportError(
                f"the exported {fmt} model returns {got.shape} for a batch of {len(images)} images, "
                f"PyTorch {expected.shape}"
            )
        diffs.append(float(np.abs(got.astype(np.float64) - expected).max()))
    worst = max(diffs)
    if not worst <= atol:  # NaN fails too
        sizes = ", ".join(f"{len(b)}: {d:.3g}" for b, d in zip(batches, diffs))
        raise ExportError(
            f"the exported {fmt} model disagrees with PyTorch: largest absolute difference {worst:.3g} "
            f"(by batch size {sizes}), tolerance {atol:g}"
        )
    return worst


def default_check_split(splits: Sequence[str]) -> str:
    """``train`` where the shards have it, else the first query split, else the first split."""
    names = list(splits)
    if not names:
        raise ConfigError("the shards hold no split to check the export on; pass other --shards")
    if "train" in names:
        return "train"
    return next((name for name in names if name.startswith("query")), names[0])


def check_images(
    shards: str | Path, split: str | None, image_size: tuple[int, int], count: int = sum(CHECK_BATCHES)
) -> tuple[torch.Tensor, str]:
    """``count`` uint8 images (count, 3, H, W) of ``split`` (default: ``default_check_split``), resized as
    ``wildreid eval`` resizes them, from its first samples (repeated when the split has fewer)."""
    if split is None:
        split = default_check_split(load_manifest(shards)["splits"])
    dataset = ShardDataset(shards, split, image_size=tuple(image_size), shuffle=False, chunk=count)
    if len(dataset) == 0:
        raise ConfigError(f"split {split} of {shards} holds no images to check the export on; pass another --split")
    dataset.set_epoch(0)
    got: list[torch.Tensor] = []
    with contextlib.closing(iter(dataset)) as batches:
        for images, *_ in batches:
            got.append(images)
            if sum(len(g) for g in got) >= count:
                break
    images = torch.cat(got)
    if len(images) < count:
        images = images.repeat(math.ceil(count / len(images)), 1, 1, 1)
    return images[:count].contiguous(), split


def export_model(
    model: nn.Module,
    fmt: str,
    output: str | Path,
    images: torch.Tensor,
    *,
    feature: str = "bnneck",
    atol: float = ATOL,
    dry_run: bool = False,
    exporter: Callable[[EmbeddingExport, torch.Tensor], bytes] | None = None,
) -> dict:
    """Export ``model`` (eval mode, CPU) as ``fmt``, check it on ``images`` (at least ``sum(CHECK_BATCHES)``,
    uint8 at the input size) and write ``output`` atomically, unless ``dry_run``; returns a report.

    ``exporter`` replaces the format's export function (``EXPORTERS[fmt]``), e.g. by a test's broken one.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"expected --format {' or '.join(FORMATS)}, found {fmt!r}")
    if not atol > 0:
        raise ConfigError(f"expected a tolerance > 0, found {atol}")
    output = Path(output)
    if output.is_dir():
        raise ConfigError(f"--output {output} is a folder; expected a file name, e.g. {output / f'model.{fmt}'}")
    if len(images) < sum(CHECK_BATCHES):
        raise ConfigError(f"expected at least {sum(CHECK_BATCHES)} images to check the export on, found {len(images)}")
    if fmt == "onnx":
        require_onnx()
    model = model.cpu().eval()
    wrapper = EmbeddingExport(model, feature).eval()
    export = exporter or EXPORTERS[fmt]
    try:
        data = export(wrapper, images[:EXPORT_BATCH])
    except Exception as exc:  # the exporter's own failure: nothing to write
        raise ExportError(f"the {fmt} exporter failed ({_reason(exc)}); nothing was written") from exc
    starts = np.cumsum((0, *CHECK_BATCHES))
    batches = [images[a:b] for a, b in zip(starts[:-1], starts[1:])]
    try:
        worst = check_export(data, fmt, model, feature, batches, atol)
    except ExportError as exc:
        raise ExportError(f"{exc}; refusing to write {output}") from exc.__cause__
    if not dry_run:
        atomic_write(output, data)
    return {
        "format": fmt,
        "output": str(output),
        "written": not dry_run,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "feature": feature,
        "input": f"uint8 RGB (N, 3, {images.shape[2]}, {images.shape[3]}), N dynamic",
        "output_dim": int(model.feature_dim),
        "checked_batches": list(CHECK_BATCHES),
        "max_abs_diff": worst,
        "tolerance": atol,
    }


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    output: str | Path,
    shards: str | Path | None = None,
    *,
    split: str | None = None,
    feature: str | None = None,
    atol: float | None = None,
    dry_run: bool = False,
) -> dict:
    """``export_model`` of a ``model.pt`` (or checkpoint folder) written by training, checked on ``shards``
    (default: the shards the model was trained on, as ``model.pt`` records them).

    The input size is the checkpoint config's ``model.image_size``, the feature its
    ``model.eval_feature`` unless ``feature`` is given, as in ``wildreid eval``; ``atol`` defaults to ``ATOL``.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"expected --format {' or '.join(FORMATS)}, found {fmt!r}")
    if fmt == "onnx":
        require_onnx()  # before the slow part
    source = Path(checkpoint) / "state.pt" if Path(checkpoint).is_dir() else Path(checkpoint)
    if source.exists() and Path(output).exists() and Path(output).samefile(source):
        raise ConfigError(f"--output {output} is the checkpoint itself; pass another file name, e.g. model.{fmt}")
    model, config = load_model(checkpoint, "cpu")
    feature = feature or config["model"].get("eval_feature", "bnneck")
    if feature not in FEATURES:
        raise ConfigError(f"expected --feature {' or '.join(FEATURES)}, found {feature!r}")
    image_size = tuple(int(s) for s in config["model"]["image_size"])
    if shards is None:
        shards = recorded_shards(checkpoint)
        if shards is None or not (shards / "manifest.json").is_file():
            found = "records none" if shards is None else f"records {shards}, which holds no shards now"
            raise ConfigError(
                f"{checkpoint} {found}; pass --shards SHARDS: the images the export is checked on against PyTorch"
            )
    images, split = check_images(shards, split, image_size)
    report = export_model(
        model, fmt, output, images, feature=feature, atol=ATOL if atol is None else atol, dry_run=dry_run
    )
    return {"checkpoint": str(checkpoint), "check_split": split, "check_images": len(images), **report}
