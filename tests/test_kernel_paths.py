"""The structured path on BatchNorm, pooling, activations and residual blocks, and the generic path
on the ViT: against explicit float64 Jacobians (torch.autograd.functional.jacobian) and each other;
which path a model takes and why; models left bit-identical by every API call."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, explicit_jacobian, snapshot
from models import SHAPES, inputs, make
from torch import nn

from ntkviz.analysis import class_kernel_map, ntk_spectrum, squeeze_steps
from ntkviz.decomposition import decompose, influence, step_trajectory
from ntkviz.kernel import (
    _chain,
    _sweep,
    empirical_ntk,
    empirical_ntk_by_layer,
    eval_mode,
    kernel_path,
    layer_of,
    ntk_vector_product,
    pair_cost_seconds,
    parameter_jacobians,
)
from ntkviz.modelspec import check_model

STRUCTURED = ["kitchen_sink", "resnet8_cifar", "frozen_same_inplace"]
NEW = [*STRUCTURED, "vit_cifar"]
EXACT = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(scope="module")
def setup():
    """name -> (model, x (7, ...), explicit Jacobians (7, V, P)), computed once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            model = make(name)
            x = inputs(7, seed=3, shape=SHAPES[name])
            cache[name] = (model, x, torch.stack([explicit_jacobian(model, xi) for xi in x]))
        return cache[name]

    return get


def reference(J, rows, cols):
    """K blocks (len(rows), len(cols), V, V) from explicit Jacobians."""
    return torch.einsum("aip,bjp->abij", J[rows], J[cols])


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("method", ["auto", "structured", "generic"])
def test_kernel_equals_explicit_jacobian_product(setup, name, method):
    model, x, J = setup(name)
    if method == "structured" and name == "vit_cifar":
        with pytest.raises(
            ValueError, match=r"structured path does not apply.*not an nn.Sequential"
        ):
            empirical_ntk(model, x[:1], x[1:2], method=method)
        return
    K = empirical_ntk(model, x[:3], x[3:5], method=method)
    torch.testing.assert_close(K, reference(J, slice(0, 3), slice(3, 5)), **EXACT)


@pytest.mark.parametrize("name", STRUCTURED)
def test_every_structured_strategy_equals_the_generic_path_and_explicit_jacobians(setup, name):
    model, x, J = setup(name)
    cases = {
        "one pair (single sweep)": (slice(0, 1), slice(1, 2), {}),
        "forward products, chunks of 4": (slice(0, 7), slice(0, 1), {"chunk_size": 4}),
        "forward products, 4 x2": (slice(0, 3), slice(3, 7), {}),
        # 5 and 7 x2: 50 and 70 Jacobian rows about 64 positions of the last convolutions, so
        # both convolution strategies of the per-layer factorisation run.
        "per layer, 5 x2": (slice(0, 2), slice(2, 7), {}),
        "Gram matrix, 7 x2": (slice(0, 7), slice(0, 7), {"chunk_size": 3}),
    }
    for case, (rows, cols, kwargs) in cases.items():
        structured = empirical_ntk(model, x[rows], x[cols], method="structured", **kwargs)
        torch.testing.assert_close(structured, reference(J, rows, cols), **EXACT, msg=case)
        if case.startswith(("one pair", "per layer")):
            generic = empirical_ntk(model, x[rows], x[cols], method="generic")
            torch.testing.assert_close(structured, generic, **EXACT, msg=case)


@pytest.mark.parametrize("name", NEW)
def test_per_layer_kernels_match_per_group_jacobians(setup, name):
    model, x, J = setup(name)
    layers = empirical_ntk_by_layer(model, x[:2], x[2:3])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    assert set(layers) == {layer_of(n) for n in names}
    for layer, K in layers.items():
        cols = torch.cat([torch.full((s,), layer_of(n) == layer) for n, s in zip(names, sizes)])
        expected = torch.einsum("aip,bjp->abij", J[:2][..., cols], J[2:3][..., cols])
        torch.testing.assert_close(K, expected, **EXACT, msg=layer)


@pytest.mark.parametrize("name", NEW)
def test_ntk_vector_product_equals_kernel_times_vectors(setup, name):
    model, x, J = setup(name)
    v = torch.randn(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = torch.einsum("abij,bj->ai", reference(J, slice(0, 5), slice(5, 7)), v)
    torch.testing.assert_close(ntk_vector_product(model, x[:5], x[5:], v, chunk_size=2), expected)


def test_parameter_jacobians_of_the_sweep_records_are_columns_of_the_jacobian(setup):
    model, x, J = setup("kitchen_sink")
    offsets, start = {}, 0
    for n, p in model.named_parameters():
        offsets[n] = (start, p.shape)
        start += p.numel()
    with eval_mode(model), torch.no_grad():
        _, records = _sweep(_chain(model), x[:2])
    seen = set()
    for name, layer, a_in, g_out in records:
        for pname, jac in parameter_jacobians(layer, a_in, g_out).items():
            full = f"{name}.{pname}"
            begin, shape = offsets[full]
            expected = J[:2, :, begin : begin + shape.numel()].reshape(2, 10, *shape)
            torch.testing.assert_close(jac, expected, **EXACT, msg=full)
            seen.add(full)
    assert seen == set(offsets)


@pytest.mark.parametrize("loss", ["ce", "neg"])
@pytest.mark.parametrize("name", NEW)
def test_decompose_equals_autograd(setup, name, loss):
    model, x, J = setup(name)
    y_u, lr = 3, 0.05
    d = decompose(model, x[0], x[1], y_u, lr, loss)
    np.testing.assert_allclose(d.K, (J[0] @ J[1].T).numpy(), atol=1e-10, rtol=1e-10)
    m = copy.deepcopy(model).eval()
    z_u = m(x[1:2])[0].detach().requires_grad_(True)
    ce = F.cross_entropy(z_u[None], torch.tensor([y_u]))
    (G,) = torch.autograd.grad(ce if loss == "ce" else -ce, z_u)
    np.testing.assert_allclose(d.G, G.numpy(), atol=1e-12)
    with torch.no_grad():
        before = F.log_softmax(m(x[:1]), -1)[0]
    sgd = torch.optim.SGD(m.parameters(), lr=lr)
    ce = F.cross_entropy(m(x[1:2]), torch.tensor([y_u]))
    (ce if loss == "ce" else -ce).backward()
    sgd.step()
    with torch.no_grad():
        after = F.log_softmax(m(x[:1]), -1)[0]
    np.testing.assert_allclose(d.actual, (after - before).numpy(), atol=1e-12)
    A = torch.eye(10, dtype=torch.float64) - before.exp()[None]
    np.testing.assert_allclose(d.predicted, (-lr * A @ J[0] @ J[1].T @ G).numpy(), atol=1e-12)


def test_frozen_batch_norm_and_conv_parameters_do_not_count():
    model = make("kitchen_sink")
    model.bn.weight.requires_grad_(False)
    model.block.branches[0][1].bias.requires_grad_(False)
    model.conv.bias.requires_grad_(False)
    model.bn1.weight.requires_grad_(False)
    x = inputs(3, seed=5, shape=SHAPES["kitchen_sink"])
    J = torch.stack([explicit_jacobian(model, xi) for xi in x])
    for method in ("structured", "generic"):
        K = empirical_ntk(model, x[:2], x[2:], method=method)
        torch.testing.assert_close(K, reference(J, slice(0, 2), slice(2, 3)), **EXACT)
    pair = empirical_ntk(model, x[:1], x[1:2])
    torch.testing.assert_close(pair, reference(J, slice(0, 1), slice(1, 2)), **EXACT)
    d = decompose(model, x[0], x[1], 2, 0.1)
    np.testing.assert_allclose(d.K, (J[0] @ J[1].T).numpy(), atol=1e-10)


def test_kernel_path_says_which_path_and_why():
    resnet = kernel_path(make("resnet8_cifar"))
    assert resnet.path == "structured"
    assert "3 residual blocks (BranchSum)" in resnet.reason and "9 BatchNorm2d" in resnet.reason
    sink = kernel_path(make("kitchen_sink"), inputs(1, shape=SHAPES["kitchen_sink"]))
    assert sink.path == "structured" and "torch.func: LocalResponseNorm" in sink.reason
    vit = kernel_path(make("vit_cifar"))
    assert vit.path == "generic" and "ViT, not an nn.Sequential" in vit.reason
    with pytest.raises(ValueError, match="cannot take an example of shape"):
        kernel_path(make("lenet"), inputs(1, shape=(3, 32, 32)))


class Doubled(nn.Sequential):
    """A Sequential that overrides forward: the structured path would miss the factor 2."""

    def forward(self, x):
        return 2 * super().forward(x)


def backward_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J (V, P) of one example by V backward passes through the model itself (no functional_call:
    independent of how ntkviz swaps parameters, for models with shared layers)."""
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        z = model(x[None])[0]
        rows = []
        for i in range(len(z)):
            grads = torch.autograd.grad(z[i], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat([(p * 0 if g is None else g).flatten() for p, g in zip(params, grads)])
            )
    return torch.stack(rows).detach()


class Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).T


def _small(kind: str) -> tuple[nn.Module, tuple]:
    """Models on 1×4×4 inputs (or 3×4) that the structured path must refuse."""
    torch.manual_seed(0)
    if kind == "overrides forward":
        return Doubled(nn.Flatten(), nn.Linear(16, 10)), (1, 4, 4)
    if kind == "shares a layer":
        shared = nn.Linear(16, 16)
        return nn.Sequential(nn.Flatten(), shared, nn.Tanh(), shared, nn.Linear(16, 10)), (1, 4, 4)
    if kind == "ties two layers' weights":
        first, second = nn.Linear(16, 16), nn.Linear(16, 16)
        second.weight = first.weight
        return nn.Sequential(nn.Flatten(), first, nn.Tanh(), second, nn.Linear(16, 10)), (1, 4, 4)
    if kind == "has hooks":
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        m[1].register_forward_hook(lambda mod, inp, out: out * 3)
        return m, (1, 4, 4)
    if kind == "grouped":
        conv = nn.Conv2d(2, 2, 3, groups=2)
        return nn.Sequential(conv, nn.Flatten(), nn.Linear(8, 10)), (2, 4, 4)
    if kind == "trainable layer of another kind":
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 10)), (
            1,
            4,
            4,
        )
    if kind == "parameters outside its layers":
        m = nn.Sequential(nn.Flatten(), nn.Linear(16, 10))
        m.extra = nn.Parameter(torch.ones(3))  # on the Sequential itself: its forward cannot use it
        return m, (1, 4, 4)
    if kind == "parametrized":
        lin = nn.Linear(16, 16)
        nn.utils.parametrize.register_parametrization(lin, "weight", Symmetric())
        return nn.Sequential(nn.Flatten(), lin, nn.Tanh(), nn.Linear(16, 10)), (1, 4, 4)
    if kind == "no running statistics":
        bn = nn.BatchNorm1d(16, track_running_stats=False)
        return nn.Sequential(nn.Flatten(), bn, nn.Linear(16, 10)), (1, 4, 4)
    if kind == "frozen reflecting conv":
        frozen = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect").requires_grad_(False)
        return nn.Sequential(
            nn.Conv2d(1, 2, 1), nn.Tanh(), frozen, nn.Flatten(), nn.Linear(32, 10)
        ), (1, 4, 4)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("overrides forward", "Doubled) overrides the chain's forward"),
        ("shares a layer", "shares trainable parameters"),
        ("ties two layers' weights", "'3' (Linear) shares trainable parameters"),
        ("has hooks", "'1' (Linear) has hooks"),
        ("grouped", "is grouped"),
        ("trainable layer of another kind", "'2' (LayerNorm) has trainable parameters"),
        ("parameters outside its layers", "holds trainable parameters outside its layers"),
        ("parametrized", "'1' (ParametrizedLinear) has submodules"),
        ("no running statistics", "normalises by the batch"),
        ("frozen reflecting conv", "'2' (Conv2d) pads with 'reflect'"),
    ],
)
def test_models_the_structured_path_refuses_take_the_generic_path_exactly(kind, why):
    model, shape = _small(kind)
    model = model.double()
    path = kernel_path(model)
    assert path.path == "generic" and why in path.reason
    if kind == "no running statistics":  # each example's kernel would depend on its batch
        with pytest.raises(ValueError, match="normalises by the batch also in eval mode"):
            empirical_ntk(model, inputs(1, shape=shape), inputs(1, shape=shape))
        return
    with pytest.raises(ValueError, match="structured path does not apply"):
        empirical_ntk(model, inputs(1, shape=shape), inputs(1, shape=shape), method="structured")
    x = inputs(3, seed=9, shape=shape)
    J = torch.stack([backward_jacobian(model, xi) for xi in x])
    snap, params = snapshot(model), list(model.parameters())
    torch.testing.assert_close(empirical_ntk(model, x[:2], x[2:]), reference(J, [0, 1], [2]))
    d = decompose(model, x[0], x[1], 1, 0.1)
    np.testing.assert_allclose(d.K, (J[0] @ J[1].T).numpy(), atol=1e-10)
    v = torch.ones(1, 10, dtype=torch.float64)
    expected = torch.einsum("abij,bj->ai", reference(J, [0, 1], [2]), v)
    torch.testing.assert_close(ntk_vector_product(model, x[:2], x[2:], v), expected)
    influence(model, x, x[0], 1, 0.1, actual=True)
    step_trajectory(model, x[0], x[1], 1, 0.1, 2)
    assert_unchanged(model, snap)  # torch's functional_call would leave a shared layer changed
    assert all(p is q for p, q in zip(model.parameters(), params))


def test_a_linear_layer_on_token_inputs_is_found_by_the_example_and_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 10)).double()
    x = inputs(3, shape=(3, 4))
    assert kernel_path(model).path == "structured"  # the structure alone cannot tell
    path = kernel_path(model, x[:1])
    assert path.path == "generic" and "'0' (Linear) gets inputs of shape (1, 3, 4)" in path.reason
    J = torch.stack([explicit_jacobian(model, xi) for xi in x])
    torch.testing.assert_close(empirical_ntk(model, x[:2], x[2:]), reference(J, [0, 1], [2]))
    with pytest.raises(ValueError, match="gets inputs of shape"):
        empirical_ntk(model, x[:2], x[2:], method="structured")


def test_pair_cost_is_measured_and_leaves_the_model_alone():
    model = make("resnet8_cifar").train()
    snap = snapshot(model)
    seconds = pair_cost_seconds(model, inputs(2, shape=(3, 32, 32)), repeats=1)
    assert 0 < seconds < 60
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["resnet8_cifar", "vit_cifar"])
def test_models_are_bit_identical_after_every_api_call(name):
    """Buffers (BatchNorm running statistics, num_batches_tracked), parameters and every
    module's train/eval flag, for a model handed over in train mode."""
    model = make(name).train()
    snap = snapshot(model)
    x = inputs(4, seed=11, shape=SHAPES[name])
    v = torch.ones(1, 10, dtype=torch.float64)
    empirical_ntk(model, x[:2], x[2:3])
    empirical_ntk(model, x[:1], x[1:2])
    empirical_ntk_by_layer(model, x[:2], x[2:3])
    ntk_vector_product(model, x, x[:1], v)
    decompose(model, x[0], x[1], 3, 0.1, "neg")
    influence(model, x, x[0], 3, 0.1, actual=True, kernel_norm=True, chunk_size=2)
    step_trajectory(model, x[0], x[1], 3, 0.1, 2)
    squeeze_steps(model, x[0], 3, 0.1, 2)
    ntk_spectrum(model, x[:2])
    class_kernel_map(model, x, [0, 1, 0, 1], 2)
    kernel_path(model, x[:1])
    check_model(model, x[:2], 10)
    assert_unchanged(model, snap)
    assert model.training


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_an_operation_without_forward_mode_derivatives_takes_reverse_mode_exactly():
    """Weight norm has no forward-mode derivative in torch: the generic path's NTK-vector products
    cannot run, so J(x1) comes from reverse mode."""
    torch.manual_seed(0)
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))
    model = nn.Sequential(nn.Flatten(), lin, nn.Tanh(), nn.Linear(16, 10)).double()
    x = inputs(4, seed=12, shape=(1, 4, 4))
    params = {n: p.detach() for n, p in model.named_parameters()}
    with pytest.raises(NotImplementedError, match="forward AD"):
        torch.func.jvp(lambda p: torch.func.functional_call(model, p, (x,)), (params,), (params,))
    J = torch.stack([backward_jacobian(model, xi) for xi in x])
    snap = snapshot(model)
    torch.testing.assert_close(empirical_ntk(model, x[:3], x[3:]), reference(J, [0, 1, 2], [3]))
    layers = empirical_ntk_by_layer(model, x[:3], x[3:])
    torch.testing.assert_close(sum(layers.values()), reference(J, [0, 1, 2], [3]))
    v = torch.randn(1, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = torch.einsum("abij,bj->ai", reference(J, [0, 1, 2], [3]), v)
    torch.testing.assert_close(ntk_vector_product(model, x[:3], x[3:], v), expected)
    d = decompose(model, x[0], x[1], 1, 0.1)
    np.testing.assert_allclose(d.K, (J[0] @ J[1].T).numpy(), atol=1e-10)
    assert_unchanged(model, snap)
