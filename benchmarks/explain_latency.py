"""CPU latency of one explanation (explain(): prediction + CAM for one 32x32 image), per model
and method: median of repeats, as a Markdown table.

Shipped checkpoints are timed as loaded; with --registered every registered architecture is
timed too, at random init (the cost does not depend on the weights).

    python benchmarks/explain_latency.py --registered --threads 1

On a machine shared with other jobs, use --threads 1: with more threads than free cores every
op waits for its slowest thread, and the timings measure the other jobs instead.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


from cifar_core.ensemble import find_checkpoints, load_member
from cifar_core.paths import checkpoints_dir
from cifar_core.explain import METHODS, explain
from cifar_core.models import create_model, list_models
from cifar_core.predictor import Predictor


def time_one(predictor, image, method, repeats, budget_s):
    """Median seconds of up to `repeats` calls after one warm-up, stopping early past budget_s."""
    t0 = time.perf_counter()
    explain(predictor, image, method)
    first = time.perf_counter() - t0
    times = [first] if first > budget_s / 2 else []  # too slow to warm up and repeat: keep the one run
    start = time.perf_counter()
    while len(times) < repeats and (not times or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        explain(predictor, image, method)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", default=str(checkpoints_dir()))
    ap.add_argument("--registered", action="store_true", help="also every registered model at random init")
    ap.add_argument("--models", default=None, help="comma list: only these registered models (with --registered)")
    ap.add_argument("--no-checkpoints", action="store_true", help="skip the shipped checkpoints")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of repeats per cell at most")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = [] if args.no_checkpoints else find_checkpoints(args.checkpoints)
    predictors = [(m.name, "checkpoint", m.predictor) for m in (load_member(p, tta=0) for p in paths)]
    if args.registered:
        for name in (args.models.split(",") if args.models else list_models()):
            torch.manual_seed(0)
            predictors.append((name, "random init", Predictor(create_model(name), name=name)))
    image = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    methods = args.methods.split(",")
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; one 32x32 image, TTA off; "
          "median seconds per explain() call (number of timed calls)\n")
    print("| model | weights | input | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for name, weights, p in predictors:
        cells = []
        for method in methods:
            median, n = time_one(p, image, method, args.repeats, args.budget)
            cells.append(f"{median:.3f} ({n})" if median < 10 else f"{median:.0f} ({n})")
        size = p.spec.input_size
        print(f"| {name} | {weights} | {size}x{size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
