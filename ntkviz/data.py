"""MNIST-like image data, loaded through torchvision's dataset classes.

The four original MNIST IDX files ship with ntkviz under ``resources/mnist`` (gzip). On first use they
are checked (sha256) and decompressed once into ``<cache>/MNIST/raw``, where
``torchvision.datasets.MNIST`` reads them; no network is needed. The decompressed files are checked
on every load (size always; sha256 once per process and whenever a file's size, mtime or inode
changes) and re-extracted from the shipped copies when damaged. FashionMNIST and KMNIST are read the
same way from a directory of the user's, and downloaded by torchvision only with ``download=True``.
Every file's IDX header is checked against its size, and every label against the class count; an
error names the file.

Images are returned as float32 tensors ``(N, 1, 28, 28)`` normalised per dataset,
``(pixel / 255 - mean) / std``, with the dataset's training-set mean and std (MNIST: 0.1307, 0.3081).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ntkviz.errors import DatasetError
from ntkviz.files import atomic_write

log = logging.getLogger(__name__)

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

#: size in bytes and sha256 of each decompressed MNIST file in ``<root>/MNIST/raw``.
MNIST_FILES = {
    "train-images-idx3-ubyte": (
        47_040_016,
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels-idx1-ubyte": (
        60_008,
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "t10k-images-idx3-ubyte": (
        7_840_016,
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "t10k-labels-idx1-ubyte": (
        10_008,
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}

#: The IDX files of an MNIST-like dataset in ``<root>/<Class>/raw``: name -> dimensions.
IDX_FILES = {
    f"{split}-{kind}": dims
    for split in ("train", "t10k")
    for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1))
}

#: Split sizes known before loading: MNIST's files are verified against :data:`MNIST_FILES`.
SPLIT_SIZES = {"mnist": {"train": 60_000, "test": 10_000}}

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


#: path -> (size, mtime_ns, inode) of cache files whose sha256 was checked in this process.
_verified: dict[Path, tuple[int, int, int]] = {}


def _damage(path: Path, size: int, digest: str) -> str | None:
    """What is wrong with the cache file ``path`` ("missing", a wrong size or checksum), or None
    when it holds the expected bytes. The sha256 is computed once per process and again only
    after the file's size, mtime or inode changed."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if st.st_size != size:
        return f"{st.st_size:,} bytes instead of {size:,}"
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if _verified.get(path) != key:
        try:
            if _sha256(path) != digest:
                return "its contents differ from the original's (sha256 mismatch)"
        except OSError as e:
            return f"unreadable: {e.strerror or e}"
        _verified[path] = key
    return None


def _prepare_shipped_mnist(root: Path, source: Path) -> None:
    """Make ``root/MNIST/raw`` hold the four original MNIST files: check each one and extract it
    from the shipped copies in ``source`` when it is missing or damaged (atomically per file).
    Raises :class:`DatasetError` naming the file when a damaged file cannot be repaired."""
    raw = root / "MNIST" / "raw"
    for name, (size, digest) in MNIST_FILES.items():
        target = raw / name
        damage = _damage(target, size, digest)
        if damage is None:
            continue
        gz_path = source / f"{name}.gz"
        if not gz_path.is_file():
            if damage == "missing":
                continue  # torchvision may download it; else the reader says it is missing
            raise DatasetError(
                f"MNIST: the cache file {target} is damaged ({damage}) and the shipped copy "
                f"{gz_path} to repair it from is missing; delete the file and load with --download"
            )
        if _sha256(gz_path) != SHIPPED_SHA256[gz_path.name]:
            raise DatasetError(f"MNIST: shipped file {gz_path} is corrupt (sha256 mismatch)")
        if damage != "missing":
            log.warning(
                "MNIST: %s is damaged (%s); re-extracting it from %s", target, damage, gz_path
            )
        try:
            raw.mkdir(parents=True, exist_ok=True)

            def extract(tmp: str, gz_path=gz_path) -> None:
                with open(tmp, "wb") as out, gzip.open(gz_path, "rb") as src:
                    shutil.copyfileobj(src, out)

            atomic_write(target, extract)
        except OSError as e:
            raise DatasetError(f"MNIST: cannot extract {gz_path} into {raw}: {e}") from e
        if (damage := _damage(target, size, digest)) is not None:
            raise DatasetError(f"MNIST: {target} is still damaged after extraction ({damage})")


def _check_idx(path: Path, dims: int, label: str) -> None:
    """Check that ``path`` is an IDX file of unsigned bytes with ``dims`` dimensions whose size
    matches its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(4 + 4 * dims)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DatasetError(f"{label}: cannot read {path}: {e.strerror or e}") from None
    if len(head) < 4 + 4 * dims or head[:4] != bytes((0, 0, 0x08, dims)):
        raise DatasetError(
            f"{label}: {path} is truncated or corrupt (not an IDX file of {dims}-d unsigned bytes)"
        )
    expected = 4 + 4 * dims + math.prod(struct.unpack(f">{dims}I", head[4:]))
    if size != expected:
        raise DatasetError(
            f"{label}: {path} is truncated or corrupt ({size:,} bytes; its header promises "
            f"{expected:,})"
        )


def _check_files(where: Path, download: bool, label: str) -> None:
    """Check that the four IDX files are in ``where`` (unless torchvision may download them)
    and that each one's size matches its header."""
    missing = [name for name in IDX_FILES if not (where / name).exists()]
    if missing and not download:
        raise DatasetError(
            f"{label}: dataset files not found in {where}: {', '.join(missing)} (pass "
            "download=True / --download to fetch them online)"
        )
    if not missing:
        for name, dims in IDX_FILES.items():
            _check_idx(where / name, dims, label)


def _read_split(cls, root: Path, train: bool, download: bool, label: str, classes: int) -> tuple:
    where = root / cls.__name__ / "raw"
    labels_file = where / f"{'train' if train else 't10k'}-labels-idx1-ubyte"
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
    labels = labels.long()
    outside = (labels < 0) | (labels >= classes)
    if bool(outside.any()):
        k = int(outside.nonzero()[0, 0])
        raise DatasetError(
            f"{label}: {labels_file} is corrupt: label {int(labels[k])} of example {k} is not one "
            f"of the {classes} classes 0..{classes - 1}"
        )
    return images, labels


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
    if key == "mnist":
        _prepare_shipped_mnist(root, SHIPPED_MNIST)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"{cls_name}: cannot create the data directory {root}: {e}") from e
    _check_files(root / cls_name / "raw", download, cls_name)
    splits = {}
    for split, train in (("train", True), ("test", False)):
        images, labels = _read_split(cls, root, train, download, cls_name, len(classes))
        x = ((images.float() / 255.0 - mean) / std).unsqueeze(1)
        splits[split] = Split(images=images, x=x, y=labels)
    log.info(
        "loaded %s from %s: %d training and %d test images",
        cls_name, root / cls_name / "raw", len(splits["train"]), len(splits["test"]),
    )  # fmt: skip
    return ImageDataset(key, splits["train"], splits["test"], mean, std, classes, root)
