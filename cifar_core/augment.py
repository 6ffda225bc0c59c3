"""Batched tensor augmentation and preprocessing (no per-sample PIL anywhere in training).

All functions take a float batch N x C x H x W and return a new batch; randomness comes
from an explicit torch.Generator so runs are reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugmentConfig:
    translate: int = 2        # max shift in pixels (reflect-padded random crop)
    flip: bool = True         # horizontal flip
    flip_mode: str = "alternate"  # "random" or "alternate" (each image flips every other epoch)
    cutout: int = 0           # side of a zeroed square; 0 disables
    mix: str = "none"         # "none", "mixup" or "cutmix": blend pairs of images and their labels
    mix_alpha: float = 1.0    # Beta(alpha, alpha) draws the blend weight
    # >0: flips and shifts follow a fixed plan of this many views per image (epoch e shows view
    # e % views), the same for every training seed, so a teacher can label those very views ahead
    # of training (consistent distillation, cifar_core/distill.py); 0: drawn afresh every epoch.
    # With mix="mixup" the plan also fixes each image's partner and blend weight (function matching)
    views: int = 0

    def __post_init__(self):
        if self.views < 0:
            raise ValueError(f"augment.views must be >= 0 (0: no planned views), got {self.views}")
        if self.views and self.mix == "cutmix":
            raise ValueError("planned views mix by mixup only (augment.mix=mixup); cutmix is drawn per batch")


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(255.0)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize to size x size; a no-op at the same size."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


def random_translate(x: torch.Tensor, pad: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Random crop of the reflect-padded batch: each image shifts by up to `pad` pixels."""
    if pad <= 0:
        return x
    n = x.shape[0]
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return translate(x, pad, dy, dx)


def translate(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Crop image i of the reflect-padded batch at offset (dy[i], dx[i]), each in [0, 2 * pad]."""
    if pad <= 0:
        return x
    _, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    # One slice per offset (at most 25 for pad=2): vectorized over all images that share it.
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            sel = ((dy == oy) & (dx == ox)).nonzero().squeeze(1).to(x.device)
            if len(sel):
                out[sel] = padded[sel, :, oy:oy + h, ox:ox + w]
    return out


def flip_choices(n: int, cfg: "AugmentConfig", gen: torch.Generator | None, indices: torch.Tensor | None,
                 epoch: int, seed: int) -> torch.Tensor | None:
    """Which of n images to mirror this epoch (None: no flipping): alternate when the data set
    indices are known, else at random. augment_batch flips by it; runs that train from cached
    views (cifar_core/frozen.py) pick the mirrored view with it."""
    if not cfg.flip:
        return None
    if cfg.flip_mode == "alternate" and indices is not None:
        return _alternate(indices, epoch, seed)
    return torch.rand(n, generator=gen) < 0.5


def mirror(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flip the images of the batch where mask is True."""
    return torch.where(mask.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def alternate_flip(x: torch.Tensor, indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    """Flip a fixed random half of the images on even epochs and the other half on odd ones.

    Every image is seen both ways within two epochs instead of by chance, which helps
    short runs (a public-knowledge trick from the CIFAR speed-run literature).
    """
    return mirror(x, _alternate(indices, epoch, seed))


def _alternate(indices: torch.Tensor, epoch: int, seed: int) -> torch.Tensor:
    return (_hash_indices(indices, seed) + epoch) % 2 == 1


def _hash_indices(indices: torch.Tensor, seed: int) -> torch.Tensor:
    # A cheap integer hash: a fixed pseudo-random bit per dataset index, for this seed.
    h = (indices.long() * 2654435761 + seed * 97531) % (2 ** 31)
    return (h >> 7) & 1


def cutout(x: torch.Tensor, size: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Zero one size x size square per image (centre anywhere, clipped at the border)."""
    if size <= 0:
        return x
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=gen)
    cx = torch.randint(0, w, (n, 1, 1), generator=gen)
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    inside = ((ys - cy).abs() <= size // 2) & ((xs - cx).abs() <= size // 2)
    return x.masked_fill(inside.unsqueeze(1).to(x.device), 0.0)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None,
                  indices: torch.Tensor | None = None, epoch: int = 0, seed: int = 0,
                  plan: ViewPlan | None = None) -> torch.Tensor:
    """Apply the configured augmentations to a float batch in [0, 1] (before normalization).
    With a plan (cfg.views > 0), flips and shifts are the plan's for these data set `indices`."""
    if plan is not None:
        x = apply_view(x, plan, indices, cfg)
    else:
        flip = flip_choices(x.shape[0], cfg, gen, indices, epoch, seed)
        if flip is not None:
            x = mirror(x, flip)
        x = random_translate(x, cfg.translate, gen)
    x = cutout(x, cfg.cutout, gen)
    return x


@dataclass
class ViewPlan:
    """One planned view of every image in a data set (rows indexed like data.images)."""
    flip: torch.Tensor  # bool
    dy: torch.Tensor    # translation offsets in [0, 2 * translate]
    dx: torch.Tensor
    # planned mixup: row r is shown as lam[r] * (its view) + (1 - lam[r]) * (the view of row partner[r])
    partner: torch.Tensor | None = None  # int64; rows outside the pool are their own partner
    lam: torch.Tensor | None = None      # float32 in [0, 1]; 1 outside the pool


def view_plan(n_images: int, view: int, cfg: AugmentConfig, pool: torch.Tensor | None = None) -> ViewPlan:
    """View number `view` of all n_images. It depends only on (n_images, view, cfg, pool), never on
    a run's seed or batch order, so a teacher and every student seed agree on what view v shows.
    Alternate flipping keeps its meaning: each image is flipped in every other view.

    With cfg.mix == "mixup", each row of `pool` (the training rows: partners never come from
    val or test) is blended with another pool row, one Beta(mix_alpha, mix_alpha) weight per row."""
    g = torch.Generator().manual_seed(1_000_003 + view)
    offsets = torch.randint(0, 2 * cfg.translate + 1, (2, n_images), generator=g)
    if not cfg.flip:
        flip = torch.zeros(n_images, dtype=torch.bool)
    elif cfg.flip_mode == "alternate":
        flip = _alternate(torch.arange(n_images), view, 0)
    else:
        flip = torch.rand(n_images, generator=g) < 0.5
    plan = ViewPlan(flip, offsets[0], offsets[1])
    if cfg.mix == "mixup":
        if pool is None:
            raise ValueError("planned mixup needs the pool of training rows to draw partners from")
        import numpy as np
        pool = pool.cpu().long()
        g = torch.Generator().manual_seed(2_000_003 + view)  # its own stream: flips and shifts stay as without mixing
        plan.partner = torch.arange(n_images)
        plan.partner[pool] = pool[torch.randperm(len(pool), generator=g)]
        plan.lam = torch.ones(n_images)
        rng = np.random.default_rng(2_000_003 + view)
        plan.lam[pool] = torch.from_numpy(rng.beta(cfg.mix_alpha, cfg.mix_alpha, len(pool))).float()
    return plan


def apply_view(x: torch.Tensor, plan: ViewPlan, indices: torch.Tensor, cfg: AugmentConfig) -> torch.Tensor:
    """Show the batch x (rows = data set rows `indices`) as the plan says: flip, then shift."""
    indices = indices.cpu()
    x = mirror(x, plan.flip[indices])
    return translate(x, cfg.translate, plan.dy[indices], plan.dx[indices])


def show_view(images_u8: torch.Tensor, rows: torch.Tensor, plan: ViewPlan, cfg: AugmentConfig) -> torch.Tensor:
    """Data set `rows` of images_u8 (every image of the data set) as the plan shows them, in uint8:
    the one function both the teacher (labelling ahead of training) and the student call, so they
    see the same pixels. Flips and shifts are exact in uint8; a planned blend is rounded once."""
    rows = rows.cpu()
    x = apply_view(images_u8[rows].float(), plan, rows, cfg)
    if plan.partner is not None:
        partner = plan.partner[rows]
        lam = plan.lam[rows].view(-1, 1, 1, 1)
        x = x * lam + apply_view(images_u8[partner].float(), plan, partner, cfg) * (1 - lam)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def mix_batch(x: torch.Tensor, y: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator | None = None):
    """Mixup or CutMix over the batch: (images, labels_a, labels_b, weight of labels_a).

    One blend weight per batch (the usual practice); each image's partner comes from a random permutation.
    The loss is weight * CE(labels_a) + (1 - weight) * CE(labels_b)."""
    if cfg.mix == "none":
        return x, y, y, 1.0
    if cfg.mix not in ("mixup", "cutmix"):
        raise ValueError(f"unknown mix {cfg.mix!r}: use none, mixup or cutmix")
    lam = _beta(cfg.mix_alpha, gen)
    partner = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if cfg.mix == "mixup":
        return x * lam + x[partner] * (1 - lam), y, y[partner], lam
    h, w = x.shape[-2:]
    cut_h, cut_w = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = (int(torch.randint(0, n, (1,), generator=gen)) for n in (h, w))
    y0, y1 = max(0, cy - cut_h // 2), min(h, cy + cut_h // 2)
    x0, x1 = max(0, cx - cut_w // 2), min(w, cx + cut_w // 2)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[partner][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)  # the label weight is the area actually kept
    return out, y, y[partner], lam


def _beta(alpha: float, gen: torch.Generator | None) -> float:
    # torch's Beta sampler takes no generator: draw a seed from ours so runs stay reproducible.
    import numpy as np
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
