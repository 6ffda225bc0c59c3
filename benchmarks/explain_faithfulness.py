"""Faithfulness of the CAM methods for every shipped checkpoint, as a Markdown table.

For each test image (default "seed" split) the model's predicted class is explained, the 20%
most salient pixels of the 32x32 image (by the map) are removed with the ROAD noisy linear
imputer, and the drop of the calibrated probability of that class is compared with removing
20% random pixels and 20% taken by random blobs as coarse as the model's CAM grid.

    CIFAR10_DIR=../shared/data/cifar10 python benchmarks/explain_faithfulness.py --n 300
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch


from cifar_core.data import load_cifar10, make_split
from cifar_core.ensemble import find_checkpoints, load_member
from cifar_core.paths import checkpoints_dir
from cifar_core.explain import METHODS
from cifar_core.explain_metrics import faithfulness, paired_t
from cifar_core.models.registry import resolve_module
from cifar_core.predictor import preprocess


def cam_grid(predictor) -> int:
    """Side of the CAM layer's feature map (the coarseness of its maps)."""
    seen = []
    layer = resolve_module(predictor.model, predictor.spec.cam_layer)
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        with torch.no_grad():
            predictor.model(preprocess(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), predictor.spec))
    finally:
        handle.remove()
    shape = seen[0]
    if len(shape) == 3:  # tokens: the ViT grid
        return int(predictor.model.patch_embed.grid_size[0])
    return int(shape[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 folder (default: $CIFAR10_DIR)")
    ap.add_argument("--checkpoints", default=str(checkpoints_dir()))
    ap.add_argument("--n", type=int, default=300, help="test images (the first n of the seed split's test set)")
    ap.add_argument("--scorecam-n", type=int, default=None, help="fewer images for ScoreCAM (default: --n)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    data = load_cifar10(args.data)
    test = make_split(data, "seed", 0).test[:args.n]
    images, labels = data.images[test], data.labels[test]
    paths = find_checkpoints(args.checkpoints)
    if not paths:
        sys.exit(f"no checkpoints under {args.checkpoints}")
    pct = round(100 * args.fraction)
    print(f"data: {data.source}; seed split, first {len(test)} test images; remove {pct}% of the 32x32 pixels "
          f"(ROAD noisy linear imputation); torch threads {torch.get_num_threads()}\n")
    print(f"| model | T | method | n | acc | p(pred) | drop: top-{pct}% salient | drop: {pct}% random pixels "
          f"| drop: {pct}% random blobs | salient − random pixels [95% CI] | t | salient − blobs | better than random |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        member = load_member(path, tta=0)
        p = member.predictor
        grid = cam_grid(p)
        for method in args.methods.split(","):
            n = min(args.scorecam_n or args.n, args.n) if method == "scorecam" else args.n
            t0 = time.perf_counter()
            r = faithfulness(p, images[:n], method, args.fraction, args.seed,
                             baselines=(("random", None), ("blobs", grid)))
            acc = float((torch.as_tensor(r["targets"]) == labels[:n]).float().mean())
            p_pred = float(p.probs(images[:n]).max(1).values.mean())
            d = r["map"] - r["random"]
            ci = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
            t = paired_t(r["map"], r["random"])
            better = "yes" if d.mean() > 0 and t > 2 else "**no**"
            print(f"| {member.name} | {p.temperature:.3f} | {method} | {n} | {acc:.3f} | {p_pred:.3f} | {r['map'].mean():.3f} | "
                  f"{r['random'].mean():.3f} | {r['blobs'].mean():.3f} (grid {grid}) | {d.mean():+.3f} ± {ci:.3f} | "
                  f"{t:.1f} | {(r['map'] - r['blobs']).mean():+.3f} | {better} |", flush=True)
            print(f"<!-- {member.name}/{method}: {time.perf_counter() - t0:.1f}s -->", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
