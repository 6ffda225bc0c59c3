"""The CIFAR-10 lab demo: `python -m demo` (or `python app.py` in the repository root, as Spaces starts it).

Five tabs over whatever checkpoints exist under checkpoints/ (or $CIFAR_CHECKPOINTS), plus the int8
ONNX edge models under exports/ (or $CIFAR_EXPORTS) as an option of the Classify tab. Named API
endpoints for gradio_client: /predict, /predict_edge, /compare, /explain (see README.md); with --mcp the same
four are MCP tools.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import gradio as gr

from cifar_core.images import MAX_FILE_BYTES
from cifar_core.paths import example_files
from cifar_core.serving import Lab
from demo.tab_classify import build_classify, build_compare
from demo.tab_gradcam import build_gradcam
from demo.tab_metrics import build_metrics
from demo.tab_mistakes import build_mistakes

QUEUE_SIZE = 32         # waiting requests beyond this are refused with "Queue is full" shown to the user
WORKERS = 2             # explanations run at once (2 cores); predictions have their own lane (common.PREDICT_EVENTS)


def build_app(lab: Lab, queue_size: int = QUEUE_SIZE, workers: int = WORKERS) -> gr.Blocks:
    with gr.Blocks(title="CIFAR-10 lab") as app:
        edge = f" Edge (int8 ONNX): {', '.join(lab.edge_names)}, in the Classify tab." if lab.edge else ""
        gr.Markdown(f"# CIFAR-10 lab\nEnsemble of {len(lab.members)} model(s): {', '.join(lab.names)}.{edge} "
                    "Upload a photo of an airplane, automobile, bird, cat, deer, dog, frog, horse, ship or truck.")
        with gr.Tabs():
            with gr.Tab("Classify", id="classify"):
                image = build_classify(lab)
            with gr.Tab("Compare models", id="compare") as compare_tab:
                build_compare(lab, image, compare_tab)
            with gr.Tab("Grad-CAM", id="gradcam") as cam_tab:
                build_gradcam(lab, image, cam_tab)
            with gr.Tab("Training metrics", id="metrics"):
                build_metrics(lab)
            with gr.Tab("Mistakes", id="mistakes"):
                build_mistakes(lab)
    app.queue(max_size=queue_size, default_concurrency_limit=workers)
    return app


HERE = Path(__file__).resolve().parent


def launch_kwargs(**overrides) -> dict:
    """How the demo is served, by `python -m demo` and when mounted under the REST API alike."""
    kw = dict(max_file_size=MAX_FILE_BYTES, show_error=True, theme=gr.themes.Soft(),
              css_paths=[HERE / "style.css"], head=(HERE / "head.html").read_text())
    kw.update(overrides)
    return kw


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="CIFAR-10 lab demo")
    p.add_argument("--checkpoints", help="folder of checkpoint folders (default $CIFAR_CHECKPOINTS or checkpoints/)")
    p.add_argument("--exports", help="folder of int8 ONNX edge models, <name>/int8.onnx "
                                     "(default $CIFAR_EXPORTS or exports/)")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    p.add_argument("--mcp", action="store_true",
                   help="also serve the named endpoints (predict, predict_edge, compare, explain) as MCP tools at "
                        "/gradio_api/mcp/ (streamable HTTP); GRADIO_MCP_SERVER=true does the same (on Spaces too)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    lab = Lab(args.checkpoints, exports=args.exports)
    app = build_app(lab)
    logging.getLogger("demo").info("built in %.1fs with models %s, edge models %s", time.perf_counter() - t0,
                                   lab.names, lab.edge_names)
    app.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
               **launch_kwargs(mcp_server=True if args.mcp else None))  # None: Gradio reads GRADIO_MCP_SERVER
    # Serving now. Warm the caches in the background (this also imports Grad-CAM's heavy
    # dependencies), so the first click on an example answers instantly in every tab.
    def warm_up():
        started = time.perf_counter()
        lab.warm_up(example_files())
        logging.getLogger("demo").info("examples warmed up in %.1fs", time.perf_counter() - started)
    threading.Thread(target=warm_up, daemon=True, name="warm-up").start()
    app.block_thread()

