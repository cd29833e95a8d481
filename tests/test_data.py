import hashlib
import os
import shutil
import stat
import struct

import numpy as np
import pytest
import torch

from ntkviz.data import MNIST_FILES, load_dataset, subset_indices
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


@pytest.fixture
def cache(mnist, tmp_path):
    """A copy of the verified MNIST cache that a test may damage: its raw directory."""
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(mnist.root / "MNIST" / "raw", raw)
    return raw


def damage(raw):
    """Truncate, delete and overwrite (labels set to 255, size and header kept) cache files."""
    (raw / "train-labels-idx1-ubyte").write_bytes(
        (raw / "train-labels-idx1-ubyte").read_bytes()[:999]
    )
    (raw / "t10k-images-idx3-ubyte").unlink()
    with open(raw / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(8)
        f.write(bytes([255]) * 10000)


def test_a_damaged_cache_is_repaired_from_the_shipped_copies(cache, caplog):
    damage(cache)
    with caplog.at_level("WARNING", logger="ntkviz.data"):
        data = load_dataset("mnist", root=cache.parent.parent)
    assert data.test.y.bincount().tolist()[:3] == [980, 1135, 1032]
    assert data.train.y.bincount().tolist()[:3] == [5923, 6742, 5958]
    assert len(data.test) == 10000
    for name, (size, digest) in MNIST_FILES.items():
        assert (cache / name).stat().st_size == size
        assert hashlib.sha256((cache / name).read_bytes()).hexdigest() == digest
    warned = caplog.text
    assert "train-labels-idx1-ubyte is damaged" in warned and "t10k-labels" in warned


def test_without_shipped_copies_a_damaged_file_is_named(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("ntkviz.data.SHIPPED_MNIST", tmp_path / "nothing-shipped")
    with open(cache / "t10k-labels-idx1-ubyte", "r+b") as f:
        f.seek(8)
        f.write(bytes([255]))
    with pytest.raises(DatasetError, match="sha256 mismatch") as info:
        load_dataset("mnist", root=cache.parent.parent)
    assert str(cache / "t10k-labels-idx1-ubyte") in str(info.value)
    target = cache / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100000])
    with pytest.raises(DatasetError, match="100,000 bytes instead of 7,840,016") as info:
        load_dataset("mnist", root=cache.parent.parent)
    assert str(target) in str(info.value)


def write_idx(path, array: np.ndarray) -> None:
    header = bytes((0, 0, 0x08, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion(tmp_path):
    """A tiny FashionMNIST directory of one's own (3 training and 2 test images)."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 3), ("t10k", 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) + 7)
    return raw


def test_labels_outside_the_classes_are_refused_naming_the_file(fashion):
    data = load_dataset("fashion-mnist", root=fashion.parent.parent)
    assert data.train.y.tolist() == [7, 8, 9] and data.test.x.shape == (2, 1, 28, 28)
    write_idx(fashion / "t10k-labels-idx1-ubyte", np.array([3, 255]))
    with pytest.raises(DatasetError, match="label 255 of example 1 is not one of the 10") as info:
        load_dataset("fashion-mnist", root=fashion.parent.parent)
    assert str(fashion / "t10k-labels-idx1-ubyte") in str(info.value)


def test_truncated_or_missing_files_are_named(fashion):
    images = fashion / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated or corrupt") as info:
        load_dataset("fashion-mnist", root=fashion.parent.parent)
    assert str(images) in str(info.value) and "header promises" in str(info.value)
    images.unlink()
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte") as info:
        load_dataset("fashion-mnist", root=fashion.parent.parent)
    assert "download" in str(info.value)


def test_cache_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        load_dataset("mnist", root=tmp_path)
    finally:
        os.umask(old)
    for name in MNIST_FILES:
        assert stat.S_IMODE((tmp_path / "MNIST" / "raw" / name).stat().st_mode) == 0o644


def test_missing_offline_dataset_names_the_set_and_directory(tmp_path):
    with pytest.raises(DatasetError, match="FashionMNIST") as info:
        load_dataset("fashion-mnist", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "download" in message


def test_unknown_dataset_is_refused():
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("cifar")
