"""The CAM family against reference implementations, on randomly initialised torchvision models.

References: Captum's ``LayerGradCam(relu_attributions=True)`` for ``gradcam``; pytorch-grad-cam
(``pytorch_grad_cam``, grad-cam 1.5) for ``gradcam_pp``, ``xgradcam``, ``layercam``, ``hirescam``,
``scorecam`` and ``eigencam``. pytorch-grad-cam min-max normalises and resizes its output, so most
comparisons use its raw layer-resolution map (``get_cam_image``, computed from activations and
gradients recorded by its own hooks and backward pass), upsampled bilinearly like our engine does;
one test also compares its public, normalised output.

Where a reference departs from its paper the test follows the paper and says so:

* Grad-CAM++: pytorch-grad-cam adds 1e-6 to the denominator 2g² + ΣA·g³ (the paper has no such
  term). The models' final linear layers are scaled ×100 so that gradients are O(0.1–1) and that
  constant is below float32 noise; ``test_gradcam_pp_follows_the_paper_when_gradients_are_small``
  checks the unscaled case against the paper's formula instead.
* Score-CAM: pytorch-grad-cam takes a softmax over *channels* of the target logits and upsamples
  with align_corners=True; the authors' code (which we follow) uses the target's softmax
  probability over classes and align_corners=False. Giving pytorch-grad-cam the log-probability as
  its target makes its weights ours up to a positive per-image factor, and its upsampler is swapped
  for the align_corners=False one; the maps are then compared after dividing by their maximum.
  A direct per-channel loop written from the definition checks the unnormalised values.
* Eigen-CAM: the sign of a singular vector is arbitrary and pytorch-grad-cam keeps LAPACK's; its
  projection is oriented here by our documented rule (positive correlation with Σ_k A_k).
* DenseNet's ``features`` is followed by an in-place ReLU that overwrites what both references
  record for that layer (they keep the tensor, not a copy), so on DenseNet the references are
  compared at ``features.denseblock4``; ``test_cam.py`` checks our handling of ``features`` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import LayerGradCam
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from service.explainers import ExplainParams, ModelHandle, Targets, explain


# ------------------------------------------------------------------------------------------------
# models and helpers
# ------------------------------------------------------------------------------------------------
def build(name: str, scale: float = 100.0) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        model: nn.Module = torchvision.models.resnet18(num_classes=10)
        head = model.fc
    else:
        model = torchvision.models.densenet121(num_classes=10)
        head = model.classifier
    with torch.no_grad():
        head.weight.mul_(scale)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, ModelHandle]]:
    # optimize=False: the references run the unmodified model, so both sides do the same arithmetic.
    # (BatchNorm folding changes activations by float32 rounding, which XGrad-CAM's 1/ΣA amplifies
    # on DenseNet's signed maps to ~5e-4.) The Captum test also runs the optimised copy.
    handles = {
        name: ModelHandle(build(name), name=name, optimize=False) for name in ("resnet18", "densenet121")
    }
    handles["resnet18-optimized"] = ModelHandle(handles["resnet18"].module, name="resnet18")
    yield handles


CASES = [("resnet18", "layer4"), ("resnet18", "layer3"), ("densenet121", "features.denseblock4")]
CASE_IDS = [f"{m}-{layer}" for m, layer in CASES]
TARGETS = [3, 7]


def images(size: int = 64, n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def ours(handle: ModelHandle, method: str, x: Tensor, layer: str, targets: list[int]) -> Tensor:
    out = explain(
        handle, x, method, ExplainParams(layer=layer), targets=Targets.given([[t] for t in targets])
    )
    return out.maps[:, 0]


def upsample(raw: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(raw.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def assert_maps_close(got: Tensor, expected: Tensor, rtol: float = 1e-4) -> None:
    assert float(expected.abs().max()) > 0, "a comparison with an all-zero map proves nothing"
    torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def reference_raw(
    cam_class: type[Any], model: nn.Module, layer: str, x: Tensor, targets: list[Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """pytorch-grad-cam's raw map (before its ReLU, normalisation and resize), activations, gradients.

    The same steps as ``BaseCAM.forward`` up to ``get_cam_image``, on a private copy of the model.
    """
    model = copy.deepcopy(model)
    module = model.get_submodule(layer)
    cam = cam_class(model=model, target_layers=[module])
    try:
        outputs = cam.activations_and_grads(x)
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, outputs, strict=True)).backward()
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy() if cam.uses_gradients else None
        raw = cam.get_cam_image(x, module, targets, acts, grads, False)
    finally:
        cam.activations_and_grads.release()
    return (
        torch.from_numpy(np.asarray(raw)),
        torch.from_numpy(acts),
        None if grads is None else torch.from_numpy(grads),
    )


def classifier_targets(targets: list[int]) -> list[ClassifierOutputTarget]:
    return [ClassifierOutputTarget(t) for t in targets]


# ------------------------------------------------------------------------------------------------
# Grad-CAM versus Captum
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model", "layer"),
    [*CASES, ("resnet18-optimized", "layer3")],
    ids=[*CASE_IDS, "resnet18-optimized-layer3"],
)
def test_gradcam_matches_captum(models: dict[str, ModelHandle], model: str, layer: str) -> None:
    handle, x = models[model], images()
    reference = copy.deepcopy(handle.module)
    attr = LayerGradCam(reference, reference.get_submodule(layer)).attribute(
        x, target=torch.tensor(TARGETS), relu_attributions=True
    )
    expected = upsample(attr[:, 0].detach(), (64, 64))
    assert_maps_close(ours(handle, "gradcam", x, layer, TARGETS), expected)


# ------------------------------------------------------------------------------------------------
# gradient CAMs versus pytorch-grad-cam's raw maps
# ------------------------------------------------------------------------------------------------
GRADIENT_REFERENCES = {
    "gradcam": GradCAM,
    "gradcam_pp": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
}


@pytest.mark.parametrize("method", sorted(GRADIENT_REFERENCES))
@pytest.mark.parametrize(("model", "layer"), CASES, ids=CASE_IDS)
def test_gradient_cams_match_pytorch_grad_cam(
    models: dict[str, ModelHandle], model: str, layer: str, method: str
) -> None:
    handle, x = models[model], images()
    raw, _, _ = reference_raw(
        GRADIENT_REFERENCES[method], handle.module, layer, x, classifier_targets(TARGETS)
    )
    expected = upsample(raw.clamp(min=0), (64, 64))  # its ReLU, then our bilinear upsampling
    assert_maps_close(ours(handle, method, x, layer, TARGETS), expected)


@pytest.mark.parametrize("method", ["gradcam", "gradcam_pp", "xgradcam", "layercam", "hirescam"])
def test_normalised_output_matches_pytorch_grad_cam(models: dict[str, ModelHandle], method: str) -> None:
    # Its public output: ReLU, min-max normalisation, cv2 bilinear resize, normalisation again.
    # Both explain each image's top-1 class (pytorch-grad-cam's default target).
    handle, x = models["resnet18"], images(seed=1)
    reference = copy.deepcopy(handle.module)
    with GRADIENT_REFERENCES[method](model=reference, target_layers=[reference.layer3]) as cam:
        expected = torch.from_numpy(cam(input_tensor=x, targets=None))
    got = explain(handle, x, method, ExplainParams(layer="layer3")).maps[:, 0]
    assert bool((got.flatten(1).amax(dim=1) > got.flatten(1).amin(dim=1)).all())
    lo = got.amin(dim=(1, 2), keepdim=True)
    got = (got - lo) / (got.amax(dim=(1, 2), keepdim=True) - lo)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_gradcam_pp_follows_the_paper_when_gradients_are_small() -> None:
    # Unscaled resnet18: gradients at layer3 are ~1e-3, so g² is near pytorch-grad-cam's 1e-6.
    # Eq. 19 of Chattopadhyay et al., written out here on pytorch-grad-cam's own activations and
    # gradients: α = g²/(2g² + ΣA·g³) (0 where undefined), w = Σ α·ReLU(g), map = ReLU(Σ w·A).
    model = build("resnet18", scale=1.0)
    x = images(seed=2)
    raw, act, grad = reference_raw(GradCAMPlusPlus, model, "layer3", x, classifier_targets(TARGETS))
    assert grad is not None
    a, g = act.double(), grad.double()
    den = 2 * g**2 + a.sum(dim=(2, 3), keepdim=True) * g**3
    alpha = torch.where(den != 0, g**2 / torch.where(den != 0, den, 1), 0)
    w = (alpha * g.clamp(min=0)).sum(dim=(2, 3))
    paper = (w[:, :, None, None] * a).sum(dim=1).clamp(min=0)
    got = ours(ModelHandle(model), "gradcam_pp", x, "layer3", TARGETS)
    assert_maps_close(got, upsample(paper, (64, 64)).float(), rtol=1e-3)
    # and the reference's 1e-6 really does move it here (hence the scaled models above)
    off = (raw.double().clamp(min=0) - paper).abs().max() / paper.abs().max()
    assert float(off) > 1e-2


# ------------------------------------------------------------------------------------------------
# Eigen-CAM
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "layer"), CASES, ids=CASE_IDS)
def test_eigencam_matches_pytorch_grad_cam(models: dict[str, ModelHandle], model: str, layer: str) -> None:
    handle, x = models[model], images()
    raw, act, _ = reference_raw(EigenCAM, handle.module, layer, x, classifier_targets(TARGETS))
    total = act.sum(dim=1).flatten(1)
    total = total - total.mean(dim=1, keepdim=True)
    sign = torch.sign((raw.flatten(1) * total).sum(dim=1))  # orient by correlation with Σ_k A_k
    expected = upsample((sign[:, None, None] * raw).clamp(min=0), (64, 64))
    assert_maps_close(ours(handle, "eigencam", x, layer, TARGETS), expected)


# ------------------------------------------------------------------------------------------------
# Score-CAM
# ------------------------------------------------------------------------------------------------
class LogProbability:
    """pytorch-grad-cam target log softmax(output)_c: its channel softmax then equals p_k / Σ_j p_j."""

    def __init__(self, category: int) -> None:
        self.category = category

    def __call__(self, model_output: Tensor) -> Tensor:
        return torch.log_softmax(model_output, dim=-1)[self.category]


SCORE_CASES = [("resnet18", "layer3"), ("densenet121", "features.transition2")]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "layer"), SCORE_CASES, ids=[f"{m}-{lay}" for m, lay in SCORE_CASES])
def test_scorecam_matches_pytorch_grad_cam(
    models: dict[str, ModelHandle], model: str, layer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 32×32 input: the layers are 2×2 with 256 channels, i.e. 256 masked passes per image.
    handle, x = models[model], images(size=32, n=1)
    target = [5]
    monkeypatch.setattr(
        torch.nn,
        "UpsamplingBilinear2d",
        lambda size: torch.nn.Upsample(size=size, mode="bilinear", align_corners=False),
    )
    raw, act, _ = reference_raw(ScoreCAM, handle.module, layer, x, [LogProbability(c) for c in target])
    constant = act.flatten(2).amax(dim=2) == act.flatten(2).amin(dim=2)
    assert bool((act.flatten(2)[constant] == 0).all()), (
        "non-zero constant channels would be weighted differently"
    )
    expected = upsample(raw.clamp(min=0), (32, 32))
    got = ours(handle, "scorecam", x, layer, target)
    assert_maps_close(got / got.max(), expected / expected.max())


@pytest.mark.slow
def test_scorecam_matches_its_definition(models: dict[str, ModelHandle]) -> None:
    # One masked forward pass per channel, written from the definition (as in the authors' code):
    # H_k = s(Up(A_k)), α_k = softmax(f(X∘H_k))_c, map = ReLU(Σ_k α_k A_k); constant channels skipped.
    handle, x, c = models["resnet18"], images(size=32, n=1, seed=3), 2
    model = copy.deepcopy(handle.module)
    with torch.no_grad():
        feats: dict[str, Tensor] = {}
        hook = model.layer3.register_forward_hook(lambda _m, _i, out: feats.setdefault("a", out))
        try:
            model(x)
        finally:
            hook.remove()
        act = feats["a"][0]
        total = torch.zeros(act.shape[1:])
        for k in range(act.shape[0]):
            up = F.interpolate(act[k][None, None], size=(32, 32), mode="bilinear", align_corners=False)
            if up.max() == up.min():
                continue
            mask = (up - up.min()) / (up.max() - up.min())
            total += torch.softmax(model(x * mask), dim=1)[0, c] * act[k]
    expected = upsample(total.clamp(min=0)[None], (32, 32))
    assert_maps_close(ours(handle, "scorecam", x, "layer3", [c]), expected)
