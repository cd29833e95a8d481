"""Files on disk: atomic writes with ordinary file modes, and torch files read without running code.

:func:`atomic_write` writes beside the target and renames, so readers never see a partial file; a
new file gets the user's umask (``0666 & ~umask``, as ``open`` would give it) and an overwritten
file keeps its mode. :func:`load_torch_file` reads with ``torch.load(..., weights_only=True)`` and
turns every failure into one clear message (never torch's advice to disable ``weights_only``).
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import secrets
import stat
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

from ntkviz.errors import FileWriteError, NtkvizError

log = logging.getLogger(__name__)


def _create_temp(directory: Path, name: str) -> Path:
    """A new empty file ``directory/.name.<random>.part``, created with mode 0666 minus the umask
    (``mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = directory / f".{name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name in {directory}")


def _reason(path: Path, e: BaseException) -> str:
    if isinstance(e, OSError):
        text = e.strerror or str(e)
        return text if text.startswith("cannot write") else f"cannot write {path}: {text}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"cannot write {path}: {first} (is the disk full or read-only?)"


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.

    The file gets the user's umask when new and keeps its mode when replaced. Raises
    :class:`~ntkviz.errors.FileWriteError` (an ``OSError``) naming ``path`` when the directory
    is missing or read-only or the write fails (``OSError``, or the ``RuntimeError`` that
    ``torch.save`` raises on a full disk); nothing is left behind."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "does not exist"
        raise FileWriteError(f"cannot write {path}: {directory} {what}")
    if path.is_dir():
        raise FileWriteError(f"cannot write {path}: it is a directory")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = None  # a new file: the umask decides
    try:
        tmp = _create_temp(directory, path.name)
    except OSError as e:
        raise FileWriteError(_reason(path, e)) from e
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError | RuntimeError) and not isinstance(e, NtkvizError):
            raise FileWriteError(_reason(path, e)) from e
        raise
    log.info("wrote %s", path)
    return path


def write_npz(path: str | Path, arrays: dict) -> Path:
    """Write named arrays to an ``.npz`` file at ``path`` atomically (see :func:`atomic_write`)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def check_writable(path: str | Path) -> None:
    """Raise :class:`~ntkviz.errors.FileWriteError` saying why ``path`` could not be written
    (no such directory, a directory in its place, no permission, a read-only file system),
    by creating and removing a temporary file beside it; nothing else is touched."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FileWriteError(f"cannot write {path}: it is a directory")
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FileWriteError(f"cannot write {path}: {directory} {what}")
    try:
        _create_temp(directory, path.name).unlink()
    except OSError as e:
        raise FileWriteError(_reason(path, e)) from e


def refused_objects(path: Path, e: Exception) -> bool:
    """Whether ``torch.load(path, weights_only=True)`` failed with ``e`` because the file holds
    objects other than tensors and plain values — not because it is no torch.save file at all
    (random bytes fail the same way): torch.save writes a zip archive or a pickle (protocol ≥ 2)."""
    if "weights only" not in str(e).lower() and "weights_only" not in str(e):
        return False
    if "unsupported operand" in str(e).lower():  # not a pickle's opcode: damaged, or no pickle
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return (head == b"PK" and zipfile.is_zipfile(path)) or head[:1] == b"\x80"


def load_torch_file(path: str | Path, what: str, error: type[NtkvizError]):
    """The object stored in ``path`` by ``torch.save``, read with ``weights_only=True`` (no code
    runs). Raises ``error`` naming ``path`` and ``what`` (e.g. "checkpoint") when the file is
    missing, damaged, of another kind, or holds objects other than tensors and plain values."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} {'is a directory' if path.is_dir() else 'does not exist'}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4 …"
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if refused_objects(path, e):
            raise error(
                f"{path} is not a readable ntkviz {what} (it contains objects other than tensors "
                "and plain values; it was not opened)"
            ) from None
        raise error(
            f"{path} is not a readable ntkviz {what} (damaged or another kind of file)"
        ) from None
    except Exception:
        raise error(
            f"{path} is not a readable ntkviz {what} (damaged or another kind of file)"
        ) from None
    log.info("read %s %s", what, path)
    return payload
