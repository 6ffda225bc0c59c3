"""Predictor: the one way a model turns uint8 images into calibrated probabilities.

preprocess per the model's spec (resize, normalize) -> logits (optionally averaged over
test-time augmentations) -> / temperature -> softmax. Training evaluation, the CLI, the
ensemble and the demo all go through here, so they can never disagree on preprocessing.
"""
from __future__ import annotations

import threading
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import timing
from .augment import normalize, resize, to_float
from .models.registry import classifier_of


# Kept beside the models rather than on them, so that models stay deep-copyable (export, quantization).
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


# Inference batches hold about this many input pixels: a few million keep the large early activations
# within the CPU caches' reach. At 192 px, EfficientNet-Lite0's stem + stages 0-2 ran at 130 img/s in
# batches of 250 and 273 in batches of 56 on this 2-core CPU (benchmarks/inference_batch.py).
BATCH_PIXELS = 2 ** 21


def batch_for(input_size: int, cap: int = 500) -> int:
    """Inference batch size for a model fed `input_size` px: 500 at 32 px, 56 at 192, 41 at 224."""
    return max(1, min(cap, BATCH_PIXELS // max(1, input_size) ** 2))


def preprocess(images_u8: torch.Tensor, spec) -> torch.Tensor:
    """uint8 N x 3 x H x W -> normalized float at the model's input size."""
    return normalize(resize(to_float(images_u8), spec.input_size), spec.mean, spec.std)


def tta_views(x: torch.Tensor, level: int) -> list[tuple[float, torch.Tensor]]:
    """(weight, batch) pairs. 0: identity; 1: + mirror; 2: + mirrors of 1-pixel shifts."""
    views = [(1.0, x)]
    if level >= 1:
        views = [(0.5, x), (0.5, x.flip(-1))]
    if level >= 2:
        pad = max(1, x.shape[-1] // 32)  # one CIFAR pixel at any input size
        padded = F.pad(x, (pad,) * 4, mode="reflect")
        h, w = x.shape[-2:]
        up_left = padded[..., :h, :w]
        down_right = padded[..., 2 * pad:, 2 * pad:]
        views = [(0.25, x), (0.25, x.flip(-1))] + [
            (0.125, v) for s in (up_left, down_right) for v in (s, s.flip(-1))]
    return views


class Predictor:
    """Wraps a model in eval mode with its spec, TTA level and calibration temperature."""

    def __init__(self, model: nn.Module, spec=None, tta: int = 0, temperature: float = 1.0,
                 batch_size: int | None = None, name: str | None = None):
        self.model = model.eval()
        self.spec = spec or model.spec
        self.tta = tta
        self.temperature = temperature
        self.batch_size = batch_size or batch_for(self.spec.input_size)  # None: by input size
        self.name = name or self.spec.name
        self.fuse_views = True  # False: the reference path, one forward pass per TTA view (tests compare them)
        # One request at a time per model, shared by every Predictor that wraps it (hooks and BN
        # state live on the module); re-entrant because explain() calls logits() while holding it.
        with _LOCKS_GUARD:
            self.lock = _MODEL_LOCKS.setdefault(model, threading.RLock())

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (inputs are sent there); CPU for weightless runtimes (ONNX)."""
        params = getattr(self.model, "parameters", None)
        first = next(params(), None) if callable(params) else None
        return first.device if first is not None else torch.device("cpu")

    @torch.inference_mode()
    def logits(self, images_u8: torch.Tensor, tta: int | None = None) -> torch.Tensor:
        """Raw (uncalibrated) logits, TTA-averaged, for a uint8 batch of any size."""
        return self._run(images_u8, tta, features=False)[0]

    @torch.inference_mode()
    def logits_and_features(self, images_u8: torch.Tensor,
                            tta: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features) from the same forward passes: the classifier's input, averaged over
        the TTA views with the logits' weights (the classifier is linear, so the averaged features still map to
        the averaged logits). Out-of-distribution detectors (cifar_core/ood.py) read the features."""
        return self._run(images_u8, tta, features=True)

    def _run(self, images_u8: torch.Tensor, tta: int | None,
             features: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        level = self.tta if tta is None else tta
        with timing.stage(f"wait:{self.name}"):  # another request (or a Grad-CAM) holds this model
            self.lock.acquire()
        seen: list[torch.Tensor] = []
        hook = None
        try:
            if features:
                hook = classifier_of(self.model).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
            outs, feats = [], []
            for start in range(0, len(images_u8), self.batch_size):
                with timing.stage(f"preprocess:{self.name}"):
                    x = preprocess(images_u8[start:start + self.batch_size].to(self.device), self.spec)
                    views = tta_views(x.contiguous(memory_format=torch.channels_last), level)
                logits, feat = 0, 0
                with timing.stage(f"forward:{self.name}"):
                    for w, out, inp in self._forward_views(views, seen):
                        logits = logits + w * out
                        if features:
                            feat = feat + w * inp.flatten(1).float()
                outs.append(logits.float().cpu())
                if features:
                    feats.append(feat.cpu())
        finally:
            if hook is not None:
                hook.remove()
            self.lock.release()
        if not outs:
            return torch.empty(0, 10), (torch.empty(0, 0) if features else None)
        return torch.cat(outs), (torch.cat(feats) if features else None)

    def _forward_views(self, views, seen: list):
        """(weight, logits, classifier input) per TTA view. Small batches (a served image: 1 image x up to 6
        views) run as one forward pass over all views stacked: one pass of 6 images costs far less than six
        of 1 on a CPU (per-op overhead dominates at batch 1). Batches already at the pixel budget run view by
        view, so evaluation keeps its memory bound. Both give the same numbers up to float rounding (tested)."""
        n = len(views[0][1])
        if self.fuse_views and len(views) > 1 and n * len(views) <= self.batch_size:
            seen.clear()
            outs = self.model(torch.cat([v for _, v in views])).split(n)
            inps = seen[-1].split(n) if seen else [None] * len(views)
            return [(w, o, i) for (w, _), o, i in zip(views, outs, inps)]
        result = []
        for w, v in views:
            seen.clear()
            out = self.model(v)
            result.append((w, out, seen[-1] if seen else None))
        return result

    def probs(self, images_u8: torch.Tensor, tta: int | None = None) -> torch.Tensor:
        return self.calibrated(self.logits(images_u8, tta))

    def calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """This model's logits -> its temperature-calibrated probabilities."""
        return torch.softmax(logits / self.temperature, dim=1)
