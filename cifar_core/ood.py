"""Out-of-distribution detection for the zoo: "does this look like any of the 10 classes at all?"

The detectors are pytorch-ood's (maintained, with the papers' scoring rules); this module feeds them
each member's logits and penultimate features (Predictor.logits_and_features: the same forward pass the
prediction uses, so a score costs only the detector's own arithmetic) and combines the members:

  * per member, a detector gives an outlier score (higher = less like CIFAR-10);
  * each member's score is standardized by its mean and spread on validation images (in distribution), and
    the ensemble's score is the ensemble-weighted sum of the standardized scores;
  * the threshold keeps `keep` (95%) of validation images; the score shown to people is the fraction of
    validation images that look at least as unusual (0.01: only 1% of real CIFAR-10 images score this
    badly), so "score below threshold" reads the same whatever the detector.

    outputs = zoo_outputs(members, images)                 # {name: (logits, features)}
    detector = fit_detector("vim", members, train_outputs, train_labels, val_outputs, weights)
    detector.outlier_score(outputs)                        # N, higher = more unusual
    detector.typicality(outputs)                           # N, in [0, 1]; below detector.threshold -> flag

Fitting uses training features (a fixed stratified subset) and validation images only; test images and the
OOD sets never influence a fit or a threshold (benchmarks/ood.py chooses the detector on a validation OOD
set and reports on a disjoint test OOD set).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from .models.registry import linear_head

METHODS = ("msp", "energy", "maxlogit", "mahalanobis", "knn", "vim")
LOGIT_METHODS = ("msp", "energy", "maxlogit")   # need no fit and no features
KEEP_IN_DISTRIBUTION = 0.95
KNN_K = 50   # the paper's value for CIFAR-10 (Sun et al. 2022)


def vim_dim(feature_dim: int) -> int:
    """ViM's principal-subspace size: half the width of narrow features, 512 of wide ones (the paper's
    choice for ~1000-dim+ features); benchmarks/ood.py also tries a quarter and an eighth per model."""
    return min(512, feature_dim // 2)


def member_detector(method: str, member, features: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, **options):
    """A fitted pytorch-ood detector of one member (None for the logit-only methods)."""
    from pytorch_ood.detector import KNN, ViM, Mahalanobis
    if method in LOGIT_METHODS:
        return None
    if method == "mahalanobis":
        return Mahalanobis(None).fit_features(features.float(), labels)
    if method == "knn":
        return KNN(None, k=options.get("k", KNN_K)).fit_features(features.float(), labels)
    if method == "vim":
        w, b = linear_head(member.predictor.model)
        return ViM(None, d=options.get("d", vim_dim(features.shape[1])), w=w, b=b).fit_features(
            features.float(), labels)
    raise ValueError(f"unknown OOD method {method!r}; choose from {', '.join(METHODS)}")


def member_score(method: str, detector, logits: torch.Tensor, features: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """Outlier score per image (higher = more unusual) from one member's raw logits / features."""
    from pytorch_ood.detector import EnergyBased, MaxLogit, MaxSoftmax
    if method == "msp":
        return MaxSoftmax.score(logits.float(), t=temperature)   # calibrated, as the demo shows it
    if method == "energy":
        return EnergyBased.score(logits.float())
    if method == "maxlogit":
        return MaxLogit.score(logits.float())
    return detector.predict_features(features.float()).float()


def zoo_outputs(members, images_u8: torch.Tensor, cache: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{member name: (raw logits, features)} with each member's own preprocessing and TTA. cache=True keeps
    them on disk (fp16 features, under ~/.cache/cifar_core/ood_features/), keyed by the member's identity
    (name, saved_at, TTA) and the images' bytes: the benchmark and build_assets rerun in seconds."""
    if not cache:
        return {m.name: m.predictor.logits_and_features(images_u8) for m in members}
    images_hash = hashlib.sha1(images_u8.contiguous().numpy().tobytes()).hexdigest()[:16]
    out = {}
    for m in members:
        if m.path is None or not m.meta.get("saved_at"):  # not a saved checkpoint: nothing identifies its weights
            out[m.name] = m.predictor.logits_and_features(images_u8)
            continue

        def compute(m=m):
            logits, feats = m.predictor.logits_and_features(images_u8)
            return {"logits": logits, "features": feats.half()}
        ident = f"{m.name}|{m.meta.get('saved_at')}|{m.predictor.tta}|{images_hash}"  # as fit_identity()
        z = disk_cached(ident, compute)
        out[m.name] = (z["logits"], z["features"].float())  # the same precision whether computed or read back
    return out


def disk_cached(key: str, compute) -> dict[str, torch.Tensor]:
    """compute() -> {name: tensor}, kept on disk under ~/.cache/cifar_core/ood_features/ by the key's hash (written
    atomically): the OOD benchmark and build_assets rerun in seconds. The key must name everything the tensors
    depend on."""
    from safetensors.torch import load_file, save

    from .checkpoint import atomic_write_bytes
    from .data import cache_dir
    path = cache_dir() / "ood_features" / f"{hashlib.sha1(key.encode()).hexdigest()[:20]}.safetensors"
    if path.exists():
        return load_file(str(path))
    tensors = compute()
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}))
    return tensors


@dataclass
class Detector:
    """An ensemble OOD detector: one fitted pytorch-ood detector per member, combined by standardized,
    ensemble-weighted sum; threshold and typicality from validation images."""
    method: str
    names: list[str]
    weights: list[float]
    temperatures: list[float]
    fitted: list = field(repr=False)              # per member: pytorch-ood detector or None
    center: list[float] = field(default_factory=list)
    spread: list[float] = field(default_factory=list)
    reference: torch.Tensor = field(default=None, repr=False)   # sorted combined scores of val images
    keep: float = KEEP_IN_DISTRIBUTION

    def member_scores(self, outputs: dict) -> torch.Tensor:
        """M x N raw outlier scores."""
        return torch.stack([member_score(self.method, det, *outputs[n], temperature=t)
                            for n, det, t in zip(self.names, self.fitted, self.temperatures)])

    def outlier_score(self, outputs: dict) -> torch.Tensor:
        raw = self.member_scores(outputs)
        z = (raw - torch.tensor(self.center)[:, None]) / torch.tensor(self.spread)[:, None]
        return (torch.tensor(self.weights)[:, None] * z).sum(0)

    def calibrate(self, val_outputs: dict) -> "Detector":
        """Standardize each member on validation images, then keep their combined scores as the reference."""
        raw = self.member_scores(val_outputs)
        self.center = raw.mean(1).tolist()
        self.spread = raw.std(1).clamp_min(1e-8).tolist()
        self.reference = self.outlier_score(val_outputs).sort().values
        return self

    def typicality(self, outputs: dict) -> torch.Tensor:
        """Fraction of validation images at least as unusual as each input: ~uniform on CIFAR-10, ~0 far away."""
        return typicality(self.reference, self.outlier_score(outputs))

    @property
    def threshold(self) -> float:
        """Typicality below which an input is flagged: keeps `keep` of validation images."""
        return round(1.0 - self.keep, 6)


def typicality(reference_sorted: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    n = len(reference_sorted)
    below = torch.searchsorted(reference_sorted.contiguous(), scores.contiguous(), right=False)
    return (n - below).float() / n


def fit_detector(method: str, members, train_outputs: dict, train_labels: torch.Tensor, val_outputs: dict,
                 weights: list[float], keep: float = KEEP_IN_DISTRIBUTION, **options) -> Detector:
    fitted = [member_detector(method, m, train_outputs[m.name][1], train_labels, **options) for m in members]
    det = Detector(method, [m.name for m in members], list(weights),
                   [float(m.predictor.temperature) for m in members], fitted, keep=keep)
    return det.calibrate(val_outputs)


def ensemble_probs_of(ensemble, outputs: dict) -> torch.Tensor:
    """The ensemble's calibrated probabilities from zoo_outputs() (no second forward pass)."""
    return ensemble.combine({m.name: {"probs": m.predictor.calibrated(outputs[m.name][0])} for m in ensemble.members})


def msp_of_ensemble(ensemble, outputs: dict) -> torch.Tensor:
    """The previous notice's score, as an outlier score: minus the max calibrated ensemble probability."""
    return -ensemble_probs_of(ensemble, outputs).max(1).values


def auroc_fpr(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> tuple[float, float]:
    """(AUROC, FPR@95%TPR) by pytorch-ood's metrics, from outlier scores. FPR@95%TPR as in OpenOOD and the
    ODIN paper: in-distribution is the positive class; the fraction of OOD images that pass when the threshold
    lets 95% of in-distribution images pass (the demo's operating point). AUROC is symmetric."""
    from pytorch_ood.metrics.functional import auroc, fpr_at_tpr
    # pytorch-ood calls labels < 0 the positive class: mark the in-distribution images, negate the scores
    scores = -torch.cat([id_scores, ood_scores]).double()
    labels = torch.cat([-torch.ones(len(id_scores)), torch.zeros(len(ood_scores))]).long()
    return float(auroc(scores, labels)), float(fpr_at_tpr(scores, labels, 0.95))


# -- persistence: the fitted detector ships beside the checkpoints (demo/assets/ood.safetensors) ---------------

STATE_FILE = "ood.safetensors"
# what each method keeps of its pytorch-ood detector (tensors; ViM's alpha and KNN's k go in the json)
_TENSORS = {"mahalanobis": ("mu", "precision"), "vim": ("w", "b", "u", "principal_subspace"), "knn": ("bank",)}


def detector_state(det: Detector) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors for safetensors, json-able description) of a fitted Detector."""
    tensors = {"reference": det.reference.float().contiguous()}
    per_member = []
    for i, (name, fitted) in enumerate(zip(det.names, det.fitted)):
        info = {"name": name}
        if det.method == "knn":
            bank = torch.from_numpy(fitted.knn._fit_X).float()   # the normalized fit features
            tensors[f"{i}.bank"] = bank.half().contiguous()
            info["k"] = fitted.k
        elif det.method in _TENSORS:
            for key in _TENSORS[det.method]:
                tensors[f"{i}.{key}"] = getattr(fitted, key).float().contiguous()
            if det.method == "vim":
                info.update(d=fitted.d, alpha=fitted.alpha)
        per_member.append(info)
    meta = {"method": det.method, "members": per_member, "weights": det.weights,
            "temperatures": det.temperatures, "center": det.center, "spread": det.spread, "keep": det.keep}
    return tensors, meta


def compact(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 for every tensor that survives it (finite, |x| < 60000); fp32 for the rest (a near-singular
    Mahalanobis precision) and for the reference scores. Recalibrate after this: see assets.fit_ood."""
    def small(key, t):
        if key == "reference" or t.abs().max() >= 6e4:
            return t
        return t.half()
    return {k: small(k, v) for k, v in tensors.items()}


def state_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def detector_from_state(tensors: dict[str, torch.Tensor], meta: dict) -> Detector:
    """The inverse of detector_state: pytorch-ood detectors with their fitted attributes restored."""
    from pytorch_ood.detector import KNN, ViM, Mahalanobis
    tensors = {k: v.float() for k, v in tensors.items()}   # shipped in fp16; scored in fp32
    method = meta["method"]
    if method not in METHODS:
        raise ValueError(f"unknown OOD method {method!r} in the saved detector")
    fitted = []
    for i, info in enumerate(meta["members"]):
        if method == "mahalanobis":
            det = Mahalanobis(None)
            det.mu, det.precision = tensors[f"{i}.mu"], tensors[f"{i}.precision"]
        elif method == "vim":
            det = ViM(None, d=int(info["d"]), w=tensors[f"{i}.w"], b=tensors[f"{i}.b"])
            det.u, det.principal_subspace, det.alpha = tensors[f"{i}.u"], tensors[f"{i}.principal_subspace"], \
                float(info["alpha"])
        elif method == "knn":
            det = KNN(None, k=int(info["k"]), normalize=False)  # the bank is stored normalized
            det.knn.fit(tensors[f"{i}.bank"].numpy())
            det.normalize, det._is_fitted = True, True
        else:
            det = None
        fitted.append(det)
    return Detector(method, [m["name"] for m in meta["members"]], list(meta["weights"]), list(meta["temperatures"]),
                    fitted, list(meta["center"]), list(meta["spread"]), tensors["reference"],
                    float(meta.get("keep", KEEP_IN_DISTRIBUTION)))
