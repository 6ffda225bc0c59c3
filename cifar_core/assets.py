"""What the serving core ships beside the checkpoints, computed once from the real data (a Space
has no dataset): the out-of-distribution threshold and the ensemble's most confident test
mistakes. `python -m demo.build_assets` writes them (demo/assets/); cifar_core.serving reads them.

The decisions live here, not in the UI: the threshold is chosen on validation images, never test,
so the test set stays untouched; the mistakes are the test images the ensemble gets wrong with the
highest confidence, a fixed number per true class.
"""
from __future__ import annotations

import sys

import torch

from .data import CLASSES
from .evaluate import metrics_from_logits

KEEP_IN_DISTRIBUTION = 0.95   # the OOD threshold keeps this fraction of validation images "in distribution"
MISTAKES_PER_CLASS = 40       # 400 images x 3 KB: well under a megabyte compressed


def ensemble_probs(ensemble, images: torch.Tensor, batch: int = 1000, progress: bool = True) -> torch.Tensor:
    """Calibrated ensemble probabilities of uint8 images, in batches (progress on stderr)."""
    out = []
    for start in range(0, len(images), batch):
        out.append(ensemble.probs(images[start:start + batch]))
        if progress:
            print(f"  {min(start + batch, len(images))}/{len(images)}", file=sys.stderr, flush=True)
    return torch.cat(out)


def ood_threshold(scores: torch.Tensor, keep: float = KEEP_IN_DISTRIBUTION) -> float:
    """The score below which an image counts as out of distribution: `keep` of `scores` (held-out
    in-distribution images) lie at or above it."""
    return float(torch.quantile(scores.float(), 1 - keep))


def choose_mistakes(images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, indices: torch.Tensor,
                    per_class: int = MISTAKES_PER_CLASS) -> dict:
    """The `per_class` most confident wrong predictions of each true class, as numpy arrays."""
    import numpy as np
    pred = probs.argmax(1)
    conf = probs.max(1).values
    keep = []
    for c in range(len(CLASSES)):
        wrong = torch.nonzero((labels == c) & (pred != c)).flatten()
        keep.append(wrong[conf[wrong].argsort(descending=True)][:per_class])  # most confident first
    keep = torch.cat(keep)
    return dict(images=images[keep].numpy(), labels=labels[keep].numpy().astype(np.int8),
                predictions=pred[keep].numpy().astype(np.int8), confidence=conf[keep].numpy().astype(np.float32),
                dataset_index=indices[keep].numpy().astype(np.int32))


def compute_assets(lab, data, split, photos: dict[str, torch.Tensor] | None = None,
                   progress: bool = True) -> tuple[dict, dict]:
    """(assets.json's content, mistakes arrays) for the serving core's zoo `lab` on `split`.

    photos: name -> decoded example image, whose OOD scores are recorded for display."""
    names = lab.names
    held_out = split.val if len(split.val) else split.test
    val_probs = ensemble_probs(lab.ensemble, data.images[held_out], progress=progress)
    # OOD: the max calibrated ensemble probability (MSP), thresholded on validation images
    threshold = ood_threshold(val_probs.max(1).values)
    test_images, test_labels = data.images[split.test], data.labels[split.test]
    test_probs = ensemble_probs(lab.ensemble, test_images, progress=progress)
    test_metrics = metrics_from_logits(test_probs.clamp_min(1e-12).log(), test_labels)
    mistakes = choose_mistakes(test_images, test_labels, test_probs, split.test)
    photo_scores = {name: round(float(lab.ensemble.probs(x[None]).max()), 4) for name, x in (photos or {}).items()}
    assets = {
        "members": names,
        "weights": lab.ensemble.weights,
        "split": {"name": split.name, "seed": split.seed, "fingerprint": split.fingerprint,
                  "test_size": len(split.test)},
        "ood": {
            "score": "max calibrated ensemble probability (max softmax probability, MSP)",
            "rule": "out of distribution when score < threshold",
            "threshold": round(threshold, 4),
            "chosen_on": f"{'validation' if len(split.val) else 'test'} split, {len(held_out)} images",
            "keeps_in_distribution": KEEP_IN_DISTRIBUTION,
            "members": names,
            "example_scores": photo_scores,
        },
        "ensemble_test": {k: test_metrics[k] for k in ("n", "accuracy", "nll", "ece", "per_class_accuracy",
                                                        "confusion")},
        "mistakes": {"file": "mistakes.npz", "count": int(len(mistakes["labels"])),
                     "total_wrong": int((test_probs.argmax(1) != test_labels).sum()),
                     "per_class_cap": MISTAKES_PER_CLASS, "order": "most confident first, per true class"},
    }
    return assets, mistakes
