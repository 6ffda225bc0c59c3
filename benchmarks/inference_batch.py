"""Frozen-stage inference speed vs batch size and glibc's handling of freed memory, on this CPU.

  python benchmarks/inference_batch.py            # one fresh process per cell (mallopt is process-wide)

The feature cache and the final measurement of a cached run (cifar_core/frozen.py) are inference at 192 px.
Each cell times EfficientNet-Lite0's stem + stages 0-2 on 1,000 random uint8 images (preprocessing included,
channels_last, fp32, 2 threads) and prints images/s and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time



def cell(batch: int, keep: bool, size: int, images: int) -> None:
    import torch
    from cifar_core import frozen
    from cifar_core.models import create_model
    from cifar_core.predictor import preprocess
    from cifar_core.runtime import keep_freed_memory, peak_rss_gb
    if keep:
        keep_freed_memory()
    model = create_model("tf_efficientnet_lite0", input_size=size).to(memory_format=torch.channels_last)
    part = frozen.frozen_part(model, 2).eval()
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        part(preprocess(data[:batch], model.spec).contiguous(memory_format=torch.channels_last))  # warm-up
        t0 = time.perf_counter()
        for start in range(0, images, batch):
            x = preprocess(data[start:start + batch], model.spec).contiguous(memory_format=torch.channels_last)
            part(x).half().numpy()
        seconds = time.perf_counter() - t0
    print(f"| {batch} | {'kept' if keep else 'returned'} | {images / seconds:.1f} | {peak_rss_gb():.2f} |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="250,56")
    p.add_argument("--size", type=int, default=192)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--cell", nargs=2, metavar=("BATCH", "KEEP"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cell:
        cell(int(args.cell[0]), args.cell[1] == "1", args.size, args.images)
        return
    print(f"Lite0 stem + stages 0-2 at {args.size} px, {args.images} images\n")
    print("| batch | freed memory | images/s | peak RSS GB |\n|---|---|---|---|", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        for keep in ("0", "1"):
            subprocess.run([sys.executable, __file__, "--size", str(args.size), "--images", str(args.images),
                            "--cell", str(batch), keep], check=True)


if __name__ == "__main__":
    main()
