"""Mistakes tab: shipped test-set images the ensemble gets wrong (demo/assets/mistakes.npz), filtered
by true / predicted class or by clicking a cell of the ensemble's confusion matrix."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cifar_core.data import CLASSES

from .common import ANY, MODEL_EVENTS, class_index, user_errors

THUMB = 96


class Mistakes:
    """The shipped mistakes, with thumbnails written once so filtering only sends file paths."""

    def __init__(self, lab):
        path = lab.assets_dir / lab.assets.get("mistakes", {}).get("file", "mistakes.npz")
        self.available = path.exists()
        if not self.available:
            return
        with np.load(path) as z:
            self.images = torch.from_numpy(z["images"])
            self.labels = z["labels"].astype(int)
            self.predictions = z["predictions"].astype(int)
            self.confidence = z["confidence"]
        folder = Path(tempfile.mkdtemp(prefix="cifar_demo_mistakes_"))
        self.thumbs = []
        for i, im in enumerate(self.images):
            p = folder / f"{i}.png"
            Image.fromarray(im.permute(1, 2, 0).numpy()).resize((THUMB, THUMB), Image.Resampling.NEAREST).save(p)
            self.thumbs.append(str(p))

    def select(self, true_choice, pred_choice) -> list[int]:
        true_c, pred_c = class_index(true_choice), class_index(pred_choice)
        keep = np.ones(len(self.labels), bool)
        if true_c is not None:
            keep &= self.labels == true_c
        if pred_c is not None:
            keep &= self.predictions == pred_c
        return np.flatnonzero(keep).tolist()

    def gallery(self, indices):
        return [(self.thumbs[i], f"true {CLASSES[self.labels[i]]} → {CLASSES[self.predictions[i]]} "
                                 f"({self.confidence[i]:.2f})") for i in indices]


def describe_selection(lab, mistakes: Mistakes, true_choice, pred_choice, shown: int) -> str:
    """What the gallery shows, in words; above all when it is empty, so an empty gallery is never a puzzle
    (a diagonal cell holds the images the ensemble got right, which are no mistakes)."""
    true_c, pred_c = class_index(true_choice), class_index(pred_choice)
    cm = lab.assets.get("ensemble_test", {}).get("confusion")
    if true_c is not None and true_c == pred_c:
        n = f"all {cm[true_c][true_c]}" if cm is not None else "all"
        return (f"**No mistakes here:** true {CLASSES[true_c]}, predicted {CLASSES[true_c]} is a diagonal cell; "
                f"the ensemble got {n} of these test images right. Pick another cell to see what it confuses.")
    what = " and ".join(part for part in (
        f"true {CLASSES[true_c]}" if true_c is not None else "",
        f"predicted {CLASSES[pred_c]}" if pred_c is not None else "") if part) or "all classes"
    if shown:
        return f"Showing {shown} of the shipped mistakes ({what}). Click an image to see every model on it."
    made = ""
    if cm is not None and true_c is not None and pred_c is not None:
        made = f" The ensemble made {cm[true_c][pred_c]} such mistake(s) on test."
    return f"**No shipped mistakes for {what}.**{made} The demo ships the {len(mistakes.labels)} most confident ones."


def confusion_frame(lab) -> pd.DataFrame:
    cm = lab.assets.get("ensemble_test", {}).get("confusion")
    if cm is None:
        return pd.DataFrame()
    frame = pd.DataFrame(cm, columns=list(CLASSES))
    frame.insert(0, "true \\ predicted", list(CLASSES))
    return frame


def inspect(lab, mistakes: Mistakes, index: int):
    """Every model's prediction and Grad-CAM (of the predicted and the true class) for one mistake."""
    image = mistakes.images[index]
    pred = lab.predict(image, every_member=True)
    true_c = int(mistakes.labels[index])
    rows = [{"model": lab.label(n) if n in lab.by_name else n, "prediction": CLASSES[int(p.argmax())],
             "p(pred)": round(float(p.max()), 3),
             f"p(true={CLASSES[true_c]})": round(float(p[true_c]), 3)}
            for n, p in list(pred.members.items()) + [("ensemble", pred.probs)]]
    tiles = []
    for target, why in ((pred.top, "predicted"), (true_c, "true")):
        tiles += [(im, f"{why}: {caption}") for im, caption in lab.explain(image, lab.names, "gradcam", target)]
    return pd.DataFrame(rows), tiles


def build_mistakes(lab):
    mistakes = Mistakes(lab)
    if not mistakes.available:
        gr.Markdown("No mistakes file in demo/assets: run `python -m demo.build_assets --data ...`.")
        return
    total = lab.assets.get("mistakes", {})
    gr.Markdown(f"{total.get('count')} of the ensemble's {total.get('total_wrong')} test-set mistakes "
                f"({total.get('order')}), for models {', '.join(lab.assets.get('members', []))}. "
                "Click a cell of the confusion matrix (rows: true, columns: predicted) or use the filters.")
    shown = gr.State(list(range(len(mistakes.labels))))
    with gr.Row():
        true_class = gr.Dropdown([ANY, *CLASSES], value=ANY, label="True class")
        pred_class = gr.Dropdown([ANY, *CLASSES], value=ANY, label="Predicted class")
    confusion = gr.Dataframe(confusion_frame(lab), label="Ensemble test confusion (click a cell)",
                             interactive=False, elem_id="mistakes-confusion")
    status = gr.Markdown(describe_selection(lab, mistakes, ANY, ANY, len(mistakes.labels)),
                         elem_id="mistakes-status")
    gallery = gr.Gallery(mistakes.gallery(range(len(mistakes.labels))), label="Mistakes", columns=8,
                         height=420, allow_preview=False, elem_id="mistakes-gallery")
    with gr.Row():
        table = gr.Dataframe(headers=["model", "prediction", "p(pred)", "p(true)"], label="Every model on the "
                             "selected image", interactive=False, elem_id="mistake-models")
        cams = gr.Gallery(label="Grad-CAM: predicted class, then true class", columns=4, height="auto",
                          elem_id="mistake-cams")

    def filter_(t, p):
        indices = mistakes.select(t, p)
        return indices, mistakes.gallery(indices), describe_selection(lab, mistakes, t, p, len(indices))
    for dropdown in (true_class, pred_class):
        dropdown.change(user_errors(filter_), [true_class, pred_class], [shown, gallery, status],
                        api_visibility="private")

    def from_cell(evt: gr.SelectData):
        row, col = evt.index
        if col == 0:  # the row-label column: filter by true class only
            return CLASSES[row], ANY
        return CLASSES[row], CLASSES[col - 1]
    confusion.select(from_cell, None, [true_class, pred_class], api_visibility="private")

    def pick(indices, evt: gr.SelectData):
        return inspect(lab, mistakes, indices[evt.index])
    gallery.select(user_errors(pick), shown, [table, cams], api_visibility="private", **MODEL_EVENTS)
