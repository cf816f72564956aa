"""Readers for the on-disk layouts of the real vehicle Re-ID datasets.

Each reader turns a dataset folder into a :class:`DatasetIndex`: records
(path, vehicle id, camera id, split) sorted by path within each split, plus the
entries that could not be turned into records (``rejects``), so that nothing
vanishes silently. Readers only look at names and list files; whether an image
decodes is the shard writer's business.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from wildreid.errors import LayoutError

__all__ = [
    "LAYOUTS",
    "DatasetIndex",
    "Record",
    "Reject",
    "detect_layout",
    "read_dataset",
]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclass(frozen=True, order=True)
class Record:
    """One image: ``path`` is relative to the dataset root, in POSIX form."""

    path: str
    vid: int
    camid: int
    split: str


@dataclass(frozen=True)
class Reject:
    """A list entry or file that could not become a record, and why."""

    split: str
    path: str
    reason: str


@dataclass
class DatasetIndex:
    layout: str
    root: Path
    records: dict[str, list[Record]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def splits(self) -> list[str]:
        return list(self.records)

    def count(self) -> int:
        return sum(len(r) for r in self.records.values())


# --------------------------------------------------------------------------- VeRi-Wild

# (split name, list file) in the order splits are written.
VERIWILD_SPLITS = (
    ("train", "train_list.txt"),
    ("query-small", "test_3000_query.txt"),
    ("gallery-small", "test_3000.txt"),
    ("query-medium", "test_5000_query.txt"),
    ("gallery-medium", "test_5000.txt"),
    ("query-large", "test_10000_query.txt"),
    ("gallery-large", "test_10000.txt"),
)


def _veriwild_cameras(root: Path) -> dict[str, int]:
    """Camera of every image from ``vehicle_info.txt`` (``vid/imgid;camera;...``)."""
    candidates = [root / "train_test_split" / "vehicle_info.txt", root / "vehicle_info.txt"]
    info = next((p for p in candidates if p.is_file()), None)
    if info is None:
        raise LayoutError(
            f"VeRi-Wild layout at {root} has no vehicle_info.txt (looked in train_test_split/ "
            "and the root); it gives the camera of every image, so it is required"
        )
    cameras: dict[str, int] = {}
    with info.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.strip().split(";")
            if len(parts) < 2 or "/" not in parts[0]:
                continue
            try:
                camid = int(parts[1])
            except ValueError:
                if lineno == 1:  # the header line
                    continue
                raise LayoutError(
                    f"{info}:{lineno}: expected 'vid/imgid;camera;...' with an integer camera, found {line.strip()!r}"
                ) from None
            cameras[_strip_image_suffix(parts[0].strip())] = camid
    return cameras


def _strip_image_suffix(entry: str) -> str:
    p = Path(entry)
    return str(p.with_suffix("")) if p.suffix.lower() in IMAGE_SUFFIXES else entry


def read_veriwild(root: Path) -> DatasetIndex:
    split_dir = root / "train_test_split"
    cameras = _veriwild_cameras(root)
    index = DatasetIndex("veriwild", root)
    for split, list_name in VERIWILD_SPLITS:
        list_file = split_dir / list_name
        if not list_file.is_file():
            if split == "train":
                raise LayoutError(f"VeRi-Wild layout at {root} has no train_test_split/train_list.txt")
            continue
        records = []
        for lineno, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            entry = line.strip()
            if not entry:
                continue
            where = f"train_test_split/{list_name}:{lineno}"
            vid_text, _, img_text = entry.partition("/")
            if not img_text or not vid_text.isdigit():
                index.rejects.append(Reject(split, entry, f"{where}: expected 'vid/imgid', found {entry!r}"))
                continue
            rel = f"images/{entry}" if Path(entry).suffix.lower() in IMAGE_SUFFIXES else f"images/{entry}.jpg"
            stem = _strip_image_suffix(entry)
            if not (root / rel).is_file():
                index.rejects.append(Reject(split, rel, "missing file"))
                continue
            if stem not in cameras:
                index.rejects.append(Reject(split, rel, f"{where}: no camera for {stem} in vehicle_info.txt"))
                continue
            records.append(Record(rel, int(vid_text), cameras[stem], split))
        index.records[split] = sorted(records)
    return index


# --------------------------------------------------------------------------- folder layouts

# VeRi-776: 0002_c002_00030600_0.jpg; flattened VeRi-Wild: 00001_c21_000001.jpg
_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:_|\.)")


def _read_folders(root: Path, layout: str, folders: Iterable[tuple[str, str]]) -> DatasetIndex:
    index = DatasetIndex(layout, root)
    for split, folder in folders:
        directory = root / folder
        if not directory.is_dir():
            continue
        records = []
        for path in sorted(directory.iterdir()):
            if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                continue  # Thumbs.db, list files and the like are not samples
            rel = f"{folder}/{path.name}"
            match = _NAME.match(path.name)
            if match is None:
                index.rejects.append(
                    Reject(split, rel, "name does not match '<vehicle>_c<camera>_...' (e.g. 0002_c002_00030600_0.jpg)")
                )
                continue
            records.append(Record(rel, int(match.group(1)), int(match.group(2)), split))
        index.records[split] = sorted(records)
    return index


VERI776_FOLDERS = (("train", "image_train"), ("query", "image_query"), ("gallery", "image_test"))

FLAT_FOLDERS = (
    ("train", "bounding_box_train"),
    ("query", "query"),
    ("gallery", "bounding_box_test"),
    ("query-small", "query_small"),
    ("gallery-small", "test_small"),
    ("query-medium", "query_middle"),
    ("gallery-medium", "test_middle"),
)


def read_veri776(root: Path) -> DatasetIndex:
    return _read_folders(root, "veri776", VERI776_FOLDERS)


def read_flat(root: Path) -> DatasetIndex:
    return _read_folders(root, "flat", FLAT_FOLDERS)


# --------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    marker: str  # what must exist under the root, relative
    read: Callable[[Path], DatasetIndex]

    def matches(self, root: Path) -> bool:
        return (root / self.marker).exists()


LAYOUTS: dict[str, Layout] = {
    "veriwild": Layout("veriwild", "VeRi-Wild official", "train_test_split/train_list.txt", read_veriwild),
    "veri776": Layout("veri776", "VeRi-776", "image_train", read_veri776),
    "flat": Layout("flat", "flattened VeRi-Wild", "bounding_box_train", read_flat),
}


def _looked_for() -> str:
    return "; ".join(f"{lay.marker} ({lay.description})" for lay in LAYOUTS.values())


def detect_layout(root: str | Path) -> str:
    """Name of the single layout ``root`` matches; :class:`LayoutError` otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"dataset folder {root} does not exist or is not a folder")
    found = [name for name, lay in LAYOUTS.items() if lay.matches(root)]
    if not found:
        raise LayoutError(f"{root} matches no known dataset layout: looked for {_looked_for()}")
    if len(found) > 1:
        raise LayoutError(f"{root} matches several layouts ({', '.join(found)}); pass --layout to choose one")
    return found[0]


def read_dataset(root: str | Path, layout: str = "auto") -> DatasetIndex:
    """Index every split of the dataset at ``root``; ``layout`` is a name from LAYOUTS or 'auto'."""
    root = Path(root).resolve()
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; expected one of auto, {', '.join(LAYOUTS)}")
    chosen = LAYOUTS[layout]
    if not chosen.matches(root):
        raise LayoutError(f"{root} is not in the {chosen.description} layout: {chosen.marker} is missing")
    index = chosen.read(root)
    if index.count() == 0:
        raise LayoutError(f"{root} ({chosen.description} layout) lists no images")
    return index
