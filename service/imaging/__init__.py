"""Images in, maps out: decoding uploads (limits, EXIF, colour modes), the geometry between the
upload and the model input, and rendering: values shown (``scale``: polarity, clipping,
smoothing, RGB), styles over the image (``styles``), colormaps, PNG, ``.npy`` and JSON lists
(``render``), the comparison grid (``grid``)."""

from service.imaging.decode import decode_image, decode_upload
from service.imaging.geometry import Geometry, preprocess, to_original
from service.imaging.grid import compare_grid
from service.imaging.options import MEDIA_TYPES, RenderParams
from service.imaging.render import (
    COLORMAPS,
    colorize,
    encode_png,
    normalize,
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
    "normalize",
    "preprocess",
    "rounded",
    "to_npy",
    "to_original",
]
