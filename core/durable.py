"""Durable writes: the one way wildreid puts a file or a folder in place.

A write is durable after a kill -9 when it is atomic (the final name appears
only once the content is whole) and after a power loss when, in addition, the
content and the directory entry have reached the disk. Every writer in
wildreid goes through :func:`atomic_write` (files), :func:`publish` (a folder or
file written under a temporary name) or :class:`DurableLocalStore` (Zarr
chunks and metadata), which all follow the same order:

    write <name>.<pid>.partial -> fsync it -> rename over <name> -> fsync the folder

Without the last fsync a rename may be lost by a power cut even though the
file's data reached the disk (see fsync(2): "Calling fsync() does not
necessarily ensure that the entry in the directory containing the file has
also reached disk").
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from zarr.storage import LocalStore

__all__ = [
    "DurableLocalStore",
    "atomic_write",
    "file_sha256",
    "fsync_dir",
    "fsync_tree",
    "partial_name",
    "publish",
    "remove_tree",
]


def partial_name(path: Path) -> Path:
    """The temporary name of ``path`` while it is written; the pid keeps two processes' attempts apart."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` (renames, new files, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and every folder below ``root`` (a tree written before it is published)."""
    root = Path(root)
    if root.is_file():
        with open(root, "rb") as f:
            os.fsync(f.fileno())
        return
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(folder)


def make_dirs(folder: Path) -> None:
    """``mkdir -p`` whose new folders are durable too (each new entry's parent is fsynced).

    Without it a power loss could drop a new chunk folder (``c/<row>``) and with it a
    chunk whose write was already acknowledged; Zarr would read the fill value back.
    """
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_dir(new.parent)


def _write_durably(path: Path, tmp: Path, write: Callable[[BinaryIO], object], exclusive: bool = False):
    """write(file) into ``tmp``, fsync, rename to ``path`` (``exclusive``: only if absent), fsync the folder."""
    try:
        with open(tmp, "wb") as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # FileExistsError when another writer got there first
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return result


def atomic_write(path: str | Path, data: bytes | str | Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` whole or not at all, durably; ``data`` is bytes, text (UTF-8) or ``writer(file)``."""
    path = Path(path)
    make_dirs(path.parent)
    if not callable(data):
        content = data.encode() if isinstance(data, str) else data
        data = lambda f: f.write(content)  # noqa: E731
    _write_durably(path, partial_name(path), data)
    return path


def publish(tmp: str | Path, final: str | Path) -> Path:
    """Put the finished file or folder ``tmp`` in place as ``final`` (replacing a file, not a folder), durably."""
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def remove_tree(path: str | Path) -> None:
    """Remove a folder (or file) if it exists, and make the removal durable."""
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    else:
        return
    fsync_dir(path.parent)


def _put_durably(path: Path, value, exclusive: bool) -> int:
    make_dirs(path.parent)
    # zarr's own name for an unfinished chunk, so its tools recognise leftovers
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    return _write_durably(path, tmp, lambda f: f.write(value.as_buffer_like()), exclusive)


class DurableLocalStore(LocalStore):
    """zarr's LocalStore whose chunk and metadata writes are fsynced, file and folder.

    zarr-python (>= 3.1.3) already writes each key under a temporary name and
    renames it, so a kill -9 never leaves half a chunk; it does not fsync, so a
    power loss could. This store adds the two fsyncs of :func:`atomic_write`.
    """

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(_put_durably, self.root / key, value, exclusive)

    def set_sync(self, key: str, value) -> None:  # zarr's synchronous write path: the same durable write
        opener = getattr(self, "_ensure_open_sync", None)  # zarr's own step before a sync write, where it has one
        if opener is not None:
            opener()
        self._check_writable()
        _put_durably(self.root / key, value, False)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read 1 MiB at a time: the one file digest of shards and checkpoints."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
