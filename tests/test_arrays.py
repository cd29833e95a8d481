"""Read-only result arrays and a norm that neither underflows nor overflows."""

import numpy as np
import pytest
import torch

from ntkviz.arrays import frozen, norm, readonly


@pytest.mark.parametrize("scale", [1.0, 1e-200, 1e-300, 1e200, 3e-320])
def test_norm_is_the_euclidean_norm_at_any_scale(scale):
    x = np.array([[3.0, -4.0], [12.0, 0.0]])
    with np.errstate(over="ignore", under="ignore"):
        plain = np.linalg.norm(x * scale)
    assert norm(x * scale) == pytest.approx(13.0 * scale, rel=1e-12 if scale > 1e-300 else 1e-3)
    if scale == 1.0:
        assert norm(x) == np.linalg.norm(x)
    else:  # np.linalg.norm squares the entries first: 0 or inf
        assert plain in (0.0, np.inf)


def test_norm_of_nothing_zeros_inf_and_nan():
    assert norm(np.zeros(0)) == 0.0 and norm(np.zeros(3)) == 0.0
    assert norm([1.0, -np.inf]) == np.inf and np.isnan(norm([1.0, np.nan]))


def test_readonly_copies_tensors_and_arrays_and_frozen_is_float64_without_negative_zeros():
    t = torch.tensor([1.5, -0.0], dtype=torch.float32)
    a = readonly(t)
    assert a.dtype == np.float32 and not a.flags.writeable
    t[0] = 7.0
    assert a[0] == 1.5  # a copy
    src = np.arange(3)
    b = readonly(src, np.int64)
    src[0] = 9
    assert b.tolist() == [0, 1, 2] and not b.flags.writeable
    f = frozen(t)
    assert f.dtype == np.float64 and not f.flags.writeable and not np.signbit(f[1])
    assert readonly(torch.tensor([0.1], dtype=torch.float32), np.float64)[0] == np.float32(0.1)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_norm_takes_tensors_and_complex_entries_and_readonly_takes_bfloat16():
    t = torch.tensor([3.0, -4.0], requires_grad=True)
    assert norm(t) == 5.0
    assert norm(np.array([3 + 4j, 0])) == 5.0
    b = readonly(torch.tensor([1.5, -2.0], dtype=torch.bfloat16))
    assert b.dtype == np.float32 and b.tolist() == [1.5, -2.0]
    half = torch.tensor([3 + 4j, 0j], dtype=torch.complex32)  # numpy has no complex32
    assert norm(half) == 5.0 and readonly(half).tolist() == [3 + 4j, 0j]


def test_complex_values_are_refused_where_real_numbers_are_asked_for():
    with pytest.raises(ValueError, match="complex values"):
        frozen(torch.tensor([1 + 2j]))
    with pytest.raises(ValueError, match="complex values"):
        readonly(np.array([1 + 2j]), np.float64)
    assert readonly(np.array([1 + 2j]))[0] == 1 + 2j  # kept as they are when no dtype is asked
