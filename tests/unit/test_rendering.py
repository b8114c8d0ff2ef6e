"""Rendering: polarity, percentile clipping, smoothing, RGB gradients, styles, per-method defaults
and the comparison grid, on hand-made maps whose answers are known."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.errors import InvalidParameter
from service.explainers import all_methods, get_method
from service.imaging.geometry import make_geometry, to_original
from service.imaging.grid import BAR_W, PAD, Key, Row, compare_grid, keys, meaning, tile_size
from service.imaging.options import METHOD_DEFAULTS, STYLE_ALPHA, RenderParams
from service.imaging.render import lut
from service.imaging.scale import apply_polarity, clip_scale, rgb_image, shown, smooth
from service.imaging.styles import PIXELS_BACKDROP, contours, draw, outline_threshold, picture, top_fraction


def render(**given: object) -> RenderParams:
    return RenderParams(**given).resolve(get_method("gradcam").rendering)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# polarity and clipping
# ------------------------------------------------------------------------------------------------
def test_polarity() -> None:
    m = np.array([[-3.0, -1.0, 0.0, 2.0, 4.0]])
    np.testing.assert_array_equal(apply_polarity(m, "positive"), [[0, 0, 0, 2, 4]])
    np.testing.assert_array_equal(apply_polarity(m, "negative"), [[3, 1, 0, 0, 0]])
    np.testing.assert_array_equal(apply_polarity(m, "absolute"), [[3, 1, 0, 2, 4]])
    np.testing.assert_array_equal(apply_polarity(m, "both"), m)
    with pytest.raises(InvalidParameter):
        apply_polarity(m, "sideways")
    # both: signed, zero in the middle, scaled by the largest magnitude when unclipped
    both = shown(m, polarity="both", lower=0.0, upper=100.0)
    assert both.signed
    np.testing.assert_allclose(both.values, [[-0.75, -0.25, 0.0, 0.5, 1.0]])


def test_percentile_clipping_of_a_ramp() -> None:
    """0 … 100: percentile k is k, so clipping at 10 and 90 maps v = (m − 10) / 80 into [0, 1]."""
    m = np.arange(101, dtype=np.float32)[None]
    v = clip_scale(m, 10.0, 90.0, signed=False)
    np.testing.assert_allclose(v[0, [0, 5, 10, 30, 50, 90, 100]], [0, 0, 0, 0.25, 0.5, 1, 1], atol=1e-6)
    # unclipped: min–max
    np.testing.assert_allclose(clip_scale(m, 0.0, 100.0, signed=False), m / 100.0, atol=1e-6)


def test_clipping_uses_percentiles_of_the_map_after_polarity() -> None:
    """−50 … 50, positive part: 51 zeros then 1 … 50, so its 90th percentile is 40 (the signed map's
    would be 40 too by chance of symmetry, its absolute value's 45: each polarity its own)."""
    m = np.arange(-50, 51, dtype=np.float32)[None]
    pos = shown(m, polarity="positive", lower=0.0, upper=90.0).values[0]
    assert pos[50 + 20] == pytest.approx(0.5) and pos[50 + 40] == 1.0 and pos[50 + 50] == 1.0
    assert (pos[:51] == 0).all()
    neg = shown(m, polarity="negative", lower=0.0, upper=90.0).values[0]
    assert neg[50 - 20] == pytest.approx(0.5) and (neg[51:] == 0).all()
    absolute = shown(m, polarity="absolute", lower=0.0, upper=90.0).values[0]
    assert absolute[50 + 45] == 1.0 and absolute[50 + 9] == pytest.approx(9 / 45)
    both = shown(m, polarity="both", lower=0.0, upper=90.0).values[0]
    assert both[50 - 45] == -1.0 and both[50 + 9] == pytest.approx(9 / 45) and both[50] == 0.0
    # a lower clip hides the weak values of each sign
    hidden = shown(m, polarity="both", lower=20.0, upper=90.0).values[0]  # |m|: P20 = 10, P90 = 45
    assert (hidden[50 - 10 : 50 + 11] == 0).all() and hidden[50 + 27] == pytest.approx(17 / 35)


def test_degenerate_maps() -> None:
    assert (clip_scale(np.full((4, 4), 3.0), 0.0, 99.0, signed=False) == 0).all()
    sparse = np.zeros((10, 10), dtype=np.float32)
    sparse[2, 3], sparse[7, 7] = 5.0, 1.0  # 98 % zeros: P0 = P90 = 0
    v = clip_scale(sparse, 0.0, 90.0, signed=False)
    assert v[2, 3] == 1.0 and v[7, 7] == 1.0 and v.sum() == 2.0  # what is there shows, fully
    assert (clip_scale(np.zeros((3, 3)), 0.0, 100.0, signed=True) == 0).all()


def test_smooth_is_a_gaussian_in_map_pixels() -> None:
    delta = np.zeros((41, 41), dtype=np.float32)
    delta[20, 20] = 1.0
    out = smooth(delta, 2.0)
    assert out.sum() == pytest.approx(1.0, rel=1e-3)
    assert out[20, 20] == pytest.approx(1 / (2 * np.pi * 4), rel=0.02)
    assert out[20, 22] / out[20, 20] == pytest.approx(np.exp(-4 / 8), rel=0.02)
    assert smooth(delta, 0.0) is delta


# ------------------------------------------------------------------------------------------------
# RGB: the gradient as an image (Deconvnet, Guided Backprop)
# ------------------------------------------------------------------------------------------------
def hand_made_gradient() -> np.ndarray:
    """3×10×10, an offset of 2 plus ±1 everywhere (as many + as −) and two outliers at ±3."""
    rng = np.random.default_rng(0)
    signs = np.array([1.0, -1.0] * 150)
    rng.shuffle(signs)
    c = signs.reshape(3, 10, 10)
    c[0, 0, 0], c[2, 9, 9] = 3.0, -3.0
    return (c + 2.0).astype(np.float32)


def test_rgb_is_the_papers_normalisation() -> None:
    """Zero-centred per image (the offset 2 goes), scaled so the 98th percentile of |g − mean|
    (here 1) reaches the ends, clipped, 0 at grey: ±1 → 1 or 0, the outliers clipped."""
    g = hand_made_gradient()
    out = rgb_image(g, "both", 0.0, 98.0)
    centred = g - g.mean()
    assert g.mean() == pytest.approx(2.0)
    expected = np.clip(0.5 + 0.5 * centred / 1.0, 0.0, 1.0)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 0, 0] == 1.0 and out[2, 9, 9] == 0.0
    assert set(np.unique(out).tolist()) == {0.0, 1.0}
    # unclipped: the outliers set the scale (±3 → the ends, ±1 → 0.5 ± 1/6)
    wide = rgb_image(g, "both", 0.0, 100.0)
    assert wide[0, 0, 0] == 1.0 and wide[1, 5, 5] == pytest.approx(0.5 + 0.5 * (g[1, 5, 5] - 2.0) / 3.0)
    # as a PNG: the values × 255, one colour channel per gradient channel
    s = shown(g.sum(axis=0), polarity="both", lower=0.0, upper=98.0, channels=g)
    png = np.asarray(picture(s, "rgb", None))
    np.testing.assert_array_equal(png, np.rint(out.transpose(1, 2, 0) * 255).astype(np.uint8))


def test_rgb_positive_starts_at_black() -> None:
    g = np.zeros((3, 4, 4), dtype=np.float32)
    g[1, 2, 2] = 4.0
    g[0, 0, 0] = -4.0
    out = rgb_image(g, "positive", 0.0, 100.0)
    assert out[1, 2, 2] == 1.0 and out.sum() == 1.0


# ------------------------------------------------------------------------------------------------
# styles
# ------------------------------------------------------------------------------------------------
def photo(w: int = 40, h: int = 30) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(40, 216, (h, w, 3), dtype=np.uint8), "RGB")


def test_heatmap_style_blends() -> None:
    img = photo()
    m = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    s = shown(m, polarity="positive", lower=0.0, upper=100.0)
    out = np.asarray(
        draw(img, s, style="heatmap", colormap="jet", alpha=0.3, keep=0.2, geometry=None), dtype=int
    )
    colours = np.asarray(picture(s, "jet", None).convert("RGB"), dtype=int)
    expected = np.round(0.7 * np.asarray(img, dtype=int) + 0.3 * colours)
    assert np.abs(out - expected).max() <= 1


def test_pixels_style_colours_only_the_attribution() -> None:
    img = photo()
    m = np.zeros((30, 40), dtype=np.float32)
    m[10, 10], m[20, 30] = 1.0, 0.5
    s = shown(m, polarity="positive", lower=0.0, upper=100.0)
    out = np.asarray(draw(img, s, style="pixels", colormap="inferno", alpha=1.0, keep=0.2, geometry=None))
    grey = np.asarray(img.convert("L"), dtype=np.float64) * PIXELS_BACKDROP
    untouched = np.ones((30, 40), dtype=bool)
    untouched[10, 10] = untouched[20, 30] = False
    assert np.abs(out[untouched].astype(float) - np.round(grey)[untouched, None]).max() <= 1
    assert tuple(out[10, 10]) == tuple(lut("inferno")[255])  # full strength: the colour itself
    half = 0.5 * lut("inferno")[128].astype(float) + 0.5 * grey[20, 30]
    assert np.abs(out[20, 30] - half).max() <= 1.5  # half strength: half-way over the grey


def planted_blob(
    size: int = 64, centre: tuple[float, float] = (30.0, 24.0), spread: float = 6.0
) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * spread**2)).astype(np.float32)


def test_outlines_close_around_a_planted_blob() -> None:
    blob = planted_blob()
    keep = 0.05
    t = outline_threshold(blob, keep)
    assert t is not None
    assert (blob > t).sum() < round(keep * blob.size) <= (blob >= t).sum()  # a symmetric blob ties
    [c] = contours(blob, t)
    np.testing.assert_allclose(c[0], c[-1])  # closed
    radius = np.sqrt(-2 * 36 * np.log(t))  # where the Gaussian equals the threshold
    dist = np.hypot(c[:, 0] - 30.0, c[:, 1] - 24.0)
    assert np.abs(dist - radius).max() < 0.5
    # a region cut by the border closes along it (the map is padded below the threshold)
    [edge] = contours(planted_blob(centre=(2.0, 24.0)), t)
    np.testing.assert_allclose(edge[0], edge[-1])
    # drawn over an image: coloured pixels on the circle, none at the centre nor far away
    img = Image.new("RGB", (64, 64), (128, 128, 128))
    s = shown(blob, polarity="positive", lower=0.0, upper=100.0)
    out = np.asarray(draw(img, s, style="outlines", colormap="jet", alpha=1.0, keep=keep, geometry=None))
    changed = (out != 128).any(axis=-1)
    yy, xx = np.nonzero(changed)
    ring = np.hypot(yy - 30.0, xx - 24.0)
    assert changed.sum() > 2 * np.pi * radius  # a line all round
    assert ring.min() > radius - 2.5 and ring.max() < radius + 2.5
    assert (out[changed] == lut("jet")[255]).all()


def test_outlines_follow_the_geometry() -> None:
    """A blob on a 64² map drawn on a 160×100 upload lands where the map maps it (stretch)."""
    blob = planted_blob(centre=(32.0, 16.0))
    g = make_geometry(160, 100, (3, 64, 64), "stretch")
    s = shown(blob, polarity="positive", lower=0.0, upper=100.0)
    img = Image.new("RGB", (160, 100), (128, 128, 128))
    out = np.asarray(draw(img, s, style="outlines", colormap="jet", alpha=1.0, keep=0.05, geometry=g))
    yy, xx = np.nonzero((out != 128).any(axis=-1))
    assert abs(xx.mean() - (16.5 * 160 / 64 - 0.5)) < 1.5 and abs(yy.mean() - (32.5 * 100 / 64 - 0.5)) < 1.5


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_mask_keeps_exactly_the_top_fraction(keep: float) -> None:
    rng = np.random.default_rng(3)
    m = rng.integers(0, 10, (37, 53)).astype(np.float32)  # many ties
    kept = top_fraction(m, keep)
    k = round(keep * m.size)
    assert kept.sum() == k
    if 0 < k < m.size:
        assert m[kept].min() >= m[~kept].max()
        # ties at the threshold are taken in raster order
        t = m[kept].min()
        tied = np.flatnonzero(m.ravel() == t)
        chosen = np.flatnonzero(kept.ravel() & (m.ravel() == t))
        np.testing.assert_array_equal(chosen, tied[: chosen.size])
    img = Image.new("RGB", (53, 37), (200, 100, 50))
    s = shown(m, polarity="positive", lower=0.0, upper=100.0)
    out = np.asarray(draw(img, s, style="mask", colormap="jet", alpha=1.0, keep=keep, geometry=None))
    assert (out == (200, 100, 50)).all(axis=-1).sum() == k
    assert (out == 0).all(axis=-1).sum() == m.size - k
    half = np.asarray(draw(img, s, style="mask", colormap="jet", alpha=0.5, keep=keep, geometry=None))
    assert (half == (100, 50, 25)).all(axis=-1).sum() == m.size - k


def test_mask_counts_pixels_at_the_output_resolution() -> None:
    blob = planted_blob()
    g = make_geometry(300, 200, (3, 64, 64), "stretch")
    s = shown(blob, polarity="positive", lower=0.0, upper=100.0)
    img = Image.new("RGB", (300, 200), (255, 255, 255))
    out = np.asarray(draw(img, s, style="mask", colormap="jet", alpha=1.0, keep=0.1, geometry=g))
    assert (out == 255).all(axis=-1).sum() == round(0.1 * 300 * 200)
    ys, xs = np.nonzero((out == 255).all(axis=-1))
    assert abs(xs.mean() - 24.5 * 300 / 64) < 2 and abs(ys.mean() - 30.5 * 200 / 64) < 2


def test_picture_at_the_output_size_is_the_upsampled_values() -> None:
    blob = planted_blob()
    g = make_geometry(100, 80, (3, 64, 64), "center_crop")
    s = shown(blob, polarity="positive", lower=0.0, upper=100.0)
    out = np.asarray(picture(s, "gray", g).convert("L"), dtype=float)
    expected = to_original(s.values, g) * 255
    assert np.abs(out - expected).max() <= 1.0


def test_rgb_needs_channels() -> None:
    s = shown(planted_blob(), polarity="both", lower=0.0, upper=100.0)
    with pytest.raises(InvalidParameter):
        picture(s, "rgb", None)


# ------------------------------------------------------------------------------------------------
# per-method defaults
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [m.name for m in all_methods()])
def test_every_method_declares_complete_valid_rendering_defaults(method: str) -> None:
    declared = get_method(method).rendering
    assert set(declared) <= set(METHOD_DEFAULTS)
    assert declared["colormap"] != "diverging"  # both → diverging is the resolver's rule
    resolved = RenderParams().resolve(declared)
    assert resolved.resolved
    for name, value in declared.items():
        assert getattr(resolved, name) == value or name == "colormap"
    assert resolved.alpha == declared.get("alpha", STYLE_ALPHA[str(declared["style"])])


def test_resolve_given_values_win_and_colormap_follows_polarity() -> None:
    ig = get_method("integrated_gradients").rendering
    assert RenderParams().resolve(ig).colormap == ig["colormap"]
    assert RenderParams(polarity="both").resolve(ig).colormap == "diverging"
    assert RenderParams(polarity="both", colormap="magma").resolve(ig).colormap == "magma"
    gbp = get_method("guided_backprop").rendering
    assert RenderParams(polarity="absolute").resolve(gbp).colormap == "rgb"
    r = RenderParams(clip_upper=95.0, style="outlines").resolve(ig)
    assert (r.clip_upper, r.style, r.alpha, r.clip_lower) == (95.0, "outlines", 1.0, 0.0)
    assert render(style="heatmap").alpha == 0.5 and render(alpha=0.2).alpha == 0.2
    # the echo shows the resolved values
    echo = RenderParams().resolve(ig).echo(fmt="json")
    assert echo["polarity"] == "positive" and echo["clip_upper"] == ig["clip_upper"]


def test_resolve_refuses_an_empty_clipping_range() -> None:
    with pytest.raises(InvalidParameter) as info:
        RenderParams(clip_lower=99.5).resolve(get_method("integrated_gradients").rendering)
    assert info.value.field == "clip_lower"
    with pytest.raises(InvalidParameter) as info:
        RenderParams(clip_upper=0.0).resolve(get_method("gradcam").rendering)
    assert info.value.field == "clip_upper"
    with pytest.raises(ValueError):
        RenderParams().resolve({"resolution": "model"})  # not a per-method parameter


@pytest.mark.parametrize(
    "bad", [{"clip_upper": 101.0}, {"clip_lower": -1.0}, {"smooth": 100.0}, {"keep": 1.5}, {"polarity": "up"}]
)
def test_bounds(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidParameter) as info:
        RenderParams(**bad)  # type: ignore[arg-type]
    assert info.value.field == next(iter(bad))


# ------------------------------------------------------------------------------------------------
# the comparison grid
# ------------------------------------------------------------------------------------------------
def test_tile_size_keeps_the_aspect_ratio() -> None:
    assert tile_size(600, 400) == (224, 149) and tile_size(400, 600) == (149, 224)


def test_legend_groups_methods_by_scale() -> None:
    renders = [
        (m, RenderParams().resolve(get_method(m).rendering)) for m in ("gradcam", "saliency", "layercam")
    ]
    [cam, sal] = keys(renders)
    assert cam.methods == ("gradcam", "layercam") and sal.methods == ("saliency",)
    assert "min-max" in meaning(cam) and "99th percentile" in meaning(sal)


def test_compare_grid_layout_labels_and_bars() -> None:
    tw, th = 120, 80
    colours = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]
    rows = [Row(f"target {i}", [Image.new("RGB", (tw, th), c) for c in colours]) for i in range(2)]
    legend = [Key(render(), ("gradcam",))]
    out = Image.open(io.BytesIO(compare_grid(["input", "a", "b"], rows, legend, "caption")))
    grid = np.asarray(out.convert("RGB"), dtype=int)
    title_h = 28
    assert out.width == max(560, PAD + 3 * (tw + PAD))
    for r in range(2):
        y0 = PAD + title_h + r * (title_h + th + PAD) + title_h
        for j, colour in enumerate(colours):
            assert tuple(grid[y0 + th // 2, PAD + j * (tw + PAD) + tw // 2]) == colour
        band = grid[y0 - title_h : y0, PAD : PAD + 200]
        assert ((band.sum(axis=-1) < 200).sum()) > 30  # the row's label
    # the legend's bar under the grid: jet from blue to red
    y_bar = PAD + title_h + 2 * (title_h + th + PAD) + 4
    left, right = grid[y_bar, PAD + 1], grid[y_bar, PAD + BAR_W - 2]
    assert left[2] > 100 and left[0] < 30 and right[0] > 100 and right[2] < 30
