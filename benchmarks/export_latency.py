#!/usr/bin/env python
"""Level 5 tables: each shipped model as fp32 PyTorch, fp32 ONNX and int8 ONNX (accuracy, size,
CPU latency), and the distillation comparison (teacher vs student from scratch vs distilled).

  python benchmarks/export_latency.py --data ../shared/data/cifar10              # zoo table
  python benchmarks/export_latency.py --data ../shared/data/cifar10 \
      --students runs/distill/cifar_cnn_small_scratch runs/distill/cifar_cnn_small_distilled

Exports are (re)built under exports/<checkpoint>/ when missing or older than the checkpoint.
Accuracy: the seed split's 6000 test images, no TTA (the same plain forward pass that latency
times). Latency: the model's forward pass on preprocessed input (preprocessing is shared by
all variants), median over repeats after warm-up, `--threads` intra-op threads for both runtimes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cifar_core.checkpoint import WEIGHTS, load_checkpoint
from cifar_core.data import load_cifar10, make_split
from cifar_core.ensemble import Ensemble, find_checkpoints, load_member
from cifar_core.evaluate import format_table
from cifar_core.export import (FP32_FILE, INT8_FILE, OnnxClassifier,
                               calibration_images, export_checkpoint, fx_quantize, is_current)
from cifar_core.paths import checkpoints_dir, exports_dir
from cifar_core.predictor import Predictor, preprocess

ROOT = Path(__file__).resolve().parent.parent


def interleaved_median_ms(models: list, x: torch.Tensor, repeats: int, warmup: int = 5) -> list[dict]:
    """Median ms per call of each model on x: wall clock, and the calling thread's CPU time.

    Rounds alternate between the models, so a load spike on this shared machine hits every
    variant alike. With one intra-op thread both runtimes compute on the calling thread, so its
    CPU time is the latency the model would have on an idle core, even while others use the CPU."""
    wall, cpu = [[] for _ in models], [[] for _ in models]
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models:
                m(x)
        for _ in range(repeats):
            for i, m in enumerate(models):
                t0, c0 = time.perf_counter(), time.thread_time()
                m(x)
                cpu[i].append(time.thread_time() - c0)
                wall[i].append(time.perf_counter() - t0)
    return [{"wall": 1000 * statistics.median(w), "cpu": 1000 * statistics.median(c)} for w, c in zip(wall, cpu)]


def accuracy(model, spec, images, labels) -> tuple[float, torch.Tensor]:
    preds = Predictor(model, spec, tta=0).logits(images).argmax(1)
    return float((preds == labels).float().mean()), preds


def latencies(models: list, spec, images, repeats: int) -> list[dict]:
    x1 = preprocess(images[:1], spec).contiguous(memory_format=torch.channels_last)
    x64 = preprocess(images[:64], spec).contiguous(memory_format=torch.channels_last)
    b1 = interleaved_median_ms(models, x1, repeats)
    b64 = interleaved_median_ms(models, x64, max(5, repeats // 10))
    return [{"b1": a, "b64": b} for a, b in zip(b1, b64)]


def ensure_exports(ckpt_dir: Path, exports_root: Path, data, split, rebuild: bool) -> Path:
    model, meta = load_checkpoint(ckpt_dir)
    out = exports_root / ckpt_dir.name
    if rebuild or not all(is_current(out / f, meta, ckpt_dir.name) for f in (FP32_FILE, INT8_FILE)):
        t0 = time.perf_counter()
        export_checkpoint(model, meta, ckpt_dir.name, out, calibration_images(data, split))
        print(f"exported {ckpt_dir.name} -> {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return out


def measure(ckpt_dir: Path, exports_root: Path, data, split, args) -> list[dict]:
    """One row per variant of one checkpoint."""
    out = ensure_exports(ckpt_dir, exports_root, data, split, args.rebuild)
    images, labels = data.images[split.test], data.labels[split.test]
    torch_model, meta = load_checkpoint(ckpt_dir)
    torch_model = torch_model.to(memory_format=torch.channels_last)
    spec = torch_model.spec
    variants = [("fp32 PyTorch", torch_model, ckpt_dir / WEIGHTS),
                ("fp32 ONNX", OnnxClassifier(out / FP32_FILE, spec, threads=args.threads), out / FP32_FILE),
                ("int8 ONNX", OnnxClassifier(out / INT8_FILE, spec, threads=args.threads), out / INT8_FILE)]
    if args.fx:  # PyTorch's own int8 path, measured for comparison (no pickle-free file to ship)
        variants.append(("int8 PyTorch FX", fx_quantize(torch_model, calibration_images(data, split), spec), None))
    rows, reference = [], None
    timings = latencies([m for _, m, _ in variants], spec, images, args.repeats)
    for (label, model, path), lat in zip(variants, timings):
        acc, preds = accuracy(model, spec, images, labels)
        reference = preds if reference is None else reference
        rows.append({"model": ckpt_dir.name, "variant": label, "test acc %": round(100 * acc, 2),
                     "agree w/ fp32 %": round(100 * float((preds == reference).float().mean()), 2),
                     "file MB": round(path.stat().st_size / 2**20, 2) if path else "-",
                     "b1 ms": round(lat["b1"]["wall"], 3), "b64 ms": round(lat["b64"]["wall"], 2),
                     "b1 cpu ms": round(lat["b1"]["cpu"], 3), "b64 cpu ms": round(lat["b64"]["cpu"], 2)})
    # Speedups from thread CPU time when single-threaded (robust to other users of the machine)
    clock = "cpu ms" if args.threads == 1 else "ms"
    for r in rows:
        r["b1 speedup"] = round(rows[0][f"b1 {clock}"] / r[f"b1 {clock}"], 2)
        r["b64 speedup"] = round(rows[0][f"b64 {clock}"] / r[f"b64 {clock}"], 2)
    return rows


def ensemble_row(ckpt_dirs: list[Path], data, split) -> dict:
    members = [load_member(p, tta=0) for p in ckpt_dirs]
    probs = Ensemble(members).probs(data.images[split.test])
    acc = float((probs.argmax(1) == data.labels[split.test]).float().mean())
    return {"model": f"ensemble ({len(members)} member(s), teacher)", "variant": "fp32 PyTorch",
            "test acc %": round(100 * acc, 2)}


def table(rows: list[dict], columns: list[str]) -> str:
    # %g keeps the rounding chosen above (format_table would pad every float to 4 decimals)
    return format_table([{k: f"{v:g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows], columns)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR)")
    p.add_argument("--checkpoints", default=str(checkpoints_dir()), help="folder of shipped checkpoint folders")
    p.add_argument("--exports", default=str(exports_dir()), help="where ONNX files are (re)built")
    p.add_argument("--students", nargs="*", default=[], help="student checkpoints for the distillation table")
    p.add_argument("--rebuild", action="store_true", help="re-export even when the exports are current")
    p.add_argument("--repeats", type=int, default=200, help="batch-1 repeats (batch 64: a tenth, >= 5)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, PyTorch and onnxruntime alike")
    p.add_argument("--fx", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure PyTorch FX int8 (x86 backend) for comparison")
    p.add_argument("--skip-zoo", action="store_true", help="only the distillation table")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    data = load_cifar10(args.data)
    split = make_split(data, "seed", 0)
    exports_root = Path(args.exports)
    shipped = find_checkpoints(args.checkpoints)
    if not shipped:
        p.error(f"no checkpoints under {args.checkpoints}")
    zoo_rows = [] if args.skip_zoo else [r for c in shipped for r in measure(c, exports_root, data, split, args)]
    columns = ["model", "variant", "test acc %", "agree w/ fp32 %", "file MB", "b1 ms", "b64 ms",
               *(["b1 cpu ms", "b64 cpu ms"] if args.threads == 1 else []), "b1 speedup", "b64 speedup"]
    if zoo_rows:
        print(f"## Exported models ({len(split.test)} seed-split test images, offline JPEG q75 copy of CIFAR-10; "
              f"{args.threads} threads; {torch.__version__} / onnxruntime)\n")
        print(table(zoo_rows, columns))
    result = {"zoo": zoo_rows}
    if args.students:
        rows = [ensemble_row(shipped, data, split)]
        rows += [r for s in args.students for r in measure(Path(s), exports_root, data, split, args)]
        print("\n## Distillation\n")
        print(table(rows, columns))
        result["distillation"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
