"""Distillation: the soft-target loss, the teacher's targets, and a short real-data run with a teacher."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from cifar_core.augment import AugmentConfig, apply_view, view_plan
from cifar_core.engine import TrainConfig, check_teacher_logits, soft_target_loss, train


def test_soft_target_loss_reduces_to_cross_entropy_and_to_kl():
    torch.manual_seed(0)
    student, teacher, labels = torch.randn(16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    plain = TrainConfig(distill_alpha=0.0, label_smoothing=0.1)
    assert torch.allclose(soft_target_loss(student, teacher, labels, plain),
                          F.cross_entropy(student, labels, label_smoothing=0.1))
    only_soft = TrainConfig(distill_alpha=1.0, distill_temperature=3.0)
    assert soft_target_loss(teacher, teacher, labels, only_soft).abs() < 1e-6  # matching the teacher costs 0
    assert soft_target_loss(student, teacher, labels, only_soft) > 0.01
    # the soft term pulls the student towards the teacher
    s = student.clone().requires_grad_(True)
    soft_target_loss(s, teacher, labels, only_soft).backward()
    stepped = (s - 1.0 * s.grad).detach()
    assert soft_target_loss(stepped, teacher, labels, only_soft) < soft_target_loss(student, teacher, labels, only_soft)


def test_teacher_logits_are_checked(cifar):
    cfg = TrainConfig(distill_alpha=0.5)
    idx = torch.arange(100)
    with pytest.raises(ValueError, match="needs teacher_logits"):
        check_teacher_logits(None, cifar, idx, cfg)
    with pytest.raises(ValueError, match="must be"):
        check_teacher_logits(torch.zeros(100, 10), cifar, idx, cfg)
    partial = torch.full((len(cifar), 10), float("nan"))
    partial[:50] = 0.0
    with pytest.raises(ValueError, match="no \\(finite\\) value"):
        check_teacher_logits(partial, cifar, idx, cfg)
    check_teacher_logits(None, cifar, idx, TrainConfig())  # plain training needs no teacher
    # planned views: one set of targets per view
    views = TrainConfig(distill_alpha=0.5, augment=AugmentConfig(views=2))
    check_teacher_logits(torch.zeros(2, len(cifar), 10), cifar, idx, views)
    for wrong in (torch.zeros(len(cifar), 10), torch.zeros(3, len(cifar), 10)):
        with pytest.raises(ValueError, match="2 views x"):
            check_teacher_logits(wrong, cifar, idx, views)
    with pytest.raises(ValueError, match="cutout"):
        check_teacher_logits(torch.zeros(2, len(cifar), 10), cifar, idx,
                             replace(views, augment=AugmentConfig(views=2, cutout=8)))
    # mixup: only as planned views, which the teacher labels; drawn per batch it never saw them
    check_teacher_logits(torch.zeros(2, len(cifar), 10), cifar, idx,
                         replace(views, augment=AugmentConfig(views=2, mix="mixup")))
    with pytest.raises(ValueError, match="never saw"):
        check_teacher_logits(torch.zeros(len(cifar), 10), cifar, idx, replace(cfg, augment=AugmentConfig(mix="mixup")))


def test_mixed_cross_entropy_weighs_each_image_by_its_own_blend():
    from cifar_core.engine import mixed_cross_entropy
    torch.manual_seed(0)
    logits, a, b = torch.randn(8, 10), torch.randint(0, 10, (8,)), torch.randint(0, 10, (8,))
    cfg = TrainConfig(label_smoothing=0.1)
    lam = torch.rand(8)
    per = [lam[i] * F.cross_entropy(logits[i:i + 1], a[i:i + 1], label_smoothing=0.1)
           + (1 - lam[i]) * F.cross_entropy(logits[i:i + 1], b[i:i + 1], label_smoothing=0.1) for i in range(8)]
    assert torch.allclose(mixed_cross_entropy(logits, a, cfg, b, lam), torch.stack(per).mean())
    assert torch.allclose(mixed_cross_entropy(logits, a, cfg), F.cross_entropy(logits, a, label_smoothing=0.1))
    # one weight for the batch (mix_batch) is the same loss as that weight for every image
    assert torch.allclose(mixed_cross_entropy(logits, a, cfg, b, 0.3), mixed_cross_entropy(logits, a, cfg, b,
                                                                                             torch.full((8,), 0.3)))


def test_teacher_logits_cover_exactly_the_given_rows(cifar):
    from cifar_core.distill import teacher_logits
    from cifar_core.ensemble import Ensemble, Member
    from cifar_core.models import create_model
    from cifar_core.predictor import Predictor
    torch.manual_seed(0)
    model = create_model("cifar_cnn_small").eval()
    member = Member("tiny", None, {}, Predictor(model, tta=1))
    idx = torch.tensor([3, 10, 59999])
    logits = teacher_logits(Ensemble([member]), cifar, idx)
    assert logits.shape == (len(cifar), 10)
    assert torch.isfinite(logits[idx]).all() and torch.isnan(logits[:3]).all()
    assert torch.allclose(logits[idx].softmax(1), member.predictor.probs(cifar.images[idx]), atol=1e-5)
    # planned views: the teacher labels each view exactly as the student will be shown it
    aug = AugmentConfig(views=2)
    logits = teacher_logits(Ensemble([member]), cifar, idx, aug)
    assert logits.shape == (2, len(cifar), 10) and torch.isnan(logits[:, :3]).all()
    for view in range(2):
        shown = apply_view(cifar.images[idx].float(), view_plan(len(cifar), view, aug), idx, aug)
        expected = member.predictor.probs(shown.to(torch.uint8))
        assert torch.allclose(logits[view, idx].softmax(1), expected, atol=1e-5)
    assert not torch.allclose(logits[0, idx], logits[1, idx])  # the views differ
    # planned mixup views: the teacher labels each blend of a training row with its planned partner
    from cifar_core.augment import show_view
    rows = torch.arange(20)
    aug = AugmentConfig(views=2, mix="mixup")
    logits = teacher_logits(Ensemble([member]), cifar, rows, aug)
    for view in range(2):
        plan = view_plan(len(cifar), view, aug, pool=rows)
        assert bool((plan.partner[rows] != rows).any()) and bool((plan.lam[rows] < 1).all())
        expected = member.predictor.probs(show_view(cifar.images, rows, plan, aug))
        assert torch.allclose(logits[view, rows].softmax(1), expected, atol=1e-5)


@pytest.mark.parametrize("views, mix", [(0, "none"), (2, "none"), (2, "mixup")])
def test_short_distilled_run_learns_from_the_teacher(cifar, data_dir, tmp_path, views, mix):
    # A teacher that knows the labels, as sure as a calibrated model (0.82 on the true class):
    # distilling from it alone must train the student about as well as labels do (0.27 here).
    probs = torch.full((len(cifar), 10), 0.02)
    probs[torch.arange(len(cifar)), cifar.labels] = 0.82
    teacher = probs.log().expand(views, -1, -1) if views else probs.log()
    cfg = TrainConfig(model="cifar_cnn_small", epochs=2, batch_size=200, train_subset=1000, data=data_dir,
                      progress=False, tta=0, lr=1.0, distill_alpha=0.9, distill_temperature=2.0,
                      augment=AugmentConfig(views=views, mix=mix))
    result = train(cfg, out_dir=tmp_path / "student", data=cifar, teacher_logits=teacher)
    assert result.history[-1]["val_acc"] > 0.2  # chance is 0.1
    import json
    meta = json.loads((tmp_path / "student" / "meta.json").read_text())
    assert meta["train_config"]["distill_alpha"] == 0.9


def test_level5_runs_distill_then_export_then_benchmark(monkeypatch, tmp_path):
    """`train.py --level 5` wiring, with the expensive steps replaced by recorders."""
    import subprocess
    from types import SimpleNamespace

    import train
    from cifar_core import distill
    calls = []

    def fake_distill_pair(data, out, student, epochs, seed, alpha, temperature, **kw):
        calls.append(("distill", student, epochs, alpha, temperature, str(out)))
        return {role: SimpleNamespace(out_dir=tmp_path / role) for role in ("scratch", "distilled")}

    def fake_export_folders(folders, data, *a, **kw):
        calls.append(("export", *map(str, folders), data))
        return iter(())

    monkeypatch.setattr(distill, "distill_pair", fake_distill_pair)
    monkeypatch.setattr("cifar_core.data.load_cifar10", lambda data=None: "DATA-LOADED")
    monkeypatch.setattr("cifar_core.ensemble.find_checkpoints", lambda root=None: [tmp_path / "teacher"])
    monkeypatch.setattr("cifar_core.export.export_folders", fake_export_folders)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(tuple(map(str, cmd))) or
                        SimpleNamespace(returncode=0))
    assert train.main(["--level", "5", "--data", "DATA"]) == 0
    assert calls[0] == ("distill", "cifar_cnn_small", 8, 0.5, 1.0, "runs/distill")
    export, bench = calls[1], calls[2]
    # the export runs in this process (train.py never shells out to itself), on the data loaded once
    assert export == ("export", str(tmp_path / "teacher"), str(tmp_path / "scratch"), str(tmp_path / "distilled"),
                      "DATA-LOADED")
    assert bench[1].endswith("export_latency.py") and "--students" in bench and "DATA" in bench
    assert len(calls) == 3



def test_distill_cli_set_overrides_the_shared_recipe(monkeypatch):
    """`train.py distill --set` reaches student and twin alike (one base config); bad keys are usage errors."""
    import train
    from cifar_core import distill
    seen = {}
    monkeypatch.setattr(distill, "distill_pair", lambda data, out, *a, base=None, teacher_tta=None, **kw:
                        seen.update(base=base, teacher_tta=teacher_tta) or {})
    monkeypatch.setattr("cifar_core.data.load_cifar10", lambda data=None: None)
    assert train.main(["distill", "--set", "lr=1.0", "--set", "augment.translate=4"]) == 0
    assert seen["base"].lr == 1.0 and seen["base"].augment.translate == 4
    assert seen["base"].augment.views == 0 and seen["teacher_tta"] == 1
    # consistent teaching: the plan reaches both twins, and the teacher labels each view as shown
    assert train.main(["distill", "--views", "8"]) == 0
    assert seen["base"].augment.views == 8 and seen["teacher_tta"] == 0
    # function matching: planned mixup reaches both twins
    assert train.main(["distill", "--views", "2", "--mix", "mixup"]) == 0
    assert seen["base"].augment.mix == "mixup" and seen["base"].augment.views == 2
    for bad in (["--set", "no_such_field=1"], ["--views", "8", "--teacher-tta", "1"], ["--views", "-2"],
                ["--mix", "mixup"], ["--views", "2", "--set", "augment.cutout=8"]):  # targets the teacher can't give
        with pytest.raises(SystemExit):
            train.main(["distill", *bad])


def test_distill_cli_flags_are_named_as_the_config_fields(monkeypatch, capsys):
    """--distill-alpha/--distill-temperature reach distill_pair (a bare 'temperature' is the calibration one);
    the short spellings of earlier releases still parse; an alpha outside (0, 1] is a usage error naming the flag."""
    import train
    from cifar_core import distill
    seen = []
    monkeypatch.setattr(distill, "distill_pair", lambda data, out, student, epochs, seed, alpha, temperature, *a, **kw:
                        seen.append((alpha, temperature)) or {})
    monkeypatch.setattr("cifar_core.data.load_cifar10", lambda data=None: None)
    assert train.main(["distill", "--distill-alpha", "0.7", "--distill-temperature", "4"]) == 0
    assert train.main(["distill", "--alpha", "0.25", "--temperature", "2"]) == 0
    assert seen == [(0.7, 4.0), (0.25, 2.0)]
    with pytest.raises(SystemExit):
        train.main(["distill", "--distill-alpha", "0"])
    assert "--distill-alpha must be in (0, 1]" in capsys.readouterr().err


def test_finished_twin_is_reused_only_for_the_same_config_and_data(tmp_path):
    from dataclasses import replace
    from types import SimpleNamespace

    from cifar_core.checkpoint import save_checkpoint
    from cifar_core.data import CLASSES
    from cifar_core.distill import finished_run
    from cifar_core.models import create_model
    model = create_model("cifar_cnn_small")
    cfg = TrainConfig(model="cifar_cnn_small", epochs=2, data="/somewhere/cifar10")
    save_checkpoint(tmp_path / "twin", model, {
        "model": "cifar_cnn_small", "model_kwargs": model.model_kwargs, "classes": list(CLASSES),
        "spec": model.spec.to_dict(), "train_config": cfg.to_dict(), "data": {"fingerprint": "abc"},
        "metrics": {"test": {"accuracy": 0.5}}, "history": []})
    same_data = SimpleNamespace(fingerprint="abc")
    # the same images given by another path (or by $CIFAR10_DIR) are the same data
    assert finished_run(tmp_path / "twin", replace(cfg, data=None, progress=False), same_data).metrics["test"]
    assert finished_run(tmp_path / "twin", cfg, SimpleNamespace(fingerprint="other")) is None
    assert finished_run(tmp_path / "twin", replace(cfg, lr=1.0), same_data) is None
    assert finished_run(tmp_path / "nothing", cfg, same_data) is None


def test_distill_pair_refuses_augmentations_the_teacher_cannot_follow_before_labelling(tmp_path):
    """The config is checked first: no teacher is loaded (there is none here) and nothing is written."""
    from types import SimpleNamespace

    from cifar_core.distill import distill_pair
    for augment in (AugmentConfig(mix="cutmix"), AugmentConfig(views=2, cutout=8)):
        with pytest.raises(ValueError, match="do not combine"):
            distill_pair(SimpleNamespace(), tmp_path / "out", teacher_root=tmp_path / "no_teacher", teacher_tta=0,
                         base=TrainConfig(augment=augment))
    assert not (tmp_path / "out").exists()


def test_teacher_on_train_measures_how_close_the_targets_are_to_the_labels():
    from cifar_core.distill import teacher_on_train
    labels = torch.tensor([0, 1, 2, 3])
    idx = torch.tensor([0, 1, 2])  # row 3 is not a training image: its NaNs must not count
    probs = torch.full((4, 4), 0.1)
    probs[torch.arange(4), labels] = 0.7
    probs[2] = torch.tensor([0.1, 0.7, 0.1, 0.1])  # image 2 (class 2) is called class 1
    logits = probs.log()
    logits[3] = float("nan")
    stats = teacher_on_train(logits, labels, idx)
    assert stats["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    assert stats["true_class_probability"] == pytest.approx((0.7 + 0.7 + 0.1) / 3, abs=1e-4)
    assert stats["entropy_nats"] == pytest.approx(-(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1)), abs=1e-4)
    views = teacher_on_train(torch.stack([logits, logits]), labels, idx)  # V x N x C: every view counts
    assert views["rows"] == 6 and views["accuracy"] == stats["accuracy"]


def test_fold_runs_partition_the_training_rows(cifar):
    from cifar_core.data import make_split
    from cifar_core.engine import held_out_rows, training_rows
    split = make_split(cifar, "seed", 0)
    cfgs = [TrainConfig(folds=3, fold=k) for k in range(3)]
    held = [held_out_rows(cifar, c) for c in cfgs]
    assert sum(len(h) for h in held) == len(split.train)
    assert torch.equal(torch.cat(held).sort().values, split.train.sort().values)  # every row in exactly one fold
    for c, h in zip(cfgs, held):
        rows = training_rows(cifar, c)
        assert len(rows) + len(h) == len(split.train) and not torch.isin(rows, h).any()
        counts = torch.bincount(cifar.labels[h], minlength=10)
        assert counts.max() - counts.min() <= 1  # stratified: each class dealt round-robin
    # the folds are fixed by the split, not by the run's seed: every fold's run agrees on them
    assert torch.equal(held_out_rows(cifar, replace(cfgs[0], seed=5)), held[0])
    for bad in (TrainConfig(folds=1), TrainConfig(folds=2, fold=2), TrainConfig(folds=2, train_subset=100)):
        with pytest.raises(ValueError, match="fold"):
            training_rows(cifar, bad)
    with pytest.raises(ValueError, match="not trained on folds"):
        held_out_rows(cifar, TrainConfig())


def test_cross_fitted_teacher_labels_each_row_with_the_model_that_held_it_out(cifar):
    from cifar_core.distill import teacher_identity, teacher_logits
    from cifar_core.engine import held_out_rows
    from cifar_core.ensemble import Ensemble, Member
    from cifar_core.models import create_model
    from cifar_core.predictor import Predictor

    def fold_member(k, folds=2, **extra):
        torch.manual_seed(k)
        cfg = {**TrainConfig(folds=folds, fold=k).to_dict(), **extra}
        return Member(f"fold{k}", None, {"train_config": cfg, "data": {"fingerprint": cifar.fingerprint}},
                      Predictor(create_model("cifar_cnn_small").eval(), tta=0))

    members = [fold_member(0), fold_member(1)]
    held = [held_out_rows(cifar, TrainConfig(folds=2, fold=k)) for k in range(2)]
    # a few rows of each fold, as a student's training rows
    rows = torch.cat([held[0][:4], held[1][:3]])
    logits = teacher_logits(Ensemble(members), cifar, rows)
    assert torch.isfinite(logits[rows]).all() and int(torch.isfinite(logits[:, 0]).sum()) == len(rows)
    for m, h in zip(members, held):
        mine = h[torch.isin(h, rows)]
        assert torch.allclose(logits[mine].softmax(1), m.predictor.probs(cifar.images[mine]), atol=1e-5)
        other = members[1 - members.index(m)]
        assert not torch.allclose(logits[mine].softmax(1), other.predictor.probs(cifar.images[mine]), atol=1e-3)
    assert teacher_identity(Ensemble(members))["cross_fitted_folds"] == 2
    # a row no fold model held out (a val row) has no out-of-fold target
    from cifar_core.data import make_split
    with pytest.raises(ValueError, match="in no fold"):
        teacher_logits(Ensemble(members), cifar, torch.cat([rows, make_split(cifar, "seed", 0).val[:1]]))
    with pytest.raises(ValueError, match="one checkpoint per fold"):
        teacher_logits(Ensemble(members[:1]), cifar, rows)  # fold 1 missing
    with pytest.raises(ValueError, match="one checkpoint per fold"):
        teacher_logits(Ensemble([members[0], fold_member(1, folds=0)]), cifar, rows)  # an ordinary model mixed in
    with pytest.raises(ValueError, match="one split"):
        teacher_logits(Ensemble([members[0], fold_member(1, split_seed=1)]), cifar, rows)
    with pytest.raises(ValueError, match="no planned views"):
        teacher_logits(Ensemble(members), cifar, rows, AugmentConfig(views=2))


def test_distill_pair_takes_a_folder_of_fold_models_as_a_cross_fitted_teacher(cifar, data_dir, tmp_path):
    import json

    from cifar_core.checkpoint import save_checkpoint
    from cifar_core.data import CLASSES
    from cifar_core.distill import distill_pair
    from cifar_core.models import create_model
    for k in range(2):
        torch.manual_seed(k)
        model = create_model("cifar_cnn_small").eval()
        meta = {"model": "cifar_cnn_small", "model_kwargs": model.model_kwargs, "classes": list(CLASSES),
                "spec": model.spec.to_dict(), "metrics": {"tta": 0}, "data": {"fingerprint": cifar.fingerprint},
                "train_config": TrainConfig(folds=2, fold=k).to_dict()}
        save_checkpoint(tmp_path / "teacher" / f"fold{k}", model, meta, half=False)
    base = TrainConfig(batch_size=100, train_subset=300, data=data_dir, tta=0, lr=1.0)
    distill_pair(cifar, tmp_path / "out", epochs=1, teacher_root=tmp_path / "teacher", teacher_tta=0, base=base,
                 progress=False)
    d = json.loads((tmp_path / "out" / "cifar_cnn_small_distilled" / "meta.json").read_text())["distillation"]
    assert d["cross_fitted_folds"] == 2 and [m["name"] for m in d["members"]] == ["fold0", "fold1"]
    assert d["on_train"]["images"] == 300 and d["on_train"]["accuracy"] < 0.5  # untrained fold models: near chance
