#!/usr/bin/env python
"""Input resolution for the ImageNet transfer member: accuracy (recorded runs) vs CPU cost (measured here).

ImageNet CNNs shrink their input 32x: a 32 px CIFAR image ends as a 1x1 map. Upsampling (or a
stride-1 "CIFAR stem") buys accuracy and a usable Grad-CAM map at a price in CPU time that
grows with the square of the side. This prints both sides of the trade:

  python benchmarks/resolution.py [--runs results/runs/resolution] [--repeats 5]

Accuracy columns come from the sweep's meta.json files (train.py runs, same recipe and budget
for every size; where they ran is in their meta); the cost columns are measured on this CPU:
median of --repeats timed steps after a warm-up, training (forward + backward + SGD step) at
batch 32 and inference at batch 32, plus counted FLOPs per image.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cifar_core.evaluate import format_table
from cifar_core.models import create_model


def forward_flops(model, size: int) -> float:
    """Forward FLOPs per image, counted by torch (matmuls and convolutions, 2 per multiply-add).

    Training costs about 3x this; torch's counter overcounts the backward of depthwise
    convolutions (it ignores groups), so the training figure is not counted here."""
    from torch.utils.flop_counter import FlopCounterMode
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, size, size))
    return counter.get_total_flops() / 2


def median_seconds(step, repeats: int) -> float:
    step()  # warm-up (allocations, oneDNN kernel choice)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_name: str, size: int, model_kwargs: dict, repeats: int, batch: int = 32) -> dict:
    torch.manual_seed(0)
    model = create_model(model_name, input_size=size, **model_kwargs).to(memory_format=torch.channels_last)
    fwd = forward_flops(model, size)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    model.train()
    train_s = median_seconds(train_step, repeats)
    model.eval()
    with torch.inference_mode():
        infer_s = median_seconds(lambda: model(x), repeats)
        feature_map = model.forward_features(x[:1]).shape[-1]
    return {"fwd_gflop": fwd / 1e9, "train_img_s": batch / train_s,
            "infer_ms": 1000 * infer_s / batch, "feature_map": feature_map}


def row(run: str, size: int, kwargs: dict, cost: dict, epochs: float, n_train: int, metrics: dict | None) -> dict:
    hours_per_epoch = n_train / cost["train_img_s"] / 3600
    return {
        "run": run, "input": f"{size} px" + (" (stride-1 stem)" if kwargs.get("stem_stride") == 1 else ""),
        "last map": f"{cost['feature_map']}x{cost['feature_map']}", "epochs": f"{epochs:g}",
        "val acc %": f"{100 * metrics['val']['accuracy']:.2f}" if metrics else "-",
        "test acc %": f"{100 * metrics['test']['accuracy']:.2f}" if metrics else "-",
        "fwd GFLOP/img": f"{cost['fwd_gflop']:.3f}",
        "CPU train img/s": f"{cost['train_img_s']:.1f}",
        "CPU h per epoch": f"{hours_per_epoch:.2f}",
        "CPU h, whole run": f"{epochs * hours_per_epoch:.1f}",
        "CPU infer ms/img": f"{cost['infer_ms']:.2f}",
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="results/runs/resolution", help="folder of the sweep's run folders")
    p.add_argument("--extra", nargs="*", default=["checkpoints/tf_efficientnet_lite0"],
                   help="more run folders to list (e.g. the shipped, longer run)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cost-only", type=int, nargs="*", default=[224],
                   help="input sizes to cost without an accuracy run (default 224, the ImageNet size)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folders = sorted(Path(args.runs).glob("*/meta.json")) + [Path(f) / "meta.json" for f in args.extra]
    rows, measured = [], {}
    for meta_path in folders:
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        size, kwargs = meta["spec"]["input_size"], meta.get("model_kwargs", {})
        key = (meta["model"], size, json.dumps(kwargs, sort_keys=True))
        if key not in measured:
            measured[key] = measure(meta["model"], size, kwargs, args.repeats)
        cost = measured[key]
        rows.append(row(str(meta_path.parent), size, kwargs, cost, meta["train_config"]["epochs"],
                        meta["split"]["sizes"]["train"], meta["metrics"]))
    for size in args.cost_only:  # sizes the sweep has no accuracy for: what they would cost
        kwargs = {}
        rows.append(row("(no run: the cost of 10 epochs)", size, kwargs, measure("tf_efficientnet_lite0", size, kwargs, args.repeats),
                        10, 48000, None))
    if not rows:
        print(f"no runs under {args.runs}: run the sweep first (scripts/gpu_session.sh)")
        return 1
    rows.sort(key=lambda r: (float(r["epochs"]), int(r["input"].split()[0])))
    print(f"python benchmarks/resolution.py {' '.join(sys.argv[1:])}".strip())
    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}; batch 32, median of {args.repeats}\n")
    print(format_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
