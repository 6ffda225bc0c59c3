"""The shipped checkpoint: its meta.json numbers are what the evaluation reproduces, on real data."""
import pytest

from cifar_core.checkpoint import load_checkpoint
from cifar_core.data import make_split
from cifar_core.evaluate import evaluate_predictor
from cifar_core.predictor import Predictor
from conftest import ROOT

SHIPPED = ROOT / "checkpoints" / "cifar_cnn"


@pytest.fixture(scope="module")
def shipped():
    if not (SHIPPED / "meta.json").exists():
        pytest.fail(f"{SHIPPED} is missing: the repository must ship the custom CNN checkpoint")
    return load_checkpoint(SHIPPED)


def test_meta_is_complete(shipped):
    _, meta = shipped
    for key in ("model", "model_kwargs", "spec", "classes", "input_size", "mean", "std", "train_config",
                "split", "data", "metrics", "history", "code_version", "saved_at", "command"):
        assert key in meta, key
    assert meta["split"]["name"] == "seed" and meta["split"]["sizes"] == {"train": 48000, "val": 6000, "test": 6000}
    assert meta["weights_dtype"] == "float16"
    assert (SHIPPED / "curves.png").exists() and (SHIPPED / "confusion.png").exists()


def test_test_accuracy_matches_meta(shipped, cifar):
    model, meta = shipped
    split = make_split(cifar, meta["split"]["name"], meta["split"]["seed"])
    assert split.fingerprint == meta["split"]["fingerprint"], "the split changed since the checkpoint was trained"
    predictor = Predictor(model, tta=meta["metrics"]["tta"], temperature=meta.get("temperature", 1.0))
    result = evaluate_predictor(predictor, cifar.images[split.test], cifar.labels[split.test])
    recorded = meta["metrics"]["test"]
    assert abs(result["accuracy"] - recorded["accuracy"]) <= 0.001, (result["accuracy"], recorded["accuracy"])
    assert abs(result["nll"] - recorded["nll"]) <= 0.01
    assert recorded["accuracy"] >= 0.88, "the shipped CNN must reach 88% test accuracy on the seed split"
