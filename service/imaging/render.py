"""Maps → pictures and arrays: normalisation, colormaps, overlays, PNG, ``.npy``, JSON values.

Colormaps come from the ``cmap`` package (its catalogue carries matplotlib's, MATLAB's and
Google's maps); each is sampled once into a 256-entry lookup table. ``diverging`` (ColorBrewer
RdBu, reversed: blue < 0, white at 0, red > 0) is for signed attributions, whose normalised
values lie in [-1, 1] with zero in the middle of the table.

PNGs are written with zlib level 1: a heatmap compresses well at that level and encoding stays a
few milliseconds, so it never dominates a Grad-CAM request.
"""

from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.errors import InvalidParameter

COLORMAPS: tuple[str, ...] = ("jet", "turbo", "viridis", "inferno", "magma", "gray", "diverging")
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
    if name not in _CATALOG:
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
    out: np.ndarray = np.take(lut(colormap), _indices(m01, signed), axis=0)
    return out


def _indices(m01: np.ndarray, signed: bool) -> np.ndarray:
    """uint8 table indices of normalised values ([0, 1], or [-1, 1] when signed; clipped)."""
    a = np.nan_to_num(np.asarray(m01, dtype=np.float32), nan=0.0)
    if signed:
        a = (a + 1.0) * 0.5
    idx: np.ndarray = np.rint(np.clip(a, 0.0, 1.0) * 255.0).astype(np.uint8)
    return idx


def heatmap_rgb(m: np.ndarray, colormap: str = "jet", signed: bool = False) -> np.ndarray:
    """Min-max normalised, coloured map (HxWx3 uint8)."""
    return colorize(normalize(m, "minmax", signed), colormap, signed)


def heatmap_image(m: np.ndarray, colormap: str = "jet", signed: bool = False) -> Image.Image:
    """The coloured map as a palette image (mode ``P``, the colormap's 256 colours)."""
    img = Image.fromarray(_indices(normalize(m, "minmax", signed), signed), "P")
    img.putpalette(lut(check_colormap(colormap)).tobytes())
    return img


def heatmap_png(m: np.ndarray, colormap: str = "jet", signed: bool = False) -> bytes:
    """A PNG of the coloured map, one pixel per map value.

    Written as an 8-bit palette PNG holding the colormap's 256 colours: the same pixels as an
    RGB PNG for every viewer, a third of the bytes to compress, so several times faster to encode.
    """
    return encode_png(heatmap_image(m, colormap, signed))


def overlay_image(
    image: Image.Image, m: np.ndarray, colormap: str = "jet", alpha: float = 0.5, signed: bool = False
) -> Image.Image:
    """The coloured map blended over ``image`` (RGB): (1 − alpha)·image + alpha·heatmap.

    ``m`` should be at the image's size; otherwise the coloured map is resized to it.
    """
    if not (0.0 <= alpha <= 1.0) or not math.isfinite(alpha):
        raise InvalidParameter(f"alpha must be in [0, 1] (got {alpha})", field="alpha")
    base = image.convert("RGB") if image.mode != "RGB" else image
    heat = Image.fromarray(heatmap_rgb(np.asarray(m), colormap, signed), "RGB")
    if heat.size != base.size:
        heat = heat.resize(base.size, Image.Resampling.BILINEAR)
    return Image.blend(base, heat, float(alpha))


def overlay_png(
    image: Image.Image, m: np.ndarray, colormap: str = "jet", alpha: float = 0.5, signed: bool = False
) -> bytes:
    """A PNG of the coloured map blended over ``image``."""
    return encode_png(overlay_image(image, m, colormap, alpha, signed))


def encode_png(img: np.ndarray | Image.Image) -> bytes:
    """PNG bytes of an image or a uint8 (H, W) / (H, W, 3) / (H, W, 4) array, fast (zlib level 1)."""
    if isinstance(img, np.ndarray):
        arr = img if img.dtype == np.uint8 else np.clip(np.rint(img), 0, 255).astype(np.uint8)
        img = Image.fromarray(np.ascontiguousarray(arr))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# side-by-side comparison
# ------------------------------------------------------------------------------------------------
TILE = 320  # longest side of one panel, pixels
LABEL_PX = 18  # font size
_PAD = 8


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, AttributeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def grid_columns(n: int) -> int:
    """Columns for n panels: near-square, at most 4 wide."""
    return max(1, min(4, math.ceil(math.sqrt(n))))


def compare_grid(image: Image.Image, panels: list[tuple[str, Image.Image]], *, tile: int = TILE) -> bytes:
    """One PNG: the input, then each (label, overlay) panel, each under a text label, in rows of
    ``grid_columns`` panels. Panels are scaled to fit ``tile`` pixels on their longest side."""
    items = [("input", image), *panels]
    scale = tile / max(image.width, image.height)
    tw, th = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    font = _font(LABEL_PX)
    label_h = LABEL_PX + 10
    cols = grid_columns(len(items))
    rows = math.ceil(len(items) / cols)
    cell_w, cell_h = tw + _PAD, th + label_h + _PAD
    canvas = Image.new("RGB", (cols * cell_w + _PAD, rows * cell_h + _PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, panel) in enumerate(items):
        x = _PAD + (i % cols) * cell_w
        y = _PAD + (i // cols) * cell_h
        pic = panel.convert("RGB") if panel.mode != "RGB" else panel
        canvas.paste(pic.resize((tw, th), Image.Resampling.BILINEAR), (x, y + label_h))
        draw.text((x + 2, y + 2), _fit(draw, label, font, tw - 4), fill=(0, 0, 0), font=font)
    return encode_png(canvas)


def _fit(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"
