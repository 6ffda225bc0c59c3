"""What the REST endpoints compute, without HTTP: JSON-shaped answers over the serving core,
cifar_core.serving.Lab (zoo, ensemble, caches, Grad-CAM, edge models), the same Lab the mounted demo
uses. Errors a client can fix raise ClientError with its status."""
from __future__ import annotations

import io

import numpy as np
import torch

from cifar_core.data import CLASSES
from cifar_core.edge import EdgeModel
from cifar_core.explain import METHODS
from cifar_core.images import MAX_FILE_BYTES, ImageInputError
from cifar_core.serving import ENSEMBLE, Lab


class ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def top_k(probs: np.ndarray, k: int) -> list[dict]:
    order = np.argsort(-probs)[:k]
    return [{"label": CLASSES[i], "index": int(i), "probability": float(probs[i])} for i in order]


def as_dict(probs: np.ndarray) -> dict[str, float]:
    return {c: float(p) for c, p in zip(CLASSES, probs)}


def member_version(name: str, meta: dict) -> dict:
    test = meta.get("metrics", {}).get("test", {})
    return {"name": name, "kind": "pytorch", "architecture": meta.get("model"),
            "version": f"{meta.get('code_version', 'unknown')}@{meta.get('saved_at', 'unknown')}",
            "test_accuracy": test.get("accuracy"), "tta": meta.get("metrics", {}).get("tta", 0),
            "temperature": float(meta.get("temperature", 1.0)), "explainable": True}


def edge_version(model: EdgeModel) -> dict:
    info = model.info
    return {"name": model.name, "kind": "onnx-int8", "architecture": info.get("architecture"),
            "version": f"{info.get('code_version', 'unknown')}@{info.get('saved_at', 'unknown')}",
            "source_checkpoint": info.get("checkpoint"), "tta": 0,
            "temperature": float(info.get("temperature", 1.0)), "explainable": False}


class ApiService:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.edge = lab.edge  # the same int8 models the mounted demo serves, loaded once
        self.versions = {m.name: member_version(m.name, m.meta) for m in lab.members}
        self.versions.update({name: edge_version(m) for name, m in self.edge.items()})

    @classmethod
    def load(cls, checkpoints=None, exports=None) -> "ApiService":
        return cls(Lab(checkpoints, exports=exports))

    # -- inputs ----------------------------------------------------------------------------

    def decode(self, data: bytes) -> torch.Tensor:
        if len(data) > MAX_FILE_BYTES:
            raise ClientError(413, f"the file is larger than {MAX_FILE_BYTES // 2**20} MB")
        try:
            return self.lab.decode(data)
        except ImageInputError as e:
            raise ClientError(400, str(e)) from None

    def check_model(self, model: str, explain: bool = False) -> None:
        known = [ENSEMBLE, *self.lab.names] + ([] if explain else list(self.edge))
        if model not in known:
            extra = " (edge models have no Grad-CAM)" if explain and model in self.edge else ""
            raise ClientError(404, f"unknown model {model!r}{extra}; choose one of {', '.join(known)}")

    # -- endpoints --------------------------------------------------------------------------

    def models(self) -> dict:
        return {"classes": list(CLASSES), "ensemble": {"name": ENSEMBLE, "members": self.lab.names,
                                                        "weights": self.lab.ensemble.weights,
                                                        "weighted": self.lab.weighted_names},
                "models": list(self.versions.values()), "cam_methods": list(METHODS)}

    def predict(self, image: torch.Tensor, model: str, k: int) -> dict:
        self.check_model(model)
        if model in self.edge:
            edge = self.lab.edge_predict(image, model)  # cached per image, like the zoo's
            members = {model: (edge.probs, edge.seconds)}
            chosen = edge.probs
            ood = {"available": False, "problem": "the out-of-distribution detector reads the PyTorch zoo's "
                                                  "features; edge models have none (ask model=ensemble)"}
        else:
            # cached per image, as in the demo; a member outside the ensemble runs only when asked for by name
            result = self.lab.predict(image, every_member=model != ENSEMBLE and model not in self.lab.weighted_names)
            names = self.lab.weighted_names if model == ENSEMBLE else [model]
            members = {n: (result.members[n], result.seconds[n]) for n in names}
            chosen = result.probs if model == ENSEMBLE else result.members[model]
            ood = self.lab.ood_result(result)  # the zoo's judgement, whichever model answers
        return {
            "model": model, "prediction": top_k(chosen, 1)[0], "top_k": top_k(chosen, k),
            "probabilities": as_dict(chosen), "ood": ood,
            "members": [{**self.versions[n], "top_k": top_k(p, k), "probabilities": as_dict(p),
                         "latency_ms": round(1000 * s, 3)} for n, (p, s) in members.items()],
        }

    def explain_png(self, image: torch.Tensor, model: str, method: str, target: int | None,
                    alpha: float, size: int) -> tuple[bytes, int]:
        from PIL import Image
        self.check_model(model, explain=True)
        if method not in METHODS:
            raise ClientError(400, f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if target is None:
            target = self.lab.predict(image).top
        models = self.lab.weighted_names if model == ENSEMBLE else [model]
        tiles = self.lab.explain(image, models, method, target, alpha=alpha, size=size, with_ensemble=True)
        rgb = tiles[-1][0]  # with several members the last tile is the ensemble's weighted map
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
        return buffer.getvalue(), target


def parse_target(target: str | None) -> int | None:
    """A class name or index -> index; None/'' -> the predicted class."""
    if target is None or target == "" or target == "predicted":
        return None
    if target.isdigit() and int(target) < len(CLASSES):
        return int(target)
    if target in CLASSES:
        return CLASSES.index(target)
    raise ClientError(400, f"unknown target {target!r}; use a class name ({', '.join(CLASSES)}) "
                           f"or an index 0-{len(CLASSES) - 1}")
