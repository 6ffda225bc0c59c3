"""benchmarks/train_speed.py (issue 3): a minuscule real-data run prints its tables and sane FLOP counts.

No timing assertions: the CI machine is shared, so only the structure and the FLOP counts are checked."""
import json

import pytest

from conftest import load_benchmark


def load_script():
    return load_benchmark("train_speed")


def analytic_forward_flops(widths, size=32, classes=10):
    """Convolutions and the head of CifarCNN by hand: 2 FLOPs per multiply-add."""
    side = size - 1                                  # 2x2 whitening conv, no padding: 3 -> 24 channels
    flops = 2 * 24 * 3 * 2 * 2 * side * side
    c_in = 24
    for width in widths:                             # conv (same size) -> pool /2 -> conv
        flops += 2 * width * c_in * 9 * side * side
        side //= 2
        flops += 2 * width * width * 9 * side * side
        c_in = width
    return flops + 2 * widths[-1] * classes


def test_flop_count_of_cifar_cnn_matches_an_analytic_count():
    from cifar_core.engine import TrainConfig
    flops = load_script().count_flops(TrainConfig(model="cifar_cnn"))
    expected = analytic_forward_flops((64, 256, 256))  # about 0.236 GFLOP
    assert expected / 2 < flops["forward_per_image"] < expected * 2, (flops, expected)
    # backward: about twice the forward (no gradient for the frozen stem's weight or the input)
    assert 1.5 * flops["forward_per_image"] < flops["backward_per_image"] < 2.5 * flops["forward_per_image"]
    assert flops["train_per_image"] == pytest.approx(flops["forward_per_image"] + flops["backward_per_image"])


def test_progressive_resizing_flops_weigh_each_side_by_its_images():
    from cifar_core.engine import TrainConfig
    script = load_script()
    plain = TrainConfig(model="cifar_cnn_small", epochs=2, batch_size=100)
    assert script.schedule_flops(plain, 1000) == script.count_flops(plain)
    # half of 20 steps below 32 px: 24 px then 28 px, 5 steps (500 images) each
    cfg = TrainConfig(model="cifar_cnn_small", epochs=2, batch_size=100, low_res=24, low_res_fraction=0.5)
    flops = script.schedule_flops(cfg, 1000)
    assert flops["images_per_size"] == {24: 500, 28: 500, 32: 1000}
    expected = (analytic_forward_flops((32, 64, 128), 24) + analytic_forward_flops((32, 64, 128), 28)
                + 2 * analytic_forward_flops((32, 64, 128), 32)) / 4
    assert flops["forward_per_image"] == pytest.approx(expected, rel=0.05)
    assert flops["forward_per_image"] < script.count_flops(cfg)["forward_per_image"]


def test_a_frozen_stem_bias_spares_exactly_the_first_convs_input_gradient():
    from cifar_core.engine import TrainConfig
    script = load_script()
    cfg = TrainConfig(model="cifar_cnn_small", epochs=2, batch_size=100, stem_bias_fraction=0.25)
    learning, frozen = script.count_flops(cfg), script.count_flops(cfg, stem_frozen=True)
    assert frozen["forward_per_image"] == learning["forward_per_image"]
    # the first conv (24 -> 32 channels, 3x3, on the 31x31 map) no longer back-propagates to its input
    assert learning["backward_per_image"] - frozen["backward_per_image"] == 2 * 32 * 24 * 9 * 31 * 31
    # a quarter of the images train with the stem's bias, three quarters without
    mean = script.schedule_flops(cfg, 1000)
    assert mean["train_per_image"] == pytest.approx(
        (learning["train_per_image"] + 3 * frozen["train_per_image"]) / 4)
    with pytest.raises(ValueError, match="whitening stem.*vit_cifar has none"):
        script.count_flops(TrainConfig(model="vit_cifar"), stem_frozen=True)


def test_recipes_use_the_official_split():
    script = load_script()
    assert {"fast", "long", "muon", "prog"} <= set(script.RECIPES)
    for _, cfg in script.RECIPES.values():
        assert cfg.split == "official"


def test_smoke_run_prints_the_tables(data_dir, tmp_path, capsys):
    script = load_script()
    argv = ["--recipe", "fast", "--seeds", "1", "--model", "cifar_cnn_small", "--epochs", "0.2",
            "--train-subset", "500", "--data", data_dir, "--out", str(tmp_path / "speed"),
            "--json", str(tmp_path / "speed.json"), "--set", "tta=1",
            "--peak-size", "256", "--peak-repeats", "3", "--no-progress"]
    report = script.main(argv)
    out = capsys.readouterr().out

    assert out.splitlines()[0] == "python benchmarks/train_speed.py " + " ".join(argv)
    for columns in (script.SUMMARY_COLUMNS, script.SEED_COLUMNS):
        assert "| " + " | ".join(columns) + " |" in out
    for column in ("test acc % (TTA)", "test acc % (no TTA)", "train min (mean)", "img/s", "fwd GFLOP/img",
                   "train GFLOP/img", "GFLOP/s", "% of matmul peak"):
        assert column in script.SUMMARY_COLUMNS

    (run,) = report["runs"]
    assert run["seed"] == 0 and run["tta"] == 1 and run["test_n"] == 10000  # the official test set
    assert 0 <= run["test_acc_tta"] <= 1 and 0 <= run["test_acc_no_tta"] <= 1
    assert run["train_seconds"] > 0 and run["total_seconds"] >= run["train_seconds"]
    # 0.2 epochs of 500 images at batch 1024 round up to one step of all 500 (from the rounded history)
    assert run["images_per_s"] > 0 and run["train_images"] == pytest.approx(500, abs=10)
    flops = report["flops"]
    expected = analytic_forward_flops((32, 64, 128))
    assert 0 < expected / 2 < flops["forward_per_image"] < expected * 2
    assert flops["train_per_image"] > flops["forward_per_image"]
    assert report["matmul_peak"]["peak_gflops"] > 0

    meta = json.loads((tmp_path / "speed" / "fast" / "seed0" / "meta.json").read_text())
    assert meta["split"]["name"] == "official" and meta["split"]["sizes"]["train"] == 50000
    assert meta["train_config"]["model"] == "cifar_cnn_small" and meta["train_config"]["train_subset"] == 500
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["summary"]["seeds"] == 1 and saved["command"] == report["command"]
