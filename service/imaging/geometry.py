"""From an uploaded image to the model's input tensor, and from a model-resolution map back.

Two resize modes:

- ``stretch``: the whole image is resized to the input's H×W (aspect ratio not kept), so the map
  covers all of the image.
- ``center_crop``: the image is scaled so that it covers H×W, then the centre is cropped. The
  map covers only the cropped box; mapped back, the uncovered border is zero, not stretched.

Resizing uses Pillow's bilinear filter, which widens its support when shrinking (antialiasing);
that is the preprocessing the default model's reference figures were measured with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ResizeMode = Literal["stretch", "center_crop"]


@dataclass(frozen=True)
class Geometry:
    """How an uploaded image was turned into the model's input.

    ``crop_box`` is ``(left, top, right, bottom)`` in the uploaded image's pixel coordinates
    (after EXIF orientation; floats, edges not centres): the region the model input shows.
    """

    original_width: int
    original_height: int
    input_height: int
    input_width: int
    resize: ResizeMode
    crop_box: tuple[float, float, float, float]

    @property
    def original_size(self) -> tuple[int, int]:
        """(height, width) of the uploaded image."""
        return self.original_height, self.original_width

    def scaled(self, width: int, height: int) -> Geometry:
        """The same mapping onto the upload shown at width×height (a compare panel)."""
        sx, sy = width / self.original_width, height / self.original_height
        left, top, right, bottom = self.crop_box
        return replace(
            self,
            original_width=width,
            original_height=height,
            crop_box=(left * sx, top * sy, right * sx, bottom * sy),
        )


def crop_box(
    width: int, height: int, out_h: int, out_w: int, resize: ResizeMode
) -> tuple[float, float, float, float]:
    """The region of a width×height image that the model input of out_h×out_w shows."""
    if resize == "stretch":
        return (0.0, 0.0, float(width), float(height))
    # scale so the image covers out_h×out_w, then take the centre: the box keeps the output's aspect
    scale = max(out_w / width, out_h / height)
    box_w, box_h = out_w / scale, out_h / scale
    left, top = (width - box_w) / 2.0, (height - box_h) / 2.0
    return (left, top, left + box_w, top + box_h)


def make_geometry(width: int, height: int, input_size: tuple[int, int, int], resize: ResizeMode) -> Geometry:
    _, h, w = input_size
    return Geometry(width, height, h, w, resize, crop_box(width, height, h, w, resize))


def preprocess(
    image: Image.Image,
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    resize: ResizeMode = "stretch",
) -> tuple[Tensor, Geometry]:
    """A normalised float32 (C, H, W) tensor of ``image`` and the geometry to map results back.

    ``image`` should be RGB (``decode_image`` returns RGB); one-channel models get luminance.
    """
    c, h, w = input_size
    geometry = make_geometry(image.width, image.height, input_size, resize)
    mode = "L" if c == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    box = None if resize == "stretch" else geometry.crop_box
    resized = image.resize((w, h), Image.Resampling.BILINEAR, box=box)
    arr = np.asarray(resized, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.transpose(2, 0, 1).copy())
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s, geometry


def _axis_weights(
    n_out: int, n_src: int, lo: float, hi: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling along one axis: output pixel i (centre i + ½) reads the source map that
    spans [lo, hi) with n_src cells (``align_corners=False``). Returns (i0, i1, w1, inside)."""
    centres = np.arange(n_out, dtype=np.float64) + 0.5
    inside = (centres >= lo) & (centres <= hi)
    u = (centres - lo) * (n_src / (hi - lo)) - 0.5
    u = np.clip(u, 0.0, n_src - 1)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_src - 1)
    return i0, i1, (u - i0).astype(np.float32), inside


#: output elements (channels × rows × width) mapped per block: bounds the temporaries of ``to_original``
BLOCK_ELEMENTS = 1 << 20


def to_original(m: np.ndarray | Tensor, geometry: Geometry) -> np.ndarray:
    """Map ``m`` (h, w) or (C, h, w), at model resolution, onto the uploaded image: float32
    (orig_h, orig_w) or (C, orig_h, orig_w). Bilinear; pixels outside the crop box are 0.

    Memory is the output plus a bounded block: the output's rows are made a block at a time
    (about ``BLOCK_ELEMENTS`` values), each from the two model rows it reads, interpolated first
    down the columns at the model's width, then along the row at the output's. No intermediate
    is as large as h × orig_w, which for a 1 000 000 × 8 upload would be gigabytes.
    """
    arr = m.detach().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m)
    arr = arr.astype(np.float32, copy=False)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected a map shaped (h, w) or (C, h, w), got {arr.shape}")
    c, h, w = arr.shape
    height, width = geometry.original_height, geometry.original_width
    left, top, right, bottom = geometry.crop_box
    x0, x1, wx, in_x = _axis_weights(width, w, left, right)
    y0, y1, wy, in_y = _axis_weights(height, h, top, bottom)
    ux = 1.0 - wx
    out = np.empty((c, height, width), dtype=np.float32)
    rows_per_block = max(1, BLOCK_ELEMENTS // max(1, c * max(width, w)))
    for r0 in range(0, height, rows_per_block):
        r1 = min(height, r0 + rows_per_block)
        ry = wy[r0:r1, None]
        rows = arr[:, y0[r0:r1], :] * (1.0 - ry) + arr[:, y1[r0:r1], :] * ry  # (C, b, w)
        block = out[:, r0:r1, :]
        np.multiply(rows[:, :, x0], ux, out=block)
        block += rows[:, :, x1] * wx
    if not in_x.all():
        out[:, :, ~in_x] = 0.0
    if not in_y.all():
        out[:, ~in_y, :] = 0.0
    return out[0] if squeeze else out
