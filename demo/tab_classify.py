"""Classify and Compare tabs: both are views of one cached ensemble prediction. Classify can also
serve the int8 ONNX edge models (cifar_core.edge), next to the full ensemble."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from cifar_core import timing
from cifar_core.data import CLASSES
from cifar_core.images import ImageInputError
from cifar_core.paths import REPO, example_files

from .common import PREDICT_EVENTS, confidences, enlarged, image_input, log, require_image, user_errors

SERVE_FULL = "full ensemble (PyTorch)"
SERVE_EDGE = "edge (int8 ONNX)"


def ood_notice(lab, pred) -> str:
    """One sentence on whether the image looks like CIFAR-10 at all, with the score and the threshold."""
    if pred.ood is None:
        return f"_Out-of-distribution check off: {lab.ood_problem}._"
    why = (f"Score **{pred.ood_score:.2f}**, threshold **{lab.ood_threshold:.2f}**: the score is the share of real "
           "CIFAR-10 validation images that look at least as unusual to the models "
           f"(detector: {lab.assets['ood']['name']} on their features).")
    if pred.ood:
        return (f"### ⚠️ This doesn't look like any of the 10 CIFAR-10 classes\n{why} "
                "The top-5 below is what the models would guess anyway.")
    return f"Looks like CIFAR-10. {why}"


def answer_time(stages: dict, pred) -> str:
    """One line: how long this answer took on the server, and where the time went (cifar_core.timing)."""
    ms = {k: 1000 * v for k, v in stages.items()}
    total = ms.get(timing.TOTAL, 0.0)
    if "cached" in ms:
        first = 1000 * (sum(pred.seconds.values()) + pred.ood_seconds)
        return (f"Answered in **{total:.1f} ms** on the server, from its cache (first computed in {first:.0f} ms; "
                f"decode {ms.get('decode', 0):.1f} ms).")
    models = sum(v for k, v in ms.items() if k.split(":")[0] in ("wait", "preprocess", "forward"))
    parts = [f"decode {ms.get('decode', 0):.1f}", f"{len(pred.members)} model(s) {models:.0f}"]
    if "ood" in ms:
        parts.append(f"OOD check {ms['ood']:.1f}")
    return f"Answered in **{total:.0f} ms** on the server ({', '.join(parts)} ms)."


def classify(lab, upload):
    """-> (ensemble top-5, the 32x32 image the models see, OOD notice + answer time, OOD result as data)."""
    with timing.record("gradio:predict") as stages:
        pred = lab.predict(require_image(lab, upload))
    notice = f"{ood_notice(lab, pred)}\n\n{answer_time(stages, pred)}"
    return confidences(pred.probs), enlarged(pred.image), notice, lab.ood_result(pred)


def classify_on_change(lab, upload):
    """The UI path: a bad upload is explained where the answer would be, and the next success replaces
    it (no toast: one would linger over that next result). The server logs one line, no traceback."""
    if upload is None:  # the image was cleared: clear the outputs, no error
        return None, None, "", None
    try:
        return classify(lab, upload)
    except ImageInputError as e:
        log.info("classify: could not use the upload: %s", e)
        return None, None, f"### ❌ Could not use this image\n{e}. Try another file or one of the examples.", None


def compare_models(lab, upload, k: float = 3):
    """-> (agree/disagree badge, one row per model + the ensemble: top-k with probabilities, latency)."""
    k = int(k)
    if not 1 <= k <= len(CLASSES):
        raise gr.Error(f"k must be between 1 and {len(CLASSES)}, got {k}")
    pred = lab.predict(require_image(lab, upload), every_member=True)
    rows = []
    for name, probs in list(pred.members.items()) + [("ensemble", pred.probs)]:
        order = probs.argsort()[::-1][:k]
        row = {"model": lab.label(name) if name in lab.by_name else name}
        for rank, c in enumerate(order, 1):
            row[f"top-{rank}"] = f"{CLASSES[c]} ({probs[c]:.2f})"
        seconds = pred.seconds.get(name, sum(pred.seconds.values()))
        row["latency ms"] = round(1000 * seconds, 1)
        rows.append(row)
    top = {lab.label(name): CLASSES[int(p.argmax())] for name, p in pred.members.items()}
    ensemble_top = CLASSES[pred.top]
    if len(top) == 1:
        badge = f"Only one model is loaded ({next(iter(top))}): it says **{ensemble_top}**."
    elif all(t == ensemble_top for t in top.values()):
        badge = f"### ✅ Agree: all {len(top)} models say **{ensemble_top}**"
    else:
        badge = "### ❌ Disagree: " + ", ".join(f"{n} → **{t}**" for n, t in top.items()) + \
                f" (ensemble: **{ensemble_top}**)"
    if pred.ood is None:
        badge += f"\n\nOut-of-distribution check off: {lab.ood_problem}."
    else:
        verdict = "**flagged**: not like any CIFAR-10 class" if pred.ood else "passes: looks like CIFAR-10"
        badge += (f"\n\nOut-of-distribution score **{pred.ood_score:.2f}**, threshold {lab.ood_threshold:.2f}: "
                  f"{verdict} (detector: {lab.assets['ood']['name']}, {1000 * pred.ood_seconds:.1f} ms).")
    badge += "\n\nLatency: the first computation of this image on this server (results are cached)"
    badge += (f", in one batch with {pred.batch - 1} other concurrent request(s)." if pred.batch > 1 else ".")
    return badge, pd.DataFrame(rows)


# -- edge models ------------------------------------------------------------------------------

def shown_path(path: Path) -> str:
    """A file as the user knows it: relative to the repository when it lies inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def file_size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def serve_info(lab) -> str:
    """The line under the serve choice: what the edge option serves, or why it is unavailable."""
    where = shown_path(lab.exports_root)
    if lab.edge:
        text = f"edge: {', '.join(lab.edge_names)} (int8 ONNX files under {where}/; no Grad-CAM)"
        best = lab.edge_measured.get(lab.default_edge)
        text += (f"; offered first: {lab.default_edge}, the best accuracy per ms ({measured_text(best)})" if best else
                 f"; offered first: {lab.default_edge}, the smallest file (not measured: python -m demo.build_assets)")
    else:
        text = f"edge unavailable: no loadable int8.onnx under {where}/ (python train.py export writes them)"
    if lab.edge_problems:
        text += f"; skipped {len(lab.edge_problems)} broken file(s), see the server log"
    return text


def measured_text(record: dict) -> str:
    """An edge model's two measured numbers, as the UI states them."""
    return f"{100 * record['accuracy']:.1f}% of {record['n']:,} test images right, {record['ms']:.2f} ms per image"


def edge_choice(lab, name: str) -> tuple[str, str]:
    """(label, value) of an edge model in the dropdown: its measured accuracy and latency when known."""
    record = lab.edge_measured.get(name)
    return (f"{name}: {100 * record['accuracy']:.1f}%, {record['ms']:.2f} ms" if record else name), name


def edge_notice(lab, edge, full) -> str:
    """Which file answered, that it is int8, its latency, what the full ensemble says, no Grad-CAM."""
    model = lab.edge[edge.model]
    q = model.quantization
    if q:
        precision = (f"**int8**: weights {q.get('weights', 'int8')}, activations {q.get('activations', 'uint8')} "
                     f"({q.get('tool', 'onnxruntime')}, {q.get('format', 'QDQ')}; ranges calibrated on "
                     f"{q.get('calibration_images', '?')} training images, {q.get('calibration', '?')})")
    else:
        precision = "**int8** (the file records no quantization details)"
    source = f"checkpoint `{model.checkpoint}`" if model.checkpoint else "an unrecorded checkpoint"
    if model.info.get("architecture"):
        source += f" ({model.info['architecture']})"
    record = lab.edge_measured.get(edge.model)
    measured = (f"{measured_text(record)} (test split, one pass without TTA; median of {record['repeats']} "
                f"single-image calls on one thread when the demo's assets were built); accuracy per ms "
                f"{record['accuracy_per_ms']:.0f}"
                + (", the best of the edge models: offered first" if edge.model == lab.default_edge else "")
                if record else "not measured for this file (python -m demo.build_assets measures it)")
    said, ensemble_said = CLASSES[edge.top], CLASSES[full.top]
    agree = "✅ agrees" if said == ensemble_said else "❌ disagrees"
    return (f"### ⚡ {edge.model} → **{said}** ({edge.probs[edge.top]:.2f})\n"
            f"- **File**: `{shown_path(model.path)}` ({file_size(model.size_bytes)}), exported from {source}\n"
            f"- **Precision**: {precision}\n"
            f"- **Latency**: {1000 * edge.seconds:.1f} ms for this image (one forward pass on one CPU thread, "
            "no test-time augmentation; first computation on this server, cached after)\n"
            f"- **Measured**: {measured}\n"
            f"- **Full ensemble** (PyTorch): **{ensemble_said}** ({full.probs[full.top]:.2f}), {agree}\n"
            "- **Grad-CAM: not available for edge models**: onnxruntime computes no gradients. The Grad-CAM tab "
            "explains the full PyTorch models.")


def classify_edge(lab, upload, model=None):
    """-> (the edge model's top-5, a note: its file, int8, latency, the full ensemble's answer).
    `model`: an edge model name; default the best measured accuracy per ms (Lab.default_edge)."""
    if not lab.edge:
        raise gr.Error(f"No edge model is loaded: {serve_info(lab)}.")
    image = require_image(lab, upload)
    edge = lab.edge_predict(image, model or lab.default_edge)
    return confidences(edge.probs), edge_notice(lab, edge, lab.predict(image))


def classify_edge_quietly(lab, upload, serve, model):
    """The UI path: only in edge mode and with an image; a bad upload is already explained by the
    ensemble's notice, so here it just clears the edge outputs."""
    if serve != SERVE_EDGE or not lab.edge:
        return gr.skip(), gr.skip()
    if upload is None:
        return None, ""
    try:
        return classify_edge(lab, upload, model)
    except ImageInputError:
        return None, ""


def build_classify(lab):
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input(elem_id="upload")
            serve = gr.Radio([SERVE_FULL, SERVE_EDGE], value=SERVE_FULL, label="Serve with", info=serve_info(lab),
                             interactive=bool(lab.edge), elem_id="serve")
            button = gr.Button("Classify", variant="primary")
            gr.Examples(example_files(), inputs=image, label="Examples: real CIFAR-10 test images, then other photos",
                        examples_per_page=15, elem_id="examples")
        with gr.Column(scale=1):
            notice = gr.Markdown(elem_id="ood-notice")
            with gr.Row():
                label = gr.Label(num_top_classes=5, label="Ensemble top-5 (calibrated probabilities)", elem_id="top5")
                with gr.Column(visible=False, elem_id="edge-panel") as edge_panel:
                    edge_model = gr.Dropdown([edge_choice(lab, n) for n in lab.edge_names], value=lab.default_edge,
                                             label="Edge model (int8 ONNX): test accuracy, ms per image",
                                             elem_id="edge-model")
                    edge_label = gr.Label(num_top_classes=5, label="Edge model top-5 (int8 ONNX, calibrated)",
                                          elem_id="edge-top5")
                    edge_button = gr.Button("Classify on the edge model", size="sm", elem_id="edge-classify")
            edge_info = gr.Markdown(elem_id="edge-info")
            seen = gr.Image(label="What the models see (32x32, enlarged)", interactive=False, height=180,
                            format="png", elem_id="seen")
    # the OOD result as data: not shown (the notice says it in words), returned to gradio_client callers
    ood = gr.JSON(visible=False, label="Out-of-distribution result", elem_id="ood-json")
    outputs = [label, seen, notice, ood]

    # The named endpoints are functions with Google-style docstrings: gradio_client's "Use via API" page and
    # the MCP tools (python -m demo --mcp) take their names, descriptions and parameters from them.
    def predict(image):
        """Classify a photo as one of the 10 CIFAR-10 classes (airplane, automobile, bird, cat, deer, dog, frog,
        horse, ship, truck) with the calibrated model ensemble, and check whether it looks like CIFAR-10 at all.

        Args:
            image: the photo (PNG, JPEG, WebP, GIF, BMP or TIFF, any size); the models see it as 32x32 pixels.

        Returns:
            the ensemble's top-5 classes with calibrated probabilities; the 32x32 image the models see (enlarged);
            a one-sentence out-of-distribution notice; the out-of-distribution result as data (flagged, score,
            threshold, detector).
        """
        return classify(lab, image)
    button.click(user_errors(predict), image, outputs, api_name="predict", **PREDICT_EVENTS)
    image.change(user_errors(lambda u: classify_on_change(lab, u)), image, outputs, api_visibility="private",
                 **PREDICT_EVENTS, show_progress="minimal")

    edge_outputs = [edge_label, edge_info]
    def predict_edge(image, model=None):
        """Classify a photo with one small int8 ONNX edge model instead of the full ensemble (faster, a little
        less accurate), and say what the full ensemble answers for comparison.

        Args:
            image: the photo (PNG, JPEG, WebP, GIF, BMP or TIFF, any size); the models see it as 32x32 pixels.
            model: the edge model's name (e.g. cifar_cnn_small_distilled-int8); empty for the default one, the best
                measured accuracy per millisecond.

        Returns:
            the edge model's top-5 classes with calibrated probabilities; a note naming the file, its int8
            quantization, its latency for this image and the full ensemble's answer.
        """
        return classify_edge(lab, image, model)
    edge_button.click(user_errors(predict_edge), [image, edge_model], edge_outputs, api_name="predict_edge",
                      **PREDICT_EVENTS)
    quiet = user_errors(lambda u, s, m: classify_edge_quietly(lab, u, s, m))
    for trigger in (image.change, edge_model.input):
        trigger(quiet, [image, serve, edge_model], edge_outputs, api_visibility="private", **PREDICT_EVENTS,
                show_progress="minimal")

    def switch(upload, mode, model):
        shown = mode == SERVE_EDGE and bool(lab.edge)
        if not shown:  # back to the full ensemble: hide the edge panel and its note
            return gr.Column(visible=False), gr.skip(), ""
        return (gr.Column(visible=True), *classify_edge_quietly(lab, upload, mode, model))
    serve.change(user_errors(switch), [image, serve, edge_model], [edge_panel, *edge_outputs],
                 api_visibility="private", **PREDICT_EVENTS)
    return image


def build_compare(lab, image, tab):
    gr.Markdown("Every model's top-k next to the ensemble, for the image in the **Classify** tab.")
    with gr.Row():
        k = gr.Slider(1, len(CLASSES), value=3, step=1, label="k")
        button = gr.Button("Compare", variant="primary")
    badge = gr.Markdown(elem_id="agree-badge")
    table = gr.Dataframe(label="Top-k per model", interactive=False, elem_id="compare-table")
    def compare(image, k=3):
        """Compare every model of the ensemble on one photo: each model's top-k classes next to the ensemble's,
        whether they agree, the out-of-distribution score, and each model's latency.

        Args:
            image: the photo (PNG, JPEG, WebP, GIF, BMP or TIFF, any size); the models see it as 32x32 pixels.
            k: how many classes per model, 1 to 10.

        Returns:
            a markdown badge (agree or disagree, the out-of-distribution score and threshold); a table with one row
            per model and one for the ensemble: top-k classes with probabilities and latency in ms.
        """
        return compare_models(lab, image, k)
    button.click(user_errors(compare), [image, k], [badge, table], api_name="compare", **PREDICT_EVENTS)
    refresh = user_errors(lambda u, kk: compare_models(lab, u, kk) if u is not None else (gr.skip(), gr.skip()))
    tab.select(refresh, [image, k], [badge, table], api_visibility="private", **PREDICT_EVENTS)
    k.release(refresh, [image, k], [badge, table], api_visibility="private", **PREDICT_EVENTS)
