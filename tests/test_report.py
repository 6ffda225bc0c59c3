"""`python train.py report`: REPORT.md tables equal the meta.json values, embedded PNGs exist and are
valid, sections without data are skipped with a reason, and the output is deterministic."""
import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT
from cifar_core.report import fmt_params

SHIPPED = ROOT / "checkpoints" / "cifar_cnn"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pct(x):
    return f"{100 * x:.2f}%"


def write_meta(folder: Path, meta: dict) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    return meta


def variant(base: dict, model: str, test_acc: float, val_acc: float, params: int, seconds: float, **extra) -> dict:
    meta = copy.deepcopy(base)
    meta.update(model=model, params=params, **extra)
    meta["train_config"]["model"] = model
    meta["metrics"]["test"]["accuracy"] = test_acc
    meta["metrics"]["val"]["accuracy"] = val_acc
    for h in meta["history"]:
        h["seconds"] = seconds
    return meta


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The body rows of the first Markdown table whose header starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def embedded_pngs(report: Path) -> list[Path]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text())
    assert links, "the report embeds no figures"
    assert not any(Path(link).is_absolute() or ".." in Path(link).parts for link in links), links
    paths = [report.parent / link for link in links]
    for p in paths:
        assert p.exists(), p
        assert p.read_bytes()[:8] == PNG_SIGNATURE, p
        from PIL import Image
        with Image.open(p) as im:
            im.verify()
    return paths


@pytest.fixture
def tree(tmp_path):
    """checkpoints/ (levels 2, 3, 4 + ensemble.json), runs/level1, runs/ablation/*, runs/distill/*:
    meta.json files only (copies of the shipped one with other numbers), no weights, no data."""
    base = json.loads((SHIPPED / "meta.json").read_text())
    ck, runs = tmp_path / "checkpoints", tmp_path / "runs"
    metas = {
        "cnn": write_meta(ck / "cifar_cnn", base),
        "l2": write_meta(ck / "tf_efficientnet_lite0",
                         variant(base, "tf_efficientnet_lite0", 0.9512, 0.9533, 3_384_706, 100.0)),
        "vit": write_meta(ck / "vit_cifar", variant(base, "vit_cifar", 0.8811, 0.8822, 5_360_906, 50.0)),
        # a shipped member no level's recipe trains (as the Lite1 member is)
        "lite1": write_meta(ck / "tf_efficientnet_lite1",
                            variant(base, "tf_efficientnet_lite1", 0.9417, 0.9470, 4_150_000, 80.0,
                                    command="python benchmarks/transfer_cost.py run l1_x")),
        "l1": write_meta(runs / "level1", variant(base, "tf_efficientnet_lite0", 0.9011, 0.9022, 3_384_706, 90.0)),
        "ab_nosmooth": write_meta(runs / "ablation" / "no_smoothing",
                                  variant(base, "tf_efficientnet_lite0", 0.9455, 0.9477, 3_384_706, 95.0)),
    }
    # Two variants at a short budget: the full Level 2 recipe and one without the flip (compared with each
    # other); no_smoothing keeps the 10-epoch budget of the Level 2 checkpoint (compared with it).
    from cifar_core.levels import LEVELS
    for key, folder, acc in (("ab_full", "full", 0.9301), ("ab_noflip", "no_flip", 0.9211),
                             ("ab_nodp", "no_drop_path", 0.9251)):
        meta = variant(base, "tf_efficientnet_lite0", acc - 0.001, acc, 3_384_706, 20.0)
        meta["train_config"] = {**LEVELS[2].config.to_dict(), "epochs": 2, "data": "elsewhere"}
        metas[key] = write_meta(runs / "ablation" / folder, meta)
    metas["ab_noflip"]["train_config"]["augment"]["flip"] = False
    write_meta(runs / "ablation" / "no_flip", metas["ab_noflip"])
    assert metas["ab_nodp"]["train_config"]["model_kwargs"]  # the recipe's stochastic depth, switched off here:
    metas["ab_nodp"]["train_config"]["model_kwargs"] = {}
    write_meta(runs / "ablation" / "no_drop_path", metas["ab_nodp"])
    for role, folder, acc in (("distilled", "cifar_cnn_small_distilled", 0.8701),
                              ("from-scratch twin", "cifar_cnn_small_scratch", 0.8602)):
        metas[role] = write_meta(runs / "distill" / folder, variant(
            base, "cifar_cnn_small", acc, acc + 0.001, 295_096, 30.0,
            distillation={"role": role, "members": [{"name": "cifar_cnn"}], "alpha": 0.7, "temperature": 4.0,
                          **({"on_train": {"accuracy": 0.9812, "true_class_probability": 0.9412,
                                           "entropy_nats": 0.1711}} if role == "distilled" else {})}))
        # function matching: both twins follow a plan of 8 mixup views, which the teacher labelled
        metas[role]["train_config"]["augment"].update(views=8, mix="mixup", mix_alpha=1.0)
        write_meta(runs / "distill" / folder, metas[role])
    ensemble = {
        "format": 1, "temperature": 0.95, "tta": None, "command": "python train.py ensemble",
        "members": [{"name": n, "saved_at": metas[k]["saved_at"], "weight": w, "tta": 1, "temperature": 1.0,
                     "params": metas[k]["params"],
                     "metrics": {"val": {"accuracy": metas[k]["metrics"]["val"]["accuracy"], "nll": 0.3, "ece": 0.02},
                                 "test": {"accuracy": metas[k]["metrics"]["test"]["accuracy"], "nll": 0.3, "ece": 0.02}}}
                    for n, k, w in (("cifar_cnn", "cnn", 0.5), ("tf_efficientnet_lite0", "l2", 0.5),
                                    ("vit_cifar", "vit", 0.0))],  # the fit dropped the ViT: not computed
        "metrics": {"equal": {"val": {"n": 6000, "accuracy": 0.9566, "nll": 0.15, "ece": 0.01},
                              "test": {"n": 6000, "accuracy": 0.9544, "nll": 0.16, "ece": 0.011}},
                    "fitted": {"val": {"n": 6000, "accuracy": 0.9611, "nll": 0.13, "ece": 0.009},
                               "test": {"n": 6000, "accuracy": 0.9599, "nll": 0.14, "ece": 0.008}}},
    }
    (ck / "ensemble.json").write_text(json.dumps(ensemble))
    return tmp_path, metas, ensemble


def test_tables_equal_the_meta_values_without_data(tree, capsys):
    import train
    root, metas, ensemble = tree
    out = root / "results"
    rc = train.main(["report", "--out", str(out), "--checkpoints", str(root / "checkpoints"),
                     "--runs", str(root / "runs"), "--data", str(root / "no-such-data")])
    assert rc == 0
    assert "REPORT.md" in capsys.readouterr().out
    report = out / "REPORT.md"
    text = report.read_text()

    rows = table_rows(text, "| Level | What |")
    by_model_level = {(r[0], r[2]): r for r in rows}
    for level, key, model in (("1", "l1", "tf_efficientnet_lite0"), ("2", "l2", "tf_efficientnet_lite0"),
                              ("3", "cnn", "cifar_cnn"), ("4", "vit", "vit_cifar")):
        meta = metas[key]
        row = by_model_level[(level, f"`{model}`")]
        test = meta["metrics"]["test"]
        assert row[6] == pct(meta["metrics"]["val"]["accuracy"]), row
        assert row[7] == pct(test["accuracy"]), row
        assert row[8] == f"{test['nll']:.3f} / {test['ece']:.3f}", row
        assert row[4] == str(int(meta["train_config"]["epochs"]))
        assert row[9] == "offline JPEG q75 copy, seed split 48k/6k/6k"
    # the fitted ensemble's row names the members it computes, and the ones the fit left out
    ens_row = next(r for r in rows if "[ensemble: fitted weights" in r[1])
    assert ens_row[2] == "`cifar_cnn` + `tf_efficientnet_lite0`" and "not weighted: `vit_cifar`" in ens_row[1]
    assert ens_row[3] == fmt_params(metas["cnn"]["params"] + metas["l2"]["params"])
    assert by_model_level[("3", "`cifar_cnn`")][3] == f"{metas['cnn']['params'] / 1e6:.2f}M"
    total = sum(h["seconds"] for h in metas["cnn"]["history"])
    assert by_model_level[("3", "`cifar_cnn`")][5] == f"{total / 60:.1f} min"
    member = by_model_level[("4", "`tf_efficientnet_lite1`")]
    assert member[1] == "ensemble member, trained by `python benchmarks/transfer_cost.py run l1_x`"
    assert member[7] == pct(metas["lite1"]["metrics"]["test"]["accuracy"])
    assert "### `tf_efficientnet_lite1` (ensemble member)" in text
    fitted = [r for r in rows if "ensemble: fitted" in r[1]]
    assert len(fitted) == 1 and fitted[0][7] == pct(ensemble["metrics"]["fitted"]["test"]["accuracy"])
    roles = [r for r in rows if r[0] == "5"]
    assert {r[7] for r in roles} == {pct(metas["distilled"]["metrics"]["test"]["accuracy"]),
                                     pct(metas["from-scratch twin"]["metrics"]["test"]["accuracy"])}
    # each level-5 row names its own teacher, not the level's default one
    assert sorted(r[1] for r in roles) == ["distillation [distilled from `cifar_cnn`]",
                                           "distillation [from-scratch twin: labels only, same recipe and budget]"]
    from cifar_core.report import _distill_what
    folds = {"role": "distilled", "members": [{"name": "l0_fold0"}, {"name": "l0_fold1"}], "cross_fitted_folds": 2}
    assert _distill_what(folds) == "distillation [distilled from cross-fitted over 2 folds (`l0_fold0`, `l0_fold1`)]"
    assert "the ensemble of `a`, `b`" in _distill_what({"role": "distilled", "members": [{"name": "a"}, {"name": "b"}]})

    # Level 1 -> 2 headline, ablation, ensemble and distillation sections, from the same files
    l1, l2 = metas["l1"]["metrics"]["test"]["accuracy"], metas["l2"]["metrics"]["test"]["accuracy"]
    assert f"test accuracy {pct(l1)} -> {pct(l2)} ({100 * (l2 - l1):+.2f} pp)" in text
    ablation = {r[0]: r for r in table_rows(text, "| Variant |")}
    val = {k: metas[k]["metrics"]["val"]["accuracy"]
           for k in ("ab_full", "ab_noflip", "ab_nodp", "ab_nosmooth", "l2")}
    assert ablation["no_flip"][3] == pct(val["ab_noflip"])
    assert ablation["no_flip"][1] == 'augment.flip=false, epochs=2'
    assert ablation["full"][1] == "epochs=2"
    # an emptied model_kwargs is a change (a run without stochastic depth is not the full recipe)
    assert ablation["no_drop_path"][1] == "epochs=2, model_kwargs={}"
    assert ablation["no_drop_path"][4] == f"{100 * (val['ab_nodp'] - val['ab_full']):+.2f} pp vs `full`"
    assert ablation["full"][4] == "-"  # nothing else is the full recipe at its budget
    assert ablation["no_flip"][4] == f"{100 * (val['ab_noflip'] - val['ab_full']):+.2f} pp vs `full`"
    assert ablation["no_smoothing"][3] == pct(val["ab_nosmooth"])
    assert ablation["no_smoothing"][4] == f"{100 * (val['ab_nosmooth'] - val['l2']):+.2f} pp vs `tf_efficientnet_lite0`"
    ens_rows = {r[0]: r for r in table_rows(text, "| Member | Weight |")}
    assert ens_rows["`tf_efficientnet_lite0`"][1] == "0.5000"
    assert any(r[6] == pct(ensemble["metrics"]["equal"]["test"]["accuracy"]) for r in ens_rows.values())
    assert ("Distillation gain: test accuracy 86.02% -> 87.01% (+0.99 pp); teacher: `cifar_cnn`; alpha 0.7, T 4.0; "
            "consistent teaching over 8 planned views, each a mixup blend (Beta alpha 1.0) labelled by the teacher"
            ) in text
    assert ("Teacher on the student's training images: 98.12% right, 0.941 mean probability on the true class, "
            "entropy 0.171 nats") in text

    # figures that need no data are there; the data sections are skipped, saying why
    pngs = {p.name for p in embedded_pngs(report)}
    assert {"curves_cifar_cnn.png", "confusion_cifar_cnn.png", "curves_runs-level1.png", "ablation.png",
            "confusion_runs-distill-cifar_cnn_small_distilled.png"} <= pngs
    assert not any(n.startswith(("samples_", "gradcam")) for n in pngs)
    skipped = text.split("## Skipped")[1]
    assert "Sample predictions and Grad-CAM" in skipped and "no-such-data" in skipped

    # deterministic: a second run writes the same bytes, and figures no longer produced are removed
    before = {p.name: p.read_bytes() for p in (out / "figures").glob("*.png")} | {"REPORT.md": report.read_bytes()}
    (out / "figures" / "stale.png").write_bytes(PNG_SIGNATURE)
    from cifar_core.report import build_report
    build_report(out, root / "checkpoints", root / "runs", data_dir=str(root / "no-such-data"))
    after = {p.name: p.read_bytes() for p in (out / "figures").glob("*.png")} | {"REPORT.md": report.read_bytes()}
    assert after == before


def test_missing_runs_and_no_checkpoints_still_write_a_report(tmp_path):
    from cifar_core.report import build_report
    report = build_report(tmp_path / "out", tmp_path / "none", tmp_path / "none", data_dir=str(tmp_path / "none"))
    text = report.read_text()
    assert "not run yet: `python train.py --level 3`" in text
    for section in ("Level 2 ablation", "Ensemble (level 4)", "Distillation (level 5)"):
        assert section in text.split("## Skipped")[1]


def test_with_data_samples_and_gradcam(data_dir, tmp_path):
    """The shipped checkpoint (read-only: its weights linked, not copied) and a one-member ensemble.json."""
    from cifar_core.report import build_report
    ck = tmp_path / "checkpoints" / "cifar_cnn"
    ck.mkdir(parents=True)
    shutil.copy(SHIPPED / "meta.json", ck / "meta.json")
    (ck / "model.safetensors").symlink_to(SHIPPED / "model.safetensors")
    meta = json.loads((ck / "meta.json").read_text())
    (tmp_path / "checkpoints" / "ensemble.json").write_text(json.dumps({
        "format": 1, "temperature": 1.0, "tta": None,
        "members": [{"name": "cifar_cnn", "saved_at": meta["saved_at"], "weight": 1.0}],
        "metrics": {"fitted": {"test": {"accuracy": 0.9, "nll": 0.3, "ece": 0.02}}}}))
    report = build_report(tmp_path / "results", tmp_path / "checkpoints", tmp_path / "runs", data_dir=data_dir)
    text = report.read_text()
    pngs = {p.name for p in embedded_pngs(report)}
    assert {"samples_cifar_cnn.png", "samples_ensemble.png", "gradcam.png", "curves_cifar_cnn.png",
            "confusion_cifar_cnn.png"} <= pngs
    right = re.search(r"### `cifar_cnn`: (\d+)/24 right", text)
    assert right and 12 <= int(right.group(1)) <= 24  # a 90% model on 24 images
    assert "The last row is the ensemble" in text
    row = next(r for r in table_rows(text, "| Level | What |") if r[2] == "`cifar_cnn`")
    assert row[7] == pct(meta["metrics"]["test"]["accuracy"])
    skipped = text.split("## Skipped")[1].split("## Sources")[0] if "## Skipped" in text else ""
    assert "Grad-CAM" not in skipped and "samples" not in skipped
