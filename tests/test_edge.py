"""The edge models' measured numbers and the default they choose: the best accuracy per millisecond of the
files actually loaded, stated in the UI; the smallest file when nothing was measured for them."""
import json
from pathlib import Path

import pytest
import torch

from cifar_core.edge import best_per_ms, file_digest, load_edge_models, measure, measured
from cifar_core.serving import Lab
from demo.testing import make_fake_zoo

EXPORTS = Path(__file__).resolve().parent.parent / "exports"   # the shipped int8 ONNX edge models
STUDENT, CNN = "cifar_cnn_small_distilled-int8", "cifar_cnn-int8"


@pytest.fixture(scope="module")
def models():
    return {m.name: m for m in load_edge_models(EXPORTS)}


def record(models, name, accuracy, ms):
    return {"accuracy": accuracy, "n": 6000, "ms": ms, "repeats": 200, "threads": 1,
            "accuracy_per_ms": round(100 * accuracy / ms, 2), "sha1": file_digest(models[name].path)}


def test_measure_reports_accuracy_latency_and_the_file_it_measured(models):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    model = models[STUDENT]
    labels = model.predictor.probs(images).argmax(1)
    labels[:10] = (labels[:10] + 1) % 10  # 30 of 40 right, by construction
    r = measure(model, images, labels, repeats=5)
    assert r["accuracy"] == pytest.approx(0.75) and r["n"] == 40 and r["repeats"] == 5 and r["ms"] > 0
    assert r["accuracy_per_ms"] == pytest.approx(100 * r["accuracy"] / r["ms"], rel=1e-2)
    assert r["sha1"] == file_digest(model.path)


def test_the_default_is_the_best_accuracy_per_ms_not_the_smallest_file(models):
    ms = list(models.values())
    assert best_per_ms(ms, {}).name == STUDENT  # nothing measured: the smallest file
    slow_student = {STUDENT: record(models, STUDENT, 0.85, 2.0), CNN: record(models, CNN, 0.89, 0.8)}
    assert best_per_ms(ms, measured(ms, slow_student)).name == CNN
    fast_student = {STUDENT: record(models, STUDENT, 0.85, 0.25), CNN: record(models, CNN, 0.89, 0.8)}
    assert best_per_ms(ms, measured(ms, fast_student)).name == STUDENT


def test_a_measurement_of_another_file_is_ignored(models):
    ms = list(models.values())
    stale = {CNN: {**record(models, CNN, 0.89, 0.1), "sha1": "0" * 40}, STUDENT: record(models, STUDENT, 0.85, 0.25)}
    assert set(measured(ms, stale)) == {STUDENT}
    assert measured(ms, {CNN: "not a record"}) == {}


def test_the_demo_offers_and_states_the_measured_best(tmp_path, models):
    from demo.tab_classify import classify_edge, edge_choice, serve_info
    zoo = make_fake_zoo(tmp_path / "zoo")
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "assets.json").write_text(json.dumps(
        {"edge": {STUDENT: record(models, STUDENT, 0.852, 2.0), CNN: record(models, CNN, 0.892, 0.8)}}))
    with pytest.warns(UserWarning):  # this assets.json has no OOD detector: the check is off, with a warning
        lab = Lab(zoo, assets_dir=assets, exports=EXPORTS)
    assert lab.default_edge == CNN
    info = serve_info(lab)
    assert f"offered first: {CNN}, the best accuracy per ms" in info and "89.2%" in info and "0.80 ms" in info
    assert edge_choice(lab, STUDENT) == (f"{STUDENT}: 85.2%, 2.00 ms", STUDENT)
    image = torch.zeros(3, 32, 32, dtype=torch.uint8).numpy().transpose(1, 2, 0)
    _, note = classify_edge(lab, image)  # no model named: the default answers
    assert f"⚡ {CNN}" in note and "89.2% of 6,000 test images right, 0.80 ms per image" in note
    assert "offered first" in note


def test_the_shipped_edge_records_are_of_the_shipped_files_and_re_measure(models, cifar):
    """demo/assets/assets.json's "edge" numbers (what the UI states) are of the int8 files shipped beside them:
    the same sha1, and the same accuracy when re-measured on the seed split's test images."""
    from cifar_core.data import make_split
    from cifar_core.paths import DEFAULT_ASSETS
    records = json.loads((DEFAULT_ASSETS / "assets.json").read_text())["edge"]
    assert set(measured(list(models.values()), records)) == set(models)  # every shipped file measured, none stale
    split = make_split(cifar, "seed", 0)
    images, labels = cifar.images[split.test], cifar.labels[split.test]
    for name, record in records.items():
        again = measure(models[name], images, labels, repeats=1)  # the accuracy part is what is compared
        assert record["n"] == again["n"] == len(labels)
        assert again["accuracy"] == pytest.approx(record["accuracy"], abs=0.002), name
