"""A picture of a data set: one row per vehicle, its images across cameras."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from wildreid.core.durable import atomic_write
from wildreid.shards.layouts import read_dataset

__all__ = ["identity_grid"]


def identity_grid(
    root: str | Path,
    out_png: str | Path,
    *,
    vehicles: int = 8,
    per_vehicle: int = 6,
    tile: tuple[int, int] = (96, 96),
    split: str = "train",
) -> Path:
    """Write a PNG grid of the first ``vehicles`` identities of ``split``, ``per_vehicle`` images each."""
    index = read_dataset(root)
    by_vehicle: dict[int, list] = {}
    for record in index.records[split]:
        by_vehicle.setdefault(record.vid, []).append(record)
    rows = list(by_vehicle.values())[:vehicles]
    label_w = 44
    grid = Image.new("RGB", (label_w + tile[1] * per_vehicle, tile[0] * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for r, records in enumerate(rows):
        draw.text((4, r * tile[0] + tile[0] // 2 - 6), f"id {records[0].vid}", fill="black")
        for c, record in enumerate(records[:per_vehicle]):
            with Image.open(Path(index.root) / record.path) as image:
                thumb = image.convert("RGB").resize((tile[1], tile[0]))
            grid.paste(thumb, (label_w + c * tile[1], r * tile[0]))
            draw.text((label_w + c * tile[1] + 3, r * tile[0] + 2), f"c{record.camid}", fill="yellow")
    small = grid.quantize(colors=128, method=Image.Quantize.MEDIANCUT)  # a small file
    return atomic_write(out_png, lambda f: small.save(f, format="PNG", optimize=True))
