"""Client bytes → an RGB ``PIL.Image``, or a domain error. Nothing else ever escapes.

Order of checks: upload size; format (only the formats below are even tried, so no plugin such
as EPS ever runs on client bytes); declared width×height from the header, before any pixel is
decoded (Pillow's own decompression-bomb guard stays on as a second line); minimum size; no
compression that only a pure-Python decoder reads (RLE BMP: seconds per kilobyte); then the
decode, EXIF orientation and the conversion to RGB.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import (
    CorruptImage,
    ImageTooLarge,
    ImageTooSmall,
    PayloadTooLarge,
    SaliencyError,
    UnsupportedImage,
)

if TYPE_CHECKING:
    from service.config import Settings

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")

# leading bytes of the supported formats: a file that starts like one but does not open is corrupt
_SIGNATURES: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little-endian
    b"MM\x00*",  # TIFF, big-endian
)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def looks_like_image(data: bytes) -> bool:
    """Whether ``data`` starts with the signature of a supported format."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return True
    return any(data.startswith(sig) for sig in _SIGNATURES)


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    min_size: int,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode an upload to RGB with its EXIF orientation applied; alpha is composited over
    ``background``. Raises ``PayloadTooLarge``, ``ImageTooLarge``, ``UnsupportedImage``,
    ``CorruptImage`` or ``ImageTooSmall``, and nothing else."""
    if not data:
        raise CorruptImage("the image is empty (0 bytes)", field="image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"the upload is {len(data)} bytes; the limit is {max_bytes}", field="image")
    try:
        return _decode(data, max_pixels=max_pixels, min_size=min_size, background=background)
    except SaliencyError:
        raise
    except MemoryError:
        raise ImageTooLarge("the image is too large to decode", field="image") from None
    except Exception as exc:  # any other failure on client bytes is a corrupt image, never a 500
        log.debug("image decode failed: %r", exc)
        raise CorruptImage(f"the image could not be decoded ({type(exc).__name__})", field="image") from None


def decode_upload(data: bytes, settings: Settings, *, max_pixels: int | None = None) -> Image.Image:
    """``decode_image`` with the service's limits (upload bytes, decoded pixels, minimum size)
    and its overlay background, as every route and worker decodes an upload. ``max_pixels``:
    a lower pixel limit (what is left of a request's when it carries several images)."""
    limit = settings.max_image_pixels if max_pixels is None else min(max_pixels, settings.max_image_pixels)
    return decode_image(
        data,
        max_bytes=settings.max_upload_bytes,
        max_pixels=limit,
        min_size=settings.min_image_size,
        background=settings.overlay_background,
    )


def _decode(data: bytes, *, max_pixels: int, min_size: int, background: tuple[int, int, int]) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # the warning only arrives as an exception where warnings are errors (tests)
        raise ImageTooLarge(f"the image has too many pixels ({exc})", field="image") from None
    except UnidentifiedImageError:
        if looks_like_image(data):
            raise CorruptImage("the image header is corrupt or truncated", field="image") from None
        raise UnsupportedImage(
            f"not an image in a supported format ({', '.join(FORMATS)})", field="image"
        ) from None

    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}",
            field="image",
        )
    if min(width, height) < min_size:
        raise ImageTooSmall(
            f"the image is {width}×{height}; width and height must be at least {min_size} pixels",
            field="image",
        )
    slow = sorted({tile[0] for tile in im.tile if tile[0] in Image.DECODERS})
    if slow:
        # Pillow's Python-level decoders (RLE-compressed BMP: ~14 s for 25 KB, holding the GIL)
        raise UnsupportedImage(
            f"this {im.format} uses a compression the service does not decode ({', '.join(slow)}: "
            "too slow to decode safely); send it as PNG, JPEG or an uncompressed BMP",
            field="image",
        )
    try:
        im.seek(0)  # first frame of animated GIF/WebP, first page of a TIFF
        im.load()
    except MemoryError:
        raise
    except Exception as exc:  # OSError (truncated), SyntaxError (broken PNG), ValueError, EOFError …
        raise CorruptImage(f"the image data is corrupt or truncated: {exc}", field="image") from None
    return to_rgb(_orient(im), background)


def _orient(im: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as exc:
        log.debug("ignoring unreadable EXIF orientation: %r", exc)
        return im
    return out if out is not None else im


def to_rgb(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode → RGB. Alpha (including palette transparency) is composited over
    ``background``; 16-bit and 32-bit integer and float images are scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(im), mode)).convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise UnsupportedImage(f"unsupported colour mode {mode}: {exc}", field="image") from None


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a high-bit-depth image in 0..255.

    ``I;16*``: the full 16-bit range. ``I``: 8-bit or 16-bit data stored in 32-bit integers is
    recognised by its range; anything else is min-max scaled. ``F``: [0, 1] or [0, 255] data is
    recognised likewise.
    """
    a = arr.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT:
        scale_lo, scale_hi = 0.0, 65535.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale_lo, scale_hi = 0.0, 1.0
    elif lo >= 0.0 and hi <= 255.0:
        scale_lo, scale_hi = 0.0, 255.0
    elif mode == "I" and lo >= 0.0 and hi <= 65535.0:
        scale_lo, scale_hi = 0.0, 65535.0
    else:
        scale_lo, scale_hi = lo, max(hi, lo + 1e-12)
    a = np.nan_to_num(a, nan=scale_lo, posinf=scale_hi, neginf=scale_lo)
    out = np.clip((a - scale_lo) / (scale_hi - scale_lo) * 255.0 + 0.5, 0.0, 255.0)
    return out.astype(np.uint8)
