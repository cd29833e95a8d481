"""MNIST-like image data, loaded through torchvision's dataset classes.

The four original MNIST IDX files ship with ntkviz under ``resources/mnist`` (gzip). On first use they
are checked (sha256) and decompressed once into ``<cache>/MNIST/raw``, where
``torchvision.datasets.MNIST`` reads them; no network is needed. FashionMNIST and KMNIST are read the
same way from a directory of the user's, and downloaded by torchvision only with ``download=True``.

Images are returned as float32 tensors ``(N, 1, 28, 28)`` normalised per dataset,
``(pixel / 255 - mean) / std``, with the dataset's training-set mean and std (MNIST: 0.1307, 0.3081).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ntkviz.errors import DatasetError

RESOURCES = Path(
    os.environ.get("NTKVIZ_RESOURCES", Path(__file__).resolve().parent.parent / "resources")
)
SHIPPED_MNIST = RESOURCES / "mnist"

#: sha256 of the shipped gzip files (see resources/mnist/README.md).
SHIPPED_SHA256 = {
    "train-images-idx3-ubyte.gz": "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
    "train-labels-idx1-ubyte.gz": "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
    "t10k-images-idx3-ubyte.gz": "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
    "t10k-labels-idx1-ubyte.gz": "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
}

#: name -> (torchvision class name, pixel mean, pixel std, class names)
DATASETS: dict[str, tuple[str, float, float, tuple[str, ...]]] = {
    "mnist": ("MNIST", 0.1307, 0.3081, tuple(str(i) for i in range(10))),
    "fashion-mnist": (
        "FashionMNIST",
        0.2860,
        0.3530,
        (
            "T-shirt",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Boot",
        ),
    ),
    "kmnist": (
        "KMNIST",
        0.1918,
        0.3483,
        ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    ),
}


def default_cache_dir() -> Path:
    """``$NTKVIZ_CACHE``, else ``$XDG_CACHE_HOME/ntkviz``, else ``~/.cache/ntkviz``."""
    if env := os.environ.get("NTKVIZ_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ntkviz"


@dataclass(frozen=True)
class Split:
    """One split of a dataset: ``images`` uint8 ``(N, 28, 28)``, ``x`` normalised float32
    ``(N, 1, 28, 28)``, ``y`` int64 ``(N,)``."""

    images: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ImageDataset:
    """A train/test pair of splits with its normalisation and class names."""

    name: str
    train: Split
    test: Split
    mean: float
    std: float
    classes: tuple[str, ...]
    root: Path

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, 28, 28)`` -> normalised float32 ``(N, 1, 28, 28)``."""
        return ((images.float() / 255.0 - self.mean) / self.std).unsqueeze(1)


def subset_indices(n_total: int, size: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of ``range(n_total)`` of ``size`` items (all, in order, if None)."""
    if size is None or size >= n_total:
        return torch.arange(n_total)
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:size].sort().values


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _prepare_shipped_mnist(root: Path, source: Path) -> None:
    """Decompress the shipped MNIST files into ``root/MNIST/raw`` once (atomic per file)."""
    raw = root / "MNIST" / "raw"
    for gz_name, digest in SHIPPED_SHA256.items():
        target = raw / gz_name.removesuffix(".gz")
        if target.exists():
            continue
        gz_path = source / gz_name
        if not gz_path.exists():
            raise DatasetError(f"MNIST: shipped file {gz_name} is missing from {source}")
        if _sha256(gz_path) != digest:
            raise DatasetError(f"MNIST: shipped file {gz_path} is corrupt (sha256 mismatch)")
        raw.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=target.name, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, gzip.open(gz_path, "rb") as src:
                shutil.copyfileobj(src, out)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read_split(cls, root: Path, train: bool, download: bool, label: str) -> tuple:
    where = root / cls.__name__ / "raw"
    try:
        ds = cls(root=str(root), train=train, download=download)
    except RuntimeError as e:
        if "not found" in str(e).lower():
            hint = "" if download else " (pass download=True / --download to fetch it online)"
            raise DatasetError(f"{label}: dataset files not found in {where}{hint}") from None
        raise DatasetError(f"{label}: files in {where} are truncated or corrupt ({e})") from e
    except (AssertionError, ValueError, OSError) as e:
        raise DatasetError(
            f"{label}: files in {where} are truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # network errors from download=True
        raise DatasetError(f"{label}: could not obtain the dataset into {where}: {e}") from e
    images, labels = ds.data, ds.targets
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DatasetError(
            f"{label}: files in {where} have unexpected shapes "
            f"images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )
    return images, labels.long()


def load_dataset(
    name: str = "mnist", root: str | Path | None = None, download: bool = False
) -> ImageDataset:
    """Load an MNIST-like dataset.

    ``name``: "mnist" (shipped, offline), "fashion-mnist" or "kmnist". ``root``: the directory that
    holds ``<Class>/raw`` (default: the ntkviz cache directory). ``download``: let torchvision fetch
    missing files from the internet. Raises :class:`DatasetError` naming the set and the directory.
    """
    import torchvision.datasets as tvd

    key = name.lower()
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    cls_name, mean, std, classes = DATASETS[key]
    root = Path(root) if root is not None else default_cache_dir() / "datasets"
    cls = getattr(tvd, cls_name)
    shipped_needed = not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").exists()
    if key == "mnist" and shipped_needed and SHIPPED_MNIST.exists():
        _prepare_shipped_mnist(root, SHIPPED_MNIST)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{cls_name}: cannot create the data directory {root}: {e}") from e
    splits = {}
    for split, train in (("train", True), ("test", False)):
        images, labels = _read_split(cls, root, train, download, cls_name)
        x = ((images.float() / 255.0 - mean) / std).unsqueeze(1)
        splits[split] = Split(images=images, x=x, y=labels)
    return ImageDataset(key, splits["train"], splits["test"], mean, std, classes, root)
