"""Image classification data: datasets by name, a directory of images, or the user's own datasets.

Every dataset is an :class:`ImageDataset`: a train and a test :class:`Split` with per-channel
normalisation constants and class names. ``Split.images`` holds uint8 pixels for display,
``(N, H, W)`` for one channel and ``(N, H, W, 3)`` for RGB; ``Split.x`` holds what the model sees,
float32 ``(N, C, H, W)``, normalised per channel as ``(pixel / 255 - mean[c]) / std[c]``.

**By name** (:func:`load_dataset`, case-insensitive), through torchvision's dataset classes, read
from ``root`` (default ``<cache>/datasets``) and downloaded only with ``download=True``:

=================  =========  ======================================  ======================================
name (aliases)     shape      mean per channel                        std per channel
=================  =========  ======================================  ======================================
mnist              1×28×28    0.1307                                  0.3081
fashion-mnist      1×28×28    0.2860                                  0.3530
kmnist             1×28×28    0.1918                                  0.3483
emnist-letters     1×28×28    0.1722                                  0.3310
cifar10            3×32×32    0.4914, 0.4822, 0.4465                  0.2470, 0.2435, 0.2616
cifar100           3×32×32    0.5071, 0.4865, 0.4409                  0.2673, 0.2564, 0.2762
svhn               3×32×32    0.4377, 0.4438, 0.4728                  0.1980, 0.2010, 0.1970
=================  =========  ======================================  ======================================

The constants are each training set's pixel mean and (population) standard deviation, the values
in common use (EMNIST letters' are quoted, not recomputed here). Aliases: ``fashionmnist``,
``emnist`` (= ``emnist-letters``), ``cifar-10``, ``cifar-100``.

- MNIST: the four original IDX files ship with ntkviz under ``resources/mnist`` (gzip). On first use
  they are checked (sha256) and decompressed once into ``<root>/MNIST/raw``, where
  ``torchvision.datasets.MNIST`` reads them; no network is needed. The decompressed files are
  checked on every load (size always; sha256 once per process and whenever a file's size, mtime or
  inode changes) and re-extracted from the shipped copies when damaged.
- FashionMNIST, KMNIST: ``<root>/<Class>/raw`` IDX files. EMNIST letters: the files
  ``emnist-letters-{train,test}-{images-idx3,labels-idx1}-ubyte`` in ``<root>/EMNIST/raw``; its
  labels 1..26 become 0..25 (classes "a".."z") and its images, stored transposed, are transposed
  back so that letters stand upright. Every IDX file's header is checked against its size, and
  every label against the class count; an error names the file.
- CIFAR-10/100: torchvision's ``<root>/cifar-10-batches-py`` and ``<root>/cifar-100-python``.
  These files are Python pickles: torchvision checks each one's md5 against the official file's
  before unpickling it, so only the official files are ever unpickled. ntkviz keeps that check
  (it never reads the batches itself); a file that fails it is reported as corrupt.
- SVHN: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat`` (md5-checked by torchvision, read
  with scipy, which must be installed); the label 10 of digit 0 becomes 0.

**A directory** (:func:`load_dataset` with a path) in torchvision's ``ImageFolder`` layout: either
``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png``, or ``DIR/<class>/*`` alone, from which a
seeded, stratified sixth of each class (none of a class of one image) is held out as the test split
(:func:`holdout_indices`). Images become one channel if all of them are grayscale, else RGB; all
must have one size. mean and std are computed per channel from the training split.

**The user's own datasets** (:func:`as_image_dataset`): map-style datasets yielding ``(image,
label)`` pairs, with tensors or PIL images.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import shutil
import struct
import urllib.error
from dataclasses import dataclass, replace
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

#: Fraction of each class of a single image directory or dataset held out as the test split.
HOLDOUT_FRACTION = 1 / 6


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset known by name: its torchvision class, reader kind, per-channel normalisation and
    class names (None: torchvision's ``.classes``)."""

    cls_name: str
    kind: str  #: "idx" (MNIST-like), "emnist", "cifar" or "svhn"
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...] | None
    shape: tuple[int, int, int]  #: (C, H, W)


_DIGITS = tuple(str(i) for i in range(10))
_FASHION = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
            "Bag", "Boot")  # fmt: skip
_KMNIST = ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
_LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")

#: name -> what :func:`load_dataset` needs to read it (see the module docstring).
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec("MNIST", "idx", (0.1307,), (0.3081,), _DIGITS, (1, 28, 28)),
    "fashion-mnist": DatasetSpec(
        "FashionMNIST", "idx", (0.2860,), (0.3530,), _FASHION, (1, 28, 28)
    ),
    "kmnist": DatasetSpec("KMNIST", "idx", (0.1918,), (0.3483,), _KMNIST, (1, 28, 28)),
    "emnist-letters": DatasetSpec("EMNIST", "emnist", (0.1722,), (0.3310,), _LETTERS, (1, 28, 28)),
    "cifar10": DatasetSpec(
        "CIFAR10", "cifar", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), None, (3, 32, 32)
    ),
    "cifar100": DatasetSpec(
        "CIFAR100", "cifar", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), None, (3, 32, 32)
    ),
    "svhn": DatasetSpec(
        "SVHN", "svhn", (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _DIGITS, (3, 32, 32)
    ),
}

#: Other spellings of the names in :data:`DATASETS`.
ALIASES = {
    "fashionmnist": "fashion-mnist",
    "emnist": "emnist-letters",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def dataset_key(name: str) -> str | None:
    """The :data:`DATASETS` key of a dataset name or alias (case-insensitive), else None."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    return key if key in DATASETS else None


def default_cache_dir() -> Path:
    """``$NTKVIZ_CACHE``, else ``$XDG_CACHE_HOME/ntkviz``, else ``~/.cache/ntkviz``."""
    if env := os.environ.get("NTKVIZ_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ntkviz"


@dataclass(frozen=True)
class Split:
    """One split of a dataset: ``images`` uint8 for display, un-normalised, ``(N, H, W)`` for one
    channel and ``(N, H, W, 3)`` for RGB; ``x`` float32 ``(N, C, H, W)``, what the model sees;
    ``y`` int64 ``(N,)``."""

    images: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def _to_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 display images ``(N, H, W)`` or ``(N, H, W, 3)`` as ``(N, C, H, W)``."""
    if images.ndim == 3:
        return images.unsqueeze(1)
    if images.ndim == 4 and images.shape[-1] == 3:
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"images must be (N, H, W) or (N, H, W, 3), got shape {tuple(images.shape)}")


def _to_display(chw: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` with C = 1 or 3 as display images ``(N, H, W)`` / ``(N, H, W, 3)``."""
    return chw[:, 0] if chw.shape[1] == 1 else chw.permute(0, 2, 3, 1).contiguous()


def _normalized(chw: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(pixel / 255 - mean[c]) / std[c]``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (chw.float() / 255.0 - m) / s


@dataclass(frozen=True)
class ImageDataset:
    """A train/test pair of splits with its per-channel normalisation (``mean``, ``std``: tuples
    of C floats), class names and the directory it was read from (None for in-memory data);
    ``source``: what :func:`load_dataset` takes to read it again (a dataset name, with ``root``,
    or a folder), None for in-memory data."""

    name: str
    train: Split
    test: Split
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    root: Path | None
    source: str | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example as the model sees it."""
        return tuple(int(d) for d in self.train.x.shape[1:])

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def split(self, name: str) -> Split:
        if name not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {name!r}")
        return self.train if name == "train" else self.test

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 display images ``(N, H, W)`` or ``(N, H, W, 3)`` -> float32 ``(N, C, H, W)``,
        ``(pixel / 255 - mean[c]) / std[c]``."""
        chw = _to_chw(images)
        if chw.shape[1] != len(self.mean):
            raise ValueError(
                f"{self.name} has {len(self.mean)} channel(s); images of shape "
                f"{tuple(images.shape)} have {chw.shape[1]}"
            )
        return _normalized(chw, self.mean, self.std)


def subset_indices(n_total: int, size: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of ``range(n_total)`` of ``size`` items (all, in order, if None)."""
    if size is None or size >= n_total:
        return torch.arange(n_total)
    if size <= 0:
        raise ValueError(f"subset size must be positive, got {size}")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:size].sort().values


def holdout_indices(labels: torch.Tensor, fraction: float = HOLDOUT_FRACTION, seed: int = 0):
    """Split ``range(len(labels))`` into ``(train, test)`` index tensors (each sorted): from every
    class, a seeded random ``round(fraction · n)`` of its n examples (at least one when n ≥ 2,
    none when n = 1) goes to test."""
    g = torch.Generator().manual_seed(seed)
    test = []
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        n = len(members)
        k = 0 if n < 2 else max(1, round(fraction * n))
        test.append(members[torch.randperm(n, generator=g)[:k]])
    test_idx = torch.cat(test).sort().values if test else torch.empty(0, dtype=torch.long)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test_idx] = False
    return keep.nonzero().flatten(), test_idx


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


def _prepare_shipped_mnist(root: Path, source: Path, repair: bool = True) -> None:
    """Make ``root/MNIST/raw`` hold the four original MNIST files: check each one and extract it
    from the shipped copies in ``source`` when it is missing, or damaged and ``repair`` (ntkviz's
    own cache; in a directory of the user's a damaged file is theirs to replace, not ours)
    (atomically per file). Raises :class:`DatasetError` naming the file when a damaged file is
    not repaired."""
    raw = root / "MNIST" / "raw"
    for name, (size, digest) in MNIST_FILES.items():
        target = raw / name
        damage = _damage(target, size, digest)
        if damage is None:
            continue
        if damage != "missing" and not repair:
            raise DatasetError(
                f"MNIST: {target} is not the original file ({damage}); ntkviz does not overwrite "
                "files in a directory you chose: replace or delete it, or use another directory"
            )
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


def _check_files(where: Path, files: dict[str, int], download: bool, label: str) -> None:
    """Check that ``files`` (name -> IDX dimensions, or None for other files) are in ``where``
    (unless torchvision may download them) and that each IDX file's size matches its header."""
    missing = [name for name in files if not (where / name).exists()]
    if missing and not download:
        raise DatasetError(
            f"{label}: dataset files not found in {where}: {', '.join(missing)} (pass "
            "download=True / --download to fetch them online)"
        )
    if not missing:
        for name, dims in files.items():
            if dims is not None:
                _check_idx(where / name, dims, label)


def _construct(make, where: Path, download: bool, label: str):
    """``make()`` (a torchvision dataset), its exceptions turned into one :class:`DatasetError`."""
    try:
        return make()
    except RuntimeError as e:
        text = str(e).lower()
        if "corrupt" in text:
            raise DatasetError(
                f"{label}: files in {where} are corrupt: they differ from the official files "
                "(md5 mismatch); delete them and download them again (download=True, --download, "
                "or Download in the dataset dialog)"
            ) from None
        if "not found" in text:
            hint = (
                ""
                if download
                else " (download=True, --download, or Download in the dataset dialog fetches it "
                "online)"
            )
            raise DatasetError(f"{label}: dataset files not found in {where}{hint}") from None
        raise DatasetError(f"{label}: files in {where} are truncated or corrupt ({e})") from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:  # before OSError
        raise DatasetError(
            f"{label}: could not download it into {where}: {getattr(e, 'reason', e)} (is this "
            "machine online?)"
        ) from None
    except (AssertionError, ValueError, OSError, EOFError) as e:
        raise DatasetError(
            f"{label}: files in {where} are truncated or corrupt ({type(e).__name__}: {e})"
        ) from e
    except Exception as e:  # network errors from download=True
        raise DatasetError(f"{label}: could not obtain the dataset into {where}: {e}") from e


def _check_labels(labels: torch.Tensor, classes: int, labels_file, label: str) -> torch.Tensor:
    labels = torch.as_tensor(labels).long()
    outside = (labels < 0) | (labels >= classes)
    if bool(outside.any()):
        k = int(outside.nonzero()[0, 0])
        raise DatasetError(
            f"{label}: {labels_file} is corrupt: label {int(labels[k])} of example {k} is not one "
            f"of the {classes} classes 0..{classes - 1}"
        )
    return labels


def _check_shapes(images, labels, shape: tuple[int, ...], where: Path, label: str) -> None:
    if tuple(images.shape[1:]) != shape or len(images) != len(labels):
        raise DatasetError(
            f"{label}: files in {where} have unexpected shapes "
            f"images {tuple(images.shape)}, labels {tuple(labels.shape)}"
        )


def _read_idx(spec: DatasetSpec, root: Path, download: bool):
    """MNIST, FashionMNIST, KMNIST: ``<root>/<Class>/raw`` IDX files."""
    import torchvision.datasets as tvd

    label, where = spec.cls_name, root / spec.cls_name / "raw"
    _check_files(where, IDX_FILES, download, label)
    cls = getattr(tvd, spec.cls_name)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = _construct(
            lambda s=split: cls(root=str(root), train=s == "train", download=download),
            where, download, label,
        )  # fmt: skip
        labels = torch.as_tensor(ds.targets)
        _check_shapes(ds.data, labels, spec.shape[1:], where, label)
        labels_file = where / f"{prefix}-labels-idx1-ubyte"
        out[split] = (ds.data, _check_labels(labels, len(spec.classes), labels_file, label))
    return out, spec.classes, where


def _read_emnist(spec: DatasetSpec, root: Path, download: bool):
    """EMNIST letters: labels 1..26 -> 0..25; images transposed back to upright."""
    import torchvision.datasets as tvd

    label, where = "EMNIST letters", root / "EMNIST" / "raw"
    files = {
        f"emnist-letters-{s}-{kind}": dims
        for s in ("train", "test")
        for kind, dims in (("images-idx3-ubyte", 3), ("labels-idx1-ubyte", 1))
    }
    _check_files(where, files, download, label)
    out = {}
    for split in ("train", "test"):
        ds = _construct(
            lambda s=split: tvd.EMNIST(str(root), "letters", train=s == "train", download=download),
            where, download, label,
        )  # fmt: skip
        labels = torch.as_tensor(ds.targets)
        _check_shapes(ds.data, labels, (28, 28), where, label)
        labels_file = where / f"emnist-letters-{split}-labels-idx1-ubyte"
        labels = _check_labels(labels - 1, 26, labels_file, label)
        out[split] = (ds.data.transpose(1, 2).contiguous(), labels)
    return out, spec.classes, where


def _read_cifar(spec: DatasetSpec, root: Path, download: bool):
    """CIFAR-10/100. torchvision unpickles the batch files, but only after checking each one's
    md5 against the official file's (``CIFAR10._check_integrity`` and ``_load_meta``), so only
    the official files are ever unpickled; this reader never bypasses that check."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, spec.cls_name)
    label, where = spec.cls_name, root / cls.base_folder
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    _check_files(where, dict.fromkeys(names), download, label)
    out, classes = {}, None
    for split in ("train", "test"):
        ds = _construct(
            lambda s=split: cls(root=str(root), train=s == "train", download=download),
            where, download, label,
        )  # fmt: skip
        images, labels = torch.from_numpy(ds.data), torch.as_tensor(ds.targets)
        _check_shapes(images, labels, (32, 32, 3), where, label)
        classes = tuple(str(c) for c in ds.classes)
        out[split] = (images, _check_labels(labels, len(classes), where, label))
    return out, classes, where


def _read_svhn(spec: DatasetSpec, root: Path, download: bool):
    """SVHN: ``<root>/{train,test}_32x32.mat`` (md5-checked by torchvision; needs scipy)."""
    import torchvision.datasets as tvd

    label, where = "SVHN", root
    files = [tvd.SVHN.split_list[s][1] for s in ("train", "test")]
    _check_files(where, dict.fromkeys(files), download, label)
    try:
        import scipy.io  # noqa: F401  (torchvision's SVHN reads .mat files with it)
    except ImportError:
        raise DatasetError(
            "SVHN: reading SVHN needs scipy, which is not installed here (pip install scipy)"
        ) from None
    out = {}
    for split in ("train", "test"):
        ds = _construct(
            lambda s=split: tvd.SVHN(str(root), split=s, download=download), where, download, label
        )
        images, labels = torch.from_numpy(ds.data), torch.as_tensor(ds.labels)
        _check_shapes(images, labels, (3, 32, 32), where, label)
        labels = _check_labels(labels, 10, where / tvd.SVHN.split_list[split][1], label)
        out[split] = (images.permute(0, 2, 3, 1).contiguous(), labels)
    return out, spec.classes, where


_READERS = {"idx": _read_idx, "emnist": _read_emnist, "cifar": _read_cifar, "svhn": _read_svhn}


def _looks_like_path(name) -> bool:
    if isinstance(name, os.PathLike):
        return True
    return any(sep in name for sep in ("/", os.sep)) or name.startswith(("~", "."))


def resolve_dataset(name_or_dir: str | Path) -> str | Path:
    """What ``name_or_dir`` names: a :data:`DATASETS` key, or an existing directory (a
    :class:`~pathlib.Path`); see :func:`load_dataset`. Raises :class:`DatasetError` for an
    unknown name or a missing directory, reading nothing."""
    key = None if _looks_like_path(name_or_dir) else dataset_key(name_or_dir)
    if key is not None:
        return key
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DatasetError(f"{path} is not a directory of images (ImageFolder layout)")
    if _looks_like_path(name_or_dir):
        raise DatasetError(f"the dataset directory {path} does not exist")
    raise DatasetError(
        f"unknown dataset {str(name_or_dir)!r}; choose one of {', '.join(DATASETS)}, or give a "
        "directory of images (DIR/<class>/*.png, or DIR/train/<class>/… and DIR/test/<class>/…)"
    )


def load_dataset(
    name_or_dir: str | Path = "mnist", root: str | Path | None = None, download: bool = False
) -> ImageDataset:
    """Load a dataset by name, or the images in a directory.

    ``name_or_dir``: a name of :data:`DATASETS` or :data:`ALIASES` (case-insensitive; "mnist" is
    shipped and works offline), or an existing directory in ``ImageFolder`` layout (see the
    module docstring; a path that names a dataset is taken as a path when it contains a ``/`` or
    starts with ``.`` or ``~``). ``root``: the directory that holds named datasets' files
    (default: ``<cache>/datasets``). ``download``: let torchvision fetch missing files from the
    internet. Raises :class:`DatasetError` naming the set, the directory and the files.
    """
    if not isinstance(name_or_dir, str | os.PathLike) or not str(name_or_dir).strip():
        raise DatasetError(
            f"a dataset is given by a name (such as 'mnist') or a directory, got {name_or_dir!r}"
        )
    where = resolve_dataset(name_or_dir)
    if isinstance(where, Path):
        return load_image_folder(where)
    key = where
    spec = DATASETS[key]
    cache = root is None
    root = Path(root).expanduser() if root is not None else default_cache_dir() / "datasets"
    if key == "mnist":
        _prepare_shipped_mnist(root, SHIPPED_MNIST, repair=cache)
    if root.exists() and not root.is_dir():
        raise DatasetError(f"{spec.cls_name}: the data directory {root} is a file")
    if download or cache:  # a directory the user names is not created to find it empty
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatasetError(
                f"{spec.cls_name}: cannot create the data directory {root}: {e}"
            ) from e
    raw, classes, where = _READERS[spec.kind](spec, root, download)
    splits = {}
    for split, (images, labels) in raw.items():
        x = _normalized(_to_chw(images), spec.mean, spec.std)
        splits[split] = Split(images=images, x=x, y=labels)
    log.info(
        "loaded %s from %s: %d training and %d test images",
        spec.cls_name, where, len(splits["train"]), len(splits["test"]),
    )  # fmt: skip
    return ImageDataset(
        key, splits["train"], splits["test"], spec.mean, spec.std, classes, root, source=key
    )


# --------------------------------------------------------------------------- images in memory


def channel_stats(chw: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population standard deviation of uint8 images ``(N, C, H, W)`` on
    the 0..1 scale (pixel / 255), exact (from each channel's histogram). A constant channel gets
    std 1 (nothing to scale)."""
    means, stds = [], []
    values = torch.arange(256, dtype=torch.float64) / 255.0
    for c in range(chw.shape[1]):
        hist = torch.bincount(chw[:, c].reshape(-1).long(), minlength=256).double()
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        var = float((hist * (values - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(math.sqrt(var) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def _pixel_dataset(name, train, test, classes, root) -> ImageDataset:
    """An :class:`ImageDataset` of uint8 ``(N, C, H, W)`` splits normalised with the training
    split's per-channel statistics."""
    (train_chw, train_y), (test_chw, test_y) = train, test
    mean, std = channel_stats(train_chw)
    splits = [
        Split(images=_to_display(chw), x=_normalized(chw, mean, std), y=y)
        for chw, y in ((train_chw, train_y), (test_chw, test_y))
    ]
    return ImageDataset(name, splits[0], splits[1], mean, std, tuple(classes), root)


#: PIL modes read as one grayscale channel.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def _pil_pixels(image) -> torch.Tensor:
    """A PIL image as uint8 ``(C, H, W)``: one channel for grayscale modes, else RGB."""
    from torchvision.transforms.functional import pil_to_tensor

    mode = "L" if image.mode in GRAY_MODES else "RGB"
    return pil_to_tensor(image if image.mode == mode else image.convert(mode))


def _stack_pixels(items: list[torch.Tensor]) -> torch.Tensor:
    """uint8 ``(C, H, W)`` images (same H, W; C = 1 or 3) as one ``(N, C, H, W)`` tensor, all
    RGB when any one is."""
    if any(t.shape[0] == 3 for t in items):
        items = [t.expand(3, -1, -1) if t.shape[0] == 1 else t for t in items]
    return torch.stack(items) if items else torch.empty(0, 1, 1, 1, dtype=torch.uint8)


def _read_folder(directory: Path, class_names: list[str] | None = None):
    """The images under ``directory/<class>/`` as uint8 ``(C, H, W)`` tensors, their labels and
    the class names (``class_names``: map folders to these, for a test split)."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, _ = find_classes(str(directory))
    except FileNotFoundError:
        raise DatasetError(
            f"{directory} holds no class folders: expected one folder of images per class "
            f"({directory}/<class>/<image>.png)"
        ) from None
    except OSError as e:
        raise DatasetError(f"cannot read the image directory {directory}: {e}") from None
    names = class_names if class_names is not None else classes
    if class_names is not None:
        unknown = [c for c in classes if c not in class_names]
        if unknown:
            raise DatasetError(
                f"{directory} has the class folder(s) {', '.join(unknown[:5])} that the "
                f"training split lacks; its classes are {', '.join(class_names[:10])}"
            )
    to_index = {c: names.index(c) for c in classes}
    samples = make_dataset(str(directory), to_index, IMG_EXTENSIONS, allow_empty=True)
    found = {label for _, label in samples}
    empty = [c for c in classes if to_index[c] not in found]
    if empty:
        raise DatasetError(
            f"{directory}: no images in the class folder(s) {', '.join(empty[:5])} (images are "
            f"files ending in {', '.join(IMG_EXTENSIONS)})"
        )
    pixels, labels = [], []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.load()
                pixels.append(_pil_pixels(image))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{path} is not a readable image ({type(e).__name__}: {e})") from e
        labels.append(label)
    return pixels, [p for p, _ in samples], torch.tensor(labels, dtype=torch.long), names


def _check_sizes(pixels: list[torch.Tensor], paths: list[str]) -> None:
    """All images must have one size: name the first that differs from the first image."""
    h, w = pixels[0].shape[1:]
    for t, path in zip(pixels, paths):
        if tuple(t.shape[1:]) != (h, w):
            raise DatasetError(
                f"{path} is {t.shape[2]}×{t.shape[1]} pixels but {paths[0]} is {w}×{h}: all "
                "images must have one size (resize them first)"
            )


#: Folder names that mark a split layout: train/ beside one of the others and no test/ is refused.
SPLIT_NAMES = {"train", "val", "valid", "validation", "dev", "eval"}


def load_image_folder(directory: str | Path) -> ImageDataset:
    """The images in ``directory`` (``ImageFolder`` layout, see the module docstring) as an
    :class:`ImageDataset` named after the directory. Raises :class:`DatasetError` naming the
    folder or file at fault."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise DatasetError(f"the dataset directory {directory} does not exist")
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        pixels, paths, y, classes = _read_folder(directory / "train")
        test_pixels, test_paths, test_y, _ = _read_folder(directory / "test", classes)
        _check_sizes(pixels + test_pixels, paths + test_paths)
        chw = _stack_pixels(pixels + test_pixels)
        train, test = (chw[: len(y)], y), (chw[len(y) :], test_y)
    else:
        # train/ beside val/ or valid/ (each of class folders) is a split layout, not two
        # classes "train" and "valid" of nested images, as ImageFolder would read it
        folders = {p.name for p in directory.iterdir() if p.is_dir()}
        if "train" in folders and folders <= SPLIT_NAMES and len(folders) > 1:
            raise DatasetError(
                f"{directory} holds {', '.join(sorted(f + '/' for f in folders))}: a training "
                "split but no test/ beside it; name the held-out split test/, or put the class "
                f"folders directly in {directory}"
            )
        pixels, paths, y, classes = _read_folder(directory)
        _check_sizes(pixels, paths)
        chw = _stack_pixels(pixels)
        train_idx, test_idx = holdout_indices(y)
        if not len(test_idx):
            raise DatasetError(
                f"{directory}: too few images to hold out a test split (each class needs ≥ 2)"
            )
        train, test = (chw[train_idx], y[train_idx]), (chw[test_idx], y[test_idx])
    if len(classes) < 2:
        raise DatasetError(
            f"{directory} has {len(classes)} class folder(s); a classifier needs at least 2"
        )
    data = replace(_pixel_dataset(directory.name, train, test, classes, directory),
                   source=str(directory.resolve()))  # fmt: skip
    log.info(
        "loaded %s: %d training and %d test images of shape %s, %d classes",
        directory, len(data.train), len(data.test), data.input_shape, data.num_classes,
    )  # fmt: skip
    return data


# --------------------------------------------------------------------------- the user's datasets


def _is_map_style(obj) -> bool:
    return (
        hasattr(obj, "__getitem__")
        and hasattr(obj, "__len__")
        and not isinstance(obj, str | bytes | torch.Tensor)
    )


def _looks_like_item(obj) -> bool:
    """Whether ``obj`` is an ``(image, label)`` pair rather than a dataset."""
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        return False
    image = obj[0]
    return isinstance(image, torch.Tensor) or (hasattr(image, "mode") and hasattr(image, "size"))


def _read_items(ds, which: str, kind: list) -> tuple[object, torch.Tensor]:
    """Every ``(image, label)`` item of the map-style dataset ``ds``: images as one float32
    tensor ``(N, C, H, W)`` (tensor items, as they are) or a list of uint8 ``(C, H, W)`` (PIL
    images and uint8 tensors), labels int64. ``kind``: a one-element list shared between the
    splits, fixing "float" or "pixels" after the first item."""
    from ntkviz.checks import class_index

    try:
        n = len(ds)
    except Exception as e:
        raise DatasetError(f"{which} has no length: {type(e).__name__}: {e}") from e
    if n == 0:
        raise DatasetError(f"{which} is empty")
    labels = torch.empty(n, dtype=torch.long)
    x = None
    pixels: list[torch.Tensor] = []
    shape = None
    for i in range(n):
        where = f"item {i} of {which}"
        try:
            item = ds[i]
        except Exception as e:
            raise DatasetError(f"{where} cannot be read: {type(e).__name__}: {e}") from e
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"{where} must be an (image, label) pair, got {type(item).__name__}")
        image, label = item
        labels[i] = class_index(label, f"the label of {where}")
        if isinstance(image, torch.Tensor) and image.is_floating_point():
            this = "float"
            t = image.detach()
            if t.ndim == 2:
                t = t.unsqueeze(0)
        elif isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
            this, t = "pixels", image.detach().unsqueeze(0) if image.ndim == 2 else image.detach()
        elif hasattr(image, "mode") and hasattr(image, "convert"):  # a PIL image
            this, t = "pixels", _pil_pixels(image)
        else:
            what = f"a {image.dtype} tensor" if isinstance(image, torch.Tensor) else type(image)
            raise ValueError(
                f"{where}: the image must be a float tensor (C, H, W), a uint8 tensor or a PIL "
                f"image, got {getattr(what, '__name__', what)}"
            )
        if kind[0] is None:
            kind[0] = this
        elif kind[0] != this:
            expected = "float tensors" if kind[0] == "float" else "PIL images or uint8 tensors"
            raise ValueError(f"{where} is not like the items before it: expected {expected}")
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ValueError(
                f"{where}: the image has shape {tuple(t.shape)}; expected (C, H, W) with 1 or "
                "3 channels (or (H, W))"
            )
        if shape is None:
            shape = tuple(t.shape) if this == "float" else tuple(t.shape[1:])
            if this == "float":
                x = torch.empty((n, *shape), dtype=torch.float32)
        if this == "float":
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{where}: the image has shape {tuple(t.shape)}, item 0's has {shape}; all "
                    "examples must have one shape"
                )
            x[i] = t
        else:
            if tuple(t.shape[1:]) != shape:
                raise ValueError(
                    f"{where}: the image is {t.shape[2]}×{t.shape[1]} pixels, item 0 is "
                    f"{shape[1]}×{shape[0]}; all examples must have one size"
                )
            pixels.append(t)
    if x is not None and not bool(torch.isfinite(x).all()):
        k = int((~torch.isfinite(x.flatten(1))).any(1).nonzero()[0, 0])
        raise ValueError(f"item {k} of {which} holds non-finite values")
    return (x if x is not None else pixels), labels


def _class_names(source, classes, labels: list[tuple[str, torch.Tensor]]) -> tuple[str, ...]:
    """From ``source.classes``, else ``classes``, else ``source.num_classes``, else max label + 1;
    every label must be one of them."""
    found = getattr(source, "classes", None)
    if isinstance(found, list | tuple) and len(found) >= 1:
        names = tuple(str(c) for c in found)
    elif classes is not None:
        names = tuple(str(c) for c in classes)
    else:
        count = getattr(source, "num_classes", None)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            count = 1 + max(int(y.max()) for _, y in labels)
        names = tuple(str(i) for i in range(count))
    if len(names) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {len(names)}: {names}")
    for which, y in labels:
        outside = (y >= len(names)).nonzero()
        if len(outside):
            k = int(outside[0, 0])
            raise ValueError(
                f"item {k} of {which} has label {int(y[k])}, outside the "
                f"{len(names)} classes 0..{len(names) - 1}"
            )
    return names


def _display_from_float(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """float ``(N, C, H, W)`` -> uint8 display images, ``round((x - lo) / (hi - lo) · 255)``."""
    out = torch.empty(x.shape, dtype=torch.uint8)
    scale = 255.0 / (hi - lo)
    for s in range(0, len(x), 4096):
        chunk = x[s : s + 4096] - lo
        out[s : s + 4096] = chunk.mul_(scale).round_().clamp_(0, 255)
    return _to_display(out)


def as_image_dataset(data, *, name: str | None = None, classes=None) -> ImageDataset:
    """The :class:`ImageDataset` of ``data``:

    - an :class:`ImageDataset`: returned as it is;
    - a str or path: :func:`load_dataset` of it;
    - a ``(train, test)`` pair of map-style datasets yielding ``(image, label)`` — e.g.
      ``torchvision.datasets.FakeData``, with or without ``transform=ToTensor()``;
    - one map-style dataset: split with :func:`holdout_indices` (a seeded, stratified sixth of
      each class is the test split).

    Float tensor items ``(C, H, W)`` (or ``(H, W)``) are what the model sees: ``x`` holds them
    exactly as the dataset yields them (its own transform is respected). The display
    ``images`` map them to 0..255: ``x · 255`` when all values of both splits lie in [0, 1],
    else min-max over both splits; ``mean``/``std`` are set so that :meth:`ImageDataset.
    normalize` inverts that mapping. PIL images and uint8 tensors are pixels, normalised with
    the training split's per-channel mean and std (:func:`channel_stats`). Images must have 1
    or 3 channels and one shape throughout.

    Class names: the dataset's ``.classes``, else ``classes``, else ``"0"``..``"V-1"`` with V
    its ``.num_classes`` or the largest label + 1. Raises ``ValueError`` or
    :class:`DatasetError` saying which item is wrong and what was expected.
    """
    if isinstance(data, ImageDataset):
        return data
    if isinstance(data, str | os.PathLike):
        return load_dataset(data)
    pair = (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(_is_map_style(d) and not _looks_like_item(d) for d in data)
    )
    if pair:
        train_ds, test_ds = data
    elif _is_map_style(data):
        train_ds, test_ds = data, None
    else:
        raise ValueError(
            "data must be an ImageDataset, a dataset name or directory, a (train, test) pair of "
            f"map-style datasets, or one map-style dataset; got {type(data).__name__}"
        )
    kind: list = [None]
    train, train_y = _read_items(train_ds, "the training dataset" if pair else "the dataset", kind)
    if test_ds is not None:
        test, test_y = _read_items(test_ds, "the test dataset", kind)
    else:
        test, test_y = None, None
    if kind[0] == "float":
        x_all = train if test is None else None
        if test is not None and tuple(test.shape[1:]) != tuple(train.shape[1:]):
            raise ValueError(
                f"the test examples have shape {tuple(test.shape[1:])}, the training examples "
                f"{tuple(train.shape[1:])}; both must have one shape"
            )
    else:
        sizes = {tuple(t.shape[1:]) for t in (train[:1] + (test[:1] if test else []))}
        if len(sizes) > 1:
            raise ValueError(f"the test and training images differ in size: {sorted(sizes)}")
        x_all = None
    # labels checked by the datasets' own item numbers, before any test split is held out
    named = [("the training dataset" if pair else "the dataset", train_y)]
    names = _class_names(
        train_ds, classes, named + ([("the test dataset", test_y)] if pair else [])
    )
    if test is None:  # one dataset: hold out a stratified sixth
        train_idx, test_idx = holdout_indices(train_y)
        if not len(test_idx):
            raise ValueError("too few examples to hold out a test split (each class needs ≥ 2)")
        if kind[0] == "float":
            train, test = x_all[train_idx], x_all[test_idx]
        else:
            train, test = [train[i] for i in train_idx], [train[i] for i in test_idx]
        train_y, test_y = train_y[train_idx], train_y[test_idx]
    label = name or type(train_ds).__name__
    if kind[0] == "pixels":
        return _pixel_dataset(label, (_stack_pixels(train), train_y),
                              (_stack_pixels(test), test_y), names, None)  # fmt: skip
    lo = min(float(train.min()), float(test.min()))
    hi = max(float(train.max()), float(test.max()))
    if lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif hi - lo <= 0:
        hi = lo + 1.0
    channels = train.shape[1]
    mean, std = (0.0 - lo / (hi - lo),) * channels, (1.0 / (hi - lo),) * channels
    splits = [
        Split(images=_display_from_float(x, lo, hi), x=x, y=y)
        for x, y in ((train, train_y), (test, test_y))
    ]
    return ImageDataset(label, splits[0], splits[1], mean, std, names, None)
