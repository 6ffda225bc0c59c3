"""Build the small files the demo ships, from the real data (which a Space does not have):

  python -m demo.build_assets --data ../shared/data/cifar10 [--checkpoints checkpoints]

writes
  demo/examples/cifar_<class>.png   one real CIFAR-10 test image per class (32x32)
  demo/examples/photo_<name>.jpg    a few non-CIFAR photos (scikit-image's sample data), for the OOD notice
  demo/assets/mistakes.npz          test images the ensemble gets wrong (uint8) + labels, predictions
  demo/assets/ood.safetensors       the out-of-distribution detector fitted to these checkpoints (cifar_core/ood.py)
  demo/assets/assets.json           the detector's rule, threshold and what it was fitted on, ensemble test metrics,
                                    provenance

Rerun it after adding or retraining checkpoints: the mistakes and the detector belong to one ensemble (the
demo turns a stale detector off and says so). After re-exporting only an edge model (exports/<name>/int8.onnx),

  python -m demo.build_assets --data ../shared/data/cifar10 --edge-only

re-measures just the edge models' accuracy and latency (a minute) and rewrites assets.json's "edge" record; the
ensemble's files stay as they are. The detector is the one benchmarks/ood.py chose
(results/ood.json); --ood-detector overrides it.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save

from cifar_core.assets import compute_assets, measure_edge
from cifar_core.checkpoint import atomic_write_bytes, atomic_write_json, now_iso
from cifar_core.data import CLASSES, load_cifar10, make_split
from cifar_core.ood import METHODS
from cifar_core.paths import DEFAULT_EXAMPLES as EXAMPLES_DIR
from cifar_core.runtime import keep_freed_memory
from cifar_core.serving import ASSETS_DIR, Lab

# Photos from scikit-image's bundled data: (function, file stem, longest side). chelsea is a cat
# (in distribution, but not a CIFAR-style photo); the others are not any CIFAR-10 class.
PHOTOS = (("chelsea", "cat_chelsea", 256), ("coffee", "coffee", 256), ("astronaut", "astronaut", 256),
          ("rocket", "rocket", 256), ("camera", "cameraman_gray", 256))


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


def update_edge(path: Path, edge: dict, split, command: str) -> None:
    """Replace the "edge" record of an existing assets.json (same split), keeping the ensemble's records."""
    try:
        assets = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--edge-only updates an existing {path}, which could not be read ({e}): "
                         "run a full build first")
    if (assets.get("split") or {}).get("fingerprint") != split.fingerprint:
        raise SystemExit(f"{path} was built on another split than the checkpoints': run a full build")
    assets["edge"] = edge
    assets["edge_built"] = {"at": now_iso(), "command": command}
    atomic_write_json(path, assets)
    print(json.dumps(edge, indent=2))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR, else ../shared/data/cifar10)")
    p.add_argument("--checkpoints", help="checkpoints root (default $CIFAR_CHECKPOINTS or checkpoints/)")
    p.add_argument("--out", default=str(ASSETS_DIR))
    p.add_argument("--ood-detector", choices=METHODS, help="default: the choice recorded in results/ood.json")
    p.add_argument("--edge-only", action="store_true",
                   help="re-measure only the int8 edge models into the existing assets.json")
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
    command = "python -m demo.build_assets " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.edge_only:
        update_edge(Path(args.out) / "assets.json", measure_edge(lab, test_images, test_labels), split, command)
        return
    examples = save_examples(test_images, test_labels)
    photos = {name: lab.decode(EXAMPLES_DIR / name) for name in examples}
    # the detector (fitted on train, thresholded on validation images) and the mistakes (test) are cifar_core's
    computed, mistakes, ood_tensors = compute_assets(lab, data, split, photos, ood_method=args.ood_detector)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **mistakes)
    atomic_write_bytes(out / "mistakes.npz", buffer.getvalue())  # a killed build leaves the old files whole
    atomic_write_bytes(out / computed["ood"]["file"], save(ood_tensors, metadata={"method": computed["ood"]["method"]}))
    assets = {
        "built_at": now_iso(),
        "command": command,
        **computed,
        "examples": examples,
    }
    test_metrics = computed["ensemble_test"]
    atomic_write_json(out / "assets.json", assets)
    print(json.dumps({k: assets[k] for k in ("members", "ood", "mistakes")}, indent=2))
    print(f"ensemble test accuracy {test_metrics['accuracy']:.4f}")


if __name__ == "__main__":
    main()
