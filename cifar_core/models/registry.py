"""One registry, one `create_model`: every model declares how it must be fed and explained.

A model is added by registering it once (see cifar_cnn.py, timm_models.py); nothing else in
the code names it. The spec travels into every checkpoint's meta.json, so a loaded model
is always preprocessed and explained the way it was trained.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int              # square side the network is fed (images are resized to it)
    mean: tuple                  # normalization applied after scaling pixels to [0, 1]
    std: tuple
    cam_layer: str               # dotted path of the Grad-CAM target module ("blocks.-1.norm1")
    reshape: str | None = None   # "vit": tokens -> spatial grid before Grad-CAM
    family: str = "timm"         # "custom" or "timm"
    description: str = ""
    kwargs: dict = field(default_factory=dict)  # builder defaults, overridable in create_model

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, _Entry] = {}


def register_model(spec: ModelSpec):
    """Decorator: `@register_model(ModelSpec(...))` over `builder(num_classes, pretrained, **kw)`."""
    def wrap(builder):
        if spec.name in _REGISTRY:
            raise ValueError(f"model {spec.name!r} is registered twice")
        _REGISTRY[spec.name] = _Entry(spec, builder)
        return builder
    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name].spec


def create_model(name: str, num_classes: int = 10, pretrained: bool | str = False,
                 pretrained_file: str | None = None, input_size: int | None = None, **kwargs) -> nn.Module:
    """Build a registered model. The result carries `.spec` (a ModelSpec) and `.model_kwargs`.

    pretrained: False, True (the best source available: offline package, else the online hub),
    or a source name ("hub", "package"). pretrained_file: a local weights file (safetensors).
    input_size: feed the model at this side instead of the registered one (CNNs with global
    pooling take any size; the choice is saved in the checkpoint's spec).
    """
    spec = get_spec(name)
    if input_size:
        from dataclasses import replace
        spec = replace(spec, input_size=int(input_size))
    merged = {**spec.kwargs, **kwargs}
    model = _REGISTRY[name].builder(num_classes=num_classes, pretrained=pretrained, **merged)
    if pretrained_file:
        from .pretrained import load_weights_file
        load_weights_file(model, pretrained_file)
    model.spec = spec
    model.model_kwargs = merged
    return model


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final linear layer; its input is the penultimate feature vector (out-of-distribution detectors
    read it). timm models name it via get_classifier(); ours call it `head`."""
    layer = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "head", None)
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no final nn.Linear classifier (found {type(layer).__name__})")
    return layer


def linear_head(model: nn.Module) -> tuple:
    """(W, b) with logits = features @ W.T + b, including a model's fixed logit scale (cifar_cnn's 1/9)."""
    layer = classifier_of(model)
    scale = float(getattr(model, "logit_scale", 1.0))
    bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
    return layer.weight.detach().float() * scale, bias.detach().float() * scale


def resolve_module(model: nn.Module, dotted: str) -> nn.Module:
    """`"blocks.-1.norm1"` -> model.blocks[-1].norm1 (negative indices allowed)."""
    module = model
    for part in dotted.split("."):
        if part.lstrip("-").isdigit():
            module = module[int(part)]
        else:
            module = getattr(module, part)
    return module
