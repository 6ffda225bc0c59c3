"""The served fast path gives the reference numbers: TTA views stacked into one forward pass must match
one pass per view (the reference path) for every registered model, logits and classifier features alike."""
import pytest
import torch

from cifar_core.models import create_model, list_models
from cifar_core.predictor import Predictor


def both_paths(predictor: Predictor, images: torch.Tensor, tta: int):
    out = {}
    for fuse in (False, True):
        predictor.fuse_views = fuse
        out[fuse] = predictor.logits_and_features(images, tta=tta)
    return out[False], out[True]


@pytest.mark.parametrize("name", list_models())
def test_stacked_tta_views_match_one_pass_per_view(name):
    torch.manual_seed(0)
    predictor = Predictor(create_model(name).eval())
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    for tta in (1, 2):
        (ref_logits, ref_feats), (logits, feats) = both_paths(predictor, images, tta)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(feats, ref_feats, rtol=1e-4, atol=1e-4)
        assert logits.argmax(1).tolist() == ref_logits.argmax(1).tolist()


def test_full_batches_still_run_view_by_view(monkeypatch):
    """At the pixel budget the views are not stacked (evaluation's memory bound holds): the model sees
    batches no larger than batch_size."""
    torch.manual_seed(0)
    model = create_model("cifar_cnn_small").eval()
    predictor = Predictor(model, tta=2, batch_size=6)
    sizes = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(len(args[0])))
    predictor.logits(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert sizes == [4] * 6
    sizes.clear()
    predictor.logits(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8))  # 6 views x 1 image fit
    assert sizes == [6]
