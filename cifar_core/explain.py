"""Class-activation maps for every registered model, on top of the `grad-cam` package.

The target layer and any token->grid reshape come from the model's ModelSpec (`cam_layer`,
`reshape`), so a newly registered model is explainable without touching this file. One call:

    e = explain(predictor, image_u8, "gradcam")          # Explanation(cam=raw HxW map, ...)
    maps = normalize_maps([e.cam], shared=False)          # [0, 1] at 32x32
    rgb = overlay(image_u8, maps[0])                      # 256x256x3 uint8

Maps are kept raw (the package rescales every map to [0, 1] on its own), so that maps of
several models can be put on one shared scale, and are of the calibrated logit (logit / T).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from .models.registry import resolve_module
from .predictor import preprocess


class _RawCAM:
    """Mixin over a package CAM class: raw (unscaled) maps, and a context manager that
    releases the hooks without swallowing IndexError (the package's __exit__ prints and
    suppresses it, which would turn a bug into a silent None)."""

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        acts = [a.cpu().numpy() for a in self.activations_and_grads.activations]
        grads = [g.cpu().numpy() for g in self.activations_and_grads.gradients]
        if not acts or (self.uses_gradients and not grads):
            raise RuntimeError("the CAM target layer recorded no activations/gradients in this forward pass")
        size = self.get_target_width_height(input_tensor)
        cam = self.get_cam_image(input_tensor, self.target_layers[0], targets, acts[0],
                                 grads[0] if grads else None, eigen_smooth)
        return [np.stack([cv2.resize(np.float32(c), size, interpolation=cv2.INTER_LINEAR)
                          for c in np.maximum(cam, 0)])[:, None]]

    def aggregate_multi_layers(self, cam_per_layer):
        return np.concatenate(cam_per_layer, axis=1).mean(axis=1)

    def __exit__(self, exc_type, exc_value, tb):
        self.activations_and_grads.release()
        return False


def first_component(activations: np.ndarray) -> np.ndarray:
    """B x C x h x w -> B x h x w: the package's get_2d_projection_with_sign_correction, with a
    thin SVD (the package's full_matrices=True builds a C x C basis, 2048^2 for ResNet-50, to
    use one row of it: 0.23 s instead of 0.005 s per image)."""
    maps = []
    for a in np.nan_to_num(activations):
        flat = a.reshape(a.shape[0], -1).T
        flat = flat - flat.mean(axis=0)
        proj = (flat @ np.linalg.svd(flat, full_matrices=False)[2][0]).reshape(a.shape[1:])
        maps.append(-proj if abs(proj.min()) > abs(proj.max()) else proj)
    return np.float32(maps)


class _EigenCAM(_RawCAM, EigenCAM):
    # The first principal component has an arbitrary sign; without a correction half the
    # maps light up the background. The package's Seg-Eigen-CAM sign correction fixes it.
    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth):
        return first_component(activations)


class _ScoreCAM(_RawCAM, ScoreCAM):
    """The package's ScoreCAM weights, computed in bounded batches built lazily (the package
    materializes all C masked copies of the input at once, 1.2 GB for ResNet-50) and without
    a tqdm bar per batch."""
    batch_size = 64

    def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
        with torch.no_grad():
            acts = torch.from_numpy(activations).to(input_tensor.device)
            masks = F.interpolate(acts, size=input_tensor.shape[-2:], mode="bilinear", align_corners=True)
            lo = masks.flatten(2).min(-1)[0][..., None, None]
            hi = masks.flatten(2).max(-1)[0][..., None, None]
            masks = (masks - lo) / (hi - lo + 1e-8)
            weights = []
            for x, m, target in zip(input_tensor.detach(), masks, targets):
                scores = [target(self.model(x[None] * m[i:i + self.batch_size, None]))
                          for i in range(0, len(m), self.batch_size)]
                weights.append(torch.softmax(torch.cat(scores).float(), dim=0))
            return torch.stack(weights).cpu().numpy()


def _raw(cls):
    return type(cls.__name__, (_RawCAM, cls), {})


METHODS: dict[str, type] = {
    "gradcam": _raw(GradCAM),
    "gradcam++": _raw(GradCAMPlusPlus),
    "hirescam": _raw(HiResCAM),
    "layercam": _raw(LayerCAM),
    "eigencam": _EigenCAM,
    "scorecam": _ScoreCAM,
}
# Methods that run a forward pass per feature channel: tens of seconds per image on a 2-core CPU. The serving
# core runs them on a private copy of each model, so they never hold the model that other requests need.
SLOW_METHODS = frozenset({"scorecam"})


def _vit_grid(model):
    """Tokens B x (prefix + h*w) x C -> B x C x h x w, using the model's own prefix count and grid."""
    prefix = getattr(model, "num_prefix_tokens", 1)
    h, w = model.patch_embed.grid_size

    def reshape(tokens):
        patches = tokens[:, prefix:]
        if patches.shape[1] != h * w:
            raise ValueError(f"ViT gave {patches.shape[1]} patch tokens after {prefix} prefix tokens; "
                             f"its patch grid is {h}x{w}")
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)
    return reshape


RESHAPES = {"vit": _vit_grid}  # ModelSpec.reshape -> builder(model) of the package's reshape_transform


class _CalibratedTarget(ClassifierOutputTarget):
    def __init__(self, category: int, temperature: float):
        super().__init__(category)
        self.temperature = temperature

    def __call__(self, output):
        return super().__call__(output) / self.temperature


@contextmanager
def explaining(predictor):
    """Hold the model's lock, enable autograd even inside no_grad/inference_mode, and hand the
    model back exactly as found: per-module train/eval, requires_grad and .grad of every parameter.

    Parameters are frozen while explaining: gradients only need to reach the target layer
    (through the input), so no weight gradients are computed or left behind."""
    model = predictor.model
    with predictor.lock, torch.inference_mode(False), torch.enable_grad():
        modes = [(m, m.training) for m in model.modules()]
        params = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        try:
            model.eval()
            for p, _, _ in params:
                p.requires_grad_(False)
            yield model
        finally:
            for m, training in modes:
                m.training = training
            for p, requires_grad, grad in params:
                p.requires_grad_(requires_grad)
                p.grad = grad


def _as_batch(images_u8) -> torch.Tensor:
    images = torch.as_tensor(images_u8)
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images 3xHxW or Nx3xHxW, got {images.dtype} {tuple(images.shape)}")
    return images.clone()  # a normal tensor even if the caller made it under inference_mode


def _scorecam_batch(input_size: int) -> int:
    return max(1, min(256, (1 << 20) // input_size ** 2))  # ~12 MB of input per batch: 256 at 32px, 20 at 224px


@dataclass
class Explanation:
    model: str          # predictor.name
    method: str
    target: int         # class index explained
    probability: float  # the model's calibrated probability of `target` for this image
    cam: np.ndarray     # float32 HxW at the model's input resolution, raw (not normalized)


def explain_batch(predictor, images_u8, method: str = "gradcam", targets=None,
                  aug_smooth: bool = False, eigen_smooth: bool = False) -> list[Explanation]:
    """explain() for a batch: targets None (predicted classes), one int, or one per image."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {', '.join(METHODS)}")
    if predictor.spec.reshape and predictor.spec.reshape not in RESHAPES:
        raise ValueError(f"{predictor.name}: unknown reshape {predictor.spec.reshape!r}; known: {', '.join(RESHAPES)}")
    images = _as_batch(images_u8)
    spec = predictor.spec
    with explaining(predictor) as model:
        probs = predictor.probs(images).tolist()  # the served prediction (with the model's TTA)
        n_classes = len(probs[0])
        if targets is None:
            targets = [int(np.argmax(p)) for p in probs]
        elif np.ndim(targets) == 0:
            targets = [int(targets)] * len(images)
        targets = [int(t) for t in targets]
        if len(targets) != len(images) or not all(0 <= t < n_classes for t in targets):
            raise ValueError(f"targets {targets} must be {len(images)} class indices in [0, {n_classes})")
        x = preprocess(images, spec).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        layer = resolve_module(model, spec.cam_layer)
        reshape = RESHAPES[spec.reshape](model) if spec.reshape else None
        with METHODS[method](model, [layer], reshape_transform=reshape) as cam:
            if isinstance(cam, _ScoreCAM):
                cam.batch_size = _scorecam_batch(spec.input_size)
            maps = cam(x, [_CalibratedTarget(t, predictor.temperature) for t in targets],
                       aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
    return [Explanation(predictor.name, method, t, float(p[t]), np.float32(m))
            for t, p, m in zip(targets, probs, maps)]


def explain(predictor, image_u8, method: str = "gradcam", target: int | None = None,
            aug_smooth: bool = False, eigen_smooth: bool = False) -> Explanation:
    """The map of `target` (default: the predicted class) for one uint8 image (3xHxW or 1x3xHxW).

    The map explains the plain (un-augmented) forward pass; `probability` is the served,
    calibrated one (with the predictor's TTA), as in the rest of the app."""
    images = _as_batch(image_u8)
    if len(images) != 1:
        raise ValueError(f"explain() takes one image, got {len(images)}; use explain_batch()")
    return explain_batch(predictor, images, method, target, aug_smooth, eigen_smooth)[0]


def explain_models(predictors, image_u8, method: str = "gradcam", target: int | None = None,
                   **kw) -> list[Explanation]:
    """One explanation per model; target None lets each model explain its own predicted class
    (pass the ensemble's class as `target` when the maps go into ensemble_map)."""
    return [explain(p, image_u8, method, target, **kw) for p in predictors]


def _resize(m: np.ndarray, size: int) -> np.ndarray:
    shrink = m.shape[0] > size or m.shape[1] > size
    out = cv2.resize(np.float32(m), (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out


def normalize_maps(cams: list[np.ndarray], shared: bool = False, size: int = 32) -> list[np.ndarray]:
    """Resize every map to size x size and scale it to [0, 1]: each by its own min/max, or
    (shared=True) all by one common min/max so that magnitudes compare across maps."""
    resized = [_resize(c, size) for c in cams]
    if shared:
        lo = min(float(r.min()) for r in resized) if resized else 0.0
        hi = max(float(r.max()) for r in resized) if resized else 0.0
        bounds = [(lo, hi)] * len(resized)
    else:
        bounds = [(float(r.min()), float(r.max())) for r in resized]
    # A constant map carries no saliency: it becomes all zeros rather than a division by zero.
    return [np.float32((r - lo) / (hi - lo)) if hi > lo else np.zeros_like(r)
            for r, (lo, hi) in zip(resized, bounds)]


def ensemble_map(explanations: list[Explanation], weights: list[float], size: int = 32) -> np.ndarray:
    """The members' maps, each scaled to [0, 1] on its own (raw magnitudes differ per architecture),
    averaged with the ensemble weights. Not re-stretched: 1 means every member's peak is there."""
    if not explanations or len(weights) != len(explanations):
        raise ValueError(f"need one weight per explanation, got {len(weights)} for {len(explanations)}")
    if len({e.target for e in explanations}) > 1:
        raise ValueError("the explanations are of different classes "
                         f"{[e.target for e in explanations]}; explain every member for the same target")
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
    maps = normalize_maps([e.cam for e in explanations], shared=False, size=size)
    return np.float32(np.clip(sum(wi * m for wi, m in zip(w / w.sum(), maps)), 0.0, 1.0))


def overlay(image_u8, cam01: np.ndarray, alpha: float = 0.5, size: int = 256) -> np.ndarray:
    """size x size x 3 uint8: the image and the [0, 1] map both upscaled smoothly (bicubic /
    bilinear, never nearest), the map in the jet colormap at weight `alpha`."""
    image = torch.as_tensor(image_u8)
    image = image[0] if image.dim() == 4 else image
    rgb = image.permute(1, 2, 0).numpy().astype(np.float32) / 255.0
    rgb = np.clip(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)
    heat = np.clip(cv2.resize(np.float32(cam01), (size, size), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    return show_cam_on_image(rgb, heat, use_rgb=True, image_weight=1.0 - alpha)
