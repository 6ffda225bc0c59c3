"""Edge models: the int8 ONNX exports under exports/<name>/int8.onnx, served through Predictor.

    models = load_edge_models()                  # every loadable exports/*/int8.onnx ($CIFAR_EXPORTS)
    probs, seconds = models[0].predict(image_u8)  # one 3x32x32 uint8 image -> calibrated probabilities

They are listed and predicted like zoo members but stay out of the ensemble (they approximate
members already in it) and have no Grad-CAM (onnxruntime gives no gradients). The demo
(cifar_core/serving.py) and the REST API (api/service.py) both serve them from here.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .export import INT8_FILE, ExportError, OnnxClassifier, find_exports, read_metadata
from .predictor import Predictor

SUFFIX = "-int8"
NO_GRADCAM = "int8 ONNX models have no Grad-CAM: onnxruntime computes no gradients"


@dataclass
class EdgeModel:
    name: str           # <export folder>-int8, e.g. cifar_cnn_small_distilled-int8
    path: Path          # the int8.onnx file
    info: dict          # provenance from the ONNX metadata (checkpoint, code version, temperature, quantization...)
    predictor: Predictor

    @property
    def checkpoint(self) -> str | None:
        """The checkpoint folder the file was exported from."""
        return self.info.get("checkpoint")

    @property
    def quantization(self) -> dict:
        """How it was quantized (tool, format, weight/activation types, calibration); {} if unrecorded."""
        return self.info.get("quantization") or {}

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def predict(self, image_u8: torch.Tensor) -> tuple[np.ndarray, float]:
        """One uint8 3 x H x W image -> (calibrated probabilities, seconds of the forward pass).
        One pass, no test-time augmentation: the point of an edge model is its latency."""
        t0 = time.perf_counter()
        probs = self.predictor.probs(image_u8[None])[0].numpy()
        return probs, time.perf_counter() - t0


def load_edge_model(path: str | Path, threads: int = 1) -> EdgeModel:
    """One int8 export; ExportError says what is wrong with a missing, malformed or foreign file."""
    path = Path(path)
    try:
        info = read_metadata(path)
        spec = info["spec"]
        onnx_model = OnnxClassifier(path, spec=spec, threads=threads)
        predictor = Predictor(onnx_model, spec, tta=0, temperature=float(info.get("temperature", 1.0)),
                              name=path.parent.name + SUFFIX)
        # One forward pass now, so that a graph that loads but cannot run (wrong input name or
        # shape, foreign model) is refused here rather than on a user's request.
        probs = predictor.probs(torch.zeros(1, 3, spec.input_size, spec.input_size, dtype=torch.uint8))
    except ExportError:
        raise
    except Exception as e:  # noqa: BLE001 - bad metadata or onnxruntime's own error types
        raise ExportError(f"{path} cannot be served: {type(e).__name__}: {e}") from e
    if tuple(probs.shape) != (1, 10) or not bool(torch.isfinite(probs).all()):
        raise ExportError(f"{path} does not return 10 finite class scores (got shape {tuple(probs.shape)})")
    return EdgeModel(predictor.name, path, {k: v for k, v in info.items() if k != "spec"}, predictor)


def load_edge_models(root: str | Path | None = None, threads: int = 1,
                     problems: list[str] | None = None) -> list[EdgeModel]:
    """Every loadable `<root>/<name>/int8.onnx` (root: paths.exports_dir(): --exports, $CIFAR_EXPORTS or exports/), sorted by name.

    Broken files are skipped with a warning naming them (also appended to `problems` when given);
    a missing root gives an empty list. One intra-op thread each: an edge model is sized for one
    small core, and servers handle requests concurrently rather than splitting one tiny forward
    pass across cores."""
    models = []
    for path in find_exports(root, INT8_FILE.removesuffix(".onnx")):
        try:
            models.append(load_edge_model(path, threads))
        except ExportError as e:
            message = f"skipping edge model {path}: {e}"
            warnings.warn(message)
            if problems is not None:
                problems.append(message)
    return models


def smallest(models: list[EdgeModel]) -> EdgeModel | None:
    """The model with the smallest file (the default edge model when none has been measured)."""
    return min(models, key=lambda m: (m.size_bytes, m.name), default=None)


def file_digest(path: str | Path) -> str:
    """sha1 of a file's bytes: a measurement belongs to exactly this file (the exports are a few MB)."""
    import hashlib
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def measure(model: EdgeModel, images_u8: torch.Tensor, labels: torch.Tensor, repeats: int = 200,
            batch: int = 500) -> dict:
    """What the demo states for an edge model, measured as it serves: its accuracy on `images_u8` (one pass, no
    TTA) and the median wall time of `EdgeModel.predict` on one image (decode excluded; preprocessing and the
    forward pass on its one thread included), over `repeats` calls after 10 warm-ups, cycling through the
    images. accuracy_per_ms = accuracy in % / ms: the default edge model maximizes it (best_per_ms)."""
    import statistics
    probs = torch.cat([model.predictor.probs(images_u8[i:i + batch]) for i in range(0, len(images_u8), batch)])
    accuracy = float((probs.argmax(1) == labels).float().mean())
    seconds = []
    for i in range(10 + repeats):
        _, s = model.predict(images_u8[i % len(images_u8)])
        seconds.append(s)
    ms = 1000 * statistics.median(seconds[10:])
    return {"accuracy": round(accuracy, 5), "n": len(labels), "ms": round(ms, 4), "repeats": repeats,
            "threads": 1, "accuracy_per_ms": round(100 * accuracy / ms, 2), "sha1": file_digest(model.path)}


def measured(models: list[EdgeModel], records: dict) -> dict[str, dict]:
    """name -> its measurement in `records` (assets.json's "edge"), for the models whose file is the one measured."""
    return {m.name: records[m.name] for m in models
            if isinstance(records.get(m.name), dict) and records[m.name].get("sha1") == file_digest(m.path)}


def best_per_ms(models: list[EdgeModel], valid: dict[str, dict]) -> EdgeModel | None:
    """The model with the highest measured accuracy per millisecond (`valid`: measured() of `models`); the
    smallest file when none is measured."""
    if not valid:
        return smallest(models)
    return max((m for m in models if m.name in valid), key=lambda m: (valid[m.name]["accuracy_per_ms"], m.name))
