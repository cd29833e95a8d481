"""Checks of values from users and files, each raising ``ValueError`` that says what was expected."""

from __future__ import annotations

import math

import numpy as np
import torch

#: How deep lists and dicts may nest in a file's plain values.
MAX_DEPTH = 32


def _item(value):
    """The Python number inside a numpy scalar, 0-d array or 0-d tensor (else ``value``);
    None for bools, complex numbers and anything with more than one element."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0 or value.dtype == torch.bool or value.is_complex():
            return None
        return value.item()
    if isinstance(value, np.ndarray | np.generic):
        if np.ndim(value) != 0 or value.dtype.kind not in "iuf":
            return None
        return value.item()
    return None if isinstance(value, bool) else value


def real_number(value, name: str) -> float:
    """``value`` as a float if it is one finite real number: a Python, numpy or 0-d tensor int
    or float. Bools, complex and non-finite numbers are refused."""
    v = _item(value)
    if isinstance(v, int | float) and not isinstance(v, bool):
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if math.isfinite(f):
            return f
    raise ValueError(
        f"{name} must be a finite real number (int, float, numpy scalar or 0-d tensor), "
        f"got {value!r}"
    )


def class_index(value, name: str, num_classes: int | None = None) -> int:
    """``value`` as an int class in ``[0, num_classes)`` (``[0, ∞)`` when None): a Python,
    numpy or 0-d tensor integer; bools and floats are refused."""
    v = _item(value)
    ok = isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if ok and (num_classes is None or v < num_classes):
        return v
    upper = "" if num_classes is None else f" below {num_classes}"
    raise ValueError(f"{name} must be an int class ≥ 0{upper}, got {value!r}")


def count(value, name: str) -> int:
    """``value`` as an int ≥ 0 (a step count): a Python, numpy or 0-d tensor integer."""
    v = _item(value)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return v
    raise ValueError(f"{name} must be an int ≥ 0, got {value!r}")


def positive_int(value, name: str) -> int:
    """``value`` as an int ≥ 1: a Python, numpy or 0-d tensor integer (not a bool)."""
    v = _item(value)
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")


def plain_values(value, where: str, *, tensors: bool = False, depth: int = 0) -> None:
    """Check that ``value`` holds only None, bools, ints, floats, strings, and lists, tuples and
    dicts (with string keys) of them — and tensors if ``tensors``. ``where`` names ``value`` in
    the message."""
    if value is None or isinstance(value, bool | int | float | str):
        return
    if tensors and isinstance(value, torch.Tensor):
        return
    if depth >= MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            plain_values(v, f"{where}[{i}]", tensors=tensors, depth=depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a key {k!r} that is not a string")
            plain_values(v, f"{where}[{k!r}]", tensors=tensors, depth=depth + 1)
        return
    allowed = "numbers, strings, lists and dicts" + (" and tensors" if tensors else "")
    raise ValueError(f"{where} holds a {type(value).__name__}; only {allowed} may appear there")
