import json
import os

import pytest
import torch

from cifar_core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cifar_core.models import create_model


def meta_for(model):
    return {"model": model.spec.name, "model_kwargs": model.model_kwargs, "classes": [str(i) for i in range(10)],
            "spec": model.spec.to_dict(), "metrics": {}}


@pytest.fixture
def small(tmp_path):
    torch.manual_seed(0)
    model = create_model("cifar_cnn_small")
    model.init_from_data(torch.randn(64, 3, 32, 32))
    with torch.no_grad():  # non-trivial BN statistics
        model.train()(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_round_trip_is_bit_exact_fp32(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small), half=False)
    loaded, meta = load_checkpoint(tmp_path / "ck")
    for (k, a), (k2, b) in zip(small.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(small(x), loaded(x))
    assert meta["weights_dtype"] == "float32" and meta["model"] == "cifar_cnn_small"


def test_fp16_round_trip_equals_half_rounding(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small), half=True)
    loaded, _ = load_checkpoint(tmp_path / "ck")
    for k, v in small.state_dict().items():
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(loaded.state_dict()[k], expected), k


def test_save_leaves_no_temp_files_and_replaces(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    (tmp_path / "ck" / "curves.png").write_bytes(b"png")
    save_checkpoint(tmp_path / "ck", small, {**meta_for(small), "note": "second"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["curves.png", "meta.json", "model.safetensors"]
    assert json.loads((tmp_path / "ck" / "meta.json").read_text())["note"] == "second"


def test_failed_save_keeps_the_old_checkpoint(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    before = (tmp_path / "ck" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError):
        save_checkpoint(tmp_path / "ck", small, {"model": "cifar_cnn_small"})  # meta incomplete
    assert (tmp_path / "ck" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")


def test_missing_meta(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    os.remove(tmp_path / "ck" / "meta.json")
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(tmp_path / "ck")


def test_bad_json(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    (tmp_path / "ck" / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")


def test_truncated_weights(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    path = tmp_path / "ck" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "ck")


def test_pickle_weights_are_refused(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    torch.save(small.state_dict(), tmp_path / "ck" / "model.safetensors")
    with pytest.raises(CheckpointError, match="not safetensors"):
        load_checkpoint(tmp_path / "ck")


def test_architecture_mismatch(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["model_kwargs"] = {"widths": [64, 256, 256]}
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="do not match architecture"):
        load_checkpoint(tmp_path / "ck")


def test_unknown_model_name(small, tmp_path):
    save_checkpoint(tmp_path / "ck", small, meta_for(small))
    meta = json.loads((tmp_path / "ck" / "meta.json").read_text())
    meta["model"] = "alexnet_2012"
    (tmp_path / "ck" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unknown model 'alexnet_2012'"):
        load_checkpoint(tmp_path / "ck")


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_checkpoint(tmp_path / "model.pt")
