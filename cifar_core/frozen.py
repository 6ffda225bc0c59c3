"""Fine-tuning from cached frozen stages (TrainConfig.freeze).

Fine-tuning an ImageNet EfficientNet-Lite on CIFAR spends most of its CPU time in the stem and
the first stages, which run at the highest resolution (at 160 px: stem + stages 0-2 are ~75% of
the forward pass). Their weights generalize across data sets, so we freeze them, run them once
per image and view, and train only what comes after, from the cached activations.

- `freeze = k` freezes the stem and stages 0..k (`-1`: the stem alone).
- The cache holds the frozen part's output for the training images (two views: as is and
  mirrored, so the flip augmentation costs nothing) and the validation images, in fp16 .npy files
  under `~/.cache/cifar_core/features/<key>/`, read memory-mapped. The key hashes everything that
  defines the activations (model, frozen weights, input size, freeze point, normalization, data
  fingerprint, the exact image indices, views): change any of them and the cache is rebuilt.
- The cache is written into a temporary folder and renamed into place when complete, so a killed
  run never leaves a half-written cache behind (the next run deletes the leftover folder).
- Nothing changes at inference: the trained model is an ordinary full model, frozen weights
  included, and is evaluated, explained and exported like any other.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import cache_dir
from .evaluate import metrics_from_logits
from .predictor import batch_for, preprocess

FORMAT = 1
VIEWS = ("identity", "flip")


# ---------------------------------------------------------------------------------------------
# Which part is frozen
# ---------------------------------------------------------------------------------------------

def check_freezable(model: nn.Module, freeze: int, name: str) -> None:
    """A freeze point needs a staged backbone (stem + `blocks` + head, as timm's EfficientNets)."""
    if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        raise ValueError(f"freeze needs a model built from a stem and stages (timm EfficientNet-style "
                         f"conv_stem/bn1/blocks/conv_head); {name} is not")
    last = len(model.blocks) - 1
    if not -1 <= freeze <= last:
        raise ValueError(f"freeze must name a stage of {name}: -1 (the stem alone) to {last}, got {freeze}")


def frozen_part(model: nn.Module, freeze: int) -> nn.Sequential:
    """The stem and stages 0..freeze, as one module (it shares the model's layers)."""
    return nn.Sequential(model.conv_stem, model.bn1, *model.blocks[:freeze + 1])


class Trunk(nn.Module):
    """What trains: stages freeze+1.. and the head, fed the frozen part's output.

    It shares its layers with the full model, so training it trains the model; in eval mode
    trunk(frozen_part(x)) == model(x)."""

    def __init__(self, model: nn.Module, freeze: int):
        super().__init__()
        self.blocks = model.blocks[freeze + 1:]
        self.conv_head, self.bn2 = model.conv_head, model.bn2
        self.global_pool, self.classifier = model.global_pool, model.classifier
        self.drop_rate = float(getattr(model, "drop_rate", 0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.conv_head(self.blocks(x)))
        x = self.global_pool(x)
        if self.drop_rate > 0:  # as timm's forward_head
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self.classifier(x)


def freeze_model(model: nn.Module, freeze: int) -> None:
    """No gradients (so no optimizer state and no weight decay) for the frozen part."""
    for p in frozen_part(model, freeze).parameters():
        p.requires_grad_(False)


def check_config(cfg, model: nn.Module) -> None:
    """What a cached run cannot do: anything that changes the pixels before the frozen part."""
    check_freezable(model, cfg.freeze, cfg.model)
    pixel = [f"augment.{k}={getattr(cfg.augment, k)}" for k in ("translate", "cutout", "views") if getattr(cfg.augment, k)]
    if cfg.low_res:
        pixel.append(f"low_res={cfg.low_res}")
    if pixel:
        raise ValueError(f"freeze caches the frozen stages' output of each image and its mirror, so pixel-level "
                         f"augmentation cannot apply: set {', '.join(k.split('=')[0] + '=0' for k in pixel)} "
                         f"(feature_shift shifts the cached feature maps instead)")
    if cfg.distill_alpha > 0:
        raise ValueError("freeze and distillation do not combine yet")
    if cfg.feature_shift < 0:
        raise ValueError(f"feature_shift must be >= 0 (feature-map pixels), got {cfg.feature_shift}")


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def content_digest(*parts) -> str:
    """sha256 over `parts` (bytes as they are, anything else as sorted JSON): a cache key that changes
    whenever any input that decides the cached content changes."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else json.dumps(part, sort_keys=True).encode())
    return h.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """A hash of the frozen weights and BN statistics (whatever their source)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_key(model: nn.Module, freeze: int, data, subsets: dict[str, torch.Tensor], views: int) -> dict:
    spec = model.spec
    return {"format": FORMAT, "model": spec.name, "freeze": freeze, "input_size": spec.input_size,
            "mean": list(spec.mean), "std": list(spec.std), "weights": weights_digest(frozen_part(model, freeze)),
            "data": data.fingerprint, "views": list(VIEWS[:views]), "dtype": "float16",
            "subsets": {k: content_digest(v.long().numpy().tobytes())[:16] for k, v in subsets.items()}}


@dataclass
class FeatureCache:
    """The frozen part's fp16 output; train[v] is view v of the training images (rows = their
    positions in the training index), val the validation images as is."""
    path: Path
    key: dict
    train: list                    # one array per view: N x C x H x W (memory-mapped, or a device tensor)
    val: object | None
    seconds: float = 0.0           # time spent computing (0 when reused)
    reused: bool = False
    info: dict = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return self.path.name

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in [*self.train, *([self.val] if self.val is not None else [])])

    def to(self, device: torch.device) -> "FeatureCache":
        """On a GPU, hold the arrays in device memory (fp16): batches then never touch the host."""
        if device.type != "cuda":
            return self
        self.train = [torch.from_numpy(np.array(a)).to(device) for a in self.train]  # np.array: a writable copy
        if self.val is not None:
            self.val = torch.from_numpy(np.array(self.val)).to(device)
        return self

    def train_batch(self, positions: torch.Tensor, flip: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """Float32 features of training rows `positions`, mirrored where `flip` is True."""
        if flip is None or len(self.train) == 1:
            return _rows(self.train[0], positions, device)
        out = None
        for view, chosen in ((0, ~flip), (1, flip)):
            sel = chosen.nonzero().squeeze(1)
            if not len(sel):
                continue
            rows = _rows(self.train[view], positions[sel], device)
            if out is None:
                out = torch.empty((len(positions), *rows.shape[1:]), dtype=rows.dtype, device=device)
            out[sel.to(device)] = rows
        return out

    def val_batches(self, batch_size: int, device: torch.device):
        for start in range(0, len(self.val), batch_size):
            yield _rows(self.val, torch.arange(start, min(start + batch_size, len(self.val))), device)


def _rows(array, positions: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.is_tensor(array):
        return array[positions.to(array.device)].float()
    order = positions.numpy()
    return torch.from_numpy(np.asarray(array[order], dtype=np.float32)).to(device)


def _clean_partials(root: Path) -> None:
    """Delete the temporary folders of runs that died while writing a cache."""
    for tmp in root.glob("*.partial-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (PermissionError: it does)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@torch.inference_mode()
def _compute(part: nn.Module, images_u8: torch.Tensor, spec, flip: bool, out: np.ndarray, device: torch.device,
             batch_size: int, bar) -> None:
    for start in range(0, len(images_u8), batch_size):
        x = preprocess(images_u8[start:start + batch_size].to(device), spec)
        if flip:
            x = x.flip(-1)
        x = x.contiguous(memory_format=torch.channels_last)
        out[start:start + len(x)] = part(x).to(torch.float16).cpu().numpy()
        bar.update(len(x))


def load_or_build(model: nn.Module, freeze: int, data, train_idx: torch.Tensor, val_idx: torch.Tensor,
                  views: int, device: torch.device, root: Path | None = None, batch_size: int | None = None,
                  progress: bool = True) -> FeatureCache:
    """The cache for this model, freeze point, images and views: read if it exists, else built."""
    root = Path(root) if root else cache_dir() / "features"
    root.mkdir(parents=True, exist_ok=True)
    _clean_partials(root)
    subsets = {"train": train_idx, "val": val_idx}
    key = cache_key(model, freeze, data, subsets, views)
    folder = root / content_digest(key)[:20]
    if views < len(VIEWS) and not (folder / "key.json").exists():
        # A cache that also holds the mirror holds this one: its identity view comes first (a run
        # without the flip reads it instead of building a smaller copy of the same activations).
        wider_key = cache_key(model, freeze, data, subsets, len(VIEWS))
        wider = root / content_digest(wider_key)[:20]
        if (wider / "key.json").exists():
            key, folder = wider_key, wider
    files = [f"train_{VIEWS[v]}.npy" for v in range(views)] + (["val.npy"] if len(val_idx) else [])
    reused = (folder / "key.json").exists()
    seconds = 0.0
    if not reused:
        t0 = time.perf_counter()
        tmp = root / f"{folder.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        part = frozen_part(model, freeze).eval()
        batch_size = batch_size or batch_for(model.spec.input_size)
        with torch.inference_mode():
            probe = part(preprocess(data.images[:1].to(device), model.spec).contiguous(memory_format=torch.channels_last))
        shape = tuple(probe.shape[1:])
        jobs = [(f"train_{VIEWS[v]}.npy", train_idx, v == 1) for v in range(views)]
        if len(val_idx):
            jobs.append(("val.npy", val_idx, False))
        total = sum(len(idx) for _, idx, _ in jobs)
        from tqdm import tqdm
        with tqdm(total=total, desc=f"feature cache ({model.spec.name}, freeze {freeze})", disable=not progress,
                  leave=False, dynamic_ncols=True, mininterval=2.0) as bar:
            for name, idx, flip in jobs:
                out = np.lib.format.open_memmap(tmp / name, mode="w+", dtype=np.float16, shape=(len(idx), *shape))
                _compute(part, data.images[idx], model.spec, flip, out, device, batch_size, bar)
                out.flush()
                del out
        seconds = time.perf_counter() - t0
        info = {"key": key, "shape": list(shape), "images": total, "seconds": round(seconds, 1),
                "device": str(device)}
        (tmp / "key.json").write_text(json.dumps(info, indent=1))  # written last: marks the folder complete
        try:
            os.rename(tmp, folder)
        except OSError:  # another run finished the same cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((folder / "key.json").read_text())
    arrays = [np.load(folder / f, mmap_mode="r") for f in files]
    return FeatureCache(folder, key, arrays[:views], arrays[views] if len(val_idx) else None, seconds, reused, info)


# ---------------------------------------------------------------------------------------------
# Training-time helpers
# ---------------------------------------------------------------------------------------------

@torch.inference_mode()
def evaluate_cached(trunk: Trunk, cache: FeatureCache, labels: torch.Tensor, device: torch.device,
                    batch_size: int = 500) -> dict:
    """Validation accuracy and NLL from the cached val features (what the full model gives, up
    to the fp16 rounding of the cache), without re-running the frozen part every epoch."""
    was_training = trunk.training
    trunk.eval()
    logits = torch.cat([trunk(x.contiguous(memory_format=torch.channels_last)).float().cpu()
                        for x in cache.val_batches(batch_size, device)])
    trunk.train(was_training)
    return metrics_from_logits(logits, labels.cpu())
