"""Drawing a shown map (``service.imaging.scale.Shown``) alone or over the image, in a style.

The values are mapped from the model's resolution to the output's (the request's geometry, or a
scaled one for compare panels) as 8-bit planes (``levels``: table indices, RGB channels,
opacities) and coloured there; contours are traced at the model's resolution and their
coordinates scaled, so no step but the final pixel work grows with the upload's size. Pixel work
is done by Pillow (upsampling, palette lookups, blends, composites), which keeps a 12-megapixel
overlay well under half a second.

Styles (``style``), each with ``alpha`` the opacity of what it draws:

- ``heatmap``: (1 − alpha)·image + alpha·colours, everywhere (the CAM papers' figures).
- ``pixels``: the image in grey, dimmed to ``PIXELS_BACKDROP`` (as the Integrated Gradients
  authors' visualisation draws it), and over it each pixel's colour with opacity alpha·|v|: only
  the attribution shows in colour. For ``rgb`` the opacity is the colour's distance from grey
  (``both``) or from black.
- ``outlines``: the image, and the contours (scikit-image's marching squares) of the region
  holding the map's top ``keep`` fraction of pixels; for ``both`` the positive and the negative
  regions, in the colormap's two ends.
- ``mask``: the image where the map is in its top ``keep`` fraction of pixels (exactly that many:
  ties at the threshold are taken in raster order), covered elsewhere by black at opacity alpha.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from skimage.measure import find_contours

from service.errors import InvalidParameter
from service.imaging.geometry import Geometry, to_original
from service.imaging.render import check_colormap, lut
from service.imaging.scale import Shown

RGB = "rgb"
PIXELS_BACKDROP = 0.7  # brightness of the grey image under ``pixels`` (the IG authors' value)
STYLES = ("heatmap", "pixels", "outlines", "mask")


def to_size(values: np.ndarray, geometry: Geometry | None) -> np.ndarray:
    """``values`` (H, W) or (C, H, W) at the output's size: mapped back with ``geometry``, or as
    they are (``None``: the output is at the model's resolution)."""
    if geometry is None:
        return np.asarray(values, dtype=np.float32)
    return to_original(values, geometry)


def output_size(shown: Shown, geometry: Geometry | None) -> tuple[int, int]:
    """(width, height) of the output."""
    if geometry is None:
        h, w = shown.level.shape
        return w, h
    return geometry.original_width, geometry.original_height


def levels(v255: np.ndarray, geometry: Geometry | None) -> Image.Image:
    """An (H, W) plane of values in [0, 255] at the model's resolution → an 8-bit image (``L``)
    at the output's size.

    When the output stretches the map over the whole upload and is larger in both directions,
    Pillow upsamples the plane itself (its bilinear filter is ``to_original``'s there, to float
    precision) and rounds it to bytes in C: no float array of the upload's size is made, which is
    what keeps a 12-megapixel overlay fast. Otherwise ``to_original``, then NumPy.
    """
    plane = np.clip(np.asarray(v255, dtype=np.float32), 0.0, 255.0)
    if geometry is None:
        return Image.fromarray(np.rint(plane).astype(np.uint8), "L")
    h, w = plane.shape
    size = (geometry.original_width, geometry.original_height)
    if geometry.resize == "stretch" and size[0] >= w and size[1] >= h:
        return Image.fromarray(plane, "F").resize(size, Image.Resampling.BILINEAR).convert("L")
    return Image.fromarray(np.rint(to_original(plane, geometry)).astype(np.uint8), "L")


# ------------------------------------------------------------------------------------------------
# colours
# ------------------------------------------------------------------------------------------------
def colour_layer(values: np.ndarray, colormap: str, signed: bool, geometry: Geometry | None) -> Image.Image:
    """Shown values (model resolution) coloured at the output's size: a palette image of the
    colormap (``P``: cheap to blend and to encode), or an RGB image for ``rgb`` ((3, H, W) values
    in [0, 1])."""
    if colormap == RGB:
        if values.ndim != 3:
            raise InvalidParameter("colormap=rgb needs a per-channel attribution", field="colormap")
        return Image.merge("RGB", [levels(c * 255.0, geometry) for c in values])
    table = lut(check_colormap(colormap))
    v = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    index = (v + 1.0) * 127.5 if signed else v * 255.0  # the table index, as ``render.indices``
    img = levels(index, geometry)
    img.putpalette(table.tobytes())  # L → P: the bytes are the table's indices
    return img


def picture(shown: Shown, colormap: str, geometry: Geometry | None) -> Image.Image:
    """The map alone, coloured, at the output's size (the ``png`` format)."""
    return colour_layer(shown.values, colormap, shown.signed, geometry)


def _weights(shown: Shown, alpha: float, geometry: Geometry | None) -> Image.Image:
    """``pixels``: each pixel's opacity (mode ``L``) from its shown value."""
    values = shown.values
    if shown.rgb:
        strength = np.abs(2.0 * values - 1.0).max(axis=0) if shown.signed else values.max(axis=0)
    else:
        strength = np.abs(values)
    return levels(np.clip(strength, 0.0, 1.0) * (255.0 * alpha), geometry)


def _grey(image: Image.Image, brightness: float) -> Image.Image:
    grey = image.convert("L")
    if brightness != 1.0:
        grey = grey.point([round(i * brightness) for i in range(256)])
    return grey.convert("RGB")


# ------------------------------------------------------------------------------------------------
# styles
# ------------------------------------------------------------------------------------------------
def draw(
    image: Image.Image,
    shown: Shown,
    *,
    style: str,
    colormap: str,
    alpha: float,
    keep: float,
    geometry: Geometry | None,
) -> Image.Image:
    """``shown`` drawn over ``image`` (RGB, at the output's size) in ``style``."""
    base = image.convert("RGB") if image.mode != "RGB" else image
    if base.size != output_size(shown, geometry):
        raise ValueError(f"the image is {base.size}, the output {output_size(shown, geometry)}")
    if style == "heatmap":
        colours = colour_layer(shown.values, colormap, shown.signed, geometry).convert("RGB")
        return Image.blend(base, colours, float(alpha))
    if style == "pixels":
        colours = colour_layer(shown.values, colormap, shown.signed, geometry).convert("RGB")
        return Image.composite(colours, _grey(base, PIXELS_BACKDROP), _weights(shown, alpha, geometry))
    if style == "outlines":
        return outlines(base, shown, colormap=colormap, alpha=alpha, keep=keep, geometry=geometry)
    if style == "mask":
        return masked(base, shown, alpha=alpha, keep=keep, geometry=geometry)
    raise InvalidParameter(f"style must be one of {', '.join(STYLES)} (got {style!r})", field="style")


def top_fraction(strength: np.ndarray, keep: float) -> np.ndarray:
    """Boolean mask of exactly round(keep · size) pixels holding the largest values; ties at the
    threshold are taken in raster order."""
    flat = np.asarray(strength, dtype=np.float32).ravel()
    n = flat.size
    k = min(n, max(0, round(keep * n)))
    out = np.zeros(n, dtype=bool)
    if k == 0:
        return out.reshape(strength.shape)
    threshold = np.partition(flat, n - k)[n - k]
    above = flat > threshold
    out |= above
    ties = np.flatnonzero(flat == threshold)[: k - int(above.sum())]
    out[ties] = True
    return out.reshape(strength.shape)


def masked(
    image: Image.Image, shown: Shown, *, alpha: float, keep: float, geometry: Geometry | None
) -> Image.Image:
    """``mask``: the image where the map is in its top ``keep`` fraction, covered elsewhere."""
    kept = top_fraction(to_size(shown.strength, geometry), keep)
    cover = image.point([round(i * (1.0 - alpha)) for i in range(256)] * 3)
    return Image.composite(image, cover, Image.fromarray(kept.astype(np.uint8) * 255, "L"))


def contours(level: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Closed contours (each (n, 2) of (row, col), first point = last) of {level ≥ threshold}:
    the map is padded by one pixel below the threshold, so regions touching the border close."""
    low = float(min(threshold, float(level.min()) if level.size else threshold)) - 1.0
    padded = np.pad(np.asarray(level, dtype=np.float64), 1, constant_values=low)
    found = find_contours(padded, threshold, fully_connected="high")  # type: ignore[no-untyped-call]
    return [c - 1.0 for c in found]


def outline_threshold(strength: np.ndarray, keep: float) -> float | None:
    """The level whose region holds the top ``keep`` fraction of the pixels (None: nothing)."""
    k = round(keep * strength.size)
    if k <= 0:
        return None
    flat = np.sort(strength, axis=None)
    return float(flat[strength.size - k])


def outlines(
    image: Image.Image,
    shown: Shown,
    *,
    colormap: str,
    alpha: float,
    keep: float,
    geometry: Geometry | None,
) -> Image.Image:
    """``outlines``: contours of the top ``keep`` region(s) over the image."""
    threshold = outline_threshold(shown.strength, keep)
    if threshold is None:
        return image.copy()
    table = lut("diverging" if colormap == RGB else colormap)
    hi, lo = tuple(int(c) for c in table[255]), tuple(int(c) for c in table[0])
    layers = [(shown.level, hi)]
    if shown.signed:
        layers.append((-shown.level, lo))
    out = image.copy()
    pen = ImageDraw.Draw(out)
    w, h = out.size
    width = max(2, round(max(w, h) / 250))
    for level, colour in layers:
        if float(level.max()) < threshold:
            continue
        for c in contours(level, threshold):
            pen.line(_points(c, level.shape, geometry), fill=colour, width=width, joint="curve")
    return Image.blend(image, out, float(alpha)) if alpha < 1.0 else out


def _points(c: np.ndarray, shape: tuple[int, ...], geometry: Geometry | None) -> list[tuple[float, float]]:
    """Contour (row, col) at the map's resolution → drawing coordinates at the output's."""
    rows, cols = c[:, 0], c[:, 1]
    if geometry is None:
        xs, ys = cols, rows
    else:
        h, w = shape
        left, top, right, bottom = geometry.crop_box
        xs = left + (cols + 0.5) * (right - left) / w - 0.5
        ys = top + (rows + 0.5) * (bottom - top) / h - 0.5
    return list(zip(xs.tolist(), ys.tolist(), strict=True))
