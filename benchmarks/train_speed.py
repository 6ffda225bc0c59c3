"""Level 3 speed benchmark (issue 3): how fast does a recipe train our CNN to high accuracy on this CPU?

  python benchmarks/train_speed.py --recipe fast --seeds 3                       # the level-3 recipe, 3 seeds
  python benchmarks/train_speed.py --recipe muon --seeds 3                       # Muon, 5 epochs
  python benchmarks/train_speed.py --recipe prog --seeds 3                       # + progressive resizing, 9 epochs
  python benchmarks/train_speed.py --recipe long --seeds 1                       # the ~2-hour recipe, one run
  python benchmarks/train_speed.py --recipe fast --seeds 3 --epochs 8 --set lr=1.2 --json runs/speed/fast.json

Protocol: the official split (train on the 50,000 official train images, report on the 10,000
official test images; no validation set, so the final weights are reported and the temperature
stays 1). Each seed is one cifar_core.engine.train run with its checkpoint, meta.json and history
kept under --out/<recipe>/seed<k>/. Data are loaded (and decoded) once, before any timing.

Per seed: test accuracy at the recipe's TTA level (what the training loop reports) and without
TTA (one plain forward pass); training wall time = the sum of the per-epoch `seconds` of the
history (the optimizer steps, augmentation included); total wall time = the whole train() call
(setup, training, final evaluation with TTA, checkpoint writing); images/s = training images
processed / training wall time.

FLOPs per image: torch.utils.flop_counter.FlopCounterMode over one forward and one backward of a
batch at the model's input size, divided by the batch size; with progressive resizing, the mean
over the run's training images of the count at the side each was trained on. It counts matmuls
and convolutions only (2 FLOPs per multiply-add; norms, activations, pooling and the optimizer
step are not counted), and the backward counts only the gradients autograd actually computes
(none for the frozen whitening stem's weight or the input). Muon's Newton-Schulz iterations are
not counted either: about 10.6 GFLOP per 1024-image step for cifar_cnn, 0.010 GFLOP per image (1.5%).
Achieved GFLOP/s = training (forward + backward) FLOPs per image x images/s, set against the
machine's measured fp32 matmul throughput (the median of --peak-repeats timed torch.mm calls of
--peak-size square matrices after warm-up, at the current torch thread count), measured before
the first and after the last run; the higher of the two medians is the "peak" (a busy shared CPU
can only lower a measurement). The 1-thread matmul is printed beside it, to show whether the
matmul scales with the threads at all on this machine.

Prints the exact command line, the environment, a summary table (mean ± sample std over seeds)
and a per-seed table, all Markdown; --json saves the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar_core.data import load_cifar10, make_split
from cifar_core.engine import (TrainConfig, apply_settings, check_stem_freezes, resolve_device, step_counts,
                               stem_bias_trains, train, train_size)
from cifar_core.evaluate import format_table
from cifar_core.levels import LEVELS
from cifar_core.models import create_model
from cifar_core.predictor import Predictor

ROOT = Path(__file__).resolve().parent.parent

_FAST = replace(LEVELS[3].config, split="official")

# Named recipes: TrainConfig presets on the official split. The lead tunes these.
RECIPES: dict[str, tuple[str, TrainConfig]] = {
    "fast": ("the level-3 recipe (cifar_core.levels.LEVELS[3]) on the official split", _FAST),
    "long": ("the level-3 recipe, 30 epochs (about 1.5-2 h on 2 idle cores)", replace(_FAST, epochs=30)),
    "muon": ("the level-3 recipe with Muon for the conv filters, 5 epochs (goal A's time budget)",
             replace(_FAST, optimizer="muon", epochs=5)),
    # Progressive resizing buys epochs: 78% of the steps train at 20, 24 and 28 px (0.4-0.8x the
    # cost of a 32-px step), so 9 epochs fit the time of 5.5. Batch 512 runs about 5% faster per
    # image on this CPU than 1024; the lrs are halved (SGD) and scaled by ~1/sqrt(2) (Muon) for
    # the twice as many steps.
    "prog": ("Muon + progressive resizing 20->32 px, batch 512, 9 epochs (goal A's time budget)",
             replace(_FAST, optimizer="muon", epochs=9, batch_size=512, lr=0.75, muon_lr=0.1,
                     low_res=20, low_res_fraction=0.78)),
}

SUMMARY_COLUMNS = ["recipe", "model", "epochs", "seeds", "test acc % (TTA)", "test acc % (no TTA)",
                   "train min (mean)", "train min (min)", "total min (mean)", "img/s",
                   "fwd GFLOP/img", "train GFLOP/img", "GFLOP/s", "% of matmul peak"]
SEED_COLUMNS = ["seed", "test acc % (TTA)", "test acc % (no TTA)", "train min", "total min", "img/s",
                "GFLOP/s", "% of matmul peak", "checkpoint"]


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def count_flops(cfg: TrainConfig, batch: int = 8, size: int | None = None, stem_frozen: bool = False) -> dict:
    """FLOPs per image of one training step's forward and backward (matmuls and convolutions);
    stem_frozen: counted after the stem's bias stopped learning (TrainConfig.stem_bias_fraction)."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = create_model(cfg.model, input_size=cfg.input_size or None, **cfg.model_kwargs).train()
    if stem_frozen:
        check_stem_freezes(model, cfg.model)
        model.freeze_stem_bias()
    size = size or model.spec.input_size
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        loss = F.cross_entropy(model(x).float(), y, label_smoothing=cfg.label_smoothing)
    forward = counter.get_total_flops()
    with counter:  # a fresh count on entry
        loss.backward()
    backward = counter.get_total_flops()
    return {"input_size": size, "batch": batch, "forward_per_image": forward / batch,
            "backward_per_image": backward / batch, "train_per_image": (forward + backward) / batch}


def schedule_flops(cfg: TrainConfig, n_train: int) -> dict:
    """count_flops averaged over the images of the whole run, as each step trains them.

    Without progressive resizing or a stem freeze that is simply the count at the model's input
    size; with them, every step's images count at that step's side (engine.train_size) and with
    or without the stem bias's gradient (engine.stem_bias_trains)."""
    full = count_flops(cfg)
    steps_per_epoch, total = step_counts(n_train, cfg)
    images: dict[tuple[int, bool], int] = {}  # (side, stem frozen) -> images trained that way
    for step in range(total):
        key = (train_size(step, total, cfg, full["input_size"]), not stem_bias_trains(step, total, cfg))
        start = (step % steps_per_epoch) * cfg.batch_size
        images[key] = images.get(key, 0) + min(cfg.batch_size, n_train - start)
    if list(images) == [(full["input_size"], False)]:
        return full
    counts = {key: full if key == (full["input_size"], False) else count_flops(cfg, size=key[0], stem_frozen=key[1])
              for key in images}
    n = sum(images.values())
    mean = {k: sum(counts[key][k] * m for key, m in images.items()) / n
            for k in ("forward_per_image", "backward_per_image", "train_per_image")}
    per_size: dict[int, int] = {}
    for (size, _), m in images.items():
        per_size[size] = per_size.get(size, 0) + m
    return {**full, **mean, "images_per_size": per_size,
            "train_per_image_by_kind": {f"{size}px" + (", stem frozen" if frozen else ""): c["train_per_image"]
                                        for (size, frozen), c in counts.items()}}


def matmul_peak(size: int = 2048, repeats: int = 7, warmup: int = 2, device: str | torch.device = "cpu") -> dict:
    """fp32 torch.mm throughput in GFLOP/s: the median (and best) of `repeats` timed calls."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device)
    b = torch.randn(size, size, generator=g).to(device)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    flops = 2 * size ** 3
    return {"size": size, "repeats": repeats, "threads": torch.get_num_threads(), "device": str(device),
            "median_gflops": flops / statistics.median(times) / 1e9, "best_gflops": flops / min(times) / 1e9}


def run_seed(cfg: TrainConfig, data, out_dir: Path, command: str, recipe: str) -> dict:
    """One training run; returns its accuracies and times."""
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    result = train(cfg, out_dir=out_dir, data=data,
                   extra_meta={"command": command, "benchmark": {"script": "benchmarks/train_speed.py",
                                                                 "recipe": recipe}})
    total = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    history = result.history
    train_s = sum(h["seconds"] for h in history)
    images = sum(h["images_per_s"] * h["seconds"] for h in history)
    test = result.metrics["test"]
    acc_plain = test["accuracy"]
    eval_plain_s = 0.0
    if cfg.tta:
        split = make_split(data, cfg.split, cfg.split_seed)
        t1 = time.perf_counter()
        logits = Predictor(result.model, tta=0).logits(data.images[split.test])
        acc_plain = float((logits.argmax(1) == data.labels[split.test]).float().mean())
        eval_plain_s = time.perf_counter() - t1
    return {"seed": cfg.seed, "test_acc_tta": test["accuracy"], "tta": cfg.tta, "test_acc_no_tta": acc_plain,
            "test_n": test.get("n"), "train_seconds": train_s, "total_seconds": total,
            "process_cpu_seconds": cpu, "eval_no_tta_seconds": eval_plain_s, "train_images": round(images),
            "images_per_s": images / train_s if train_s else 0.0, "epochs_run": len(history),
            "final_train_loss": history[-1]["train_loss"] if history else None, "out_dir": str(out_dir)}


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------

def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summarize(recipe: str, cfg: TrainConfig, runs: list[dict], flops: dict, peak: float) -> dict:
    ips = statistics.mean(r["images_per_s"] for r in runs)
    gflops = flops["train_per_image"] * ips / 1e9
    return {
        "recipe": recipe, "model": cfg.model, "epochs": f"{cfg.epochs:g}", "seeds": len(runs),
        "test acc % (TTA)": mean_std([r["test_acc_tta"] for r in runs], 100) + f" (tta {cfg.tta})",
        "test acc % (no TTA)": mean_std([r["test_acc_no_tta"] for r in runs], 100),
        "train min (mean)": f"{statistics.mean(r['train_seconds'] for r in runs) / 60:.2f}",
        "train min (min)": f"{min(r['train_seconds'] for r in runs) / 60:.2f}",
        "total min (mean)": f"{statistics.mean(r['total_seconds'] for r in runs) / 60:.2f}",
        "img/s": f"{ips:.0f}",
        "fwd GFLOP/img": f"{flops['forward_per_image'] / 1e9:.4f}",
        "train GFLOP/img": f"{flops['train_per_image'] / 1e9:.4f}",
        "GFLOP/s": f"{gflops:.1f}",
        "% of matmul peak": f"{100 * gflops / peak:.1f}" if peak else "",
    }


def seed_row(run: dict, flops: dict, peak: float) -> dict:
    gflops = flops["train_per_image"] * run["images_per_s"] / 1e9
    return {"seed": run["seed"], "test acc % (TTA)": f"{100 * run['test_acc_tta']:.2f}",
            "test acc % (no TTA)": f"{100 * run['test_acc_no_tta']:.2f}",
            "train min": f"{run['train_seconds'] / 60:.2f}", "total min": f"{run['total_seconds'] / 60:.2f}",
            "img/s": f"{run['images_per_s']:.0f}", "GFLOP/s": f"{gflops:.1f}",
            "% of matmul peak": f"{100 * gflops / peak:.1f}" if peak else "", "checkpoint": run["out_dir"]}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="fast", choices=sorted(RECIPES),
                   help="; ".join(f"{k}: {v[0]}" for k, v in RECIPES.items()))
    p.add_argument("--seeds", type=int, default=3,
                   help="number of runs: seeds FIRST_SEED .. FIRST_SEED+N-1 (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=float, help="override the recipe's epochs")
    p.add_argument("--model", help="override the recipe's model (any registered model)")
    p.add_argument("--train-subset", type=int, help="train on this many images only (smoke tests)")
    p.add_argument("--data", help="CIFAR-10 folder (default: $CIFAR10_DIR)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, as in train.py (augment.cutout=8, lr=1.2, tta=1)")
    p.add_argument("--out", default="runs/speed", help="runs go to OUT/<recipe>/seed<k>/ (default runs/speed)")
    p.add_argument("--json", help="also write the raw numbers to this JSON file")
    p.add_argument("--threads", type=int, help="torch.set_num_threads before anything runs (default: torch's)")
    p.add_argument("--peak-size", type=int, default=2048, help="matrix side of the matmul peak measurement")
    p.add_argument("--peak-repeats", type=int, default=7)
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bar")
    return p


def make_config(args, parser) -> TrainConfig:
    cfg = RECIPES[args.recipe][1]
    overrides = {"epochs": args.epochs, "train_subset": args.train_subset, "data": args.data}
    if args.model and args.model != cfg.model:
        overrides.update(model=args.model, model_kwargs={})
    if args.no_progress:
        overrides["progress"] = False
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    try:
        return apply_settings(cfg, args.set)
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args, parser)
    command = "python benchmarks/train_speed.py " + shlex.join(argv)
    device = resolve_device(cfg.device)

    print(command)
    print(f"date {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; {cpu_name()}, "
          f"{os.cpu_count()} logical CPUs; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"device {device}; load average {load_average()}", flush=True)
    print(f"recipe {args.recipe}: {RECIPES[args.recipe][0]}")
    print(f"config {json.dumps(cfg.to_dict())}", flush=True)

    data = load_cifar10(cfg.data)
    n_train = cfg.train_subset or len(make_split(data, cfg.split, cfg.split_seed).train)
    flops = schedule_flops(cfg, n_train)
    peak_before = matmul_peak(args.peak_size, args.peak_repeats, device=device)
    sizes = "".join(f", {m} images at {s}px" for s, m in flops.get("images_per_size", {}).items())
    print(f"FLOPs/img (mean over the run's training images{sizes}): forward {flops['forward_per_image'] / 1e9:.4f} G, "
          f"forward+backward {flops['train_per_image'] / 1e9:.4f} G; matmul peak before: "
          f"{peak_before['median_gflops']:.1f} GFLOP/s", flush=True)
    if "train_per_image_by_kind" in flops:
        print("forward+backward GFLOP/img by kind of step: " + ", ".join(
            f"{kind} {g / 1e9:.4f}" for kind, g in flops["train_per_image_by_kind"].items()), flush=True)

    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        run_cfg = replace(cfg, seed=seed)
        out_dir = Path(args.out) / args.recipe / f"seed{seed}"
        print(f"\n== seed {seed} -> {out_dir} (load average {load_average()})", flush=True)
        runs.append(run_seed(run_cfg, data, out_dir, command, args.recipe))
        r = runs[-1]
        print(f"seed {seed}: test acc {100 * r['test_acc_tta']:.2f}% (tta {cfg.tta}), "
              f"{100 * r['test_acc_no_tta']:.2f}% (no TTA); train {r['train_seconds'] / 60:.2f} min, "
              f"{r['images_per_s']:.0f} img/s", flush=True)

    peak_after = matmul_peak(args.peak_size, args.peak_repeats, device=device)
    threads = torch.get_num_threads()
    peak_1t = None
    if threads > 1 and device.type == "cpu":  # does the matmul scale with threads on this machine?
        torch.set_num_threads(1)
        peak_1t = matmul_peak(args.peak_size, args.peak_repeats, device=device)
        torch.set_num_threads(threads)
    peak = max(peak_before["median_gflops"], peak_after["median_gflops"])
    summary = summarize(args.recipe, cfg, runs, flops, peak)
    per_seed = [seed_row(r, flops, peak) for r in runs]

    print()
    print(command)
    print(f"Official split (50k train / {runs[0]['test_n'] or '10k'} test), data {data.source}. "
          f"fp32 torch.mm {args.peak_size}x{args.peak_size}, {peak_before['threads']} threads, median of "
          f"{args.peak_repeats}: {peak_before['median_gflops']:.1f} GFLOP/s before, "
          f"{peak_after['median_gflops']:.1f} after; peak = {peak:.1f} GFLOP/s"
          + (f" (1 thread: {peak_1t['median_gflops']:.1f}). " if peak_1t else ". ") +
          f"FLOPs: matmul/conv only (FlopCounterMode). Load average at the end: {load_average()}.")
    print()
    print(format_table([summary], SUMMARY_COLUMNS))
    print()
    print(format_table(per_seed, SEED_COLUMNS))

    report = {"command": command, "recipe": args.recipe, "config": cfg.to_dict(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu": cpu_name(), "data": data.source,
              "flops": flops, "matmul_peak": {"before": peak_before, "after": peak_after, "one_thread": peak_1t,
                              "peak_gflops": peak},
              "runs": runs, "summary": summary, "per_seed": per_seed}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nraw numbers: {args.json}")
    return report


if __name__ == "__main__":
    main()
