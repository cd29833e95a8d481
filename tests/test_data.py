import gzip
import shutil

import pytest
import torch

from ntkviz.data import SHIPPED_MNIST, load_dataset, subset_indices
from ntkviz.errors import DatasetError


def test_shipped_mnist_has_the_canonical_class_counts(mnist):
    assert mnist.train.x.shape == (60000, 1, 28, 28)
    assert mnist.test.x.shape == (10000, 1, 28, 28)
    assert mnist.train.y.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert mnist.test.y.bincount().tolist()[:3] == [980, 1135, 1032]
    assert mnist.train.images.dtype == torch.uint8


def test_normalisation_is_the_documented_one(mnist):
    pixels = mnist.train.images.float() / 255
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)
    torch.testing.assert_close(mnist.normalize(mnist.test.images[:5]), mnist.test.x[:5])
    assert mnist.train.x.mean().item() == pytest.approx(0, abs=1e-3)


def test_seeded_subset_is_reproducible_and_distinct():
    a, b = subset_indices(60000, 2000, seed=1), subset_indices(60000, 2000, seed=1)
    assert torch.equal(a, b) and len(a.unique()) == 2000
    assert not torch.equal(a, subset_indices(60000, 2000, seed=2))
    assert torch.equal(subset_indices(10, None, 0), torch.arange(10))


def test_truncated_file_raises_a_clear_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in SHIPPED_MNIST.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.name.removesuffix(".gz"), "wb") as out:
            shutil.copyfileobj(src, out)
    target = raw / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100000])
    with pytest.raises(DatasetError, match=r"MNIST.*truncated or corrupt") as info:
        load_dataset("mnist", root=tmp_path)
    assert str(raw) in str(info.value)


def test_missing_offline_dataset_names_the_set_and_directory(tmp_path):
    with pytest.raises(DatasetError, match="FashionMNIST") as info:
        load_dataset("fashion-mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "download" in message


def test_unknown_dataset_is_refused():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar")
