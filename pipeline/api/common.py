"""What the API modules share: the callbacks' types and their do-nothing defaults, sizes from ints or strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from wildreid.core.units import parse_bytes, parse_size

__all__ = ["Log", "Progress", "StopAsked", "as_bytes", "as_size", "never", "no_log", "no_progress"]

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]
StopAsked = Callable[[], bool]


def no_progress(phase: str, advance: int, total: int) -> None:
    pass


def no_log(message: str) -> None:
    pass


def never() -> bool:
    return False


def as_bytes(size: int | str | None) -> int | None:
    """A byte count from an int or a size such as "2GiB" (None stays None)."""
    return size if size is None or isinstance(size, int) else parse_bytes(size)


def as_size(size: str | Sequence[int]) -> tuple[int, int]:
    return parse_size(size) if isinstance(size, str) else (int(size[0]), int(size[1]))
