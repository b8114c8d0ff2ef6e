"""The model registry: TOML specs, the four sources, target layers, devices, warm-up, the default model."""

from __future__ import annotations

import textwrap
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import timm
import torch
import torchvision
from helpers import resnet18_info
from PIL import Image
from torch import Tensor, nn

from service.config import Settings
from service.errors import ConfigError, MethodNotApplicable, ModelLoadError, TargetOutOfRange, UnknownModel
from service.explainers import (
    Attribution,
    ExplainParams,
    Method,
    ModelHandle,
    RunContext,
    all_methods,
    explain,
    predict,
)
from service.explainers.base import Need
from service.explainers.layers import layer_before_head
from service.imaging import decode_image
from service.models import ModelRegistry, ModelSpec, load_config, loaders, registry, resolve_device
from service.models.loaders import BUILTINS, Builtin, builtin_weights_file, map_in_order
from service.models.registry import warmup_plan


def write_toml(folder: Path, body: str) -> Path:
    path = folder / "models.toml"
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def resnet_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A random resnet18 with 10 classes: its state_dict, a labels file, and the module itself."""
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), folder / "resnet18.pt")
    (folder / "labels.txt").write_text("\n".join(f"thing {i}" for i in range(10)) + "\n\n")
    return folder, model


@pytest.fixture(scope="module")
def small_registry(resnet_files: tuple[Path, nn.Module]) -> ModelRegistry:
    folder, _ = resnet_files
    path = write_toml(
        folder,
        """
        [[models]]
        name = "tiny-resnet"
        source = "torchvision"
        architecture = "resnet18"
        weights = "resnet18.pt"        # relative to this file
        num_classes = 10
        labels = "labels.txt"
        input_size = [3, 64, 64]
        resize = "center_crop"
        """,
    )
    return ModelRegistry.from_specs(load_config(path), device="cpu")


# ------------------------------------------------------------------------------------------------
# torchvision from TOML
# ------------------------------------------------------------------------------------------------
def test_torchvision_model_from_toml(
    small_registry: ModelRegistry, resnet_files: tuple[Path, nn.Module]
) -> None:
    _, reference = resnet_files
    model = small_registry.get("tiny-resnet")
    assert small_registry.names() == ["tiny-resnet"] and len(small_registry) == 1
    assert [m.name for m in small_registry] == ["tiny-resnet"]
    assert model.input_size == (3, 64, 64) and model.num_classes == 10 and model.resize == "center_crop"
    assert model.mean == (0.485, 0.456, 0.406) and model.std == (0.229, 0.224, 0.225)
    assert model.label(3) == "thing 3" and len(model.labels) == 10
    # the saved weights were loaded: same logits as the module that was saved
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), reference(x))
    assert not model.module.training
    assert all(not p.requires_grad for p in model.module.parameters())
    assert model.device == torch.device("cpu")


def test_target_layer_auto_detected(small_registry: ModelRegistry) -> None:
    model = small_registry.get("tiny-resnet")
    assert model.target_layer == "layer4" and model.handle.target_layer == "layer4"


def test_model_info(small_registry: ModelRegistry) -> None:
    info = small_registry.get("tiny-resnet").info()
    assert info == resnet18_info("tiny-resnet", methods=info["methods"], ready=False)
    assert "gradcam" in info["methods"]


def test_label_out_of_range(small_registry: ModelRegistry) -> None:
    with pytest.raises(TargetOutOfRange):
        small_registry.get("tiny-resnet").label(10)


def test_unknown_model_lists_known_names(small_registry: ModelRegistry) -> None:
    with pytest.raises(UnknownModel, match="known models: tiny-resnet"):
        small_registry.get("resnet50")


def test_preprocess_delegates_to_geometry(small_registry: ModelRegistry) -> None:
    model = small_registry.get("tiny-resnet")
    x, geo = model.preprocess(Image.new("RGB", (128, 64), (255, 255, 255)))
    assert x.shape == (3, 64, 64)
    assert geo.resize == "center_crop" and geo.crop_box == (32.0, 0.0, 96.0, 64.0)
    torch.testing.assert_close(x[:, 0, 0], (1 - torch.tensor(model.mean)) / torch.tensor(model.std))


def test_random_init_without_weights(caplog: pytest.LogCaptureFixture) -> None:
    spec = ModelSpec(
        name="r", source="torchvision", architecture="resnet18", num_classes=3, input_size=(3, 32, 32)
    )
    with caplog.at_level("WARNING"):
        reg = ModelRegistry.from_specs([spec], device="cpu")
    assert "random initialisation" in caplog.text
    model = reg.get("r")
    assert model.labels == ["class_0", "class_1", "class_2"]
    assert predict(model.handle, torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_wrong_weights_are_a_load_error(resnet_files: tuple[Path, nn.Module]) -> None:
    folder, _ = resnet_files
    spec = ModelSpec(
        name="r", source="torchvision", architecture="resnet18", num_classes=5, weights=folder / "resnet18.pt"
    )
    with pytest.raises(ModelLoadError, match="do not fit"):
        ModelRegistry.from_specs([spec], device="cpu")


def test_checkpoint_layouts_are_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(1)
    ref = torchvision.models.resnet18(num_classes=2).eval()
    wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ckpt.pth")
    spec = ModelSpec(
        name="c", source="torchvision", architecture="resnet18", num_classes=2, weights=tmp_path / "ckpt.pth"
    )
    model = ModelRegistry.from_specs([spec], device="cpu").get("c")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x))


# ------------------------------------------------------------------------------------------------
# timm and TorchScript
# ------------------------------------------------------------------------------------------------
def test_timm_model(tmp_path: Path) -> None:
    torch.manual_seed(2)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=7).eval()
    torch.save(ref.state_dict(), tmp_path / "lite.pt")
    path = write_toml(
        tmp_path,
        """
        [[models]]
        name = "lite"
        source = "timm"
        architecture = "tf_efficientnet_lite0"
        weights = "lite.pt"
        num_classes = 7
        input_size = [3, 64, 64]
        mean = [0.5]
        std = [0.5]
        """,
    )
    model = ModelRegistry.from_specs(load_config(path), device="cpu").get("lite")
    assert model.target_layer == "bn2" and model.mean == (0.5, 0.5, 0.5)
    assert model.info()["source"] == "timm"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x))


def _save_torchscript(model: nn.Module, path: Path, size: int = 32) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.* deprecation notices
        traced = torch.jit.trace(model, torch.zeros(1, 3, size, size))
        torch.jit.save(traced, str(path))


def test_torchscript_model(tmp_path: Path) -> None:
    torch.manual_seed(3)
    ref = torchvision.models.resnet18(num_classes=4).eval()
    _save_torchscript(ref, tmp_path / "net.ts")
    path = write_toml(
        tmp_path,
        """
        [[models]]
        name = "scripted"
        source = "torchscript"
        weights = "net.ts"
        input_size = [3, 32, 32]
        """,
    )
    model = ModelRegistry.from_specs(load_config(path), device="cpu").get("scripted")
    assert model.num_classes == 4  # measured from the module
    assert model.target_layer == "layer4"  # by structure: TorchScript refuses hooks
    assert model.architecture == "ResNet"
    assert "gradcam" not in model.methods()  # CAM needs a forward hook
    assert {"occlusion", "rise"} <= set(model.methods())  # black-box: a forward is all they need
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x))


def test_torchscript_bad_target_layer_lists_layers(tmp_path: Path) -> None:
    _save_torchscript(torchvision.models.resnet18(num_classes=4).eval(), tmp_path / "net.ts")
    spec = ModelSpec(
        name="s",
        source="torchscript",
        weights=tmp_path / "net.ts",
        input_size=(3, 32, 32),
        target_layer="nope",
    )
    with pytest.raises(ConfigError, match=r"valid layers: conv1, bn1"):
        ModelRegistry.from_specs([spec], device="cpu")


def test_torchscript_corrupt_file(tmp_path: Path) -> None:
    (tmp_path / "bad.ts").write_bytes(b"not a zip file")
    spec = ModelSpec(name="s", source="torchscript", weights=tmp_path / "bad.ts")
    with pytest.raises(ModelLoadError, match="TorchScript"):
        ModelRegistry.from_specs([spec], device="cpu")


def test_layer_before_head_by_structure() -> None:
    assert layer_before_head(torchvision.models.resnet18(num_classes=2)) == "layer4"
    assert layer_before_head(torchvision.models.vgg11(num_classes=2)) == "features"
    assert layer_before_head(timm.create_model("tf_efficientnet_lite0", num_classes=2)) == "bn2"
    wrapped = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    )
    assert layer_before_head(wrapped) == "0.0"


def test_no_spatial_map_means_no_cam() -> None:
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3 * 16 * 16, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x.flatten(1))

    handle = ModelHandle(Flat(), input_size=(3, 16, 16))
    assert handle.default_layer() is None
    assert "layer" not in handle.offers()


# ------------------------------------------------------------------------------------------------
# config validation
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body,message",
    [
        ('name = "a"\nsource = "torchvision"\n', "needs an architecture"),
        ('name = "a"\nsource = "onnx"\n', "source"),
        ('name = "a"\narchitecture = "efficientnet_lite0"\nnum_clases = 3\n', "num_clases"),
        ('name = "a"\nsource = "torchscript"\n', "needs weights"),
        ('name = "a"\nsource = "timm"\narchitecture = "resnet18"\nweights = "missing.pt"\n', "not found"),
        ('name = "a"\ndevice = "tpu"\n', "device"),
        ('name = "a"\nmean = [0.1, 0.2]\n', "mean needs 1 or 3 values"),
        ('name = "a"\nstd = [0.0]\n', "std"),
        ('name = "a"\ninput_size = [4, 32, 32]\n', "channels"),
        ('name = "a b"\n', "name"),
        ('name = "a"\nresize = "squash"\n', "resize"),
    ],
)
def test_bad_tables_are_config_errors(tmp_path: Path, body: str, message: str) -> None:
    path = write_toml(tmp_path, "[[models]]\n" + body)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert "models[0]" in info.value.message


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(write_toml(tmp_path, "[[models]\nname = 1\n"))
    with pytest.raises(ConfigError, match=r"\[\[models\]\]"):
        load_config(write_toml(tmp_path, "title = 'x'\n"))
    with pytest.raises(ConfigError, match="configured twice"):
        load_config(write_toml(tmp_path, '[[models]]\nname = "a"\n[[models]]\nname = "a"\n'))


def test_direct_spec_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="needs an architecture"):
        ModelSpec(name="x", source="timm")


def test_duplicate_specs_and_unknowns_at_load() -> None:
    spec = ModelSpec(name="d", source="torchvision", architecture="resnet18", num_classes=2)
    with pytest.raises(ConfigError, match="twice"):
        ModelRegistry.from_specs([spec, spec], device="cpu")
    with pytest.raises(ConfigError, match="unknown torchvision architecture"):
        ModelRegistry.from_specs([ModelSpec(name="u", source="torchvision", architecture="resnet_9000")])
    with pytest.raises(ConfigError, match="unknown timm architecture"):
        ModelRegistry.from_specs([ModelSpec(name="u", source="timm", architecture="resnet_9000")])
    with pytest.raises(ConfigError, match="builtin models: efficientnet_lite0"):
        ModelRegistry.from_specs([ModelSpec(name="u", source="builtin", architecture="alexnet")])


def test_labels_must_match_classes(resnet_files: tuple[Path, nn.Module]) -> None:
    folder, _ = resnet_files
    spec = ModelSpec(
        name="l",
        source="torchvision",
        architecture="resnet18",
        weights=folder / "resnet18.pt",
        num_classes=10,
        labels=str(folder / "labels.txt"),
    )
    assert ModelRegistry.from_specs([spec], device="cpu").get("l").labels[-1] == "thing 9"
    short = spec.model_copy(update={"num_classes": None})  # num_classes from the labels file
    assert ModelRegistry.from_specs([short], device="cpu").get("l").num_classes == 10
    bad = ModelSpec(
        name="l", source="torchvision", architecture="resnet18", num_classes=4, labels=spec.labels
    )
    with pytest.raises(ConfigError, match="10 labels for 4 classes"):
        ModelRegistry.from_specs([bad], device="cpu")


# ------------------------------------------------------------------------------------------------
# devices
# ------------------------------------------------------------------------------------------------
def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    for setting in ("cuda", "cuda:0", "CUDA:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(setting)
    with pytest.raises(ConfigError):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_spec_device_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(registry, "load_model", lambda spec, device, **_: seen.append(device) or spec)
    specs = [ModelSpec(name="a", device="cpu"), ModelSpec(name="b")]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError):  # b falls back to the service's "cuda"
        ModelRegistry.from_specs(specs, device="cuda")
    assert seen == [torch.device("cpu")]


# ------------------------------------------------------------------------------------------------
# methods and warm-up
# ------------------------------------------------------------------------------------------------
class _FakeCam(Method):
    name = "cam"
    family = "cam"
    description = "test double"
    paper = "https://example.org"
    needs: ClassVar[frozenset[Need]] = frozenset({"hooks", "layer"})
    uses: ClassVar[frozenset[str]] = frozenset({"layer"})
    supported: ClassVar[bool] = True

    def check(self, handle: ModelHandle, params: ExplainParams) -> None:
        if not self.supported:
            raise MethodNotApplicable("no GAP + linear head")

    def attribute(self, ctx: RunContext, x: Tensor, targets: Tensor) -> Attribution:
        raise NotImplementedError


def test_cam_is_offered_only_where_supported(
    monkeypatch: pytest.MonkeyPatch, small_registry: ModelRegistry
) -> None:
    from service.explainers import all_methods

    real = all_methods()
    others = [m for m in real if m.name != "cam"]
    monkeypatch.setattr(registry, "all_methods", lambda: [*others, _FakeCam()])
    model = registry.LoadedModel(**{**small_registry.get("tiny-resnet").__dict__, "_methods": None})
    monkeypatch.setattr(_FakeCam, "supported", False)  # the method says it does not apply
    assert "cam" not in model.methods()
    model._methods = None
    monkeypatch.setattr(_FakeCam, "supported", True)
    assert "cam" in model.methods()


def test_warmup_runs_each_family_and_marks_ready(
    monkeypatch: pytest.MonkeyPatch, resnet_files: tuple[Path, nn.Module]
) -> None:
    folder, _ = resnet_files
    spec = ModelSpec(
        name="w",
        source="torchvision",
        architecture="resnet18",
        weights=folder / "resnet18.pt",
        num_classes=10,
        input_size=(3, 32, 32),
    )
    reg = ModelRegistry.from_specs([spec], device="cpu")
    model = reg.get("w")
    plan = warmup_plan(model)
    from service.explainers import get_method

    families = {get_method(name).family for name in model.methods()}
    assert {get_method(name).family for name in plan} == families
    assert plan[0] == "gradcam"
    calls: list[tuple[str, Any]] = []
    real_explain = registry.explain

    def spy(handle: Any, x: Tensor, method: str, params: Any, **kw: Any) -> Any:
        calls.append((method, tuple(x.shape)))
        if method == plan[-1] and len(plan) > 1:
            raise RuntimeError("boom")
        return real_explain(handle, x, method, params, **kw)

    monkeypatch.setattr(registry, "explain", spy)
    assert not reg.ready
    reg.warmup()
    assert reg.ready and model.ready and model.info()["ready"] is True
    assert [c[0] for c in calls] == plan and all(c[1] == (1, 3, 32, 32) for c in calls)
    if len(plan) > 1:
        assert plan[-1] not in model.methods() and "boom" in model.failed_methods[plan[-1]]


def test_mark_ready(small_registry: ModelRegistry) -> None:
    reg = ModelRegistry(
        [registry.LoadedModel(**{**small_registry.get("tiny-resnet").__dict__, "ready": False})]
    )
    assert not reg.ready
    reg.mark_ready()
    assert reg.ready


# ------------------------------------------------------------------------------------------------
# builtins
# ------------------------------------------------------------------------------------------------
def test_missing_optional_builtin_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Builtin(
        "tf_efficientnet_lite1",
        "no_such_package_xyz",
        "efficientnet-lite9-pytorch-model",
        (3, 240, 240),
        "lite",
    )
    with pytest.raises(ModelLoadError, match=r"saliency-service\[lite\]"):
        builtin_weights_file(fake)
    monkeypatch.setitem(BUILTINS, "efficientnet_lite1", fake)
    with pytest.raises(ModelLoadError, match="efficientnet-lite9-pytorch-model"):
        ModelRegistry.from_specs([ModelSpec(name="efficientnet_lite1")], device="cpu")


def test_map_in_order_checks_counts_and_shapes() -> None:
    src = {"a": torch.zeros(2), "b": torch.zeros(3)}
    assert list(map_in_order(src, {"x": torch.ones(2), "y": torch.ones(3)}, what="t")) == ["x", "y"]
    with pytest.raises(ModelLoadError, match="does not fit"):
        map_in_order(src, {"x": torch.ones(3), "y": torch.ones(2)}, what="t")
    with pytest.raises(ModelLoadError, match="2 tensors"):
        map_in_order(src, {"x": torch.ones(2)}, what="t")


def test_builtin_native_input_sizes_agree_with_timm() -> None:
    for name, builtin in BUILTINS.items():
        cfg = timm.create_model(builtin.timm_architecture, pretrained=False).pretrained_cfg
        assert tuple(cfg["input_size"]) == builtin.input_size, name
        assert tuple(cfg["mean"]) == loaders.BUILTIN_MEAN and tuple(cfg["std"]) == loaders.BUILTIN_STD
    assert [b.input_size[1] for b in BUILTINS.values()] == [224, 240, 260]


def _photo(name: str) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)())


def _top(model: registry.LoadedModel, image: Image.Image) -> tuple[int, float]:
    x, _ = model.preprocess(image)
    probs = predict(model.handle, x[None]).softmax(dim=1)[0]
    p, i = probs.max(dim=0)
    return int(i), float(p)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_optional_builtins_classify_the_cat(name: str) -> None:
    pytest.importorskip(BUILTINS[name].package)
    model = ModelRegistry.from_specs([ModelSpec(name=name)], device="cpu").get(name)
    assert model.input_size == BUILTINS[name].input_size
    index, p = _top(model, _photo("chelsea"))
    assert index == 285 and p > 0.5


@pytest.fixture(scope="module")
def default_registry() -> ModelRegistry:
    return ModelRegistry.from_settings(Settings(models_config=None, device="cpu"))


def test_default_model_metadata(default_registry: ModelRegistry) -> None:
    assert default_registry.names() == ["efficientnet_lite0"]
    model = default_registry.get("efficientnet_lite0")
    assert model.info()["input_size"] == [3, 224, 224] and model.num_classes == 1000
    assert model.mean == (0.5, 0.5, 0.5) and model.std == (0.5, 0.5, 0.5) and model.resize == "stretch"
    assert model.target_layer == "bn2" and model.source == "builtin"
    assert model.label(285) == "Egyptian cat" and model.label(967) == "espresso" and model.label(0) == "tench"


def test_default_model_end_to_end(default_registry: ModelRegistry) -> None:
    import io

    model = default_registry.get("efficientnet_lite0")
    for name, index, prob in (("chelsea", 285, 0.79), ("coffee", 967, 0.90)):
        buf = io.BytesIO()
        _photo(name).save(buf, "PNG")
        image = decode_image(buf.getvalue(), max_bytes=10**8, max_pixels=10**8, min_size=8)
        top, p = _top(model, image)
        assert top == index, name
        assert abs(p - prob) < 0.05, (name, p)


def test_from_settings_reads_the_config(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        """
        [[models]]
        name = "s1"
        source = "torchvision"
        architecture = "resnet18"
        num_classes = 2
        input_size = [3, 32, 32]
        """,
    )
    reg = ModelRegistry.from_settings(Settings(models_config=path, device="cpu"))
    assert reg.names() == ["s1"] and reg.get("s1").device == torch.device("cpu")
    assert np.isfinite(predict(reg.get("s1").handle, torch.zeros(1, 3, 32, 32)).numpy()).all()


def test_example_config_parses() -> None:
    root = Path(__file__).resolve().parents[2]
    specs = load_config(root / "examples" / "models.toml")
    assert [s.name for s in specs] == ["efficientnet_lite0"] and specs[0].source == "builtin"


# ------------------------------------------------------------------------------------------------
# torch.export programs
# ------------------------------------------------------------------------------------------------
def _export(model: nn.Module, path: Path, *, dynamic_batch: bool = True) -> None:
    x = torch.randn(2 if dynamic_batch else 1, 3, 64, 64)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), str(path))


def test_export_model_keeps_its_layers_and_every_method(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=4).eval()
    _export(ref, tmp_path / "net.pt2")
    spec = ModelSpec(name="e", source="export", weights=tmp_path / "net.pt2", input_size=(3, 64, 64))
    model = ModelRegistry.from_specs([spec], device="cpu").get("e")
    assert model.num_classes == 4 and model.target_layer == "layer4"
    # unflattened: named layers take hooks, so the CAM methods work; the graph calls aten ops, which
    # the rectifier rules cannot see (refused, not a plain gradient), and its classifier is no
    # nn.Linear that CAM could read
    unseen = {"cam", "guided_backprop", "deconvnet", "guided_gradcam"}
    cnn = {m.name for m in all_methods() if m.family != "attention"}  # a ResNet has no attention
    assert set(model.methods()) == cnn - unseen
    x = torch.randn(2, 3, 64, 64)
    for method in ("gradcam", "saliency", "integrated_gradients"):
        ours = explain(model.handle, x, method, ExplainParams(seed=0))
        eager = explain(ModelHandle(ref, input_size=(3, 64, 64)), x, method, ExplainParams(seed=0))
        assert torch.equal(ours.targets, eager.targets)
        torch.testing.assert_close(
            ours.maps, eager.maps, rtol=1e-3, atol=1e-3 * float(eager.maps.abs().max())
        )


def test_export_without_a_dynamic_batch_is_a_clear_load_error(tmp_path: Path) -> None:
    _export(torchvision.models.resnet18(num_classes=4), tmp_path / "static.pt2", dynamic_batch=False)
    spec = ModelSpec(name="s", source="export", weights=tmp_path / "static.pt2", input_size=(3, 64, 64))
    with pytest.raises(ModelLoadError, match="dynamic batch"):
        ModelRegistry.from_specs([spec], device="cpu")
