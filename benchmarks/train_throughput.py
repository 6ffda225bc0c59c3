"""Training throughput of a model on this CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

  python benchmarks/train_throughput.py --model cifar_cnn --batch-size 512 --repeats 5

Prints a Markdown table of images/s (median of --repeats timed steps after one warm-up step).
Synthetic inputs: throughput does not depend on pixel values.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cifar_core.engine import TrainConfig, make_optimizer
from cifar_core.evaluate import format_table
from cifar_core.models import create_model


def measure(name: str, batch: int, repeats: int, channels_last: bool, bf16: bool) -> float:
    torch.manual_seed(0)
    model = create_model(name).train()
    size = model.spec.input_size
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = make_optimizer(model, TrainConfig(lr=0.01))
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up oneDNN kernels
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar_cnn")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    rows = []
    for channels_last in (False, True):
        for bf16 in (False, True):
            ips = measure(args.model, args.batch_size, args.repeats, channels_last, bf16)
            rows.append({"model": args.model, "batch": args.batch_size,
                         "memory format": "channels_last" if channels_last else "NCHW",
                         "precision": "bf16 autocast" if bf16 else "fp32", "train images/s": int(round(ips))})
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
