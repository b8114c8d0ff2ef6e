"""Images in, maps out: decoding uploads (limits, EXIF, colour modes), the geometry between the
upload and the model input, and rendering (colormaps, overlays, PNG, ``.npy``, JSON lists)."""

from service.imaging.decode import decode_image, decode_upload
from service.imaging.geometry import Geometry, preprocess, to_original
from service.imaging.options import MEDIA_TYPES, RenderParams
from service.imaging.render import (
    COLORMAPS,
    colorize,
    compare_grid,
    encode_png,
    heatmap_png,
    normalize,
    overlay_image,
    overlay_png,
    rounded,
    to_npy,
)

__all__ = [
    "COLORMAPS",
    "MEDIA_TYPES",
    "Geometry",
    "RenderParams",
    "colorize",
    "compare_grid",
    "decode_image",
    "decode_upload",
    "encode_png",
    "heatmap_png",
    "normalize",
    "overlay_image",
    "overlay_png",
    "preprocess",
    "rounded",
    "to_npy",
    "to_original",
]
