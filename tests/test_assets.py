"""cifar_core/assets.py: the serving core's precomputed decisions (issue 22 moved them out of demo/)."""
import numpy as np
import torch

from cifar_core.assets import choose_mistakes, compute_assets


def test_mistakes_are_the_most_confident_wrong_per_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    #                          right  wrong 0.9  wrong 0.6  wrong 0.8  right  wrong 0.7
    probs = torch.zeros(6, 10)
    for i, (cls, p) in enumerate([(0, 0.9), (1, 0.9), (2, 0.6), (3, 0.8), (1, 0.9), (0, 0.7)]):
        probs[i, cls] = p
        probs[i, 9] = 1 - p
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 2, 2).contiguous()
    m = choose_mistakes(images, labels, probs, indices=torch.arange(100, 106), per_class=1)
    assert m["labels"].tolist() == [0, 1, 2]            # one per true class, class order
    assert m["dataset_index"].tolist() == [101, 103, 105]  # class 0: the 0.9 mistake, not the 0.6 one
    assert m["predictions"].tolist() == [1, 3, 0]
    assert np.allclose(m["confidence"], [0.9, 0.8, 0.7])
    assert m["images"][:, 0, 0, 0].tolist() == [1, 3, 5]


class _Split:
    name, seed = "seed", 0
    fingerprint = "f"
    train = torch.arange(0, 100)
    val = torch.arange(100, 150)
    test = torch.arange(150, 200)


def _tiny_lab():
    """A real (untrained) one-model zoo, not saved to disk."""
    from types import SimpleNamespace
    from cifar_core.ensemble import Ensemble, Member
    from cifar_core.models import create_model
    from cifar_core.predictor import Predictor
    torch.manual_seed(0)
    members = [Member("m", None, {}, Predictor(create_model("cifar_cnn"), name="m"))]
    return SimpleNamespace(members=members, names=["m"], ensemble=Ensemble(members), edge={})


def test_compute_assets_fits_the_detector_records_metrics_and_mistakes():
    g = torch.Generator().manual_seed(0)

    class Data:
        images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g)
        labels = torch.arange(200) % 10
    lab = _tiny_lab()
    assets, mistakes, tensors = compute_assets(lab, Data(), _Split(), photos={"x.png": Data.images[1]},
                                               progress=False, ood_method="mahalanobis", train_per_class=8)
    ood = assets["ood"]
    assert ood["method"] == "mahalanobis" and ood["fitted_for"] == [{"name": "m", "saved_at": None}]
    assert ood["fitted_on"].startswith("80 train images (8 per class) and 50 validation images")
    assert ood["threshold"] == 0.05 and ood["file"] == "ood.safetensors"
    assert set(tensors) == {"reference", "0.mu", "0.precision"} and len(tensors["reference"]) == 50
    assert set(ood["example_scores"]) == {"x.png"} and 0 <= ood["example_scores"]["x.png"] <= 1
    # the shipped tensors rebuild the same detector: its validation scores are the stored reference
    from cifar_core.ood import detector_from_state, zoo_outputs
    det = detector_from_state({k: v.float() for k, v in tensors.items()}, ood["detector"])
    val = zoo_outputs(lab.members, Data.images[_Split.val])
    torch.testing.assert_close(det.outlier_score(val).sort().values, tensors["reference"], atol=1e-4, rtol=1e-4)
    wrong = int((lab.ensemble.probs(Data.images[_Split.test]).argmax(1) != Data.labels[_Split.test]).sum())
    assert assets["mistakes"]["total_wrong"] == wrong and assets["ensemble_test"]["n"] == 50
    assert len(mistakes["labels"]) == min(wrong, 400)


def test_edge_only_rebuild_replaces_the_edge_record_and_keeps_the_rest(tmp_path):
    """`python -m demo.build_assets --edge-only`: after re-exporting an edge model, only assets.json's "edge"
    changes; the ensemble's records stay; another split or no assets.json at all is refused by name."""
    import json
    from types import SimpleNamespace

    import pytest

    from demo.build_assets import update_edge
    path = tmp_path / "assets.json"
    old = {"built_at": "then", "split": {"fingerprint": "abc"}, "ood": {"threshold": 0.05},
           "edge": {"old-int8": {"accuracy": 0.8}}}
    path.write_text(json.dumps(old))
    new = {"new-int8": {"accuracy": 0.88, "ms": 0.25}}
    update_edge(path, new, SimpleNamespace(fingerprint="abc"), "python -m demo.build_assets --edge-only")
    written = json.loads(path.read_text())
    assert written["edge"] == new
    assert {k: written[k] for k in old if k != "edge"} == {k: old[k] for k in old if k != "edge"}
    assert written["edge_built"]["command"].endswith("--edge-only") and written["edge_built"]["at"]
    with pytest.raises(SystemExit, match="another split"):
        update_edge(path, {}, SimpleNamespace(fingerprint="xyz"), "c")
    assert json.loads(path.read_text())["edge"] == new  # a refusal leaves the file as it was
    with pytest.raises(SystemExit, match="run a full build first"):
        update_edge(tmp_path / "missing.json", new, SimpleNamespace(fingerprint="abc"), "c")
    assert not (tmp_path / "missing.json").exists()
