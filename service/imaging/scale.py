"""From a map's values to the values shown: polarity, smoothing, percentile clipping, RGB.

Everything here runs on the map at the model's input resolution (224² for the default model),
before the result is mapped back onto the upload, so its cost does not grow with the upload's size
and ``smooth``'s σ is in model-input pixels.

- **Polarity** picks what is shown: ``positive`` max(m, 0), ``negative`` max(−m, 0), ``absolute``
  |m|, ``both`` m itself (signed).
- **Clipping** takes the magnitude a (the map after polarity; |m| for ``both``), its percentiles
  lo = P(``clip_lower``) and hi = P(``clip_upper``), and shows v = clip((a − lo) / (hi − lo), 0, 1):
  values at or below lo are not shown, values at or above hi saturate. ``both`` keeps the sign
  (v in [−1, 1], zero in the middle of a diverging colormap) and, with ``clip_lower=0``, takes
  lo = 0: v = m / hi. With ``clip_lower=0`` and ``clip_upper=100`` this is min–max scaling of a
  (for ``both``: division by max |m|, the JSON's ``minmax`` of a signed map). When lo = hi (a constant map, or a sparse one
  whose percentiles are all zero) the values above lo show at full strength, the rest not at all.
  Percentiles are NumPy's (linear interpolation), of every pixel of the map.
- **RGB** (``colormap=rgb``) shows the per-channel attribution g (3, H, W) as an image, as the
  Deconvnet and Guided Backprop papers do: for ``both`` zero-centred per image (g − mean g),
  scaled so that P(``clip_upper``) of its magnitude reaches the ends and clipped, grey (0.5) for
  zero — the normalisation of the ``deprocess`` step of their visualisations, with a percentile
  instead of a multiple of the standard deviation; for the other polarities each channel's
  magnitude from black (nothing) to full colour.
- **Smoothing**: a Gaussian blur (scikit-image) of the map after polarity, before clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.filters import gaussian

from service.errors import InvalidParameter

POLARITIES = ("positive", "negative", "absolute", "both")


def apply_polarity(m: np.ndarray, polarity: str) -> np.ndarray:
    """float32 map after polarity: the part shown (magnitudes ≥ 0), or the signed map for ``both``."""
    a = np.nan_to_num(np.asarray(m, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if polarity == "positive":
        return np.maximum(a, 0.0)
    if polarity == "negative":
        return np.maximum(-a, 0.0)
    if polarity == "absolute":
        return np.abs(a)
    if polarity == "both":
        return a
    raise InvalidParameter(
        f"polarity must be one of {', '.join(POLARITIES)} (got {polarity!r})", field="polarity"
    )


def smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    """``m`` (H, W) or (C, H, W) blurred by a Gaussian of σ pixels per plane; σ = 0: unchanged."""
    if sigma <= 0:
        return m
    a = np.asarray(m, dtype=np.float32)
    channel_axis = 0 if a.ndim == 3 else None
    out: np.ndarray = gaussian(  # type: ignore[no-untyped-call]
        a, sigma=sigma, mode="nearest", preserve_range=True, channel_axis=channel_axis
    )
    return out.astype(np.float32, copy=False)


def clip_range(a: np.ndarray, lower: float, upper: float) -> tuple[float, float]:
    """(lo, hi): the ``lower`` and ``upper`` percentiles of the magnitudes ``a``."""
    if a.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(a, [lower, upper])
    return float(lo), float(hi)


def clip_scale(m: np.ndarray, lower: float, upper: float, *, signed: bool) -> np.ndarray:
    """v = clip((a − lo) / (hi − lo), 0, 1) with a = |m| (``signed``: the sign of m kept, v in
    [−1, 1]) or m (magnitudes ≥ 0, v in [0, 1]); lo, hi the ``lower``/``upper`` percentiles of a
    (``signed`` with ``lower`` 0: lo = 0)."""
    m = np.asarray(m, dtype=np.float32)
    a = np.abs(m) if signed else m
    lo, hi = clip_range(a, lower, upper)
    if signed and lower <= 0:
        lo = 0.0  # nothing hidden: zero stays zero, the scale is hi alone
    v = np.clip((a - lo) / (hi - lo), 0.0, 1.0) if hi > lo else (a > lo).astype(np.float32)
    v = v.astype(np.float32, copy=False)
    return np.copysign(v, m) if signed else v


def rgb_image(g: np.ndarray, polarity: str, lower: float, upper: float, sigma: float = 0.0) -> np.ndarray:
    """(3, H, W) attribution → (3, H, W) float32 RGB in [0, 1] (see the module docstring)."""
    a = smooth(apply_polarity(g, polarity), sigma)
    if polarity == "both":
        centred = a - np.float32(np.mean(a, dtype=np.float64))
        return 0.5 + 0.5 * clip_scale(centred, lower, upper, signed=True)
    return clip_scale(a, lower, upper, signed=False)


@dataclass(frozen=True)
class Shown:
    """A map made ready to draw, at the resolution it was computed at.

    ``values``: (H, W) in [0, 1] (in [−1, 1] when ``signed``), or (3, H, W) RGB in [0, 1] when
    ``rgb``. ``level``: (H, W), the map after polarity and smoothing, before clipping (signed when
    ``signed``): what ranks pixels for ``outlines`` and ``mask``, where clipping would tie the top.
    """

    values: np.ndarray
    level: np.ndarray
    signed: bool
    rgb: bool

    @property
    def strength(self) -> np.ndarray:
        """The magnitude that ranks pixels: |level| for signed maps."""
        return np.abs(self.level) if self.signed else self.level


def shown(
    m: np.ndarray,
    *,
    polarity: str,
    lower: float,
    upper: float,
    sigma: float = 0.0,
    channels: np.ndarray | None = None,
) -> Shown:
    """The map ``m`` (H, W) as shown: polarity, smoothing, clipping; with ``channels`` (3, H, W),
    the per-channel attribution as an RGB image instead (``m`` still ranks the pixels)."""
    a = smooth(apply_polarity(m, polarity), sigma)
    signed = polarity == "both"
    if channels is not None:
        return Shown(rgb_image(channels, polarity, lower, upper, sigma), a, signed, rgb=True)
    return Shown(clip_scale(a, lower, upper, signed=signed), a, signed, rgb=False)
