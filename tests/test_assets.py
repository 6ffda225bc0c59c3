"""cifar_core/assets.py: the serving core's precomputed decisions (issue 22 moved them out of demo/)."""
import numpy as np
import torch

from cifar_core.assets import choose_mistakes, compute_assets, ood_threshold


def test_threshold_keeps_the_asked_fraction():
    scores = torch.linspace(0.0, 1.0, 1001)
    t = ood_threshold(scores, keep=0.95)
    assert abs(t - 0.05) < 1e-6
    assert 0.95 <= (scores >= t).float().mean().item() <= 0.951


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
    val = torch.arange(0, 40)
    test = torch.arange(40, 80)


class _Ensemble:
    weights = [1.0]

    def probs(self, images):  # confident on even pixel values, unsure on odd ones; predicts class 0
        p = torch.full((len(images), 10), 0.05)
        p[:, 0] = torch.where(images[:, 0, 0, 0] % 2 == 0, 0.55, 0.1)
        return p / p.sum(1, keepdim=True)


class _Lab:
    names = ["m"]
    ensemble = _Ensemble()


def test_compute_assets_records_threshold_metrics_and_mistakes():
    class Data:
        images = (torch.arange(80) % 256).to(torch.uint8).view(80, 1, 1, 1).expand(80, 3, 2, 2).contiguous()
        labels = torch.arange(80) % 2            # half class 0 (right), half class 1 (wrong)
    assets, mistakes = compute_assets(_Lab(), Data(), _Split(), photos={"x.png": Data.images[1]}, progress=False)
    assert assets["ood"]["chosen_on"] == "validation split, 40 images"
    assert 0 < assets["ood"]["threshold"] < 1 and assets["ood"]["members"] == ["m"]
    assert assets["ensemble_test"]["accuracy"] == 0.5 and assets["mistakes"]["total_wrong"] == 20
    assert (mistakes["labels"] == 1).all() and len(mistakes["labels"]) == 20
    assert set(assets["ood"]["example_scores"]) == {"x.png"}
