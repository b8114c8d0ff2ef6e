"""Imaging: decoding uploads (formats, modes, EXIF, limits, bad bytes), geometry, rendering."""

from __future__ import annotations

import io
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cmap import Colormap
from PIL import Image, ImageDraw

from service.errors import (
    CorruptImage,
    ImageTooLarge,
    ImageTooSmall,
    InvalidParameter,
    PayloadTooLarge,
    SaliencyError,
    UnsupportedImage,
)
from service.imaging import (
    COLORMAPS,
    colorize,
    decode_image,
    encode_png,
    normalize,
    preprocess,
    rounded,
    to_npy,
    to_original,
)
from service.imaging.geometry import make_geometry
from service.imaging.render import lut
from service.imaging.scale import shown
from service.imaging.styles import draw, picture

LIMITS = {"max_bytes": 5_000_000, "max_pixels": 4_000_000, "min_size": 4}


def decode(data: bytes, **overrides: object) -> Image.Image:
    kw = {**LIMITS, **overrides}
    return decode_image(data, **kw)  # type: ignore[arg-type]


def save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def pattern(w: int = 32, h: int = 24) -> Image.Image:
    """An RGB image whose pixels differ by position (so any flip, rotation or crop shows)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), np.full_like(xx, 77)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_exactly(fmt: str) -> None:
    src = pattern()
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out = decode(save(src, fmt, **kw))
    assert out.mode == "RGB" and out.size == src.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(src))


def test_jpeg_decodes_close_to_source() -> None:
    src = pattern()
    out = decode(save(src, "JPEG", quality=95))
    assert out.mode == "RGB" and out.size == src.size
    assert np.abs(np.asarray(out, dtype=int) - np.asarray(src, dtype=int)).mean() < 4


def test_gif_gives_first_frame() -> None:
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    data = save(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2  # type: ignore[attr-defined]
    out = decode(data)
    assert out.mode == "RGB" and out.getpixel((8, 8)) == (255, 0, 0)


def test_other_pillow_formats_are_unsupported() -> None:
    ppm = b"P6\n8 8\n255\n" + bytes(8 * 8 * 3)
    assert Image.open(io.BytesIO(ppm)).format == "PPM"  # Pillow could read it; we do not
    with pytest.raises(UnsupportedImage):
        decode(ppm)


# ------------------------------------------------------------------------------------------------
# colour modes
# ------------------------------------------------------------------------------------------------
def test_grey_and_bilevel_become_rgb() -> None:
    grey = Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1)), "L")
    out = np.asarray(decode(save(grey, "PNG")))
    assert out.shape == (8, 16, 3)
    np.testing.assert_array_equal(out[..., 0], np.asarray(grey))
    np.testing.assert_array_equal(out[..., 1], out[..., 2])
    bilevel = Image.new("1", (8, 8), 1)
    assert decode(save(bilevel, "PNG")).getpixel((3, 3)) == (255, 255, 255)


def test_rgba_is_composited_over_the_background() -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red channel
    arr[:, :4, 3] = 0  # left half transparent
    arr[:, 4:, 3] = 128  # right half half-opaque
    data = save(Image.fromarray(arr, "RGBA"), "PNG")
    white = np.asarray(decode(data))
    assert tuple(white[0, 0]) == (255, 255, 255)
    # 200·a + 255·(1 − a), a = 128/255
    a = 128 / 255
    expected_r = round(200 * a + 255 * (1 - a))
    assert abs(int(white[0, 6, 0]) - expected_r) <= 1 and abs(int(white[0, 6, 1]) - round(255 * (1 - a))) <= 1
    black = np.asarray(decode(data, background=(0, 0, 0)))
    assert tuple(black[0, 0]) == (0, 0, 0)
    assert abs(int(black[0, 6, 0]) - round(200 * a)) <= 1


def test_la_is_composited() -> None:
    arr = np.zeros((8, 8, 2), dtype=np.uint8)
    arr[..., 0] = 50
    arr[:, 4:, 1] = 255
    out = np.asarray(decode(save(Image.fromarray(arr, "LA"), "PNG"), background=(10, 20, 30)))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[0, 7]) == (50, 50, 50)


def test_palette_with_and_without_transparency() -> None:
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    ImageDraw.Draw(pal).rectangle((4, 0, 7, 7), fill=1)
    opaque = decode(save(pal, "PNG"))
    assert opaque.getpixel((0, 0)) == (255, 0, 0) and opaque.getpixel((6, 0)) == (0, 255, 0)
    out = decode(save(pal, "PNG", transparency=0), background=(1, 2, 3))
    assert out.getpixel((0, 0)) == (1, 2, 3) and out.getpixel((6, 0)) == (0, 255, 0)
    gif = decode(save(pal, "GIF", transparency=1), background=(9, 9, 9))
    assert gif.getpixel((6, 0)) == (9, 9, 9) and gif.getpixel((0, 0)) == (255, 0, 0)


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = save(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode(data)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((8, 8))  # type: ignore[misc]
    assert r > 240 and g < 15 and b < 15


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([0, 257, 1000, 32768, 65535], dtype=np.uint16)
    data = save(Image.fromarray(np.tile(values, (8, 1))), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    out = np.asarray(decode(data))[0, :, 0]
    np.testing.assert_array_equal(out, np.round(values / 65535 * 255).astype(np.uint8))  # 0 1 4 128 255


def test_sixteen_bit_rgb_png() -> None:
    # Pillow reads 48-bit RGB PNGs as 8-bit RGB; craft one by hand (value 0x8000 → 128)
    w = h = 4
    raw = b"".join(b"\x00" + struct.pack(">HHH", 0x8000, 0xFFFF, 0) * w for _ in range(h))
    data = _png(w, h, bit_depth=16, colour_type=2, idat=zlib.compress(raw))
    out = decode(data)
    assert out.getpixel((1, 1)) == (128, 255, 0)


def test_int32_and_float_tiffs() -> None:
    ints = np.array([[0, 1000, 40000, 65535]] * 4, dtype=np.int32)
    out = np.asarray(decode(save(Image.fromarray(ints, "I"), "TIFF")))[0, :, 0]
    np.testing.assert_array_equal(out, np.round(ints[0] / 65535 * 255).astype(np.uint8))
    floats = np.array([[0.0, 0.25, 0.5, 1.0]] * 4, dtype=np.float32)
    out = np.asarray(decode(save(Image.fromarray(floats, "F"), "TIFF")))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 64, 128, 255])


def test_exif_orientation_is_applied() -> None:
    src = Image.new("RGB", (40, 20), (0, 0, 0))
    ImageDraw.Draw(src).rectangle((0, 0, 9, 9), fill=(255, 255, 255))  # stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    data = save(src, "JPEG", quality=95, exif=exif.tobytes())
    out = decode(data)
    assert out.size == (20, 40)
    arr = np.asarray(out.convert("L"), dtype=int)
    assert arr[:10, 10:].mean() > 200  # the top-left block is now top-right
    assert arr[:10, :10].mean() < 50 and arr[30:, :].mean() < 50


# ------------------------------------------------------------------------------------------------
# limits and bad bytes
# ------------------------------------------------------------------------------------------------
def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(w: int, h: int, *, bit_depth: int = 8, colour_type: int = 2, idat: bytes | None = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    body = _chunk(b"IHDR", ihdr)
    if idat is not None:
        body += _chunk(b"IDAT", idat)
    return b"\x89PNG\r\n\x1a\n" + body + _chunk(b"IEND", b"")


def test_png_bomb_header_is_refused_before_decoding() -> None:
    bomb = _png(100_000, 100_000, idat=zlib.compress(b"\x00" * 1024))
    with pytest.raises(ImageTooLarge):
        decode(bomb)


def test_declared_pixels_over_our_limit_are_refused_without_decoding() -> None:
    # 3000×3000 is under Pillow's own guard; the file has no pixel data at all, so a decode
    # attempt would be CorruptImage: ImageTooLarge proves the header check came first
    with pytest.raises(ImageTooLarge, match="3000×3000"):
        decode(_png(3000, 3000), max_pixels=1_000_000)


def test_pillow_guard_stays_on() -> None:
    assert Image.MAX_IMAGE_PIXELS is not None
    with pytest.raises(ImageTooLarge):  # our limit above Pillow's: Pillow's guard answers
        decode(_png(20_000, 20_000), max_pixels=10**12)


def test_upload_bytes_over_the_limit() -> None:
    data = save(pattern(), "PNG")
    with pytest.raises(PayloadTooLarge) as info:
        decode(data, max_bytes=len(data) - 1)
    assert type(info.value) is PayloadTooLarge
    decode(data, max_bytes=len(data))


def test_truncated_jpeg_is_corrupt() -> None:
    data = save(pattern(64, 64), "JPEG", quality=90)
    with pytest.raises(CorruptImage):
        decode(data[: len(data) // 2])
    with pytest.raises(CorruptImage):
        decode(data[:12])  # the header itself cut


def test_truncated_png_is_corrupt() -> None:
    data = save(pattern(64, 64), "PNG")
    with pytest.raises(CorruptImage):
        decode(data[: len(data) // 2])


def test_text_is_unsupported_and_empty_is_corrupt() -> None:
    with pytest.raises(UnsupportedImage):
        decode(b"hello, this is not an image\n" * 10)
    with pytest.raises(UnsupportedImage):
        decode(b'{"image": "not base64"}')
    with pytest.raises(CorruptImage, match="empty"):
        decode(b"")


def test_tiny_images_are_refused() -> None:
    with pytest.raises(ImageTooSmall):
        decode(save(Image.new("RGB", (1, 1)), "PNG"))
    with pytest.raises(ImageTooSmall):
        decode(save(Image.new("RGB", (100, 3)), "PNG"))
    assert decode(save(Image.new("RGB", (4, 4)), "PNG")).size == (4, 4)


def test_broken_png_crc_is_corrupt() -> None:
    data = bytearray(save(pattern(16, 16), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 8] ^= 0xFF
    with pytest.raises(CorruptImage):
        decode(bytes(data))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"])
def test_mutated_bytes_never_raise_anything_else(fmt: str) -> None:
    """Random corruption of valid files: each outcome is an RGB image or a domain error."""
    rng = random.Random(1234)
    base = save(pattern(24, 24), fmt)
    for _ in range(60):
        data = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(1, len(data))]
        try:
            out = decode(bytes(data))
        except SaliencyError:
            continue
        assert out.mode == "RGB"


# ------------------------------------------------------------------------------------------------
# geometry
# ------------------------------------------------------------------------------------------------
def test_preprocess_normalises_per_channel() -> None:
    img = Image.new("RGB", (50, 30), (255, 0, 128))
    x, geo = preprocess(img, (3, 16, 24), (0.5, 0.5, 0.5), (0.5, 0.25, 0.5))
    assert x.dtype == torch.float32 and x.shape == (3, 16, 24)
    torch.testing.assert_close(x[0], torch.full((16, 24), 1.0))
    torch.testing.assert_close(x[1], torch.full((16, 24), -2.0))
    torch.testing.assert_close(x[2], torch.full((16, 24), (128 / 255 - 0.5) / 0.5))
    assert geo.crop_box == (0.0, 0.0, 50.0, 30.0) and geo.original_size == (30, 50)


def test_preprocess_grey_model() -> None:
    x, _ = preprocess(Image.new("RGB", (20, 20), (255, 255, 255)), (1, 8, 8), (0.0,), (1.0,))
    assert x.shape == (1, 8, 8)
    torch.testing.assert_close(x, torch.ones(1, 8, 8))


def test_stretch_resize_is_pillow_bilinear() -> None:
    img = pattern(90, 60)
    x, _ = preprocess(img, (3, 30, 45), (0.0,) * 3, (1.0,) * 3)
    ref = np.asarray(img.resize((45, 30), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-6)


def test_center_crop_shows_only_the_centre() -> None:
    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)
    arr[:, 100:200] = (0, 255, 0)
    arr[:, 200:] = (0, 0, 255)
    x, geo = preprocess(Image.fromarray(arr), (3, 50, 50), (0.0,) * 3, (1.0,) * 3, "center_crop")
    assert geo.crop_box == (100.0, 0.0, 200.0, 100.0)
    # away from the seams (bilinear reads ±1 source pixel) only green shows
    torch.testing.assert_close(x[:, :, 1:-1], torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 50, 48))


def test_center_crop_box_for_tall_images_and_wide_inputs() -> None:
    geo = make_geometry(100, 400, (3, 50, 100), "center_crop")
    # scale = max(100/100, 50/400) = 1: the box is 100 wide, 50 tall, centred vertically
    assert geo.crop_box == (0.0, 175.0, 100.0, 225.0)


def test_to_original_stretch_matches_bilinear_upsampling() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((7, 9)).astype(np.float32)
    geo = make_geometry(40, 21, (3, 7, 9), "stretch")
    out = to_original(m, geo)
    ref = F.interpolate(torch.from_numpy(m)[None, None], size=(21, 40), mode="bilinear", align_corners=False)
    assert out.dtype == np.float32 and out.shape == (21, 40)
    np.testing.assert_allclose(out, ref[0, 0].numpy(), atol=1e-5)


def test_to_original_center_crop_border_is_zero() -> None:
    rng = np.random.default_rng(1)
    m = rng.random((10, 10)).astype(np.float32) + 1.0  # strictly positive everywhere
    geo = make_geometry(300, 100, (3, 10, 10), "center_crop")
    out = to_original(torch.from_numpy(m), geo)
    assert out.shape == (100, 300)
    assert (out[:, :100] == 0).all() and (out[:, 200:] == 0).all()
    ref = F.interpolate(
        torch.from_numpy(m)[None, None], size=(100, 100), mode="bilinear", align_corners=False
    )
    np.testing.assert_allclose(out[:, 100:200], ref[0, 0].numpy(), atol=1e-5)


def test_to_original_accepts_channels() -> None:
    m = np.stack([np.full((4, 4), v, dtype=np.float32) for v in (1.0, 2.0, 3.0)])
    out = to_original(m, make_geometry(12, 8, (3, 4, 4), "stretch"))
    assert out.shape == (3, 8, 12)
    np.testing.assert_allclose(out[:, 3, 5], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError):
        to_original(np.zeros((1, 2, 3, 4)), make_geometry(12, 8, (3, 4, 4), "stretch"))


@pytest.mark.parametrize("resize", ["stretch", "center_crop"])
def test_round_trip_puts_a_dot_back_where_it_was(resize: str) -> None:
    w, h, dot = 200, 120, (130, 50)  # (x, y) inside the centre crop too
    img = Image.new("RGB", (w, h))
    ImageDraw.Draw(img).ellipse((dot[0] - 3, dot[1] - 3, dot[0] + 3, dot[1] + 3), fill=(255, 255, 255))
    x, geo = preprocess(img, (3, 40, 40), (0.0,) * 3, (1.0,) * 3, resize)  # type: ignore[arg-type]
    back = to_original(x[0], geo)
    y_peak, x_peak = np.unravel_index(np.argmax(back), back.shape)
    assert abs(x_peak - dot[0]) <= 4 and abs(y_peak - dot[1]) <= 4


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------
def test_normalize() -> None:
    m = np.array([[1.0, 3.0], [5.0, 2.0]])
    np.testing.assert_allclose(normalize(m, "minmax", signed=False), [[0.0, 0.5], [1.0, 0.25]])
    s = np.array([[-2.0, 1.0], [0.0, 4.0]])
    np.testing.assert_allclose(normalize(s, "minmax", signed=True), [[-0.5, 0.25], [0.0, 1.0]])
    np.testing.assert_array_equal(normalize(s, "none", signed=True), s.astype(np.float32))
    for signed in (False, True):
        z = normalize(np.full((3, 3), 7.0), "minmax", signed=signed)
        assert not np.isnan(z).any() and (z == (0.0 if not signed else 1.0)).all()
        zero = normalize(np.zeros((3, 3)), "minmax", signed=signed)
        assert (zero == 0).all() and not np.isnan(zero).any()
    assert (normalize(np.full((2, 2), 7.0), "minmax", signed=False) == 0).all()
    with_nan = normalize(np.array([np.nan, 1.0, 3.0]), "minmax", signed=False)
    np.testing.assert_allclose(with_nan, [0.0, 1 / 3, 1.0])


def _cmap_rgb(name: str, x: float) -> tuple[int, ...]:
    rgba = Colormap(name).lut(256)[round(x * 255)]
    return tuple(round(float(v) * 255) for v in rgba[:3])


@pytest.mark.parametrize(
    "name,catalog",
    [
        ("jet", "matlab:jet"),
        ("turbo", "google:turbo"),
        ("viridis", "bids:viridis"),
        ("inferno", "bids:inferno"),
        ("magma", "bids:magma"),
        ("gray", "matlab:gray"),
    ],
)
def test_colormap_endpoints_match_cmap(name: str, catalog: str) -> None:
    out = colorize(np.array([[0.0, 0.5, 1.0]]), name, signed=False)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert tuple(out[0, 0]) == _cmap_rgb(catalog, 0.0)
    assert tuple(out[0, 2]) == _cmap_rgb(catalog, 1.0)
    assert tuple(lut(name)[128]) == _cmap_rgb(catalog, 128 / 255)


def test_documented_endpoints() -> None:
    assert tuple(colorize(np.array([0.0, 1.0]), "gray")[0]) == (0, 0, 0)
    assert tuple(colorize(np.array([0.0, 1.0]), "gray")[1]) == (255, 255, 255)
    jet = colorize(np.array([0.0, 1.0]), "jet")
    assert tuple(jet[0]) == (0, 0, 128) and tuple(jet[1]) == (128, 0, 0)  # dark blue → dark red


def test_diverging_is_centred_at_zero() -> None:
    out = colorize(np.array([-1.0, 0.0, 1.0]), "diverging", signed=True)
    assert tuple(out[0]) == _cmap_rgb("colorbrewer:RdBu_r", 0.0)
    assert tuple(out[2]) == _cmap_rgb("colorbrewer:RdBu_r", 1.0)
    assert out[0, 2] > out[0, 0]  # negative: blue
    assert out[2, 0] > out[2, 2]  # positive: red
    assert min(out[1]) > 240  # zero: (near) white
    assert set(COLORMAPS) == {"jet", "turbo", "viridis", "inferno", "magma", "gray", "diverging", "rgb"}


def test_unknown_colormap() -> None:
    with pytest.raises(InvalidParameter, match="viridis"):
        colorize(np.zeros((2, 2)), "rainbow")


def test_picture_round_trip() -> None:
    """The map alone, unclipped: min-max scaled (max |m| for both) into the colormap, as a PNG."""
    m = np.arange(12, dtype=np.float32).reshape(3, 4)
    png = encode_png(picture(shown(m, polarity="positive", lower=0.0, upper=100.0), "viridis", None))
    decoded = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    np.testing.assert_array_equal(decoded, colorize(normalize(m, "minmax", False), "viridis"))
    s = shown(np.array([[-1.0, 0.0, 2.0]]), polarity="both", lower=0.0, upper=100.0)
    px = np.asarray(Image.open(io.BytesIO(encode_png(picture(s, "diverging", None)))).convert("RGB"))
    np.testing.assert_array_equal(px[0], colorize(np.array([-0.5, 0.0, 1.0]), "diverging", signed=True))


def test_overlay_blends_with_alpha() -> None:
    img = Image.new("RGB", (6, 4), (100, 100, 100))
    m = np.tile(np.linspace(0, 1, 6, dtype=np.float32), (4, 1))
    heat = colorize(m, "jet").astype(int)
    s = shown(m, polarity="positive", lower=0.0, upper=100.0)
    for alpha in (0.0, 0.3, 1.0):
        out = draw(img, s, style="heatmap", colormap="jet", alpha=alpha, keep=0.2, geometry=None)
        expected = np.round(100 * (1 - alpha) + heat * alpha)
        assert np.abs(np.asarray(out, dtype=int) - expected).max() <= 1


def test_encode_png_is_lossless() -> None:
    arr = np.random.default_rng(2).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(arr)))), arr)
    grey = arr[..., 0]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(grey)))), grey)
    img = pattern()
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(img)))), np.asarray(img))


def test_npy_and_json_floats() -> None:
    arr = np.linspace(-1, 1, 24, dtype=np.float64).reshape(2, 3, 4)
    back = np.load(io.BytesIO(to_npy(arr)), allow_pickle=False)
    assert back.dtype == np.float32 and back.shape == (2, 3, 4)
    np.testing.assert_allclose(back, arr, rtol=1e-6)
    # JSON values: ~5 significant digits of the peak, in float64 (no float32 noise); NaN, ±inf → 0
    values = rounded(np.array([[np.float32(0.1234567), np.float32(1 / 3)]], dtype=np.float32))
    assert values.tolist() == [[0.12346, 0.33333]]
    assert rounded(np.array([np.nan, np.inf, 2.0])).tolist() == [0.0, 0.0, 2.0]
    assert isinstance(rounded(np.float32(0.5)).item(), float)
