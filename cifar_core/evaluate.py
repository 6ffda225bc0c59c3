"""Metrics (accuracy, per-class, confusion, NLL, ECE) and the plots saved beside checkpoints."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import CLASSES


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[dict]:
    """Equal-width confidence bins that hold predictions: {"share", "confidence", "accuracy"} each (the points
    of a reliability diagram)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            out.append({"share": float(in_bin.float().mean()), "confidence": float(conf[in_bin].mean()),
                        "accuracy": float(correct[in_bin].mean())})
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    return sum(b["share"] * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(probs, labels, bins))


def metrics_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                        classes=CLASSES) -> dict:
    logits = logits.float() / temperature
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    n = len(classes)
    confusion = torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1)
    return {
        "n": len(labels),
        "accuracy": float((pred == labels).float().mean()),
        "nll": float(F.cross_entropy(logits, labels)),
        "ece": expected_calibration_error(probs, labels),
        "per_class_accuracy": {c: round(float(a), 4) for c, a in zip(classes, per_class)},
        "confusion": confusion.tolist(),  # rows: true class, columns: predicted class
    }


def evaluate_predictor(predictor, images_u8: torch.Tensor, labels: torch.Tensor, tta: int | None = None) -> dict:
    logits = predictor.logits(images_u8, tta=tta)
    return metrics_from_logits(logits, labels, temperature=predictor.temperature)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain Markdown table (readable in a terminal, pastes into RESULTS.md)."""
    def cell(v):  # a "|" or newline inside a value would break the table
        return f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def read_history(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_figure(histories: dict[str, list[dict]], title: str = ""):
    """Loss and accuracy per epoch of one or more runs (name -> history), overlaid: one colour per
    run, dashed train, solid validation. Returns a matplotlib Figure for the caller to save or show.

    Figures here are made without pyplot: no global backend switch (a notebook keeps its inline plots after
    train() saved its curves), nothing for pyplot to keep alive, and safe on the demo's worker threads."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i % 10}"
        epochs = [r["epoch"] for r in history]
        for key, style in (("train", "--"), ("val", "-")):
            label = f"{name} {key}".strip()
            for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
                values = [r.get(f"{key}_{metric}") for r in history]
                if any(v is not None for v in values):
                    ax.plot(epochs, values, style, color=color, marker="o", ms=3, label=label)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (dashed: train, solid: validation)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """One run's curves as a PNG (meta's curves.png, the report's figures)."""
    _save_figure(curves_figure({"": history}, title), path)


def plot_confusion(confusion, path: Path, classes=CLASSES, title: str = "", normalize: bool = True) -> None:
    from matplotlib.figure import Figure  # no pyplot: see curves_figure
    cm = torch.tensor(confusion, dtype=torch.float)
    shown = cm / cm.sum(1, keepdim=True).clamp(min=1) if normalize else cm
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    shown = shown.numpy()
    im = ax.imshow(shown, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(len(classes)):
        for j in range(len(classes)):
            v = shown[i, j]
            ax.text(j, i, f"{v:.2f}" if normalize else f"{int(v)}", ha="center", va="center",
                    fontsize=7, color="white" if v > shown.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=100, format="png")
    if "matplotlib.pyplot" in sys.modules:  # a pyplot figure (the report's) is released; ours are not pyplot's
        sys.modules["matplotlib.pyplot"].close(fig)
    tmp.replace(path)
