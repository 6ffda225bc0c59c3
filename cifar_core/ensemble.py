"""The model zoo on disk and softmax-averaging ensembles of its members.

`load_zoo()` finds every checkpoint folder under checkpoints/, so a newly trained model joins
the demo and the ensemble without code changes. Each member's probabilities are calibrated by
its own temperature (meta.json) before averaging.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import META, CheckpointError, load_checkpoint
from .predictor import Predictor

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / "checkpoints"


@dataclass
class Member:
    name: str           # checkpoint folder name
    path: Path
    meta: dict
    predictor: Predictor


def find_checkpoints(root: str | Path = DEFAULT_ROOT) -> list[Path]:
    root = Path(root)
    return sorted(p for p in root.iterdir() if (p / META).exists()) if root.is_dir() else []


def load_member(path: str | Path, tta: int | None = None) -> Member:
    model, meta = load_checkpoint(path)
    level = meta.get("metrics", {}).get("tta", 0) if tta is None else tta
    predictor = Predictor(model, tta=level, temperature=float(meta.get("temperature", 1.0)), name=Path(path).name)
    return Member(Path(path).name, Path(path), meta, predictor)


def load_zoo(root: str | Path = DEFAULT_ROOT, tta: int | None = None) -> list[Member]:
    """Every loadable checkpoint under `root`; broken ones are skipped with a warning naming them."""
    members = []
    for path in find_checkpoints(root):
        try:
            members.append(load_member(path, tta))
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}")
    return members


class Ensemble:
    """Weighted average of the members' calibrated probabilities (weights default to equal)."""

    def __init__(self, members: list[Member], weights: list[float] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need {len(members)} non-negative weights with a positive sum, got {weights}")
        self.members = members
        self.weights = (w / w.sum()).tolist()

    def member_probs(self, images_u8: torch.Tensor) -> dict[str, dict]:
        """{name: {"probs": N x C tensor, "seconds": wall time}} for each member."""
        out = {}
        for m in self.members:
            t0 = time.perf_counter()
            probs = m.predictor.probs(images_u8)
            out[m.name] = {"probs": probs, "seconds": time.perf_counter() - t0}
        return out

    def combine(self, member_probs: dict[str, dict]) -> torch.Tensor:
        return sum(w * member_probs[m.name]["probs"] for w, m in zip(self.weights, self.members))

    def probs(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_probs(images_u8))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing NLL of softmax(logits / T) (temperature scaling, Guo et al. 2017).

    One scalar per model, fitted on validation data: accuracy is unchanged, confidences become
    honest (label smoothing, for one, leaves a model underconfident)."""
    logits = logits.detach().float().clone()  # a normal tensor even if made under inference_mode
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def calibrated_metrics(predictor: Predictor, data, split) -> tuple[dict, float]:
    """Val/test metrics at the predictor's TTA, with a temperature fitted on val (1.0 without val).

    Returns (metrics, temperature); each subset also records its uncalibrated NLL and ECE."""
    from .evaluate import metrics_from_logits
    logits = {s: predictor.logits(data.images[split.indices(s)]) for s in ("val", "test")
              if len(split.indices(s))}
    labels = {s: data.labels[split.indices(s)] for s in logits}
    temperature = fit_temperature(logits["val"], labels["val"]) if "val" in logits else 1.0
    metrics = {}
    for s in logits:
        raw = metrics_from_logits(logits[s], labels[s])
        metrics[s] = {**metrics_from_logits(logits[s], labels[s], temperature=temperature),
                      "nll_uncalibrated": raw["nll"], "ece_uncalibrated": raw["ece"]}
    metrics["tta"] = predictor.tta
    metrics["calibration"] = {"method": "temperature scaling", "fitted_on": "val" if "val" in logits else "none",
                              "temperature": temperature}
    return metrics, temperature
