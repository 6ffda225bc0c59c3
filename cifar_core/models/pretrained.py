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
