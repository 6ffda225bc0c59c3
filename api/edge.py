"""Edge models: the int8 ONNX exports under exports/<name>/int8.onnx, served through Predictor.

They are listed and predicted like zoo members but stay out of the ensemble (they approximate
members already in it) and have no Grad-CAM (onnxruntime gives no gradients).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from cifar_core.export import DEFAULT_EXPORTS, ExportError, OnnxClassifier, find_exports, read_metadata
from cifar_core.predictor import Predictor

SUFFIX = "-int8"


@dataclass
class EdgeModel:
    name: str
    path: Path
    info: dict          # provenance from the ONNX metadata (checkpoint, code version, temperature...)
    predictor: Predictor


def exports_root() -> Path:
    return Path(os.environ.get("CIFAR_EXPORTS") or DEFAULT_EXPORTS)


def load_edge_models(root: str | Path | None = None, threads: int = 1) -> list[EdgeModel]:
    """Every loadable int8 export; broken files are skipped with a warning naming them.

    One intra-op thread each: an edge model is sized for one small core, and the API serves
    requests concurrently rather than splitting one tiny forward pass across cores."""
    models = []
    for path in find_exports(root or exports_root(), "int8"):
        try:
            info = read_metadata(path)
            onnx_model = OnnxClassifier(path, spec=info["spec"], threads=threads)
        except ExportError as e:
            warnings.warn(f"skipping edge model {path}: {e}")
            continue
        name = path.parent.name + SUFFIX
        predictor = Predictor(onnx_model, info["spec"], tta=0,
                              temperature=float(info.get("temperature", 1.0)), name=name)
        models.append(EdgeModel(name, path, {k: v for k, v in info.items() if k != "spec"}, predictor))
    return models
