"""Short real-data training runs: the loop learns, resumes exactly, and runs under torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

from cifar_core import engine
from cifar_core.engine import TrainConfig, train
from conftest import ROOT


def quick_config(data_dir, **kw):
    base = dict(model="cifar_cnn_small", epochs=3, batch_size=200, train_subset=2000, data=data_dir,
                progress=False, tta=0, lr=1.0)
    return TrainConfig(**{**base, **kw})


def test_short_run_lowers_the_loss(cifar, data_dir, tmp_path):
    result = train(quick_config(data_dir), out_dir=tmp_path / "run", data=cifar)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0] - 0.2, losses
    assert result.history[-1]["val_acc"] > 0.3  # chance is 0.1
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    from cifar_core.data import make_split
    assert meta["split"]["name"] == "seed"
    assert meta["split"]["fingerprint"] == make_split(cifar, "seed", 0).fingerprint
    assert len(meta["history"]) == 3 and meta["metrics"]["test"]["n"] == 6000
    for name in ("model.safetensors", "meta.json", "history.jsonl", "curves.png", "confusion.png"):
        assert (tmp_path / "run" / name).exists(), name
    assert not (tmp_path / "run" / "resume").exists()


class Interrupt(Exception):
    pass


def test_progressive_resizing_grows_the_side_in_4px_stages_to_full_size():
    cfg = TrainConfig(low_res=20, low_res_fraction=0.6)
    sizes = [engine.train_size(step, 100, cfg, 32) for step in range(100)]
    assert sizes == [20] * 20 + [24] * 20 + [28] * 20 + [32] * 40
    assert {engine.train_size(s, 100, TrainConfig(), 32) for s in range(100)} == {32}  # off by default
    assert engine.train_size(0, 100, TrainConfig(low_res=64, low_res_fraction=0.5), 32) == 32  # never upsample
    wide = TrainConfig(low_res=20, low_res_fraction=0.6, low_res_step=6)  # 20 and 26 px, then 32
    assert [engine.train_size(step, 100, wide, 32) for step in range(100)] == [20] * 30 + [26] * 30 + [32] * 40
    with pytest.raises(ValueError, match="low_res_step"):
        engine.train_size(0, 100, TrainConfig(low_res=20, low_res_fraction=0.6, low_res_step=0), 32)


def test_progressive_run_trains_small_then_full_size(cifar, data_dir, tmp_path):
    result = train(quick_config(data_dir, low_res=24, low_res_fraction=0.67), data=cifar)
    assert [h["train_size"] for h in result.history] == [24, 28, 32]
    assert result.history[-1]["val_acc"] > 0.3


def test_stem_bias_learns_only_for_its_fraction_of_the_steps(cifar, data_dir):
    assert [engine.stem_bias_trains(s, 10, TrainConfig(stem_bias_fraction=0.3)) for s in range(10)] == \
        [True] * 3 + [False] * 7
    # the stem's bias starts at zero: frozen from the first step it stays there, otherwise it learns
    frozen = train(quick_config(data_dir, epochs=1, stem_bias_fraction=0.0), data=cifar)
    assert not frozen.model.whiten.bias.any() and frozen.history[-1]["val_acc"] > 0.25
    learning = train(quick_config(data_dir, epochs=1, stem_bias_fraction=0.5), data=cifar)
    assert learning.model.whiten.bias.abs().max() > 1e-3
    with pytest.raises(ValueError, match="whitening stem"):
        train(quick_config(data_dir, model="vit_cifar", stem_bias_fraction=0.5), data=cifar)


def test_resume_after_a_kill_continues_the_same_run(cifar, data_dir, tmp_path, monkeypatch):
    cfg = quick_config(data_dir, epochs=2, train_subset=1000)
    reference = train(cfg, out_dir=tmp_path / "ref", data=cifar)

    real_progress = engine._progress

    def dying_progress(total, desc, enabled):
        bar = real_progress(total, desc, False)
        if desc.startswith("epoch 2"):
            def update(n):
                raise Interrupt("killed mid-epoch")
            bar.update = update
        return bar

    monkeypatch.setattr(engine, "_progress", dying_progress)
    with pytest.raises(Interrupt):
        train(cfg, out_dir=tmp_path / "run", data=cifar)
    # The kill left a resume point and no (half-written) checkpoint.
    assert (tmp_path / "run" / "resume" / "state.json").exists()
    assert not (tmp_path / "run" / "model.safetensors").exists()
    monkeypatch.setattr(engine, "_progress", real_progress)

    resumed = train(cfg, out_dir=tmp_path / "run", data=cifar, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    for k, v in reference.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-4), k
    assert abs(resumed.metrics["test"]["accuracy"] - reference.metrics["test"]["accuracy"]) < 0.002


def test_torchrun_two_cpu_processes(data_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           "--model", "cifar_cnn_small", "--epochs", "1", "--train-subset", "800", "--batch-size", "200",
           "--tta", "0", "--no-progress", "--data", data_dir, "--out", str(out),
           "--set", "stem_bias_fraction=0.5"]  # the stem freezes mid-epoch: DDP must be rebuilt without it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["history"][0]["epoch"] == 1 and meta["train_config"]["stem_bias_fraction"] == 0.5
    assert meta["metrics"]["test"]["accuracy"] > 0.1
