"""An open-set second opinion at full resolution: is the subject of the upload one of CIFAR-10's classes at all?

Every zoo member sees an upload at 32x32, where a face and a frog are a few dozen pixels apart. EfficientNet-Lite0
comes with its ImageNet-1k classifier (the offline package's weights): at its own input size (224 px, from the
upload itself, not from the 32x32) it names 1000 classes, 223 of which are kinds of a CIFAR-10 class by WordNet
(cifar_core/imagenet_cifar.json, built by scripts/imagenet_cifar_map.py). The opinion is the probability mass on
those 223 classes, per CIFAR class and in all, and the top ImageNet label:

    judge = ImageNetJudge()
    opinion = judge(load_image(upload, draft_side=judge.input_side))   # any RGB PIL image
    opinion.top, opinion.top_probability, opinion.top_cifar, opinion.cifar_mass

Whether the demo uses it beside the feature-space detector (cifar_core/ood.py) is decided by
benchmarks/ood.py's numbers, not here.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .data import CLASSES

MAP_FILE = Path(__file__).with_name("imagenet_cifar.json")
MODEL = "tf_efficientnet_lite0"


@lru_cache(maxsize=1)
def mapping() -> tuple[list[str], np.ndarray]:
    """(ImageNet label per class index: its first name, CIFAR class index per ImageNet class or -1)."""
    record = json.loads(MAP_FILE.read_text())
    names = [c["name"].split(",")[0] for c in record["classes"]]
    cifar = np.array([CLASSES.index(c["cifar"]) if c["cifar"] else -1 for c in record["classes"]])
    return names, cifar


@dataclass
class Opinion:
    top: str                    # the ImageNet classifier's top class, e.g. "espresso"
    top_probability: float
    top_cifar: str | None       # the CIFAR-10 class that top class is a kind of, or None
    cifar_mass: float           # probability on all ImageNet classes that are kinds of a CIFAR-10 class
    by_cifar: dict[str, float]  # that mass per CIFAR-10 class
    seconds: float              # preprocessing + forward pass for this image

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()} | {
            "by_cifar": {k: round(v, 4) for k, v in self.by_cifar.items()}}


def opinions_from_logits(logits: torch.Tensor, seconds: float = 0.0) -> list[Opinion]:
    """ImageNet logits (N x 1000) -> one Opinion per row."""
    names, cifar = mapping()
    probs = torch.softmax(logits.float(), dim=1).numpy()
    per_class = np.stack([probs[:, cifar == c].sum(1) for c in range(len(CLASSES))], axis=1)
    out = []
    for p, per in zip(probs, per_class):
        top = int(p.argmax())
        out.append(Opinion(top=names[top], top_probability=float(p[top]),
                           top_cifar=CLASSES[cifar[top]] if cifar[top] >= 0 else None,
                           cifar_mass=float(per.sum()), by_cifar=dict(zip(CLASSES, map(float, per))),
                           seconds=seconds))
    return out


class ImageNetJudge:
    """The ImageNet classifier with its own evaluation transform (resize, centre crop, normalize: timm's data
    config for the model). Loads on first use; one image at a time (a lock), like the zoo's members."""

    input_side = 224  # the model's ImageNet input size (timm's data config, checked when it loads)

    def __init__(self, model: torch.nn.Module | None = None):
        self._model = model
        self._transform = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        if self._transform is not None:
            return
        if self._model is None:
            from .models.pretrained import lite_imagenet_classifier
            self._model = lite_imagenet_classifier(MODEL)
        from timm.data import create_transform, resolve_data_config
        config = resolve_data_config({}, model=self._model)
        if config["input_size"][-1] != self.input_side:
            raise ValueError(f"{MODEL} expects {config['input_size'][-1]} px, not {self.input_side}")
        self._model = self._model.eval().to(memory_format=torch.channels_last)
        self._transform = create_transform(**config)

    @torch.inference_mode()
    def logits(self, images) -> torch.Tensor:
        """PIL images (any mode) -> ImageNet logits (N x 1000)."""
        with self._lock:
            self._load()
            x = torch.stack([self._transform(im.convert("RGB")) for im in images])  # grey photos too
            x = x.contiguous(memory_format=torch.channels_last)
            return self._model(x).float()

    def __call__(self, image) -> Opinion:
        t0 = time.perf_counter()
        logits = self.logits([image])
        return opinions_from_logits(logits, time.perf_counter() - t0)[0]


def cached_logits(judge: ImageNetJudge, images: list, batch: int = 32) -> torch.Tensor:
    """ImageNet logits of many PIL images, kept on disk (ood.disk_cached) keyed by the images' pixels and the
    model, so that benchmarks/ood.py reruns in seconds."""
    import hashlib

    from .ood import disk_cached
    digest = hashlib.sha1()
    for im in images:
        digest.update(f"{im.size}{im.mode}".encode())
        digest.update(im.tobytes())
    key = f"imagenet|{MODEL}|{judge.input_side}|{digest.hexdigest()}"  # the logits do not depend on the mapping
    return disk_cached(key, lambda: {"logits": torch.cat([judge.logits(images[i:i + batch])
                                                          for i in range(0, len(images), batch)])})["logits"]
