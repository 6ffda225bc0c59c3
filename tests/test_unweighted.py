"""A member whose fitted weight is 0 (below ensemble.MIN_WEIGHT) is not computed on the ensemble path, and stays
visible, labelled "not weighted", wherever members are shown one by one: Compare, Grad-CAM, the Metrics card,
the REST API when asked for by name."""
import warnings

import numpy as np
import pytest
import torch

from cifar_core.ensemble import FIT_FILE, fit_identity, load_zoo, write_fit
from cifar_core.serving import Lab
from demo.testing import make_fake_zoo


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    zoo = make_fake_zoo(tmp_path_factory.mktemp("zoo"))
    members = load_zoo(zoo)
    write_fit({"format": 1, "temperature": 1.0, "members": [{**m, "weight": w} for m, w in
                                                           zip(fit_identity(members), (1.0, 0.0))]}, zoo / FIT_FILE)
    assets = tmp_path_factory.mktemp("assets")  # no assets.json: no OOD check (a warning says so)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Lab(zoo, assets_dir=assets)


def image(seed):
    return torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_the_ensemble_path_never_runs_the_unweighted_member(lab, monkeypatch):
    assert lab.names == ["fake_0", "fake_1"] and lab.weighted_names == ["fake_0"]
    assert lab.label("fake_1") == "fake_1 (not weighted)" and lab.label("fake_0") == "fake_0"
    idle = lab.by_name["fake_1"].predictor
    with monkeypatch.context() as m:
        for method in ("probs", "logits", "logits_and_features"):
            m.setattr(idle, method, refuse)
        pred = lab.predict(image(0))
    assert list(pred.members) == ["fake_0"]
    np.testing.assert_allclose(pred.probs, pred.members["fake_0"], rtol=1e-5, atol=1e-6)  # weight 1: its answer
    every = lab.predict(image(0), every_member=True)
    assert list(every.members) == ["fake_0", "fake_1"] and set(every.seconds) == {"fake_0", "fake_1"}
    np.testing.assert_allclose(every.members["fake_1"], idle.probs(image(0)[None])[0].numpy(), rtol=1e-5, atol=1e-6)
    assert every.probs is pred.probs  # the ensemble's answer is the cached one
    assert list(lab.predict(image(0)).members) == ["fake_0"]  # the cached prediction is untouched


def test_compare_gradcam_and_metrics_show_it_labelled(lab):
    from demo.tab_classify import compare_models
    from demo.tab_metrics import ensemble_card
    upload = image(1).permute(1, 2, 0).numpy()
    _, table = compare_models(lab, upload, 3)
    assert list(table["model"]) == ["fake_0", "fake_1 (not weighted)", "ensemble"]
    tiles = lab.explain(image(1), lab.names, "gradcam", None)
    captions = [c for _, c in tiles]
    assert captions[0].startswith("fake_0: ") and captions[1].startswith("fake_1 (not weighted): ")
    assert captions[2].startswith("ensemble: ")  # the weighted members' map
    assert len(lab.explain(image(1), ["fake_1"], "gradcam", None)) == 1  # alone it has no ensemble map
    assert "fake_1 (not weighted: its fitted weight was below 0.05" in ensemble_card(lab)


def refuse(*args, **kwargs):
    raise AssertionError("the unweighted member was computed for the ensemble's answer")


def test_rest_answers_list_the_weighted_members_and_answer_for_the_other_by_name(lab, monkeypatch):
    from api.service import ApiService
    service = ApiService(lab)
    with monkeypatch.context() as m:
        for method in ("probs", "logits", "logits_and_features"):
            m.setattr(lab.by_name["fake_1"].predictor, method, refuse)
        answer = service.predict(image(2), "ensemble", 3)
    assert [m["name"] for m in answer["members"]] == ["fake_0"]
    alone = service.predict(image(2), "fake_1", 3)
    assert [m["name"] for m in alone["members"]] == ["fake_1"]
    assert alone["prediction"]["label"] in answer["probabilities"]
    models = service.models()["ensemble"]
    assert models["weighted"] == ["fake_0"] and models["weights"] == [1.0, 0.0]


def test_the_distillation_teacher_leaves_the_unweighted_member_out(lab):
    from cifar_core.distill import teacher_ensemble
    teacher = teacher_ensemble(lab.root, tta=0)
    assert [m.name for m in teacher.members] == ["fake_0"] and teacher.weights == [1.0]


def test_the_teacher_without_a_folder_is_the_zoo_the_environment_names(lab, monkeypatch):
    """`train.py distill` without --teacher: the zoo of $CIFAR_CHECKPOINTS (else checkpoints/), as everywhere."""
    from cifar_core.distill import teacher_ensemble
    from cifar_core.paths import CHECKPOINTS_ENV
    monkeypatch.setenv(CHECKPOINTS_ENV, str(lab.root))
    teacher = teacher_ensemble(tta=0)
    assert [m.name for m in teacher.members] == ["fake_0"] and teacher.weights == [1.0]


def test_weighted_only_is_the_same_ensemble_without_the_unweighted_member(lab):
    images = torch.stack([image(s) for s in range(4)])
    ens = lab.ensemble.weighted_only()
    assert [m.name for m in ens.members] == ["fake_0"] and ens.weights == [1.0]
    assert ens.temperature == lab.ensemble.temperature
    assert torch.allclose(ens.probs(images), lab.ensemble.probs(images), atol=1e-6)
