"""The side-by-side comparison: one labelled grid, a legend of its colour scales, a caption.

Layout, top to bottom: the column titles (``input``, then one method per column); one row per
target, each under a band naming the class and its probability; under the grid one colour bar per
distinct scale the panels use, each with its ends labelled and a line saying what the colours
mean and which methods use it; then a caption (model, image size). Every panel has the upload's
aspect ratio, ``TILE`` pixels on its long side. Text is Pillow's own font (``load_default``), so
it sticks to characters that font has (ASCII and a few more: no dashes, minus or times signs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from service.imaging.options import RenderParams
from service.imaging.render import encode_png, lut

TILE = 224  # longest side of one panel, pixels
LABEL_PX = 18  # font size of titles and row labels
TEXT_PX = 14  # font size of the legend and the caption
PAD = 8
BAR_W, BAR_H = 180, 14
MIN_WIDTH = 560  # the legend needs some room even when the grid is narrow

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@lru_cache(maxsize=4)
def font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, AttributeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def tile_size(width: int, height: int, tile: int = TILE) -> tuple[int, int]:
    """A panel's (width, height): the upload's aspect ratio, ``tile`` on the long side."""
    scale = tile / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


# ------------------------------------------------------------------------------------------------
# the legend: what each colour scale means
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Key:
    """One entry of the legend: a scale (resolved rendering parameters) and its methods."""

    render: RenderParams
    methods: tuple[str, ...]


def keys(renders: Sequence[tuple[str, RenderParams]]) -> list[Key]:
    """The distinct scales among (method, resolved parameters), in order of first use."""
    groups: dict[tuple[object, ...], list[str]] = {}
    first: dict[tuple[object, ...], RenderParams] = {}
    for method, r in renders:
        scale = (r.colormap, r.polarity, r.clip_lower, r.clip_upper, r.style, r.keep, r.smooth)
        groups.setdefault(scale, []).append(method)
        first.setdefault(scale, r)
    return [Key(first[s], tuple(ms)) for s, ms in groups.items()]


def _percentile(p: float, end: str) -> str:
    if (end == "low" and p <= 0) or (end == "high" and p >= 100):
        return "min" if end == "low" else "max"
    return f"P{p:g}"


def ends(r: RenderParams) -> tuple[str, str, str]:
    """The labels under a bar: left end, middle ('' if none), right end."""
    assert r.clip_lower is not None and r.clip_upper is not None
    low, high = _percentile(r.clip_lower, "low"), _percentile(r.clip_upper, "high")
    if r.polarity == "both":
        return f"-{high}", "0", f"+{high}"
    return low, "", high


def meaning(key: Key) -> str:
    """One sentence: what the colours of this scale say, and which methods use it."""
    r = key.render
    assert r.clip_lower is not None and r.clip_upper is not None
    what = {
        "positive": "the map's positive part",
        "negative": "the map's negative part (as magnitudes)",
        "absolute": "|map|",
        "both": "the signed map (blue < 0 < red)",
    }[str(r.polarity)]
    low = "min" if r.clip_lower <= 0 else f"{r.clip_lower:g}th percentile (below: hidden)"
    high = "max" if r.clip_upper >= 100 else f"{r.clip_upper:g}th percentile (above: clipped)"
    if r.polarity == "both":
        span = "zero in the middle, the ends at " + ("its max" if high == "max" else f"the {high} of |map|")
        if low != "min":
            span += f", hidden below the {low.split(' (')[0]} of |map|"
    elif low == "min" and high == "max":
        span = "min-max scaled"
    else:
        span = f"scaled from its {low} to its {high}"
    if r.colormap == "rgb":
        zero = "grey" if r.polarity == "both" else "black"
        text = f"rgb: the attribution's three channels as colours ({zero} = 0, {r.polarity}), {span}"
    else:
        text = f"{r.colormap}: {what}, {span}"
    if r.style == "outlines":
        text += f"; outlines around the top {r.keep:.0%} of pixels"
    elif r.style == "mask":
        text = f"mask: the top {r.keep:.0%} of pixels of {what}"
    elif r.style == "pixels":
        text += "; coloured pixels over the image in grey"
    if r.smooth:
        text += f"; blurred (sigma {r.smooth:g} px)"
    return f"{text}. Methods: {', '.join(key.methods)}"


def bar(r: RenderParams, width: int = BAR_W, height: int = BAR_H) -> Image.Image:
    """The colour bar of one scale, left (low or most negative) to right (high)."""
    signed = r.polarity == "both"
    ramp = np.linspace(-1.0 if signed else 0.0, 1.0, width, dtype=np.float32)
    if r.colormap == "rgb":
        grey = 0.5 + 0.5 * ramp if signed else ramp
        row = np.repeat(np.rint(grey * 255).astype(np.uint8)[:, None], 3, axis=1)
    else:
        table = lut(str(r.colormap))
        idx = np.rint(np.clip((ramp + 1.0) * 0.5 if signed else ramp, 0.0, 1.0) * 255).astype(np.intp)
        row = table[idx]
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (height, width, 3))), "RGB")


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One target: its label and one panel per column (each at the tile size)."""

    label: str
    panels: Sequence[Image.Image]


def compare_grid(columns: Sequence[str], rows: Sequence[Row], legend: Sequence[Key], caption: str) -> bytes:
    """One PNG: titled columns, labelled rows of panels, a legend of colour bars, a caption."""
    if not rows or not rows[0].panels:
        raise ValueError("a grid needs at least one row and one panel")
    tw, th = rows[0].panels[0].size
    title, small = font(LABEL_PX), font(TEXT_PX)
    cell_w = tw + PAD
    width = max(MIN_WIDTH, PAD + len(columns) * cell_w)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    key_lines = [_wrap(scratch, meaning(k), small, width - 2 * PAD) for k in legend]
    title_h, text_h = LABEL_PX + 10, TEXT_PX + 6
    key_h = [BAR_H + text_h + len(lines) * text_h + PAD for lines in key_lines]
    height = PAD + title_h + len(rows) * (title_h + th + PAD) + sum(key_h) + 2 * text_h + PAD
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for j, name in enumerate(columns):
        draw.text((PAD + j * cell_w + 2, y + 2), _fit(draw, name, title, tw - 4), fill=(0, 0, 0), font=title)
    y += title_h
    for row in rows:
        draw.text((PAD + 2, y + 4), _fit(draw, row.label, title, width - 2 * PAD), fill=(0, 0, 0), font=title)
        y += title_h
        for j, panel in enumerate(row.panels):
            pic = panel.convert("RGB") if panel.mode != "RGB" else panel
            if pic.size != (tw, th):
                pic = pic.resize((tw, th), Image.Resampling.BILINEAR)
            canvas.paste(pic, (PAD + j * cell_w, y))
        y += th + PAD
    for key, lines in zip(legend, key_lines, strict=True):
        y = _draw_key(canvas, draw, key, lines, y, small, text_h)
    draw.line([(PAD, y), (width - PAD, y)], fill=(200, 200, 200), width=1)
    draw.text((PAD, y + 4), _fit(draw, caption, small, width - 2 * PAD), fill=(60, 60, 60), font=small)
    return encode_png(canvas)


def _draw_key(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    key: Key,
    lines: list[str],
    y: int,
    small: Font,
    text_h: int,
) -> int:
    """One legend entry at ``y``: the bar, its end labels, the wrapped meaning; returns the next y."""
    r = key.render
    if r.style != "mask":
        canvas.paste(bar(r), (PAD, y))
        draw.rectangle([PAD - 1, y - 1, PAD + BAR_W, y + BAR_H], outline=(120, 120, 120))
    low, middle, high = ends(r)
    label_y = y + BAR_H + 1
    if r.style != "mask":
        draw.text((PAD, label_y), low, fill=(0, 0, 0), font=small)
        if middle:
            draw.text((PAD + BAR_W // 2 - 4, label_y), middle, fill=(0, 0, 0), font=small)
        draw.text(
            (PAD + BAR_W - draw.textlength(high, font=small), label_y), high, fill=(0, 0, 0), font=small
        )
    y = label_y + text_h
    for line in lines:
        draw.text((PAD, y), line, fill=(0, 0, 0), font=small)
        y += text_h
    return y + PAD


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while len(text) > 1 and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Font, width: int) -> list[str]:
    """``text`` broken into lines of at most ``width`` pixels, at spaces (a long word is cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split(" "):
        trial = f"{line} {word}" if line else word
        if draw.textlength(trial, font=font) <= width:
            line = trial
            continue
        if line:
            lines.append(line)
        line = _fit(draw, word, font, width)
    if line:
        lines.append(line)
    return lines
