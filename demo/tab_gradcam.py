"""Grad-CAM tab: overlays of the chosen models (and their ensemble) for one target class."""
from __future__ import annotations

import gradio as gr

from cifar_core.data import CLASSES
from cifar_core.edge import NO_GRADCAM

from .common import MODEL_EVENTS, PREDICTED, class_index, confidences, enlarged, require_image, user_errors


# The keys of cifar_core.explain.METHODS. Importing that module pulls in pytorch_grad_cam and
# torchvision (~5 s on 2 cores), so it loads in the background warm-up instead of delaying the
# start; tests/test_demo_api.py checks that this list matches.
CAM_METHODS = ("gradcam", "gradcam++", "hirescam", "layercam", "eigencam", "scorecam")


# Score-CAM runs a forward pass per activation channel of the CAM layer: tens of seconds per image on a
# 2-core CPU where the gradient methods take about a second. Said where the method is picked, before it runs.
SLOW_METHODS = {"scorecam": "slow on CPU: a forward pass per feature channel, about 30 s per image"}
METHOD_INFO = "; ".join(f"{m} is {why}" for m, why in SLOW_METHODS.items()) + "; the others take about a second"


def explain_image(lab, upload, models, method="gradcam", target=PREDICTED, opacity=0.5, shared=False,
                  with_ensemble=True, progress=None):
    """-> (gallery: the input, then (overlay, caption) per model and the ensemble; the ensemble's
    prediction as a clickable label)."""
    if method not in CAM_METHODS:
        raise gr.Error(f"unknown method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    models = list(models or [])
    if not models:
        raise gr.Error("Choose at least one model.")
    if not 0.0 <= float(opacity) <= 1.0:
        raise gr.Error(f"opacity must be between 0 and 1, got {opacity}")
    image = require_image(lab, upload)
    # The input first: the maps are read against it (and a one-tile gallery would open in preview mode).
    def step(done, total, model):
        if progress is not None:
            progress((done, total), desc=f"{method}: {model}" + (f" ({SLOW_METHODS[method]})"
                                                                   if method in SLOW_METHODS else ""))
    tiles = [(enlarged(image, 256), "input (what the models see)")] + lab.explain(
        image, models, method, class_index(target), alpha=float(opacity), shared=bool(shared),
        with_ensemble=bool(with_ensemble), progress=step)
    return tiles, confidences(lab.predict(image).probs)


def build_gradcam(lab, image, tab):
    gr.Markdown("Class-activation maps for the image in the **Classify** tab. Click a class in the "
                "prediction to re-target every map.")
    if lab.edge:
        gr.Markdown(f"Edge models ({', '.join(lab.edge_names)}) are not listed: {NO_GRADCAM}. "
                    "The maps here are those of the full PyTorch models.", elem_id="cam-edge-note")
    with gr.Row():
        # every member, those outside the ensemble (fitted weight 0) labelled so and not ticked at first
        models = gr.CheckboxGroup([(lab.label(n), n) for n in lab.names], value=lab.weighted_names, label="Models")
        method = gr.Dropdown(list(CAM_METHODS), value="gradcam", label="Method", info=METHOD_INFO,
                             elem_id="cam-method")
        target = gr.Dropdown([PREDICTED, *CLASSES], value=PREDICTED, label="Target class")
    with gr.Row():  # columns with min widths: on a phone the row wraps instead of squeezing the labels
        with gr.Column(min_width=220):
            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Map opacity")
        with gr.Column(min_width=220):
            shared = gr.Checkbox(False, label="Shared colour scale across models")
            with_ensemble = gr.Checkbox(True, label="Add the ensemble's map")
        with gr.Column(min_width=220):
            button = gr.Button("Explain", variant="primary")
    with gr.Row():
        gallery = gr.Gallery(label="Overlays", columns=4, height=300, object_fit="contain", format="png", preview=False,
                             elem_id="cam-gallery")
        prediction = gr.Label(num_top_classes=10, label="Ensemble prediction (click a class to target it)",
                              elem_id="cam-label")
    inputs = [image, models, method, target, opacity, shared, with_ensemble]
    outputs = [gallery, prediction]
    def explain(image, models, method="gradcam", target=PREDICTED, opacity=0.5, shared=False, with_ensemble=True,
                progress=gr.Progress()):
        """Show where each model looks when it classifies a photo: class-activation maps (Grad-CAM and
        relatives) overlaid on the 32x32 image the models see, per model and for the weighted ensemble.

        Args:
            image: the photo (PNG, JPEG, WebP, GIF, BMP or TIFF, any size); the models see it as 32x32 pixels.
            models: which models to explain: any of the ensemble's members (see the Compare tool's table).
            method: gradcam, gradcam++, hirescam, layercam, eigencam or scorecam (slow: about 30 s per image).
            target: the class to explain, one of the 10 CIFAR-10 classes, or "predicted (ensemble)".
            opacity: how strongly the map covers the image, 0 to 1.
            shared: one colour scale across all models (compares their strengths) instead of one per model.
            with_ensemble: also show the ensemble's weighted map.

        Returns:
            a gallery: the input, then one overlay per model (and the ensemble) with a caption naming the model,
            the class and its probability; the ensemble's prediction with probabilities.
        """
        return explain_image(lab, image, models, method, target, opacity, shared, with_ensemble, progress=progress)
    fn = user_errors(explain)
    button.click(fn, inputs, outputs, api_name="explain", **MODEL_EVENTS)

    def refresh(upload, models, method, target, opacity, shared, with_ensemble, progress=gr.Progress()):
        """UI-driven updates: quietly do nothing until there is an image."""
        if upload is None:
            return gr.skip(), gr.skip()
        return fn(upload, models, method, target, opacity, shared, with_ensemble, progress=progress)
    tab.select(refresh, inputs, outputs, api_visibility="private", **MODEL_EVENTS)
    # One user action, one job: a Dropdown's `input` fires twice per pick in Gradio 6.31 (both queue a full
    # Grad-CAM run, ~30 s for scorecam on CPU), so dropdowns listen to `select` (user picks only).
    for control in (models, shared, with_ensemble):
        control.input(refresh, inputs, outputs, api_visibility="private", **MODEL_EVENTS,
                      trigger_mode="always_last")
    for control in (method, target):
        control.select(refresh, inputs, outputs, api_visibility="private", **MODEL_EVENTS,
                       trigger_mode="always_last")
    opacity.release(refresh, inputs, outputs, api_visibility="private", **MODEL_EVENTS)

    def retarget(evt: gr.SelectData):
        return evt.value if evt.value in CLASSES else gr.skip()
    prediction.select(retarget, None, target, api_visibility="private").then(
        refresh, inputs, outputs, api_visibility="private", **MODEL_EVENTS)
