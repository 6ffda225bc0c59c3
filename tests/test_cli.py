"""The CLI's errors: clear, naming the problem, exit status 2, no traceback."""
import subprocess
import sys

import pytest

from conftest import ROOT


def run(*args, env_extra=None):
    import os
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize("args,message", [
    (["--epochs", "-1"], "--epochs: must be > 0"),
    (["--batch-size", "many"], "--batch-size: expected a whole number"),
    (["--model", "alexnet"], "invalid choice: 'alexnet'"),
    (["--split", "random"], "invalid choice: 'random'"),
    (["--level", "9"], "there is no level 9"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["--set", "epochs=abc"], "--set epochs=abc: expected float"),
    (["--set", "augment.flip=3"], "expected bool"),
    (["--set", "augment.nope=1"], "unknown field 'nope'"),
    (["--set", "epochs"], "--set expects KEY=VALUE"),
    (["--pretrained", "pypi"], "invalid choice: 'pypi'"),
    (["--device", "cuda:7", "--epochs", "0.01"], "no CUDA GPU"),
    (["--freeze", "2"], "freeze needs a model built from a stem and stages"),  # cifar_cnn has none
    (["--model", "tf_efficientnet_lite0", "--freeze", "9"], "-1 (the stem alone) to 6, got 9"),
    (["--model", "tf_efficientnet_lite0", "--freeze", "2"], "set augment.translate=0"),
])
def test_bad_flags(args, message, capsys):
    """In this process (train.main is the program; a subprocess per case cost ~2 s of imports each): a usage
    error exits 2 with the message; any other exception would escape here as a traceback and fail the test."""
    import train
    with pytest.raises(SystemExit) as exit_:
        train.main(list(args))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err


def test_bad_flag_as_a_program():
    """The same contract through the real entry point: exit status 2, the message, no traceback."""
    r = run("--epochs", "-1")
    assert r.returncode == 2 and "--epochs: must be > 0" in r.stderr and "Traceback" not in r.stderr


def test_missing_data_names_both_options(tmp_path):
    r = run("--epochs", "1", "--out", str(tmp_path / "out"), env_extra={"CIFAR10_DIR": str(tmp_path / "nowhere")})
    assert r.returncode == 2
    assert "nowhere (from $CIFAR10_DIR)" in r.stderr and "--data" in r.stderr
    assert "cifar-10-batches-py" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_bad_checkpoint(tmp_path):
    (tmp_path / "ck").mkdir()
    r = run("evaluate", str(tmp_path / "ck"))
    assert r.returncode == 2 and "no meta.json" in r.stderr and "Traceback" not in r.stderr


def test_models_lists_registry():
    r = run("models")
    assert r.returncode == 0
    for name in ("cifar_cnn", "resnet50", "efficientnet_b0", "vit_tiny_patch16_224", "tf_efficientnet_lite0"):
        assert name in r.stdout
