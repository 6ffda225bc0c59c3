"""The training loop: one loop for every registered model, single process or torchrun/DDP.

Data stay in memory as tensors; each step slices a batch, augments it on the fly with batched
tensor ops, and takes one optimizer step. Per epoch: validation, a line in history.jsonl, the
best-on-val weights kept, and a resume point written atomically.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import frozen
from .runtime import keep_freed_memory, peak_rss_gb
from .augment import (AugmentConfig, augment_batch, cutout, flip_choices, mix_batch, normalize, random_translate,
                      resize, show_view, to_float, view_plan)
from .data import Cifar10, load_cifar10, make_split
from .ensemble import calibrated_metrics
from .evaluate import evaluate_predictor, plot_confusion, plot_curves
from .models import create_model
from .predictor import Predictor


@dataclass
class TrainConfig:
    model: str = "cifar_cnn"
    model_kwargs: dict = field(default_factory=dict)
    pretrained: bool | str = False
    pretrained_file: str | None = None
    input_size: int = 0               # side the model is fed; 0 = the model's registered size
    # optimization
    epochs: float = 10.0
    batch_size: int = 1024
    optimizer: str = "sgd"            # "sgd" (Nesterov), "adamw", or "muon" (conv filters; SGD for the rest)
    lr: float = 1.5                   # peak learning rate (mean loss over the batch)
    momentum: float = 0.85
    weight_decay: float = 1.33e-3     # PyTorch-style; never applied to norms and biases
    norm_bias_lr_scale: float = 64.0  # BN shifts learn faster (their scale is fixed in our CNN)
    label_smoothing: float = 0.2
    schedule: str = "triangle"        # "triangle" (warm up, linear decay), "cosine" or "constant"
    warmup_fraction: float = 0.23     # of all steps
    lr_start: float = 0.2             # factors of the peak lr at step 0 and at the end
    lr_end: float = 0.07
    lookahead: bool = True            # pull fast weights towards a slow average every 5 steps
    muon_lr: float = 0.16             # optimizer="muon": peak lr of the conv filters (relative steps;
                                      # 0.16 beat 0.24 on cifar_cnn, benchmarks/RESULTS.md)
    muon_momentum: float = 0.6
    # progressive resizing: the first steps see downscaled images, which cost far less (the conv
    # maps shrink with the square of the side), then the side grows in stages to full size
    low_res: int = 0                  # side at step 0; 0 = always the model's input size
    low_res_fraction: float = 0.0     # of all steps spent below full size (equal time per stage)
    low_res_step: int = 4             # side added per stage (low_res, low_res + step, ... < full)
    # the whitening stem's bias learns for this fraction of the steps, then freezes: the first
    # conv then needs no input gradient (6-8% cheaper steps for cifar_cnn on this CPU)
    stem_bias_fraction: float = 1.0
    # fine-tuning from cached frozen stages (cifar_core/frozen.py): the stem and stages 0..freeze
    # run once per image and view, and only the rest trains; None trains the whole model
    freeze: int | None = None
    feature_shift: int = 0            # with freeze: random shift of the cached maps, in feature pixels
    # data
    data: str | None = None
    split: str = "seed"
    split_seed: int = 0
    train_subset: int = 0             # >0: train on this many images (stratified), for quick runs
    # cross-fitting: folds > 1 deals the training rows into `folds` stratified folds (fixed by split_seed,
    # so every fold's run agrees on them) and trains on all but fold `fold`: the model has never seen
    # that fold's images, and its predictions there are out-of-fold (a cross-fitted distillation teacher)
    folds: int = 0
    fold: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # evaluation and runtime
    tta: int = 2                      # test-time augmentation level used for reported metrics
    seed: int = 0
    channels_last: bool = True
    device: str = "auto"              # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    bf16: bool | None = None          # autocast; None = on for cuda, off for cpu (no native bf16 matmul here)
    half_weights: bool = True         # save fp16 weights (metrics are measured on them)
    progress: bool = True
    # distillation (level 5): 0 = plain training; >0 mixes in soft targets given to train()
    distill_alpha: float = 0.0        # weight of the soft-target term (1 - alpha: hard labels)
    distill_temperature: float = 4.0  # softens teacher and student alike; the term is scaled by T^2

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["augment"] = AugmentConfig(**d.get("augment", {}))
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: nn.Module
    history: list
    metrics: dict
    out_dir: Path | None


def apply_settings(cfg, settings: list[str]):
    """`--set key=value` overrides: dotted keys reach into nested configs (augment.cutout=8).

    Values are JSON (a bare word is a string) and must have the field's declared type."""
    d = cfg.to_dict()
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text  # a bare word is a string: --set schedule=cosine
        *parents, leaf = key.split(".")
        node, owner = d, TrainConfig
        for part in parents:
            if part != "augment":
                raise ValueError(f"--set {key}: {part!r} is not a nested config (only augment.* is)")
            node, owner = node[part], AugmentConfig
        if leaf not in node:
            raise ValueError(f"--set {key}: unknown field {leaf!r}; known: {', '.join(sorted(node))}")
        declared = str(owner.__dataclass_fields__[leaf].type)
        if not _has_type(value, {t.strip() for t in declared.split("|")}):
            raise ValueError(f"--set {key}={text}: expected {declared}, got {type(value).__name__}")
        node[leaf] = value
    return TrainConfig.from_dict(d)


def _has_type(value, allowed: set[str]) -> bool:
    if value is None:
        return "None" in allowed
    if isinstance(value, bool):
        return "bool" in allowed
    if isinstance(value, int):
        return bool({"int", "float"} & allowed)
    return type(value).__name__ in allowed


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at `step` (0-based) of `total`."""
    t = step / max(1, total)
    w = cfg.warmup_fraction
    if t < w:
        return cfg.lr_start + (1 - cfg.lr_start) * t / w
    rest = (t - w) / max(1e-8, 1 - w)
    if cfg.schedule == "triangle":
        return 1 + (cfg.lr_end - 1) * rest
    if cfg.schedule == "cosine":
        return cfg.lr_end + (1 - cfg.lr_end) * 0.5 * (1 + math.cos(math.pi * rest))
    if cfg.schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {cfg.schedule!r}: use triangle, cosine or constant")


def step_counts(n_images: int, cfg: TrainConfig) -> tuple[int, int]:
    """(steps per epoch, total steps) of a run over n_images; an epoch's last batch may be short."""
    steps_per_epoch = math.ceil(n_images / cfg.batch_size)
    return steps_per_epoch, max(1, round(cfg.epochs * steps_per_epoch))


def train_size(step: int, total: int, cfg: TrainConfig, full: int) -> int:
    """Side of the images the model is trained on at `step` (progressive resizing).

    The sides low_res, low_res + low_res_step, ... below full each take an equal share of the
    first low_res_fraction of the steps; the rest (and all of training when low_res is 0) run at
    full size.
    """
    if cfg.low_res and cfg.low_res_step < 1:  # checked on every call, so a bad config fails at step 0
        raise ValueError(f"low_res_step must be >= 1 pixel, got {cfg.low_res_step}")
    if not cfg.low_res or cfg.low_res >= full or step >= cfg.low_res_fraction * total:
        return full
    stages = math.ceil((full - cfg.low_res) / cfg.low_res_step)
    stage = int(step / (cfg.low_res_fraction * total) * stages)
    return min(full, cfg.low_res + cfg.low_res_step * stage)


def stem_bias_trains(step: int, total: int, cfg: TrainConfig) -> bool:
    """Whether the stem's bias still learns at `step` (see TrainConfig.stem_bias_fraction)."""
    return step < cfg.stem_bias_fraction * total


def check_stem_freezes(model: nn.Module, name: str) -> None:
    """A stem freeze (stem_bias_fraction < 1) needs a model with a whitening stem."""
    if not hasattr(model, "freeze_stem_bias"):
        raise ValueError(f"stem_bias_fraction < 1 needs a model with a whitening stem (cifar_cnn*); {name} has none")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Weight decay on conv/linear weights only; norms and biases get none.

    Normalization parameters also get their own lr (norm_bias_lr_scale): in our CNN the BN
    scale is fixed, so the shift is the only per-channel knob and it must move fast. Other
    biases (e.g. the whitening stem's) keep the base lr: scaling them too destabilizes training.
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    decay, norms, other = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params:
            norms.append(p)
        elif p.ndim <= 1 or name.endswith(".bias"):
            other.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": norms, "weight_decay": 0.0, "lr_scale": cfg.norm_bias_lr_scale},
        {"params": other, "weight_decay": 0.0, "lr_scale": 1.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "muon":  # conv filters (4-D) leave the decay group for Muon; the head stays
        decay = groups[0]["params"]
        groups[0]["params"] = [p for p in decay if p.ndim != 4]
        groups = [g for g in groups if g["params"]] + [
            {"params": [p for p in decay if p.ndim == 4], "muon": True, "weight_decay": 0.0,
             "momentum": cfg.muon_momentum, "lr_scale": cfg.muon_lr / cfg.lr}]
    for group in groups:  # the peak lr (the training loop rescales it every step)
        group["lr"] = cfg.lr * group["lr_scale"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))
    if cfg.optimizer == "muon":
        from .optim import MuonSGD
        return MuonSGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use sgd, adamw or muon")


class Lookahead:
    """Slow weights that the fast ones are pulled back to every `every` steps.

    The pull strength ramps up (cubically) over training, so late training averages out the
    noise of a large learning rate; the final model is the slow weights.
    """

    def __init__(self, model: nn.Module, every: int = 5, max_decay: float = 0.95 ** 5):
        self.every, self.max_decay = every, max_decay
        self.slow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def step(self, model: nn.Module, step: int, total: int, final: bool = False) -> None:
        if not final and step % self.every:
            return
        decay = 1.0 if final else self.max_decay * (step / total) ** 3
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if k in self.slow:
                    self.slow[k].lerp_(v, 1 - decay)
                    v.copy_(self.slow[k])


def stratified_subset(labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Positions of `count` items, equally many per class, deterministic in `seed`."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per = max(1, count // len(classes))
    picks = [(labels == c).nonzero().squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)[:per]]
             for c in classes]
    return torch.cat(picks).sort().values


def fold_of(labels: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0..folds-1) of each item, stratified: each class is dealt round-robin in an order fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(labels), dtype=torch.long)
    for c in labels.unique():
        items = (labels == c).nonzero().squeeze(1)
        out[items[torch.randperm(len(items), generator=g)]] = torch.arange(len(items)) % folds
    return out


def check_folds(cfg: TrainConfig) -> None:
    if cfg.folds == 0:
        return
    if cfg.folds < 2 or not 0 <= cfg.fold < cfg.folds:
        raise ValueError(f"folds={cfg.folds}, fold={cfg.fold}: cross-fitting needs folds >= 2 and 0 <= fold < folds")
    if cfg.train_subset:
        raise ValueError("folds and train_subset do not combine: a fold run trains on all rows outside its fold")


def held_out_rows(data: Cifar10, cfg: TrainConfig, split=None) -> torch.Tensor:
    """The training rows of the split that a fold run (cfg.folds > 1) never trains on: its fold."""
    check_folds(cfg)
    if not cfg.folds:
        raise ValueError("held_out_rows: this run was not trained on folds (folds=0)")
    split = split or make_split(data, cfg.split, cfg.split_seed)
    return split.train[_in_own_fold(data, cfg, split)]


def _in_own_fold(data: Cifar10, cfg: TrainConfig, split) -> torch.Tensor:
    """For each of the split's training rows: is it in the fold this run holds out?"""
    return fold_of(data.labels[split.train], cfg.folds, cfg.split_seed) == cfg.fold


def training_rows(data: Cifar10, cfg: TrainConfig, split=None) -> torch.Tensor:
    """The data set rows a run trains on: the split's training rows, all but one fold of them (folds),
    or a stratified subset of them (train_subset). A teacher labelling planned views calls it too: mixup
    partners come from these rows."""
    check_folds(cfg)
    split = split or make_split(data, cfg.split, cfg.split_seed)
    if cfg.folds:
        return split.train[~_in_own_fold(data, cfg, split)]
    if not cfg.train_subset:
        return split.train
    return split.train[stratified_subset(data.labels[split.train], cfg.train_subset, cfg.seed)]


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                        labels_b: torch.Tensor | None = None, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Cross-entropy against lam * labels + (1 - lam) * labels_b: one weight for the batch (mix_batch)
    or one per image (a planned mixup view); plain cross-entropy when nothing is blended in."""
    smoothing = cfg.label_smoothing
    if isinstance(lam, torch.Tensor):
        per_image = lam * F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")
        per_image = per_image + (1 - lam) * F.cross_entropy(logits, labels_b, label_smoothing=smoothing,
                                                            reduction="none")
        return per_image.mean()
    loss = lam * F.cross_entropy(logits, labels, label_smoothing=smoothing)
    if lam < 1:
        loss = loss + (1 - lam) * F.cross_entropy(logits, labels_b, label_smoothing=smoothing)
    return loss


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     cfg: TrainConfig, labels_b: torch.Tensor | None = None,
                     lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Hinton et al.'s distillation loss: (1-a) CE(labels) + a T^2 KL(teacher_T || student_T).

    T^2 keeps the soft term's gradient scale independent of T, so alpha means the same at any T.
    On a planned mixup view the labels are the blend's (labels_b, lam), the teacher's target is its
    own reading of the blended image.
    """
    t = cfg.distill_temperature
    hard = mixed_cross_entropy(logits, labels, cfg, labels_b, lam)
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t
    return (1 - cfg.distill_alpha) * hard + cfg.distill_alpha * soft


def check_distill_config(cfg: TrainConfig) -> None:
    """Augmentations a teacher's targets cannot follow; checked before the teacher labels anything."""
    if cfg.distill_alpha <= 0:
        return
    if cfg.augment.mix != "none" and not cfg.augment.views:
        raise ValueError("distillation and mixup/cutmix drawn per batch do not combine: the teacher never saw "
                         "the mixed images (plan them: augment.views=V with augment.mix=mixup)")
    if cfg.augment.views and cfg.augment.cutout:
        raise ValueError("distillation over planned views and cutout do not combine: the teacher never saw the squares")


def check_teacher_logits(teacher_logits: torch.Tensor | None, data: Cifar10, train_idx: torch.Tensor,
                         cfg: TrainConfig) -> None:
    """Fixed soft targets are len(data) x C; with planned views (cfg.augment.views = V) they are
    V x len(data) x C, the teacher's targets for each view."""
    check_distill_config(cfg)
    if cfg.distill_alpha <= 0:
        return
    if teacher_logits is None:
        raise ValueError("distill_alpha > 0 needs teacher_logits (one row per image of the data set)")
    views = cfg.augment.views
    rows = (views, len(data)) if views else (len(data),)
    if teacher_logits.dim() != len(rows) + 1 or tuple(teacher_logits.shape[:-1]) != rows:
        shape = f"{views} views x {len(data)} images x classes" if views else f"{len(data)} x classes"
        raise ValueError(f"teacher_logits must be {shape} (indexed like data.images), "
                         f"got {tuple(teacher_logits.shape)}")
    if not torch.isfinite(teacher_logits[..., train_idx, :]).all():
        raise ValueError("teacher_logits has no (finite) value for some training images")


def teacher_targets(teacher_logits: torch.Tensor, rows: torch.Tensor, epoch: int, cfg: TrainConfig) -> torch.Tensor:
    """The soft targets of data set `rows` as shown in this epoch (its planned view, if any)."""
    if cfg.augment.views:
        return teacher_logits[epoch % cfg.augment.views, rows]
    return teacher_logits[rows]


def resolve_device(name: str, rank: int = 0) -> torch.device:
    if name == "auto":
        name = f"cuda:{rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
        # Training runs in bf16 autocast; evaluation stays true fp32 (no TF32), so metrics measured
        # on the GPU match what a CPU re-measures from the same checkpoint.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return device


# ---------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets WORLD_SIZE/RANK)
# ---------------------------------------------------------------------------------------------

def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# ---------------------------------------------------------------------------------------------
# Resume state: safetensors + JSON, never pickle
# ---------------------------------------------------------------------------------------------

def _save_resume(out_dir: Path, model, optimizer, lookahead, best_state, info: dict) -> None:
    from safetensors.torch import save
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
    if lookahead:
        tensors.update({f"slow.{k}": v.cpu().contiguous() for k, v in lookahead.slow.items()})
    if best_state:
        tensors.update({f"best.{k}": v.cpu().contiguous() for k, v in best_state.items()})
    resume = out_dir / "resume"
    resume.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_bytes(resume / "state.safetensors", save(tensors))
    ckpt.atomic_write_json(resume / "state.json", info)  # written last: it marks the pair complete


def _load_resume(out_dir: Path, model, optimizer, lookahead):
    from safetensors.torch import load_file
    resume = out_dir / "resume"
    if not (resume / "state.json").exists():
        return None
    info = json.loads((resume / "state.json").read_text())
    tensors = load_file(str(resume / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state = optimizer.state_dict()
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt_state["state"].setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict(opt_state)
    device = next(model.parameters()).device
    if lookahead:
        lookahead.slow = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("slow.")}
    best = {k[5:]: v.to(device) for k, v in tensors.items() if k.startswith("best.")} or None
    return info, best


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _planned_mixup_batch(data, rows: torch.Tensor, plan, aug: AugmentConfig, spec, gen, device):
    """A batch of planned mixup views: (normalized images, blended-in labels, one blend weight per image).

    The pixels are exactly those the teacher labelled (augment.show_view), and each image's partner and
    weight are fixed by the plan, so the student's blend matches its soft target."""
    x = normalize(to_float(show_view(data.images, rows, plan, aug).to(device)), spec.mean, spec.std)
    x = cutout(x, aug.cutout, gen)  # as augment_batch does (a twin may use it; a student may not)
    return x, data.labels[plan.partner[rows]].to(device), plan.lam[rows].to(device)


def train(cfg: TrainConfig, out_dir: str | Path | None = None, data: Cifar10 | None = None,
          resume: bool = False, extra_meta: dict | None = None,
          teacher_logits: torch.Tensor | None = None) -> TrainResult:
    """teacher_logits (len(data) x C, rows indexed like data.images) are the soft targets used
    when cfg.distill_alpha > 0 (see cifar_core/distill.py)."""
    rank, world = _distributed()
    is_main = rank == 0
    wall = {"started": time.time()}  # meta.json's wall_time: cache, training, final measurement
    keep_freed_memory()  # large activations stay in the heap: no page faults per batch (runtime.py)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device, rank)
    use_bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16
    check_distill_config(cfg)
    out_dir = Path(out_dir) if out_dir else None
    data = data or load_cifar10(cfg.data)
    split = make_split(data, cfg.split, cfg.split_seed)
    train_idx = training_rows(data, cfg, split)
    check_teacher_logits(teacher_logits, data, train_idx, cfg)
    model = create_model(cfg.model, pretrained=cfg.pretrained, pretrained_file=cfg.pretrained_file,
                         input_size=cfg.input_size or None, **cfg.model_kwargs)
    if cfg.stem_bias_fraction < 1:
        check_stem_freezes(model, cfg.model)
    if cfg.freeze is not None:
        frozen.check_config(cfg, model)
        frozen.freeze_model(model, cfg.freeze)
    spec = model.spec
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)

    cache = None
    if cfg.freeze is not None:
        # The frozen stages' output for every training image and its mirror (+ val), computed once
        # and reused by every later run with the same key; training then starts after them.
        cache = frozen.load_or_build(model, cfg.freeze, data, train_idx, split.val, 2 if cfg.augment.flip else 1,
                                     device, progress=cfg.progress and is_main).to(device)
        extra_meta = {**(extra_meta or {}), "feature_cache": {
            "freeze": cfg.freeze, "key": cache.digest, "fields": cache.key, "bytes": cache.nbytes,
            "shape": cache.info["shape"], "reused": cache.reused, "built_seconds": cache.info["seconds"],
            "built_on": cache.info["device"]}}
        wall["cache_s"] = round(cache.seconds, 1)
        if is_main:
            print(f"feature cache {cache.path} ({cache.nbytes / 2 ** 30:.2f} GiB fp16, "
                  f"{'reused' if cache.reused else f'built in {cache.seconds:.0f} s'})", flush=True)
        x_train = None
    else:
        # The whole training set, normalized once, at 32x32, on the training device (augment, then
        # resize per batch: an upsampled copy of 48k images would not fit in memory at 224 px).
        x_train = normalize(to_float(data.images[train_idx].to(device)), spec.mean, spec.std)
    y_train = data.labels[train_idx].to(device)
    if teacher_logits is not None:
        teacher_logits = teacher_logits.to(device)
    if hasattr(model, "init_from_data") and x_train is not None:
        model.init_from_data(x_train[:5000])

    optimizer = make_optimizer(model, cfg)
    lookahead = Lookahead(model) if cfg.lookahead else None
    n = len(y_train)
    steps_per_epoch, total_steps = step_counts(n, cfg)
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    history, best_state, best_val, start_epoch = [], None, -1.0, 0

    if resume and out_dir and (out_dir / "resume" / "state.json").exists():
        info, best_state = _load_resume(out_dir, model, optimizer, lookahead)
        history, best_val, start_epoch = info["history"], info["best_val"], info["epoch"] + 1
        if is_main:
            print(f"resuming {out_dir} after epoch {info['epoch'] + 1}/{n_epochs}")
    elif out_dir and is_main:
        (out_dir / "history.jsonl").unlink(missing_ok=True)

    trunk = frozen.Trunk(model, cfg.freeze) if cache is not None else model  # what the optimizer steps through
    train_model = nn.parallel.DistributedDataParallel(trunk) if world > 1 else trunk
    val_predictor = Predictor(model, spec, tta=0)
    t_train = time.perf_counter()

    for epoch in range(start_epoch, n_epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        # Augmentation randomness is seeded per epoch (and rank), so a resumed run is the same run.
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 101 + rank)
        plan = (view_plan(len(data), epoch % cfg.augment.views, cfg.augment, pool=train_idx)
                if cfg.augment.views else None)
        first_step = epoch * steps_per_epoch
        steps = min(steps_per_epoch, total_steps - first_step)
        loss_sum = correct = seen = 0.0
        bar = _progress(steps, f"epoch {epoch + 1}/{n_epochs}", cfg.progress and is_main)
        for i in range(steps):
            step = first_step + i
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size][rank::world]
            y = y_train[idx]
            if plan is not None and plan.partner is not None:  # planned mixup: the pixels the teacher labelled
                x, y_mix, lam = _planned_mixup_batch(data, train_idx[idx].cpu(), plan, cfg.augment, spec, gen, device)
            else:
                if cache is not None:  # the flip is a cached view; shifts move the feature maps
                    flip = flip_choices(len(idx), cfg.augment, gen, train_idx[idx], epoch, cfg.seed)
                    x = random_translate(cache.train_batch(idx, flip, device), cfg.feature_shift, gen)  # feature px
                else:
                    x = augment_batch(x_train[idx], cfg.augment, gen, indices=train_idx[idx], epoch=epoch,
                                      seed=cfg.seed, plan=plan)
                x, _, y_mix, lam = mix_batch(x, y, cfg.augment, gen)  # y_mix: the blended-in images' labels
            size = train_size(step, total_steps, cfg, spec.input_size)
            if not stem_bias_trains(step, total_steps, cfg) and model.stem_bias_trains():
                model.freeze_stem_bias()
                if world > 1:  # DDP expects a gradient for every parameter it was built with
                    train_model = nn.parallel.DistributedDataParallel(model)
            if cache is None:  # cached features are already the frozen part's output
                x = resize(x, size)
            x = x.contiguous(memory_format=memory_format)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(step, total_steps, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = train_model(x)
            if cfg.distill_alpha > 0:
                targets = teacher_targets(teacher_logits, train_idx[idx], epoch, cfg)
                loss = soft_target_loss(out.float(), targets, y, cfg, y_mix, lam)
            else:
                loss = mixed_cross_entropy(out.float(), y, cfg, y_mix, lam)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if lookahead:
                lookahead.step(model, step + 1, total_steps, final=step + 1 == total_steps)
            loss_sum += float(loss.detach()) * len(y)
            correct += float((out.argmax(1) == y).sum())
            seen += len(y)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            img_s=f"{seen * world / (time.perf_counter() - t0):.0f}")
        bar.close()
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "lr": cfg.lr * lr_factor(min(total_steps - 1, first_step + steps - 1), total_steps, cfg),
                  "seconds": round(seconds, 2), "images_per_s": round(seen * world / seconds, 1),
                  "train_size": size}
        if len(split.val):
            model.eval()
            if cache is not None:
                val = frozen.evaluate_cached(trunk, cache, data.labels[split.val], device)
            else:
                val = evaluate_predictor(val_predictor, data.images[split.val], data.labels[split.val])
            record.update(val_loss=val["nll"], val_acc=val["accuracy"])
            if val["accuracy"] >= best_val:
                best_val = val["accuracy"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(record)
        if is_main:
            print(json.dumps(record), flush=True)
            if out_dir:
                out_dir.mkdir(parents=True, exist_ok=True)
                with open(out_dir / "history.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                _save_resume(out_dir, model, optimizer, lookahead, best_state,
                             {"epoch": epoch, "history": history, "best_val": best_val})

    wall["train_s"] = round(time.perf_counter() - t_train, 1)
    if best_state is not None:
        model.load_state_dict(best_state)
    extra_meta = {**(extra_meta or {}), "wall_time": wall}
    metrics = finalize(model, cfg, data, split, out_dir if is_main else None, history, extra_meta)
    model.cpu()
    if world > 1:
        dist.barrier()
    return TrainResult(model=model, history=history, metrics=metrics, out_dir=out_dir)


def finalize(model, cfg: TrainConfig, data: Cifar10, split, out_dir: Path | None, history: list,
             extra_meta: dict | None = None) -> dict:
    """Measure the weights exactly as they will be saved, then write the checkpoint and plots."""
    model.eval()
    t0 = time.perf_counter()
    if cfg.half_weights:
        ckpt.round_trip_fp16(model)
    metrics, temperature = calibrated_metrics(Predictor(model, model.spec, tta=cfg.tta), data, split)
    wall = (extra_meta or {}).get("wall_time")
    if wall:  # where the run's time went: feature cache (if any), training, the final measurement
        wall["final_eval_s"] = round(time.perf_counter() - t0, 1)
        wall["total_s"] = round(time.time() - wall["started"], 1)
        wall["peak_rss_gb"] = peak_rss_gb()
    if out_dir:
        meta = build_meta(model, cfg, data, split, metrics, history, {"temperature": temperature, **(extra_meta or {})})
        ckpt.save_checkpoint(out_dir, model, meta, half=cfg.half_weights)
        if history:
            plot_curves(history, out_dir / "curves.png", title=out_dir.name)
        if "test" in metrics:
            plot_confusion(metrics["test"]["confusion"], out_dir / "confusion.png",
                           title=f"{out_dir.name}: test confusion ({split.name} split)")
        shutil.rmtree(out_dir / "resume", ignore_errors=True)
    return metrics


def build_meta(model, cfg: TrainConfig, data: Cifar10, split, metrics: dict, history: list,
               extra: dict | None = None) -> dict:
    return {
        "model": cfg.model,
        "model_kwargs": model.model_kwargs,
        "spec": model.spec.to_dict(),
        "classes": list(data.classes),
        "input_size": model.spec.input_size,
        "mean": list(model.spec.mean),
        "std": list(model.spec.std),
        "params": sum(p.numel() for p in model.parameters()),
        "train_config": cfg.to_dict(),
        "split": {"name": split.name, "seed": split.seed, "fingerprint": split.fingerprint,
                  "sizes": {s: len(split.indices(s)) for s in ("train", "val", "test")}},
        "data": {"source": data.source, "fingerprint": data.fingerprint,
                 "note": "offline JPEG q75 copy of CIFAR-10" if "imagefolder" in data.source else ""},
        "metrics": metrics,
        "history": history,
        "hardware": hardware(next(model.parameters()).device),
        "temperature": 1.0,  # replaced by the fitted one (see metrics.calibration)
        **(extra or {}),
    }


def hardware(device: torch.device) -> dict:
    """Where a run trained, for its meta.json: timings mean little without it."""
    import platform
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(device), "name": name, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, mininterval=1.0)
