"""bf16 explanations (``service.explainers.precision``): where they run, what they agree with.

Fidelity thresholds, per method family, on the default model (EfficientNet-Lite0 with its trained
weights) and two of skimage's photos at 224² (the lowest r measured with ``benchmarks/precision.py``
on four photos at the default parameters, less a margin for the fewer steps and samples used here):

- CAM (Grad-CAM): r ≥ 0.999 (measured 0.9999–1.0000);
- gradient (saliency, Guided Backprop): r ≥ 0.95 / 0.99 (measured ≥ 0.96 / ≥ 0.998);
- path: IG r ≥ 0.97 (measured ≥ 0.992 at 32 steps), SmoothGrad r ≥ 0.95 (measured ≥ 0.981 at
  16 samples, 0.969 at the 4 samples used here).

IG's completeness delta in bf16 stays within ``IG_DELTA_BOUND`` × |f(x) − f(x')| of the fp32 delta
(at 32 steps the two deltas differ by 1.5–4 % of f(x) − f(x') ≈ 11 on these photos: bf16 rounds
the endpoint logits and the gradients; at 8 steps both deltas are larger).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from torch import nn

from service.errors import PrecisionUnavailable
from service.explainers import ExplainParams, ModelHandle, explain
from service.explainers import precision as prec
from service.models.loaders import load_builtin

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def default_handle() -> ModelHandle:
    """The default model as the registry serves it: trained weights, ImageNet normalisation, 224²."""
    module = load_builtin("efficientnet_lite0").eval()
    return ModelHandle(module=module, mean=MEAN, std=STD, name="efficientnet_lite0", input_size=(3, 224, 224))


def photo(name: str) -> torch.Tensor:
    """skimage's sample photo ``name``, resized to 224², normalised, (1, 3, 224, 224)."""
    t = torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1).float().div(255)[None]
    t = F.interpolate(t, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (t - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


needs_bf16 = pytest.mark.skipif(not prec.cpu_has_bf16(), reason="this CPU has no bf16 matrix units")

#: |delta bf16 − delta fp32| / |f(x) − f(x')| of IG-8 on the default model and the two photos
IG_DELTA_BOUND = 0.08


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


# ------------------------------------------------------------------------------------------------
# where bf16 runs, and what is refused
# ------------------------------------------------------------------------------------------------
def test_cpu_detection_reads_the_flags_when_torch_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    real = Path.read_text

    def cpuinfo(flags: str) -> None:
        prec.cpu_has_bf16.cache_clear()
        monkeypatch.setattr(
            Path,
            "read_text",
            lambda self, *a, **k: (
                f"flags\t: fpu {flags}\n" if str(self) == "/proc/cpuinfo" else real(self, *a, **k)
            ),
        )

    try:
        cpuinfo("avx2 amx_tile amx_bf16")
        assert prec.cpu_has_bf16()
        cpuinfo("avx2 avx512f")
        assert not prec.cpu_has_bf16()
    finally:
        prec.cpu_has_bf16.cache_clear()


def test_bf16_is_refused_without_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(prec, "bf16_supported", lambda device: False)
    with pytest.raises(PrecisionUnavailable) as err:
        prec.resolve_precision("gradcam", "bf16", cpu)
    assert err.value.field == "precision" and "matrix units" in err.value.message
    assert prec.resolve_precision("gradcam", "auto", cpu) == "fp32"
    assert prec.resolve_precision("gradcam", "fp32", cpu) == "fp32"
    handle = ModelHandle(module=small_cnn(), input_size=(3, 32, 32))
    with pytest.raises(PrecisionUnavailable):
        explain(handle, torch.randn(1, 3, 32, 32), "saliency", ExplainParams(precision="bf16"))


def test_unmeasured_methods_are_refused_even_with_bf16_units(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prec, "bf16_supported", lambda device: True)
    monkeypatch.setattr(prec, "bf16_pays", lambda device: True)
    cpu = torch.device("cpu")
    for method in ("occlusion", "scorecam", "lime_not_a_method"):
        assert method not in prec.BF16_FIDELITY
        with pytest.raises(PrecisionUnavailable, match="not offered in bf16"):
            prec.resolve_precision(method, "bf16", cpu)
        assert prec.resolve_precision(method, "auto", cpu) == "fp32"
    for method, r in prec.BF16_FIDELITY.items():
        assert r >= prec.MIN_FIDELITY, method  # a method measured below the bar is not listed
        assert prec.resolve_precision(method, "bf16", cpu) == "bf16"
        assert prec.resolve_precision(method, "auto", cpu) == "bf16"


def test_auto_stays_fp32_where_bf16_runs_but_does_not_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU with AVX512-BF16 but no AMX: bf16 when asked for, fp32 for ``auto``."""
    monkeypatch.setattr(prec, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(prec, "cpu_has_amx", lambda: False)
    cpu = torch.device("cpu")
    assert prec.bf16_supported(cpu) and not prec.bf16_pays(cpu)
    assert prec.resolve_precision("integrated_gradients", "bf16", cpu) == "bf16"
    assert prec.resolve_precision("integrated_gradients", "auto", cpu) == "fp32"
    monkeypatch.setattr(prec, "cpu_has_amx", lambda: True)
    assert prec.resolve_precision("integrated_gradients", "auto", cpu) == "bf16"


def test_amx_detection_reads_the_flags_when_torch_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    real = Path.read_text
    for flags, amx in (("avx2 avx512_bf16", False), ("avx2 amx_tile amx_bf16", True)):
        prec.cpu_has_amx.cache_clear()
        monkeypatch.setattr(
            Path,
            "read_text",
            lambda self, *a, _f=flags, **k: (
                f"flags\t: fpu {_f}\n" if str(self) == "/proc/cpuinfo" else real(self, *a, **k)
            ),
        )
        try:
            assert prec.cpu_has_amx() is amx
        finally:
            prec.cpu_has_amx.cache_clear()


def test_server_default_bf16_means_bf16_where_offered() -> None:
    from service.config import Settings

    assert Settings(precision="bf16").engine_defaults()["precision"] == "auto"
    assert Settings().engine_defaults()["precision"] == "fp32"


# ------------------------------------------------------------------------------------------------
# the bf16 copy
# ------------------------------------------------------------------------------------------------
def test_fp32_region_is_the_input_adjacent_stages() -> None:
    model = small_cnn()
    # 32² input: conv 0 (32²) and conv 3 (16²) stay ≥ 1/4 of the side... conv 5 (8²) too; conv 7 (4²) does not
    assert prec.fp32_region(model, torch.randn(1, 3, 32, 32)) == ["0", "1", "3", "5"]
    assert prec.fp32_region(model, torch.randn(1, 3, 64, 64)) == ["0", "1", "3", "5"]


@needs_bf16
def test_bf16_copy_is_made_once_and_kept_apart_from_the_fp32_one() -> None:
    handle = ModelHandle(module=small_cnn(), input_size=(3, 32, 32))
    fp32 = handle.prepared()
    bf16 = handle.prepared(precision="bf16")
    assert bf16 is not fp32 and handle.prepared(precision="bf16") is bf16 and handle.prepared() is fp32
    assert all(p.dtype == torch.float32 for p in fp32.parameters())
    assert next(iter(bf16[0].parameters())).dtype == torch.float32  # in the fp32 region
    assert bf16[7].weight.dtype == torch.bfloat16 and bf16[11].weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 32, 32)
    out = explain(handle, x, "saliency", ExplainParams(precision="bf16"))
    assert out.params.precision == "bf16"
    ref = explain(handle, x, "saliency", ExplainParams(precision="fp32"))
    assert ref.params.precision == "fp32"
    assert not torch.equal(out.maps, ref.maps) and pearson(out.maps, ref.maps) > 0.95


# ------------------------------------------------------------------------------------------------
# fidelity on the default model (trained weights)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def default_model() -> ModelHandle:
    return default_handle()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([photo("coffee"), photo("chelsea")])


FAMILIES = [
    pytest.param("gradcam", 0.999, id="cam-gradcam"),
    pytest.param("saliency", 0.95, id="gradient-saliency"),
    pytest.param("guided_backprop", 0.99, id="gradient-guided_backprop"),
    pytest.param("integrated_gradients", 0.97, id="path-integrated_gradients"),
    pytest.param("smoothgrad", 0.95, id="path-smoothgrad"),
]


@needs_bf16
@pytest.mark.slow
@pytest.mark.parametrize(("method", "threshold"), FAMILIES)
def test_bf16_maps_agree_with_fp32(
    default_model: ModelHandle, photos: torch.Tensor, method: str, threshold: float
) -> None:
    assert method in prec.BF16_FIDELITY
    params = ExplainParams(steps=8, samples=4, seed=3)
    ref = explain(default_model, photos, method, params.with_(precision="fp32"))
    low = explain(default_model, photos, method, params.with_(precision="bf16"))
    assert low.params.precision == "bf16"
    assert torch.equal(low.targets, ref.targets) and low.targets.flatten().tolist() == [967, 285]
    for i in range(photos.shape[0]):
        r = pearson(low.maps[i], ref.maps[i])
        assert threshold <= r < 1.0, (method, i, r)  # < 1: bf16 did change the numbers
    if method == "integrated_gradients":
        assert ref.completeness_delta is not None and low.completeness_delta is not None
        # the gap f(x) − f(x') from fp32 IG: Σ IG − delta; bf16's delta is fp32's, give or take
        gap = ref.attributions.sum(dim=(2, 3, 4)) - ref.completeness_delta  # type: ignore[union-attr]
        shift = (low.completeness_delta - ref.completeness_delta).abs()
        assert (shift <= IG_DELTA_BOUND * gap.abs()).all(), (
            low.completeness_delta,
            ref.completeness_delta,
            gap,
        )
