"""Classify and Compare tabs: both are views of one cached ensemble prediction."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from cifar_core.data import CLASSES
from cifar_core.images import ImageInputError

from .common import confidences, enlarged, image_input, require_image, user_errors

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def example_files() -> list[str]:
    """Real CIFAR test images first, then the non-CIFAR photos (whatever build_assets wrote)."""
    files = sorted(EXAMPLES_DIR.glob("cifar_*.png")) + sorted(EXAMPLES_DIR.glob("photo_*"))
    return [str(f) for f in files]


def ood_notice(lab, pred) -> str:
    if pred.ood is None:
        return "_Out-of-distribution check unavailable: no threshold in demo/assets (run `python -m demo.build_assets`)._"
    kept = f"{lab.assets['ood'].get('keeps_in_distribution', 0.95):.0%} of validation images pass"
    if pred.ood:
        return (f"### ⚠️ This doesn't look like any CIFAR-10 class\nThe ensemble's highest probability is "
                f"**{pred.ood_score:.2f}**, below the threshold **{lab.ood_threshold:.2f}** (chosen so that {kept}). "
                "The top-5 is what the models would guess anyway.")
    return f"In distribution: highest probability {pred.ood_score:.2f} ≥ threshold {lab.ood_threshold:.2f} ({kept})."


def classify(lab, upload):
    """-> (ensemble top-5, the 32x32 image the models see, OOD notice)."""
    pred = lab.predict(require_image(lab, upload))
    return confidences(pred.probs), enlarged(pred.image), ood_notice(lab, pred)


def classify_on_change(lab, upload):
    """The UI path: a bad upload is explained where the answer would be (a toast alone fades away)."""
    if upload is None:  # the image was cleared: clear the outputs, no error
        return None, None, ""
    try:
        return classify(lab, upload)
    except ImageInputError as e:
        gr.Warning(f"Could not use this image: {e}")
        return None, None, f"### ❌ Could not use this image\n{e}. Try another file or one of the examples."


def compare(lab, upload, k: float = 3):
    """-> (agree/disagree badge, one row per model + the ensemble: top-k with probabilities, latency)."""
    k = int(k)
    if not 1 <= k <= len(CLASSES):
        raise gr.Error(f"k must be between 1 and {len(CLASSES)}, got {k}")
    pred = lab.predict(require_image(lab, upload))
    rows = []
    for name, probs in list(pred.members.items()) + [("ensemble", pred.probs)]:
        order = probs.argsort()[::-1][:k]
        row = {"model": name}
        for rank, c in enumerate(order, 1):
            row[f"top-{rank}"] = f"{CLASSES[c]} ({probs[c]:.2f})"
        seconds = pred.seconds.get(name, sum(pred.seconds.values()))
        row["latency ms"] = round(1000 * seconds, 1)
        rows.append(row)
    top = {name: CLASSES[int(p.argmax())] for name, p in pred.members.items()}
    ensemble_top = CLASSES[pred.top]
    if len(top) == 1:
        badge = f"Only one model is loaded ({next(iter(top))}): it says **{ensemble_top}**."
    elif all(t == ensemble_top for t in top.values()):
        badge = f"### ✅ Agree: all {len(top)} models say **{ensemble_top}**"
    else:
        badge = "### ❌ Disagree: " + ", ".join(f"{n} → **{t}**" for n, t in top.items()) + \
                f" (ensemble: **{ensemble_top}**)"
    badge += "\n\nLatency: the first computation of this image on this server (results are cached)."
    return badge, pd.DataFrame(rows)


def build_classify(lab):
    with gr.Row():
        with gr.Column(scale=1):
            image = image_input(elem_id="upload")
            button = gr.Button("Classify", variant="primary")
            gr.Examples(example_files(), inputs=image, label="Examples: real CIFAR-10 test images, then other photos",
                        examples_per_page=15, elem_id="examples")
        with gr.Column(scale=1):
            notice = gr.Markdown(elem_id="ood-notice")
            label = gr.Label(num_top_classes=5, label="Ensemble top-5 (calibrated probabilities)", elem_id="top5")
            seen = gr.Image(label="What the models see (32x32, enlarged)", interactive=False, height=180,
                            format="png", elem_id="seen")
    outputs = [label, seen, notice]
    button.click(user_errors(lambda u: classify(lab, u)), image, outputs, api_name="predict",
                 concurrency_id="models")
    image.change(user_errors(lambda u: classify_on_change(lab, u)), image, outputs, api_visibility="private",
                 concurrency_id="models", show_progress="minimal")
    return image


def build_compare(lab, image, tab):
    gr.Markdown("Every model's top-k next to the ensemble, for the image in the **Classify** tab.")
    with gr.Row():
        k = gr.Slider(1, len(CLASSES), value=3, step=1, label="k")
        button = gr.Button("Compare", variant="primary")
    badge = gr.Markdown(elem_id="agree-badge")
    table = gr.Dataframe(label="Top-k per model", interactive=False, elem_id="compare-table")
    fn = user_errors(lambda u, kk: compare(lab, u, kk))
    button.click(fn, [image, k], [badge, table], api_name="compare", concurrency_id="models")
    refresh = user_errors(lambda u, kk: compare(lab, u, kk) if u is not None else (gr.skip(), gr.skip()))
    tab.select(refresh, [image, k], [badge, table], api_visibility="private", concurrency_id="models")
    k.release(refresh, [image, k], [badge, table], api_visibility="private", concurrency_id="models")
