#!/usr/bin/env python
"""Level 4 table: every member vs the ensemble (equal weights, weights fitted on val), without
and with test-time augmentation, on the test split: accuracy, NLL, ECE, parameters, CPU latency.

  python benchmarks/ensemble_table.py --data ../shared/data/cifar10              # the full table
  python benchmarks/ensemble_table.py --data ../shared/data/cifar10 --quick      # smoke run (500 images)

Members: every checkpoint under --checkpoints (all must share one split; see
cifar_core.ensemble.shared_split). Images: the members' own split; --n draws a fixed random
subset (seed 0) of val and of test. Probabilities: each member calibrated by its own temperature;
the fitted ensemble's weights and temperature are fitted here on the val images at each TTA
level (cifar_core.ensemble.fit_weights, the fit `python train.py ensemble` persists).
Latency: wall clock of the whole call (preprocessing, every TTA view, every member,
averaging), median of --repeats calls at batch 1 and of --repeats/5 (>= 3) calls at batch 64
(reported per image), after warm-up, --threads intra-op threads; "b1 cpu ms" is the process's CPU
time per batch-1 call (all threads: the compute cost, robust to other users of the machine, where
wall clock is not). The equal-weight ensemble runs every member; the fitted one only the members whose
weight is above 0 (a fitted weight below ensemble.MIN_WEIGHT is dropped), so each has its own timing. The
last line: what the fitted ensemble costs per image over the most accurate member, at the --tta level.
On a shared machine, compare rows of one run only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cifar_core.data import load_cifar10
from cifar_core.ensemble import (Ensemble, EnsembleError, fit_weights, load_zoo, member_log_probs, members_split,
                                 mixture_log_probs)
from cifar_core.evaluate import expected_calibration_error, format_table
from cifar_core.paths import checkpoints_dir

ROOT = Path(__file__).resolve().parent.parent

TTA_NAMES = {0: "none", 1: "flip", 2: "flip + 1-px shifts"}


def subset(indices: torch.Tensor, n: int | None) -> torch.Tensor:
    """A fixed random subset (the split's indices are sorted, hence grouped by class on disk)."""
    if n is None or n >= len(indices):
        return indices
    return indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(0))[:n]].sort().values


def scores(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    lp = log_probs.float()
    return {"acc %": round(100 * float((lp.argmax(1) == labels).float().mean()), 2),
            "NLL": round(float(-lp.gather(1, labels[:, None]).mean()), 4),
            "ECE": round(expected_calibration_error(lp.exp(), labels), 4)}


def median_ms(fn, x: torch.Tensor, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Median ms per call: wall clock, and this process's CPU time (all its threads)."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        wall, cpu = [], []
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            fn(x)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def latency(fn, images: torch.Tensor, repeats: int) -> dict:
    b1_wall, b1_cpu = median_ms(fn, images[:1], repeats)
    b64_wall, _ = median_ms(fn, images[:64], max(3, repeats // 5))
    return {"b1 ms": round(b1_wall, 2), "b1 cpu ms": round(b1_cpu, 2),
            "b64 ms/img": round(b64_wall / len(images[:64]), 3)}


def params(member) -> int:
    return int(sum(p.numel() for p in member.predictor.model.parameters()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR)")
    p.add_argument("--checkpoints", default=str(checkpoints_dir()), help="folder of checkpoint folders (the members)")
    p.add_argument("--tta", type=int, choices=(1, 2), default=2, help="the 'with TTA' level (default 2)")
    p.add_argument("--n", type=int, help="val and test images each (default: all of the split's)")
    p.add_argument("--repeats", type=int, default=50, help="batch-1 latency repeats (batch 64: a fifth, >= 3)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--quick", action="store_true", help="smoke run: --n 500 --repeats 5")
    p.add_argument("--json", help="also write the rows and fitted weights here")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats = args.n or 500, 5

    torch.set_num_threads(args.threads)
    members = load_zoo(args.checkpoints, tta=0)
    if not members:
        print(f"error: no loadable checkpoints under {args.checkpoints}", file=sys.stderr)
        return 2
    data = load_cifar10(args.data)
    try:
        split = members_split(members, data)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    val, test = subset(split.val, args.n), subset(split.test, args.n)
    y_val, y_test = data.labels[val], data.labels[test]
    timing_images = data.images[test[:64]]

    rows, fits = [], {}
    levels = (0, args.tta)
    member_rows = {m.name: [] for m in members}
    ensemble_rows = []
    for level in levels:
        t0 = time.perf_counter()
        lp_val = member_log_probs(members, data.images[val], tta=level)
        lp_test = member_log_probs(members, data.images[test], tta=level)
        fit = fit_weights(lp_val, y_val)
        fits[level] = {"weights": dict(zip([m.name for m in members], fit.weights)), "temperature": fit.temperature}
        print(f"TTA {level}: predictions in {time.perf_counter() - t0:.1f}s; fitted weights "
              f"{ {k: round(v, 3) for k, v in fits[level]['weights'].items()} }, T {fit.temperature:.3f}",
              file=sys.stderr)
        for m in members:
            m.predictor.tta = level
        for i, m in enumerate(members):
            member_rows[m.name].append({"model": m.name, "weights": "-", "TTA": TTA_NAMES[level],
                                        **scores(lp_test[i], y_test), "params M": round(params(m) / 1e6, 2),
                                        **latency(m.predictor.probs, timing_images, args.repeats)})
        total = round(sum(params(m) for m in members) / 1e6, 2)
        equal = [1.0 / len(members)] * len(members)
        ensemble_rows.append({"model": f"ensemble ({len(members)})", "weights": "equal", "TTA": TTA_NAMES[level],
                              **scores(mixture_log_probs(lp_test.double(), equal), y_test), "params M": total,
                              **latency(Ensemble(members).probs, timing_images, args.repeats)})
        fitted_ensemble = Ensemble(members, fit.weights, fit.temperature)
        computed = fitted_ensemble.weighted
        fitted = ", ".join(f"{w:.2f}" for w in fit.weights) + (f"; T {fit.temperature:.2f}"
                                                                if fit.temperature != 1.0 else "")
        ensemble_rows.append({"model": f"ensemble ({len(computed)} computed)", "weights": f"fitted on val ({fitted})",
                              "TTA": TTA_NAMES[level],
                              **scores(mixture_log_probs(lp_test.double(), fit.weights, fit.temperature), y_test),
                              "params M": round(sum(params(m) for m in computed) / 1e6, 2),
                              **latency(fitted_ensemble.probs, timing_images, args.repeats)})
    rows = [r for m in members for r in member_rows[m.name]] + ensemble_rows

    cols = ["model", "weights", "TTA", "acc %", "NLL", "ECE", "params M", "b1 ms", "b1 cpu ms", "b64 ms/img"]
    print(f"\nTest split of {split.name} (seed {split.seed}): {len(test)} images; weights fitted on {len(val)} val "
          f"images; {args.threads} threads, median of {args.repeats} batch-1 calls.\n")
    print(format_table([{k: f"{v:g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows], cols))
    best = max((r for r in rows[:-len(ensemble_rows)] if r["TTA"] == TTA_NAMES[args.tta]), key=lambda r: r["acc %"])
    fitted_row = ensemble_rows[-1]
    print(f"\nAt TTA {TTA_NAMES[args.tta]}: the fitted ensemble is {fitted_row['acc %'] - best['acc %']:+.2f} points "
          "over "
          f"the best member ({best['model']}, {best['acc %']}%) and costs {fitted_row['b1 ms'] - best['b1 ms']:.1f} ms "
          f"more per image at batch 1 ({fitted_row['b1 ms'] / best['b1 ms']:.1f}x), "
          f"{fitted_row['b64 ms/img'] - best['b64 ms/img']:.2f} ms more per image at batch 64.")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "fits": fits, "n_val": len(val), "n_test": len(test),
                                               "split": split.fingerprint, "argv": sys.argv[1:]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
