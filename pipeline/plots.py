"""Pictures of an evaluation, drawn with PIL only: ranked lists, the CMC curve, training curves.

Every picture is a small palette PNG (quantised to 128 colours) written atomically.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from wildreid.core.durable import atomic_write
from wildreid.core.errors import ConfigError, StoreError
from wildreid.evaluation import topk_lists
from wildreid.shards.reader import read_split_samples
from wildreid.stores.dictionary import FeatureStore

__all__ = ["cmc_curve", "nice_ticks", "ranked_grid", "render_ranked_lists", "search_grid", "training_curves"]

GREEN, RED, GREY, BLUE = (22, 160, 60), (215, 40, 40), (150, 150, 150), (40, 90, 210)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _save(image: Image.Image, path) -> Path:
    buf = io.BytesIO()
    image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return atomic_write(path, buf.getvalue())


# --------------------------------------------------------------------------- ranked lists


def _thumb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR)


def ranked_grid(
    query_images: Sequence[Image.Image],
    gallery_images_per_query: Sequence[Sequence[Image.Image]],
    flags: Sequence[Sequence[bool | None]],
    path,
    *,
    labels: Sequence[str] | None = None,
    tile: tuple[int, int] = (64, 64),
) -> Path:
    """One row per query: the query (blue) then its ranked gallery images.

    ``flags[i][j]``: True = the same vehicle (green border), False = another vehicle (red),
    None = same-camera junk that the metrics skip (greyed, marked "same cam", not numbered).
    """
    if not (len(query_images) == len(gallery_images_per_query) == len(flags)):
        raise ConfigError(
            f"expected as many queries, gallery lists and flag lists, found {len(query_images)}, "
            f"{len(gallery_images_per_query)} and {len(flags)}"
        )
    border, gap, head = 4, 6, 16
    th, tw = tile[0] + 2 * border, tile[1] + 2 * border
    cols = max([len(g) for g in gallery_images_per_query] + [1])
    font = _font(11)
    labels = list(labels) if labels else [f"query {i}" for i in range(len(query_images))]
    first = max([tw] + [int(font.getlength(label)) + 4 for label in labels])  # the query column fits its label
    width = gap + first + gap + cols * (tw + gap) + gap
    height = gap + len(query_images) * (th + head + gap)
    canvas = Image.new("RGB", (width, max(height, th + head + 2 * gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (q, gallery, fl) in enumerate(zip(query_images, gallery_images_per_query, flags)):
        if len(gallery) != len(fl):
            raise ConfigError(f"query {i}: {len(gallery)} gallery images but {len(fl)} flags")
        y = gap + i * (th + head + gap)
        draw.text((gap, y), labels[i], fill=BLUE, font=font)
        _framed(canvas, _thumb(q, tile), gap, y + head, BLUE, border)
        rank = 0
        for j, (image, flag) in enumerate(zip(gallery, fl)):
            x = gap + first + gap + j * (tw + gap) + gap
            thumb = _thumb(image, tile)
            if flag is None:
                thumb = Image.blend(thumb, Image.new("RGB", thumb.size, "white"), 0.6)
                draw.text((x, y), "same cam", fill=GREY, font=font)
            else:
                rank += 1
                draw.text((x, y), f"{rank}", fill=GREEN if flag else RED, font=font)
            _framed(canvas, thumb, x, y + head, GREY if flag is None else GREEN if flag else RED, border)
    return _save(canvas, path)


def search_grid(
    query_images: Sequence[Image.Image],
    gallery_images_per_query: Sequence[Sequence[Image.Image]],
    captions: Sequence[Sequence[str]],
    flags: Sequence[Sequence[bool | None]],
    path,
    *,
    labels: Sequence[str],
    tile: tuple[int, int] = (64, 64),
) -> Path:
    """``wildreid search``'s picture: one row per query (blue), then its ranked gallery images, each
    captioned (rank and similarity). ``flags[i][j]``: True = the same vehicle id (green), False = another
    (red), None = unknown ids (grey, the usual case for unlabelled images)."""
    if not (len(query_images) == len(gallery_images_per_query) == len(captions) == len(flags) == len(labels)):
        raise ConfigError(
            f"expected as many queries, gallery lists, captions, flags and labels, found {len(query_images)}, "
            f"{len(gallery_images_per_query)}, {len(captions)}, {len(flags)} and {len(labels)}"
        )
    border, gap, head = 4, 6, 16
    th, tw = tile[0] + 2 * border, tile[1] + 2 * border
    font = _font(11)
    labels = [label if len(label) <= 40 else "..." + label[-37:] for label in labels]  # the end names the file
    first = max([tw] + [int(font.getlength(label)) + 4 for label in labels])
    cols = max([len(g) for g in gallery_images_per_query] + [1])
    cell = max(tw, *(int(font.getlength(c)) + 4 for row in captions for c in row)) if any(captions) else tw
    width = gap + first + gap + cols * (cell + gap) + gap
    height = max(gap + len(query_images) * (th + head + gap), th + head + 2 * gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (q, gallery, caps, fl) in enumerate(zip(query_images, gallery_images_per_query, captions, flags)):
        if not len(gallery) == len(caps) == len(fl):
            raise ConfigError(f"query {i}: {len(gallery)} gallery images, {len(caps)} captions, {len(fl)} flags")
        y = gap + i * (th + head + gap)
        draw.text((gap, y), labels[i], fill=BLUE, font=font)
        _framed(canvas, _thumb(q, tile), gap, y + head, BLUE, border)
        for j, (image, caption, flag) in enumerate(zip(gallery, caps, fl)):
            x = gap + first + gap + j * (cell + gap) + gap
            colour = GREY if flag is None else GREEN if flag else RED
            draw.text((x, y), caption, fill=colour, font=font)
            _framed(canvas, _thumb(image, tile), x, y + head, colour, border)
    return _save(canvas, path)


def _framed(canvas: Image.Image, thumb: Image.Image, x: int, y: int, colour, border: int) -> None:
    ImageDraw.Draw(canvas).rectangle(
        [x, y, x + thumb.width + 2 * border - 1, y + thumb.height + 2 * border - 1], fill=colour
    )
    canvas.paste(thumb, (x + border, y + border))


def _split_images(root, split: str, wanted: set[int], ids: np.ndarray, cams: np.ndarray) -> dict[int, Image.Image]:
    """Decoded images of the ``wanted`` indices of a shard split, checked against the store's ids."""
    found: dict[int, Image.Image] = {}
    for sample in read_split_samples(root, split):
        index = int(sample["index"])
        if index not in wanted:
            continue
        if index >= len(ids) or (ids[index], cams[index]) != (sample["vid"], sample["camid"]):
            raise StoreError(
                f"split {split!r} sample {index} is vehicle {sample['vid']} camera {sample['camid']} but "
                f"the feature store row {index} says otherwise; pass the store extracted from this split"
            )
        found[index] = Image.open(io.BytesIO(sample["image"])).convert("RGB")
        if len(found) == len(wanted):
            break
    missing = wanted - set(found)
    if missing:
        raise StoreError(
            f"split {split!r} has no samples {sorted(missing)[:5]}; pass the shards the store was made from"
        )
    return found


def render_ranked_lists(
    shards_root,
    query_split: str,
    gallery_split: str,
    query_store,
    gallery_store,
    queries: list[int],
    path,
    *,
    k: int = 10,
    memory_budget: int | None = None,
    device: str = "cpu",
    rerank: bool = False,
) -> Path:
    """``topk_lists`` of the chosen queries, drawn by ``ranked_grid`` with images from the shards."""
    qs = query_store if isinstance(query_store, FeatureStore) else FeatureStore.open(query_store)
    gs = gallery_store if isinstance(gallery_store, FeatureStore) else FeatureStore.open(gallery_store)
    q_ids, q_cams, g_ids, g_cams = qs.ids(), qs.camids(), gs.ids(), gs.camids()
    lists = topk_lists(
        qs, gs, q_ids, q_cams, g_ids, g_cams, queries, k=k, memory_budget=memory_budget, device=device, rerank=rerank
    )
    q_images = _split_images(shards_root, query_split, set(queries), q_ids, q_cams)
    g_images = _split_images(shards_root, gallery_split, {j for entry in lists for j in entry["ranked"]}, g_ids, g_cams)
    return ranked_grid(
        [q_images[q] for q in queries],
        [[g_images[j] for j in entry["ranked"]] for entry in lists],
        [entry["flags"] for entry in lists],
        path,
        labels=[f"query {q} (id {q_ids[q]}, cam {q_cams[q]})" for q in queries],
    )


# --------------------------------------------------------------------------- line plots


def nice_ticks(lo: float, hi: float, target: int = 5) -> np.ndarray:
    """About ``target`` round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"expected a finite axis range, found {lo} .. {hi}")
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, target)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 5, 10) if s * mag >= raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return np.arange(first, last + 1) * step


class _Axes:
    """A rectangle of a PIL canvas with data coordinates, ticks, labels and lines."""

    def __init__(self, canvas: Image.Image, box, xs, ys, *, title="", xlabel="", ylabel=""):
        self.draw, self.font = ImageDraw.Draw(canvas), _font(12)
        self.x0, self.y0, self.x1, self.y1 = box
        self.xt, self.yt = nice_ticks(*xs), nice_ticks(*ys)
        self.xr, self.yr = (self.xt[0], self.xt[-1]), (self.yt[0], self.yt[-1])
        d = self.draw
        d.rectangle(box, outline="black")
        for v in self.xt:
            px = self.px(v, self.yr[0])[0]
            d.line([px, self.y1, px, self.y1 + 4], fill="black")
            d.line([px, self.y0, px, self.y1], fill=(230, 230, 230))
            d.text((px, self.y1 + 6), _fmt(v), fill="black", font=self.font, anchor="ma")
        for v in self.yt:
            py = self.px(self.xr[0], v)[1]
            d.line([self.x0 - 4, py, self.x0, py], fill="black")
            d.line([self.x0 + 1, py, self.x1 - 1, py], fill=(230, 230, 230))
            d.text((self.x0 - 6, py), _fmt(v), fill="black", font=self.font, anchor="rm")
        d.rectangle(box, outline="black")
        d.text(((self.x0 + self.x1) / 2, self.y1 + 22), xlabel, fill="black", font=self.font, anchor="ma")
        d.text(((self.x0 + self.x1) / 2, self.y0 - 6), title, fill="black", font=_font(14), anchor="md")
        if ylabel:
            label = Image.new("L", (int(self.font.getlength(ylabel)) + 4, 16), 255)
            ImageDraw.Draw(label).text((2, 0), ylabel, fill=0, font=self.font)
            label = label.rotate(90, expand=True)
            canvas.paste(
                Image.new("RGB", label.size, "black"),
                (self.x0 - 58, (self.y0 + self.y1 - label.height) // 2),
                Image.eval(label, lambda p: 255 - p),
            )
        self.legend: list[tuple[str, tuple]] = []
        self.points: list[tuple[float, float]] = []

    def px(self, x: float, y: float) -> tuple[float, float]:
        fx = (x - self.xr[0]) / (self.xr[1] - self.xr[0])
        fy = (y - self.yr[0]) / (self.yr[1] - self.yr[0])
        return self.x0 + fx * (self.x1 - self.x0), self.y1 - fy * (self.y1 - self.y0)

    def line(self, xs, ys, colour, label: str = "", markers: bool = True) -> None:
        pts = [self.px(x, y) for x, y in zip(xs, ys)]
        self.points += pts
        if len(pts) > 1:
            self.draw.line(pts, fill=colour, width=2)
        if markers:
            for px, py in pts:
                self.draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)
        if label:
            self.legend.append((label, colour))

    def draw_legend(self) -> None:
        """In the corner of the axes with the fewest data points under it."""
        if not self.legend:
            return
        w = 34 + max(self.font.getlength(label) for label, _ in self.legend)
        h = 16 * len(self.legend) + 8
        corners = [
            (self.x0 + 8, self.y0 + 6),
            (self.x1 - 8 - w, self.y0 + 6),
            (self.x1 - 8 - w, self.y1 - 6 - h),
            (self.x0 + 8, self.y1 - 6 - h),
        ]
        pts = np.array(self.points).reshape(-1, 2)

        def covered(c):
            return int(
                np.sum(
                    (pts[:, 0] >= c[0] - 4)
                    & (pts[:, 0] <= c[0] + w + 4)
                    & (pts[:, 1] >= c[1] - 4)
                    & (pts[:, 1] <= c[1] + h + 4)
                )
            )

        x, y = min(corners, key=covered)
        self.draw.rectangle([x, y, x + w, y + h], fill="white", outline=(200, 200, 200))
        for i, (label, colour) in enumerate(self.legend):
            ly = y + 4 + 16 * i
            self.draw.line([x + 6, ly + 7, x + 26, ly + 7], fill=colour, width=3)
            self.draw.text((x + 30, ly), label, fill="black", font=self.font)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:.3g}"


def cmc_curve(cmc, path, label: str = "CMC", *, size: tuple[int, int] = (480, 360)) -> Path:
    """The CMC curve: matching rate (0..1) against rank 1..len(cmc)."""
    cmc = np.asarray(cmc, dtype=np.float64)
    if cmc.ndim != 1 or len(cmc) == 0 or not np.isfinite(cmc).all():
        raise ConfigError(f"expected a 1-D CMC array of rates, found shape {cmc.shape}")
    canvas = Image.new("RGB", size, "white")
    ranks = np.arange(1, len(cmc) + 1)
    ax = _Axes(
        canvas,
        (70, 40, size[0] - 20, size[1] - 50),
        (1, max(2, len(cmc))),
        (0.0, 1.0),
        title="Cumulative matching characteristic",
        xlabel="rank",
        ylabel="matching rate",
    )
    ax.line(ranks, cmc, PALETTE[0], f"{label} (r1 {cmc[0]:.3f})", markers=len(cmc) <= 50)
    ax.draw_legend()
    return _save(canvas, path)


def training_curves(history: list[dict], path, *, size: tuple[int, int] = (760, 340)) -> Path:
    """Loss (left) and pseudo-label precision / recall (right) per epoch; missing keys are skipped.

    Without vehicle ids (no precision anywhere) the right panel shows the share of images with
    positives besides themselves instead (``wildreid.label_free``)."""
    canvas = Image.new("RGB", size, "white")
    half = size[0] // 2
    scored = any(h.get("precision") is not None for h in history)
    right = (("precision", "recall"), "pseudo labels") if scored else (("share_with_others",), "positives (no ids)")
    panels = (
        (("loss",), (20, 40, half - 20, size[1] - 50), "loss"),
        (right[0], (half + 50, 40, size[0] - 20, size[1] - 50), right[1]),
    )
    for keys, box, title in panels:
        series = {}
        for key in keys:
            pts = [
                (h.get("epoch", i), h[key])
                for i, h in enumerate(history)
                if h.get(key) is not None and math.isfinite(float(h[key]))
            ]
            if pts:
                series[key] = np.array(pts, dtype=np.float64)
        allx = np.concatenate([s[:, 0] for s in series.values()]) if series else np.array([0.0, 1.0])
        ally = np.concatenate([s[:, 1] for s in series.values()]) if series else np.array([0.0, 1.0])
        box = (box[0] + 50, box[1], box[2], box[3]) if keys == ("loss",) else box
        ax = _Axes(
            canvas,
            box,
            (float(allx.min()), float(allx.max())),
            (float(min(0.0, ally.min())), float(ally.max())),
            title=title,
            xlabel="epoch",
            ylabel=" / ".join(keys),
        )
        for n, (key, s) in enumerate(series.items()):
            ax.line(s[:, 0], s[:, 1], PALETTE[n], key)
        if not series:
            ax.draw.text(
                ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "no data", fill=GREY, font=ax.font, anchor="mm"
            )
        ax.draw_legend()
    return _save(canvas, path)
