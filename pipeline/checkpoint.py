"""Crash-safe training checkpoints: everything a run needs to continue bit for bit.

A checkpoint is a folder ``<run>/checkpoints/ckpt-<step>`` holding

    state.pt       model, optimizer, RNG states, epoch, position, config, history (plain types and tensors)
    dictionary/    a copy of the store's ``features`` array (the Zarr chunks) at that step
    positives.npz  the positives the epoch trains on (CSR)
    COMPLETE       written last: JSON with the sha256 of every other file

It is written under a ``.partial`` name, every file fsynced, then published
(renamed, folder fsynced), and ``<run>/LATEST`` (written with
:func:`wildreid.stores.atomic_write`) names it. The previous checkpoint is
removed only after the new one is complete, so a crash or a full disk at any
moment leaves the last good checkpoint intact. On resume the newest checkpoint
whose files match their checksums is used; a damaged one is moved aside
(``damaged-ckpt-<step>``) and the one before it is taken, with a message.

Every file is read with ``torch.load(weights_only=True)``: a checkpoint holds
only tensors and plain Python values, so no code from a file runs on load.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from wildreid.core.durable import file_sha256, fsync_tree
from wildreid.core.errors import DamagedDataError, ResumeError, StoreError
from wildreid.model import build_model
from wildreid.stores import atomic_write, publish, remove_tree

__all__ = [
    "latest_checkpoint",
    "load_model",
    "load_positives",
    "load_state",
    "resume_checkpoint",
    "safe_torch_load",
    "begin_checkpoint",
    "checkpoint_paths",
    "finish_checkpoint",
    "load_rng",
    "save_checkpoint",
    "save_model",
    "save_part",
]

KEEP = 2  # complete checkpoints kept on disk
FORMAT = "wildreid-checkpoint"


def _save_torch(obj, f) -> None:
    """torch.save into an open Python file, so a failed write surfaces as its OSError (ENOSPC, EFBIG, ...).

    Given a path, torch reports a full disk as a RuntimeError from its zip writer
    ("unexpected pos ..."); through a file object that error carries the OSError.
    """
    try:
        torch.save(obj, f)
    except RuntimeError as exc:
        if isinstance(exc.__context__, OSError):
            raise exc.__context__ from None
        raise


def _disk_error(exc: OSError, what: str, keep: Path | None) -> StoreError:
    reason = "the disk is full" if exc.errno == errno.ENOSPC else f"it could not be written ({exc.strerror})"
    kept = f"the last good checkpoint {keep} is intact" if keep else "no earlier checkpoint exists"
    return StoreError(f"cannot write {what}: {reason}; {kept}. Free space (or fix permissions) and run with --resume")


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``LATEST`` names if it is complete, or None (checksums are not checked here)."""
    pointer = Path(run_dir) / "LATEST"
    if not pointer.exists():
        return None
    ckpt = Path(run_dir) / "checkpoints" / pointer.read_text().strip()
    return ckpt if (ckpt / "COMPLETE").exists() else None


def _damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None when they match their recorded checksums."""
    try:
        text = (ckpt / "COMPLETE").read_text()
        complete = "older" if text.strip() == "ok" else json.loads(text)  # "ok": before checksums
    except (OSError, ValueError):
        return "its COMPLETE record is missing or unreadable"
    if not isinstance(complete, dict) or complete.get("format") != FORMAT:
        raise ResumeError(
            f"checkpoint {ckpt} was written by an older wildreid (no checksums, not safely "
            "loadable); resume it with that version, or start a new run with a new --store path"
        )
    for name, expected in complete["sha256"].items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != expected:
            return f"{name} does not match its sha256"
    return None


def resume_checkpoint(
    run_dir: str | Path, log: Callable[[str], None] = lambda message: None
) -> tuple[Path, dict] | None:
    """The newest intact checkpoint and its loaded state, or None when the run has none.

    A damaged one (a file missing or not matching its sha256) is moved aside and the
    one before it is tried, saying so; ResumeError when checkpoints exist but none is
    intact, or when an intact one cannot be loaded (another format: nothing is moved).
    """
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    root = run_dir / "checkpoints"
    candidates = (
        sorted(
            (
                p
                for p in root.glob("ckpt-*")
                if p.is_dir() and (p / "COMPLETE").exists() and not p.name.endswith(".partial")
            ),
            reverse=True,
        )
        if root.is_dir()
        else []
    )
    if latest is not None:  # never a checkpoint newer than LATEST: it belongs to an abandoned attempt
        candidates = [latest] + [p for p in candidates if p.name < latest.name]
    damaged = []
    for ckpt in candidates:
        problem = _damage(ckpt)
        if problem is None:
            state = load_state(ckpt)  # its files are as written: a failure here is not damage
            if damaged:
                atomic_write(run_dir / "LATEST", ckpt.name)
                log(f"checkpoint {'; '.join(damaged)}; resuming from the previous one, {ckpt.name}")
            return ckpt, state
        aside = ckpt.with_name(f"damaged-{ckpt.name}")
        remove_tree(aside)
        ckpt.rename(aside)
        damaged.append(f"{ckpt.name} is damaged ({problem}) and was moved aside to {aside}")
    if damaged:
        raise ResumeError(
            f"no intact checkpoint to resume from: {'; '.join(damaged)}; start a new run with a new --store path"
        )
    return None


def save_checkpoint(run_dir: str | Path, step: int, state: dict, features_dir: Path, positives, tag: str = "") -> Path:
    """Write checkpoint ``step`` (state dict, dictionary chunks, positives) atomically; returns its folder.

    ``tag`` tells apart checkpoints written between two steps (a dictionary rebuild's):
    ``ckpt-<step><tag>`` sorts after ``ckpt-<step>`` and before ``ckpt-<step + 1>``.
    One process writing all three phases of ``begin_checkpoint``, ``save_part`` and ``finish_checkpoint``.
    """
    tmp = begin_checkpoint(run_dir, step, features_dir, tag)
    try:
        save_part(run_dir, tmp, features_dir, (0, None), 0)
    except StoreError:  # (a full disk) no half-copied dictionary is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return finish_checkpoint(run_dir, tmp, step, state, positives, features_dir, tag)


def checkpoint_paths(run_dir: Path, step: int, tag: str = "") -> tuple[Path, Path]:
    """(the folder a checkpoint is written in, the name it is published under)."""
    final = run_dir / "checkpoints" / f"ckpt-{step:010d}{tag}"
    return final.with_name(final.name + ".partial"), final


def begin_checkpoint(run_dir: str | Path, step: int, features_dir: Path, tag: str = "") -> Path:
    """Phase 1 (rank 0): an empty ``.partial`` folder for checkpoint ``step``, with the dictionary's metadata."""
    run_dir = Path(run_dir)
    tmp, final = checkpoint_paths(run_dir, step, tag)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        remove_tree(tmp)
        (tmp / "dictionary").mkdir(parents=True)
        shutil.copy2(features_dir / "zarr.json", tmp / "dictionary" / "zarr.json")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(exc, f"checkpoint {final}", latest_checkpoint(run_dir)) from None
    return tmp


def save_part(
    run_dir: str | Path,
    tmp: Path,
    features_dir: Path,
    chunks: tuple[int, int | None],
    rank: int,
    rng: dict | None = None,
) -> None:
    """Phase 2 (every rank): the dictionary chunks [first, last) this rank owns (``None``: to the end) copied into
    ``tmp``, fsynced, and ``part-<rank>.json`` listing their sha256 written last (with ``rng``: ``rng-<rank>.pt``)."""
    first, last = chunks
    digests = {}
    try:
        source = features_dir / "c"
        for folder in sorted(source.iterdir(), key=lambda p: int(p.name)) if source.is_dir() else []:
            if int(folder.name) < first or (last is not None and int(folder.name) >= last):
                continue
            target = tmp / "dictionary" / "c" / folder.name
            shutil.copytree(folder, target, dirs_exist_ok=True)
            fsync_tree(target)
            digests.update(_file_digests_under(tmp, target))
        if rng is not None:
            with open(tmp / f"rng-{rank}.pt", "wb") as f:
                _save_torch(rng, f)
            digests.update(_file_digests_under(tmp, tmp / f"rng-{rank}.pt"))
        atomic_write(tmp / f"part-{rank}.json", json.dumps(digests, sort_keys=True))
    except OSError as exc:
        raise _disk_error(exc, f"rank {rank}'s part of checkpoint {tmp}", latest_checkpoint(run_dir)) from None


def finish_checkpoint(
    run_dir: str | Path,
    tmp: Path,
    step: int,
    state: dict,
    positives,
    features_dir: Path,
    tag: str = "",
    parts: int = 1,
) -> Path:
    """Phase 3 (rank 0, once every rank's part is written): state and positives, COMPLETE with every file's
    sha256 (the parts' own lists merged), then the folder published and LATEST pointed at it.

    StoreError unless ``parts`` parts are there and together hold every chunk file of ``features_dir``."""
    run_dir = Path(run_dir)
    _, final = checkpoint_paths(run_dir, step, tag)
    root = final.parent
    previous = latest_checkpoint(run_dir)
    found = sorted(tmp.glob("part-*.json"))
    copied, chunks = _chunk_files(tmp / "dictionary"), _chunk_files(features_dir)
    if len(found) != parts or copied != chunks:
        raise StoreError(
            f"checkpoint {final} is incomplete: expected {parts} parts holding {len(chunks)} dictionary chunks, "
            f"found {len(found)} parts and {len(copied)} chunks; it was not published (the last good one, "
            f"{previous}, stays): resume with --resume"
        )
    try:
        with open(tmp / "state.pt", "wb") as f:
            _save_torch(state, f)
        indptr, indices = positives
        np.savez(tmp / "positives.npz", indptr=indptr, indices=indices)
        digests = {}
        for part in sorted(tmp.glob("part-*.json")):
            digests.update(json.loads(part.read_text()))
        for name in ("state.pt", "positives.npz", "dictionary/zarr.json"):
            digests[name] = file_sha256(tmp / name)
        complete = {"format": FORMAT, "step": step, "sha256": digests}
        (tmp / "COMPLETE").write_text(json.dumps(complete, indent=1, sort_keys=True) + "\n")
        remove_tree(final)
        publish(tmp, final)
        atomic_write(run_dir / "LATEST", final.name)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(exc, f"checkpoint {final}", previous) from None
    old = sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".partial"))
    for stale in old[:-KEEP]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _chunk_files(array_dir: Path) -> set[str]:
    folder = array_dir / "c"
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


def _file_digests_under(root: Path, path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): file_sha256(p) for p in files}


def load_rng(ckpt: Path, rank: int, state: dict) -> dict:
    """Rank ``rank``'s RNG states from a checkpoint: its own part's, or rank 0's (a resume with more ranks)."""
    path = ckpt / f"rng-{rank}.pt"
    return safe_torch_load(path, "training checkpoint") if rank and path.exists() else state["rng"]


def _what_it_is(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        return "an empty file"
    if zipfile.is_zipfile(path):
        return "a zip file that is not a torch checkpoint, or one holding objects other than tensors and plain values"
    if head[:1] == b"\x80":
        return "a Python pickle (an old-style torch.save or another program's object)"
    return f"{path.stat().st_size} bytes of something else (starting {head!r})"


def safe_torch_load(path: Path, what: str) -> object:
    """``torch.load(weights_only=True)`` of a user-supplied file: tensors and plain values only.

    Anything else (a pickle that would run code, a file that is not a checkpoint,
    a truncated or damaged one) is one ResumeError saying what was found.
    """
    try:
        with warnings.catch_warnings():  # torch's notes on legacy pickles: the error below says it better
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise ResumeError(f"{path} cannot be read ({exc.strerror}); expected a {what}") from None
    except Exception as exc:  # the unpickler meets arbitrary bytes: any failure means "not a checkpoint"
        found = _what_it_is(path)
        text = str(exc)
        if text.startswith("Weights only load failed"):  # keep the paragraph of torch's message that names the reason
            paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
            text = paragraphs[1] if len(paragraphs) > 2 else ""
            text = text.split("WeightsUnpickler error:", 1)[-1].strip()
        reason = text.splitlines()[0][:160] if text.strip() and not isinstance(exc, LookupError) else ""
        detail = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
        raise ResumeError(
            f"{path} is not a readable {what}: expected a file written by 'wildreid train' "
            f"(tensors and plain values), found {found} ({detail})"
        ) from None


def load_state(ckpt: Path) -> dict:
    state = safe_torch_load(ckpt / "state.pt", "training checkpoint")
    if not isinstance(state, dict) or not {"model", "optimizer", "rng", "epoch", "step"} <= set(state):
        raise ResumeError(
            f"{ckpt / 'state.pt'} is not a wildreid training checkpoint (expected model, optimizer, "
            "RNG states and position)"
        )
    return state


def load_positives(ckpt: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(ckpt / "positives.npz", allow_pickle=False) as f:
            return f["indptr"], f["indices"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DamagedDataError(
            f"{ckpt / 'positives.npz'} cannot be read ({exc}); resume from an earlier "
            "checkpoint by moving this one aside"
        ) from None


def save_model(path: str | Path, model: torch.nn.Module, config: dict, extra: dict | None = None) -> Path:
    """The trained model alone (what ``wildreid eval --checkpoint`` reads), written atomically."""
    path = Path(path)
    blob = {
        "format": "wildreid-model",
        "arch": model.arch,
        "state_dict": model.state_dict(),
        "config": config,
        **(extra or {}),
    }
    try:
        atomic_write(path, lambda f: _save_torch(blob, f))
    except OSError as exc:
        raise _disk_error(exc, f"model {path}", None) from None
    return path


def recorded_shards(path: str | Path) -> Path | None:
    """The shard folder a ``model.pt`` was trained on, as training recorded it (None for older models)."""
    path = Path(path)
    blob = safe_torch_load(path / "state.pt" if path.is_dir() else path, "wildreid model")
    shards = blob.get("shards") if isinstance(blob, dict) else None
    return Path(shards) if isinstance(shards, str) else None


def load_model(path: str | Path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """A model from ``model.pt`` or a checkpoint folder; returns (model in eval mode, config dict)."""
    path = Path(path)
    if path.is_dir():
        path = path / "state.pt"
    if not path.exists():
        raise ResumeError(f"checkpoint {path} does not exist; pass a model.pt written by 'wildreid train'")
    blob = safe_torch_load(path, "wildreid model")
    config = blob.get("config") if isinstance(blob, dict) else None
    weights = (blob.get("state_dict") or blob.get("model")) if isinstance(blob, dict) else None
    model_config = config.get("model") if isinstance(config, dict) else None
    if not isinstance(weights, dict) or not isinstance(model_config, dict) or "arch" not in model_config:
        keys = f" with keys {sorted(map(str, blob))[:6]}" if isinstance(blob, dict) else ""
        raise ResumeError(
            f"{path} is not a wildreid checkpoint: expected model weights and a config naming the "
            f"model, found a {type(blob).__name__}{keys}"
        )
    try:
        model = build_model(model_config["arch"], last_stride=model_config.get("last_stride", 1))
        model.load_state_dict(weights)
    except (KeyError, ValueError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ResumeError(
            f"{path} holds weights that do not fit its model ({model_config['arch']}): {reason}; "
            "pass a model.pt written by 'wildreid train'"
        ) from None
    return model.to(device).eval(), config
