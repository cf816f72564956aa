"""Parsing of human-sized quantities given on the command line."""

from __future__ import annotations

import re

from dask.utils import parse_bytes as dask_parse_bytes

from wildreid.core.errors import ConfigError

__all__ = ["format_bytes", "parse_bytes", "parse_size"]


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GB', '1.5GiB' or a plain integer number of bytes (dask's parser, our error)."""
    if isinstance(text, int):
        return text
    try:
        # dask reads a bare unit ("MiB", or "") as one of it: a size needs its number
        size = dask_parse_bytes(text) if re.search(r"[0-9]", text) else -1
    except (ValueError, TypeError):
        size = -1
    if size < 0:
        raise ConfigError(f"expected a size such as 512MiB, 2GB or 1000000, found {text!r}")
    return size


# Not dask.utils.format_bytes: it writes "kiB" and two decimals, where every table and message here (and the
# docs quoting them) uses IEC "KiB" with one.
def format_bytes(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def parse_size(text: str) -> tuple[int, int]:
    """'256x128' -> (256, 128): height x width of an image."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise ConfigError(f"expected an image size HEIGHTxWIDTH such as 256x128, found {text!r}")
    return int(match.group(1)), int(match.group(2))
