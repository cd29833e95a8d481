import hashlib
import os
import shutil
import stat
import struct
from pathlib import Path

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
def cache(mnist, tmp_path, monkeypatch):
    """A copy of the verified MNIST cache, ntkviz's cache for the test (``$NTKVIZ_CACHE``), that
    a test may damage: its raw directory."""
    raw = tmp_path / "datasets" / "MNIST" / "raw"
    shutil.copytree(mnist.root / "MNIST" / "raw", raw)
    monkeypatch.setenv("NTKVIZ_CACHE", str(tmp_path))
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
        data = load_dataset("mnist")
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
        load_dataset("mnist")
    assert str(cache / "t10k-labels-idx1-ubyte") in str(info.value)
    target = cache / "t10k-images-idx3-ubyte"
    target.write_bytes(target.read_bytes()[:100000])
    with pytest.raises(DatasetError, match="100,000 bytes instead of 7,840,016") as info:
        load_dataset("mnist")
    assert str(target) in str(info.value)


def test_a_damaged_file_in_a_directory_of_the_users_is_named_not_replaced(cache):
    """--data-dir / root=: the user's files; a missing one is extracted, a changed one refused."""
    mine = cache.parent.parent.parent / "mine"
    shutil.copytree(cache, mine / "MNIST" / "raw")
    (mine / "MNIST" / "raw" / "t10k-images-idx3-ubyte").unlink()
    target = mine / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    target.write_bytes(target.read_bytes()[:-1] + b"\x07")
    edited = target.read_bytes()
    with pytest.raises(DatasetError, match="ntkviz does not overwrite files in a directory you"):
        load_dataset("mnist", root=mine)
    assert target.read_bytes() == edited


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


# --------------------------------------------------------------------------- any image data


def test_aliases_and_case_reach_the_same_dataset(fashion):
    a = load_dataset("FashionMNIST", root=fashion.parent.parent)
    b = load_dataset("fashion-mnist", root=fashion.parent.parent)
    assert a.name == b.name == "fashion-mnist" and torch.equal(a.train.x, b.train.x)
    assert a.input_shape == (1, 28, 28) and a.channels == 1 and a.mean == (0.2860,)


def pil_pixels(image) -> np.ndarray:
    """A PIL image's pixels as (H, W) or (H, W, 3) uint8, independent of ntkviz."""
    return np.asarray(image, dtype=np.uint8)


@pytest.mark.parametrize("num_classes", [5, 100])
def test_tensor_datasets_keep_their_tensors_exactly(num_classes):
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor

    from ntkviz.data import as_image_dataset

    train = FakeData(40, (3, 32, 32), num_classes, ToTensor())
    test = FakeData(12, (3, 32, 32), num_classes, ToTensor(), random_offset=1000)
    data = as_image_dataset((train, test))
    assert data.input_shape == (3, 32, 32) and data.channels == 3
    assert data.classes == tuple(str(i) for i in range(num_classes))
    assert data.num_classes == num_classes and data.root is None and data.name == "FakeData"
    for split, ds in ((data.train, train), (data.test, test)):
        assert split.x.dtype == torch.float32 and split.x.shape == (len(ds), 3, 32, 32)
        assert torch.equal(split.x, torch.stack([ds[i][0] for i in range(len(ds))]))
        assert split.y.dtype == torch.int64
        assert split.y.tolist() == [ds[i][1] for i in range(len(ds))]
        assert split.images.dtype == torch.uint8 and split.images.shape == (len(ds), 32, 32, 3)
    # the display images are the PIL images FakeData made before ToTensor
    raw = FakeData(12, (3, 32, 32), num_classes, random_offset=1000)
    expected = np.stack([pil_pixels(raw[i][0]) for i in range(12)])
    np.testing.assert_array_equal(data.test.images.numpy(), expected)
    torch.testing.assert_close(data.normalize(data.test.images), data.test.x, atol=1e-6, rtol=0)


def test_tensors_outside_zero_one_are_shown_min_max():
    from ntkviz.data import as_image_dataset

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 1, 8, 8, generator=g) * 3
    y = torch.arange(30) % 3
    train = list(zip(x[:20], y[:20].tolist()))
    test = list(zip(x[20:], y[20:].tolist()))
    data = as_image_dataset((train, test), name="mine", classes=["a", "b", "c"])
    assert data.name == "mine" and data.classes == ("a", "b", "c")
    lo, hi = x.min().item(), x.max().item()
    expected = np.clip(np.round((x.numpy().astype(np.float64) - lo) / (hi - lo) * 255), 0, 255)
    np.testing.assert_allclose(data.train.images.numpy(), expected[:20, 0], atol=1)
    assert data.train.images.shape == (20, 8, 8)
    both = torch.cat([data.train.images.flatten(), data.test.images.flatten()])
    assert both.min() == 0 and both.max() == 255
    assert torch.equal(data.train.x, x[:20])
    torch.testing.assert_close(
        data.normalize(data.train.images), x[:20], atol=(hi - lo) / 255, rtol=0
    )


def test_pil_datasets_are_normalised_with_their_training_statistics():
    from torchvision.datasets import FakeData

    from ntkviz.data import as_image_dataset

    train, test = FakeData(30, (3, 16, 12), 4), FakeData(10, (3, 16, 12), 4, random_offset=99)
    data = as_image_dataset((train, test))
    pixels = np.stack([pil_pixels(train[i][0]) for i in range(30)]).astype(np.float64) / 255
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    np.testing.assert_allclose(data.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(data.std, std, rtol=1e-12)
    test_pixels = np.stack([pil_pixels(test[i][0]) for i in range(10)]).astype(np.float64) / 255
    expected = ((test_pixels - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(data.test.x.numpy(), expected, atol=1e-5)
    assert data.input_shape == (3, 16, 12) and data.test.images.shape == (10, 16, 12, 3)
    assert data.classes == ("0", "1", "2", "3")


def test_one_dataset_is_split_stratified_and_seeded():
    from ntkviz.data import as_image_dataset, holdout_indices

    y = torch.arange(120) % 4
    items = [(torch.full((1, 4, 4), float(i) / 200), int(c)) for i, c in enumerate(y)]
    a, b = as_image_dataset(items), as_image_dataset(items)
    assert torch.equal(a.test.x, b.test.x) and len(a.train) == 100 and len(a.test) == 20
    assert a.test.y.bincount().tolist() == [5, 5, 5, 5]
    seen = torch.cat([a.train.x, a.test.x]).flatten(1)[:, 0] * 200
    assert sorted(seen.round().long().tolist()) == list(range(120))  # disjoint, complete
    train_idx, test_idx = holdout_indices(torch.tensor([0, 0, 1]))
    assert (
        test_idx.tolist() in ([0], [1]) and 2 in train_idx.tolist()
    )  # a lone class stays in train


def test_dataset_classes_attribute_names_the_classes():
    from ntkviz.data import as_image_dataset

    class Named(list):
        classes = ("cat", "dog")

    train = Named([(torch.zeros(1, 2, 2), i % 2) for i in range(6)])
    test = Named([(torch.ones(1, 2, 2), 1)])
    assert as_image_dataset((train, test)).classes == ("cat", "dog")


def test_a_label_outside_the_classes_is_named_by_its_item_in_the_dataset():
    from ntkviz.data import as_image_dataset

    items = [(torch.rand(1, 6, 6), k % 2) for k in range(12)]
    items[9] = (items[9][0], 2)  # one dataset: a test split is held out, not by item order
    with pytest.raises(ValueError, match="item 9 of the dataset has label 2, outside the 2"):
        as_image_dataset(items, classes=["a", "b"])


@pytest.mark.parametrize(
    ("test_items", "classes", "message"),
    [
        ([(torch.zeros(3, 8, 8), 0), (torch.zeros(3, 8, 9), 1)], None, r"item 1 of the test data"
         r"set: the image has shape \(3, 8, 9\), item 0's has \(3, 8, 8\)"),
        ([(torch.zeros(3, 8, 8), 2)], ["a", "b"], "item 0 of the test dataset has label 2, "
         "outside the 2 classes 0..1"),
        ([(torch.zeros(3, 8, 8), True)], None, "label of item 0 of the test dataset must be an int"),
        ([(torch.zeros(3, 8, 8), -1)], None, "must be an int class ≥ 0, got -1"),
        ([torch.zeros(3, 8, 8)], None, r"item 0 of the test dataset must be an \(image, label\)"),
        ([(torch.zeros(4, 8, 8), 0)], None, "expected (C, H, W) with 1 or 3 channels"),
        ([("pixels", 0)], None, "must be a float tensor (C, H, W), a uint8 tensor or a PIL image"),
        ([(torch.full((3, 8, 8), float("nan")), 0)], None, "item 0 of the test dataset holds "
         "non-finite"),
        ([], None, "the test dataset is empty"),
    ],
)  # fmt: skip
def test_bad_items_are_named(test_items, classes, message):
    from ntkviz.data import as_image_dataset

    train = [(torch.rand(3, 8, 8), i % 2) for i in range(4)]
    with pytest.raises((ValueError, DatasetError)) as info:
        as_image_dataset((train, test_items), classes=classes)
    assert message.replace("\\", "") in str(info.value) or __import__("re").search(
        message, str(info.value)
    ), str(info.value)


def test_normalize_takes_display_images_of_either_layout(mnist):
    from ntkviz.data import ImageDataset, Split

    rgb = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    data = ImageDataset("t", Split(rgb, rgb.float(), torch.zeros(2)), Split(rgb, rgb, rgb),
                        mean, std, ("a", "b"), None)  # fmt: skip
    x = data.normalize(rgb)
    expected = (rgb.permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / (
        torch.tensor(std).view(1, 3, 1, 1)
    )
    torch.testing.assert_close(x, expected.float())
    with pytest.raises(ValueError, match="has 1 channel"):
        mnist.normalize(rgb)


# --------------------------------------------------------------------------- image folders


def write_png(path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def make_folder(root, classes=("cat", "dog", "eel"), per_class=6, shape=(6, 5), rgb=False):
    """``root/<class>/<k>.png`` with random pixels; returns {path: pixels}."""
    rng = np.random.default_rng(len(str(root)))
    written = {}
    for c in classes:
        for k in range(per_class):
            array = rng.integers(0, 256, (*shape, 3) if rgb else shape)
            write_png(root / c / f"{k}.png", array)
            written[root / c / f"{k}.png"] = array
    return written


@pytest.mark.parametrize("rgb", [False, True])
def test_an_image_folder_with_train_and_test(tmp_path, rgb):
    train = make_folder(tmp_path / "train", rgb=rgb)
    test = make_folder(tmp_path / "test", classes=("dog", "eel"), per_class=2, rgb=rgb)
    data = load_dataset(str(tmp_path))
    assert data.classes == ("cat", "dog", "eel") and data.root == tmp_path
    assert data.name == tmp_path.name
    assert data.input_shape == ((3, 6, 5) if rgb else (1, 6, 5))
    assert len(data.train) == 18 and len(data.test) == 4
    assert data.test.y.tolist() == [1, 1, 2, 2]  # the training split's class indices
    assert data.train.images.shape == ((18, 6, 5, 3) if rgb else (18, 6, 5))
    pixels = np.stack(list(train.values())).astype(np.float64) / 255
    axes = (0, 1, 2) if rgb else None
    np.testing.assert_allclose(data.mean, np.atleast_1d(pixels.mean(axis=axes)), rtol=1e-12)
    np.testing.assert_allclose(data.std, np.atleast_1d(pixels.std(axis=axes)), rtol=1e-12)
    np.testing.assert_array_equal(data.test.images[0].numpy(), test[tmp_path / "test/dog/0.png"])
    torch.testing.assert_close(data.normalize(data.test.images), data.test.x)


def test_an_image_folder_of_classes_alone_holds_out_a_sixth(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), per_class=12, rgb=True)
    write_png(tmp_path / "a" / "gray.png", np.zeros((6, 5)))  # one grayscale image among RGB
    data = load_dataset(tmp_path)
    assert data.channels == 3 and len(data.train) + len(data.test) == 25
    assert data.test.y.bincount().tolist() == [2, 2] and data.classes == ("a", "b")
    again = load_dataset(tmp_path)
    assert torch.equal(data.test.images, again.test.images)


def test_image_folder_errors_name_the_file_or_folder(tmp_path):
    make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    odd = tmp_path / "d" / "b" / "odd.png"
    write_png(odd, np.zeros((7, 5)))
    with pytest.raises(DatasetError, match="all images must have one size") as info:
        load_dataset(tmp_path / "d")
    assert f"{odd} is 5×7 pixels" in str(info.value) and "is 5×6" in str(info.value)
    odd.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="is not a readable image") as info:
        load_dataset(tmp_path / "d")
    assert str(odd) in str(info.value)
    odd.unlink()
    (tmp_path / "d" / "c").mkdir()
    with pytest.raises(DatasetError, match="no images in the class folder"):
        load_dataset(tmp_path / "d")
    (tmp_path / "e").mkdir()
    with pytest.raises(DatasetError, match="holds no class folders"):
        load_dataset(tmp_path / "e")
    make_folder(tmp_path / "f", classes=("only",))
    with pytest.raises(DatasetError, match="at least 2"):
        load_dataset(tmp_path / "f")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "nowhere"))
    make_folder(tmp_path / "g" / "train", classes=("a", "b"), per_class=2)
    make_folder(tmp_path / "g" / "test", classes=("a", "z"), per_class=1)
    with pytest.raises(DatasetError, match=r"class folder.s. z that the training split lacks"):
        load_dataset(tmp_path / "g")
    make_folder(tmp_path / "h" / "train", classes=("a", "b"), per_class=2)
    make_folder(tmp_path / "h" / "valid", classes=("a", "b"), per_class=1)
    with pytest.raises(DatasetError, match=r"holds train/, valid/: a training split but no test"):
        load_dataset(tmp_path / "h")  # not two classes called "train" and "valid"
    make_folder(tmp_path / "k" / "train" / "x", classes=("a",), per_class=2)  # a class "train"
    make_folder(tmp_path / "k" / "plane" / "x", classes=("a",), per_class=2)  # of nested images
    assert load_dataset(tmp_path / "k").classes == ("plane", "train")


# --------------------------------------------------------------------------- datasets by name


@pytest.mark.parametrize(
    ("name", "where", "files"),
    [
        ("cifar10", "cifar-10-batches-py", ["data_batch_1", "test_batch", "batches.meta"]),
        ("CIFAR-100", "cifar-100-python", ["train", "test", "meta"]),
        ("svhn", "", ["train_32x32.mat", "test_32x32.mat"]),
        ("emnist", "EMNIST/raw", ["emnist-letters-train-images-idx3-ubyte"]),
    ],
)
def test_missing_named_datasets_name_the_directory_and_files(tmp_path, name, where, files):
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root=tmp_path)
    message = str(info.value)
    assert f"not found in {tmp_path / where if where else tmp_path}:" in message
    assert all(f in message for f in files) and "--download" in message
    with pytest.raises(DatasetError):
        load_dataset(name, root=tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()  # a directory that is not there stays so
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match=r"the data directory .*afile is a file"):
        load_dataset(name, root=tmp_path / "afile")


def test_emnist_letters_are_shifted_and_stand_upright(tmp_path):
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(3)
    stored = {}
    for split, n in (("train", 5), ("test", 3)):
        images = rng.integers(0, 256, (n, 28, 28))
        labels = np.array([1, 26, 2, 5, 3][:n])
        write_idx(raw / f"emnist-letters-{split}-images-idx3-ubyte", images)
        write_idx(raw / f"emnist-letters-{split}-labels-idx1-ubyte", labels)
        stored[split] = images, labels
    data = load_dataset("emnist-letters", root=tmp_path)
    assert data.classes == tuple("abcdefghijklmnopqrstuvwxyz") and data.mean == (0.1722,)
    assert data.train.y.tolist() == [0, 25, 1, 4, 2] and data.test.y.tolist() == [0, 25, 1]
    np.testing.assert_array_equal(data.train.images.numpy(), stored["train"][0].transpose(0, 2, 1))
    write_idx(raw / "emnist-letters-test-labels-idx1-ubyte", np.array([1, 0, 2]))
    with pytest.raises(DatasetError, match="label -1 of example 1 is not one of the 26") as info:
        load_dataset("emnist", root=tmp_path)
    assert str(raw / "emnist-letters-test-labels-idx1-ubyte") in str(info.value)


def test_cifar_is_read_only_after_its_md5_check(tmp_path, monkeypatch):
    """Synthetic CIFAR-10 files (the test's own pickles) with their md5s put in place of the
    official ones: read with torchvision; a changed file is refused as corrupt unread."""
    import pickle

    import torchvision.datasets as tvd

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sums = {}

    def dump(name, obj):
        (folder / name).write_bytes(pickle.dumps(obj))
        sums[name] = hashlib.md5((folder / name).read_bytes()).hexdigest()

    batches = {}
    for name, n in (("data_batch_1", 4), ("test_batch", 2)):
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        batches[name] = data
        dump(name, {"data": data, "labels": list(range(n))})
    dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    monkeypatch.setattr(tvd.CIFAR10, "train_list", [["data_batch_1", sums["data_batch_1"]]])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", sums["test_batch"]]])
    meta = {**tvd.CIFAR10.meta, "md5": sums["batches.meta"]}
    monkeypatch.setattr(tvd.CIFAR10, "meta", meta)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.input_shape == (3, 32, 32) and data.classes[:2] == ("c0", "c1")
    assert data.train.images.shape == (4, 32, 32, 3) and data.test.y.tolist() == [0, 1]
    hwc = batches["test_batch"].reshape(2, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(data.test.images.numpy(), hwc)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    expected = (torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(data.test.x, expected)
    changed = bytearray((folder / "test_batch").read_bytes())
    changed[-100] ^= 0xFF  # one pixel: still a valid pickle, no longer the listed file
    (folder / "test_batch").write_bytes(bytes(changed))
    with pytest.raises(DatasetError, match=r"corrupt.*md5 mismatch") as info:
        load_dataset("cifar10", root=tmp_path)
    assert str(folder) in str(info.value)


def test_svhn_without_scipy_says_so(tmp_path, monkeypatch):
    import builtins

    for name in ("train_32x32.mat", "test_32x32.mat"):
        (tmp_path / name).write_bytes(b"")
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("No module named 'scipy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(DatasetError, match=r"SVHN needs scipy.*pip install scipy"):
        load_dataset("svhn", root=tmp_path)


def test_a_download_without_a_network_says_so_not_that_files_are_corrupt():
    import urllib.error

    from ntkviz.data import _construct

    def make():
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DatasetError) as info:
        _construct(make, Path("/data/cifar-10-batches-py"), True, "CIFAR10")
    assert str(info.value) == (
        "CIFAR10: could not download it into /data/cifar-10-batches-py: Name or service not known "
        "(is this machine online?)"
    )
