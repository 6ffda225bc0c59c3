"""Distillation: the zoo's ensemble teaches a small student; its twin trains on labels alone.

    result = distill_pair(data, "runs/distill", student="cifar_cnn_small", epochs=8)

Both twins run the same recipe, budget, seeds and split (`train` with the same TrainConfig);
only `distill_alpha` differs, so the accuracy gap is the teacher's effect.

Defaults alpha 0.5, T 1: the loss is then cross-entropy against a 50/50 mix of the smoothed label
and the teacher's probabilities, with the same gradient scale as plain training, so the level-3
recipe's large learning rate stays stable. Hinton's T = 4, alpha = 0.7 multiplies the soft term's
gradient by alpha * T = 2.8 on these targets, and the student diverged at the peak learning rate
(benchmarks/RESULTS.md, "Distillation").

The teacher is the zoo's fitted ensemble (weights and temperature from ensemble.json; members
with zero weight left out). Its soft targets are its calibrated probabilities, as log-probabilities
(valid logits: softmax(log p) = p), computed before training (the teacher never runs inside the
loop) and cached with the teacher's identity. Two ways:
- fixed (augment.views = 0): one target per training image, flip-averaged on the un-augmented
  image; the student sees shifted and flipped views of it, the target stays the same.
- consistent (augment.views = V, teacher_tta = 0): both twins' flips and shifts follow a plan of V
  views per image (view_plan), and the teacher labels every view as the student will see it, so
  the target fits the very image trained on (Beyer et al. 2022, "a good teacher is patient and
  consistent"). It costs V passes of the teacher over the training set, shared by every seed.
- function matching (augment.views = V, augment.mix = "mixup"): each planned view also blends every
  training image with a planned partner (a Beta(mix_alpha, mix_alpha) weight per image), and the
  teacher labels the blend. Its members have memorized the 48k training images (their targets there
  are nearly the labels), but not these blends: there its probabilities say something the labels do not.
- cross-fitted (a teacher folder holding one checkpoint per fold, trained with folds = K, fold = k):
  each training image is labelled by the one fold model that never trained on it, so every target is
  an out-of-fold prediction, the kind of dark knowledge a teacher has on images it has not memorized.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .augment import AugmentConfig, show_view, view_plan
from .checkpoint import atomic_write_bytes
from .data import Cifar10
from .engine import (TrainConfig, TrainResult, check_distill_config, held_out_rows, resolve_device, train,
                     training_rows)
from .ensemble import FIT_FILE, Ensemble, load_zoo
from .paths import checkpoints_dir

TEACHER_FILE = "teacher_logits.safetensors"
TEACHER_VIEWS_FILE = "teacher_view_logits.safetensors"


def teacher_ensemble(root=None, tta: int | None = 1) -> Ensemble:
    """The zoo's ensemble with its fitted weights (ensemble.json; equal weights when there is no
    fit for these checkpoints). Members the fit dropped (weight 0, below ensemble.MIN_WEIGHT) are left out:
    they would cost time, not teach."""
    root = checkpoints_dir(root)  # None: $CIFAR_CHECKPOINTS or checkpoints/, as load_zoo reads it
    members = load_zoo(root, tta=tta)
    if not members:
        raise ValueError(f"no teacher: no loadable checkpoints under {root}")
    if fold_configs(members):  # one model per fold: each labels its own fold alone, there is nothing to weigh
        return Ensemble(members, source="cross-fitted")
    with warnings.catch_warnings():  # fitted at the members' own TTA; the teacher may run lighter
        warnings.filterwarnings("ignore", message=".*other TTA levels.*")
        full = Ensemble.from_fit(members, Path(root) / FIT_FILE)
    return full.weighted_only()


def fold_configs(members) -> list[TrainConfig] | None:
    """The train configs of a cross-fitted teacher (every member trained on all but one fold), None for an
    ordinary one. A cross-fitted teacher is exactly one checkpoint per fold of one split."""
    cfgs = [TrainConfig.from_dict(m.meta.get("train_config") or {}) for m in members]
    if not any(c.folds for c in cfgs):
        return None
    names = ", ".join(f"{m.name} ({f'fold {c.fold} of {c.folds}' if c.folds else 'no folds'})"
                      for m, c in zip(members, cfgs))
    folds = {c.folds for c in cfgs}
    if 0 in folds or len(folds) > 1 or sorted(c.fold for c in cfgs) != list(range(cfgs[0].folds)):
        raise ValueError(f"a cross-fitted teacher is one checkpoint per fold (folds 0..K-1 of the same K), got: {names}")
    if len({(c.split, c.split_seed) for c in cfgs}) > 1 or len({m.meta.get("data", {}).get("fingerprint")
                                                              for m in members}) > 1:
        raise ValueError(f"the fold models of a cross-fitted teacher must share one split of one data set: {names}")
    return cfgs


def teacher_identity(teacher: Ensemble) -> dict:
    identity = {"members": [{"name": m.name, "saved_at": m.meta.get("saved_at"), "weight": round(w, 4),
                             "temperature": m.meta.get("temperature", 1.0)}
                            for m, w in zip(teacher.members, teacher.weights)],
                "ensemble_temperature": teacher.temperature}
    folds = fold_configs(teacher.members)
    return {**identity, "cross_fitted_folds": len(folds)} if folds else identity


def teacher_logits(teacher: Ensemble, data: Cifar10, indices: torch.Tensor,
                   augment: AugmentConfig | None = None) -> torch.Tensor:
    """len(data) x C log-probabilities of the ensemble on `indices`; NaN on every other row, so a
    student can never silently learn from a row the teacher did not see.

    With planned views (augment.views = V > 0) the result is V x len(data) x C: the teacher's
    targets for the very flipped, shifted (and blended) images the student will see in each view;
    `indices` must then be the student's training rows, the pool its planned partners come from.

    A cross-fitted teacher labels each row with the fold model that held it out (fixed targets only)."""
    folds = fold_configs(teacher.members)
    if folds:
        if augment is not None and augment.views:
            raise ValueError("a cross-fitted teacher labels each training image once, un-augmented: no planned views")
        return _out_of_fold_log_probs(teacher, folds, data, indices)
    if augment is None or not augment.views:
        return _log_probs_on_rows(teacher, data.images[indices], indices, len(data))
    out = []
    for view in range(augment.views):
        t0 = time.perf_counter()
        shown = show_view(data.images, indices, view_plan(len(data), view, augment, pool=indices), augment)
        out.append(_log_probs_on_rows(teacher, shown, indices, len(data)))
        print(f"teacher: view {view + 1}/{augment.views} labelled in {time.perf_counter() - t0:.0f} s", flush=True)
    return torch.stack(out)


def _log_probs_on_rows(teacher: Ensemble, images_u8: torch.Tensor, indices: torch.Tensor, n_rows: int):
    probs = teacher.probs(images_u8)
    out = torch.full((n_rows, probs.shape[1]), float("nan"))
    out[indices] = probs.clamp_min(1e-8).log()
    return out


def _out_of_fold_log_probs(teacher: Ensemble, folds: list[TrainConfig], data: Cifar10, indices: torch.Tensor):
    out = torch.full((len(data), len(data.classes)), float("nan"))
    for m, cfg in zip(teacher.members, folds):
        if m.meta.get("data", {}).get("fingerprint") not in (None, data.fingerprint):
            raise ValueError(f"fold model {m.name} was trained on other data than the student's: its folds differ")
        rows = held_out_rows(data, cfg)
        rows = rows[torch.isin(rows, indices)]
        t0 = time.perf_counter()
        part = m.predictor.probs(data.images[rows]).clamp_min(1e-8).log()
        print(f"teacher: {m.name} labelled the {len(rows)} rows of its fold in {time.perf_counter() - t0:.0f} s", flush=True)
        out[rows] = part
    missing = int(torch.isnan(out[indices, 0]).sum())
    if missing:
        raise ValueError(f"{missing} of the student's {len(indices)} training rows are in no fold of the cross-fitted "
                         "teacher (another split, or a student trained on other rows)")
    return out


def cached_teacher_logits(teacher: Ensemble, data: Cifar10, indices: torch.Tensor, folder: Path,
                          augment: AugmentConfig | None = None) -> torch.Tensor:
    """teacher_logits(), reused from `folder` when the same teacher already labelled the same data
    (and the same planned views)."""
    from safetensors.torch import load_file, save
    # what defines the planned views (nothing else of the augmentation reaches the teacher)
    views = ({k: getattr(augment, k) for k in ("views", "translate", "flip", "flip_mode")}
             if augment is not None and augment.views else None)
    if views and augment.mix != "none":  # keys of unmixed plans stay as they were: their caches stay valid
        views.update(mix=augment.mix, mix_alpha=augment.mix_alpha)
    path = folder / (TEACHER_FILE if views is None else TEACHER_VIEWS_FILE)
    key = json.dumps({"teacher": teacher_identity(teacher), "data": data.fingerprint,
                      "indices": int(indices.sum()), "n": len(indices), **({"views": views} if views else {})},
                     sort_keys=True)
    if path.exists():
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                if f.metadata().get("key") == key:
                    return load_file(str(path))["logits"]
        except Exception:  # a stale or broken cache is recomputed, never trusted
            pass
    logits = teacher_logits(teacher, data, indices, augment)
    atomic_write_bytes(path, save({"logits": logits.contiguous()}, metadata={"key": key}))
    return logits


def teacher_on_train(logits: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor,
                     augment: AugmentConfig | None = None) -> dict:
    """How much the teacher has to teach on the images the student trains on: its accuracy, its mean
    probability on the true class, its mean entropy (nats). A teacher that is ~100% right and sure on
    its own training images hands the student targets that are nearly the labels (RESULTS.md, Level 5).
    With planned views (V x N x C) the numbers are over every view; on planned mixup views the "true
    class" is that of the image with the larger blend weight."""
    rows = logits[..., indices, :].reshape(-1, logits.shape[-1]).float()
    if augment is not None and augment.views and augment.mix != "none":
        plans = [view_plan(len(labels), v, augment, pool=indices) for v in range(augment.views)]
        y = torch.cat([torch.where(p.lam[indices] >= 0.5, labels[indices], labels[p.partner[indices]]) for p in plans])
    else:
        y = labels[indices].repeat(rows.shape[0] // len(indices))
    p = rows.exp()
    return {"images": len(indices), "rows": rows.shape[0],
            "accuracy": round(float((rows.argmax(1) == y).float().mean()), 4),
            "true_class_probability": round(float(p.gather(1, y[:, None]).mean()), 4),
            "entropy_nats": round(float(-(p * rows).sum(1).mean()), 4)}


def finished_run(folder: Path, cfg: TrainConfig, data: Cifar10) -> TrainResult | None:
    """A checkpoint already trained in `folder` with exactly this config on these data (the twin
    does not depend on the teacher), as a TrainResult; None when there is none or anything differs.
    The data are compared by fingerprint, not by the path they were given as."""
    from .checkpoint import CheckpointError, load_checkpoint, read_meta
    try:
        meta = read_meta(folder)  # compare first: the weights are only read for a match
    except CheckpointError:
        return None
    ignore = {"progress", "data"}
    # through from_dict: fields added since the run was recorded take their defaults
    recorded = {k: v for k, v in TrainConfig.from_dict(meta.get("train_config", {})).to_dict().items()
                if k not in ignore}
    wanted = {k: v for k, v in cfg.to_dict().items() if k not in ignore}
    if recorded != wanted or meta.get("data", {}).get("fingerprint") != data.fingerprint:
        return None
    try:
        model, meta = load_checkpoint(folder)
    except CheckpointError:
        return None
    print(f"reusing {folder}: already trained with this exact config")
    return TrainResult(model=model, history=meta.get("history", []), metrics=meta["metrics"], out_dir=folder)


def distill_pair(data: Cifar10, out_root: str | Path, student: str = "cifar_cnn_small", epochs: float = 8,
                 seed: int = 0, distill_alpha: float = 0.5, distill_temperature: float = 1.0, teacher_root=None,
                 teacher_tta: int = 1, base: TrainConfig | None = None, progress: bool = True,
                 teacher_cache: str | Path | None = None) -> dict:
    """Train `<student>_scratch` and `<student>_distilled` under out_root; returns both results.
    The teacher's targets are cached in teacher_cache (default out_root): one folder can serve every seed."""
    out_root = Path(out_root)
    # The twin's config has no teacher settings, so one twin serves every alpha/temperature tried.
    cfg = replace(base or TrainConfig(), model=student, epochs=epochs, seed=seed, progress=progress,
                  distill_alpha=0.0, distill_temperature=TrainConfig.distill_temperature)
    distilled_cfg = replace(cfg, distill_alpha=distill_alpha, distill_temperature=distill_temperature)
    check_distill_config(distilled_cfg)  # fail now, not after the teacher's passes over the data
    if cfg.augment.views and teacher_tta:
        raise ValueError("with planned views the teacher labels each view as shown: use teacher_tta=0")
    teacher = teacher_ensemble(teacher_root, tta=teacher_tta)
    device = resolve_device(cfg.device)
    for m in teacher.members:  # the teacher labels 48k images (per view) once: on the GPU when there is one
        m.predictor.model.to(device)
    rows = training_rows(data, cfg)  # the student's rows (and its mixup partners' pool)
    logits = cached_teacher_logits(teacher, data, rows, Path(teacher_cache or out_root), cfg.augment)
    on_train = teacher_on_train(logits, data.labels, rows, cfg.augment)
    print(f"teacher on the {on_train['images']} training images: {100 * on_train['accuracy']:.2f}% right, "
          f"{on_train['true_class_probability']:.3f} on the true class, entropy {on_train['entropy_nats']:.3f} nats",
          flush=True)
    teacher = {**teacher_identity(teacher), "tta": teacher_tta, "alpha": distill_alpha,
               "temperature": distill_temperature, "on_train": on_train}
    scratch = finished_run(out_root / f"{student}_scratch", cfg, data) or train(
        cfg, out_root / f"{student}_scratch", data, extra_meta={"distillation": {"role": "from-scratch twin"}})
    distilled = train(distilled_cfg, out_root / f"{student}_distilled", data,
                      extra_meta={"distillation": {"role": "distilled", **teacher}}, teacher_logits=logits)
    return {"scratch": scratch, "distilled": distilled}
