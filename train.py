#!/usr/bin/env python
"""CIFAR-10 lab CLI: train any registered model, re-evaluate checkpoints, list models.

  python train.py --level 3 --data ../shared/data/cifar10          # our CNN, the shipped recipe
  python train.py --model cifar_cnn --epochs 2 --out runs/quick     # any model, any budget
  python train.py evaluate checkpoints/cifar_cnn --subset test      # re-measure a checkpoint
  python train.py models                                            # what can be trained
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

COMMANDS = ("train", "evaluate", "models")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def data_args(p: argparse.ArgumentParser) -> None:
    from cifar_core.data import SPLITS
    p.add_argument("--data", help="CIFAR-10 folder: ImageFolder (train/<class>/, test/<class>/) or one "
                                  "holding cifar-10-batches-py/. Default: $CIFAR10_DIR")
    p.add_argument("--download", action="store_true",
                   help="when no --data/$CIFAR10_DIR is given, download the torchvision format (needs internet)")
    p.add_argument("--split", choices=SPLITS,
                   help="seed: stratified 80/10/10 of all 60k (default); canonical: official train 45k/5k + "
                        "official 10k test; official: 50k train, no val, 10k test")
    p.add_argument("--split-seed", type=int, help="seed of the split (default 0)")


def build_parser() -> argparse.ArgumentParser:
    from cifar_core.models import list_models
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")

    t = sub.add_parser("train", help="train a model (the default command)",
                       description="Train a model. Flags given override the --level preset.")
    t.add_argument("--level", type=int, help="a preset recipe of the challenge (3: our CNN); flags override it")
    t.add_argument("--model", choices=list_models(), help="registered model name (default cifar_cnn)")
    t.add_argument("--epochs", type=positive_float, help="training epochs (fractions allowed)")
    t.add_argument("--batch-size", type=positive_int, help="images per optimizer step")
    t.add_argument("--lr", type=positive_float, help="peak learning rate")
    t.add_argument("--optimizer", choices=("sgd", "adamw"), help="SGD with Nesterov momentum, or AdamW")
    t.add_argument("--weight-decay", type=float, help="weight decay on conv/linear weights (never norms/biases)")
    t.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy (0-1)")
    t.add_argument("--schedule", choices=("triangle", "cosine"), help="lr schedule after warmup")
    t.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time augmentation for reported metrics")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (slower on CPUs without native bf16: see benchmarks/RESULTS.md)")
    t.add_argument("--lookahead", action=argparse.BooleanOptionalAction,
                   help="lookahead weight averaging (pull towards a slow EMA every 5 steps)")
    t.add_argument("--train-subset", type=positive_int, help="train on this many images (stratified)")
    t.add_argument("--pretrained", action="store_true", help="start from ImageNet weights (timm hub, online)")
    t.add_argument("--pretrained-file", help="start from a local .safetensors weights file")
    t.add_argument("--seed", type=int, help="seed of init, shuffling and augmentation (default 0)")
    t.add_argument("--out", help="checkpoint folder (default: the level's, else runs/<model>)")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay)")
    data_args(t)

    e = sub.add_parser("evaluate", help="re-evaluate a checkpoint and print a table",
                       description="Re-measure a checkpoint on a split of the data and compare with its meta.json.")
    e.add_argument("checkpoint", help="checkpoint folder (holds model.safetensors and meta.json)")
    e.add_argument("--subset", choices=("train", "val", "test"), default="test")
    e.add_argument("--tta", type=int, choices=(0, 1, 2), help="default: the level recorded in meta.json")
    e.add_argument("--per-class", action="store_true", help="also print per-class accuracy")
    e.add_argument("--plots", action="store_true", help="(re)write curves.png and confusion.png beside it")
    data_args(e)

    sub.add_parser("models", help="list registered models with their input size and Grad-CAM layer")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train", *argv]  # `train.py --level 3` means `train.py train --level 3`
    return build_parser().parse_args(argv)


def cmd_train(args, parser) -> int:
    from cifar_core.engine import TrainConfig, train
    from cifar_core.levels import get_level

    base, out = TrainConfig(), None
    if args.level is not None:
        try:
            level = get_level(args.level)
        except KeyError as e:
            parser.error(str(e.args[0]))
        base, out = level.config, level.out
    flags = {"model": args.model, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "optimizer": args.optimizer, "weight_decay": args.weight_decay,
             "label_smoothing": args.label_smoothing, "schedule": args.schedule, "tta": args.tta,
             "train_subset": args.train_subset, "seed": args.seed, "data": args.data, "split": args.split,
             "split_seed": args.split_seed, "pretrained_file": args.pretrained_file,
             "bf16": args.bf16, "lookahead": args.lookahead}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.pretrained:
        overrides["pretrained"] = True
    if args.no_progress:
        overrides["progress"] = False
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    cfg = replace(base, **overrides)
    out = Path(args.out or out or f"runs/{cfg.model}")
    if args.download and not cfg.data:
        from cifar_core.data import download_torchvision, cache_dir
        cfg = replace(cfg, data=str(download_torchvision(cache_dir() / "download")))
    command = "python train.py " + " ".join(sys.argv[1:])
    result = train(cfg, out_dir=out, resume=args.resume, extra_meta={"command": command})
    test = result.metrics.get("test")
    if test:
        print(f"\n{cfg.model}: test accuracy {test['accuracy']:.4f} (tta={cfg.tta}), checkpoint in {out}")
    return 0


def cmd_evaluate(args, parser) -> int:
    from cifar_core.checkpoint import load_checkpoint
    from cifar_core.data import load_cifar10, make_split
    from cifar_core.evaluate import evaluate_predictor, format_table, plot_confusion, plot_curves
    from cifar_core.predictor import Predictor

    model, meta = load_checkpoint(args.checkpoint)
    split_name = args.split or meta["split"]["name"]
    split_seed = meta["split"]["seed"] if args.split_seed is None else args.split_seed
    # --data, else $CIFAR10_DIR, else the folder the checkpoint was trained from
    fallback = None if os.environ.get("CIFAR10_DIR") else meta["train_config"].get("data")
    data = load_cifar10(args.data or fallback)
    split = make_split(data, split_name, split_seed)
    tta = meta["metrics"].get("tta", 0) if args.tta is None else args.tta
    idx = split.indices(args.subset)
    if not len(idx):
        parser.error(f"split {split_name!r} has no {args.subset} images")
    result = evaluate_predictor(Predictor(model, tta=tta, temperature=meta.get("temperature", 1.0)),
                                data.images[idx], data.labels[idx])
    recorded = meta["metrics"].get(args.subset, {}) if split.fingerprint == meta["split"]["fingerprint"] else {}
    row = {"checkpoint": args.checkpoint, "split": split_name, "subset": args.subset, "n": result["n"],
           "tta": tta, "accuracy": result["accuracy"], "nll": result["nll"], "ece": result["ece"],
           "meta accuracy": recorded.get("accuracy", "-")}
    print(format_table([row], list(row)))
    if split.fingerprint != meta["split"]["fingerprint"]:
        print(f"note: this split ({split.fingerprint}) is not the one the checkpoint was trained with "
              f"({meta['split']['fingerprint']}); its test images may overlap the training images.")
    if args.per_class:
        print(format_table([{"class": c, "accuracy": a} for c, a in result["per_class_accuracy"].items()],
                           ["class", "accuracy"]))
    if args.plots:
        folder = Path(args.checkpoint)
        plot_curves(meta.get("history", []), folder / "curves.png", title=folder.name)
        plot_confusion(result["confusion"], folder / "confusion.png", title=f"{folder.name}: {args.subset}")
    return 0


def cmd_models(args, parser) -> int:
    from cifar_core.evaluate import format_table
    from cifar_core.models import get_spec, list_models
    rows = [{"name": n, "input": get_spec(n).input_size, "cam layer": get_spec(n).cam_layer,
             "family": get_spec(n).family, "description": get_spec(n).description} for n in list_models()]
    print(format_table(rows, list(rows[0])))
    return 0


def main(argv: list[str] | None = None) -> int:
    from cifar_core.checkpoint import CheckpointError
    from cifar_core.data import DataSourceError
    from cifar_core.models.pretrained import PretrainedError

    args = parse(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "models": cmd_models}[args.command]
    try:
        return handler(args, parser)
    except (CheckpointError, DataSourceError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
