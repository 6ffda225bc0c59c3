"""What the serving core ships beside the checkpoints, computed once from the real data (a Space
has no dataset): the out-of-distribution detector fitted to the zoo (cifar_core/ood.py) and the
ensemble's most confident test mistakes. `python -m demo.build_assets` writes them (demo/assets/);
cifar_core.serving reads them.

The decisions live here, not in the UI: the detector is fitted on train images and thresholded on
validation images, never test, so the test set stays untouched; the mistakes are the test images the
ensemble gets wrong with the highest confidence, a fixed number per true class.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from . import paths
from .data import CLASSES
from .edge import measure
from .engine import stratified_subset
from .ensemble import fit_identity
from .evaluate import metrics_from_logits
from .ood import (KEEP_IN_DISTRIBUTION, STATE_FILE as OOD_FILE, compact, detector_from_state, detector_state,
                  fit_detector, zoo_outputs)

OOD_RESULTS = paths.REPO / "results" / "ood.json"   # benchmarks/ood.py's choice of detector
OOD_TRAIN_PER_CLASS = 1000    # train images per class the shipped detector is fitted on (as in the benchmark)
METHOD_NAMES = {"msp": "max softmax probability", "energy": "energy score", "maxlogit": "max logit",
                "mahalanobis": "Mahalanobis distance", "knn": "k-nearest-neighbour distance",
                "vim": "ViM virtual-logit matching"}
MISTAKES_PER_CLASS = 40       # 400 images x 3 KB: well under a megabyte compressed


def ensemble_probs(ensemble, images: torch.Tensor, batch: int = 1000, progress: bool = True) -> torch.Tensor:
    """Calibrated ensemble probabilities of uint8 images, in batches (progress on stderr)."""
    out = []
    for start in range(0, len(images), batch):
        out.append(ensemble.probs(images[start:start + batch]))
        if progress:
            print(f"  {min(start + batch, len(images))}/{len(images)}", file=sys.stderr, flush=True)
    return torch.cat(out)


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


def ood_choice(path: Path = OOD_RESULTS) -> tuple[str, dict, str]:
    """(method, options, where the choice comes from): what benchmarks/ood.py chose on its validation OOD set
    (results/ood.json), else the max softmax probability."""
    try:
        record = json.loads(Path(path).read_text())
        method, setting = record["detector"], record.get("setting", "-")
    except (OSError, ValueError, KeyError):
        return "msp", {}, f"default ({path.name} not found: python benchmarks/ood.py chooses)"
    options = {} if setting in ("-", "") else {k: int(v) for k, v in (kv.split("=") for kv in setting.split(", "))}
    return method, options, f"benchmarks/ood.py (results/{path.name}): {record.get('rule', 'best validation AUROC')}"


def fit_ood(lab, data, split, method: str, options: dict, train_per_class: int = OOD_TRAIN_PER_CLASS):
    """The zoo's OOD detector: fitted on a stratified subset of train images, standardized and thresholded on
    the val images. Its large tensors are stored in fp16; the reference scores are recomputed after that
    rounding, so the shipped threshold belongs to the shipped numbers. -> (Detector, tensors, meta)."""
    train = split.train[stratified_subset(data.labels[split.train], train_per_class * len(CLASSES), seed=0)]
    held_out = split.val if len(split.val) else split.test
    # over the members the ensemble computes: a member of weight 0 is never run on the serving path
    ensemble = lab.ensemble.weighted_only()
    train_out = zoo_outputs(ensemble.members, data.images[train], cache=True)
    val_out = zoo_outputs(ensemble.members, data.images[held_out], cache=True)
    det = fit_detector(method, ensemble.members, train_out, data.labels[train], val_out, ensemble.weights,
                       keep=KEEP_IN_DISTRIBUTION, **options)
    tensors, meta = detector_state(det)
    det = detector_from_state(compact(tensors), meta).calibrate(val_out)
    tensors, meta = detector_state(det)
    tensors = compact(tensors)
    fitted_on = (f"{len(train)} train images ({train_per_class} per class) and {len(held_out)} "
                 f"{'validation' if len(split.val) else 'test'} images of the {split.name} split")
    return det, tensors, meta, fitted_on


def measure_edge(lab, test_images: torch.Tensor, test_labels: torch.Tensor) -> dict[str, dict]:
    """assets.json's "edge": each int8 edge model's accuracy on the test images and its latency as served
    (cifar_core.edge.measure). Time it on an idle machine: the latency is what the demo states."""
    return {name: measure(model, test_images, test_labels) for name, model in lab.edge.items()}


def compute_assets(lab, data, split, photos: dict[str, torch.Tensor] | None = None, progress: bool = True,
                   ood_method: str | None = None, ood_options: dict | None = None,
                   train_per_class: int = OOD_TRAIN_PER_CLASS) -> tuple[dict, dict, dict]:
    """(assets.json's content, mistakes arrays, OOD detector tensors) for the serving core's zoo `lab` on
    `split`. The OOD detector is `ood_method` (default: the benchmark's choice, ood_choice()).

    photos: name -> decoded example image, whose OOD scores are recorded for display."""
    names = lab.names
    chosen_by = "given"
    if ood_method is None:
        ood_method, ood_options, chosen_by = ood_choice()
    det, tensors, meta, fitted_on = fit_ood(lab, data, split, ood_method, ood_options or {}, train_per_class)
    test_images, test_labels = data.images[split.test], data.labels[split.test]
    test_probs = ensemble_probs(lab.ensemble, test_images, progress=progress)
    test_metrics = metrics_from_logits(test_probs.clamp_min(1e-12).log(), test_labels)
    mistakes = choose_mistakes(test_images, test_labels, test_probs, split.test)
    photo_scores = {}
    for name, x in (photos or {}).items():
        photo_scores[name] = round(float(det.typicality(zoo_outputs(lab.ensemble.weighted, x[None]))[0]), 4)
    # the edge models' accuracy on the same test images and their latency as served: the demo offers the best
    # accuracy per ms first and states both numbers (cifar_core.edge.measure)
    edge = measure_edge(lab, test_images, test_labels)
    setting = ", ".join(f"{k}={v}" for k, v in (ood_options or {}).items())
    assets = {
        "members": names,
        "weights": lab.ensemble.weights,
        "split": {"name": split.name, "seed": split.seed, "fingerprint": split.fingerprint,
                  "test_size": len(split.test)},
        "ood": {
            "name": METHOD_NAMES[ood_method] + (f" ({setting})" if setting else ""),
            "method": ood_method,
            "options": ood_options or {},
            "chosen_by": chosen_by,
            "score": "typicality: the share of CIFAR-10 validation images whose detector score is at least as "
                     "unusual (about uniform on CIFAR-10, near 0 far from it)",
            "rule": "out of distribution when typicality < threshold",
            "threshold": det.threshold,
            "keeps_in_distribution": KEEP_IN_DISTRIBUTION,
            "fitted_on": fitted_on,
            "fitted_for": fit_identity(lab.members),
            "file": OOD_FILE,
            "detector": meta,
            "example_scores": photo_scores,
        },
        "edge": edge,
        "ensemble_test": {k: test_metrics[k] for k in ("n", "accuracy", "nll", "ece", "per_class_accuracy",
                                                        "confusion")},
        "mistakes": {"file": "mistakes.npz", "count": int(len(mistakes["labels"])),
                     "total_wrong": int((test_probs.argmax(1) != test_labels).sum()),
                     "per_class_cap": MISTAKES_PER_CLASS, "order": "most confident first, per true class"},
    }
    return assets, mistakes, tensors
