"""`python train.py report`: results/REPORT.md and its figures, generated from real runs.

Every number comes from a meta.json written by a train.py run (or from checkpoints/ensemble.json);
nothing is typed in by hand. What it reads:

    checkpoints/*/meta.json         shipped models (their level: the Level whose `out` is that folder)
    checkpoints/ensemble.json       the fitted ensemble (level 4), when present
    runs/level1/meta.json           the Level 1 baseline
    runs/ablation/*/meta.json       Level 2 ablation variants
    runs/distill*/**/meta.json      level 5 students (meta["distillation"]["role"])

and writes results/REPORT.md plus PNGs under results/figures/: training curves and test confusion
matrices (from meta.json alone), and, when the CIFAR-10 data can be loaded, a sample-predictions grid
per shipped checkpoint (24 fixed images of its own test split) and one Grad-CAM grid of all of them.
Sections that cannot be made are listed in the report with the reason. The output is deterministic:
the same inputs give byte-identical files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import paths
from .checkpoint import atomic_write_bytes
from .data import CLASSES
from .evaluate import _save_figure, format_table

FIGURES = "figures"
SAMPLE_COUNT = 24          # sample-predictions grid: 4 rows of 6
SAMPLE_COLUMNS = 6
CAM_METHOD = "gradcam"
# Fields that say where or how verbosely a run ran, not what it trained: left out of recipe diffs.
_NOT_RECIPE = {"data", "progress", "device", "channels_last"}


# ---------------------------------------------------------------------------------------------
# Finding the runs
# ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    name: str                  # shown in tables: "cifar_cnn", "runs/level1", "distill/cifar_cnn_small_scratch"
    path: Path                 # the folder holding meta.json
    meta: dict
    kind: str                  # "checkpoint", "level1", "ablation", "distill"
    level: int | None = None

    @property
    def slug(self) -> str:
        """File-name part: the folder name for a checkpoint, runs-<path> for the others."""
        text = self.name if self.kind == "checkpoint" else f"runs-{self.name}"
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)

    @property
    def test(self) -> dict:
        return self.meta.get("metrics", {}).get("test", {}) or {}

    @property
    def val(self) -> dict:
        return self.meta.get("metrics", {}).get("val", {}) or {}


@dataclass
class Sources:
    runs: list[Run] = field(default_factory=list)
    ensemble: dict | None = None
    ensemble_path: Path | None = None
    problems: list[str] = field(default_factory=list)   # unreadable files, named

    def of_kind(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.kind == kind]


def _read_json(path: Path, problems: list[str]) -> dict | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"`{_show(path)}` could not be read ({e}); left out")
        return None
    if not isinstance(value, dict):
        problems.append(f"`{_show(path)}` is not a JSON object; left out")
        return None
    return value


def _show(path: Path) -> str:
    """A path as the reader of the report would type it: relative to the working folder when inside it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _level_target(out: str, checkpoints: Path, runs: Path) -> Path:
    """A Level's `out` ("checkpoints/x", "runs/y") under the roots this report reads."""
    head, _, rest = out.partition("/")
    if head == "checkpoints":
        return checkpoints / rest
    if head == "runs":
        return runs / rest
    return Path(out)


def level_of(path: Path, meta: dict, checkpoints: Path, runs: Path, levels=None) -> int | None:
    """The Level whose `out` folder holds this run, else the one training the same model
    (preferring a level that writes under the same root: checkpoints/ or runs/)."""
    from .levels import LEVELS
    levels = LEVELS if levels is None else levels
    path = Path(path).resolve()
    for number, level in sorted(levels.items()):
        target = _level_target(level.out, checkpoints, runs).resolve()
        if path == target or target in path.parents:
            return number
    same_model = [n for n, lv in sorted(levels.items()) if lv.config.model == meta.get("model")]
    if not same_model:
        return None
    root = "checkpoints" if Path(checkpoints).resolve() in path.parents else "runs"
    same_root = [n for n in same_model if levels[n].out.split("/")[0] == root]
    return (same_root or same_model)[0]


def collect(checkpoints: str | Path | None = None, runs: str | Path = "runs") -> Sources:
    checkpoints, runs = paths.checkpoints_dir(checkpoints), Path(runs)
    src = Sources()

    def add(meta_path: Path, kind: str, name: str) -> None:
        meta = _read_json(meta_path, src.problems)
        if meta is None:
            return
        if "model" not in meta:
            src.problems.append(f"`{_show(meta_path)}` names no model; left out")
            return
        folder = meta_path.parent
        level = None if kind == "ablation" else level_of(folder, meta, checkpoints, runs)
        src.runs.append(Run(name, folder, meta, kind, level))

    if checkpoints.is_dir():
        for meta_path in sorted(checkpoints.glob("*/meta.json")):
            add(meta_path, "checkpoint", meta_path.parent.name)
        ens = checkpoints / "ensemble.json"
        if ens.exists():
            src.ensemble = _read_json(ens, src.problems)
            src.ensemble_path = ens
    if (runs / "level1" / "meta.json").exists():
        add(runs / "level1" / "meta.json", "level1", "level1")
    for meta_path in sorted(runs.glob("ablation/*/meta.json")):
        add(meta_path, "ablation", meta_path.parent.name)
    for meta_path in sorted(runs.glob("distill*/**/meta.json")):
        add(meta_path, "distill", str(meta_path.parent.relative_to(runs)))
    return src


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------

def fmt_pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):.2f}%"


def fmt_params(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def fmt_epochs(e) -> str:
    if e is None:
        return "-"
    return str(int(e)) if float(e).is_integer() else f"{float(e):g}"


def fmt_seconds(s) -> str:
    if not s:
        return "-"
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def fmt_nll_ece(metrics: dict) -> str:
    if metrics.get("nll") is None or metrics.get("ece") is None:
        return "-"
    return f"{metrics['nll']:.3f} / {metrics['ece']:.3f}"


def train_seconds(meta: dict) -> float:
    return float(sum(h.get("seconds") or 0 for h in meta.get("history", [])))


def _size(n: int) -> str:
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def data_note(meta: dict) -> str:
    """'offline JPEG q75 copy, seed split 48k/6k/6k' from the run's own data and split records."""
    data = meta.get("data", {}) or {}
    note = (data.get("note") or data.get("source", "")).removesuffix(" of CIFAR-10")
    split = meta.get("split", {}) or {}
    sizes = split.get("sizes", {})
    text = f"{split.get('name', '?')} split"
    if sizes:
        text += " " + "/".join(_size(sizes.get(s, 0)) for s in ("train", "val", "test"))
    if split.get("seed"):
        text += f" (seed {split['seed']})"
    subset = (meta.get("train_config") or {}).get("train_subset")
    if subset:
        text += f", trained on {subset}"
    return f"{note}, {text}" if note else text


def md_table(headers: list[str], rows: list[list]) -> str:
    return format_table([dict(zip(headers, row)) for row in rows], headers)


_WHOLE = {"model_kwargs"}  # free-form keyword arguments: compared as one value ({} is a change from the recipe's)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in _WHOLE:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(config: dict, reference: dict) -> dict:
    """{field: value} where a run's train_config departs from the reference (dotted keys for nested
    configs; fields the run does not record, from older code, are not counted as changes)."""
    a, b = _flatten(config), _flatten(reference)
    return {k: a[k] for k in sorted(a) if k.split(".")[0] not in _NOT_RECIPE and a[k] != b.get(k)}


def recipe_diff(config: dict, reference: dict) -> str:
    """'augment.mix="none", label_smoothing=0.0': recipe_changes() as text."""
    changes = recipe_changes(config, reference)
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in changes.items()) or "(same recipe)"


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------

class Figures:
    """Writes PNGs under out/figures/ and remembers them (stale ones from older reports are removed)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.folder = self.out / FIGURES
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []

    def path(self, name: str) -> Path:
        p = self.folder / name
        self.written.append(p)
        return p

    def link(self, path: Path, alt: str) -> str:
        return f"![{alt}]({path.relative_to(self.out).as_posix()})"

    def remove_stale(self) -> None:
        keep = {p.name for p in self.written}
        for p in self.folder.glob("*.png"):
            if p.name not in keep:
                p.unlink()


def _subplots(*grid, figsize, **kw):
    """(figure, axes) without pyplot, like evaluate.curves_figure: no global backend switch (a notebook that
    builds the report keeps its inline plots), nothing for pyplot to keep alive."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **kw)


_save = _save_figure  # atomic PNG write, shared with the checkpoint plots


def plot_bars(labels: list[str], values: list[float], path: Path, title: str, reference: float | None = None,
              reference_label: str = "") -> None:
    fig, ax = _subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), [100 * v for v in values], color="tab:blue")
    for i, v in enumerate(values):
        ax.text(i, 100 * v, f"{100 * v:.2f}", ha="center", va="bottom", fontsize=8)
    if reference is not None:
        ax.axhline(100 * reference, color="tab:red", ls="--", label=reference_label)
        ax.legend(loc="lower right")
    lo = min([*values, *([reference] if reference is not None else [])])
    ax.set_ylim(max(0, 100 * lo - 5), 100)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel="accuracy (%)", title=title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def _rgb(image_u8) -> np.ndarray:
    return np.asarray(image_u8).transpose(1, 2, 0)


def plot_samples(images, labels, probs, classes, path: Path, title: str) -> None:
    """A grid of images with true / predicted class and confidence; wrong predictions in red, framed."""
    n = len(images)
    cols = SAMPLE_COLUMNS
    rows = (n + cols - 1) // cols
    fig, axes = _subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        pred = int(np.argmax(probs[i]))
        true = int(labels[i])
        ok = pred == true
        ax.imshow(_rgb(images[i]), interpolation="bicubic")
        ax.set_title(f"true: {classes[true]}\npred: {classes[pred]} {100 * float(probs[i][pred]):.0f}%"
                     + ("" if ok else "  ✗"), fontsize=8, color="black" if ok else "tab:red")
        if not ok:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(3)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_cam_grid(images, labels, rows: list[tuple[str, list[tuple[np.ndarray, int, float]]]], classes,
                  path: Path, title: str) -> None:
    """Columns: images. First row the inputs, then one row per model of (map in [0, 1], explained
    class, its probability): the overlay, captioned with that class, red when it is not the true one."""
    from .explain import overlay
    n = len(images)
    fig, axes = _subplots(1 + len(rows), n, figsize=(1.6 * n + 1.2, 1.8 * (1 + len(rows)) + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(n):
        axes[0, j].imshow(_rgb(images[j]), interpolation="bicubic")
        axes[0, j].set_title(classes[int(labels[j])], fontsize=8)
    axes[0, 0].set_ylabel("input", fontsize=8)
    for i, (name, cells) in enumerate(rows, start=1):
        for j, (cam01, target, prob) in enumerate(cells):
            axes[i, j].imshow(overlay(images[j], cam01, alpha=0.5, size=128))
            axes[i, j].set_title(f"{classes[target]} {100 * prob:.0f}%", fontsize=7,
                                 color="black" if target == int(labels[j]) else "tab:red")
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------------------------------------
# Data-dependent sections
# ---------------------------------------------------------------------------------------------

def load_data(data_dir: str | None, metas: list[dict]):
    """(Cifar10, None) or (None, reason): the data as every checkpoint command finds it
    (data.load_cifar10_for: --data, $CIFAR10_DIR, where the checkpoints were trained from, the default)."""
    from .data import DataSourceError, load_cifar10_for
    try:
        return load_cifar10_for(data_dir, metas), None
    except (DataSourceError, OSError) as e:
        return None, str(e).splitlines()[0]


def sample_positions(n_test: int, count: int = SAMPLE_COUNT) -> np.ndarray:
    """Fixed, evenly spaced positions in the test split (the same images on every run)."""
    return np.unique(np.linspace(0, n_test - 1, min(count, n_test)).round().astype(int))


def cam_positions(labels: np.ndarray, n_classes: int) -> list[int]:
    """The first test image of every class, in class order."""
    return [int(np.flatnonzero(labels == c)[0]) for c in range(n_classes) if (labels == c).any()]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------

@dataclass
class Report:
    out: Path
    sections: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, *parts: str) -> None:
        self.sections.append("\n\n".join(p for p in parts if p))

    def skip(self, what: str, why: str) -> None:
        self.skipped.append((what, why))


def _level_title(number: int | None) -> str:
    from .levels import LEVELS
    return LEVELS[number].title if number in LEVELS else "(no level)"


def _zoo_member_only(run: Run) -> bool:
    """A shipped checkpoint no level's recipe trains (the Lite1 member): it serves the ensemble (level 4)."""
    return run.level is None and run.kind == "checkpoint"


def _teacher_names(d: dict) -> str:
    """The teacher's checkpoints as recorded in a distilled run's meta (`distillation.members`)."""
    return ", ".join(f"`{m.get('name')}`" for m in d.get("members", []) if isinstance(m, dict))


def _distill_what(d: dict) -> str:
    """A level-5 row's own teacher, not the level's default (the shipped ensemble): runs with other teachers
    (cross-fitted folds, one model) sit in the same table."""
    if d.get("role") != "distilled":
        return f"distillation [{d.get('role')}: labels only, same recipe and budget]"
    teachers = _teacher_names(d)
    folds = d.get("cross_fitted_folds")
    source = (f"cross-fitted over {folds} folds ({teachers})" if folds
              else teachers if len(d.get("members") or []) == 1 else f"the ensemble of {teachers}")
    return f"distillation [distilled from {source}]"


def _summary_row(run: Run, what: str, level: int | None = None) -> list:
    cfg = run.meta.get("train_config") or {}
    level = run.level if level is None else level
    return [level if level is not None else "-", what, f"`{run.meta['model']}`",
            fmt_params(run.meta.get("params")), fmt_epochs(cfg.get("epochs")), fmt_seconds(train_seconds(run.meta)),
            fmt_pct(run.val.get("accuracy")), fmt_pct(run.test.get("accuracy")), fmt_nll_ece(run.test),
            data_note(run.meta), f"`{_show(run.path)}`"]


SUMMARY_HEADERS = ["Level", "What", "Model", "Params", "Epochs", "Train time", "Val acc", "Test acc",
                   "Test NLL / ECE", "Data / split", "Run"]


def section_summary(rep: Report, src: Sources) -> None:
    from .levels import LEVELS
    rows = []
    ranked = [r for r in src.runs if r.kind != "ablation"]
    ranked.sort(key=lambda r: (r.level if r.level is not None else 99, r.kind == "distill", r.name))
    seen_levels = {r.level for r in ranked}
    for run in ranked:
        what, level = _level_title(run.level), run.level
        distill = run.meta.get("distillation") or {}
        if distill.get("role"):
            what = _distill_what(distill)
        elif run.level == 4:
            what = f"{what} [member]"
        elif _zoo_member_only(run):
            level, command = 4, run.meta.get("command")
            what = "ensemble member" + (f", trained by `{command}`" if command else "")
        rows.append((level if level is not None else 99, _summary_row(run, what, level)))
    if src.ensemble is not None:
        ens = src.ensemble
        val, test = _ens_metrics(ens, "fitted", "val"), _ens_metrics(ens, "fitted", "test")
        if val or test:
            # the members the ensemble path computes: the fit gave the others weight 0 (below MIN_WEIGHT)
            members = [m for m in ens.get("members") or [] if isinstance(m, dict)]
            weighted = [m for m in members if (m.get("weight") or 0) > 0] or members
            names = [str(m.get("name", "?")) for m in weighted]
            idle = [str(m.get("name", "?")) for m in members if m not in weighted]
            params = [m.get("params") for m in weighted]
            first = next((r for r in src.of_kind("checkpoint") if r.name in names), None)
            rows.append((4, [4, f"{_level_title(4)} [ensemble: fitted weights"
                             + (f"; not weighted: {', '.join(f'`{n}`' for n in idle)}]" if idle else "]"),
                             " + ".join(f"`{n}`" for n in names),
                             fmt_params(sum(params)) if params and None not in params else "-", "-", "-",
                             fmt_pct(val.get("accuracy")), fmt_pct(test.get("accuracy")), fmt_nll_ece(test),
                             data_note(first.meta) if first else "-", f"`{_show(src.ensemble_path)}`"]))
            seen_levels.add(4)
    for number, level in sorted(LEVELS.items()):
        if number not in seen_levels:
            rows.append((number, [number, level.title, f"`{level.config.model}`", "-", fmt_epochs(level.config.epochs),
                                  "-", "-", "-", "-", "-", f"not run yet: `python train.py --level {number}`"]))
    rows.sort(key=lambda r: r[0])  # stable: within a level, the order above
    rep.add("## Summary: all levels",
            "Accuracy is the checkpoint's recorded accuracy at its test-time-augmentation level; NLL and ECE "
            "are after temperature scaling fitted on val. Train time is the sum of the per-epoch seconds "
            "in its history (training only, on whatever device ran it).",
            md_table(SUMMARY_HEADERS, [r for _, r in rows]))


def section_headline(rep: Report, src: Sources) -> None:
    l1 = [r for r in src.runs if r.level == 1]
    l2 = [r for r in src.runs if r.level == 2 and r.kind != "ablation"]
    if not l1 or not l2:
        missing = " and ".join(f"level {n}" for n, runs in ((1, l1), (2, l2)) if not runs)
        rep.skip("Level 1 -> Level 2 headline", f"no {missing} run found")
        return
    a, b = l1[0], l2[0]
    lines = [f"Level 2's recipe over the Level 1 baseline (`{a.meta['model']}` -> `{b.meta['model']}`, "
             f"{fmt_epochs((a.meta.get('train_config') or {}).get('epochs'))} -> "
             f"{fmt_epochs((b.meta.get('train_config') or {}).get('epochs'))} epochs):", ""]
    for subset in ("test", "val"):
        x, y = (r.meta.get("metrics", {}).get(subset, {}) for r in (a, b))
        if x.get("accuracy") is not None and y.get("accuracy") is not None:
            lines.append(f"- **{subset} accuracy {fmt_pct(x['accuracy'])} -> {fmt_pct(y['accuracy'])} "
                         f"({100 * (y['accuracy'] - x['accuracy']):+.2f} pp)**"
                         + (f"; NLL {x['nll']:.3f} -> {y['nll']:.3f}" if "nll" in x and "nll" in y else ""))
    if (a.meta.get("split") or {}).get("fingerprint") != (b.meta.get("split") or {}).get("fingerprint"):
        lines.append("- note: the two runs used different splits; their test sets differ")
    lines.append(f"- what changed: {recipe_diff(b.meta.get('train_config') or {}, a.meta.get('train_config') or {})}")
    rep.add("## Level 1 -> Level 2", "\n".join(lines))


_BUDGET = ("epochs", "train_subset")  # an ablation variant is compared with the full recipe at its own budget


def _budget(run: Run) -> tuple:
    cfg = run.meta.get("train_config") or {}
    return tuple(cfg.get(k) for k in _BUDGET)


def section_ablation(rep: Report, src: Sources, figs: Figures) -> None:
    """runs/ablation/*: each variant's departure from the Level 2 recipe and its val accuracy, against the
    full recipe at the same budget (an ablation run without changes, else the Level 2 checkpoint)."""
    from .levels import LEVELS
    runs = src.of_kind("ablation")
    if not runs:
        rep.skip("Level 2 ablation", "no runs under runs/ablation/")
        return
    recipe = LEVELS[2].config.to_dict()
    changes = {r.name: recipe_changes(r.meta.get("train_config") or {}, recipe) for r in runs}
    full = [r for r in sorted(runs, key=lambda r: r.name)
            if set(changes[r.name]) <= {*_BUDGET, "seed"} and r.val.get("accuracy") is not None]
    full += [r for r in src.runs if r.level == 2 and r.kind != "ablation" and r.val.get("accuracy") is not None]

    def reference(run: Run) -> Run | None:
        return next((f for f in full if f is not run and _budget(f) == _budget(run)), None)

    runs = sorted(runs, key=lambda r: (-(r.val.get("accuracy") or -1), r.name))
    rows = []
    for r in runs:
        v, ref = r.val.get("accuracy"), reference(r)
        delta = (f"{100 * (v - ref.val['accuracy']):+.2f} pp vs `{ref.name}`" if v is not None and ref else "-")
        rows.append([r.name, recipe_diff(r.meta.get("train_config") or {}, recipe),
                     fmt_epochs((r.meta.get("train_config") or {}).get("epochs")),
                     fmt_pct(v), delta, fmt_pct(r.test.get("accuracy")), fmt_seconds(train_seconds(r.meta))])
    parts = ["## Level 2 ablation",
             "Each variant departs from the Level 2 recipe (`cifar_core.levels.LEVELS[2]`) in the fields listed "
             "(from its own train_config). Its val accuracy is compared with the full recipe trained at the same "
             "budget (epochs, train subset): an ablation run without changes, else the Level 2 checkpoint; "
             "\"-\" when neither was trained at that budget.",
             md_table(["Variant", "Differs from Level 2", "Epochs", "Val acc", "Δ val vs full recipe", "Test acc",
                       "Train time"], rows)]
    with_val = [r for r in runs if r.val.get("accuracy") is not None]
    if with_val:
        refs = {id(reference(r)) for r in with_val}
        ref = reference(with_val[0]) if len(refs) == 1 else None
        path = figs.path("ablation.png")
        plot_bars([r.name for r in with_val], [r.val["accuracy"] for r in with_val], path,
                  "Level 2 ablation: validation accuracy", ref.val["accuracy"] if ref else None,
                  f"full recipe ({ref.name})" if ref else "")
        parts.append(figs.link(path, "Level 2 ablation: validation accuracy"))
    rep.add(*parts)


def _member_names(ens: dict) -> list[str]:
    members = ens.get("members") or []
    return [str(m.get("name", "?")) if isinstance(m, dict) else str(m) for m in members]


def _ens_metrics(ens: dict, which: str, subset: str) -> dict:
    return ((ens.get("metrics") or {}).get(which) or {}).get(subset) or {}


def section_ensemble(rep: Report, src: Sources) -> None:
    """checkpoints/ensemble.json (written by `python train.py ensemble`): members, equal vs fitted."""
    if src.ensemble_path is None:
        rep.skip("Ensemble (level 4)", "no checkpoints/ensemble.json (`python train.py ensemble` writes it)")
        return
    ens = src.ensemble
    if ens is None:
        rep.skip("Ensemble (level 4)", f"`{_show(src.ensemble_path)}` could not be read")
        return
    headers = ["Member", "Weight", "TTA", "Temperature", "Params", "Val acc", "Test acc", "Test NLL / ECE"]
    rows = []
    for m in ens.get("members") or []:
        if not isinstance(m, dict):
            continue
        metrics = m.get("metrics") or {}
        rows.append([f"`{m.get('name', '?')}`", _cell(m.get("weight")), _cell(m.get("tta")),
                     _cell(m.get("temperature")), fmt_params(m.get("params")),
                     fmt_pct((metrics.get("val") or {}).get("accuracy")),
                     fmt_pct((metrics.get("test") or {}).get("accuracy")), fmt_nll_ece(metrics.get("test") or {})])
    tta = ens.get("tta")
    tta = "own" if tta is None else tta
    for which, label in (("equal", "**ensemble, equal weights**"),
                         ("fitted", f"**ensemble, fitted weights** (T={_cell(ens.get('temperature'))})")):
        val, test = _ens_metrics(ens, which, "val"), _ens_metrics(ens, which, "test")
        if val or test:
            rows.append([label, "-", tta, "-", "-", fmt_pct(val.get("accuracy")), fmt_pct(test.get("accuracy")),
                         fmt_nll_ece(test)])
    parts = ["## Ensemble (level 4)",
             f"From `{_show(src.ensemble_path)}`"
             + (f", written by `{ens['command']}`" if ens.get("command") else "")
             + (f" at {ens['created_at']}" if ens.get("created_at") else "") + "."
             + (f" Weights: {ens['objective']}." if ens.get("objective") else ""),
             md_table(headers, rows) if rows else "(it lists no members)"]
    split = ens.get("split") or {}
    if split:
        sizes = split.get("sizes") or {}
        parts.append(f"Fitted on the val images of the members' shared {split.get('name', '?')} split "
                     + "/".join(_size(sizes.get(s, 0)) for s in ("train", "val", "test")) + f" ({split.get('fingerprint', '?')}).")
    rep.add(*parts)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def section_distill(rep: Report, src: Sources) -> None:
    runs = src.of_kind("distill")
    if not runs:
        rep.skip("Distillation (level 5)", "no runs under runs/distill*/")
        return
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_show(r.path.parent), []).append(r)
    parts = ["## Distillation (level 5)",
             "Each student is trained twice with the same recipe, budget, seeds and split: once on the "
             "ensemble's soft targets (distilled) and once on the labels alone (from-scratch twin)."]
    for folder, members in sorted(groups.items()):
        rows = []
        for r in sorted(members, key=lambda r: r.name):
            d = r.meta.get("distillation") or {}
            rows.append([f"`{r.path.name}`", d.get("role", "-"), f"`{r.meta['model']}`",
                         fmt_params(r.meta.get("params")), fmt_epochs((r.meta.get("train_config") or {}).get("epochs")),
                         fmt_pct(r.val.get("accuracy")), fmt_pct(r.test.get("accuracy")), fmt_nll_ece(r.test)])
        lines = [f"**`{folder}/`**", md_table(["Run", "Role", "Model", "Params", "Epochs", "Val acc", "Test acc",
                                                "Test NLL / ECE"], rows)]
        by_role = {(r.meta.get("distillation") or {}).get("role"): r for r in members}
        a, b = by_role.get("distilled"), by_role.get("from-scratch twin")
        if a and b and a.test.get("accuracy") is not None and b.test.get("accuracy") is not None:
            d = a.meta["distillation"]
            augment = (a.meta.get("train_config") or {}).get("augment") or {}
            views, mix = augment.get("views"), augment.get("mix", "none")
            teachers = _teacher_names(d)
            lines.append(f"Distillation gain: test accuracy {fmt_pct(b.test['accuracy'])} -> "
                         f"{fmt_pct(a.test['accuracy'])} ({100 * (a.test['accuracy'] - b.test['accuracy']):+.2f} pp)"
                         + (f"; teacher: {teachers}" if teachers else "")
                         + (f", cross-fitted over {d['cross_fitted_folds']} folds (each training image labelled by "
                            "the fold model that never trained on it)" if d.get("cross_fitted_folds") else "")
                         + (f"; alpha {d['alpha']}, T {d['temperature']}" if "alpha" in d and "temperature" in d else "")
                         + (f"; consistent teaching over {views} planned views" if views else "")
                         + (f", each a {mix} blend (Beta alpha {augment.get('mix_alpha')}) labelled by the teacher"
                            if views and mix != "none" else ""))
            on_train = d.get("on_train")
            if isinstance(on_train, dict) and on_train.get("accuracy") is not None:
                lines.append(f"Teacher on the student's training images: {fmt_pct(on_train['accuracy'])} right, "
                             f"{on_train.get('true_class_probability', float('nan')):.3f} mean probability on the "
                             f"true class, entropy {on_train.get('entropy_nats', float('nan')):.3f} nats")
        parts.append("\n\n".join(lines))
    rep.add(*parts)


def section_curves(rep: Report, src: Sources, figs: Figures) -> None:
    from .evaluate import plot_confusion, plot_curves
    parts = ["## Training curves and confusion matrices",
             "Loss and accuracy per epoch (train, and val where the split has one), from each run's history; "
             "the test confusion matrix (rows: true class, normalized per row) from its meta.json."]
    for run in sorted((r for r in src.runs if r.kind != "ablation"),
                      key=lambda r: (r.level if r.level is not None else 99, r.name)):
        label = ("ensemble member" if _zoo_member_only(run)
                 else f"level {run.level if run.level is not None else '-'}")
        items = [f"### `{run.name}` ({label})"]
        history = run.meta.get("history") or []
        if history:
            path = figs.path(f"curves_{run.slug}.png")
            plot_curves(history, path, title=f"{run.name}: training curves")
            items.append(figs.link(path, f"{run.name} training curves"))
        else:
            rep.skip(f"curves of `{run.name}`", "its meta.json has no history")
        confusion = run.test.get("confusion")
        if confusion:
            path = figs.path(f"confusion_{run.slug}.png")
            plot_confusion(confusion, path, classes=run.meta.get("classes") or CLASSES,
                           title=f"{run.name}: test confusion ({(run.meta.get('split') or {}).get('name', '?')} split)")
            items.append(figs.link(path, f"{run.name} test confusion matrix"))
        else:
            rep.skip(f"confusion matrix of `{run.name}`", "its meta.json has no test confusion")
        if len(items) > 1:
            parts.append("\n\n".join(items))
    if len(parts) > 2:
        rep.add(*parts)


def _fitted_ensemble(src: Sources, loaded: list) -> tuple[object | None, str | None]:
    """(Ensemble, None) of ensemble.json's weights over the loaded checkpoints, or (None, why not)."""
    from .ensemble import Ensemble, fit_mismatch
    if src.ensemble is None:
        return None, "no readable checkpoints/ensemble.json"
    by_name = {member.name: member for _, member, _ in loaded}
    names = _member_names(src.ensemble)
    missing = [n for n in names if n not in by_name]
    if missing or not names:
        return None, f"its members {names} are not all loaded here (missing {missing})"
    members = [by_name[n] for n in names]
    problem = fit_mismatch(src.ensemble, members)
    if problem:
        return None, f"ensemble.json does not belong to these checkpoints ({problem}): rerun `python train.py ensemble`"
    if len({split.fingerprint for _, m, split in loaded if m.name in names}) > 1:
        return None, "its members were trained on different splits"
    try:
        weights = [float(m["weight"]) for m in src.ensemble["members"]]
        return Ensemble(members, weights, temperature=float(src.ensemble.get("temperature") or 1.0),
                        source="fitted on val (ensemble.json)"), None
    except (KeyError, TypeError, ValueError) as e:
        return None, f"ensemble.json's weights are unusable ({e})"


def section_data(rep: Report, src: Sources, figs: Figures, data_dir: str | None) -> None:
    """Sample predictions of every shipped checkpoint (and the fitted ensemble), and one Grad-CAM grid."""
    from .checkpoint import CheckpointError
    from .data import make_split
    from .ensemble import load_member
    from .explain import ensemble_map, explain_batch, normalize_maps

    shipped = src.of_kind("checkpoint")
    if not shipped:
        rep.skip("Sample predictions and Grad-CAM", "no checkpoints to load")
        return
    data, why = load_data(data_dir, [r.meta for r in shipped])
    if data is None:
        rep.skip("Sample predictions and Grad-CAM", f"the CIFAR-10 data could not be loaded ({why}); "
                 "pass --data or set CIFAR10_DIR")
        return
    splits: dict[tuple, object] = {}
    loaded = []   # (run, member, split)
    for run in shipped:
        s = run.meta.get("split") or {}
        key = (s.get("name", "seed"), s.get("seed", 0))
        if key not in splits:
            splits[key] = make_split(data, *key)
        split = splits[key]
        if s.get("fingerprint") and split.fingerprint != s["fingerprint"]:
            rep.skip(f"samples and Grad-CAM of `{run.name}`",
                     f"this data gives split {split.fingerprint}, it was trained on {s['fingerprint']}: "
                     "its test images are not these")
            continue
        if not len(split.test):
            rep.skip(f"samples and Grad-CAM of `{run.name}`", "its split has no test images")
            continue
        try:
            member = load_member(run.path)
        except (CheckpointError, OSError, KeyError, ValueError) as e:
            rep.skip(f"samples and Grad-CAM of `{run.name}`", f"its weights could not be loaded ({e})")
            continue
        loaded.append((run, member, split))
    if not loaded:
        return
    ensemble, why_not = _fitted_ensemble(src, loaded)
    if ensemble is None and src.ensemble_path is not None:
        rep.skip("ensemble samples and Grad-CAM", why_not)

    parts = ["## Sample predictions",
             f"{SAMPLE_COUNT} fixed test images of each checkpoint's own test split (evenly spaced through it) "
             "with the served prediction: the calibrated probability at the checkpoint's TTA level. "
             "Wrong predictions are framed in red."]
    grids = [(run.name, run.slug, member.predictor.probs, split, f"TTA {member.predictor.tta}",
              run.meta.get("classes") or list(data.classes)) for run, member, split in loaded]
    if ensemble is not None:
        split = next(split for _, m, split in loaded if m.name == ensemble.members[0].name)
        grids.append(("ensemble", "ensemble", ensemble.probs, split, "fitted weights",
                      list(data.classes)))
    for name, slug, probs_of, split, how, classes in grids:
        idx = split.test[sample_positions(len(split.test))]
        images, labels = data.images[idx], data.labels[idx].numpy()
        probs = probs_of(images).numpy()
        right = int((probs.argmax(1) == labels).sum())
        path = figs.path(f"samples_{slug}.png")
        plot_samples(images.numpy(), labels, probs, classes, path,
                     f"{name}: {right}/{len(labels)} right ({split.name} test split, {how})")
        parts.append(f"### `{name}`: {right}/{len(labels)} right\n\n" + figs.link(path, f"{name} sample predictions"))
    rep.add(*parts)

    # Grad-CAM: the first test image of each class, the same images for every model sharing the first one's split.
    ref_split = loaded[0][2]
    for run, _, split in loaded:
        if split.fingerprint != ref_split.fingerprint:
            rep.skip(f"Grad-CAM of `{run.name}`", f"its split differs from `{loaded[0][0].name}`'s, whose test "
                     "images the grid shows")
    idx = ref_split.test[cam_positions(data.labels[ref_split.test].numpy(), len(data.classes))]
    images, labels = data.images[idx], data.labels[idx].numpy()
    rows = []
    for run, member, split in loaded:
        if split.fingerprint != ref_split.fingerprint:
            continue
        try:
            ex = explain_batch(member.predictor, images, CAM_METHOD)
        except (RuntimeError, ValueError) as e:
            rep.skip(f"Grad-CAM of `{run.name}`", str(e))
            continue
        maps = normalize_maps([e.cam for e in ex], shared=False)
        rows.append((run.name, [(m, e.target, e.probability) for m, e in zip(maps, ex)]))
    ensemble_note = ""
    if rows and ensemble is not None and ensemble.members[0].name in {r.name for r, _, s in loaded
                                                                       if s.fingerprint == ref_split.fingerprint}:
        probs = ensemble.probs(images)
        targets = probs.argmax(1).tolist()
        try:
            weighted = ensemble.weighted_only()  # a member of weight 0 adds nothing to the map
            per_member = [explain_batch(m.predictor, images, CAM_METHOD, targets=targets) for m in weighted.members]
            cells = [(ensemble_map([ex[j] for ex in per_member], weighted.weights), targets[j],
                      float(probs[j, targets[j]])) for j in range(len(targets))]
            rows.append(("ensemble", cells))
            ensemble_note = (" The last row is the ensemble: each member's map of the ensemble's predicted class, "
                             "scaled to [0, 1] and averaged with the fitted weights.")
        except (RuntimeError, ValueError) as e:
            rep.skip("Grad-CAM of the ensemble", str(e))
    if rows:
        path = figs.path("gradcam.png")
        plot_cam_grid(images.numpy(), labels, rows, list(data.classes), path,
                      "Grad-CAM of the predicted class (first test image of each class)")
        rep.add("## Grad-CAM",
                f"The first test image of every class ({ref_split.name} split) and, per model, the Grad-CAM map of "
                "the class it predicts (caption: that class and its calibrated probability, red when wrong), "
                "each map scaled to its own [0, 1]. Target layer: each model's registered `cam_layer`."
                + ensemble_note,
                figs.link(path, "Grad-CAM examples"))


def build_report(out: str | Path = "results", checkpoints: str | Path | None = None, runs: str | Path = "runs",
                 data_dir: str | None = None) -> Path:
    """Write out/REPORT.md and out/figures/*.png; returns the REPORT.md path."""
    out = Path(out)
    src = collect(checkpoints, runs)
    figs = Figures(out)
    rep = Report(out)
    section_summary(rep, src)
    section_headline(rep, src)
    section_ablation(rep, src, figs)
    section_ensemble(rep, src)
    section_distill(rep, src)
    section_curves(rep, src, figs)
    section_data(rep, src, figs, data_dir)
    figs.remove_stale()

    head = ["# CIFAR-10 Lab: results",
            "Generated by `python train.py report` from the meta.json files of real training runs (listed under "
            "Sources); no number here is typed in by hand. Rerun it after training to refresh this file and "
            f"`{FIGURES}/`."]
    tail = []
    if rep.skipped or src.problems:
        tail.append("## Skipped\n\n" + "\n".join(
            [f"- {what}: {why}" for what, why in rep.skipped] + [f"- {p}" for p in src.problems]))
    sources = [f"- `{_show(r.path / 'meta.json')}`: saved {r.meta.get('saved_at', '?')}"
               + (f", `{r.meta['command']}`" if r.meta.get("command") else "") for r in src.runs]
    if src.ensemble_path is not None:
        sources.append(f"- `{_show(src.ensemble_path)}`")
    tail.append("## Sources\n\n" + ("\n".join(sources) if sources else "(no runs found)"))
    text = "\n\n".join(head + rep.sections + tail) + "\n"
    path = out / "REPORT.md"
    atomic_write_bytes(path, text.encode())
    return path
