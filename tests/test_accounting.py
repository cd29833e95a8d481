"""The account of real optimizer steps against independent float64 autograd: explicit Jacobians
(torch.autograd.functional.jacobian), explicit per-example gradients and the optimizer formulas
of torch's documentation, with the preconditioner read from a plain step's optimizer state."""

import copy
import gc
import json
import math
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import explicit_jacobian
from models import inputs, make
from torch import nn

from ntkviz.accounting import (
    AccountedStep,
    Watch,
    WatchAccount,
    _same_in_both_modes,
    _structured_layers,
    account_step,
    decompose_step,
    optimizer_kernel,
    optimizer_snapshot,
)
from ntkviz.errors import FileReadError
from ntkviz.kernel import empirical_ntk
from ntkviz.models import BranchSum
from ntkviz.run_account import RunAccount
from ntkviz.training import TrainConfig, make_optimizer, train

B, W = 6, 2
X, Y = inputs(B, seed=3), torch.tensor([3, 1, 4, 1, 5, 9])
XW = inputs(W, seed=4)

# name -> (class, hyper-parameters)
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1)),
    "sgd-momentum-decay": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-2)),
    "sgd-nesterov": (
        torch.optim.SGD,
        dict(lr=0.05, momentum=0.8, weight_decay=1e-2, nesterov=True, foreach=True),
    ),
    "sgd-dampening-maximize": (
        torch.optim.SGD,
        dict(lr=0.02, momentum=0.5, dampening=0.3, weight_decay=1e-2, maximize=True),
    ),
    "adam": (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2, foreach=False)),
    "adam-amsgrad-maximize": (
        torch.optim.Adam,
        dict(lr=1e-3, betas=(0.8, 0.9), amsgrad=True, maximize=True),
    ),
    "adamw": (torch.optim.AdamW, dict(lr=1e-3, weight_decay=0.1, foreach=True)),
    "adam-fused": (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2, fused=True)),
}


class DropoutMLP(nn.Sequential):
    """A structured chain whose training and eval modes differ."""

    def __init__(self):
        super().__init__(
            nn.Flatten(), nn.Linear(784, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 10)
        )


def build(name: str) -> nn.Module:
    if name == "dropout_mlp":
        torch.manual_seed(0)
        return DropoutMLP().double()
    return make(name)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def warm_up(model, optimizer, steps: int) -> None:
    """A few plain steps on other data, so that momentum buffers and Adam moments exist."""
    model.train()
    for s in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs(B, seed=10 + s)), torch.arange(B)).backward()
        optimizer.step()


def twin(model, optimizer):
    """An independent copy of the model and of its optimizer (state included)."""
    model2 = copy.deepcopy(model)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        p2.grad = None if p.grad is None else p.grad.clone()
    kind = type(optimizer)
    hyper = dict(optimizer.defaults)
    if kind is torch.optim.AdamW:
        del hyper["decoupled_weight_decay"]
    opt2 = kind(model2.parameters(), **hyper)
    opt2.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    return model2, opt2


def plain_step(model, optimizer, x, y, lr=None, seed=0):
    """The three lines of the issue, in training mode, after clearing stale gradients."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    model.train()
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return logits.detach()


def assert_same_state(m1, o1, m2, o2) -> None:
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert (p1.grad is None) == (p2.grad is None)
        assert p1.grad is None or torch.equal(p1.grad, p2.grad)
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for k in s1["state"]:
        for key, v in s1["state"][k].items():
            assert torch.equal(v, s2["state"][k][key]), (k, key)


def eval_logits(model, x):
    was = model.training
    model.eval()
    with torch.no_grad():
        z = model(x)
    model.train(was)
    return z


def expected_account(model, optimizer, x, y, x_watch):
    """The account built from its definitions: explicit Jacobians (eval mode), G from a plain
    training-mode step on a twin, the optimizer's formulas with its pre-step state and the
    second moment torch computed (post-step state of the twin)."""
    model2, opt2 = twin(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    before = {p: {k: v.clone() for k, v in optimizer.state.get(p, {}).items()} for p in params}
    theta = flat(params)
    J_o = torch.stack([explicit_jacobian(model, xo) for xo in x_watch])  # (W, V, P)
    J_b = torch.stack([explicit_jacobian(model, xb) for xb in x])  # (B, V, P)
    z_before = eval_logits(model, x_watch)
    logits = plain_step(model2, opt2, x, y)
    G = F.softmax(logits, -1) - F.one_hot(y, logits.shape[1])  # (B, V)
    g_b = torch.einsum("bvp,bv->bp", J_b, G) / len(x)  # each example's share of the gradient
    z_after = eval_logits(model2, x_watch)
    mid = copy.deepcopy(model2)  # the new parameters with the running statistics before the step
    with torch.no_grad():
        for b_mid, b0 in zip(mid.buffers(), model.buffers()):
            b_mid.copy_(b0)
    z_mid = eval_logits(mid, x_watch)
    group = optimizer.param_groups[0]
    lr, wd, sign = group["lr"], group["weight_decay"], -1.0 if group["maximize"] else 1.0
    if isinstance(optimizer, torch.optim.SGD):
        mu, tau, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        bufs = [before[p].get("momentum_buffer") for p in params]
        if mu == 0 or bufs[0] is None:
            k, history = (1 + mu if nesterov else 1.0), torch.zeros_like(theta)
        else:
            k = 1 + mu * (1 - tau) if nesterov else 1 - tau
            history = lr * (mu**2 if nesterov else mu) * flat(bufs)
        P, s = torch.ones_like(theta), lr * k * sign
        decay = lr * k * wd * theta
    else:
        beta1, beta2 = group["betas"]
        state2 = [opt2.state[p2] for p2 in model2.parameters() if p2.requires_grad]
        t = float(state2[0]["step"])
        v = flat(s["max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"] for s in state2)
        P = 1 / (v.sqrt() / math.sqrt(1 - beta2**t) + group["eps"])
        step_size = lr / (1 - beta1**t)
        s = step_size * (1 - beta1) * sign
        m = flat(before[p]["exp_avg"] for p in params) if before[params[0]] else 0 * theta
        history = step_size * beta1 * P * m
        if isinstance(optimizer, torch.optim.AdamW):
            decay = lr * wd * theta
        else:
            decay = step_size * (1 - beta1) * wd * P * theta
    dz_gradient = -s * torch.einsum("wvp,bp->wbv", J_o, P * g_b)
    return {
        "J_o": J_o,
        "J_b": J_b,
        "G": G,
        "P": P,
        "s": s,
        "dz_gradient": dz_gradient,
        "dz_momentum": -J_o @ history,
        "dz_weight_decay": -J_o @ decay,
        "dz_step": J_o @ (flat(p for p in model2.parameters() if p.requires_grad) - theta),
        "z_before": z_before,
        "z_after": z_after,
        "z_mid": z_mid,
        "twin": (model2, opt2),
    }


def A_times(probs: np.ndarray, dz: np.ndarray) -> np.ndarray:
    """A = I − 1·πᵀ applied along the last axis."""
    return dz - (dz * probs).sum(-1, keepdims=True)


def close(actual, expected, rtol=1e-9):
    expected = np.asarray(expected.detach() if isinstance(expected, torch.Tensor) else expected)
    scale = max(float(np.abs(expected).max()), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


CASES = [("tiny_cnn", o) for o in OPTIMIZERS] + [
    ("lenet", "sgd-momentum-decay"),
    ("lenet", "sgd-dampening-maximize"),
    ("lenet", "adam-amsgrad-maximize"),
    ("lenet", "adamw"),
    ("mlp", "sgd-momentum-decay"),
    ("mlp", "adamw"),
    ("dropout_mlp", "sgd-nesterov"),
    ("dropout_mlp", "adam"),
    ("residual", "sgd-momentum-decay"),
    ("residual", "adam"),
    ("bn_blocks", "sgd-momentum-decay"),
    ("bn_blocks", "adamw"),
    ("frozen_same_inplace", "sgd-nesterov"),
    ("frozen_same_inplace", "adam"),
]


@pytest.mark.parametrize(("model_name", "opt_name"), CASES)
def test_every_term_equals_its_definition(model_name, opt_name):
    model = build(model_name)
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    warm_up(model, optimizer, 2)
    want = expected_account(model, optimizer, X, Y, XW)
    torch.manual_seed(0)  # the same dropout mask as the twin's plain step
    acc = account_step(model, optimizer, X, Y, XW, classes=[2, 7], top_kernels=True)

    # the model and the optimizer after the account equal those after the plain three lines
    assert_same_state(model, optimizer, *want["twin"])

    probs = F.softmax(want["z_before"], -1).numpy()
    close(acc.probs_before, probs, 1e-12)
    close(acc.log_probs_before, F.log_softmax(want["z_before"], -1), 1e-12)
    close(acc.dz_gradient, want["dz_gradient"])
    close(acc.dz_momentum, want["dz_momentum"])
    close(acc.dz_weight_decay, want["dz_weight_decay"])
    close(acc.gradient, A_times(probs[:, None], want["dz_gradient"].numpy()))
    close(acc.momentum, A_times(probs, want["dz_momentum"].numpy()))
    close(acc.weight_decay, A_times(probs, want["dz_weight_decay"].numpy()))
    close(acc.G, want["G"], 1e-12)
    z0, z1 = want["z_before"], want["z_after"]
    close(acc.dz_actual, z1 - z0, 1e-12)
    close(acc.actual, F.log_softmax(z1, -1) - F.log_softmax(z0, -1), 1e-12)
    zm = want["z_mid"]  # batch norm's running statistics: an exact term of their own
    close(acc.dz_statistics, z1 - zm, 1e-12)
    close(acc.statistics, F.log_softmax(z1, -1) - F.log_softmax(zm, -1), 1e-12)
    assert np.any(acc.statistics) == (model_name in ("residual", "bn_blocks"))

    # predicted is the sum of the terms; the residual what is left
    assert np.array_equal(acc.predicted, acc.gradient.sum(1) + acc.momentum + acc.weight_decay)
    assert np.array_equal(
        acc.dz_predicted, acc.dz_gradient.sum(1) + acc.dz_momentum + acc.dz_weight_decay
    )
    assert np.array_equal(acc.residual, acc.actual - acc.predicted - acc.statistics)
    assert np.array_equal(acc.dz_residual, acc.dz_actual - acc.dz_predicted - acc.dz_statistics)
    if model_name not in ("dropout_mlp", "residual", "bn_blocks"):  # train = eval Jacobians
        close(acc.dz_predicted, want["dz_step"])  # = J(x_o)·Δθ of the real step

    # contributions, the top contributor and its kernel K_P = J_o·P·J_bᵀ
    assert np.array_equal(acc.contributions, acc.gradient[[0, 1], :, [2, 7]])
    assert np.array_equal(acc.top_index, np.abs(acc.contributions).argmax(1))
    assert acc.step_scale == pytest.approx(want["s"], rel=1e-12)
    for w, b in enumerate(acc.top_index):
        K = want["J_o"][w] @ (want["P"][:, None] * want["J_b"][b].T)
        close(acc.top_kernel[w], K)
        term = -(acc.step_scale / B) * A_times(probs[w], acc.top_kernel[w] @ acc.G[b])
        close(acc.gradient[w, b], term)
    assert acc.optimizer == {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}.get(kind, "adamw")
    assert acc.lr == hyper["lr"] and acc.batch_labels.tolist() == Y.tolist()
    for name in ("gradient", "actual", "contributions", "top_kernel", "classes"):
        assert not getattr(acc, name).flags.writeable
    assert acc.gradient.dtype == np.float64 and acc.gradient.shape == (W, B, 10)


XW3, CLASSES3 = inputs(3, seed=5), [2, 7, 0]
CLASS_CASES = [
    ("tiny_cnn", "sgd"),
    ("tiny_cnn", "sgd-dampening-maximize"),
    ("tiny_cnn", "adam-amsgrad-maximize"),
    ("lenet", "sgd-momentum-decay"),
    ("lenet", "adamw"),
    ("mlp", "adam"),
    ("dropout_mlp", "sgd-nesterov"),
    ("residual", "sgd-momentum-decay"),
    ("bn_blocks", "sgd-nesterov"),
    ("frozen_same_inplace", "sgd-momentum-decay"),
]


def watched_step(model, optimizer, x_watch, classes, focus):
    """One step of the trainer's kind of watch (``AccountedStep`` with ``focus``)."""
    step = AccountedStep(model, optimizer, x_watch, classes=classes, focus=focus, top_kernels=True)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout mask as the twin's plain step
    logits = step.forward(X)
    return step.step(F.cross_entropy(logits, Y), Y)


@pytest.mark.parametrize(("model_name", "opt_name"), CLASS_CASES)
def test_class_accounts_equal_their_definition(model_name, opt_name):
    """Each watched example's class-level account (one vector–Jacobian product) equals the terms
    built from explicit Jacobians at its class, and the full account's numbers there; focused
    examples also get the full account. Two light rows take the convolution-filter path, three
    the Gram path, and one beside a focused example the rows the focused one formed."""
    model = build(model_name)
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    warm_up(model, optimizer, 2)
    want = expected_account(model, optimizer, X, Y, XW3)
    torch.manual_seed(0)
    full = account_step(*twin(model, optimizer), X, Y, XW3, classes=CLASSES3)
    probs = F.softmax(want["z_before"], -1).numpy()
    gradient = A_times(probs[:, None], want["dz_gradient"].numpy())  # (W, B, V)
    momentum = A_times(probs, want["dz_momentum"].numpy())
    decay = A_times(probs, want["dz_weight_decay"].numpy())
    z0, z1 = want["z_before"], want["z_after"]
    actual = (F.log_softmax(z1, -1) - F.log_softmax(z0, -1)).numpy()
    statistics = (F.log_softmax(z1, -1) - F.log_softmax(want["z_mid"], -1)).numpy()
    for n, focus in ((2, ()), (3, ()), (3, (1,))):
        model2, opt2 = twin(model, optimizer)
        acc = watched_step(model2, opt2, XW3[:n], CLASSES3[:n], focus)
        assert_same_state(model2, opt2, *want["twin"])
        rows, c = np.arange(n), CLASSES3[:n]
        close(acc.contributions, gradient[rows, :, c])
        close(acc.contributions, full.contributions[:n])
        close(acc.class_momentum, momentum[rows, c])
        close(acc.class_weight_decay, decay[rows, c])
        close(acc.class_actual, actual[rows, c], 1e-12)
        close(acc.class_statistics, statistics[rows, c], 1e-12)
        close(acc.actual, actual[:n], 1e-12)
        close(acc.probs_before, probs[:n], 1e-12)
        close(acc.G, want["G"], 1e-12)
        assert np.array_equal(acc.class_actual, acc.actual[rows, c])
        assert np.array_equal(
            acc.class_predicted, acc.class_gradient + acc.class_momentum + acc.class_weight_decay
        )
        assert np.array_equal(
            acc.class_residual, acc.class_actual - acc.class_predicted - acc.class_statistics
        )
        close(acc.class_gradient, acc.contributions.sum(1), 1e-12)
        assert acc.step_scale == full.step_scale and acc.optimizer == full.optimizer
        assert acc.batch_labels.tolist() == Y.tolist() and acc.lr == hyper["lr"]
        terms, dz_terms = acc.terms(), acc.terms(logits=True)
        for w in rows:
            known = np.isfinite(terms["momentum"][w])
            assert known.all() if w in focus else known.tolist() == [v == c[w] for v in range(10)]
            assert np.isfinite(dz_terms["momentum"][w]).all() == (w in focus)
        assert np.array_equal(dz_terms["actual"], acc.dz_actual)
        if not focus:
            assert acc.focused is None and acc.focus.shape == (0,)
            continue
        f = list(focus)
        focused = acc.focused
        assert focused.classes.tolist() == [CLASSES3[i] for i in f]
        close(focused.gradient, gradient[f])
        close(focused.gradient, full.gradient[f])
        close(focused.momentum, momentum[f])
        for i, w in enumerate(f):
            b = focused.top_index[i]
            K = want["J_o"][w] @ (want["P"][:, None] * want["J_b"][b].T)
            close(focused.top_kernel[i], K)
        assert np.array_equal(acc.class_momentum[f], focused.momentum[np.arange(len(f)), c[1]])
        assert np.array_equal(terms["gradient"][f], focused.gradient.sum(1))
    for name in ("contributions", "class_residual", "actual", "classes", "focus"):
        assert not getattr(acc, name).flags.writeable


def test_a_continued_watch_retakes_its_start_after_changes_between_steps():
    """The trainer's watch starts each step from the previous step's end; a change to the model
    in between (an applied step, a loaded state) is noticed and the start taken again."""
    model = make("lenet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    reference = twin(model, optimizer)
    step = AccountedStep(
        model, optimizer, XW3, classes=CLASSES3, focus=(1,), top_kernels=True, continued=True
    )
    rows = np.arange(3)
    for s in range(5):
        for m in (model, reference[0]):
            if s == 1:
                with torch.no_grad():
                    m.fc1.weight.mul_(0.5)
            if s == 2:  # through .data: no version counter moves
                m.fc2.weight.data.mul_(0.9)
            if s == 3:
                m.fc3.bias.data = m.fc3.bias.data + 0.25
        x = inputs(B, seed=20 + s)
        model.train()
        optimizer.zero_grad(set_to_none=True)
        acc = step.step(F.cross_entropy(step.forward(x), Y), Y)
        want = account_step(*reference, x, Y, XW3, classes=CLASSES3)
        assert_same_state(model, optimizer, *reference)
        close(acc.probs_before, want.probs_before, 1e-12)
        close(acc.class_actual, want.actual[rows, CLASSES3], 1e-12)
        close(acc.contributions, want.contributions)
        close(acc.class_momentum, want.momentum[rows, CLASSES3])
        close(acc.focused.gradient, want.gradient[[1]])


def test_frozen_layers_and_in_place_activations_keep_the_factored_account():
    """(Their terms are checked against the definitions in the tests above.)"""
    assert _structured_layers(make("frozen_same_inplace"))[0] is not None


class ShiftWhileTraining(nn.Module):
    """A layer of the user's that computes differently in training mode."""

    def forward(self, x):
        return x + 0.5 if self.training else x


def test_watched_examples_are_taken_in_eval_mode_unless_both_modes_agree():
    """The sweeps skip switching every module to eval mode only for chains of layers known to
    compute the same in both modes; a layer of unknown code keeps the switch."""
    shifted = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 16), ShiftWhileTraining(), nn.Tanh(), nn.Linear(16, 10)
    ).double()
    dropout = build("dropout_mlp")
    block = nn.Sequential(
        nn.Flatten(), BranchSum(nn.Sequential(nn.Linear(784, 784), nn.ReLU()), nn.Identity())
    )
    assert _same_in_both_modes(make("lenet")) and _same_in_both_modes(block)
    assert not _same_in_both_modes(shifted) and not _same_in_both_modes(dropout)
    assert not _same_in_both_modes(make("residual"))  # batch norm
    for model in (shifted, dropout):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        model.train()
        z0 = eval_logits(model, XW)
        acc = account_step(model, optimizer, X, Y, XW)
        close(acc.probs_before, F.softmax(z0, -1), 1e-12)
        close(acc.dz_actual, eval_logits(model, XW) - z0, 1e-12)
        assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("opt_name", ["sgd-momentum-decay", "sgd-nesterov", "adam", "adamw"])
def test_the_first_step_has_no_history(opt_name):
    """With no optimizer state yet: momentum term zero, SGD's buffer is the gradient itself."""
    model = make("tiny_cnn")
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    want = expected_account(model, optimizer, X, Y, XW)
    acc = account_step(model, optimizer, X, Y, XW)
    assert not acc.momentum.any() and not acc.dz_momentum.any()
    close(acc.dz_gradient, want["dz_gradient"])
    close(acc.dz_weight_decay, want["dz_weight_decay"])
    close(acc.dz_predicted, want["dz_step"])
    assert_same_state(model, optimizer, *want["twin"])


@pytest.mark.parametrize("opt_name", ["sgd-momentum-decay", "adam"])
def test_the_residual_is_second_order(opt_name):
    """η and η/10 from the same state: the residual shrinks ~100×, the terms ~10×."""
    model = make("lenet")
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    warm_up(model, optimizer, 2)
    lr = hyper["lr"]
    big = account_step(model, optimizer, X, Y, XW, lr=lr, commit=False)
    small = account_step(model, optimizer, X, Y, XW, lr=lr / 10, commit=False)
    ratio = np.linalg.norm(big.residual) / np.linalg.norm(small.residual)
    assert 60 < ratio < 160, ratio
    assert np.linalg.norm(big.predicted) / np.linalg.norm(small.predicted) == pytest.approx(10)
    assert np.linalg.norm(small.residual) < 1e-2 * np.linalg.norm(small.actual)


def test_batch_norm_statistics_stand_apart_from_the_residual():
    """The running statistics a step's training forward updates move eval-mode outputs by an
    amount that does not shrink with η: their own exact term, so that the residual does."""
    model = build("bn_blocks")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    runs = [account_step(model, optimizer, X, Y, XW, lr=lr, commit=False) for lr in (1e-3, 1e-4)]
    big, small = (np.linalg.norm(r.statistics) for r in runs)
    assert big > 0 and big == pytest.approx(small, rel=0.05)  # not a remainder of the step
    assert small > 3 * np.linalg.norm(runs[1].predicted)  # in the residual it would swamp it
    ratio = np.linalg.norm(runs[0].residual) / np.linalg.norm(runs[1].residual)
    assert ratio > 8, ratio  # at least first order (the train/eval gradients differ)


def test_parameters_outside_the_optimizer_and_several_groups():
    """A frozen-by-omission layer does not move and does not count; per-group learning rates."""
    model = make("lenet")
    groups = [
        {"params": [model.conv1.weight, model.conv1.bias], "lr": 0.01},
        {"params": [p for n, p in model.named_parameters() if n.startswith("fc")], "lr": 0.03},
    ]  # conv2 is not in the optimizer
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    warm_up(model, optimizer, 1)
    conv2 = model.conv2.weight.detach().clone()
    theta = flat(model.parameters())
    J_o = torch.stack([explicit_jacobian(model, xo) for xo in XW])
    acc = account_step(model, optimizer, X, Y, XW)
    close(acc.dz_predicted, J_o @ (flat(model.parameters()) - theta))
    assert acc.step_scale == 0.01 and acc.lr == 0.01
    assert torch.equal(model.conv2.weight, conv2)


def test_shared_parameters_are_refused():
    """torch.func.functional_call would swap a shared layer's parameters for copies."""
    shared = nn.Linear(10, 10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh(), shared, nn.Tanh(), shared)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, xw = X.float(), XW.float()
    with pytest.raises(ValueError, match="shared between layers"):
        account_step(model, optimizer, x, Y, xw)
    with pytest.raises(ValueError, match="shared between layers"):
        optimizer_kernel(model, optimizer, x, xw)


def test_optimizer_kernel_is_the_ntk_for_sgd_and_J_P_Jt_for_adam():
    model = make("tiny_cnn")
    x1, x2 = inputs(3, seed=7), inputs(2, seed=8)
    for lr in (0.1, 0.0):  # η = 0 moves nothing, but the kernel is still the NTK
        sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        assert torch.equal(optimizer_kernel(model, sgd, x1, x2), empirical_ntk(model, x1, x2))

    adam = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95), amsgrad=True)
    with pytest.raises(ValueError, match="no step yet"):
        optimizer_kernel(model, adam, x1, x2)
    warm_up(model, adam, 3)
    params = list(model.parameters())
    t = float(adam.state[params[0]]["step"]) + 1
    v = torch.maximum(
        flat(adam.state[p]["max_exp_avg_sq"] for p in params),
        0.95 * flat(adam.state[p]["exp_avg_sq"] for p in params),
    )
    P = 1 / (v.sqrt() / math.sqrt(1 - 0.95**t) + 1e-8)
    J1 = torch.stack([explicit_jacobian(model, x) for x in x1])
    J2 = torch.stack([explicit_jacobian(model, x) for x in x2])
    want = torch.einsum("aip,p,bjp->abij", J1, P, J2)
    close(optimizer_kernel(model, adam, x1, x2).numpy(), want)
    close(optimizer_kernel(model, adam, x2, x1).numpy(), want.permute(1, 0, 3, 2))
    adam.param_groups[0]["lr"] = 0.0
    close(optimizer_kernel(model, adam, x1, x2).numpy(), want)
    for other in (x2[:, :, :-1], x2.flatten(1)):  # as for SGD: a ValueError, not a RuntimeError
        with pytest.raises(ValueError, match="batches of examples of one shape"):
            optimizer_kernel(model, adam, x1, other)

    generic = make("residual")
    adam = torch.optim.Adam(generic.parameters(), lr=1e-3)
    warm_up(generic, adam, 1)
    params = list(generic.parameters())
    v = 0.999 * flat(adam.state[p]["exp_avg_sq"] for p in params)
    P = 1 / (v.sqrt() / math.sqrt(1 - 0.999**2) + 1e-8)
    J1 = torch.stack([explicit_jacobian(generic, x) for x in x1])
    J2 = torch.stack([explicit_jacobian(generic, x) for x in x2])
    close(
        optimizer_kernel(generic, adam, x1, x2).numpy(), torch.einsum("aip,p,bjp->abij", J1, P, J2)
    )


class Tempered(nn.Module):
    """A CNN whose logits are divided by a learnable 0-d temperature (the generic path)."""

    def __init__(self):
        super().__init__()
        self.body = make("tiny_cnn")
        self.temperature = nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, x):
        return self.body(x) / self.temperature


@pytest.mark.parametrize("opt_name", ["sgd-momentum-decay", "adam"])
def test_a_zero_dim_parameter_is_accounted(opt_name):
    model = Tempered()
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    warm_up(model, optimizer, 2)
    want = expected_account(model, optimizer, X, Y, XW)
    ntk = optimizer_kernel(model, torch.optim.SGD(model.parameters(), lr=0.1), X, XW)
    close(ntk.numpy(), torch.einsum("aip,bjp->abij", want["J_b"], want["J_o"]))
    acc = account_step(model, optimizer, X, Y, XW)
    assert_same_state(model, optimizer, *want["twin"])
    close(acc.dz_gradient, want["dz_gradient"])
    close(acc.dz_momentum, want["dz_momentum"])
    close(acc.dz_weight_decay, want["dz_weight_decay"])


def test_adam_parameters_without_state_count_with_p_zero():
    """A layer added to the optimizer after some steps (or a head that got no gradient) has no
    second moment yet: the kernel of the next step leaves it out instead of refusing."""
    model = make("tiny_cnn")
    params = list(model.parameters())
    adam = torch.optim.Adam(params[:-1], lr=1e-3)
    warm_up(model, adam, 2)
    adam.add_param_group({"params": [params[-1]]})
    v = 0.999 * flat(adam.state[p]["exp_avg_sq"] for p in params[:-1])
    P = torch.cat([1 / (v.sqrt() / math.sqrt(1 - 0.999**3) + 1e-8), params[-1].detach() * 0])
    x1, x2 = inputs(3, seed=7), inputs(2, seed=8)
    J1 = torch.stack([explicit_jacobian(model, x) for x in x1])
    J2 = torch.stack([explicit_jacobian(model, x) for x in x2])
    close(optimizer_kernel(model, adam, x1, x2).numpy(), torch.einsum("aip,p,bjp->abij", J1, P, J2))


def test_gradient_hooks_are_refused_by_accounts_and_ignored_by_kernels():
    """A hook may change the gradient a step takes, which the account's terms would not see;
    J = ∂z/∂θ, about the function, is the same with backward hooks as without."""
    model = make("tiny_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warm_up(model, optimizer, 1)
    plain_ntk = empirical_ntk(model, XW, X[:2])
    plain_kp = optimizer_kernel(model, optimizer, XW, X[:2])
    calls = []
    first = next(iter(model.parameters()))
    hooks = [
        lambda: first.register_hook(lambda g: g * 0.5),
        lambda: first.register_post_accumulate_grad_hook(lambda p: None),
        lambda: model[-1].register_full_backward_hook(lambda m, gi, go: calls.append(1)),
        lambda: model[-1].register_full_backward_pre_hook(lambda m, go: None),
        lambda: nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None),
    ]
    for register in hooks:
        handle = register()
        try:
            model2, optimizer2 = twin(model, optimizer)
            for account in (
                lambda: account_step(model, optimizer, X, Y, XW),
                lambda: decompose_step(model, optimizer, XW[0], X[0], 3),
                lambda: AccountedStep(model, optimizer, XW),
            ):
                with pytest.raises(ValueError, match="cannot follow gradient hooks"):
                    account()
            assert_same_state(model, optimizer, model2, optimizer2)
            close(empirical_ntk(model, XW, X[:2]).numpy(), plain_ntk)
            close(optimizer_kernel(model, optimizer, XW, X[:2]).numpy(), plain_kp)
            model(X.clone().requires_grad_()).sum().backward()  # set aside, not dropped
        finally:
            handle.remove()
    assert calls == [1]


class ReadsItsLogits(nn.Sequential):
    """A forward that reads a value into Python: vmap cannot batch it, one example at a time
    can (the branch each example takes on its own)."""

    def forward(self, x):
        z = super().forward(x)
        return z if float(z.detach().abs().max()) < 1e6 else z / 2


class _Square(torch.autograd.Function):
    """x² with an old-style forward(ctx, …): torch.func cannot transform it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class OldStyleFunction(nn.Sequential):
    def forward(self, x):
        return _Square.apply(super().forward(x))


def test_a_model_torch_func_cannot_transform_gets_a_clear_error():
    torch.manual_seed(0)
    reads = ReadsItsLogits(nn.Flatten(), nn.Linear(784, 10)).double()
    J = [explicit_jacobian(reads, x) for x in (*XW, *X[:2])]
    want = torch.stack([torch.stack([a @ b.T for b in J[len(XW) :]]) for a in J[: len(XW)]])
    close(empirical_ntk(reads, XW, X[:2]), want, 1e-12)
    model = OldStyleFunction(nn.Flatten(), nn.Linear(784, 10)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = flat(model.parameters())
    with pytest.raises(ValueError, match=r"torch.func .* cannot differentiate this model"):
        empirical_ntk(model, XW, X)
    with pytest.raises(ValueError, match=r"cannot differentiate this model.*\(no step was taken\)"):
        account_step(model, optimizer, X, Y, XW)
    assert torch.equal(flat(model.parameters()), before)


@pytest.mark.parametrize("opt_name", ["sgd-nesterov", "adam-amsgrad-maximize"])
def test_preview_and_undo_restore_everything_bit_exactly(opt_name):
    model = make("lenet")
    kind, hyper = OPTIMIZERS[opt_name]
    optimizer = kind(model.parameters(), **hyper)
    warm_up(model, optimizer, 2)
    reference = twin(model, optimizer)
    rng = torch.get_rng_state()

    preview = account_step(model, optimizer, X[:1], Y[:1], XW, lr=0.5 * hyper["lr"], commit=False)
    assert_same_state(model, optimizer, *reference)
    assert torch.equal(torch.get_rng_state(), rng)

    snapshot = optimizer_snapshot(model, optimizer)
    applied = account_step(model, optimizer, X[:1], Y[:1], XW, lr=0.5 * hyper["lr"])
    for name in ("actual", "gradient", "momentum", "weight_decay", "residual"):
        assert np.array_equal(getattr(preview, name), getattr(applied, name)), name
    snapshot.restore(model, optimizer)  # undo
    assert_same_state(model, optimizer, *reference)
    again = account_step(model, optimizer, X[:1], Y[:1], XW, lr=0.5 * hyper["lr"])
    assert np.array_equal(again.actual, applied.actual)
    snapshot.restore(model, optimizer)  # a snapshot restores any number of times
    assert_same_state(model, optimizer, *reference)
    with pytest.raises(ValueError, match="another model"):
        snapshot.restore(make("tiny_cnn"), torch.optim.SGD(make("tiny_cnn").parameters(), lr=1))


def test_negative_gradient_steps_ascend():
    model = make("tiny_cnn")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model2, opt2 = twin(model, optimizer)
    probs = F.softmax(eval_logits(model, X), -1)
    acc = account_step(model, optimizer, X, Y, XW, loss="neg")
    opt2.zero_grad()
    model2.train()
    (-F.cross_entropy(model2(X), Y)).backward()
    opt2.step()
    assert_same_state(model, optimizer, model2, opt2)
    close(acc.G, F.one_hot(Y, 10) - probs, 1e-12)  # G = ∂(−ℓ)/∂z = e_y − π


def test_a_step_leaves_no_reference_cycle_holding_its_graph():
    """The hooks write into plain dicts: once the caller drops the logits, the graph is freed."""
    for model in (make("lenet"), DropoutMLP().double()):  # captured factors; eval-mode pass
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = AccountedStep(model, optimizer, XW)
        logits = step.forward(X)
        step.step(F.cross_entropy(logits, Y), Y)
        alive = [weakref.ref(logits), weakref.ref(step)]
        del logits, step
        gc.collect()
        assert [ref() for ref in alive] == [None, None]


def test_bad_inputs_raise_clear_errors():
    model = make("tiny_cnn")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match=r"SGD, torch\.optim\.Adam and torch\.optim\.AdamW; got .*RMSprop"
    ):
        account_step(model, torch.optim.RMSprop(model.parameters()), X, Y, XW)
    with pytest.raises(ValueError, match="not the model's"):
        account_step(model, torch.optim.SGD(make("tiny_cnn").parameters(), lr=1), X, Y, XW)
    with pytest.raises(ValueError, match="same shape"):
        account_step(model, sgd, X[:, :, :20], Y, XW)
    with pytest.raises(ValueError, match=r"classes in \[0, 10\)"):
        account_step(model, sgd, X, Y + 5, XW)
    with pytest.raises(ValueError, match="6 labels for 5"):
        account_step(model, sgd, X[:5], Y, XW)
    with pytest.raises(ValueError, match="int classes"):
        account_step(model, sgd, X, Y.double(), XW)
    with pytest.raises(ValueError, match="lr must be"):
        account_step(model, sgd, X, Y, XW, lr=float("nan"))
    with pytest.raises(ValueError, match="classes must be 2 ints"):
        account_step(model, sgd, X, Y, XW, classes=[1])
    with pytest.raises(ValueError, match="loss must be"):
        account_step(model, sgd, X, Y, XW, loss="mse")
    with pytest.raises(ValueError, match="x_watch"):
        account_step(model, sgd, X, Y, XW[0])
    with pytest.raises(ValueError, match="classes must be"):
        Watch(XW, (1,))
    for focus in ((2,), (0, 0), (True,), (-1,)):
        with pytest.raises(ValueError, match=r"focus must be distinct positions in \[0, 2\)"):
            Watch(XW, (1, 2), focus=focus)
    unchanged = twin(make("tiny_cnn"), torch.optim.SGD(make("tiny_cnn").parameters(), lr=0.1))
    assert_same_state(model, sgd, *unchanged)  # nothing moved
    with pytest.raises(ValueError, match="same shape"):  # fails before its step: lr untouched
        account_step(model, sgd, X[:, :, :20], Y, XW, lr=0.7)
    assert sgd.param_groups[0]["lr"] == 0.1
    m32 = make("tiny_cnn").float()
    opt32 = torch.optim.SGD(m32.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"lr = 1e\+39 overflows the parameters' torch.float32"):
        account_step(m32, opt32, X.float(), Y, XW.float(), lr=1e39)
    assert opt32.param_groups[0]["lr"] == 0.1 and not opt32.state
    adam = torch.optim.Adam(m32.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"in Adam's next step \(η/\(1 − β₁ᵗ\) = 1e\+39\)"):
        account_step(m32, adam, X.float(), Y, XW.float(), lr=1e38)
    assert adam.param_groups[0]["lr"] == 1e-3 and not adam.state


class TenInTrainingMode(nn.Sequential):
    """Five classes in eval mode, ten in training mode: a model no label check can trust."""

    def forward(self, x):
        z = super().forward(x)
        return z if self.training else z[:, :5]


@pytest.mark.parametrize("shape", [(28, 28), (3, 28, 28), (1, 1, 28, 28)])
def test_decompose_step_refuses_examples_of_another_shape(shape):
    model = make("lenet")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.zeros(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cannot take x_o and x_u of shape .* as one example"):
        decompose_step(model, optimizer, x, x, 3)


def test_more_bad_inputs_are_refused_before_anything_moves(mnist):
    model = make("tiny_cnn")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match=r"must be a torch\.nn\.Module, got function"):
        account_step(lambda x: x, sgd, X, Y, XW)
    odd = TenInTrainingMode(nn.Flatten(), nn.Linear(784, 10)).double()
    odd_sgd = torch.optim.SGD(odd.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"in training mode the model maps .* \(6, 10\), in eval"):
        account_step(odd, odd_sgd, X, Y % 5, XW)
    with pytest.raises(ValueError, match="watched examples hold NaN"):
        Watch(XW * float("nan"), (1, 2))
    lenet, data = make("lenet").float(), mnist
    config = TrainConfig(train_size=256, epochs=1, batch_size=64)
    watch = Watch(data.test.x[:2], (7, 2))
    rmsprop = torch.optim.RMSprop(lenet.parameters())
    with pytest.raises(ValueError, match=r"AdamW; got .*RMSprop"):  # at once, not at next()
        train(lenet, data, config, rmsprop, watch=watch)
    with pytest.raises(ValueError, match=r"learning rate 1e\+39 overflows"):
        train(lenet, data, replace(config, lr=1e39))


def test_classes_and_learning_rates_in_every_usual_form():
    model = make("tiny_cnn")
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    warm_up(model, sgd, 2)
    runs = []
    for classes in ([2, 7], torch.tensor([2, 7]), np.array([2, 7])):
        reference = twin(model, sgd)
        runs.append(account_step(*reference, X, Y, XW, classes=classes))
    assert all(np.array_equal(r.contributions, runs[0].contributions) for r in runs)
    assert runs[0].classes.tolist() == [2, 7]
    own = decompose_step(model, sgd, XW[0], X[0], 3)  # lr None: the optimizer's
    assert own.lr == 0.1
    assert np.array_equal(own.actual, decompose_step(model, sgd, XW[0], X[0], 3, lr=0.1).actual)


@pytest.mark.parametrize("lr", [np.float32(0.05), np.int64(0), torch.tensor(0.05)])
def test_any_real_scalar_is_a_learning_rate(lr):
    runs = []
    for rate in (lr, float(lr)):
        model = make("tiny_cnn")
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        runs.append(account_step(model, sgd, X, Y, XW, lr=rate))
    assert runs[0].lr == float(lr)
    np.testing.assert_array_equal(runs[0].predicted, runs[1].predicted)


# --------------------------------------------------------------------------- training


SMALL = TrainConfig(train_size=320, batch_size=64, epochs=1, eval_every=10**6, eval_size=64)


@pytest.mark.parametrize("focus", [(), (1,), (0, 1, 2)])
def test_watching_leaves_training_bit_identical_and_accounts_each_step(mnist, tmp_path, focus):
    watch_idx = [7, 16, 3]
    x_watch = mnist.test.x[watch_idx]
    labels = tuple(int(mnist.test.y[i]) for i in watch_idx)
    runs = {}
    for watched in (False, True):
        model = make("lenet").float()
        watch = Watch(x_watch, labels, focus=focus) if watched else None
        records = list(train(model, mnist, SMALL, watch=watch))
        runs[watched] = (records, model)
    (plain, m0), (seen, m1) = runs[False], runs[True]
    assert [r.loss for r in plain] == [r.loss for r in seen]
    assert all(
        torch.equal(a, b) for a, b in zip(m0.state_dict().values(), m1.state_dict().values())
    )
    assert all(r.account is None for r in plain) and all(r.account is not None for r in seen)
    rows = np.arange(3)
    for r in seen:
        a = r.account
        assert isinstance(a, WatchAccount)
        assert np.array_equal(mnist.train.y.numpy()[r.batch_indices], a.batch_labels)
        assert a.lr == r.lr and a.loss == pytest.approx(r.loss, rel=1e-6)
        assert a.classes.tolist() == list(labels) and a.focus.tolist() == list(focus)
        assert a.contributions.shape == (3, 64) and a.class_momentum.shape == (3,)
        np.testing.assert_allclose(a.class_gradient, a.contributions.sum(1), rtol=1e-12)
        assert np.array_equal(
            a.class_predicted, a.class_gradient + a.class_momentum + a.class_weight_decay
        )
        assert np.array_equal(a.class_actual, a.actual[rows, list(labels)])
        assert np.array_equal(a.class_residual, a.class_actual - a.class_predicted)
        assert not np.any(a.class_statistics)  # LeNet: no running statistics
        if focus:
            f = list(focus)
            assert a.focused.top_kernel.shape == (len(f), 10, 10)
            assert a.focused.classes.tolist() == [labels[i] for i in f]
            assert np.array_equal(a.contributions[f], a.focused.contributions)
            assert np.array_equal(
                a.class_residual[f], a.focused.residual[np.arange(len(f)), a.focused.classes]
            )
        else:
            assert a.focused is None
    assert not seen[0].batch_indices.flags.writeable

    # every step equals account_step on the same batch from the same state (float32 here)
    model = make("lenet").float()
    optimizer = make_optimizer(model, SMALL)
    for r in seen:
        for group in optimizer.param_groups:
            group["lr"] = r.lr
        idx = torch.from_numpy(r.batch_indices.copy())
        want = account_step(
            model, optimizer, mnist.train.x[idx], mnist.train.y[idx], x_watch, classes=labels,
            top_kernels=True,
        )  # fmt: skip
        a, c = r.account, list(labels)
        if focus == (0, 1, 2):  # the same computation, bit for bit
            for name in ("gradient", "actual", "momentum", "weight_decay", "top_kernel"):
                assert np.array_equal(getattr(want, name), getattr(a.focused, name)), name
        close(a.contributions, want.contributions, 1e-5)
        close(a.class_momentum, want.momentum[rows, c], 1e-5)
        close(a.class_weight_decay, want.weight_decay[rows, c], 1e-5)
        close(a.class_actual, want.actual[rows, c], 1e-5)
        close(a.probs_before, want.probs_before, 1e-6)

    # accumulated over the run: exact sums of the per-step terms, NaN where not accounted
    run = RunAccount(labels, len(mnist.train), 10, keep_steps=True)
    for r in seen:
        run.add(r.account, r.batch_indices, r.step)
    by_example = np.zeros((3, len(mnist.train)))
    totals = {k: np.zeros(3) for k in ("actual", "gradient", "momentum", "residual")}
    for r in seen:
        a = r.account
        np.add.at(by_example, (slice(None), r.batch_indices), a.contributions)
        for k in totals:
            totals[k] += getattr(a, "class_" + k)
    np.testing.assert_allclose(run.by_example, by_example, rtol=1e-12, atol=1e-15)
    for k, v in totals.items():
        np.testing.assert_allclose(run.totals()[k][rows, c], v, rtol=1e-12, atol=1e-15)
    by_class = run.by_class
    for w in range(3):
        known = np.zeros((10, 10), bool)
        known[:, labels[w]] = True
        if w in focus:
            known[:] = True
        assert np.isfinite(by_class[w][known]).all() and np.isnan(by_class[w][~known]).all()
        assert np.isfinite(run.totals()["actual"][w]).all()
        assert np.isnan(run.totals()["momentum"][w]).any() == (w not in focus)
        top = run.top(w, 5)
        assert np.array_equal(top.helpful, np.argsort(-by_example[w], kind="stable")[:5])
        assert (top.helpful_values > 0).all() and (top.harmful_values < 0).all()
        assert np.array_equal(top.harmful_values, np.sort(by_example[w])[: len(top.harmful)])
    assert run.timeline()["contributions"].shape == (len(seen), 3, 64)
    back = RunAccount.load(run.save(tmp_path / "run.npz"))
    np.testing.assert_array_equal(back.by_class, run.by_class)  # NaN where NaN
    for k, v in run.totals().items():
        np.testing.assert_array_equal(back.totals()[k], v)
    text = run.save(tmp_path / "run.csv").read_text()
    assert "nan" not in text.lower()  # the CSV holds each example's own class: all accounted
    with pytest.raises(ValueError, match="follows classes"):
        RunAccount(labels[::-1], len(mnist.train)).add(seen[0].account, seen[0].batch_indices)


def test_log_probabilities_stay_finite_where_probabilities_underflow(tmp_path):
    """log π of a class 800 nats below the top is −800, not log(0) = −inf: in the accounts, the
    run account's timeline and its CSV (the watch's timeline shows the same numbers)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, -800.0, -5.0], dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, xw = torch.randn(2, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    run = RunAccount([1], num_train=2, keep_steps=True)
    accounts = []
    for focus in (None, ()):
        with torch.no_grad():
            want = F.log_softmax(model(xw), -1)[0, 1].item()
        assert -801 < want < -799
        step = AccountedStep(model, optimizer, xw, classes=[1], focus=focus)
        logits = step.forward(x)
        optimizer.zero_grad()
        acc = step.step(F.cross_entropy(logits, torch.tensor([0, 1])), [0, 1])
        assert acc.probs_before[0, 1] == 0.0  # underflowed
        assert acc.log_probs_before[0, 1] == pytest.approx(want, rel=1e-15)
        run.add(acc, [0, 1])
        accounts.append(acc)
    assert np.isfinite(run.timeline()["log_probs_before"]).all()
    rows = run.save(tmp_path / "run.csv").read_text().splitlines()
    values = [float(r.split(",")[5]) for r in rows if not r.startswith(("#", "step"))]
    assert len(values) == 2 and all(-801 < v < -799 for v in values), values
    back = RunAccount.load(run.save(tmp_path / "run.npz"))
    assert np.array_equal(back.timeline()["log_probs_before"], run.timeline()["log_probs_before"])
    # the app's watch timeline (it showed log(1e-300) = −690.8 here)
    from types import SimpleNamespace

    from ntkviz.app.features.watch import WatchObserver
    from ntkviz.app.state import Example

    observer = WatchObserver((Example("test", 0),), focus=(), classes=(1,))
    observer._new_account(2, 3, {})
    engine = SimpleNamespace(data=SimpleNamespace(classes=("a", "b", "c")))
    records = [SimpleNamespace(account=accounts[1], batch_indices=np.array([0, 1]), step=2)]
    (event,) = observer.observe(engine, records)
    assert event.payload.log_prob[0, 0] == accounts[1].log_probs_before[0, 1]


def test_run_account_files_round_trip(tmp_path, mnist):
    model = make("tiny_cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = RunAccount([4, 9], num_train=100, keep_steps=True, meta={"model": "tiny_cnn"})
    for s in range(3):
        idx = np.arange(s * 6, s * 6 + (6 if s < 2 else 4))
        acc = account_step(model, optimizer, inputs(len(idx), seed=s), Y[: len(idx)], XW)
        run.add(acc, idx, step=10 + s)
    path = run.save(tmp_path / "run.npz")
    with np.load(path, allow_pickle=False) as f:
        assert f["by_example"].shape == (2, 100) and f["step_contributions"].shape == (3, 2, 6)
        assert f["step_batch_indices"][2].tolist() == [12, 13, 14, 15, -1, -1]
        assert f["helpful_index"].shape == (2, 10)
    back = RunAccount.load(path)
    assert back.meta == {"model": "tiny_cnn"} and back.steps == 3
    assert np.array_equal(back.by_example, run.by_example)
    assert np.array_equal(back.by_class, run.by_class)
    for k, v in run.totals(logits=True).items():
        assert np.array_equal(back.totals(logits=True)[k], v)
    for k, v in run.timeline().items():
        assert np.array_equal(back.timeline()[k], v), k
    assert back.top(1).helpful.tolist() == run.top(1).helpful.tolist()

    text = run.save(tmp_path / "run.csv").read_text().splitlines()
    assert text[0].startswith("# ntkviz run account") and '# model: "tiny_cnn"' in text
    rows = [line for line in text if not line.startswith("#")]
    assert rows[0].split(",")[:5] == ["step", "lr", "loss", "watched", "class"]
    assert len(rows) == 1 + 3 * 2 and rows[1].split(",")[0] == "10"
    with pytest.raises(ValueError, match=r"\.npz or \.csv"):
        run.save(tmp_path / "run.json")
    with pytest.raises(FileReadError, match="the CSV export of a run account"):
        RunAccount.load(tmp_path / "run.csv")  # was "damaged, or another kind of file"
    empty = RunAccount([4, 9], num_train=100, keep_steps=True)  # no step yet: a KeyError
    header = empty.save(tmp_path / "empty.csv").read_text().splitlines()
    assert [line for line in header if not line.startswith("#")][1:] == []
    with np.load(tmp_path / "run.npz") as f:  # a version-1 file: no statistics term yet
        assert int(f["version"]) == 2
        old = {k: f[k] for k in f.files if "statistics" not in k}
    np.savez(tmp_path / "v1.npz", **{**old, "version": np.array(1)})
    v1 = RunAccount.load(tmp_path / "v1.npz")
    assert not np.any(v1.totals()["statistics"]) and v1.steps == run.steps
    np.testing.assert_array_equal(v1.totals()["residual"], run.totals()["residual"])
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(FileReadError, match="not a readable"):  # also a ValueError
        RunAccount.load(tmp_path / "bad.npz")
    good = (tmp_path / "run.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"cut\.npz is not a readable ntkviz run account"):
        RunAccount.load(tmp_path / "cut.npz")
    with np.load(tmp_path / "run.npz") as f:
        np.savez(tmp_path / "bare.npz", format=f["format"], version=f["version"])
    with pytest.raises(
        ValueError, match=r"bare\.npz is a damaged ntkviz run account: no 'classes'"
    ):
        RunAccount.load(tmp_path / "bare.npz")
    with np.load(tmp_path / "run.npz") as f:  # its classes cut to one watched example
        np.savez(tmp_path / "cut_classes.npz", **{**f, "classes": f["classes"][:1]})
    with pytest.raises(
        ValueError, match=r"by_example is float64 \(2, 100\), not a float array \(1, 100\)"
    ):
        RunAccount.load(tmp_path / "cut_classes.npz")
    # every array is checked against the others: nothing loads that fails later
    V = run.totals()["actual"].shape[1]
    with np.load(tmp_path / "run.npz") as f:
        arrays = {k: f[k] for k in f.files}
    damages = {
        "classes": ({"classes": np.array([99, 1])}, rf"classes must be < V = {V}"),
        "lr": ({"step_lr": arrays["step_lr"][:1]}, r"step_lr is float64 \(1,\), not \(3,\)"),
        "total": (
            {"total_actual": np.zeros((2, 3))},
            rf"float64 \(2, {V}\), not a float array \(2, 3\)",
        ),
        "by_class": ({"by_class": np.zeros((2, 10, 3))}, r"by_class is float64 \(2, 10, 3\)"),
        "steps": ({"steps": np.array(-3)}, r"steps must be an int ≥ 0, got array\(-3\)"),
        "version": ({"version": np.array("x")}, r"version must be an int ≥ 0"),
        "steps7": ({"steps": np.array(7)}, r"step_\w+ is \S+ \(3,\), not \(7,\) \(steps = 7\)"),
        "index": (
            {"step_batch_indices": arrays["step_batch_indices"] + 100},
            r"step_batch_indices must be in \[0, 100\)",
        ),
        "labels": (
            {"step_batch_labels": np.where(arrays["step_batch_labels"] >= 0, 12, -1)},
            r"step_batch_labels must be classes in \[0, \d+\)",
        ),
    }
    del arrays["step_gradient"]
    np.savez(tmp_path / "nogradient.npz", **arrays)
    with pytest.raises(FileReadError, match=r"nogradient\.npz is a damaged .*lacks step_gradient"):
        RunAccount.load(tmp_path / "nogradient.npz")
    with np.load(tmp_path / "run.npz") as f:
        arrays = {k: f[k] for k in f.files}
    for name, (change, message) in damages.items():
        np.savez(tmp_path / f"{name}.npz", **{**arrays, **change})
        with pytest.raises(FileReadError, match=rf"{name}\.npz is a damaged .*{message}"):
            RunAccount.load(tmp_path / f"{name}.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "pickled.npz").write_bytes((tmp_path / "one.npy").read_bytes())
    for bad in ("pickled.npz", "bad.npz"):
        with pytest.raises(FileReadError, match="damaged, or another kind of file") as e:
            RunAccount.load(tmp_path / bad)
        assert "allow_pickle" not in str(e.value)
    with pytest.raises(ValueError, match="keeps no timeline"):
        RunAccount([1], 10).save(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="watched examples"):
        RunAccount([1], 100).add(acc, np.arange(4))
    with pytest.raises(ValueError, match=r"batch_indices must be in \[0, 5\)"):
        RunAccount([1, 2], 5).add(acc, np.arange(4) + 3)


def test_adam_and_adamw_training_configs(mnist):
    config = replace(SMALL, optimizer="adamw", lr=1e-3, betas=[0.8, 0.99], eps=1e-7)
    assert config.betas == (0.8, 0.99)
    opt = make_optimizer(make("lenet"), config)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["eps"] == 1e-7
    sgd = make_optimizer(make("lenet"), replace(SMALL, nesterov=True))
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"]
    model = make("lenet").float()
    records = list(
        train(
            model, mnist, replace(config, optimizer="adam"), watch=Watch(mnist.test.x[:2], (7, 2))
        )
    )
    assert records[-1].account.optimizer == "adam" and len(records) == 5
    for bad, match in (
        (dict(optimizer="rmsprop"), "optimizer must be one of sgd, adam, adamw"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(nesterov=True, momentum=0.0), "nesterov"),
        (dict(nesterov=True, optimizer="adam"), "nesterov"),
    ):
        with pytest.raises(ValueError, match=match):
            replace(SMALL, **bad).validate()


def test_old_configs_load_with_defaults():
    from ntkviz.checkpoint import config_from

    old = {
        k: v
        for k, v in TrainConfig(lr=0.01).to_dict().items()
        if k not in ("optimizer", "betas", "eps", "nesterov")
    }
    config = config_from({"config": old})
    assert config.optimizer == "sgd" and config.betas == (0.9, 0.999) and config.lr == 0.01


def test_cli_writes_the_accounts_of_a_watched_run(tmp_path, mnist, capsys):
    from ntkviz.cli import main

    npz, csv_path = tmp_path / "run.npz", tmp_path / "run.csv"
    args = ["train", "--watch", "7,16", "--accounts", str(npz), "--accounts", str(csv_path)]
    args += ["--train-size", "192", "--epochs", "1", "--data-dir", str(mnist.root), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "test[7] (class 9)" in out and f"wrote {npz}" in out
    with np.load(npz, allow_pickle=False) as f:
        meta = json.loads(str(f["meta_json"]))
        assert meta["watch_indices"] == [7, 16] and meta["watch_split"] == "test"
        assert meta["config"]["optimizer"] == "sgd"
        # the keys the app's exports use too
        assert meta["watched"] == [["test", 7], ["test", 16]] and meta["started_at"] == 0
        assert meta["class_names"] == list(mnist.classes)
        assert f["step_step"].tolist() == [1, 2, 3] and f["step_contributions"].shape == (3, 2, 64)
        assert f["by_example"].shape == (2, len(mnist.train))
        labels = mnist.train.y.numpy()[f["step_batch_indices"]]
        assert np.array_equal(labels, f["step_batch_labels"])
        np.testing.assert_allclose(f["step_actual"].sum(0), f["total_actual"], rtol=1e-12)
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 1 + 3 * 2
    assert main(["train", "--watch", "7", "--out", str(tmp_path / "m.pt")]) == 2
    assert main(["train", "--watch", "7,x", "--accounts", str(npz)]) == 2
    data_dir = ["--data-dir", str(mnist.root)]
    assert main(["train", "--watch", "10000", "--accounts", str(npz), *data_dir]) == 2
    assert main(["train", "--watch", "1", "--accounts", str(tmp_path / "a.json")]) == 2
    assert main(["train", "--out", str(tmp_path / "m.pt"), "--betas", "0.9"]) == 2
