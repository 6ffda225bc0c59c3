#!/usr/bin/env python
"""Demo benchmark: cold start, and p50/p95 latency of /predict, /compare, /explain through
gradio_client at 1 and 4 concurrent clients, on the shipped checkpoints.

  python benchmarks/demo_latency.py [--requests 24] [--checkpoints checkpoints]

Every request sends a different image (an example plus fresh noise), so the app's result cache
never answers: these are real model latencies, queueing included.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WARM_UP_PAUSE_S = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the demo exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "gradio_api/info", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the demo was not ready within {timeout}s")


def make_images(folder: Path, n: int, seed: int) -> list[str]:
    """n example images with fresh noise: a new seed per run keeps every request a cache miss."""
    rng = np.random.default_rng(seed)
    examples = sorted((ROOT / "demo" / "examples").glob("*"))
    paths = []
    for i in range(n):
        im = np.asarray(Image.open(examples[i % len(examples)]).convert("RGB"), dtype=np.int16)
        noisy = np.clip(im + rng.integers(-3, 4, im.shape), 0, 255).astype(np.uint8)
        path = folder / f"bench_{i}.png"
        Image.fromarray(noisy).save(path)
        paths.append(str(path))
    return paths


def endpoint_args(name: str, path: str, models: list[str]):
    from gradio_client import handle_file
    if name == "/predict":
        return (handle_file(path),)
    if name == "/compare":
        return (handle_file(path), 3)
    return (handle_file(path), models, "gradcam", "predicted (ensemble)", 0.5, False, True)


def measure(url: str, name: str, images: list[str], clients: int, models: list[str]) -> list[float]:
    from gradio_client import Client
    per_client = [images[i::clients] for i in range(clients)]

    def run(paths):
        client = Client(url, verbose=False)
        times = []
        for p in paths:
            t0 = time.perf_counter()
            client.predict(*endpoint_args(name, p, models), api_name=name)
            times.append(time.perf_counter() - t0)
        return times
    with ThreadPoolExecutor(clients) as pool:
        return [t for ts in pool.map(run, per_client) for t in ts]


def pct(values, q):
    return float(np.percentile(values, q)) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=24, help="requests per endpoint and concurrency level")
    p.add_argument("--checkpoints", help="checkpoints root (default: the app's default)")
    args = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = dict(os.environ)
    if args.checkpoints:
        env["CIFAR_CHECKPOINTS"] = args.checkpoints
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        ready = time.perf_counter() - t0
        from gradio_client import Client, handle_file
        client = Client(url, verbose=False)
        t1 = time.perf_counter()
        client.predict(handle_file(str(sorted((ROOT / "demo" / "examples").glob("cifar_*"))[0])),
                       api_name="/predict")
        first = time.perf_counter() - t1
        from cifar_core.serving import Lab  # the model names, to explain them all
        names = [m.name for m in Lab(args.checkpoints).members]
        # Not measured: one call per endpoint (loads Grad-CAM's imports if the app's background
        # warm-up has not yet), then a pause for that warm-up to finish its example images.
        example = str(sorted((ROOT / "demo" / "examples").glob("photo_*"))[0])
        for name in ("/predict", "/compare", "/explain"):
            client.predict(*endpoint_args(name, example, names), api_name=name)
        time.sleep(WARM_UP_PAUSE_S)

        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("/predict", "/compare", "/explain"):
                for clients in (1, 4):
                    folder = Path(tmp) / f"{name[1:]}_{clients}"
                    folder.mkdir()
                    images = make_images(folder, args.requests, seed=len(rows) + 1)
                    t = time.perf_counter()
                    times = measure(url, name, images, clients, names)
                    wall = time.perf_counter() - t
                    rows.append((name, clients, len(times), pct(times, 50), pct(times, 95), len(times) / wall))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"models: {', '.join(names)}")
    print(f"cold start (process start -> serving): {ready:.1f} s; first /predict after that: {first * 1000:.0f} ms\n")
    print("| endpoint | clients | requests | p50 ms | p95 ms | requests/s |")
    print("|---|---|---|---|---|---|")
    for name, clients, n, p50, p95, rps in rows:
        print(f"| {name} | {clients} | {n} | {p50:.0f} | {p95:.0f} | {rps:.1f} |")


if __name__ == "__main__":
    main()
