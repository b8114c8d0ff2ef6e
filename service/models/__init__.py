"""The model registry: specs (TOML), loaders (builtin/torchvision/timm/torchscript), resident models."""

from service.models.registry import DEFAULT_MODEL, LoadedModel, ModelRegistry, resolve_device
from service.models.spec import ModelSpec, load_config

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelRegistry", "ModelSpec", "load_config", "resolve_device"]
