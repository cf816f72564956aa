"""Crash-safe training checkpoints: everything a run needs to continue bit for bit.

A checkpoint is a folder ``<run>/checkpoints/ckpt-<step>`` holding

    state.pt       model, optimizer, scheduler, RNG states, epoch, position, config, history
    dictionary/    a copy of the store's ``features`` array (the Zarr chunks) at that step
    positives.npz  the positives the epoch trains on (CSR)
    COMPLETE       written last

It is written under a ``.partial`` name, every file fsynced, then renamed, and
``<run>/LATEST`` (also replaced atomically) names it. The previous checkpoint
is removed only after the new one is complete, so a crash or a full disk at
any moment leaves the last good checkpoint intact.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from wildreid.errors import ResumeError, StoreError
from wildreid.model import build_model

__all__ = ["latest_checkpoint", "load_model", "load_state", "restore_dictionary", "save_checkpoint", "save_model"]

KEEP = 2  # complete checkpoints kept on disk


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_torch(obj, path: Path) -> None:
    """torch.save through a Python file, so a failed write surfaces as its OSError (ENOSPC, EFBIG, ...).

    Given a path, torch reports a full disk as a RuntimeError from its zip writer
    ("unexpected pos ..."); through a file object that error carries the OSError.
    """
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise
        f.flush()
        os.fsync(f.fileno())


def _disk_error(exc: OSError, what: str, keep: Path | None) -> StoreError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else f"it could not be written ({exc.strerror})"
    kept = f"the last good checkpoint {keep} is intact" if keep else "no earlier checkpoint exists"
    return StoreError(f"cannot write {what}: {reason}; {kept}. Free space (or fix permissions) and run with --resume")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / "LATEST"
    if not pointer.exists():
        return None
    ckpt = Path(run_dir) / "checkpoints" / pointer.read_text().strip()
    return ckpt if (ckpt / "COMPLETE").exists() else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, features_dir: Path, positives) -> Path:
    """Write checkpoint ``step`` (state dict, dictionary chunks, positives) atomically; returns its folder."""
    run_dir = Path(run_dir)
    root = run_dir / "checkpoints"
    final = root / f"ckpt-{step:010d}"
    tmp = root / f"ckpt-{step:010d}.partial"
    previous = latest_checkpoint(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _save_torch(state, tmp / "state.pt")
        shutil.copytree(features_dir, tmp / "dictionary")
        indptr, indices = positives
        np.savez(tmp / "positives.npz", indptr=indptr, indices=indices)
        (tmp / "COMPLETE").write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(run_dir / "LATEST", final.name.encode())
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(exc, f"checkpoint {final}", previous) from None
    old = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".partial"))
    for stale in old[:-KEEP]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ResumeError(f"checkpoint {ckpt} cannot be read ({exc}); delete it to fall back to the previous one")


def restore_dictionary(ckpt: Path, features_dir: Path) -> None:
    """Put the checkpoint's dictionary back as the store's ``features`` (swap by renames)."""
    incoming = features_dir.with_name(features_dir.name + ".restore")
    outgoing = features_dir.with_name(features_dir.name + ".old")
    shutil.rmtree(incoming, ignore_errors=True)
    shutil.copytree(ckpt / "dictionary", incoming)
    _fsync_tree(incoming)
    shutil.rmtree(outgoing, ignore_errors=True)
    if features_dir.exists():
        os.replace(features_dir, outgoing)
    os.replace(incoming, features_dir)
    shutil.rmtree(outgoing, ignore_errors=True)


def load_positives(ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ckpt / "positives.npz") as f:
        return f["indptr"], f["indices"]


def save_model(path: str | Path, model: torch.nn.Module, config: dict, extra: dict | None = None) -> Path:
    """The trained model alone (what ``wildreid eval --checkpoint`` reads), written atomically."""
    path = Path(path)
    blob = {"arch": model.arch, "state_dict": model.state_dict(), "config": config, **(extra or {})}
    tmp = path.with_name(path.name + ".partial")
    try:
        _save_torch(blob, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, f"model {path}", None) from None
    return path


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """A model from ``model.pt`` or a checkpoint folder; returns (model in eval mode, config dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    if not path.exists():
        raise ResumeError(f"checkpoint {path} does not exist; pass a model.pt written by 'wildreid train'")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise ResumeError(f"checkpoint {path} cannot be read ({exc})") from None
    if not isinstance(blob, dict) or "config" not in blob or ("state_dict" not in blob and "model" not in blob):
        raise ResumeError(f"{path} is not a wildreid checkpoint (expected model weights and a config)")
    config = blob["config"]
    model = build_model(config["model"]["arch"], last_stride=config["model"]["last_stride"])
    model.load_state_dict(blob.get("state_dict") or blob["model"])
    return model.to(device).eval(), config
