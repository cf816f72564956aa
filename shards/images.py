"""Checking and decoding image bytes, shared by the shard writer and reader.

The writer must reject broken images without paying for a full decode of
every healthy one, so :func:`image_extension` parses the header and checks the
end-of-image marker, and only decodes fully when the cheap checks are unsure.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from wildreid.core.errors import BadImageError

__all__ = ["decode_rgb", "image_extension"]

_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp", "GIF": "gif", "TIFF": "tiff"}
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND\xaeB`\x82"


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # A decompression-bomb warning is still an image we can judge.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def _decodes(data: bytes) -> str | None:
    """None when the image decodes completely, else the decoder's complaint."""
    try:
        with _open(data) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return str(exc) or type(exc).__name__
    return None


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (they carry the image size); C4, C8 and CC are not frames.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_header_ok(data: bytes) -> bool:
    """Walk the JPEG segments up to the scan: well-formed lengths and a frame with a size."""
    i, n, frame = 2, len(data), False
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = (data[i + 2] << 8) | data[i + 3]
        if length < 2:
            return False
        if marker in _SOF:
            if i + 9 > n or not (data[i + 5] | data[i + 6]) or not (data[i + 7] | data[i + 8]):
                return False
            frame = True
        elif marker == 0xDA:  # start of scan: entropy-coded data follows
            return frame and i + 2 + length < n
        i += 2 + length
    return False


def _fast_extension(data: bytes) -> str | None:
    """The extension when cheap structural checks prove the file whole, else None (then decode)."""
    tail = data[-16:].rstrip(b"\x00\r\n ")
    if data[:3] == b"\xff\xd8\xff" and tail.endswith(_JPEG_END) and _jpeg_header_ok(data):
        return "jpg"
    if (
        data[:8] == _PNG_SIGNATURE
        and data[12:16] == b"IHDR"
        and any(data[16:20])
        and any(data[20:24])
        and tail.endswith(_PNG_END)
    ):
        return "png"
    return None


def image_extension(data: bytes) -> str:
    """The true file extension of encoded image ``data``; BadImageError if it will not decode.

    Healthy JPEG and PNG files are recognised from their structure (header
    segments and end marker) in microseconds; anything else is decoded.
    """
    if not data:
        raise BadImageError("empty file (0 bytes)")
    fast = _fast_extension(data)
    if fast is not None:
        return fast
    try:
        with _open(data) as image:
            fmt = image.format
            width, height = image.size
    except UnidentifiedImageError:
        raise BadImageError("not a decodable image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        if "truncat" in str(exc).lower():
            raise BadImageError(f"truncated image ({exc})") from None
        raise BadImageError(f"not a decodable image ({exc})") from None
    if width <= 0 or height <= 0:
        raise BadImageError(f"image has no pixels ({width}x{height})")
    tail = data.rstrip(b"\x00\r\n ")
    healthy_end = (fmt == "JPEG" and tail.endswith(_JPEG_END)) or (fmt == "PNG" and tail.endswith(_PNG_END))
    if not healthy_end:
        # No end marker where one belongs (truncation), or a format we cannot
        # judge from its ends: let the decoder decide.
        problem = _decodes(data)
        if problem is not None:
            reason = "truncated" if "truncated" in problem else "undecodable"
            raise BadImageError(f"{reason} {fmt} image ({problem})")
    return _EXTENSIONS.get(fmt, fmt.lower())


def decode_rgb(data: bytes) -> Image.Image:
    """Decode to RGB (grayscale, CMYK and palette images included)."""
    return _open(data).convert("RGB")
