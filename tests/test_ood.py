"""Out-of-distribution detection: the OOD sets, the features the detectors read, and detectors fitted
from data (cifar_core/oodsets.py, cifar_core/ood.py)."""
import numpy as np
import pytest
import torch

from cifar_core.ensemble import Member
from cifar_core.models import create_model, list_models
from cifar_core.models.registry import linear_head
from cifar_core.engine import stratified_subset
from cifar_core.ood import METHODS, auroc_fpr, fit_detector, typicality
from cifar_core.oodsets import GROUPS, build_split, jpeg_roundtrip, load_ood_sets, random_crop
from cifar_core.predictor import Predictor


@pytest.fixture(scope="module")
def ood_sets():
    return load_ood_sets(verbose=False)


def test_ood_sets_are_sized_split_by_source_and_look_like_uploads(ood_sets):
    for split in ("val", "test"):
        s = ood_sets[split]
        assert s["images"].dtype == torch.uint8 and s["images"].shape[1:] == (3, 32, 32)
        assert len(s["images"]) == len(s["group"]) == len(s["source"])
        assert set(s["group"]) == set(GROUPS)
        photos = [src for src, g in zip(s["source"], s["group"]) if g == "photos"]
        assert len(photos) >= 500
        assert {p.split()[0] for p in photos} >= {"scikit-image", "scikit-learn"}  # >= 2 packaged collections
    # the detector is chosen on val and reported on test: no source photo, font or digit in both
    photo_sources = [{src.split("[")[0] for src, g in zip(ood_sets[s]["source"], ood_sets[s]["group"])
                      if g == "photos" and "lfw" not in src} for s in ("val", "test")]
    assert not photo_sources[0] & photo_sources[1]
    drawn = [{src for src, g in zip(ood_sets[s]["source"], ood_sets[s]["group"]) if g == "drawn"}
             for s in ("val", "test")]
    assert not drawn[0] & drawn[1]
    val = {bytes(x.numpy()) for x in ood_sets["val"]["images"]}
    assert not any(bytes(x.numpy()) in val for x in ood_sets["test"]["images"])


def test_photo_uploads_are_the_photos_before_their_reduction(ood_sets):
    """The ImageNet second opinion reads the OOD photos at their own resolution: the same crops, in the same
    order, as the cached 32x32 photos group."""
    from cifar_core.oodsets import as_upload, photo_uploads
    uploads, names = photo_uploads("test")
    n = len(uploads)
    assert ood_sets["test"]["group"][:n] == ["photos"] * n and ood_sets["test"]["source"][:n] == names
    assert torch.equal(torch.stack([as_upload(u) for u in uploads]), ood_sets["test"]["images"][:n])
    assert max(min(u.size) for u in uploads) > 200  # crops of large photos stay large


def test_percentile_rank_puts_any_score_on_one_scale():
    from conftest import load_benchmark
    rank = load_benchmark("ood").percentile_rank
    reference = torch.tensor([3.0, 1.0, 2.0, 4.0])
    assert rank(reference, torch.tensor([0.0, 1.5, 4.5])).tolist() == [0.0, 0.25, 1.0]


def test_ood_sets_are_reproducible(ood_sets):
    """Built from installed packages with fixed seeds: a rebuild gives the cached bytes."""
    again = build_split("val")
    assert torch.equal(again["images"], ood_sets["val"]["images"]) and again["source"] == ood_sets["val"]["source"]


def test_jpeg_roundtrip_and_crops():
    from PIL import Image
    x = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    y = jpeg_roundtrip(x)
    assert y.shape == x.shape and y.dtype == torch.uint8 and not torch.equal(x, y)  # lossy, like the CIFAR copy
    im = Image.new("RGB", (300, 200))
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = random_crop(im, rng)
        assert c.size[0] == c.size[1] and 40 <= c.size[0] <= 200


@pytest.mark.parametrize("name", list_models())
def test_features_are_what_the_classifier_reads(name):
    """Every registered model gives penultimate features from the prediction's own forward pass; the linear
    head maps them (TTA-averaged) back to the logits exactly."""
    torch.manual_seed(0)
    model = create_model(name)
    predictor = Predictor(model, tta=1)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    logits, features = predictor.logits_and_features(images)
    assert torch.equal(logits, predictor.logits(images))
    w, b = linear_head(model)
    assert features.shape == (2, w.shape[1])
    torch.testing.assert_close(features @ w.T + b, logits, atol=1e-4, rtol=1e-4)


class _Identity(torch.nn.Module):
    """A 'model' whose features are its input (2-d points), with a fixed linear head: detectors can be tested
    on known geometry."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.head(x)


def _member(name="m"):
    model = _Identity()
    return Member(name, None, {"saved_at": "x"}, Predictor(model, spec=_spec(), name=name))


def _spec():
    from cifar_core.models.registry import ModelSpec
    return ModelSpec("identity", 32, (0,), (1,), cam_layer="head", family="custom")


def _clusters(n_per_class, generator, spread=0.3):
    centers = torch.eye(8)[:4] * 4
    labels = torch.arange(4).repeat_interleave(n_per_class)
    return centers[labels] + spread * torch.randn(len(labels), 8, generator=generator), labels


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("msp", "energy", "maxlogit")])
def test_feature_detectors_are_fitted_from_data_and_keep_the_stated_rate(method):
    g = torch.Generator().manual_seed(0)
    member = _member()
    train, y = _clusters(200, g)
    val, _ = _clusters(250, g)
    test, _ = _clusters(250, g)
    far = 3 * torch.randn(300, 8, generator=g) + 10  # nowhere near a class centre
    out = lambda z: {"m": (member.predictor.model.head(z).detach(), z)}  # noqa: E731
    det = fit_detector(method, [member], out(train), y, out(val), [1.0], keep=0.95)
    assert det.threshold == pytest.approx(0.05)
    passes = (det.typicality(out(test)) >= det.threshold).float().mean()
    assert 0.9 <= passes <= 0.99           # the stated 95%, within sampling noise of 1000 images
    assert (det.typicality(out(far)) < det.threshold).float().mean() > 0.95
    train2, y2 = _clusters(200, g)
    refit = fit_detector(method, [member], out(train2), y2, out(val), [1.0])
    assert not torch.equal(refit.reference, det.reference)  # nothing hard-coded: new data, new fit


def test_typicality_is_the_share_of_reference_scores_at_least_as_high():
    ref = torch.arange(100, dtype=torch.float).sort().values
    t = typicality(ref, torch.tensor([-1.0, 49.0, 99.0, 1000.0]))
    assert t.tolist() == pytest.approx([1.0, 0.51, 0.01, 0.0])


def test_auroc_and_fpr95_follow_their_definitions():
    id_scores, ood_scores = torch.linspace(0, 1, 100), torch.linspace(2, 3, 50)
    assert auroc_fpr(id_scores, ood_scores) == (1.0, 0.0)
    auroc, fpr = auroc_fpr(ood_scores, id_scores)  # reversed: every OOD image passes
    assert auroc == 0.0 and fpr == 1.0
    both = torch.linspace(0, 1, 200)
    auroc, fpr = auroc_fpr(both[::2], both[1::2])   # interleaved: chance
    assert abs(auroc - 0.5) < 0.02 and 0.9 < fpr <= 1.0


def test_stratified_subset_takes_each_class_equally():
    labels = torch.arange(10).repeat(50)
    idx = stratified_subset(labels, 70, seed=0)   # the one the OOD fit shares with training and export
    assert len(idx) == 70 and torch.bincount(labels[idx]).tolist() == [7] * 10
    assert torch.equal(idx, stratified_subset(labels, 70, seed=0))


# -- the shipped detector (demo/assets), as the serving core uses it ---------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    from cifar_core.serving import Lab
    return Lab()


def test_shipped_detector_passes_cifar_test_images_at_the_stated_rate_and_flags_ood(shipped, ood_sets, cifar):
    from cifar_core.data import make_split
    from cifar_core.ood import zoo_outputs
    det = shipped.ood_detector
    assert det is not None, shipped.ood_problem
    assert shipped.assets["ood"]["keeps_in_distribution"] == 0.95 and det.threshold == pytest.approx(0.05)
    split = make_split(cifar, "seed", 0)
    test = split.test[torch.linspace(0, len(split.test) - 1, 1000).long()]   # every class
    passes = (det.typicality(zoo_outputs(shipped.members, cifar.images[test])) >= det.threshold).float().mean()
    assert 0.92 <= passes <= 0.98, f"{passes:.3f} of CIFAR test images pass; the stated rate is 0.95"
    test_ood = ood_sets["test"]
    synthetic = torch.tensor([g == "synthetic" for g in test_ood["group"]])
    flagged = det.typicality(zoo_outputs(shipped.members, test_ood["images"][synthetic])) < det.threshold
    assert flagged.float().mean() >= 0.9, f"only {flagged.float().mean():.2f} of noise / flat / stripes flagged"


def test_shipped_examples_show_both_cases(shipped):
    scores = shipped.assets["ood"]["example_scores"]
    threshold = shipped.assets["ood"]["threshold"]
    photos = {k: v for k, v in scores.items() if k.startswith("photo_") and "cat" not in k}
    assert any(v < threshold for v in photos.values()), photos          # a non-CIFAR photo is flagged
    cifar = [v for k, v in scores.items() if k.startswith("cifar_")]
    assert sum(v >= threshold for v in cifar) >= 9, scores               # real CIFAR images pass


def test_the_serving_core_answers_with_the_score(shipped):
    from cifar_core.images import decode_for_model
    from cifar_core.paths import DEFAULT_EXAMPLES as EXAMPLES_DIR
    for name in ("cifar_ship.png", "photo_astronaut.jpg"):
        pred = shipped.predict(decode_for_model(EXAMPLES_DIR / name))
        result = shipped.ood_result(pred)
        assert result["available"] and result["threshold"] == pytest.approx(0.05)
        assert result["flagged"] == (result["score"] < result["threshold"])
        assert result["score"] == pytest.approx(shipped.assets["ood"]["example_scores"][name], abs=2e-3)


def test_a_retrained_or_missing_member_makes_the_detector_stale(tmp_path):
    """The detector belongs to the zoo it was fitted on: after a change the demo says so instead of using it."""
    import json
    import shutil
    from cifar_core import paths
    from cifar_core.serving import Lab
    root = tmp_path / "checkpoints"
    shutil.copytree(paths.DEFAULT_CHECKPOINTS, root)
    meta = root / "vit_cifar" / "meta.json"
    record = json.loads(meta.read_text())
    record["saved_at"] = "2030-01-01T00:00:00+00:00"   # as if retrained
    meta.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="stale"):
        lab = Lab(root)
    assert lab.ood_detector is None and "vit_cifar retrained" in lab.ood_problem
    assert "python -m demo.build_assets" in lab.ood_problem
    shutil.rmtree(root / "vit_cifar")
    with pytest.warns(UserWarning, match="stale"):
        lab = Lab(root)
    assert lab.ood_detector is None and "fitted on" in lab.ood_problem
    from cifar_core.images import decode_for_model
    from cifar_core.paths import DEFAULT_EXAMPLES as EXAMPLES_DIR
    from demo.tab_classify import ood_notice
    pred = lab.predict(decode_for_model(EXAMPLES_DIR / "cifar_ship.png"))
    assert pred.ood is None and lab.ood_result(pred) == {"available": False, "problem": lab.ood_problem}
    assert "check off" in ood_notice(lab, pred) and "stale" in ood_notice(lab, pred)


def test_benchmark_counts_the_ood_images_that_get_through_per_source():
    """benchmarks/ood.py's breakdown of what the shipped detector lets through: at the threshold, by source family."""
    from conftest import load_benchmark
    bench = load_benchmark("ood")
    sources = ["scikit-image data.stereo_motorcycle"] * 3 + ["scikit-image data.lfw_subset()[50] (face)",
               "scikit-image data.lfw_subset()[151] (non-face patch)", "scikit-learn load_digits()[5]",
               "scikit-learn load_sample_image('flower.jpg')", "text in matplotlib's DejaVuSansMono.ttf (16 px)"]
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 2.0, 0.5, 0.7])
    rows = bench.passes_by_source(scores, sources, keep_threshold=0.5)
    assert rows == [{"source": "LFW faces and patches", "passed": 2, "of": 2},
                    {"source": "stereo_motorcycle", "passed": 2, "of": 3},
                    {"source": "flower.jpg", "passed": 1, "of": 1}]  # digits and text: none through, left out
    assert bench.passes_by_source(scores, sources, keep_threshold=0.0) == []
