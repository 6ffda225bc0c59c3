#!/usr/bin/env python
"""Serving latency over real HTTP, with a per-stage breakdown: REST /api/v1/predict and the Gradio
/predict endpoint of the same server (the API with the demo mounted), at 1 and 8 concurrent clients.

    python benchmarks/serving_latency.py --data ../shared/data/cifar10            # the latency tables
    python benchmarks/serving_latency.py --data ../shared/data/cifar10 --soak 60  # + 8 clients x 60 s each
    python benchmarks/serving_latency.py --threads-only        # in-process: members' passes, Grad-CAM main vs worker
    git worktree add /tmp/before <commit> && python benchmarks/serving_latency.py --repo /tmp/before   # a before

Uploads are real CIFAR-10 test images of the seed split (the JPEG q75 copy), each sent once, so the
server's result cache never answers: as 32x32 PNG files ("cifar"), and enlarged to 640x480 JPEG q90 with a
little noise ("photo": what a phone upload costs to decode). The server runs in its own process
(`uvicorn api.app:create_app --factory`, the documented command); the stages come from its
/api/v1/stats (cifar_core/timing.py): decode, preprocess and forward of each member, waiting for a model
lock or for admission, ensemble, out-of-distribution score, JSON serialization (REST). "framework" is the
client's median wait minus the server's median time inside our code: HTTP, multipart parsing, Gradio's
upload + queue + event stream, thread hand-offs.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, env_extra: dict | None = None, repo: Path = ROOT) -> subprocess.Popen:
    """`python -m uvicorn api.app:create_app --factory` in `repo` (its own code comes first on sys.path)."""
    import httpx
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory", "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not come up within 180 s")


# -- uploads --------------------------------------------------------------------------------------

def test_images(data_dir: str | None):
    """The seed split's test images (uint8 N x 3 x 32 x 32), in a fixed shuffled order."""
    from cifar_core import paths
    from cifar_core.data import load_cifar10, make_split
    folder = data_dir or paths.data_source()[0]
    data = load_cifar10(folder)
    split = make_split(data, "seed", 0)
    order = np.random.default_rng(0).permutation(len(split.test))
    return data.images[split.test[order]], data.source


def encode(image_u8, kind: str, rng) -> tuple[bytes, str]:
    """(file bytes, suffix) of one upload."""
    a = image_u8.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    if kind == "cifar":
        Image.fromarray(a).save(buffer, format="PNG")
        return buffer.getvalue(), ".png"
    big = np.asarray(Image.fromarray(a).resize((640, 480), Image.Resampling.BICUBIC), dtype=np.int16)
    big = np.clip(big + rng.integers(-4, 5, big.shape), 0, 255).astype(np.uint8)
    Image.fromarray(big).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue(), ".jpg"


class Uploads:
    """Hands out each test image once (thread-safe), as bytes and as a file (Gradio uploads files)."""

    def __init__(self, images, kind: str, folder: Path, start: int):
        self.images, self.kind, self.folder = images, kind, folder
        self.next = start
        self.lock = threading.Lock()
        self.rng = np.random.default_rng(start)

    def take(self) -> tuple[bytes, Path]:
        with self.lock:
            i = self.next
            self.next += 1
        if i >= len(self.images):
            raise SystemExit("ran out of distinct test images: fewer requests or --seconds")
        data, suffix = encode(self.images[i], self.kind, self.rng)
        path = self.folder / f"{self.kind}_{i}{suffix}"
        path.write_bytes(data)
        return data, path


# -- clients --------------------------------------------------------------------------------------

def rest_client(url: str):
    import httpx
    client = httpx.Client(timeout=120)

    def call(data: bytes, path: Path) -> int:
        r = client.post(f"{url}/api/v1/predict", files={"file": (path.name, data)})
        if r.status_code not in (200, 503):
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        return r.status_code
    return call


def gradio_client(url: str):
    from gradio_client import Client, handle_file
    client = Client(f"{url}/demo/", verbose=False)

    def call(data: bytes, path: Path) -> int:
        client.predict(handle_file(str(path)), api_name="/predict")
        return 200
    return call


def gradio_http_client(url: str):
    """Gradio's protocol over plain HTTP, as the browser speaks it: upload the file, join the queue, read the
    event stream until the answer. Without gradio_client's own per-call work (threads, polling)."""
    import json
    import uuid

    import httpx
    client = httpx.Client(timeout=120)
    base = f"{url}/demo"
    config = client.get(f"{base}/config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "predict")

    def call(data: bytes, path: Path) -> int:
        uploaded = client.post(f"{base}/gradio_api/upload", files={"files": (path.name, data)}).json()[0]
        session = uuid.uuid4().hex
        payload = {"data": [{"path": uploaded, "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}],
                   "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None}
        joined = client.post(f"{base}/gradio_api/queue/join", json=payload)
        if joined.status_code != 200:
            raise RuntimeError(f"queue/join: HTTP {joined.status_code}: {joined.text[:200]}")
        with client.stream("GET", f"{base}/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        if not message.get("success"):
                            raise RuntimeError(str(message.get("output"))[:200])
                        return 200
                    if message.get("msg") == "queue_full":
                        return 503
        raise RuntimeError("the event stream ended without an answer")
    return call


CLIENTS = {"REST /api/v1/predict": rest_client, "Gradio /predict (HTTP, as a browser)": gradio_http_client,
           "Gradio /predict (gradio_client)": gradio_client}
ENDPOINT_KEYS = {"rest": "REST /api/v1/predict", "gradio-http": "Gradio /predict (HTTP, as a browser)",
                 "gradio-client": "Gradio /predict (gradio_client)"}


def run_load(url: str, endpoint: str, uploads: Uploads, clients: int, requests: int | None,
             seconds: float | None) -> dict:
    """`clients` threads, each with its own connection, each sending one request after another; stops after
    `requests` in all or after `seconds`. Returns latencies of answered requests and counts of the rest."""
    callers = [CLIENTS[endpoint](url) for _ in range(clients)]  # connect before the clock starts
    lock = threading.Lock()
    times: list[float] = []
    statuses: dict[str, int] = {}
    sent = [0]
    stop_at = time.perf_counter() + seconds if seconds else None

    def loop(call):
        while True:
            with lock:
                if (requests is not None and sent[0] >= requests) or (stop_at and time.perf_counter() > stop_at):
                    return
                sent[0] += 1
            data, path = uploads.take()
            t0 = time.perf_counter()
            try:
                status = str(call(data, path))
            except Exception as e:  # noqa: BLE001 - counted and reported, never hidden
                status = f"error: {type(e).__name__}: {str(e)[:80]}"
            dt = time.perf_counter() - t0
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    times.append(dt)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(loop, callers))
    return {"times": times, "statuses": statuses, "wall": time.perf_counter() - t0}


def stats(url: str, clear: bool = False) -> dict:
    """The server's stage summary per source, plus its batching counters under "batching"."""
    import httpx
    r = httpx.get(f"{url}/api/v1/stats", params={"clear": clear}, timeout=30)
    if r.status_code == 404:  # a checkout from before /api/v1/stats (--repo): client-side numbers only
        return {"batching": {"batches": 0, "images": 0}}
    answer = r.json()
    return {**answer["sources"], "batching": answer["batching"]}


def describe(repo: Path) -> str:
    """The checkout being served: its commit, and whether it has uncommitted changes."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=repo, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "?"
    return f"{repo.name} at {commit}" + (" + uncommitted changes" if git("status", "--porcelain", "-uno") else "")


def ms(values, q) -> float:
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


# -- Grad-CAM on the main thread vs a worker thread ---------------------------------------------

BUSY = ("import time, torch\ntorch.set_num_threads(2)\na = torch.randn(1000, 1000)\n"
        "while True:\n    a @ a\n")  # another job using both cores, as when tests or a training run share the CPU


def thread_check(n: int = 10) -> list[tuple[str, float, float]]:
    """Median seconds of Lab.explain (every member + the ensemble's map, Grad-CAM, no cached map) on this
    process's main thread and on a worker thread, interleaved, over the demo's example images; alone on the
    CPU, then beside a process that keeps both cores busy."""
    from cifar_core.serving import BoundedCache, Lab
    from cifar_core.paths import example_files
    lab = Lab()
    images = [lab.decode(f) for f in example_files()][:n]
    for image in images:
        lab.predict(image)  # the predictions are cached: both threads time the maps alone
    pool = ThreadPoolExecutor(1)

    def one(image) -> float:
        lab._explanations = BoundedCache(8)
        t0 = time.perf_counter()
        lab.explain(image, lab.names, "gradcam", None)
        return time.perf_counter() - t0

    def measure() -> tuple[float, float]:
        one(images[0])
        pool.submit(one, images[0]).result()
        main, worker = [], []
        for i, image in enumerate(images):
            order = (main, worker) if i % 2 else (worker, main)  # alternate which thread goes first
            for times in order:
                times.append(one(image) if times is main else pool.submit(one, image).result())
        return statistics.median(main), statistics.median(worker)
    rows = [("alone on the CPU", *measure())]
    busy = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(2)
        rows.append(("beside a 2-thread job", *measure()))
    finally:
        busy.kill()
        busy.wait()
    pool.shutdown()
    return [(f"Lab.explain, Grad-CAM, {len(lab.names)} members + ensemble, {where}", m, w) for where, m, w in rows]


# -- the members' forward passes in-process ----------------------------------------------------

def member_check(repeats: int = 15) -> list[tuple]:
    """Per member, median ms of its served forward (logits + features, its TTA) for one image: one pass per
    TTA view (the reference path) vs the views stacked into one pass; then all members for 8 images at once
    (what a batch of 8 concurrent requests costs per image)."""
    import torch

    from cifar_core.serving import Lab
    lab = Lab()
    g = torch.Generator().manual_seed(0)

    def median_ms(fn, x) -> float:
        timeit.repeat(lambda: fn(x), number=1, repeat=3)  # warm-up
        return 1000 * statistics.median(timeit.repeat(lambda: fn(x), number=1, repeat=repeats))
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    rows = []
    for m in lab.members:
        p = m.predictor
        p.fuse_views = False
        per_view = median_ms(p.logits_and_features, one)
        p.fuse_views = True
        rows.append((m.name, p.spec.input_size, p.tta, per_view, median_ms(p.logits_and_features, one)))
    eight = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=g)
    all_one = median_ms(lambda x: lab.ensemble.member_probs(x, features=True), one)
    all_eight = median_ms(lambda x: lab.ensemble.member_probs(x, features=True), eight) / 8
    return rows + [("all members", "", "", all_one, all_eight)]


def print_members(rows) -> None:
    print("\nThe members' served forward pass for one image (logits + features, in-process, median ms)\n")
    print("| member | px | TTA | one pass per view | views stacked in one pass |")
    print("|---|---|---|---|---|")
    for name, px, tta, per_view, stacked in rows[:-1]:
        print(f"| {name} | {px} | {tta} | {per_view:.1f} | {stacked:.1f} |")
    name, _, _, one, eight = rows[-1]
    print(f"\nAll members, views stacked: {one:.1f} ms for 1 image; {eight:.1f} ms per image in a batch of 8.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="CIFAR-10 folder (default $CIFAR10_DIR or ../shared/data/cifar10)")
    p.add_argument("--requests", type=int, default=60, help="requests per row of the latency table")
    p.add_argument("--clients", default="1,8", help="concurrency levels")
    p.add_argument("--uploads", default="cifar,photo", help="cifar (32x32 PNG) and/or photo (640x480 JPEG)")
    p.add_argument("--endpoints", default="rest,gradio-http,gradio-client", help=", ".join(ENDPOINT_KEYS))
    p.add_argument("--soak", type=float, default=0, help="then 8 clients for this many seconds per endpoint")
    p.add_argument("--threads-only", action="store_true",
                   help="only the in-process tables: members' forward passes, Grad-CAM on main vs worker thread")
    p.add_argument("--repo", type=Path, default=ROOT,
                   help="serve this checkout instead, for a before/after: git worktree add /tmp/before <commit>")
    args = p.parse_args()

    if args.threads_only:
        print_members(member_check())
        print_threads(thread_check())
        return
    images, source = test_images(args.data)
    endpoints = [ENDPOINT_KEYS[e] for e in args.endpoints.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(port, repo=args.repo)
    rows, breakdown, soaks = [], [], []
    offset = 0
    try:
        with tempfile.TemporaryDirectory() as tmp:
            warm = Uploads(images, "cifar", Path(tmp), len(images) - 40)  # not measured: first-use work
            for endpoint in endpoints:
                run_load(url, endpoint, warm, 2, 10, None)
            for kind in args.uploads.split(","):
                for endpoint in endpoints:
                    for clients in map(int, args.clients.split(",")):
                        uploads = Uploads(images, kind, Path(tmp), offset)
                        before = stats(url, clear=True)["batching"]
                        result = run_load(url, endpoint, uploads, clients, args.requests, None)
                        offset = uploads.next
                        server = stats(url)
                        after = server.pop("batching")
                        batches = after["batches"] - before["batches"]
                        result["mean_batch"] = (after["images"] - before["images"]) / batches if batches else 0
                        rows.append((endpoint, kind, clients, result))
                        breakdown.append((endpoint, kind, clients, result, server))
            for endpoint in endpoints if args.soak else []:
                uploads = Uploads(images, "cifar", Path(tmp), offset)
                result = run_load(url, endpoint, uploads, 8, None, args.soak)
                offset = uploads.next
                soaks.append((endpoint, result))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    print(f"data: {source}; server: uvicorn api.app:create_app (demo mounted) of {describe(args.repo)}, this CPU "
          f"({os.cpu_count()} cores), default limits\n")
    print("| endpoint | upload | clients | answered | other outcomes | p50 ms | p95 ms | requests/s |")
    print("|---|---|---|---|---|---|---|---|")
    for endpoint, kind, clients, r in rows:
        other = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items() if k != "200") or "none"
        print(f"| {endpoint} | {kind} | {clients} | {len(r['times'])} | {other} | {ms(r['times'], 50):.0f} | "
              f"{ms(r['times'], 95):.0f} | {len(r['times']) / r['wall']:.1f} |")
    print_breakdown(breakdown)
    if soaks:
        print(f"\nSoak: 8 clients, {args.soak:g} s each, 32x32 PNG test images, each sent once\n")
        print("| endpoint | requests | answered | refused (503 / queue full) | errors | p50 ms | p95 ms | max ms |")
        print("|---|---|---|---|---|---|---|---|")
        for endpoint, r in soaks:
            n = sum(r["statuses"].values())
            refused = r["statuses"].get("503", 0)
            errors = n - len(r["times"]) - refused
            print(f"| {endpoint} | {n} | {len(r['times'])} | {refused} | {errors} | {ms(r['times'], 50):.0f} | "
                  f"{ms(r['times'], 95):.0f} | {max(r['times'], default=0) * 1000:.0f} |")
            for k, v in r["statuses"].items():
                if k.startswith("error"):
                    print(f"  {endpoint}: {v} x {k}")
    if args.repo == ROOT:
        print_members(member_check())
        print_threads(thread_check())


def print_breakdown(breakdown) -> None:
    """Server-side p50 per stage (ms) for each row; members' stages summed over their TTA views."""
    print("\nWhere the time goes: server-side p50 per stage, ms, over the requests that had the stage.\n"
          "'framework' = client p50 - server 'total' p50. Concurrent predictions share batches\n"
          "(cifar_core/batching.py): one request runs a batch (its stages are the whole batch's),\n"
          "the others wait for it ('batch_wait').\n")
    names: list[str] = []
    for *_, server in breakdown:
        for source in server.values():  # (batching counters were popped off)
            names += [k for k in source["stages"] if k not in names and k != "total"]
    if not names:
        print("(this server has no /api/v1/stats: no breakdown)")
        return
    print("| endpoint | upload | clients | images per batch | " + " | ".join(names) +
          " | total (our code) | framework | client p50 |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|---|")
    for endpoint, kind, clients, result, server in breakdown:
        source = server.get("rest:predict" if endpoint.startswith("REST") else "gradio:predict")
        if not source:
            continue
        stages = source["stages"]
        cells = [f"{stages[n]['p50_ms']:.1f}" if n in stages else "-" for n in names]
        total = stages["total"]["p50_ms"]
        client = ms(result["times"], 50)
        print(f"| {endpoint} | {kind} | {clients} | {result['mean_batch']:.1f} | " + " | ".join(cells) +
              f" | {total:.1f} | {client - total:.1f} | {client:.1f} |")


def print_threads(rows) -> None:
    import torch
    print(f"\nGrad-CAM on the main thread vs a worker thread (median s, interleaved; torch threads "
          f"{torch.get_num_threads()}, interop {torch.get_num_interop_threads()})\n")
    print("| call | main thread s | worker thread s |")
    print("|---|---|---|")
    for name, main_s, worker_s in rows:
        print(f"| {name} | {main_s:.3f} | {worker_s:.3f} |")


if __name__ == "__main__":
    main()
