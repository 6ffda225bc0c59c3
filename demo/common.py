"""Pieces every tab uses: the image input, user-facing errors, small display helpers."""
from __future__ import annotations

import functools
import logging
import traceback

import gradio as gr
import numpy as np
import torch
from PIL import Image

from cifar_core.data import CLASSES
from cifar_core.serving import MAX_BATCH
from cifar_core.images import ImageInputError

from .upload import UploadImage

log = logging.getLogger("demo")
# Queue lanes (Gradio concurrency ids). Predictions of concurrent users are batched into shared forward passes
# (cifar_core/batching.py), so up to MAX_BATCH of them run at once; explanations, heavy and one model at a
# time, share the app's default limit (demo/app.py WORKERS).
PREDICT_EVENTS = dict(concurrency_id="predict", concurrency_limit=MAX_BATCH)
MODEL_EVENTS = dict(concurrency_id="models")
PREDICTED = "predicted (ensemble)"
ANY = "any"


def image_input(label="Image", **kw) -> UploadImage:
    return UploadImage(label=label, type="filepath", sources=["upload", "webcam", "clipboard"], height=280, **kw)


def told(error: gr.Error, where: str) -> gr.Error:
    """An expected error the user is told about: one log line, no traceback on the server's console
    (Gradio prints one for every gr.Error unless print_exception is off)."""
    error.print_exception = False
    log.info("%s: %s", where, error.message)
    return error


def user_errors(fn):
    """Turn expected failures into a message the user sees (gr.Error, logged as one line), and
    unexpected ones into a logged traceback plus a short message: the request fails, the app keeps serving."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            raise told(e, fn.__name__) from None
        except ImageInputError as e:
            raise told(gr.Error(f"Could not use this image: {e}"), fn.__name__) from None
        except (KeyError, ValueError) as e:
            raise told(gr.Error(str(e).strip("'\"")), fn.__name__) from None
        except Exception as e:  # noqa: BLE001 - the boundary where nothing may escape
            log.error("unexpected error in %s:\n%s", fn.__name__, traceback.format_exc())  # a bug: the traceback
            raise gr.Error(f"Internal error ({type(e).__name__}); the app is still running, please try again.",
                           print_exception=False) from None
    return wrapper


def require_image(lab, upload) -> torch.Tensor:
    if upload is None or (isinstance(upload, (bytes, str)) and not upload):
        raise gr.Error("Upload an image first (or pick an example).")
    return lab.decode(upload)


def enlarged(image_u8: torch.Tensor, size: int = 160) -> np.ndarray:
    """The 32x32 model input, shown enlarged with nearest neighbour so its real pixels stay visible."""
    im = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    return np.asarray(im.resize((size, size), Image.Resampling.NEAREST))


def confidences(probs: np.ndarray) -> dict[str, float]:
    return {c: float(p) for c, p in zip(CLASSES, probs)}


def class_index(choice: str | None) -> int | None:
    """A target/filter dropdown value -> class index; None for 'predicted' / 'any'."""
    if choice in (None, "", PREDICTED, ANY):
        return None
    if choice not in CLASSES:
        raise ValueError(f"unknown class {choice!r}; choose one of {', '.join(CLASSES)}")
    return CLASSES.index(choice)
