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
