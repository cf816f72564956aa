"""Readers for the on-disk layouts of the real vehicle Re-ID datasets, and of unlabelled images.

Each reader turns a dataset folder (or, for ``list``, a CSV file) into a
:class:`DatasetIndex`: records (path, vehicle id, camera id, split) sorted by
path within each split, plus the entries that could not be turned into records
(``rejects``), so that nothing vanishes silently. Readers only look at names and
list files; whether an image decodes is the shard writer's business.

The benchmark layouts (``LAYOUTS``) are found by a marker and carry ids.
``folder`` (every image below a folder) and ``list`` (a CSV list) may carry no
ids at all: an unknown vehicle or camera id is -1. A folder of images is read
as ``folder`` only when asked: auto-detection never takes a benchmark folder
that lost its marker for one.
"""

from __future__ import annotations

import csv
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from wildreid.core.errors import ConfigError, LayoutError

__all__ = [
    "LAYOUTS",
    "DatasetIndex",
    "Record",
    "Reject",
    "camera_rule",
    "detect_layout",
    "layout_description",
    "read_dataset",
    "read_folder",
    "read_list",
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
    """``root``: the folder record paths are relative to; ``source``: what was read (``root``, or a list file).

    ``split_folders``: every path begins with its split's own folder (left out of the shard keys).
    """

    layout: str
    root: Path
    records: dict[str, list[Record]] = field(default_factory=dict)
    rejects: list[Reject] = field(default_factory=list)
    split_folders: bool = True
    source: Path | None = None

    def __post_init__(self):
        if self.source is None:
            self.source = self.root

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


# --------------------------------------------------------------------------- unlabelled layouts: folder and list

UNKNOWN = -1  # the vehicle or camera id of an image that has none
LIST_COLUMNS = ("path", "vid", "camid", "split")
# Split names become folder names of the shard set.
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# A folder name that is a camera number, maybe after a prefix: 7, 003, c003, cam12.
_CAMERA_FOLDER = re.compile(r"^\D*(\d+)$")


def camera_rule(spec: str | None) -> Callable[[str], int | str] | None:
    """``--camera-from`` as a function of an image's relative POSIX path: its camera id, or why it has none.

    ``level:N``: the N-th folder below the root (1: the first) names the camera, a number maybe after a
    prefix (``7``, ``c003``, ``cam12``). ``regex:PATTERN``: the first match of PATTERN in the path
    (``re.search``); its group named ``camera`` is the number.
    """
    if spec is None:
        return None
    kind, _, value = spec.partition(":")
    if kind == "level":
        if not re.fullmatch(r"\d+", value) or int(value) < 1:
            raise ConfigError(f"expected --camera-from level:N with N >= 1 (1: the first folder), found {spec!r}")
        return functools.partial(_camera_of_level, int(value), spec)
    if kind == "regex":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ConfigError(f"--camera-from {spec!r} is not a valid regular expression ({exc}); fix it") from None
        if "camera" not in pattern.groupindex:
            raise ConfigError(
                f"expected --camera-from regex:PATTERN with a group named camera, e.g. 'regex:c(?P<camera>\\d+)', "
                f"found {spec!r}"
            )
        return functools.partial(_camera_of_match, pattern, spec)
    raise ConfigError(f"expected --camera-from level:N or regex:PATTERN, found {spec!r}")


def _camera_of_level(level: int, spec: str, path: str) -> int | str:
    folders = path.split("/")[:-1]
    if len(folders) < level:
        return f"--camera-from {spec}: the path has {len(folders)} folder level(s), not {level}"
    match = _CAMERA_FOLDER.match(folders[level - 1])
    if match is None:
        return f"--camera-from {spec}: folder {folders[level - 1]!r} is not a camera number (such as 7 or c007)"
    return int(match.group(1))


def _camera_of_match(pattern: re.Pattern, spec: str, path: str) -> int | str:
    match = pattern.search(path)
    if match is None:
        return f"--camera-from {spec}: no match in the path"
    text = match.group("camera")
    if text is None or not re.fullmatch(r"\d+", text):
        return f"--camera-from {spec}: the camera group {text!r} is not a number"
    return int(text)


def _image_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of the image files below ``root``, any depth; hidden files and folders left out."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        base = Path(folder).relative_to(root)
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield (base / name).as_posix()


def read_folder(root: str | Path, camera_from: str | None = None) -> DatasetIndex:
    """Every image below ``root`` (any depth, sorted paths) in split ``train`` with vehicle id -1.

    Cameras come from ``camera_from`` (:func:`camera_rule`), else -1; an image the rule gives no camera
    is a reject.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise LayoutError(f"expected a folder of images, found that {root} is not a folder")
    rule = camera_rule(camera_from)
    index = DatasetIndex("folder", root, split_folders=False)
    records = []
    for rel in sorted(_image_files(root)):  # rejects in path order too
        camid = UNKNOWN if rule is None else rule(rel)
        if isinstance(camid, str):
            index.rejects.append(Reject("train", rel, camid))
        else:
            records.append(Record(rel, UNKNOWN, camid, "train"))
    index.records["train"] = sorted(records)
    return index


def _list_id(text: str, column: str) -> int | str:
    """A vehicle or camera id of a list cell (empty: -1, unknown), or why the cell is not one."""
    text = text.strip()
    if not text:
        return UNKNOWN
    if not re.fullmatch(r"-?\d+", text) or int(text) < UNKNOWN:
        return f"expected {column} to be an integer >= 0 (-1 or empty: unknown), found {text!r}"
    return int(text)


def _list_header(list_file: Path, header: list[str]) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    if "path" not in names or len(set(names)) != len(names) or set(names) - set(LIST_COLUMNS):
        raise LayoutError(
            f"{list_file}: expected a first line naming the columns, path and any of vid, camid, split (each "
            f"once), found {','.join(header) or 'an empty file'!r}; write such a header line"
        )
    return {name: i for i, name in enumerate(names)}


def _list_row(root: Path, column: dict[str, int], row: list[str], seen: dict) -> Record | tuple[str, str, str]:
    """The record of one list row, or (split, path, reason) when it cannot be one."""
    split = row[column["split"]].strip() if "split" in column and column["split"] < len(row) else "train"
    given = row[column["path"]].strip() if column["path"] < len(row) else ""
    if len(row) != len(column):
        return split, given, f"expected {len(column)} fields ({', '.join(column)}), found {len(row)}"
    if not _SPLIT_NAME.match(split):
        return split, given, f"expected a split name of letters, digits, '-' and '_', found {split!r}"
    if Path(given).suffix.lower() not in IMAGE_SUFFIXES:
        return split, given, f"expected the path of an image ({', '.join(sorted(IMAGE_SUFFIXES))}), found {given!r}"
    # relative to the list's folder; an absolute path outside it gets '../' (root is resolved: no symlinks)
    path = os.path.normpath(root / given)
    rel = Path(os.path.relpath(path, root)).as_posix()
    ids = {name: _list_id(row[column[name]], name) if name in column else UNKNOWN for name in ("vid", "camid")}
    bad = next((value for value in ids.values() if isinstance(value, str)), None)
    if bad is not None:
        return split, rel, bad
    if (split, rel) in seen:
        return split, rel, f"listed twice in split {split} (first on line {seen[split, rel]})"
    if not os.path.isfile(path):
        return split, rel, "missing file"
    return Record(rel, ids["vid"], ids["camid"], split)


def read_list(list_file: str | Path) -> DatasetIndex:
    """The images a CSV list names, one row each, after a header line naming the columns.

    Columns: ``path`` and any of ``vid``, ``camid``, ``split``. Relative paths are resolved against the
    list's folder, the index root; absolute ones are taken as they are. Record paths are relative to the
    list's folder (``../`` for an image outside it). An absent or empty id is -1 (unknown); without a
    split column every image is in ``train``; splits keep the order they first appear in. A row whose
    file is missing, or whose fields do not parse, is a reject.
    """
    list_file = Path(list_file).resolve()
    if not list_file.is_file():
        raise LayoutError(f"expected a CSV image list, found no file {list_file}")
    index = DatasetIndex("list", list_file.parent, split_folders=False, source=list_file)
    records: dict[str, list[Record]] = {}
    seen: dict[tuple[str, str], int] = {}  # (split, path) -> line
    with list_file.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = csv.reader(f)
        column = _list_header(list_file, next(rows, []))
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            found = _list_row(index.root, column, row, seen)
            if isinstance(found, Record):
                seen[found.split, found.path] = rows.line_num
                records.setdefault(found.split, []).append(found)
            else:
                split, path, reason = found
                where = "" if reason == "missing file" else f"{list_file.name}:{rows.line_num}: "
                index.rejects.append(Reject(split, path, where + reason))
    index.records = {split: sorted(found) for split, found in records.items()}
    return index


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


# Layouts without a marker, read only when asked for (a .csv file is a list: nothing else can be one).
UNLABELLED = {"folder": "folder of images", "list": "CSV image list"}


def layout_description(name: str) -> str:
    """What a layout name stands for, e.g. 'VeRi-776' or 'folder of images'."""
    return LAYOUTS[name].description if name in LAYOUTS else UNLABELLED[name]


def _looked_for() -> str:
    return "; ".join(f"{lay.marker} ({lay.description})" for lay in LAYOUTS.values())


def _first_image(root: Path) -> str | None:
    return next(iter(_image_files(root)), None)


def detect_layout(root: str | Path) -> str:
    """Name of the single layout ``root`` matches; :class:`LayoutError` otherwise.

    A ``.csv`` file is a ``list``. A folder must match exactly one benchmark layout: a folder of
    images matching none is an error that suggests ``--layout folder``, never read as one silently.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "list"
        raise LayoutError(
            f"{root} is a file but not a .csv image list; expected a dataset folder or a CSV list "
            "(pass --layout list for a list with another suffix)"
        )
    if not root.is_dir():
        raise LayoutError(f"dataset folder {root} does not exist or is not a folder")
    found = [name for name, lay in LAYOUTS.items() if lay.matches(root)]
    if not found:
        image = _first_image(root)
        hint = (
            f"; it holds images (e.g. {image}): if it is one of these data sets, a file is missing, "
            "else pass --layout folder to shard them without vehicle ids"
            if image is not None
            else ""
        )
        raise LayoutError(f"{root} matches no known dataset layout: looked for {_looked_for()}{hint}")
    if len(found) > 1:
        raise LayoutError(f"{root} matches several layouts ({', '.join(found)}); pass --layout to choose one")
    return found[0]


def read_dataset(src: str | Path, layout: str = "auto", camera_from: str | None = None) -> DatasetIndex:
    """Index every split of the data set at ``src``: a folder, or the CSV file of a ``list``.

    ``layout``: 'auto', a name from LAYOUTS, 'folder' or 'list'. ``camera_from``
    (:func:`camera_rule`) gives the cameras of a ``folder`` and only there.
    """
    src = Path(src).resolve()
    names = [*LAYOUTS, *UNLABELLED]
    if layout not in ("auto", *names):
        raise LayoutError(f"unknown layout {layout!r}; expected one of auto, {', '.join(names)}")
    if layout == "auto":
        layout = detect_layout(src)
    if camera_from is not None and layout != "folder":
        raise ConfigError(
            f"--camera-from applies to --layout folder, not to the {layout_description(layout)} layout "
            "(its cameras come from its own files); drop --camera-from"
        )
    if layout == "folder":
        index = read_folder(src, camera_from)
    elif layout == "list":
        index = read_list(src)
    else:
        chosen = LAYOUTS[layout]
        if not chosen.matches(src):
            raise LayoutError(f"{src} is not in the {chosen.description} layout: {chosen.marker} is missing")
        index = chosen.read(src)
    if index.count() == 0:
        first = index.rejects[0] if index.rejects else None
        why = f"; {len(index.rejects)} rejected, first {first.path}: {first.reason}" if first else ""
        raise LayoutError(f"{src} ({layout_description(layout)} layout) lists no usable images{why}")
    return index
