"""The data commands of the API: a synthetic set, packing shards and verifying them (no torch is loaded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from wildreid.api.common import Log, Progress, StopAsked, as_bytes, as_size, never, no_log, no_progress
from wildreid.core.errors import ConfigError, ShardError
from wildreid.shards import pack_dataset, read_dataset, verify_shards
from wildreid.shards.layouts import layout_description
from wildreid.shards.preview import identity_grid
from wildreid.shards.synth import write_synthetic

__all__ = ["shard", "synth"]


def synth(
    out: str | Path,
    *,
    train_vehicles: int = 120,
    test_vehicles: int = 40,
    images_per_vehicle: int = 8,
    cameras: int = 12,
    image_size: str | Sequence[int] = "96x96",
    seed: int = 0,
    workers: int = 1,
    preview: str | Path | None = None,
    progress: Progress = no_progress,
) -> dict:
    """A synthetic data set in the VeRi-Wild layout at ``out``; returns its summary (and ``preview``'s path)."""
    total = (train_vehicles + test_vehicles) * images_per_vehicle
    summary = write_synthetic(
        out,
        train_vehicles=train_vehicles,
        test_vehicles=test_vehicles,
        images_per_vehicle=images_per_vehicle,
        cameras=cameras,
        image_size=as_size(image_size),
        seed=seed,
        workers=workers,
        progress=lambda n: progress("drawing images", n, total),
    )
    if preview is not None:
        summary = {**summary, "preview": str(identity_grid(out, preview))}
    return summary


def shard(
    src: str | Path,
    out: str | Path | None = None,
    *,
    layout: str = "auto",
    camera_from: str | None = None,
    max_samples: int = 10_000,
    max_bytes: int | str = "1GiB",
    workers: int = 1,
    strict: bool = False,
    verify: bool = False,
    progress: Progress = no_progress,
    should_stop: StopAsked = never,
    log: Log = no_log,
) -> dict:
    """Pack ``src`` into WebDataset shards at ``out``; returns the manifest.

    ``verify``: re-check the shards at ``src`` against their manifest instead (each bad shard is logged,
    then ShardError); returns ``{"shards": src, "problems": []}``.
    """
    if verify:
        problems = verify_shards(src, progress=progress)
        for problem in problems:
            log(f"bad shard: {problem}")
        if problems:
            raise ShardError(f"{len(problems)} shard(s) in {src} do not match the manifest; re-run 'wildreid shard'")
        return {"shards": str(src), "problems": []}
    if out is None:
        raise ConfigError("expected the shard folder OUT (only --verify goes without one)")
    shard_bytes = as_bytes(max_bytes)  # a bad size fails before the data set is read
    index = read_dataset(src, layout, camera_from)
    how = "auto-detected" if layout == "auto" else "as asked"
    log(f"layout: {layout_description(index.layout)} ({how}), {index.count()} images listed")
    return pack_dataset(
        index,
        out,
        max_samples=max_samples,
        max_bytes=shard_bytes,
        workers=workers,
        strict=strict,
        progress=progress,
        should_stop=should_stop,
        log=log,
    )
