"""Numpy results: read-only copies (what a result holds, or hands across threads, must not
change) and a Euclidean norm that neither underflows nor overflows."""

from __future__ import annotations

import numpy as np


def readonly(a, dtype=None) -> np.ndarray:
    """A read-only numpy copy of ``a`` (an array, a torch tensor or a nested list), as ``dtype``
    if given. (Imports no torch: the GUI imports this before torch has loaded.)"""
    out = _copy(a, dtype)
    out.flags.writeable = False
    return out


def frozen(a) -> np.ndarray:
    """A read-only float64 copy of ``a`` without negative zeros (−J·0 would print as −0)."""
    out = _copy(a, np.float64)
    out += 0.0
    out.flags.writeable = False
    return out


def _copy(a, dtype=None) -> np.ndarray:
    """A new numpy array of ``a``'s values, as ``dtype`` if given; ValueError for complex
    values where real ones are asked for."""
    if hasattr(a, "detach"):  # a tensor
        a = _numpy(a, float64=dtype is not None)
    a = np.asarray(a)
    if dtype is not None and np.iscomplexobj(a) and not np.issubdtype(dtype, np.complexfloating):
        raise ValueError(f"complex values where {np.dtype(dtype)} numbers are expected")
    return np.array(a, dtype, copy=True)


def _numpy(t, float64: bool = False) -> np.ndarray:
    """A torch tensor's values as numpy (float64 if ``float64`` and it holds floats; bfloat16
    and complex32, which numpy lacks, as float32 and complex64: exactly)."""
    t = t.detach().cpu()
    if t.is_floating_point() and (float64 or str(t.dtype) not in _NUMPY_FLOATS):
        t = t.double() if float64 else t.float()
    elif t.is_complex() and str(t.dtype) not in _NUMPY_COMPLEX:
        t = t.cfloat()
    return t.numpy()


_NUMPY_FLOATS = {"torch.float16", "torch.float32", "torch.float64"}
_NUMPY_COMPLEX = {"torch.complex64", "torch.complex128"}


def norm(x) -> float:
    """‖x‖₂ of all entries, scaled by the largest: 1e-200 or 1e200 entries give their true
    norm, where ``np.linalg.norm`` squares them to 0 or inf. NaN if any entry is NaN."""
    if hasattr(x, "detach"):  # a tensor
        x = _numpy(x)
    x = np.abs(np.asarray(x)).astype(np.float64).ravel()  # complex entries by their modulus
    if x.size == 0:
        return 0.0
    m = x.max()
    if not 0 < m < np.inf:
        return float(m)  # 0, inf or nan
    return float(m * np.sqrt(np.sum((x / m) ** 2)))
