"""Fine-tuning from cached frozen stages (cifar_core/frozen.py, TrainConfig.freeze)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from cifar_core import frozen
from cifar_core.augment import AugmentConfig, alternate_flip, flip_choices
from cifar_core.checkpoint import load_checkpoint
from cifar_core.data import make_split
from cifar_core.engine import TrainConfig, train
from cifar_core.models import create_model, list_models
from cifar_core.predictor import Predictor, batch_for, preprocess

FREEZABLE = [n for n in list_models() if n.startswith("tf_efficientnet_lite")]


@pytest.mark.parametrize("name", FREEZABLE)
def test_trunk_after_frozen_part_is_the_whole_model(name):
    torch.manual_seed(0)
    model = create_model(name, input_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        for k in range(-1, len(model.blocks)):
            assert torch.allclose(frozen.Trunk(model, k)(frozen.frozen_part(model, k)(x)), whole, atol=1e-5), k


def test_inference_batches_shrink_with_input_size_and_leave_results_unchanged():
    # Large batches at 192-224 px ran the frozen stages 3x slower on the CPU (runtime.py): the cache
    # build and Predictor size their batches by input pixels instead of a fixed count.
    assert (batch_for(32), batch_for(192), batch_for(224), batch_for(100_000)) == (500, 56, 41, 1)
    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", input_size=96).eval()
    assert Predictor(model).batch_size == batch_for(96) == 227
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    whole, batched = Predictor(model, batch_size=5).logits(images, tta=1), Predictor(model, batch_size=2).logits(images, tta=1)
    assert torch.allclose(whole, batched, atol=1e-4)


def test_freeze_points_and_models_that_cannot_freeze():
    model = create_model("tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="-1 .* to 6, got 7"):
        frozen.check_freezable(model, 7, "tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="cifar_cnn is not"):
        frozen.check_freezable(create_model("cifar_cnn"), 2, "cifar_cnn")
    frozen.freeze_model(model, 2)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.3", "blocks.4", "blocks.5", "blocks.6", "conv_head", "bn2", "classifier"}


@pytest.mark.parametrize("change,field", [
    ({"augment": AugmentConfig(translate=2)}, "augment.translate=0"),
    ({"augment": AugmentConfig(translate=0, cutout=8)}, "augment.cutout=0"),
    ({"low_res": 16, "low_res_fraction": 0.5}, "low_res=0"),
    ({"feature_shift": -1}, "feature_shift must be >= 0"),
    ({"distill_alpha": 0.5}, "distillation"),
])
def test_what_a_cached_run_refuses(change, field):
    cfg = TrainConfig(**{"model": "tf_efficientnet_lite0", "freeze": 2, "augment": AugmentConfig(translate=0),
                         **change})
    with pytest.raises(ValueError, match=field.replace("(", r"\(")):
        frozen.check_config(cfg, create_model("tf_efficientnet_lite0"))


def test_flip_choices_are_the_flips_augment_makes():
    idx = torch.arange(100)
    x = torch.randn(100, 3, 4, 4)
    for epoch in (0, 1):
        mask = flip_choices(100, AugmentConfig(), None, idx, epoch, seed=3)
        assert torch.equal(alternate_flip(x, idx, epoch, seed=3), torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x))
    assert flip_choices(5, AugmentConfig(flip=False), None, idx[:5], 0, 0) is None


@pytest.fixture()
def feature_root(tmp_path, monkeypatch):
    monkeypatch.setattr(frozen, "cache_dir", lambda: tmp_path)
    return tmp_path / "features"


def test_cache_holds_both_views_is_reused_and_keyed(cifar, feature_root):
    model = create_model("tf_efficientnet_lite0", input_size=32).eval()
    train_idx, val_idx = torch.arange(0, 40), torch.arange(100, 120)
    cache = frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 2, torch.device("cpu"), progress=False)
    assert not cache.reused and cache.path.parent == feature_root
    assert [a.shape for a in cache.train] == [(40, 40, 4, 4)] * 2 and cache.val.shape == (20, 40, 4, 4)
    assert cache.train[0].dtype == np.float16 and cache.nbytes == 100 * 40 * 16 * 2
    x = preprocess(cifar.images[train_idx[:5]], model.spec)
    with torch.no_grad():
        part = frozen.frozen_part(model, 2)
        assert torch.allclose(torch.from_numpy(np.array(cache.train[0][:5])).float(), part(x), atol=2e-2)
        assert torch.allclose(torch.from_numpy(np.array(cache.train[1][:5])).float(), part(x.flip(-1)), atol=2e-2)
    batch = cache.train_batch(torch.tensor([3, 1]), torch.tensor([True, False]), torch.device("cpu"))
    assert torch.equal(batch[0], torch.from_numpy(np.asarray(cache.train[1][3], dtype=np.float32)))
    assert torch.equal(batch[1], torch.from_numpy(np.asarray(cache.train[0][1], dtype=np.float32)))

    again = frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 2, torch.device("cpu"), progress=False)
    assert again.reused and again.path == cache.path and again.seconds == 0
    other = [frozen.load_or_build(model, 1, cifar, train_idx, val_idx, 2, torch.device("cpu"), progress=False),
             frozen.load_or_build(model, 2, cifar, train_idx[:30], val_idx, 2, torch.device("cpu"), progress=False),
             frozen.load_or_build(create_model("tf_efficientnet_lite0", input_size=64), 2, cifar, train_idx, val_idx,
                                  2, torch.device("cpu"), progress=False)]
    with torch.no_grad():
        model.blocks[0][0].conv_dw.weight.mul_(2)  # other weights: other activations
    other.append(frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 2, torch.device("cpu"), progress=False))
    assert len({c.path for c in [cache, *other]}) == 5 and not any(c.reused for c in other)
    assert json.loads((cache.path / "key.json").read_text())["key"]["freeze"] == 2


def test_a_run_without_the_flip_reads_the_mirrored_cache(cifar, feature_root):
    model = create_model("tf_efficientnet_lite0", input_size=32).eval()
    train_idx, val_idx = torch.arange(0, 40), torch.arange(100, 120)
    cpu = torch.device("cpu")
    own = frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 1, cpu, progress=False)
    assert not own.reused and len(own.train) == 1  # nothing wider yet: a cache of its own
    both = frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 2, cpu, progress=False)
    assert not both.reused and both.path != own.path  # one view never stands in for two
    shutil.rmtree(own.path)
    one = frozen.load_or_build(model, 2, cifar, train_idx, val_idx, 1, cpu, progress=False)
    assert one.reused and one.path == both.path and one.seconds == 0 and one.key["views"] == ["identity", "flip"]
    assert len(one.train) == 1 and np.array_equal(np.asarray(one.train[0]), np.asarray(both.train[0]))
    assert np.array_equal(np.asarray(one.val), np.asarray(both.val))
    assert sorted(p.name for p in feature_root.iterdir()) == [both.path.name]  # nothing else was written


def test_a_killed_build_leaves_no_cache_and_its_leftovers_are_removed(cifar, feature_root, monkeypatch):
    model = create_model("tf_efficientnet_lite0", input_size=32).eval()
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second array: the first is already on disk
            raise KeyboardInterrupt

    real = frozen._compute
    monkeypatch.setattr(frozen, "_compute", dies)
    with pytest.raises(KeyboardInterrupt):
        frozen.load_or_build(model, 2, cifar, torch.arange(10), torch.arange(10, 20), 2, torch.device("cpu"),
                             progress=False)
    assert [p.name for p in feature_root.iterdir() if "partial" not in p.name] == []  # nothing looks complete
    dead = feature_root / "0123.partial-999999999"  # a folder left by a process that no longer exists
    dead.mkdir()
    os.rename(next(p for p in feature_root.iterdir() if "partial" in p.name and p != dead),
              feature_root / "abcd.partial-999999998")
    monkeypatch.setattr(frozen, "_compute", real)
    cache = frozen.load_or_build(model, 2, cifar, torch.arange(10), torch.arange(10, 20), 2, torch.device("cpu"),
                                 progress=False)
    assert sorted(p.name for p in feature_root.iterdir()) == [cache.path.name]


def test_cached_run_trains_only_the_trunk_and_saves_a_whole_model(cifar, data_dir, feature_root, tmp_path):
    cfg = TrainConfig(model="tf_efficientnet_lite0", pretrained=True, input_size=64, freeze=2, epochs=3,
                      batch_size=100, train_subset=2000, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                      norm_bias_lr_scale=1.0, label_smoothing=0.1, schedule="cosine", lookahead=False, tta=0,
                      feature_shift=1, augment=AugmentConfig(translate=0), data=data_dir, progress=False)
    start = create_model("tf_efficientnet_lite0", pretrained=True).state_dict()
    out = tmp_path / "run"
    result = train(cfg, out_dir=out, data=cifar)
    state = result.model.state_dict()
    frozen_keys = [k for k in state if k.startswith(("conv_stem", "bn1", "blocks.0", "blocks.1", "blocks.2"))]
    assert frozen_keys and all(torch.equal(state[k].float(), start[k].half().float()) for k in frozen_keys)
    assert not torch.equal(state["blocks.3.0.conv_pw.weight"].float(), start["blocks.3.0.conv_pw.weight"].half().float())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["test"]["accuracy"] > 0.3  # chance is 0.1

    meta = json.loads((out / "meta.json").read_text())
    assert meta["train_config"]["freeze"] == 2 and meta["train_config"]["feature_shift"] == 1
    fc = meta["feature_cache"]
    assert fc["freeze"] == 2 and fc["bytes"] == (2 * 2000 + 6000) * 40 * 8 * 8 * 2 and fc["reused"] is False
    assert (feature_root / fc["key"] / "key.json").exists()
    wall = meta["wall_time"]
    assert wall["total_s"] >= wall["cache_s"] + wall["train_s"] > 0 and wall["peak_rss_gb"] > 0
    # an ordinary checkpoint: loads without any notion of freezing and predicts as the run measured
    model, _ = load_checkpoint(out)
    split = make_split(cifar, "seed", 0)
    probs = Predictor(model, tta=0).probs(cifar.images[split.test[:200]])
    ours = Predictor(result.model, tta=0).probs(cifar.images[split.test[:200]])
    assert torch.allclose(probs, ours, atol=1e-5)

    again = train(cfg, data=cifar)  # the next run with the same key reuses the cache
    assert again.metrics["test"]["accuracy"] == pytest.approx(result.metrics["test"]["accuracy"], abs=0.02)


def test_every_swept_configuration_is_a_valid_cached_run():
    from conftest import load_benchmark
    bench = load_benchmark("transfer_cost")
    models = {}
    for name in bench.CONFIGS:
        cfg = bench.config(name)
        model = models.setdefault(cfg.model, create_model(cfg.model))
        frozen.check_config(cfg, model)
        if name.startswith("abl192_"):  # named by what it switches off: checked below
            continue
        assert ("shift" in name) == (cfg.feature_shift > 0), name  # recorded runs keep their meaning
        assert ("_dp" in name) == bool(cfg.model_kwargs.get("drop_path_rate")), name
    meta = {"train_config": bench.config("l0_192_f2_e6").to_dict(),
            "split": {"sizes": {"train": 48000, "val": 6000, "test": 6000}}}
    rates = {"frozen_img_s": 100.0, "train_img_s": 50.0, "forward_img_s": 200.0}
    # (2 x 48000 + 6000) / 100 + 6 x 48000 / 50 + 12000 x 2 / 200 seconds
    assert bench.estimate_cpu_minutes(meta, rates) == pytest.approx((1020 + 5760 + 120) / 60)


def test_shipped_geometry_ablation_switches_off_one_level2_ingredient_each():
    """abl192_*: the Level 2 recipe at its own geometry and budget, exactly one ingredient off."""
    from conftest import load_benchmark
    from cifar_core.levels import LEVELS
    bench = load_benchmark("transfer_cost")
    recipe = LEVELS[2].config.to_dict()
    expected = {"no_flip": {"augment"}, "no_shift": {"feature_shift"}, "no_drop_path": {"model_kwargs"},
                "constant_lr": {"schedule"}, "no_decay": {"weight_decay"}, "no_smoothing": {"label_smoothing"}}
    names = [n for n in bench.CONFIGS if n.startswith("abl192_")]
    assert sorted(n.removeprefix("abl192_") for n in names) == sorted(expected)
    for name in names:
        cfg = bench.config(name).to_dict()
        changed = {k for k in recipe if cfg[k] != recipe[k]}
        assert changed == expected[name.removeprefix("abl192_")], name
    assert bench.config("abl192_no_flip").augment.flip is False


def test_cost_table_counts_a_reused_cache_at_its_build_time(tmp_path, capsys):
    """A CPU run that found its feature cache built is not cheaper for it: the table adds the build."""
    import json
    from types import SimpleNamespace
    from conftest import load_benchmark
    bench = load_benchmark("transfer_cost")
    for name, cache in (("built", {"reused": False, "built_seconds": 600.0}),
                        ("reused", {"reused": True, "built_seconds": 600.0})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({
            "train_config": bench.config("l0_192_f2_e8_shift2_dp02").to_dict(),
            "hardware": {"device": "cpu", "name": "x86_64"}, "feature_cache": cache,
            "wall_time": {"total_s": 3000.0 + (600.0 if not cache["reused"] else 0.0)},
            "metrics": {"val": {"accuracy": 0.94}, "test": {"accuracy": 0.9398}}}))
    bench.cmd_table(SimpleNamespace(runs=str(tmp_path)))
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "| 60.0 |" in rows["built"] and "| 60.0 (cache reused) |" in rows["reused"]
    assert "| 0.2 |" in rows["reused"]  # the drop-path column


def test_cost_table_against_a_reference_shows_the_differences(tmp_path, capsys):
    """--against: each run's val/test accuracy minus the reference checkpoint's (how the ablation is read)."""
    import json
    from types import SimpleNamespace
    from conftest import load_benchmark
    bench = load_benchmark("transfer_cost")

    def meta(val, test):
        return {"train_config": bench.config("abl192_no_shift").to_dict(),
                "hardware": {"device": "cpu", "name": "x86_64"}, "wall_time": {"total_s": 3600.0},
                "metrics": {"val": {"accuracy": val}, "test": {"accuracy": test}}}
    (tmp_path / "runs" / "abl192_no_shift").mkdir(parents=True)
    (tmp_path / "runs" / "abl192_no_shift" / "meta.json").write_text(json.dumps(meta(0.9400, 0.9350)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "meta.json").write_text(json.dumps(meta(0.9437, 0.9398)))
    bench.cmd_table(SimpleNamespace(runs=str(tmp_path / "runs"), against=str(tmp_path / "full")))
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[:3]
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["Δ val"] == "-0.37" and cells["Δ test"] == "-0.48" and cells["CPU min"] == "60.0"
    assert "against full (val 94.37%, test 93.98%)" in out
