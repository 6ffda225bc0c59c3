import pickle

import pytest
import torch

from cifar_core.data import DataSourceError, load_cifar10, make_split, resolve_data_dir


def test_no_data_error_names_both_options(monkeypatch, tmp_path):
    from cifar_core import paths
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setattr(paths, "DEFAULT_DATA", tmp_path / "no-shared-beside-the-repo")
    with pytest.raises(DataSourceError) as e:
        resolve_data_dir(None)
    msg = str(e.value)
    assert "--data" in msg and "CIFAR10_DIR" in msg and "ImageFolder" in msg and "cifar-10-batches-py" in msg


def test_wrong_folder_is_named(tmp_path):
    with pytest.raises(DataSourceError, match=str(tmp_path)):
        resolve_data_dir(str(tmp_path))


def test_seed_split_sizes_stratified_disjoint(cifar):
    s = make_split(cifar, "seed", 0)
    assert (len(s.train), len(s.val), len(s.test)) == (48000, 6000, 6000)
    for part, per_class in ((s.train, 4800), (s.val, 600), (s.test, 600)):
        counts = torch.bincount(cifar.labels[part], minlength=10)
        assert counts.tolist() == [per_class] * 10
    all_idx = torch.cat([s.train, s.val, s.test])
    assert len(all_idx.unique()) == 60000


@pytest.mark.parametrize("name,sizes", [("canonical", (45000, 5000, 10000)), ("official", (50000, 0, 10000))])
def test_official_based_splits(cifar, name, sizes):
    s = make_split(cifar, name, 0)
    assert (len(s.train), len(s.val), len(s.test)) == sizes
    assert bool(cifar.is_official_test[s.test].all())
    assert not bool(cifar.is_official_test[torch.cat([s.train, s.val])].any())
    assert len(torch.cat([s.train, s.val, s.test]).unique()) == sum(sizes)


def test_split_deterministic_and_fingerprinted(cifar):
    a, b, c = make_split(cifar, "seed", 0), make_split(cifar, "seed", 0), make_split(cifar, "seed", 1)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint and not torch.equal(a.test, c.test)


def test_unknown_split(cifar):
    with pytest.raises(ValueError, match="unknown split"):
        make_split(cifar, "random", 0)


def test_images_and_labels(cifar):
    assert cifar.images.shape == (60000, 3, 32, 32) and cifar.images.dtype == torch.uint8
    assert torch.bincount(cifar.labels).tolist() == [6000] * 10
    assert int(cifar.is_official_test.sum()) == 10000
    mean = cifar.images[:50000].float().div(255).mean((0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-3)  # PROVENANCE.md


def test_torchvision_format_matches_imagefolder(cifar, tmp_path):
    """Write the data as the official python batches, load them back: the same images and labels."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = cifar.images.numpy().reshape(60000, -1)
    labels = cifar.labels.tolist()
    for i in range(5):
        sl = slice(i * 10000, (i + 1) * 10000)
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump({"data": images[sl], "labels": labels[sl]}, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": images[50000:], "labels": labels[50000:]}, f)
    loaded = load_cifar10(str(tmp_path))
    assert loaded.source.startswith("torchvision:")
    assert torch.equal(loaded.images, cifar.images) and torch.equal(loaded.labels, cifar.labels)
    assert torch.equal(loaded.is_official_test, cifar.is_official_test)


def test_torchvision_batches_refuse_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({"data": Evil(), "labels": []}))
    with pytest.raises(DataSourceError, match="refusing to unpickle"):
        load_cifar10(str(tmp_path))
