"""The empirical NTK against explicit J·Jᵀ built with torch.autograd.functional.jacobian."""

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, explicit_jacobian, snapshot
from models import inputs, make
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ntkviz import account_step, decompose
from ntkviz.kernel import (
    _conv_as_filters,
    empirical_ntk,
    empirical_ntk_by_layer,
    iter_kernel_gram,
    layer_of,
    ntk_trace,
    ntk_vector_product,
)
from ntkviz.modelspec import check_model

MODELS = ["lenet", "mlp", "tiny_cnn", "residual"]


def reference_kernel(model, x1, x2):
    j1 = [explicit_jacobian(model, x) for x in x1]
    j2 = [explicit_jacobian(model, x) for x in x2]
    return torch.stack([torch.stack([a @ b.T for b in j2]) for a in j1])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_kernel_equals_explicit_jacobian_product(name, method):
    model = make(name)
    x1, x2 = inputs(3, seed=1), inputs(2, seed=2)
    expected = reference_kernel(model, x1, x2)
    K = empirical_ntk(model, x1, x2, method=method)
    assert K.shape == (3, 2, 10, 10)
    torch.testing.assert_close(K, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["lenet", "mlp", "tiny_cnn"])
def test_structured_path_is_taken_and_exact(name):
    model = make(name)
    x1, x2 = inputs(2, seed=3), inputs(1, seed=4)
    K = empirical_ntk(model, x1, x2, method="structured")
    torch.testing.assert_close(K, reference_kernel(model, x1, x2), rtol=1e-10, atol=1e-10)


def test_structured_path_refuses_a_non_chain_model():
    with pytest.raises(ValueError, match="structured"):
        empirical_ntk(make("residual"), inputs(1), inputs(1), method="structured")


@pytest.mark.parametrize("name", ["lenet", "mlp"])
def test_kernel_of_an_example_with_itself_is_symmetric_psd(name):
    model = make(name)
    x = inputs(4)
    K = empirical_ntk(model, x, x)
    for a in range(4):
        block = K[a, a]
        torch.testing.assert_close(block, block.T, rtol=0, atol=1e-10)
        assert torch.linalg.eigvalsh(block).min() > -1e-9
    # The whole (N·V)×(N·V) Gram matrix is PSD too.
    gram = K.permute(0, 2, 1, 3).reshape(40, 40)
    assert torch.linalg.eigvalsh((gram + gram.T) / 2).min() > -1e-8


@pytest.mark.parametrize("name", ["lenet", "residual"])
def test_swapping_arguments_transposes_blocks(name):
    model = make(name)
    x1, x2 = inputs(3, seed=5), inputs(2, seed=6)
    K12 = empirical_ntk(model, x1, x2)
    K21 = empirical_ntk(model, x2, x1)
    torch.testing.assert_close(K21, K12.permute(1, 0, 3, 2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["lenet", "mlp", "residual"])
def test_per_layer_kernels_sum_to_the_total_and_match_per_group_jacobians(name):
    model = make(name)
    x1, x2 = inputs(2, seed=7), inputs(1, seed=8)
    layers = empirical_ntk_by_layer(model, x1, x2)
    names = [n for n, _ in model.named_parameters()]
    assert set(layers) == {layer_of(n) for n in names}
    if name != "residual":  # a chain's layers come in its order (a block's branches in any)
        assert list(layers) == list(dict.fromkeys(layer_of(n) for n in names))
    torch.testing.assert_close(
        sum(layers.values()), empirical_ntk(model, x1, x2), rtol=1e-10, atol=1e-10
    )
    # Each layer against the explicit Jacobian restricted to that layer's columns.
    sizes = [p.numel() for _, p in model.named_parameters()]
    j1 = [explicit_jacobian(model, x) for x in x1]
    j2 = explicit_jacobian(model, x2[0])
    for layer, K in layers.items():
        cols = torch.cat([torch.full((s,), layer_of(n) == layer) for n, s in zip(names, sizes)])
        for a in range(2):
            expected = j1[a][:, cols] @ j2[:, cols].T
            torch.testing.assert_close(K[a, 0], expected, rtol=1e-10, atol=1e-10)


def test_batched_blocks_equal_per_pair_results_across_chunk_sizes():
    model = make("lenet")
    x1, x2 = inputs(7, seed=9), inputs(2, seed=10)
    full = empirical_ntk(model, x1, x2, chunk_size=3)
    for a in range(7):
        for b in range(2):
            pair = empirical_ntk(model, x1[a : a + 1], x2[b : b + 1])
            torch.testing.assert_close(full[a, b], pair[0, 0], rtol=1e-10, atol=1e-12)


def test_frozen_parameters_do_not_count():
    model = make("lenet")
    model.conv1.weight.requires_grad_(False)
    model.fc3.bias.requires_grad_(False)
    x1, x2 = inputs(2, seed=11), inputs(1, seed=12)
    expected = reference_kernel(model, x1, x2)
    for method in ("structured", "generic"):
        K = empirical_ntk(model, x1, x2, method=method)
        torch.testing.assert_close(K, expected, rtol=1e-10, atol=1e-10)
    # one pair takes the single-sweep path
    torch.testing.assert_close(
        empirical_ntk(model, x1[:1], x2), expected[:1], rtol=1e-10, atol=1e-10
    )


def test_trace_kernel_is_the_trace_of_the_blocks():
    model = make("mlp")
    x1, x2 = inputs(3), inputs(2)
    expected = reference_kernel(model, x1, x2).diagonal(dim1=2, dim2=3).sum(-1)
    torch.testing.assert_close(ntk_trace(model, x1, x2), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ["lenet", "residual"])
def test_model_is_left_bit_identical_with_its_mode(name):
    model = make(name)
    model.train()
    snap = snapshot(model)
    empirical_ntk(model, inputs(2), inputs(1))
    empirical_ntk_by_layer(model, inputs(2), inputs(1))
    assert_unchanged(model, snap)
    assert model.training


def test_kernel_uses_eval_mode():
    """Dropout would make the kernel random in train mode; the result must be deterministic."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.Dropout(0.5), torch.nn.Linear(32, 10)
    ).double()
    model.train()
    x = inputs(2)
    a = empirical_ntk(model, x, x[:1])
    b = empirical_ntk(model, x, x[:1])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, reference_kernel(model, x, x[:1]), rtol=1e-10, atol=1e-10)


def test_float32_model_on_whole_batches_matches_float64_reference():
    model = make("lenet").float()
    x1, x2 = inputs(50).float(), inputs(1, seed=3).float()
    K = empirical_ntk(model, x1, x2)
    K64 = empirical_ntk(model.double(), x1.double(), x2.double())
    torch.testing.assert_close(K.double(), K64, rtol=1e-4, atol=1e-4)


def test_bad_arguments_raise_value_error():
    model = make("mlp")
    with pytest.raises(ValueError, match="non-empty"):
        empirical_ntk(model, inputs(0), inputs(1))
    with pytest.raises(ValueError, match="method"):
        empirical_ntk(model, inputs(1), inputs(1), method="magic")


def test_a_model_without_values_is_refused():
    """A model on the meta device (built but not loaded) gives meta tensors, not numbers."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    x = torch.randn(2, 4)
    calls = [
        lambda: empirical_ntk(model, x, x),
        lambda: list(iter_kernel_gram(model, x)),
        lambda: decompose(model, x[0], x[1], 1, 0.1),
        lambda: account_step(model, torch.optim.SGD(model.parameters()), x, [0, 1], x),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="meta device and hold no values"):
            call()


def test_a_layer_whose_batching_rule_fails_takes_one_example_at_a_time():
    """nn.PReLU's vmap rule fails on several examples with several rows ("The size of tensor a
    (2) must match the size of tensor b (4)"), which read as a model torch.func cannot take."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.PReLU(), torch.nn.Linear(8, 4)
    ).double()
    x = torch.rand(5, 1, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(
        empirical_ntk(model, x[:3], x[3:]), reference_kernel(model, x[:3], x[3:]), rtol=1e-10,
        atol=1e-12,
    )  # fmt: skip
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    account = account_step(model, adam, x[:3], [0, 1, 2], x[3:])  # per-example gradients
    assert account.gradient.shape == (2, 3, 4) and np.isfinite(account.residual).all()


def test_a_model_whose_logits_depend_on_the_batch_is_refused():
    """Batch norm without running statistics normalises by the batch in eval mode too: K of x_o
    computed beside other examples differed from K of x_o alone (by 0.6–4 %)."""
    model = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(4, 3),
        torch.nn.BatchNorm1d(3, track_running_stats=False),
    )
    x = torch.randn(3, 4)
    assert check_model(model, x, 3) == 3  # it trains as it is; its kernels are refused
    for call in (lambda: empirical_ntk(model, x, x), lambda: decompose(model, x[0], x[1], 1, 0.1)):
        with pytest.raises(
            ValueError, match=r"layer '2' \(BatchNorm1d, track_running_stats=False\)"
        ):
            call()


class _Reshaped(torch.nn.Module):
    """Logits of a small MLP reshaped by ``how``: not ``(N, V)``."""

    def __init__(self, how):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 3))
        self.how = how

    def forward(self, x):
        return self.how(self.net(x))


@pytest.mark.parametrize(
    ("how", "got"),
    [(lambda z: z.sum(1), r"\(1,\)"), (lambda z: z.T, r"\(3, 1\)"), (lambda z: z[..., None], r"\(1, 3, 1\)")],
)  # fmt: skip
def test_a_model_that_gives_no_logits_is_refused(how, got):
    with pytest.raises(ValueError, match=rf"to logits \(N, V\); it maps \(1, 1, 28, 28\) to {got}"):
        empirical_ntk(_Reshaped(how), inputs(2), inputs(2))


@pytest.mark.parametrize("name", ["lenet", "residual"])
@pytest.mark.parametrize(
    ("x1", "x2", "match"),
    [
        (inputs(2)[0], inputs(2), r"batches of examples of one shape, got \(1, 28, 28\)"),
        (inputs(2)[0], inputs(2)[1], r"cannot take .* of shape \(1, 28, 28\): expected a batch"),
        (inputs(3)[:, :, :20], inputs(1)[:, :, :20], r"cannot take x2 .*\(1, 1, 20, 28\)"),
        ((inputs(2) * 50).to(torch.uint8), inputs(1), "floating-point inputs .* torch.uint8"),
        (inputs(2), inputs(1).bool(), "floating-point inputs .* torch.bool"),
        (inputs(2), inputs(1), "chunk_size must be an int ≥ 1, got 0"),
    ],
)
def test_inputs_the_model_cannot_take_are_refused_saying_what_was_expected(name, x1, x2, match):
    model = make(name)
    chunk = 0 if "chunk_size" in match else None
    with pytest.raises(ValueError, match=match):
        empirical_ntk(model, x1, x2, chunk_size=chunk)
    if chunk is None:
        with pytest.raises(ValueError, match=match.replace("x2", "x[12]")):
            ntk_vector_product(model, x1, x2, torch.zeros(len(x2), 10, dtype=torch.float64))


def test_both_conv_strategies_are_exact():
    """A conv layer's kernel either applies x2's weight-Jacobian rows to x1 as filters or
    materialises x1's weight Jacobian, whichever costs less: LeNet's conv2 (100 positions, 2,400
    weights) takes filters against one x2 and materialises against a probe set; both must agree
    with autograd."""
    model = make("lenet")
    assert _conv_as_filters(model.conv2, 100, 1, 10)
    assert not _conv_as_filters(model.conv2, 100, 12, 10)
    x = inputs(12, seed=13)
    K = empirical_ntk(model, x, x)
    torch.testing.assert_close(K, reference_kernel(model, x, x), rtol=1e-10, atol=1e-10)
    layers = empirical_ntk_by_layer(model, x[:3], x[3:4])
    torch.testing.assert_close(
        sum(layers.values()), reference_kernel(model, x[:3], x[3:4]), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("name", ["lenet", "mlp", "residual"])
@pytest.mark.parametrize("method", ["auto", "generic"])
def test_ntk_vector_product_equals_kernel_times_vectors(name, method):
    model = make(name)
    x1, x2 = inputs(5, seed=14), inputs(2, seed=15)
    v = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("abij,bj->ai", reference_kernel(model, x1, x2), v)
    got = ntk_vector_product(model, x1, x2, v, method=method, chunk_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="vectors must have shape"):
        ntk_vector_product(model, x1, x2, v[:1], method=method)


class Allocations(TorchDispatchMode):
    """Records ``(address, bytes)`` of every new tensor storage that torch ops create (views of
    a known storage are not new)."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self.storages.setdefault(storage.data_ptr(), storage.nbytes())
        return out


@pytest.mark.parametrize(
    ("name", "n2", "sizes"),
    [("mlp", 5, (60, 1000)), ("mlp", 12, (60, 600))],
)
def test_kernel_memory_beyond_the_result_is_bounded_by_the_chunk_budget(
    monkeypatch, name, n2, sizes
):
    """Every tensor but the result fits the chunk budget, whatever N1: the result is filled
    chunk by chunk (the old code concatenated per-layer results and summed them)."""
    budget = 2**20
    monkeypatch.setattr("ntkviz.kernel.MEMORY_BUDGET", budget)
    model, x2 = make(name).float(), inputs(n2, seed=3).float()
    for n1 in sizes:
        x1 = inputs(n1, seed=4).float()
        with Allocations() as record:
            K = empirical_ntk(model, x1, x2)
        for given in (K, x1, x2):  # the result, and views of the inputs
            record.storages.pop(given.untyped_storage().data_ptr(), None)
        assert max(record.storages.values()) <= budget, n1
    expected = reference_kernel(model.double(), x1[:2].double(), x2.double())
    torch.testing.assert_close(K[:2].double(), expected, rtol=1e-4, atol=1e-4)


def _pooled(kind: str) -> torch.nn.Module:
    """Average pools whose output is one pixel high (or 1×1), or follows a global pool."""
    nn = torch.nn
    torch.manual_seed(0)
    if kind == "pool to 1×1":
        layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8), nn.Flatten(),
                  nn.Linear(4, 3)]  # fmt: skip
    elif kind == "tanh and pool, three times":
        layers = [nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                  nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Tanh(),
                  nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 3)]  # fmt: skip
    elif kind == "pool then global pool":
        layers = [nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]  # fmt: skip
    else:  # one pixel high
        layers = [nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(),
                  nn.Linear(8, 3)]  # fmt: skip
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("pool to 1×1", (1, 8, 8)), ("tanh and pool, three times", (1, 8, 8)),
     ("pool then global pool", (1, 8, 8)), ("one pixel high", (1, 2, 8))],
)  # fmt: skip
def test_pools_to_one_pixel_high_are_exact(kind, shape):
    from ntkviz.accounting import account_step

    model = _pooled(kind)
    x1, x2 = inputs(3, seed=1, shape=shape), inputs(2, seed=2, shape=shape)
    expected = reference_kernel(model, x1, x2)
    for method in ("auto", "structured"):
        torch.testing.assert_close(
            empirical_ntk(model, x1, x2, method=method), expected, rtol=1e-10, atol=1e-12
        )
    # the step's gradient terms: −(η/B)·J(x_o)·J(x_b)ᵀ·G_b, with G_b = π(x_b) − e_{y_b}
    y = torch.tensor([0, 2])
    with torch.no_grad():
        G = torch.softmax(model(x2), -1) - torch.nn.functional.one_hot(y, 3)
    acc = account_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x2, y, x1)
    want = -0.1 / 2 * torch.einsum("wbij,bj->wbi", expected, G)
    torch.testing.assert_close(
        torch.from_numpy(acc.dz_gradient.copy()), want, rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize(
    ("shape", "k"), [((2, 3, 4, 5), (2, 2)), ((2, 3, 1, 5), (2, 3)), ((2, 3, 4, 5), (1, 1))]
)
def test_upsampling_gives_fresh_memory_to_write_into(shape, k):
    from ntkviz.kernel import _upsampled

    g = torch.randn(shape)
    for source in (g, g[:, :1].expand(shape)):  # also a broadcast cotangent (a global pool's)
        kept = source.clone()
        up = _upsampled(source, k)
        want = source.repeat_interleave(k[0], -2).repeat_interleave(k[1], -1)
        assert torch.equal(up, want)
        up.mul_(2.0)  # allowed: no element of up is shared, nor any of source
        assert torch.equal(up, 2 * want) and torch.equal(source, kept)
