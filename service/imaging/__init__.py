"""Images in, maps out: decoding uploads (limits, EXIF, colour modes), the geometry between the
upload and the model input, and rendering (colormaps, overlays, PNG, ``.npy``, JSON lists)."""

from service.imaging.decode import decode_image, decode_upload
from service.imaging.geometry import Geometry, preprocess, to_original
from service.imaging.render import (
    COLORMAPS,
    colorize,
    compare_grid,
    encode_png,
    heatmap_png,
    normalize,
    overlay_image,
    overlay_png,
    round_floats,
    to_npy,
)

__all__ = [
    "COLORMAPS",
    "Geometry",
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
    "round_floats",
    "to_npy",
    "to_original",
]
