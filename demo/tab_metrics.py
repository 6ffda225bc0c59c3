"""Training metrics tab: curves, confusion matrices, per-class accuracy, model cards and the levels
table, all read from each checkpoint's meta.json (so a new checkpoint shows up without code changes)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr
import pandas as pd

from cifar_core import evaluate
from cifar_core.data import CLASSES
from cifar_core.ensemble import MIN_WEIGHT
from cifar_core.evaluate import plot_confusion, read_history
from cifar_core.levels import LEVELS

from .common import user_errors

ALL = "all models (overlaid)"
_PLOTS = Path(tempfile.mkdtemp(prefix="cifar_demo_plots_"))


def history(member) -> list[dict]:
    return member.meta.get("history") or read_history(member.path / "history.jsonl")


def curves_figure(lab, which: str = ALL):
    members = lab.members if which in (None, ALL) else [lab.by_name[which]]
    return evaluate.curves_figure({m.name: history(m) for m in members})  # drawn as the report draws them


def confusion_image(lab, name: str, normalized: bool = True) -> str | None:
    """PNG of the test confusion matrix, drawn once per (model, mode) by cifar_core.evaluate;
    None when the checkpoint recorded none."""
    path = _PLOTS / f"confusion_{name}_{'norm' if normalized else 'counts'}.png"
    if not path.exists():
        if name == "ensemble":
            cm = lab.assets.get("ensemble_test", {}).get("confusion")
        else:
            cm = lab.by_name[name].meta.get("metrics", {}).get("test", {}).get("confusion")
        if cm is None:
            return None
        plot_confusion(cm, path, title=f"{name}: test confusion ({'row-normalized' if normalized else 'counts'})",
                       normalize=normalized)
    return str(path)


def per_class_table(lab) -> pd.DataFrame:
    table = {"class": list(CLASSES)}
    for m in lab.members:
        acc = m.meta.get("metrics", {}).get("test", {}).get("per_class_accuracy", {})
        table[m.name] = [acc.get(c) for c in CLASSES]
    ens = lab.assets.get("ensemble_test", {}).get("per_class_accuracy")
    if ens and len(lab.members) > 1:
        table["ensemble"] = [ens.get(c) for c in CLASSES]
    return pd.DataFrame(table)


def fmt(v, digits=4):
    return f"{v:.{digits}f}" if isinstance(v, float) else ("—" if v is None else str(v))


def model_card(lab, name: str) -> str:
    m = lab.by_name[name]
    meta = m.meta
    spec = meta.get("spec", {})
    cfg = meta.get("train_config", {})
    split = meta.get("split", {})
    test = meta.get("metrics", {}).get("test", {})
    recipe = ", ".join(f"{k}={cfg[k]}" for k in ("epochs", "batch_size", "optimizer", "lr", "weight_decay",
                                                  "label_smoothing", "schedule", "pretrained") if k in cfg)
    return "\n".join([
        f"### {name}",
        f"- **Architecture**: `{meta.get('model')}` {meta.get('model_kwargs') or ''} — {spec.get('description', '')}",
        f"- **Parameters**: {meta.get('params', 0):,}",
        f"- **Input size**: {spec.get('input_size')}x{spec.get('input_size')} (mean {spec.get('mean')}, std {spec.get('std')})",
        f"- **Recipe**: {recipe}",
        f"- **Data**: {meta.get('data', {}).get('note') or meta.get('data', {}).get('source', '—')}",
        f"- **Split**: {split.get('name')} (seed {split.get('seed')}), sizes {split.get('sizes')}, "
        f"fingerprint `{split.get('fingerprint')}`",
        f"- **Test accuracy**: {fmt(test.get('accuracy'))} on {test.get('n', '—')} images "
        f"(TTA level {meta.get('metrics', {}).get('tta', 0)})",
        f"- **Calibration**: temperature {fmt(meta.get('temperature'), 3)}, test NLL {fmt(test.get('nll'))}, "
        f"test ECE {fmt(test.get('ece'))}",
        f"- **Trained with**: `{meta.get('command', '—')}` at code `{meta.get('code_version', '—')}`",
    ])


def ensemble_card(lab) -> str:
    test = lab.assets.get("ensemble_test", {})
    members = ", ".join(f"{n} (weight {w:.2f})" if w > 0 else f"{n} (not weighted: its fitted weight was below "
                        f"{MIN_WEIGHT}, so it is not computed)" for n, w in zip(lab.names, lab.ensemble.weights))
    return "\n".join([
        "### ensemble",
        f"- **Members**: {members}; the weighted mean of their temperature-calibrated probabilities",
        f"- **Test accuracy**: {fmt(test.get('accuracy'))} on {test.get('n', '—')} images, NLL {fmt(test.get('nll'))}, "
        f"ECE {fmt(test.get('ece'))} (measured by `python -m demo.build_assets` for "
        f"{', '.join(lab.assets.get('members', []))})",
    ])


def level_of(member) -> int | None:
    if "level" in member.meta:
        return int(member.meta["level"])
    for level in LEVELS.values():  # a level's recipe writes a known checkpoint folder
        if Path(level.out).name == member.name:
            return level.number
    return None


def levels_table(lab) -> str:
    rows = []
    for m in lab.members:
        test = m.meta.get("metrics", {}).get("test", {})
        n = level_of(m)
        title = LEVELS[n].title if n in LEVELS else ""
        rows.append((n if n is not None else 99, f"| {n if n is not None else '—'} | {title or '—'} | {m.name} | "
                     f"{m.meta.get('params', 0):,} | {fmt(test.get('accuracy'))} | {fmt(test.get('ece'))} |"))
    ens = lab.assets.get("ensemble_test")
    if ens and len(lab.members) > 1:
        rows.append((4, f"| 4 | ensemble (assets built for {', '.join(lab.assets.get('members', []))}) | ensemble | "
                     f"— | {fmt(ens.get('accuracy'))} | {fmt(ens.get('ece'))} |"))
    shown = {r[0] for r in rows}
    titles = {n: level.title for n, level in LEVELS.items()}
    rows += [(n, f"| {n} | {title} | _no checkpoint here yet_ | | | |") for n, title in titles.items() if n not in shown]
    header = "| level | what | checkpoint | params | test accuracy | test ECE |\n|---|---|---|---|---|---|"
    return "### Levels\n" + header + "\n" + "\n".join(r for _, r in sorted(rows, key=lambda r: r[0]))


def build_metrics(lab):
    names = lab.names
    choices = names + (["ensemble"] if len(names) > 1 and lab.assets.get("ensemble_test") else [])
    with gr.Row():
        which_curves = gr.Radio([ALL, *names], value=ALL, label="Curves")
    curves = gr.Plot(curves_figure(lab), label="Training / validation curves", elem_id="curves-plot")
    with gr.Row():
        with gr.Column():
            model = gr.Dropdown(choices, value=names[0], label="Model (confusion matrix, model card)")
            normalized = gr.Radio(["normalized", "counts"], value="normalized", label="Confusion matrix")
            confusion = gr.Image(confusion_image(lab, names[0]), label="Test confusion matrix", interactive=False,
                                 elem_id="confusion-plot")
        with gr.Column():
            card = gr.Markdown(model_card(lab, names[0]), elem_id="model-card")
    gr.Dataframe(per_class_table(lab), label="Per-class test accuracy", interactive=False)
    gr.Markdown(levels_table(lab), elem_id="levels-table")

    which_curves.change(user_errors(lambda w: curves_figure(lab, w)), which_curves, curves, api_visibility="private")

    def show_model(name, norm):
        card = model_card(lab, name) if name in lab.by_name else ensemble_card(lab)
        return confusion_image(lab, name, norm == "normalized"), card
    model.change(user_errors(show_model), [model, normalized], [confusion, card], api_visibility="private")
    normalized.change(user_errors(lambda n, m: confusion_image(lab, n, m == "normalized")), [model, normalized],
                      confusion, api_visibility="private")
