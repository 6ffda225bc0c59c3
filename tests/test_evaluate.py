"""cifar_core/evaluate.py: the calibration numbers the README, the report and the notebook show."""
import pytest
import torch

from cifar_core.evaluate import expected_calibration_error, reliability_bins


def _probs(confidence: float, n: int, right: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n predictions of class 0 at `confidence`; the first `right` are correct."""
    probs = torch.full((n, 10), (1 - confidence) / 9)
    probs[:, 0] = confidence
    labels = torch.ones(n, dtype=torch.long)
    labels[:right] = 0
    return probs, labels


def test_calibrated_predictions_have_zero_ece_and_overconfident_ones_their_gap():
    probs, labels = _probs(0.8, 100, 80)       # 80% sure, 80% right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-6)
    probs, labels = _probs(0.9, 100, 60)       # 90% sure, 60% right
    assert expected_calibration_error(probs, labels) == pytest.approx(0.3, abs=1e-6)


def test_reliability_bins_cover_every_prediction_once():
    a, ya = _probs(0.95, 30, 30)
    b, yb = _probs(0.55, 70, 35)
    bins = reliability_bins(torch.cat([a, b]), torch.cat([ya, yb]), bins=10)
    assert [round(x["share"], 2) for x in bins] == [0.7, 0.3]
    assert [round(x["accuracy"], 2) for x in bins] == [0.5, 1.0]
    assert [round(x["confidence"], 2) for x in bins] == [0.55, 0.95]
