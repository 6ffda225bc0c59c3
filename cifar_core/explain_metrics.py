"""Faithfulness of saliency maps: does removing what the map calls salient hurt the model more
than removing random pixels?

Pixels are removed on the 32x32 image itself (the same pixels for every model, whatever its
input size) and filled in by the ROAD noisy linear imputer the grad-cam package ships
(Rong et al. 2022), so a hole's shape alone does not tell the model much. Pixels are ranked
exactly (top k, random tie-break) rather than by the package's percentile threshold, which
removes far more than k pixels when a map has a plateau (e.g. ReLU zeros).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from .explain import explain_batch, normalize_maps

_IMPUTER = NoisyLinearImputer(noise=0.0)  # noise added below from a seeded generator instead


def remove_pixels(images_u8: torch.Tensor, maps: np.ndarray, fraction: float = 0.2,
                  seed: int = 0, noise: float = 0.01) -> torch.Tensor:
    """Impute the `fraction` highest-ranked pixels of each map (N x H x W, image resolution)."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n, _, h, w = images_u8.shape
    k = int(round(fraction * h * w))
    out = []
    for img, m in zip(images_u8, maps):
        order = np.lexsort((rng.random(h * w), -np.asarray(m, dtype=np.float64).ravel()))
        keep = torch.ones(h * w)
        keep[torch.from_numpy(order[:k].copy())] = 0
        x = img.float() / 255
        with warnings.catch_warnings():  # the imputer hands torch tensors to numpy (NumPy 2 deprecation)
            warnings.simplefilter("ignore", DeprecationWarning)
            filled = _IMPUTER(x, keep.view(h, w))
        filled = filled + noise * torch.randn(filled.shape, generator=gen) * (1 - keep.view(1, h, w))
        out.append((filled.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.stack(out)


def random_maps(n: int, size: int = 32, grid: int | None = None, seed: int = 0) -> np.ndarray:
    """Uniform noise per pixel, or (grid) smooth random blobs: noise on a grid x grid lattice
    upscaled bilinearly, as contiguous as a CAM of that feature-map size."""
    rng = np.random.default_rng(seed)
    if grid is None:
        return rng.random((n, size, size)).astype(np.float32)
    coarse = torch.from_numpy(rng.random((n, 1, grid, grid)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                           align_corners=False)[:, 0].numpy()


def confidence_drop(predictor, images_u8, targets, maps, fraction=0.2, seed=0) -> np.ndarray:
    """Per image: calibrated p(target) before minus after removing the map's top pixels."""
    idx = torch.arange(len(images_u8))
    t = torch.as_tensor(targets)
    before = predictor.probs(images_u8)[idx, t]
    after = predictor.probs(remove_pixels(images_u8, maps, fraction, seed))[idx, t]
    return (before - after).numpy()


def faithfulness(predictor, images_u8, method="gradcam", fraction=0.2, seed=0,
                 batch=32, baselines=(("random", None),)) -> dict[str, np.ndarray]:
    """Per-image confidence drops for the method's maps and each random baseline (name, grid),
    the predicted class as target. Returns {"map": drops, <baseline>: drops, "targets": ...}."""
    cams, targets = [], []
    for start in range(0, len(images_u8), batch):
        for e in explain_batch(predictor, images_u8[start:start + batch], method):
            cams.append(e.cam)
            targets.append(e.target)
    size = images_u8.shape[-1]
    maps = np.stack(normalize_maps(cams, size=size))
    out = {"targets": np.asarray(targets), "map": confidence_drop(predictor, images_u8, targets, maps, fraction, seed)}
    for name, grid in baselines:
        rand = random_maps(len(images_u8), size, grid, seed=seed + 1)
        out[name] = confidence_drop(predictor, images_u8, targets, rand, fraction, seed)
    return out


def paired_t(a: np.ndarray, b: np.ndarray) -> float:
    """t statistic of mean(a - b) over images (> ~2: a drops confidence more than b, not by chance)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    se = d.std(ddof=1) / np.sqrt(len(d))
    if se == 0:
        return 0.0 if d.mean() == 0 else float(np.copysign(np.inf, d.mean()))
    return float(d.mean() / se)
