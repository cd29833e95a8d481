"""decompose / influence against independent autograd computations."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, explicit_jacobian, snapshot
from models import inputs, make

from ntkviz.decomposition import decompose, influence, iter_influence, step_trajectory
from ntkviz.errors import NtkvizError, StepDiverged


def autograd_step(model, x_o, x_u, y_u, lr, loss):
    """log π(x_o) before and after one plain SGD step on a deep copy, with torch.optim.SGD."""
    import copy

    m = copy.deepcopy(model).eval()
    before = F.log_softmax(m(x_o[None]), -1)[0].detach()
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    ce = F.cross_entropy(m(x_u[None]), torch.tensor([y_u]))
    (ce if loss == "ce" else -ce).backward()
    opt.step()
    after = F.log_softmax(m(x_o[None]), -1)[0].detach()
    return before, after


@pytest.mark.parametrize("loss", ["ce", "neg"])
@pytest.mark.parametrize("name", ["lenet", "mlp", "residual"])
def test_factors_equal_autograd(name, loss):
    model = make(name)
    x_o, x_u = inputs(1, seed=1)[0], inputs(1, seed=2)[0]
    y_u, lr = 3, 0.05
    d = decompose(model, x_o, x_u, y_u, lr, loss)
    model.eval()
    # A: Jacobian of log_softmax at z(x_o) with respect to z.
    z_o = model(x_o[None])[0].detach()
    A = torch.autograd.functional.jacobian(lambda z: F.log_softmax(z, -1), z_o)
    np.testing.assert_allclose(d.A, A.numpy(), atol=1e-12)
    # G: ∂L/∂z at x_u, L = CE (ce) or −CE (neg).
    z_u = model(x_u[None])[0].detach().requires_grad_(True)
    ce = F.cross_entropy(z_u[None], torch.tensor([y_u]))
    (g,) = torch.autograd.grad(ce if loss == "ce" else -ce, z_u)
    np.testing.assert_allclose(d.G, g.numpy(), atol=1e-12)
    # K: explicit J·Jᵀ.
    K = explicit_jacobian(model, x_o) @ explicit_jacobian(model, x_u).T
    np.testing.assert_allclose(d.K, K.numpy(), atol=1e-10)
    # predicted = −η·A·K·G; Δz = −η·K·G.
    np.testing.assert_allclose(d.delta_logits_predicted, (-lr * K @ g).numpy(), atol=1e-12)
    np.testing.assert_allclose(d.predicted, (-lr * A @ K @ g).numpy(), atol=1e-12)
    # actual: a real SGD step taken by torch.optim.SGD on a copy.
    before, after = autograd_step(model, x_o, x_u, y_u, lr, loss)
    np.testing.assert_allclose(d.actual, (after - before).numpy(), atol=1e-12)
    np.testing.assert_allclose(d.residual, d.actual - d.predicted, atol=0)
    np.testing.assert_allclose(d.probs_before, before.exp().numpy(), atol=1e-12)
    np.testing.assert_allclose(d.probs_after, after.exp().numpy(), atol=1e-12)
    assert not d.A.flags.writeable


@pytest.mark.parametrize("loss", ["ce", "neg"])
def test_remainder_is_second_order(loss):
    model = make("lenet")
    x_o, x_u = inputs(1, seed=3)[0], inputs(1, seed=4)[0]
    big = decompose(model, x_o, x_u, 2, 0.2, loss)
    small = decompose(model, x_o, x_u, 2, 0.02, loss)
    pred_ratio = np.linalg.norm(big.predicted) / np.linalg.norm(small.predicted)
    res_ratio = np.linalg.norm(big.residual) / np.linalg.norm(small.residual)
    assert pred_ratio == pytest.approx(10, rel=1e-9)
    assert 70 < res_ratio < 130, res_ratio


def test_negative_gradient_on_itself_squeezes_mass_into_the_most_likely_other_class():
    model = make("mlp")
    x = inputs(1, seed=5)[0]
    with torch.no_grad():
        probs = F.softmax(model.eval()(x[None]), -1)[0]
    y = int(probs.argsort()[-2])  # a likely but not the top class
    d = decompose(model, x, x, y, 0.05, "neg")
    assert d.probs_after[y] < d.probs_before[y]
    others = [c for c in range(10) if c != y]
    top_other = max(others, key=lambda c: d.probs_before[c])
    assert d.probs_after[top_other] > d.probs_before[top_other]
    # first-order prediction agrees in sign
    assert d.predicted[y] < 0 < d.predicted[top_other]


def test_model_is_bit_identical_after_decompose_and_influence():
    model = make("lenet")
    model.train()
    snap = snapshot(model)
    x = inputs(3)
    decompose(model, x[0], x[1], 1, 0.1)
    influence(model, x, x[0], 1, 0.1, actual=True, kernel_norm=True)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("name", ["lenet", "residual"])
def test_batched_influence_equals_per_pair(name):
    model = make(name)
    xs, x_u = inputs(5, seed=6), inputs(1, seed=7)[0]
    inf = influence(model, xs, x_u, 7, 0.1, "neg", actual=True, kernel_norm=True, chunk_size=2)
    for a in range(5):
        d = decompose(model, xs[a], x_u, 7, 0.1, "neg")
        np.testing.assert_allclose(inf.predicted[a], d.predicted, atol=1e-12)
        np.testing.assert_allclose(
            inf.delta_logits_predicted[a], d.delta_logits_predicted, atol=1e-12
        )
        np.testing.assert_allclose(inf.actual[a], d.actual, atol=1e-12)
        np.testing.assert_allclose(inf.probs_before[a], d.probs_before, atol=1e-12)
        assert inf.kernel_norm[a] == pytest.approx(np.linalg.norm(d.K), rel=1e-10)


def test_iter_influence_reports_progress_and_can_stop_early():
    model = make("mlp")
    xs, x_u = inputs(10), inputs(1)[0]
    gen = iter_influence(model, xs, x_u, 0, 0.1, chunk_size=4)
    assert next(gen) == (4, 10)
    assert next(gen) == (8, 10)
    gen.close()  # cancel: nothing else runs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"y_u": 10}, "y_u"),
        ({"y_u": -1}, "y_u"),
        ({"y_u": 2.5}, "y_u"),
        ({"loss": "mse"}, "loss"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": float("inf")}, "lr"),
        ({"lr": True}, "lr must be a finite real number"),
        ({"lr": 0.1 + 0j}, "lr must be a finite real number"),
        ({"lr": torch.tensor([0.1])}, "lr must be a finite real number"),
        ({"lr": np.float32("nan")}, "lr must be a finite real number"),
        ({"lr": 10**400}, "lr must be a finite real number"),
        ({"y_u": 10**20}, r"y_u must be an int class in \[0, 10\), got 100000000000000000000"),
        ({"y_u": True}, "y_u"),
        ({"y_u": torch.tensor(1.0)}, "y_u"),
        ({"x_o": torch.zeros(1, 28, 28, dtype=torch.uint8)}, "x_o must hold floating-point"),
        ({"x_u": torch.ones(1, 28, 28, dtype=torch.int64)}, "x_u must hold floating-point"),
        ({"x_o": torch.zeros(1, 1, 28, 28)}, "same shape"),
        ({"x_o": torch.zeros(1, 1, 28, 28), "x_u": torch.zeros(1, 1, 28, 28)}, "as one example"),
        ({"x_o": torch.zeros(1, 5, 5), "x_u": torch.zeros(1, 5, 5)}, "cannot take"),
        ({"x_o": torch.full((1, 28, 28), float("nan"))}, "x_o holds NaN or infinite values"),
        ({"x_u": torch.full((1, 28, 28), float("inf"))}, "x_u holds NaN or infinite values"),
    ],
)
def test_bad_arguments_say_what_was_expected(kwargs, match):
    model = make("lenet")
    args = {"x_o": inputs(1)[0], "x_u": inputs(1)[0], "y_u": 1, "lr": 0.1, "loss": "ce"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        decompose(model, **args)


@pytest.mark.parametrize(
    "lr", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), torch.tensor(0.1).double(), 0.1]
)
def test_any_real_scalar_is_a_learning_rate(lr):
    model = make("mlp")
    x = inputs(2)
    d = decompose(model, x[0], x[1], np.int64(3), lr)
    assert d.lr == pytest.approx(0.1, rel=1e-7) and type(d.lr) is float
    inf = influence(model, x, x[1], torch.tensor(3), lr)
    np.testing.assert_allclose(inf.predicted[0], d.predicted, rtol=1e-6, atol=1e-12)
    assert step_trajectory(model, x[0], x[1], 3, lr, np.int64(2)).probs_o.shape == (3, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, "chunk_size must be an int ≥ 1, got 0"),
        ({"chunk_size": 2.5}, "chunk_size must be an int ≥ 1"),
        (
            {"x_o": inputs(0)},
            r"x_o must be a non-empty batch \(N, ...\), got shape \(0, 1, 28, 28\)",
        ),
        ({"y_u": 10**20}, r"y_u must be an int class in \[0, 10\)"),
        ({"lr": np.complex64(1)}, "lr must be a finite real number"),
    ],
)
def test_influence_refuses_bad_arguments_with_value_errors(kwargs, match):
    args = {"x_o": inputs(3), "x_u": inputs(1)[0], "y_u": 1, "lr": 0.1}
    args.update(kwargs)
    x_o, x_u, y_u, lr = (args.pop(k) for k in ("x_o", "x_u", "y_u", "lr"))
    with pytest.raises(ValueError, match=match):
        influence(make("lenet"), x_o, x_u, y_u, lr, **args)


def test_non_finite_results_are_refused():
    """η = 2e38 in float32: the step keeps the logits finite but −η·K·G overflows; such a
    result must be refused, never returned (it would reach JSON as NaN/Infinity)."""
    model, x = make("lenet").float(), inputs(2).float()
    with pytest.raises(StepDiverged, match="η = 2e\\+38 makes the predicted or actual change"):
        decompose(model, x[0], x[1], 1, 2e38)
    with pytest.raises(StepDiverged):
        influence(model, x, x[1], 1, 2e38)


def test_a_step_that_makes_the_logits_non_finite_is_reported():
    model, x = make("lenet").float(), inputs(2).float()  # η = 1e300 is inf in float32
    with pytest.raises(StepDiverged, match="η = 1e\\+300"):
        decompose(model, x[0], x[1], 1, 1e300)
    # the step is taken in float64, but parameters beyond float32's range are no float32 model
    with pytest.raises(StepDiverged, match=r"η = 1e\+39 makes the model's parameters \(torch"):
        decompose(model, x[0], x[1], 1, 1e39)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    with pytest.raises(NtkvizError, match="logits on x_o, x_u are not finite before any step"):
        decompose(model, x[0], x[1], 1, 0.1)


class LogOfFirstPixel(torch.nn.Module):
    """Logits with log(x[0]) added: NaN on an input whose first pixel is negative, finite
    elsewhere — not a diverged model, and no smaller η helps."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        x = x.flatten(1)
        return self.linear(x) + torch.log(x[:, :1])


def test_logits_that_are_not_finite_on_some_inputs_name_them():
    model = LogOfFirstPixel()
    x = torch.rand(5, 1, 2, 2, dtype=torch.float64) + 0.1
    x[1, 0, 0, 0] = x[3, 0, 0, 0] = -1.0
    with pytest.raises(NtkvizError, match="logits on x_o are not finite before any step"):
        decompose(model, x[1], x[0], 1, 0.1)
    with pytest.raises(NtkvizError, match="on x_u are not"):
        decompose(model, x[0], x[3], 1, 0.1)
    with pytest.raises(NtkvizError, match=r"logits on x_o\[1\], x_o\[3\] are not finite"):
        influence(model, x, x[0], 1, 0.1)
    with pytest.raises(NtkvizError, match="logits on x_u are not finite"):
        influence(model, x, x[1], 1, 0.1)
    assert np.isfinite(decompose(model, x[0], x[2], 1, 0.1).predicted).all()


@pytest.mark.parametrize("loss", ["ce", "neg"])
def test_step_trajectory_equals_real_sgd_steps_on_a_copy(loss):
    model = make("lenet")
    x = inputs(2)
    snap = snapshot(model)
    traj = step_trajectory(model, x[0], x[1], 3, 0.2, 4, loss)
    assert_unchanged(model, snap)
    copy = make("lenet").eval()
    sgd = torch.optim.SGD(copy.parameters(), lr=0.2)
    want_o, want_u = [], []
    for step in range(5):
        with torch.no_grad():
            want_o.append(copy(x[:1]).softmax(-1)[0])
            want_u.append(copy(x[1:]).softmax(-1)[0])
        if step < 4:
            sgd.zero_grad()
            ce = F.cross_entropy(copy(x[1:]), torch.tensor([3]))
            (ce if loss == "ce" else -ce).backward()
            sgd.step()
    np.testing.assert_allclose(traj.probs_o, torch.stack(want_o).numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(traj.probs_u, torch.stack(want_u).numpy(), rtol=1e-10, atol=1e-13)
    assert traj.probs_o.shape == (5, 10) and not traj.probs_o.flags.writeable
    with pytest.raises(ValueError, match="steps"):
        step_trajectory(model, x[0], x[1], 3, 0.2, 0)
    small = make("lenet").float()
    with pytest.raises(StepDiverged):
        step_trajectory(small, x[0].float(), x[1].float(), 3, 1e300, 1)


def test_arguments_of_the_wrong_kind_say_what_is_wrong():
    from torch import nn

    from ntkviz.data import load_dataset
    from ntkviz.errors import DatasetError
    from ntkviz.kernel import empirical_ntk
    from ntkviz.models import build_model

    model, x = build_model("lenet"), torch.randn(2, 1, 28, 28)
    with pytest.raises(
        TypeError, match=r"x1 must be a tensor or array \(N, \.\.\.\), got NoneType"
    ):
        empirical_ntk(model, None, x)
    with pytest.raises(TypeError, match=r"the model must be a torch\.nn\.Module, got function"):
        empirical_ntk(lambda z: z, x, x)
    with pytest.raises(ValueError, match="x2 holds NaN or infinite values"):
        empirical_ntk(model, x, torch.full_like(x, float("nan")))

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)), None

    with pytest.raises(ValueError, match=r"must return logits \(N, V\); got a tuple"):
        decompose(Pair(), x[0], x[1], 1, 0.1)
    with pytest.raises(ValueError, match="the model has no trainable parameters"):
        decompose(nn.Sequential(nn.Flatten(), nn.Identity()), x[0], x[1], 1, 0.1)
    with pytest.raises(DatasetError, match="a dataset is given by a name"):
        load_dataset(None)


def test_a_float32_models_residual_stays_second_order_at_small_steps():
    """The hypothetical step is taken in float64: float32 rounding of the logits (~1e-7·|z|)
    would otherwise be the residual below η ≈ 1e-3."""
    model, x = make("lenet").float(), inputs(2).float()
    res = [
        np.linalg.norm(decompose(model, x[0], x[1], 1, lr).residual)
        for lr in (1e-2, 1e-3, 1e-4, 1e-5)
    ]
    ratios = np.array(res[:-1]) / np.array(res[1:])
    assert ((ratios > 50) & (ratios < 200)).all(), ratios


def test_the_public_api_resolves_and_is_listed():
    import ntkviz

    names = [n for n in ntkviz.__all__ if n not in ("show", "__version__")]  # show needs Qt
    assert all(getattr(ntkviz, n) is not None for n in names)
    assert set(ntkviz.__all__) <= set(dir(ntkviz))  # tab completion in a notebook
    labels = torch.tensor([7, 2])  # a dataset's labels: int64 tensors
    assert ntkviz.Watch(torch.zeros(2, 1, 28, 28), labels).classes == (7, 2)
