"""The model zoo on disk and softmax-averaging ensembles of its members.

`load_zoo()` finds every checkpoint folder under checkpoints/, so a newly trained model joins
the demo and the ensemble without code changes. Each member's probabilities are calibrated by
its own temperature (meta.json) before averaging.

Level 4 fits the averaging weights on the members' shared validation split (minimum NLL of the
weighted average of calibrated member probabilities, weights on the simplex), then one
ensemble-level temperature when it lowers the validation NLL further:

    record = fit_zoo(load_zoo(), data, tta=None, command="...")   # refuses members of different splits
    write_fit(record, "checkpoints/ensemble.json")
    ensemble = Ensemble.from_fit(load_zoo(), "checkpoints/ensemble.json")  # equal weights + a warning
                                                                            # when the file does not match
`python train.py ensemble` does the first two; the demo does the third.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import paths
from .checkpoint import META, CheckpointError, atomic_write_json, code_version, load_checkpoint, now_iso
from .predictor import Predictor

FIT_FILE = "ensemble.json"  # beside the checkpoint folders; find_checkpoints() only picks folders
FIT_FORMAT = 1
# A member whose fitted weight would be below this moves the ensemble's probabilities by less than 5% yet
# costs a whole forward pass per image: the fit drops it (weight exactly 0, the others refitted), and the
# ensemble path never computes it. It stays in the zoo: Compare and Grad-CAM show it, "not weighted".
MIN_WEIGHT = 0.05


class EnsembleError(ValueError):
    """The members cannot be fitted together (different splits, no val split, data mismatch)."""


@dataclass
class Member:
    name: str           # checkpoint folder name
    path: Path
    meta: dict
    predictor: Predictor


def find_checkpoints(root: str | Path | None = None) -> list[Path]:
    """The checkpoint folders under `root` (default: paths.checkpoints_dir())."""
    root = paths.checkpoints_dir(root)
    return sorted(p for p in root.iterdir() if (p / META).exists()) if root.is_dir() else []


def load_member(path: str | Path, tta: int | None = None) -> Member:
    model, meta = load_checkpoint(path)
    level = meta.get("metrics", {}).get("tta", 0) if tta is None else tta
    predictor = Predictor(model, tta=level, temperature=float(meta.get("temperature", 1.0)), name=Path(path).name)
    return Member(Path(path).name, Path(path), meta, predictor)


def load_zoo(root: str | Path | None = None, tta: int | None = None) -> list[Member]:
    """Every loadable checkpoint under `root`; broken ones are skipped with a warning naming them."""
    members = []
    for path in find_checkpoints(root):
        try:
            members.append(load_member(path, tta))
        except CheckpointError as e:
            warnings.warn(f"skipping checkpoint {path}: {e}")
    return members


class Ensemble:
    """Weighted average of the members' calibrated probabilities (weights default to equal),
    optionally sharpened/softened by an ensemble-level temperature: softmax(log p_avg / T)."""

    def __init__(self, members: list[Member], weights: list[float] | None = None, temperature: float = 1.0,
                 source: str = "equal weights"):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        w = torch.tensor(weights if weights is not None else [1.0] * len(members), dtype=torch.float)
        if len(w) != len(members) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"need {len(members)} non-negative weights with a positive sum, got {weights}")
        if not temperature > 0:
            raise ValueError(f"the ensemble temperature must be > 0, got {temperature}")
        self.members = members
        self.weights = (w / w.sum()).tolist()
        self.temperature = float(temperature)
        self.source = source  # where the weights come from, for display

    @property
    def weighted(self) -> list[Member]:
        """The members the ensemble's answer is made of (weight > 0); only these are computed for it."""
        return [m for m, w in zip(self.members, self.weights) if w > 0]

    def is_weighted(self, name: str) -> bool:
        return any(m.name == name for m in self.weighted)

    def weight_of(self, name: str) -> float:
        return next(w for m, w in zip(self.members, self.weights) if m.name == name)

    def weighted_only(self) -> "Ensemble":
        """The same ensemble without its members of weight 0: the same answer, for code that walks the members
        (a teacher, an OOD fit, ensemble Grad-CAM)."""
        kept = [(m, w) for m, w in zip(self.members, self.weights) if w > 0]
        return Ensemble([m for m, _ in kept], [w for _, w in kept], temperature=self.temperature, source=self.source)

    @classmethod
    def from_fit(cls, members: list[Member], path: str | Path | None = None) -> "Ensemble":
        """The fitted weights and temperature of `path` (default: ensemble.json beside the members'
        folders) when it was fitted on exactly these checkpoints (names and saved_at); otherwise
        equal weights, with a warning saying why."""
        if not members:
            raise ValueError("an ensemble needs at least one member")
        path = Path(path) if path is not None else (Path(members[0].path).parent / FIT_FILE
                                                    if members[0].path else paths.checkpoints_dir() / FIT_FILE)
        try:
            record = read_fit(path)
        except EnsembleError as e:
            warnings.warn(f"{e}; the ensemble uses equal weights")
            return cls(members)
        if record is None:
            warnings.warn(f"no fitted ensemble weights ({path} is missing; python train.py ensemble writes it): "
                          "the ensemble uses equal weights")
            return cls(members)
        problem = fit_mismatch(record, members)
        if problem:
            warnings.warn(f"{path} does not belong to the loaded checkpoints ({problem}); the ensemble uses equal "
                          "weights: rerun python train.py ensemble")
            return cls(members)
        fitted = {m["name"]: m for m in record["members"]}
        differing = {m.name: (fitted[m.name].get("tta"), m.predictor.tta) for m in members
                     if fitted[m.name].get("tta") is not None and fitted[m.name]["tta"] != m.predictor.tta}
        if differing:
            warnings.warn(f"{path}: weights fitted at other TTA levels than the members run at "
                          f"({', '.join(f'{n}: fitted {a}, runs {b}' for n, (a, b) in differing.items())}); "
                          "using them anyway")
        return cls(members, [float(fitted[m.name]["weight"]) for m in members],
                   temperature=float(record.get("temperature", 1.0)), source=f"fitted on val ({path.name})")

    def member_probs(self, images_u8: torch.Tensor, features: bool = False,
                     members: list[Member] | None = None) -> dict[str, dict]:
        """{name: {"probs": N x C tensor, "seconds": wall time}} for each weighted member (or for `members`).
        features=True adds "logits" and "features" (the penultimate features an OOD detector reads) from the
        same forward passes."""
        out = {}
        for m in self.weighted if members is None else members:
            t0 = time.perf_counter()
            if features:
                logits, feats = m.predictor.logits_and_features(images_u8)
                out[m.name] = {"probs": m.predictor.calibrated(logits), "logits": logits, "features": feats}
            else:
                out[m.name] = {"probs": m.predictor.probs(images_u8)}
            out[m.name]["seconds"] = time.perf_counter() - t0
        return out

    def combine(self, member_probs: dict[str, dict]) -> torch.Tensor:
        """The ensemble's probabilities from member_probs(): the weighted members' only."""
        probs = sum(w * member_probs[m.name]["probs"] for w, m in zip(self.weights, self.members) if w > 0)
        if self.temperature != 1.0:
            probs = torch.softmax(probs.clamp_min(1e-30).log() / self.temperature, dim=1)
        return probs

    def probs(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_probs(images_u8))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing NLL of softmax(logits / T) (temperature scaling, Guo et al. 2017).

    One scalar per model, fitted on validation data: accuracy is unchanged, confidences become
    honest (label smoothing, for one, leaves a model underconfident). Log-probabilities are valid
    logits, so the same fit calibrates an ensemble's average (fit_weights)."""
    logits = logits.detach().double()  # a normal tensor even if made under inference_mode
    log_t = torch.zeros(1, dtype=torch.double, requires_grad=True)
    _lbfgs(log_t, lambda t: torch.nn.functional.cross_entropy(logits / t.exp(), labels), 100)
    return float(log_t.detach().exp())


def calibrated_metrics(predictor: Predictor, data, split) -> tuple[dict, float]:
    """Val/test metrics at the predictor's TTA, with a temperature fitted on val (1.0 without val).

    Returns (metrics, temperature); each subset also records its uncalibrated NLL and ECE."""
    from .evaluate import metrics_from_logits
    logits = {s: predictor.logits(data.images[split.indices(s)]) for s in ("val", "test")
              if len(split.indices(s))}
    labels = {s: data.labels[split.indices(s)] for s in logits}
    temperature = fit_temperature(logits["val"], labels["val"]) if "val" in logits else 1.0
    metrics = {}
    for s in logits:
        raw = metrics_from_logits(logits[s], labels[s])
        metrics[s] = {**metrics_from_logits(logits[s], labels[s], temperature=temperature),
                      "nll_uncalibrated": raw["nll"], "ece_uncalibrated": raw["ece"]}
    metrics["tta"] = predictor.tta
    metrics["calibration"] = {"method": "temperature scaling", "fitted_on": "val" if "val" in logits else "none",
                              "temperature": temperature}
    return metrics, temperature


def recalibrate_checkpoint(folder: str | Path, data, command: str | None = None) -> dict:
    """Refit a checkpoint's temperature on its val split and rewrite its meta.json (metrics,
    temperature, saved_at, the command) and confusion.png. The data must give the checkpoint's
    own split: calibrating on other images is refused. Returns {"before": val NLL, "metrics", "temperature"}."""
    from .data import make_split
    from .evaluate import plot_confusion
    folder = Path(folder)
    model, meta = load_checkpoint(folder)
    split = make_split(data, meta["split"]["name"], meta["split"]["seed"])
    if split.fingerprint != meta["split"]["fingerprint"]:
        raise EnsembleError(f"the data gives split {split.fingerprint}, the checkpoint was trained on "
                            f"{meta['split']['fingerprint']}: refusing to calibrate on other images")
    metrics, temperature = calibrated_metrics(Predictor(model, tta=meta["metrics"].get("tta", 0)), data, split)
    before = meta["metrics"].get("val", {}).get("nll")
    meta.update(metrics=metrics, temperature=temperature, saved_at=now_iso())  # exports compare saved_at
    if command:
        meta.setdefault("commands", []).append(command)
    atomic_write_json(folder / META, meta)
    if "test" in metrics:
        plot_confusion(metrics["test"]["confusion"], folder / "confusion.png",
                       title=f"{folder.name}: test confusion ({split.name} split)")
    return {"before": before, "metrics": metrics, "temperature": temperature}


# ---------------------------------------------------------------------------------------------
# Level 4: weights (and an ensemble temperature) fitted on the validation split
# ---------------------------------------------------------------------------------------------

def member_log_probs(members: list[Member], images_u8: torch.Tensor, tta: int | None = None) -> torch.Tensor:
    """K x N x C calibrated log-probabilities: log_softmax(logits / member temperature), at `tta`
    (None: each member's own level)."""
    return torch.stack([torch.log_softmax(m.predictor.logits(images_u8, tta=tta).float() / m.predictor.temperature, 1)
                        for m in members])


def mixture_log_probs(log_probs: torch.Tensor, weights, temperature: float = 1.0) -> torch.Tensor:
    """N x C log-probabilities of the ensemble: log(sum_k w_k p_k), then / temperature, renormalized.
    The same computation as Ensemble.combine, in log space."""
    w = torch.as_tensor(weights, dtype=log_probs.dtype)
    mix = torch.logsumexp(w.clamp_min(1e-300).log()[:, None, None] + log_probs, dim=0)
    return torch.log_softmax(mix / temperature, dim=1) if temperature != 1.0 else mix


def _nll(log_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return -log_probs.gather(1, labels[:, None]).mean()


def _lbfgs(param: torch.Tensor, loss_fn, max_iter: int) -> None:
    opt = torch.optim.LBFGS([param], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(param)
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)


@dataclass
class WeightFit:
    weights: list[float]      # on the simplex, in member order
    temperature: float        # ensemble-level; 1.0 when it did not lower the NLL
    nll_equal: float          # NLL of the fitting data: equal weights, T = 1
    nll_weights: float        # fitted weights, T = 1
    nll: float                # fitted weights and temperature


def _simplex_fit(lp: torch.Tensor, labels: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Weights on the simplex minimizing the mixture's NLL: softmax(theta), LBFGS from theta = 0 in float64."""
    theta = torch.zeros(lp.shape[0], dtype=torch.double, requires_grad=True)
    _lbfgs(theta, lambda t: _nll(mixture_log_probs(lp, t.softmax(0)), labels), max_iter)
    return theta.detach().softmax(0)


def fit_weights(log_probs: torch.Tensor, labels: torch.Tensor, with_temperature: bool = True,
                max_iter: int = 500, min_weight: float = MIN_WEIGHT) -> WeightFit:
    """Weights minimizing the NLL of the weighted average of the members' probabilities.

    `log_probs`: K x N x C calibrated member log-probabilities (member_log_probs) of the fitting
    (validation) images. Weights are softmax(theta), so they stay on the simplex; theta starts at 0
    (equal weights) and LBFGS minimizes in float64, so the fit is deterministic. While the smallest
    weight is below `min_weight`, that member is dropped (weight exactly 0) and the rest refitted: it
    would cost a forward pass for almost nothing. The result is never worse than equal weights on the
    fitting data (equal weights are kept if it were). Then one temperature on the averaged
    probabilities, kept only if it lowers that NLL (by > 1e-4)."""
    lp = log_probs.detach().double()
    labels = labels.detach().long()
    if lp.dim() != 3 or lp.shape[1] != len(labels) or not len(labels):
        raise ValueError(f"need K x N x C log-probabilities for N = {len(labels)} labels, got {tuple(lp.shape)}")
    k = lp.shape[0]
    equal = torch.full((k,), 1.0 / k, dtype=torch.double)
    nll_equal = float(_nll(mixture_log_probs(lp, equal), labels))
    weights, nll_weights = equal, nll_equal
    if k > 1:
        kept = list(range(k))
        while True:
            fitted = torch.zeros(k, dtype=torch.double)
            fitted[kept] = _simplex_fit(lp[kept], labels, max_iter) if len(kept) > 1 else 1.0
            smallest = min(kept, key=lambda i: float(fitted[i]))
            if len(kept) == 1 or fitted[smallest] >= min_weight:
                break
            kept.remove(smallest)
        nll_fitted = float(_nll(mixture_log_probs(lp, fitted), labels))
        if nll_fitted <= nll_equal:
            weights, nll_weights = fitted, nll_fitted
    temperature, nll = 1.0, nll_weights
    if with_temperature:
        mix = mixture_log_probs(lp, weights)
        t = fit_temperature(mix, labels)
        nll_t = float(_nll(torch.log_softmax(mix / t, 1), labels))
        if nll_t < nll_weights - 1e-4:  # a real gain, not rounding: else T stays exactly 1
            temperature, nll = t, nll_t
    return WeightFit([float(w) for w in weights], temperature, nll_equal, nll_weights, nll)


def shared_split(members: list[Member]) -> dict:
    """The split record (meta["split"]) all members were trained with. Members of different splits
    are refused: one member's val or test images may be another's training images, so a fit or a
    test score over them would leak."""
    if not members:
        raise EnsembleError("no members: train a checkpoint first (python train.py --level 3)")
    splits = {}
    for m in members:
        split = (m.meta or {}).get("split") or {}
        if not split.get("fingerprint"):
            raise EnsembleError(f"checkpoint {m.name} records no split fingerprint in its meta.json; "
                                "cannot tell which images it was trained on")
        splits[m.name] = split
    prints = {s["fingerprint"] for s in splits.values()}
    if len(prints) > 1:
        listing = ", ".join(f"{n}: {s.get('name')}/seed {s.get('seed')} ({s['fingerprint']})" for n, s in splits.items())
        raise EnsembleError(f"the members were trained on different splits ({listing}): one's validation/test "
                            "images are another's training images, so fitting or scoring them together would "
                            "leak; retrain them on one split or fit a subset (--checkpoints)")
    return next(iter(splits.values()))


def fit_identity(members: list[Member]) -> list[dict]:
    return [{"name": m.name, "saved_at": (m.meta or {}).get("saved_at")} for m in members]


def fit_mismatch(record: dict, members: list[Member]) -> str | None:
    """Why `record` does not belong to `members` (None when it does): same names, same saved_at."""
    fitted = {m.get("name"): m.get("saved_at") for m in record.get("members", [])}
    loaded = {m["name"]: m["saved_at"] for m in fit_identity(members)}
    if set(fitted) != set(loaded):
        return f"fitted on {sorted(fitted)}, loaded {sorted(loaded)}"
    changed = [n for n in loaded if loaded[n] != fitted[n]]
    if changed:
        return f"{', '.join(changed)} retrained since the fit (saved_at differs)"
    return None


def read_fit(path: str | Path) -> dict | None:
    """The record in `path`, or None when there is none; EnsembleError when it is unreadable."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("format", 0) > FIT_FORMAT:
            raise ValueError("not an ensemble fit of a known format")
        for m in record["members"]:
            if not float(m["weight"]) >= 0:
                raise ValueError(f"bad weight {m['weight']!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise EnsembleError(f"{path} is not a readable ensemble fit ({e})") from e
    return record


def write_fit(record: dict, path: str | Path) -> Path:
    atomic_write_json(Path(path), record)
    return Path(path)


def log_prob_metrics(log_probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """n, accuracy (a fraction), NLL and ECE of (N x C) log-probabilities: a member's or a mixture's."""
    from .evaluate import metrics_from_logits
    m = metrics_from_logits(log_probs.float(), labels)
    return {k: m[k] for k in ("n", "accuracy", "nll", "ece")}


def fit_record(members: list[Member], val: tuple[torch.Tensor, torch.Tensor],
               test: tuple[torch.Tensor, torch.Tensor] | None = None, tta: int | None = None,
               split: dict | None = None, data: dict | None = None, command: str | None = None) -> dict:
    """Fit on `val` (uint8 images, labels), score equal and fitted ensembles and each member on val
    and `test`, and return the record that write_fit() persists."""
    subsets = {"val": val, **({"test": test} if test is not None and len(test[1]) else {})}
    log_probs = {s: member_log_probs(members, images, tta) for s, (images, _) in subsets.items()}
    labels = {s: y for s, (_, y) in subsets.items()}
    fit = fit_weights(log_probs["val"], labels["val"])
    equal = [1.0 / len(members)] * len(members)
    metrics = {"equal": {}, "fitted": {}}
    for s in subsets:
        lp = log_probs[s].double()
        metrics["equal"][s] = log_prob_metrics(mixture_log_probs(lp, equal), labels[s])
        metrics["fitted"][s] = log_prob_metrics(mixture_log_probs(lp, fit.weights, fit.temperature), labels[s])
    rows = []
    for i, (m, w) in enumerate(zip(members, fit.weights)):
        rows.append({"name": m.name, "saved_at": (m.meta or {}).get("saved_at"), "weight": w, "weighted": w > 0,
                     "tta": m.predictor.tta if tta is None else tta, "temperature": m.predictor.temperature,
                     "params": (m.meta or {}).get("params"),
                     "metrics": {s: log_prob_metrics(log_probs[s][i], labels[s]) for s in subsets}})
    return {
        "format": FIT_FORMAT,
        "members": rows,
        "temperature": fit.temperature,
        "tta": tta,  # None: each member at its own recorded level (members[i].tta)
        "objective": "minimum val NLL of the weighted average of the members' temperature-calibrated "
                     "probabilities (weights = softmax(theta), LBFGS from equal weights, float64); a member "
                     f"below weight {MIN_WEIGHT} is dropped (weight 0, not computed) and the rest refitted; then one "
                     "ensemble temperature softmax(log p / T), kept only if it lowers the val NLL",
        "min_weight": MIN_WEIGHT,
        "val_nll": {"equal": fit.nll_equal, "fitted_weights": fit.nll_weights, "fitted": fit.nll},
        "metrics": metrics,
        "split": split,
        "data": data,
        "command": command,
        "created_at": now_iso(),
        "code_version": code_version(),
    }


def members_split(members: list[Member], data):
    """The members' own split of `data` (a cifar_core.data.Cifar10), as a data.Split. Refuses members of
    different splits (shared_split), data that does not reproduce their split (other images: a fit or a
    score on them would not be on the members' val/test), and splits without val images."""
    from . import data as data_module  # looked up at call time: tests swap make_split for a small split
    recorded = shared_split(members)
    split = data_module.make_split(data, recorded["name"], recorded.get("seed", 0))
    if split.fingerprint != recorded["fingerprint"]:
        raise EnsembleError(f"this data gives split {split.name}/{split.fingerprint}, the members were trained on "
                            f"{recorded['fingerprint']}: refusing to fit on other images")
    if not len(split.val):
        raise EnsembleError(f"split {split.name!r} has no validation images to fit the weights on")
    return split


def fit_zoo(members: list[Member], data, tta: int | None = None, command: str | None = None) -> dict:
    """fit_record() on the members' own split of `data` (members_split: refuses members of different splits,
    data that does not reproduce their split, and splits without val images)."""
    split = members_split(members, data)
    val = (data.images[split.val], data.labels[split.val])
    test = (data.images[split.test], data.labels[split.test])
    return fit_record(members, val, test, tta=tta,
                      split={"name": split.name, "seed": split.seed, "fingerprint": split.fingerprint,
                             "sizes": {s: len(split.indices(s)) for s in ("train", "val", "test")}},
                      data={"source": getattr(data, "source", None), "fingerprint": getattr(data, "fingerprint", None)},
                      command=command)


def fit_table(record: dict) -> str:
    """Members, equal-weight and fitted ensembles as a Markdown table."""
    from .evaluate import format_table
    subsets = [s for s in ("val", "test") if s in record["metrics"]["fitted"]]
    cols = ["model", "weight", "tta"] + [f"{s} {k}" for s in subsets for k in ("acc", "nll", "ece")]

    def row(name, weight, tta, metrics):
        r = {"model": name, "weight": weight, "tta": tta}
        for s in subsets:
            r.update({f"{s} acc": metrics[s]["accuracy"], f"{s} nll": metrics[s]["nll"], f"{s} ece": metrics[s]["ece"]})
        return r
    rows = [row(m["name"], m["weight"], m["tta"], m["metrics"]) for m in record["members"]]
    tta = "own" if record["tta"] is None else record["tta"]
    rows.append(row("ensemble (equal weights)", "-", tta, record["metrics"]["equal"]))
    rows.append(row(f"ensemble (fitted, T={record['temperature']:.3f})", "-", tta, record["metrics"]["fitted"]))
    return format_table(rows, cols)
