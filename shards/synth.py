"""A procedural vehicle re-identification dataset in the official VeRi-Wild layout.

Vehicles share a handful of body models and a small, skewed colour palette, so
most identities have look-alikes; only small marks (windshield stickers, plate
pattern, roof rack or box, side stripe, a scratch, mirror colour, rim style)
tell them apart. Each camera has its own preferred viewpoint, scale, road,
lighting, blur and JPEG quality, so the same vehicle changes a lot between
cameras. Every random draw is seeded from ``(seed, namespace, ids...)``, which
makes the bytes independent of worker count and processing order.

Layout written (as the real dataset)::

    OUT/images/<vid:05d>/<imgid:06d>.jpg
    OUT/train_test_split/train_list.txt
    OUT/train_test_split/test_{3000,5000,10000}[_query].txt
    OUT/train_test_split/vehicle_info.txt
"""

from __future__ import annotations

import datetime as _dt
import math
import multiprocessing
import numbers
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from wildreid.core.durable import publish
from wildreid.core.errors import ConfigError

__all__ = ["write_synthetic"]

TYPES = ("sedan", "suv", "hatchback", "van", "pickup")
# (name, rgb, share): skewed like real traffic so many vehicles share a colour.
COLORS = (
    ("white", (232, 232, 228), 0.28),
    ("black", (30, 31, 34), 0.20),
    ("gray", (112, 115, 120), 0.14),
    ("silver", (176, 180, 186), 0.12),
    ("red", (168, 32, 36), 0.09),
    ("blue", (38, 70, 148), 0.08),
    ("brown", (118, 84, 54), 0.05),
    ("yellow", (220, 178, 42), 0.04),
)
VIEWS = ("front", "rear", "left", "right")
# (file tag, share of test vehicles): nested like the real 3000 < 5000 < 10000.
TEST_SIZES = (("3000", "small", 0.3), ("5000", "medium", 0.5), ("10000", "large", 1.0))
INFO_HEADER = "id/image;Camera ID;Time;Model;Type;Color"

MARK_COLORS = ((245, 245, 240), (40, 110, 220), (40, 170, 80), (235, 200, 40), (210, 40, 40), (250, 140, 30))
PLATE_COLORS = ((30, 70, 190), (235, 190, 30), (90, 190, 110))
TIRE, GLASS_FRONT, GLASS_REAR = (24, 24, 26), (70, 86, 102), (38, 44, 52)
T0 = _dt.datetime(2017, 11, 14)

# Seed namespaces keep the streams for models, vehicles, cameras and images apart.
_MODEL, _VEHICLE, _CAMERA, _IMAGE, _BACKGROUND = 1, 2, 3, 4, 5

# (low, high) per body type for: side length / crop width, lower-body height,
# cabin height, cabin rear x, cabin front x, glass slant, wheel radius (all in
# car lengths), then front width / crop width, front body and cabin height,
# cabin bottom and top width (in car widths).
_SHAPES = {
    "sedan": (
        (0.86, 0.92),
        (0.20, 0.23),
        (0.15, 0.17),
        (0.22, 0.27),
        (0.70, 0.75),
        (0.10, 0.13),
        (0.090, 0.100),
        (0.74, 0.80),
        (0.30, 0.34),
        (0.24, 0.28),
        (0.86, 0.90),
        (0.62, 0.70),
    ),
    "suv": (
        (0.84, 0.90),
        (0.25, 0.28),
        (0.18, 0.20),
        (0.05, 0.08),
        (0.75, 0.80),
        (0.06, 0.08),
        (0.105, 0.115),
        (0.80, 0.86),
        (0.38, 0.44),
        (0.30, 0.34),
        (0.88, 0.92),
        (0.74, 0.80),
    ),
    "hatchback": (
        (0.76, 0.82),
        (0.22, 0.25),
        (0.17, 0.19),
        (0.05, 0.08),
        (0.72, 0.77),
        (0.08, 0.10),
        (0.095, 0.105),
        (0.70, 0.76),
        (0.32, 0.36),
        (0.26, 0.30),
        (0.86, 0.90),
        (0.66, 0.72),
    ),
    "van": (
        (0.88, 0.94),
        (0.26, 0.30),
        (0.24, 0.27),
        (0.02, 0.03),
        (0.86, 0.90),
        (0.08, 0.10),
        (0.090, 0.100),
        (0.78, 0.84),
        (0.36, 0.42),
        (0.42, 0.50),
        (0.92, 0.95),
        (0.86, 0.90),
    ),
    "pickup": (
        (0.90, 0.95),
        (0.23, 0.26),
        (0.17, 0.19),
        (0.38, 0.42),
        (0.78, 0.82),
        (0.06, 0.08),
        (0.105, 0.115),
        (0.80, 0.86),
        (0.36, 0.42),
        (0.28, 0.32),
        (0.86, 0.90),
        (0.72, 0.78),
    ),
}


@dataclass(frozen=True)
class _Model:
    name: str
    kind: str
    shape: tuple[float, ...]  # one value per _SHAPES entry
    lamp: int  # headlight style: block, slim or round
    grille: float


@dataclass(frozen=True)
class _Camera:
    index: int
    views: tuple[float, ...]  # probabilities over VIEWS
    scale: float
    lut: tuple[int, ...]  # 768-entry RGB lookup: gain, contrast and colour cast
    blur: float
    motion: bool
    quality: int
    occlusion: float


@dataclass(frozen=True)
class _Vehicle:
    vid: int
    model: int
    color: int
    stickers: tuple[tuple[float, float, int], ...]  # (u, v, colour) on the windshield
    rear_mark: tuple[float, float, int] | None  # (u, v, colour) on the rear window
    roof: int  # 0 bare, 1 rack, 2 box
    roof_color: tuple[int, int, int]
    plate: tuple[int, ...]
    plate_color: int
    stripe: tuple[float, int] | None  # (height on the body, colour)
    dent: tuple[str, float, float] | None  # (visible side, x, y)
    mirror: tuple[int, int, int]
    rim: int
    cams: tuple[int, ...]  # 0-based camera of each image
    times: tuple[str, ...]
    query: int  # which image is the query when the vehicle is in the test set


@dataclass(frozen=True)
class _Plan:
    root: str
    seed: int
    size: tuple[int, int]
    images_per_vehicle: int
    models: tuple[_Model, ...]
    cameras: tuple[_Camera, ...]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(list(key))


def _make_model(seed: int, m: int) -> _Model:
    rng = _rng(seed, _MODEL, m)
    kind = TYPES[m % len(TYPES)]
    shape = tuple(float(rng.uniform(lo, hi)) for lo, hi in _SHAPES[kind])
    return _Model(f"model-{m + 1:02d}", kind, shape, int(rng.integers(3)), float(rng.uniform(0.3, 0.5)))


def _make_camera(seed: int, c: int) -> _Camera:
    rng = _rng(seed, _CAMERA, c)
    main = c % 3  # cycle dominant views so every set has front, rear and side cameras
    views = [(0.70, 0.10, 0.10, 0.10), (0.10, 0.70, 0.10, 0.10), (0.15, 0.15, 0.35, 0.35)][main]
    gain, contrast = rng.uniform(0.65, 1.25), rng.uniform(0.75, 1.15)
    cast = 1.0 + rng.uniform(-0.12, 0.12, 3)
    x = np.arange(256) / 255.0
    lut = np.concatenate([np.clip(((x - 0.5) * contrast + 0.5) * gain * k, 0, 1) for k in cast])
    return _Camera(
        index=c,
        views=views,
        scale=float(rng.uniform(0.6, 1.4)),
        lut=tuple(int(v) for v in np.rint(lut * 255)),
        blur=float(rng.choice([0.0, 0.5, 0.9, 1.3])),
        motion=bool(rng.random() < 0.2),
        quality=int(rng.integers(60, 93)),
        occlusion=float(rng.uniform(0.08, 0.3)),
    )


def _make_vehicle(seed: int, vid: int, n_models: int, n_images: int, n_cams: int) -> _Vehicle:
    rng = _rng(seed, _VEHICLE, vid)
    popularity = 1.0 / np.arange(1, n_models + 1) ** 0.7  # a few best-selling models
    model = int(rng.choice(n_models, p=popularity / popularity.sum()))
    color = int(rng.choice(len(COLORS), p=[c[2] for c in COLORS]))

    def mark() -> tuple[float, float, int]:
        return (float(rng.uniform(0.05, 0.9)), float(rng.uniform(0.4, 0.9)), int(rng.integers(len(MARK_COLORS))))

    stickers = tuple(mark() for _ in range(int(rng.integers(0, 4))))
    rear_mark = mark() if rng.random() < 0.5 else None
    roof = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
    roof_color = ((20, 20, 22), (200, 200, 205), (90, 60, 40))[int(rng.integers(3))]
    plate = tuple(int(b) for b in rng.integers(0, 2, 6))
    plate_color = int(rng.choice(3, p=[0.75, 0.15, 0.1]))
    stripe = (float(rng.uniform(0.35, 0.75)), int(rng.integers(len(MARK_COLORS)))) if rng.random() < 0.3 else None
    dent = (
        (("left", "right")[int(rng.integers(2))], float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.3, 0.8)))
        if rng.random() < 0.5
        else None
    )
    mirror = (COLORS[color][1], (20, 20, 22), (205, 208, 212))[int(rng.choice(3, p=[0.6, 0.25, 0.15]))]
    rim = int(rng.integers(4))
    # A vehicle passes a few cameras; the first two images are forced onto two
    # different ones so any query has a cross-camera match, then order is shuffled.
    route = rng.choice(n_cams, size=min(n_cams, int(rng.integers(2, 6))), replace=False)
    cams = np.concatenate([route[:2], rng.choice(route, size=n_images - 2)])
    cams = rng.permutation(cams)
    start = int(rng.integers(0, 30 * 86400 - 4 * 3600))
    offsets = np.sort(rng.integers(0, 3 * 3600, n_images))
    times = tuple((T0 + _dt.timedelta(seconds=start + int(o))).strftime("%Y-%m-%d %H:%M:%S") for o in offsets)
    return _Vehicle(
        vid,
        model,
        color,
        stickers,
        rear_mark,
        roof,
        roof_color,
        plate,
        plate_color,
        stripe,
        dent,
        mirror,
        rim,
        tuple(int(c) for c in cams),
        times,
        int(rng.integers(n_images)),
    )


def _shade(rgb: tuple[int, ...], f: float) -> tuple[int, int, int]:
    return tuple(min(255, int(c * f)) for c in rgb)  # type: ignore[return-value]


def _rect(d: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], fill) -> None:
    d.rectangle((min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1])), fill=fill)


def _background(seed: int, cam: _Camera, w: int, h: int, tiles: dict) -> Image.Image:
    # One road tile per camera, kept in the caller's ``tiles`` for its job; images crop it at a random offset.
    key = (seed, cam.index, w, h)
    if key in tiles:
        return tiles[key]
    rng = _rng(seed, _BACKGROUND, cam.index)
    road = rng.uniform(60, 140) + rng.uniform(-8, 8, 3)
    blotch = Image.fromarray(rng.normal(0, 1, (h // 6 + 1, w // 6 + 1)).astype(np.float32)).resize((w, h))
    tex = rng.uniform(4, 14) * (np.asarray(blotch) + 0.5 * rng.normal(0, 1, (h, w)))
    img = Image.fromarray(np.clip(road + tex[..., None], 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.6:  # kerb, grass or wall along the top
        top = ((150, 150, 145), (70, 110, 60), (140, 100, 80))[int(rng.integers(3))]
        d.rectangle((0, 0, w, int(h * rng.uniform(0.08, 0.25))), fill=top)
    paint = ((230, 230, 225), (225, 190, 60))[int(rng.random() < 0.3)]
    lw = max(1, round(w * 0.02))
    side = cam.views[2] > cam.views[0]  # side cameras see lanes running across the image
    for _ in range(int(rng.integers(1, 3))):
        pos, tilt, dash = rng.uniform(0.1, 0.9), rng.uniform(-0.25, 0.25), rng.uniform(0.08, 0.2)
        for t in np.arange(rng.uniform(0, dash), 1.0, 2 * dash):
            if side:
                d.line((t * w, (pos + tilt * t) * h, (t + dash) * w, (pos + tilt * (t + dash)) * h), paint, lw)
            else:
                d.line(((pos + tilt * t) * w, t * h, (pos + tilt * (t + dash)) * w, (t + dash) * h), paint, lw)
    tiles[key] = img
    return img


def _draw_wheel(d, cx: float, cy: float, r: float, rim: int) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=TIRE)
    q = r * 0.58
    metal = ((190, 192, 196), (60, 62, 66), (190, 192, 196), (176, 140, 70))[rim]
    d.ellipse((cx - q, cy - q, cx + q, cy + q), fill=metal)
    if rim == 1:
        d.ellipse((cx - q * 0.5, cy - q * 0.5, cx + q * 0.5, cy + q * 0.5), fill=(190, 192, 196))
    elif rim == 2:
        d.line((cx - q, cy, cx + q, cy), fill=TIRE, width=max(1, round(q * 0.35)))
        d.line((cx, cy - q, cx, cy + q), fill=TIRE, width=max(1, round(q * 0.35)))


def _draw_side(d, m: _Model, v: _Vehicle, view: str, cx: float, cy: float, length: float) -> None:
    ln, body, cab, rear, front, slant, wheel = m.shape[:7]
    clr = wheel * 0.55
    top = clr + body
    x0, ground = cx - length / 2, cy + (clr + body + cab) * length / 2
    right = view == "right"

    def P(x: float, y: float) -> tuple[float, float]:
        return (x0 + (x if right else 1 - x) * length, ground - y * length)

    paint = COLORS[v.color][1]
    dark = _shade(paint, 0.7)
    d.polygon([P(0, clr), P(0, top * 0.85), P(0.02, top), P(0.96, top), P(1, clr + body * 0.6), P(1, clr)], fill=paint)
    d.polygon([P(rear, top), P(rear + slant * 0.6, top + cab), P(front - slant, top + cab), P(front, top)], fill=paint)
    i = 0.022
    d.polygon(
        [
            P(rear + i + slant * 0.3, top + 0.01),
            P(rear + slant * 0.6 + i, top + cab - i),
            P(front - slant - i * 0.3, top + cab - i),
            P(front - i * 1.5, top + 0.01),
        ],
        fill=GLASS_REAR,
    )
    w = max(1, round(length * 0.02))
    d.line([P((rear + front) / 2, top), P((rear + front) / 2 + slant * 0.1, top + cab)], fill=paint, width=w)
    for x in (0.45, 0.7) if m.kind != "van" else (0.6,):
        d.line([P(x, clr + body * 0.15), P(x, top)], fill=dark, width=1)
    _rect(d, P(0.95, clr + body * 0.55), P(0.995, clr + body * 0.85), (238, 232, 200))
    _rect(d, P(0.0, clr + body * 0.55), P(0.025, clr + body * 0.85), (190, 30, 30))
    _rect(d, P(front - 0.045, top), P(front - 0.005, top + cab * 0.3), v.mirror)
    if v.stripe is not None:
        y = clr + body * v.stripe[0]
        d.line([P(0.04, y), P(0.94, y)], fill=MARK_COLORS[v.stripe[1]], width=w)
    if v.dent is not None and v.dent[0] == view:
        x, y = v.dent[1], clr + body * v.dent[2]
        d.line(
            [P(x, y), P(x + 0.03, y + 0.02), P(x + 0.05, y - 0.01), P(x + 0.08, y + 0.01)],
            fill=(215, 215, 210),
            width=w,
        )
    if v.roof:
        a, b = rear + slant * 0.6 + 0.04, front - slant - 0.03
        if v.roof == 1:
            d.line([P(a, top + cab + 0.03), P(b, top + cab + 0.03)], fill=v.roof_color, width=w)
            for x in (a + 0.02, b - 0.02):
                d.line([P(x, top + cab), P(x, top + cab + 0.03)], fill=v.roof_color, width=w)
        else:
            _rect(d, P(a, top + cab), P(b, top + cab + 0.055), v.roof_color)
    for x in (0.17, 0.82):
        cxw, cyw = P(x, wheel)
        _draw_wheel(d, cxw, cyw, wheel * length, v.rim)


def _draw_end(d, m: _Model, v: _Vehicle, view: str, cx: float, cy: float, width: float) -> None:
    fbody, fcab, wb, wt = m.shape[8:12]
    clr = 0.07
    top = clr + fbody
    x0, ground = cx - width / 2, cy + (clr + fbody + fcab) * width / 2

    def P(u: float, y: float) -> tuple[float, float]:
        return (x0 + u * width, ground - y * width)

    paint = COLORS[v.color][1]
    dark = _shade(paint, 0.65)
    for u in (0.07, 0.8):
        _rect(d, P(u, 0), P(u + 0.13, clr + 0.05), TIRE)
    d.polygon([P(0, clr), P(0, top - 0.05), P(0.05, top), P(0.95, top), P(1, top - 0.05), P(1, clr)], fill=paint)
    _rect(d, P(0.02, clr), P(0.98, clr + 0.07), dark)
    lo, hi = (1 - wb) / 2, (1 - wt) / 2
    d.polygon([P(lo, top), P(hi, top + fcab), P(1 - hi, top + fcab), P(1 - lo, top)], fill=paint)
    gi = 0.03
    glass = [
        P(lo + gi, top + 0.01),
        P(hi + gi, top + fcab - gi),
        P(1 - hi - gi, top + fcab - gi),
        P(1 - lo - gi, top + 0.01),
    ]
    d.polygon(glass, fill=GLASS_FRONT if view == "front" else GLASS_REAR)
    for u in (lo - 0.07, 1 - lo + 0.01):
        _rect(d, P(u, top + 0.02), P(u + 0.06, top + 0.08), v.mirror)
    _rect(d, P(0.36, clr + 0.08), P(0.64, clr + 0.16), PLATE_COLORS[v.plate_color])
    ink = (240, 240, 240) if v.plate_color == 0 else (20, 20, 20)
    cell = 0.28 / len(v.plate)
    for k, bit in enumerate(v.plate):
        if bit:
            _rect(d, P(0.36 + (k + 0.2) * cell, clr + 0.1), P(0.36 + (k + 0.8) * cell, clr + 0.14), ink)
    s = max(2.0, width * 0.05)

    def on_glass(u: float, vv: float, col: int) -> None:
        # (u, vv) live in glass coordinates, so marks stay on the windshield for every model.
        y = top + 0.01 + vv * (fcab - gi - 0.01)
        half = (0.5 - lo - gi) + (lo - hi) * vv
        gx, gy = P(0.5 - half + u * 2 * half, y)
        d.rectangle((gx, gy, gx + s, gy + s * 0.8), fill=MARK_COLORS[col])

    if view == "front":
        y0, y1 = clr + fbody * 0.5, clr + fbody * 0.78
        for a, b in ((0.05, 0.27), (0.73, 0.95)):
            if m.lamp == 2:
                d.ellipse((*P(a + 0.04, y1), *P(b - 0.04, y0)), fill=(238, 232, 200))
            else:
                _rect(d, P(a, y1 if m.lamp == 0 else (y0 + y1) / 2), P(b, y0 + (y1 - y0) * 0.3), (238, 232, 200))
        _rect(d, P(0.5 - m.grille / 2, clr + fbody * 0.35), P(0.5 + m.grille / 2, clr + fbody * 0.62), (35, 36, 40))
        for mark in v.stickers:
            on_glass(*mark)
    else:
        for a, b in ((0.03, 0.2), (0.8, 0.97)):
            _rect(d, P(a, clr + fbody * 0.5), P(b, clr + fbody * 0.8), (180, 28, 30))
        _rect(d, P(0.3, clr + fbody * 0.85), P(0.7, clr + fbody * 0.9), dark)  # boot lid seam
        if v.rear_mark is not None:
            on_glass(*v.rear_mark)
    if v.roof:
        a, b = hi + 0.05, 1 - hi - 0.05
        w = max(1, round(width * 0.02))
        if v.roof == 1:
            d.line([P(a, top + fcab + 0.03), P(b, top + fcab + 0.03)], fill=v.roof_color, width=w)
        else:
            _rect(d, P(a, top + fcab), P(b, top + fcab + 0.06), v.roof_color)


def _occlude(d, rng: np.random.Generator, w: int, h: int) -> None:
    kind, r = int(rng.integers(3)), rng.random(4)
    if kind == 2:  # corner of a passing car, 10-30% of the frame
        cw, ch = w * (0.25 + 0.2 * r[0]), h * (0.45 + 0.3 * r[1])
        x = 0 if r[2] < 0.5 else w - cw
        d.rectangle((x, h - ch, x + cw, h), fill=COLORS[int(r[3] * len(COLORS))][1])
        d.ellipse((x + cw * 0.3, h - ch * 0.35, x + cw * 0.7, h + ch * 0.1), fill=TIRE)
        return
    pw = w * (0.1 + 0.08 * r[0])
    x = w * (0.05 + 0.8 * r[1])
    d.rectangle((x, 0, x + pw, h), fill=((95, 98, 100), (60, 80, 60))[int(r[2] < 0.5)])
    if kind == 1:  # traffic sign on the pole
        sign = ((30, 70, 170), (200, 30, 30))[int(r[3] < 0.5)]
        d.rectangle((x - pw, h * 0.05, x + 2 * pw, h * (0.2 + 0.15 * r[3])), fill=sign)


def _render(plan: _Plan, v: _Vehicle, k: int, tiles: dict | None = None) -> tuple[Image.Image, int]:
    """Image ``k`` of vehicle ``v`` and its JPEG quality; ``tiles`` keeps the road tiles drawn so far."""
    rng = _rng(plan.seed, _IMAGE, v.vid, k)
    cam, model = plan.cameras[v.cams[k]], plan.models[v.model]
    h, w = plan.size
    # All per-image draws happen before any drawing, so two vehicles that differ
    # only in their marks get exactly the same pose, crop and lighting.
    view = VIEWS[int(rng.choice(4, p=cam.views))]
    zoom, angle = rng.uniform(0.88, 1.08), rng.uniform(-4, 4)
    shift = rng.uniform(-1, 1, 2)
    bg_off = rng.integers(0, 16, 2)
    occluded = rng.random() < cam.occlusion
    occ_rng = _rng(plan.seed, _IMAGE, v.vid, k, 1)
    light = rng.uniform(0.9, 1.1)
    blur = cam.blur + rng.uniform(-0.2, 0.2)
    quality = int(np.clip(cam.quality + rng.integers(-5, 6), 40, 95))
    s = cam.scale * rng.uniform(0.94, 1.06)

    margin = round(0.18 * max(h, w))
    cw, ch = w + 2 * margin, h + 2 * margin
    bx, by = int(bg_off[0]), int(bg_off[1])
    img = _background(plan.seed, cam, cw + 16, ch + 16, {} if tiles is None else tiles).crop((bx, by, bx + cw, by + ch))
    d = ImageDraw.Draw(img)
    cx, cy = cw / 2, ch / 2
    if view in ("left", "right"):
        length = model.shape[0] * w * zoom
        d.ellipse((cx - length * 0.5, cy + length * 0.12, cx + length * 0.5, cy + length * 0.26), fill=(35, 35, 38))
        _draw_side(d, model, v, view, cx, cy, length)
    else:
        width = model.shape[7] * w * zoom
        d.ellipse((cx - width * 0.55, cy + width * 0.3, cx + width * 0.55, cy + width * 0.46), fill=(35, 35, 38))
        _draw_end(d, model, v, view, cx, cy, width)
    img = img.rotate(float(angle), resample=Image.Resampling.BILINEAR)
    x0, y0 = margin + int(shift[0] * 0.45 * margin), margin + int(shift[1] * 0.45 * margin)
    img = img.crop((x0, y0, x0 + w, y0 + h))
    if occluded:
        _occlude(ImageDraw.Draw(img), occ_rng, w, h)
    lut = [min(255, int(c * light)) for c in cam.lut]
    img = img.point(lut)
    if cam.motion:
        img = img.filter(ImageFilter.Kernel((5, 5), [0] * 10 + [1] * 5 + [0] * 10, scale=5))
    if blur > 0.15:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    img = img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.Resampling.BILINEAR)
    return img, quality


def _make_plan(root, seed: int, size, images_per_vehicle: int, n_models: int, n_cams: int) -> _Plan:
    models = tuple(_make_model(seed, m) for m in range(n_models))
    cams = tuple(_make_camera(seed, c) for c in range(n_cams))
    return _Plan(str(root), seed, (int(size[0]), int(size[1])), images_per_vehicle, models, cams)


def _image_id(plan: _Plan, vid: int, k: int) -> int:
    return (vid - 1) * plan.images_per_vehicle + k + 1


def _write_vehicles(job: tuple[_Plan, list[_Vehicle]]) -> int:
    plan, vehicles = job
    tiles: dict = {}
    for v in vehicles:
        folder = os.path.join(plan.root, "images", f"{v.vid:05d}")
        os.makedirs(folder, exist_ok=True)
        for k in range(len(v.cams)):
            img, quality = _render(plan, v, k, tiles)
            img.save(
                os.path.join(folder, f"{_image_id(plan, v.vid, k):06d}.jpg"),
                format="JPEG",
                quality=quality,
                optimize=False,
            )
    return sum(len(v.cams) for v in vehicles)


def _run_jobs(jobs: list, workers: int, progress: Callable[[int], object] | None) -> None:
    if workers == 1:
        for job in jobs:
            n = _write_vehicles(job)
            if progress is not None:
                progress(n)
        return
    # spawn, not fork: the parent may hold torch/OpenMP threads.
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)))
    try:
        for n in pool.imap_unordered(_write_vehicles, jobs):
            if progress is not None:
                progress(n)
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.close()
        pool.join()


def _check_count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, found {value!r}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output folder {out} exists and is not empty; choose a new folder")


def _write_text(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_synthetic(
    out,
    *,
    train_vehicles: int = 120,
    test_vehicles: int = 40,
    images_per_vehicle: int = 8,
    cameras: int = 12,
    image_size: tuple[int, int] = (96, 96),
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Write a synthetic VeRi-Wild-layout dataset into the empty or missing folder ``out``.

    ``image_size`` is the base (height, width) of a crop; each camera rescales it
    by about 0.6-1.4x. ``progress(n)`` is called with the number of images just
    written. The output is byte-identical for a given seed whatever ``workers`` is.
    Returns counts: train images, query/gallery per test size, models, cameras.
    """
    for name, value, minimum in (
        ("train_vehicles", train_vehicles, 1),
        ("test_vehicles", test_vehicles, 1),
        ("images_per_vehicle", images_per_vehicle, 2),
        ("cameras", cameras, 2),
        ("seed", seed, 0),
        ("workers", workers, 1),
    ):
        _check_count(name, value, minimum)
    if not (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 32 for x in image_size)
    ):
        raise ConfigError(f"image_size: expected (height, width) with both >= 32, found {image_size!r}")
    n_vehicles = train_vehicles + test_vehicles
    if n_vehicles > 99999 or n_vehicles * images_per_vehicle > 999999:
        raise ConfigError(
            f"dataset size: expected at most 99999 vehicles and 999999 images (the id widths), "
            f"found {n_vehicles} vehicles and {n_vehicles * images_per_vehicle} images"
        )
    if progress is not None and not callable(progress):
        raise ConfigError(f"progress: expected a callable or None, found {progress!r}")
    out = Path(out)
    _check_out(out)

    seed, n_models = int(seed), max(4, train_vehicles // 15)
    vehicles = [_make_vehicle(seed, vid, n_models, images_per_vehicle, cameras) for vid in range(1, n_vehicles + 1)]
    # Build the tree beside ``out`` and move it in at the end, so a crash never
    # leaves a half-written dataset that looks complete.
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)  # our own leftover from an interrupted run
    (tmp / "train_test_split").mkdir(parents=True)
    plan = _make_plan(tmp, seed, image_size, images_per_vehicle, n_models, cameras)

    # Chunks only batch the work; the bytes never depend on them.
    chunk = 1 if workers == 1 else max(1, min(32, math.ceil(n_vehicles / (4 * workers))))
    _run_jobs([(plan, vehicles[i : i + chunk]) for i in range(0, n_vehicles, chunk)], workers, progress)
    _write_split_files(tmp / "train_test_split", plan, vehicles, train_vehicles)
    if out.exists():
        out.rmdir()
    publish(tmp, out)

    summary = {
        "out": str(out),
        "seed": seed,
        "models": n_models,
        "colors": len(COLORS),
        "cameras": cameras,
        "images": n_vehicles * images_per_vehicle,
        "train": {"vehicles": train_vehicles, "images": train_vehicles * images_per_vehicle},
        "test": {},
    }
    for tag, name, share in TEST_SIZES:
        n = max(1, round(share * test_vehicles))
        summary["test"][tag] = {"size": name, "vehicles": n, "query": n, "gallery": n * (images_per_vehicle - 1)}
    return summary


def _write_split_files(folder: Path, plan: _Plan, vehicles: list[_Vehicle], n_train: int) -> None:
    def key(v: _Vehicle, k: int) -> str:
        return f"{v.vid:05d}/{_image_id(plan, v.vid, k):06d}"

    info = [INFO_HEADER]
    for v in vehicles:
        m = plan.models[v.model]
        color = COLORS[v.color][0]
        info += [f"{key(v, k)};{c + 1};{v.times[k]};{m.name};{m.kind};{color}" for k, c in enumerate(v.cams)]
    _write_text(folder / "vehicle_info.txt", info)
    _write_text(folder / "train_list.txt", [key(v, k) for v in vehicles[:n_train] for k in range(len(v.cams))])
    test = vehicles[n_train:]
    for tag, _, share in TEST_SIZES:
        part = test[: max(1, round(share * len(test)))]
        _write_text(folder / f"test_{tag}_query.txt", [key(v, v.query) for v in part])
        _write_text(folder / f"test_{tag}.txt", [key(v, k) for v in part for k in range(len(v.cams)) if k != v.query])
