"""The serving core: the model zoo behind one thread-safe object (`Lab`) that the demo's tabs, the
REST API (api/), benchmarks and tests all call. It loads every checkpoint under the checkpoints
folder (paths.py), predicts with caching, compares, explains, and answers with the int8 ONNX edge
models. No Gradio and no HTTP here: demo/ and api/ are thin adapters over it.

The model work itself is in cifar_core (ensemble, predictor, explain, images, edge); this module
caches (bounded, cachetools) and shapes results for display.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from cachetools import LRUCache

from . import paths, timing
from .batching import Batcher
from .data import CLASSES
from .edge import NO_GRADCAM, EdgeModel, best_per_ms, load_edge_models, measured
from .ensemble import FIT_FILE, Ensemble, load_zoo
from .images import decode_for_model

ASSETS_DIR = paths.DEFAULT_ASSETS
ENSEMBLE = "ensemble"
# Concurrent requests batched into one forward pass, at most: the 3 members cost 25 ms per image in a batch of 8
# against 31 for one image on this 2-core CPU (python benchmarks/serving_latency.py --threads-only); larger
# batches gain little and make the first in line wait longer.
MAX_BATCH = 8


class BoundedCache:
    """cachetools' LRUCache behind a lock (its caches are not thread-safe; requests arrive on many
    threads). The results are tiny: 10 floats or a 32x32 map."""

    def __init__(self, maxsize: int):
        self._cache: LRUCache = LRUCache(maxsize)
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            return self._cache.get(key)  # a hit counts as a use

    def put(self, key, value):
        with self._lock:
            self._cache[key] = value
        return value


@dataclass
class Prediction:
    image: torch.Tensor               # uint8 3x32x32, what the models see
    probs: np.ndarray                 # ensemble, calibrated, C
    members: dict[str, np.ndarray]    # model name -> calibrated probs: the weighted members (every_member: all)
    seconds: dict[str, float]         # model name -> latency of its forward pass(es) for this image
    ood_score: float | None           # typicality in [0, 1] (cifar_core/ood.py); None when the check is off
    ood: bool | None                  # flagged as out of distribution; None when the check is off
    ood_seconds: float = 0.0          # the detector's own arithmetic for this image
    batch: int = 1                    # images that shared these forward passes (concurrent requests, batching.py)

    @property
    def top(self) -> int:
        return int(np.argmax(self.probs))


@dataclass
class EdgePrediction:
    model: str                        # edge model name, e.g. cifar_cnn_small_distilled-int8
    probs: np.ndarray                 # calibrated, C
    seconds: float                    # its single forward pass for this image (first computation)

    @property
    def top(self) -> int:
        return int(np.argmax(self.probs))


def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def read_assets(assets_dir: Path = ASSETS_DIR) -> dict:
    path = Path(assets_dir) / "assets.json"
    if not path.exists():
        warnings.warn(f"{path} is missing (run python -m demo.build_assets): no OOD check, no mistakes tab")
        return {}
    return json.loads(path.read_text())


class Lab:
    """The loaded zoo plus caches. Thread-safe: each Predictor holds its own lock."""

    def __init__(self, root: str | Path | None = None, assets_dir: str | Path = ASSETS_DIR,
                 exports: str | Path | None = None):
        # --checkpoints/--exports, else $CIFAR_CHECKPOINTS/$CIFAR_EXPORTS, else the repo's folders
        # (new checkpoint folders there join without code changes)
        self.root = paths.checkpoints_dir(root)
        self.exports_root = paths.exports_dir(exports)
        self.members = load_zoo(self.root)
        if not self.members:
            raise SystemExit(f"no loadable checkpoints under {self.root}: train one (python train.py --level 3 "
                             "--data ...) or set CIFAR_CHECKPOINTS to a folder of checkpoint folders")
        self.by_name = {m.name: m for m in self.members}
        # Weights fitted on val (python train.py ensemble) when <root>/ensemble.json matches these
        # checkpoints; otherwise equal weights, with a warning.
        self.ensemble = Ensemble.from_fit(self.members, self.root / FIT_FILE)
        self.assets_dir = Path(assets_dir)
        self.assets = read_assets(self.assets_dir)
        self.ood_detector, self.ood_problem = self._load_ood()
        self._predictions = BoundedCache(512)
        self._unweighted = BoundedCache(512)  # (image, member) -> (probs, seconds) of members outside the ensemble
        self._batcher = Batcher(self._predict_batch, max_batch=MAX_BATCH)
        self._explanations = BoundedCache(2048)
        self._edge: dict[str, EdgeModel] | None = None  # loaded on first use, once
        self._edge_measured: dict[str, dict] = {}         # set with _edge: build_assets' numbers for these files
        self._edge_lock = threading.Lock()
        self.edge_problems: list[str] = []               # why export files were skipped, for display
        self._edge_predictions = BoundedCache(512)
        self._slow_explainers: dict[str, object] = {}  # model name -> Predictor over a private copy
        self._slow_lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def weighted_names(self) -> list[str]:
        """The members the ensemble's answer is made of; the others (fitted weight 0) are only computed
        when asked for by name (Compare, Grad-CAM, REST model=<name>)."""
        return [m.name for m in self.ensemble.weighted]

    def label(self, name: str) -> str:
        """A member's name as the UI shows it: those outside the ensemble say so."""
        return name if self.ensemble.is_weighted(name) else f"{name} (not weighted)"

    def _load_ood(self):
        """(the fitted OOD detector, None), or (None, why the check is off). A detector fitted for other
        checkpoints (added, removed or retrained since) is stale: it is not used, and the notice says so."""
        from .ensemble import fit_mismatch
        from .ood import detector_from_state
        ood = self.assets.get("ood") or {}
        refit = "refit it with python -m demo.build_assets --data <CIFAR-10 folder>"
        if "detector" not in ood:
            return None, f"no fitted detector in {self.assets_dir} ({refit})"
        problem = fit_mismatch({"members": ood.get("fitted_for", [])}, self.members)
        if problem:
            message = f"the detector is stale: {problem}; {refit}"
            warnings.warn(f"out-of-distribution check off: {message}")
            return None, message
        try:
            from safetensors.torch import load_file
            detector = detector_from_state(load_file(str(self.assets_dir / ood["file"])), ood["detector"])
        except Exception as e:  # noqa: BLE001 - a broken asset costs only the check, never the demo
            message = f"{self.assets_dir / ood.get('file', '?')} is unreadable ({type(e).__name__}: {e}); {refit}"
            warnings.warn(f"out-of-distribution check off: {message}")
            return None, message
        return detector, None

    @property
    def ood_threshold(self) -> float | None:
        return None if self.ood_detector is None else self.ood_detector.threshold

    def ood_result(self, pred: "Prediction") -> dict:
        """The out-of-distribution result as data (the REST and gradio_client answers carry it)."""
        if pred.ood is None:
            return {"available": False, "problem": self.ood_problem}
        ood = self.assets["ood"]
        return {"available": True, "flagged": bool(pred.ood), "score": round(pred.ood_score, 4),
                "threshold": self.ood_threshold, "rule": ood["rule"], "score_meaning": ood["score"],
                "detector": ood["name"], "fitted_on": ood["fitted_on"]}

    # -- predictions ------------------------------------------------------------------------

    def decode(self, upload) -> torch.Tensor:
        with timing.stage("decode"):
            return decode_for_model(upload)

    def predict(self, image: torch.Tensor, every_member: bool = False) -> Prediction:
        """The ensemble's answer for one uint8 3x32x32 image, cached per image. Concurrent calls share forward
        passes (cifar_core/batching.py): a lone request runs at once, a burst runs as batches. Only the weighted
        members run; every_member=True adds the others' probabilities (computed once per image, cached)."""
        key = image_key(image)
        pred = self._predictions.get(key)
        if pred is not None:
            with timing.stage("cached"):  # marks the record as answered from the cache
                pass
        else:
            pred = self._batcher.submit((key, image))
        missing = [m for m in self.members if m.name not in pred.members] if every_member else []
        if not missing:
            return pred
        extra = {}
        for m in missing:
            extra[m.name] = self._unweighted.get((key, m.name))
            if extra[m.name] is None:
                t0 = time.perf_counter()
                probs = m.predictor.probs(image[None])[0].numpy()
                extra[m.name] = self._unweighted.put((key, m.name), (probs, time.perf_counter() - t0))
        members = {n: pred.members[n] if n in pred.members else extra[n][0] for n in self.names}
        seconds = {n: pred.seconds[n] if n in pred.seconds else extra[n][1] for n in self.names}
        return replace(pred, members=members, seconds=seconds)

    @property
    def batching(self) -> dict:
        """How many batches the predictions ran in, and how many images they held, since start."""
        return {"batches": self._batcher.batches, "images": self._batcher.items, "max_batch": self._batcher.max_batch}

    def _predict_batch(self, items: list[tuple[str, torch.Tensor]]) -> list[Prediction]:
        unique = dict(items)  # the same image twice in one batch runs once
        detector = self.ood_detector
        member = self.ensemble.member_probs(torch.stack(list(unique.values())), features=detector is not None)
        with timing.stage("ensemble"):
            probs = self.ensemble.combine(member).numpy()
        scores, ood_seconds = None, 0.0
        if detector is not None:
            t0 = time.perf_counter()
            with timing.stage("ood"):
                scores = detector.typicality({n: (r["logits"], r["features"]) for n, r in member.items()})
            ood_seconds = (time.perf_counter() - t0) / len(unique)
        predictions = {}
        for i, (key, image) in enumerate(unique.items()):
            score = None if scores is None else float(scores[i])
            predictions[key] = self._predictions.put(key, Prediction(
                image=image, probs=probs[i],
                members={n: r["probs"][i].numpy() for n, r in member.items()},
                seconds={n: r["seconds"] for n, r in member.items()},
                ood_score=score, ood=None if score is None else score < detector.threshold,
                ood_seconds=ood_seconds, batch=len(unique)))
        return [predictions[key] for key, _ in items]

    def warm_up(self, uploads, method: str = "gradcam") -> None:
        """Fill the caches for the example images (run in a background thread after launch), so
        clicking an example answers instantly in every tab. Failures only cost the warm-up."""
        for upload in uploads:
            try:
                image = self.decode(upload)
                self.predict(image)
                for name in self.edge:
                    self.edge_predict(image, name)
                self.explain(image, self.names, method, None)
            except Exception as e:  # noqa: BLE001 - a broken example must not stop the app
                warnings.warn(f"warm-up skipped {upload}: {e}")

    # -- edge models (int8 ONNX) ------------------------------------------------------------

    @property
    def edge(self) -> dict[str, EdgeModel]:
        """The int8 ONNX exports under exports_root, loaded on first use and only once. A missing
        folder, a broken file or a missing runtime costs only the edge option (with a warning)."""
        if self._edge is None:
            with self._edge_lock:
                if self._edge is None:
                    problems: list[str] = []
                    try:
                        models = load_edge_models(self.exports_root, problems=problems)
                    except Exception as e:  # noqa: BLE001 - edge models are optional; the zoo still serves
                        problems.append(f"edge models unavailable: {type(e).__name__}: {e}")
                        warnings.warn(problems[-1])
                        models = []
                    self.edge_problems = problems
                    self._edge_measured = measured(models, self.assets.get("edge") or {})
                    self._edge = {m.name: m for m in models}
        return self._edge

    @property
    def edge_names(self) -> list[str]:
        return list(self.edge)

    @property
    def edge_measured(self) -> dict[str, dict]:
        """name -> accuracy and latency measured by python -m demo.build_assets (cifar_core.edge.measure), for the
        loaded edge models whose file is the one measured."""
        _ = self.edge  # loads them (and their measurements) on first use
        return self._edge_measured

    @property
    def default_edge(self) -> str | None:
        """The edge model offered first: the best measured accuracy per millisecond (the smallest file when
        none is measured)."""
        model = best_per_ms(list(self.edge.values()), self.edge_measured)
        return model.name if model else None

    def edge_predict(self, image: torch.Tensor, model: str) -> EdgePrediction:
        if model not in self.edge:
            loaded = ", ".join(self.edge) or f"none (no loadable int8.onnx under {self.exports_root})"
            raise KeyError(f"unknown edge model {model!r}; loaded: {loaded}")
        key = (image_key(image), model)
        cached = self._edge_predictions.get(key)
        if cached is not None:
            return cached
        probs, seconds = self.edge[model].predict(image)
        return self._edge_predictions.put(key, EdgePrediction(model, probs, seconds))

    # -- explanations -----------------------------------------------------------------------

    def explanation(self, image: torch.Tensor, model: str, method: str, target: int):
        """Raw CAM of one model for one class, cached: opacity / scale changes redraw without recomputing."""
        from cifar_core.explain import explain
        key = (image_key(image), model, method, int(target))
        cached = self._explanations.get(key)
        if cached is not None:
            return cached
        return self._explanations.put(key, explain(self._explainer(model, method), image, method, int(target)))

    def _explainer(self, model: str, method: str):
        """The Predictor a method runs on. A slow method (Score-CAM: seconds per model) gets a private copy of
        the model, made once, with its own lock: predictions, fast maps and other tabs meanwhile use the
        served model instead of waiting for the slow run to finish."""
        from cifar_core.explain import SLOW_METHODS
        served = self.by_name[model].predictor
        if method not in SLOW_METHODS:
            return served
        with self._slow_lock:
            if model not in self._slow_explainers:
                import copy
                from cifar_core.predictor import Predictor
                self._slow_explainers[model] = Predictor(copy.deepcopy(served.model), served.spec, served.tta,
                                                         served.temperature, name=served.name)
            return self._slow_explainers[model]

    def explain(self, image: torch.Tensor, models: list[str], method: str, target: int | None,
                alpha: float = 0.5, shared: bool = False, with_ensemble: bool = True,
                size: int = 256, progress=None) -> list[tuple[np.ndarray, str]]:
        """(overlay RGB, caption) per chosen model (+ the ensemble's weighted map), all for one class:
        `target`, or the ensemble's predicted class when None. `progress(done, total, model)` is called
        before each model's map (a slow method runs for seconds per model, on a private copy of the model: see
        _explainer)."""
        from cifar_core.explain import ensemble_map, normalize_maps, overlay
        unknown = [m for m in models if m not in self.by_name]
        if unknown:
            edge = [m for m in unknown if m in self.edge]
            if edge:
                raise KeyError(f"no Grad-CAM for {', '.join(edge)}: {NO_GRADCAM}; explain the PyTorch models "
                               f"{self.names} instead")
            raise KeyError(f"unknown model(s) {unknown}; loaded: {self.names}")
        if target is None:
            target = self.predict(image).top
        explanations = []
        for i, m in enumerate(models):
            if progress is not None:
                progress(i, len(models), m)
            explanations.append(self.explanation(image, m, method, target))
        maps = normalize_maps([e.cam for e in explanations], shared=shared)
        tiles = [(overlay(image, m, alpha, size), f"{self.label(e.model)}: {CLASSES[e.target]} p={e.probability:.2f}")
                 for e, m in zip(explanations, maps)]
        weighted = [(e, self.ensemble.weight_of(e.model)) for e in explanations if self.ensemble.is_weighted(e.model)]
        if with_ensemble and len(explanations) > 1 and weighted:
            # the fitted weights of the chosen members; a member outside the ensemble adds nothing to its map
            combined = ensemble_map([e for e, _ in weighted], [w for _, w in weighted])
            p = float(self.predict(image).probs[target])
            tiles.append((overlay(image, combined, alpha, size), f"{ENSEMBLE}: {CLASSES[target]} p={p:.2f}"))
        return tiles
