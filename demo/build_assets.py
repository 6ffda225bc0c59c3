"""Build the small files the demo ships, from the real data (which a Space does not have):

  python -m demo.build_assets --data ../shared/data/cifar10 [--checkpoints checkpoints]

writes
  demo/examples/cifar_<class>.png   one real CIFAR-10 test image per class (32x32)
  demo/examples/photo_<name>.jpg    a few non-CIFAR photos (scikit-image's sample data), for the OOD notice
  demo/assets/mistakes.npz          test images the ensemble gets wrong (uint8) + labels, predictions
  demo/assets/assets.json           OOD threshold and how it was chosen, ensemble test metrics, provenance

Rerun it after adding or retraining checkpoints: the mistakes and the threshold belong to one ensemble.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cifar_core.checkpoint import now_iso
from cifar_core.data import CLASSES, load_cifar10, make_split
from cifar_core.evaluate import metrics_from_logits
from cifar_core.runtime import keep_freed_memory

from cifar_core.serving import ASSETS_DIR, Lab

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# Photos from scikit-image's bundled data: (function, file stem, longest side). chelsea is a cat
# (in distribution, but not a CIFAR-style photo); the others are not any CIFAR-10 class.
PHOTOS = (("chelsea", "cat_chelsea", 256), ("coffee", "coffee", 256), ("astronaut", "astronaut", 256),
          ("rocket", "rocket", 256), ("camera", "cameraman_gray", 256))
KEEP_IN_DISTRIBUTION = 0.95   # the OOD threshold keeps this fraction of validation images "in distribution"
MISTAKES_PER_CLASS = 40       # 400 images x 3 KB: well under a megabyte compressed


def ensemble_probs(lab: Lab, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch):
        out.append(lab.ensemble.probs(images[start:start + batch]))
        print(f"  {min(start + batch, len(images))}/{len(images)}", file=sys.stderr, flush=True)
    return torch.cat(out)


def save_examples(images: torch.Tensor, labels: torch.Tensor) -> list[str]:
    EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    written = []
    for c, name in enumerate(CLASSES):
        first = int(torch.nonzero(labels == c)[0])  # deterministic: the first test image of the class
        path = EXAMPLES_DIR / f"cifar_{name}.png"
        Image.fromarray(images[first].permute(1, 2, 0).numpy()).save(path, optimize=True)
        written.append(path.name)
    from skimage import data as skdata
    for fn, stem, side in PHOTOS:
        im = Image.fromarray(getattr(skdata, fn)())
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        path = EXAMPLES_DIR / f"photo_{stem}.jpg"
        im.save(path, quality=85, optimize=True)
        written.append(path.name)
    return written


def choose_mistakes(images, labels, probs, indices) -> dict:
    pred = probs.argmax(1)
    conf = probs.max(1).values
    keep = []
    for c in range(len(CLASSES)):
        wrong = torch.nonzero((labels == c) & (pred != c)).flatten()
        wrong = wrong[conf[wrong].argsort(descending=True)][:MISTAKES_PER_CLASS]  # most confident first
        keep.append(wrong)
    keep = torch.cat(keep)
    return dict(images=images[keep].numpy(), labels=labels[keep].numpy().astype(np.int8),
                predictions=pred[keep].numpy().astype(np.int8), confidence=conf[keep].numpy().astype(np.float32),
                dataset_index=indices[keep].numpy().astype(np.int32))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR)")
    p.add_argument("--checkpoints", help="checkpoints root (default $CIFAR_CHECKPOINTS or checkpoints/)")
    p.add_argument("--out", default=str(ASSETS_DIR))
    args = p.parse_args(argv)
    keep_freed_memory()  # large inference batches without per-batch page faults (cifar_core/runtime.py)

    lab = Lab(args.checkpoints)
    splits = {(m.meta["split"]["name"], m.meta["split"]["seed"]) for m in lab.members}
    if len(splits) > 1:
        print(f"warning: the checkpoints were trained on different splits {splits}; using the first model's "
              "test set, which may include other models' training images", file=sys.stderr)
    split_name, split_seed = lab.members[0].meta["split"]["name"], lab.members[0].meta["split"]["seed"]
    data = load_cifar10(args.data)
    split = make_split(data, split_name, split_seed)
    if split.fingerprint != lab.members[0].meta["split"]["fingerprint"]:
        raise SystemExit("the data/split does not match the checkpoint's split fingerprint: wrong data folder?")
    print(f"models: {lab.names}; split {split_name}/{split_seed}", file=sys.stderr)

    test_images, test_labels = data.images[split.test], data.labels[split.test]
    examples = save_examples(test_images, test_labels)

    # OOD: the max calibrated ensemble probability, thresholded so that 95% of validation images
    # (never used for training) count as in-distribution. Validation, not test, so that test stays untouched.
    held_out = split.val if len(split.val) else split.test
    val_probs = ensemble_probs(lab, data.images[held_out])
    val_scores = val_probs.max(1).values
    threshold = float(torch.quantile(val_scores, 1 - KEEP_IN_DISTRIBUTION))

    test_probs = ensemble_probs(lab, test_images)
    test_metrics = metrics_from_logits(test_probs.clamp_min(1e-12).log(), test_labels)
    mistakes = choose_mistakes(test_images, test_labels, test_probs, split.test)

    photo_scores = {}
    for name in examples:
        x = lab.decode(EXAMPLES_DIR / name)
        photo_scores[name] = round(float(lab.ensemble.probs(x[None]).max()), 4)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "mistakes.npz", **mistakes)
    assets = {
        "built_at": now_iso(),
        "command": "python -m demo.build_assets " + " ".join(argv if argv is not None else sys.argv[1:]),
        "members": lab.names,
        "weights": lab.ensemble.weights,
        "split": {"name": split_name, "seed": split_seed, "fingerprint": split.fingerprint,
                  "test_size": len(split.test)},
        "ood": {
            "score": "max calibrated ensemble probability (max softmax probability, MSP)",
            "rule": "out of distribution when score < threshold",
            "threshold": round(threshold, 4),
            "chosen_on": f"{'validation' if len(split.val) else 'test'} split, {len(held_out)} images",
            "keeps_in_distribution": KEEP_IN_DISTRIBUTION,
            "members": lab.names,
            "example_scores": photo_scores,
        },
        "ensemble_test": {k: test_metrics[k] for k in ("n", "accuracy", "nll", "ece", "per_class_accuracy",
                                                        "confusion")},
        "mistakes": {"file": "mistakes.npz", "count": int(len(mistakes["labels"])),
                     "total_wrong": int((test_probs.argmax(1) != test_labels).sum()),
                     "per_class_cap": MISTAKES_PER_CLASS, "order": "most confident first, per true class"},
        "examples": examples,
    }
    (out / "assets.json").write_text(json.dumps(assets, indent=2) + "\n")
    print(json.dumps({k: assets[k] for k in ("members", "ood", "mistakes")}, indent=2))
    print(f"ensemble test accuracy {test_metrics['accuracy']:.4f}")


if __name__ == "__main__":
    main()
