"""Byte-level tar: the fixed-metadata subset that shards use, written and parsed fast.

Python's ``tarfile`` spends tens of microseconds per member; shards hold
millions of small members, so headers are built from a template and parsed by
offset. Output is standard ustar (PAX for long or non-ASCII names), readable by
GNU tar, ``tarfile`` and WebDataset.

Not webdataset's ``TarWriter``: it writes through ``tarfile`` (the same per-member cost), stamps
each member with the current time unless given a fixed ``mtime``, and does not tell where a member's
bytes start. Shards need the opposite of all three: millions of members, bytes that are identical run
after run (a resumed shard is checked by its sha256), and the byte offset of every sample for the
``.tar.idx`` index that random access and ranged reads use.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from wildreid.core.errors import ShardError

__all__ = [
    "BLOCK",
    "ShardSink",
    "padded",
    "read_file",
    "sample_key",
    "scan_sample_offsets",
    "tar_header",
    "tar_members",
]

BLOCK = 512
RECORD = 20 * BLOCK  # archives are padded to whole 10 KiB records
_ZEROS = bytes(BLOCK)


def padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


# Every field this writer fixes (mode 0444, uid/gid 0, mtime 0, no user names);
# only the name, size and checksum change from member to member.
_TEMPLATE = bytearray(BLOCK)
_TEMPLATE[100:108] = b"0000444\0"
_TEMPLATE[108:124] = b"0000000\0" * 2
_TEMPLATE[136:148] = b"00000000000\0"
_TEMPLATE[148:156] = b" " * 8  # the checksum counts its own field as spaces
_TEMPLATE[156:157] = b"0"
_TEMPLATE[257:265] = b"ustar\x0000"
_TEMPLATE = bytes(_TEMPLATE)
_TEMPLATE_SUM = sum(_TEMPLATE) - sum(_TEMPLATE[124:136])


def tar_header(name: str, size: int) -> bytes:
    """The header of a regular file member; byte-identical to what ``tarfile`` writes for it."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not raw.isascii() or size >= 8**11:
        info = tarfile.TarInfo(name)  # long or non-ASCII names need the general (PAX) encoder
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o444, 0, 0, "", ""
        return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    size_field = b"%011o\0" % size
    checksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    return b"".join(
        (
            raw,
            _TEMPLATE[len(raw) : 124],
            size_field,
            _TEMPLATE[136:148],
            b"%06o\0 " % checksum,
            _TEMPLATE[156:],
        )
    )


class ShardSink:
    """Buffers tar members and writes them in large blocks, hashing what goes to disk."""

    def __init__(self, f, flush_at: int = 4 << 20):
        self.f, self.flush_at = f, flush_at
        self.sha = hashlib.sha256()
        self.size = 0
        self.parts: list[bytes] = []
        self.pending = 0

    @property
    def position(self) -> int:
        """Archive offset of the next member's header (bytes written plus bytes buffered)."""
        return self.size + self.pending

    def add(self, name: str, data: bytes) -> None:
        header = tar_header(name, len(data))  # more than one block for a long or non-ASCII name (PAX)
        self.parts += (header, data, _ZEROS[: -len(data) % BLOCK])
        self.pending += len(header) + padded(len(data))
        if self.pending >= self.flush_at:
            self.flush()

    def flush(self) -> None:
        block = b"".join(self.parts)
        self.f.write(block)
        self.sha.update(block)
        self.size += len(block)
        self.parts, self.pending = [], 0

    def close(self) -> None:
        end = 2 * BLOCK + (-(self.size + self.pending + 2 * BLOCK) % RECORD)
        self.parts.append(bytes(end))
        self.flush()


def read_file(path: str, size: int | None = None) -> bytes:
    """Whole file in one read call where possible; ``size`` is a hint that saves a stat."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if size is None:
            size = os.fstat(fd).st_size
        data = os.read(fd, size + 1)
        if len(data) <= size:  # short read (or the file grew): read the rest
            rest = [data]
            while chunk := os.read(fd, 1 << 20):
                rest.append(chunk)
            data = b"".join(rest)
        return data
    finally:
        os.close(fd)


def _member_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    return (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    for line in records.decode("utf-8", "surrogateescape").splitlines():
        _, _, item = line.partition(" ")
        if item.startswith("path="):
            return item[len("path=") :]
    return None


def tar_members(url: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular file in an in-memory tar archive."""
    view, pos, long_name = memoryview(data), 0, None
    while pos + BLOCK <= len(data):
        header = data[pos : pos + BLOCK]
        if not header.strip(b"\0"):
            return  # end-of-archive blocks
        try:
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise ShardError(f"{url}: corrupted tar header at byte {pos}; run 'wildreid shard --verify'") from None
        kind = header[156:157]
        body = pos + BLOCK
        if body + size > len(data):
            raise ShardError(f"{url}: truncated at byte {len(data)}; run 'wildreid shard --verify'")
        content = view[body : body + size]
        pos = body + padded(size)
        if kind == b"x":  # PAX extended header: a long or non-ASCII name for the next member
            long_name = _pax_path(bytes(content))
        elif kind == b"L":  # GNU long name
            long_name = bytes(content).rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind in (b"0", b"\0"):
            yield (long_name or _member_name(header)), bytes(content)
            long_name = None


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, the WebDataset way: the key ends at the first dot of the base name."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


def _header_size(url: str, header: bytes, pos: int) -> int:
    try:
        return int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ShardError(f"{url}: corrupted tar header at byte {pos}; run 'wildreid shard --verify'") from None


def scan_sample_offsets(path: str | Path) -> list[int]:
    """Byte offsets where each sample of a shard begins, then where the last one ends (N + 1 values).

    One pass over the member headers, seeking over their contents: what the reader
    needs to read any sample alone. A sample begins at its first member's header
    (or at the PAX / GNU long-name header before it) and runs to the next sample's.
    """
    url, offsets = str(path), []
    current: str | None = None
    with open(path, "rb") as f:
        end, pos, extended_at, long_name = os.fstat(f.fileno()).st_size, 0, None, None
        while pos + BLOCK <= end:
            f.seek(pos)
            header = f.read(BLOCK)
            if not header.strip(b"\0"):
                break  # end-of-archive blocks
            size, kind = _header_size(url, header, pos), header[156:157]
            body = pos + BLOCK
            if body + size > end:
                raise ShardError(f"{url}: truncated at byte {end}; run 'wildreid shard --verify'")
            if kind in (b"x", b"L"):
                content = f.read(size)
                long_name = (
                    _pax_path(content) if kind == b"x" else content.rstrip(b"\0").decode("utf-8", "surrogateescape")
                )
                extended_at = pos if extended_at is None else extended_at
            elif kind in (b"0", b"\0"):
                key, _ = sample_key(long_name or _member_name(header))
                if key != current:
                    offsets.append(pos if extended_at is None else extended_at)
                    current = key
                extended_at, long_name = None, None
            pos = body + padded(size)
    return [*offsets, pos]
