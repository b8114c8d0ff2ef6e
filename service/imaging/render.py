"""Maps → colours and bytes: normalisation, colormaps, PNG, ``.npy``, JSON values.

Colormaps come from the ``cmap`` package (its catalogue carries matplotlib's, MATLAB's and
Google's maps); each is sampled once into a 256-entry lookup table. ``diverging`` (ColorBrewer
RdBu, reversed: blue < 0, white at 0, red > 0) is for signed attributions, whose shown values lie
in [-1, 1] with zero in the middle of the table. ``rgb`` is no table: the per-channel attribution
is its own colour (``service.imaging.scale.rgb_image``). What is shown and how it is drawn over
the image live in ``scale`` and ``styles``; the comparison grid in ``grid``.

PNGs are written with zlib level 1: a heatmap compresses well at that level and encoding stays a
few milliseconds, so it never dominates a Grad-CAM request; maps alone are palette PNGs
(``styles.picture``), a third of the bytes of RGB to compress.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from PIL import Image

from service.errors import InvalidParameter

#: every ``colormap`` value: the catalogue's tables, and ``rgb`` (the per-channel attribution shown
#: as an image, drawn by ``service.imaging.styles``)
COLORMAPS: tuple[str, ...] = ("jet", "turbo", "viridis", "inferno", "magma", "gray", "diverging", "rgb")
_CATALOG: dict[str, str] = {
    "jet": "matlab:jet",
    "turbo": "google:turbo",
    "viridis": "bids:viridis",
    "inferno": "bids:inferno",
    "magma": "bids:magma",
    "gray": "matlab:gray",
    "diverging": "colorbrewer:RdBu_r",
}
PNG_COMPRESS_LEVEL = 1
NormalizeMode = Literal["minmax", "none"]


# ------------------------------------------------------------------------------------------------
# values
# ------------------------------------------------------------------------------------------------
def normalize(m: np.ndarray, mode: NormalizeMode = "minmax", signed: bool = False) -> np.ndarray:
    """float32 copy of ``m``; ``minmax``: signed maps divided by max |m| (into [-1, 1], zero stays
    zero), unsigned maps scaled into [0, 1]. Constant (or empty) maps give zeros. NaN → 0."""
    a = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if mode == "none":
        return a.copy()
    if mode != "minmax":
        raise InvalidParameter(f"normalize must be 'minmax' or 'none' (got {mode!r})", field="normalize")
    if a.size == 0:
        return a.copy()
    if signed:
        peak = float(np.abs(a).max())
        return a / peak if peak > 0 else np.zeros_like(a)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0 or not math.isfinite(hi - lo):
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def rounded(values: np.ndarray) -> np.ndarray:
    """float64 copy rounded to ~5 significant digits of the peak (NaN, ±inf → 0), for JSON.

    Rounding happens in float64, so the values print as short decimals (no float32 noise).
    """
    a = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.ascontiguousarray(np.round(a, _digits(a)))


SIGNIFICANT_DIGITS = 5


def _digits(m: np.ndarray) -> int:
    peak = float(np.abs(m).max()) if m.size else 0.0
    if peak <= 0 or not math.isfinite(peak):
        return SIGNIFICANT_DIGITS
    return max(0, min(15, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(peak))))


def to_npy(arr: np.ndarray | Any) -> bytes:
    """``arr`` as a float32 ``.npy`` file."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(np.asarray(arr, dtype=np.float32)), allow_pickle=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------------
def check_colormap(name: str) -> str:
    """``name`` if it is a table of the catalogue (every colormap but ``rgb``)."""
    if name not in _CATALOG:
        if name in COLORMAPS:
            raise InvalidParameter(f"colormap {name!r} is not a colour table here", field="colormap")
        raise InvalidParameter(
            f"unknown colormap {name!r}; choose one of {', '.join(COLORMAPS)}", field="colormap"
        )
    return name


@lru_cache(maxsize=len(_CATALOG))
def lut(name: str) -> np.ndarray:
    """(256, 3) uint8 lookup table of the named colormap (read-only, cached)."""
    from cmap import Colormap

    rgba = np.asarray(Colormap(_CATALOG[check_colormap(name)]).lut(256), dtype=np.float64)
    table = np.clip(np.rint(rgba[:, :3] * 255.0), 0, 255).astype(np.uint8)
    table.flags.writeable = False
    return table


def colorize(m01: np.ndarray, colormap: str = "jet", signed: bool = False) -> np.ndarray:
    """HxWx3 uint8 colours of a normalised map: [0, 1] (unsigned) or [-1, 1] (signed, 0 at the
    table's middle). Values outside the range are clipped."""
    out: np.ndarray = np.take(lut(colormap), indices(m01, signed), axis=0)
    return out


def indices(m01: np.ndarray, signed: bool) -> np.ndarray:
    """uint8 table indices of normalised values ([0, 1], or [-1, 1] when signed; clipped)."""
    a = np.nan_to_num(np.asarray(m01, dtype=np.float32), nan=0.0)
    if signed:
        a = (a + 1.0) * 0.5
    idx: np.ndarray = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return idx


def encode_png(img: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of an image or a uint8 (H, W) / (H, W, 3) / (H, W, 4) array, fast (zlib level 1)."""
    if isinstance(img, np.ndarray):
        arr = img if img.dtype == np.uint8 else np.clip(np.rint(img), 0, 255).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()
