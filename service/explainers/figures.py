"""How each method's maps are shown by default: the way its paper's figures show them.

A method's ``rendering`` (``Method.rendering``) is one of the presets below: default values of
the rendering parameters, keyed by their names (declared once, with their meaning, in
``service.imaging.options.RenderParams``). A request's own values win; what it leaves unset comes
from here, and ``GET /v1/methods`` lists the result as each method's ``rendering``. Plain data:
the engine imports nothing from the imaging or web layers, and the rendering layer checks these
values against the declarations (a test renders every method with its preset).

Why not one default for all: a CAM map is smooth and lives at a coarse layer, so min–max scaling
shows it well; a pixel-level gradient has a few outlier pixels that take the whole colour scale,
so min–max scaling hides everything else, and its papers clip at a high percentile and draw the
attribution as coloured pixels, or as an RGB image, instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

Figure = Mapping[str, object]


def figure(**values: object) -> Figure:
    """A read-only preset of rendering defaults."""
    return MappingProxyType(values)


#: CAM family: the map blended over the photo in jet, min–max scaled, unclipped — Grad-CAM
#: (Selvaraju et al. 2017) Fig. 1(c, i), CAM (Zhou et al. 2016) Fig. 3, and the comparison figures
#: of Grad-CAM++, Score-CAM, LayerCAM and Eigen-CAM, all drawn that way. Signed CAM shows its
#: positive part, as Grad-CAM's ReLU does.
CAM_HEATMAP = figure(
    polarity="positive", clip_lower=0.0, clip_upper=100.0, style="heatmap", colormap="jet", smooth=0.0
)

#: Unsigned gradient magnitudes (saliency, SmoothGrad, Smooth IG): |map| capped at its 99th
#: percentile — the SmoothGrad paper (Smilkov et al. 2017) caps outliers that way for its
#: figures, whose maps are absolute values; Simonyan et al. 2014 Fig. 2 shows the saliency map's
#: magnitude alone. Drawn as bright pixels over the photo in grey.
GRADIENT_MAGNITUDE = figure(
    polarity="absolute", clip_lower=0.0, clip_upper=99.0, style="pixels", colormap="inferno", smooth=0.0
)

#: Integrated Gradients: the positive attributions, clipped at a high percentile, as coloured
#: pixels over the photo in grey — the authors' visualisation (Sundararajan et al. 2017 Fig. 2;
#: their library's defaults: polarity positive, clip above the 99.9th percentile, overlay on a
#: dimmed grey image). We clip at the 99th: on a 224² map the 99.9th leaves ~50 pixels in colour.
POSITIVE_ATTRIBUTION = figure(
    polarity="positive", clip_lower=0.0, clip_upper=99.0, style="pixels", colormap="inferno", smooth=0.0
)

#: Signed contributions (input × gradient): both signs, red for evidence for the class and blue
#: against it, clipped at the 99th percentile of |map| — the signed red/blue maps of Shrikumar
#: et al. 2016/2017 (DeepLIFT) figures. (A polarity other than ``both`` uses ``colormap``.)
SIGNED_ATTRIBUTION = figure(
    polarity="both", clip_lower=0.0, clip_upper=99.0, style="pixels", colormap="inferno", smooth=0.0
)

#: Guided Backprop, Deconvnet, Guided Grad-CAM: the per-channel gradient shown as an RGB image,
#: zero-centred per image, scaled so the 98th percentile of its magnitude saturates, clipped
#: (grey = 0) — Zeiler & Fergus 2014 Fig. 2, Springenberg et al. 2015's guided-backpropagation
#: reconstructions, Grad-CAM Fig. 1(b, d). The papers show that image on its own, so the overlay
#: is the image itself (``heatmap`` at opacity 1); a lower ``alpha`` lets the photo through.
RGB_GRADIENT = figure(
    polarity="both",
    clip_lower=0.0,
    clip_upper=98.0,
    style="heatmap",
    alpha=1.0,
    colormap="rgb",
    smooth=0.0,
)
