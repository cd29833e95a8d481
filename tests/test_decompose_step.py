"""decompose_step: one update's decomposition with an optimizer's real next step."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unchanged, explicit_jacobian, snapshot
from models import inputs, make

from ntkviz.accounting import decompose_step
from ntkviz.decomposition import decompose


def test_plain_sgd_is_decompose():
    model = make("lenet")
    x = inputs(2, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    d = decompose_step(model, opt, x[0], x[1], 4, 0.1)
    ref = decompose(model, x[0], x[1], 4, 0.1)
    for name in ("A", "K", "G", "predicted", "actual", "residual", "probs_after", "logits_after"):
        np.testing.assert_allclose(getattr(d, name), getattr(ref, name), rtol=1e-9, atol=1e-12,
                                   err_msg=name)  # fmt: skip
    np.testing.assert_allclose(d.gradient_term, ref.predicted, rtol=1e-9, atol=1e-12)
    assert not d.momentum.any() and not d.weight_decay.any() and d.step_scale == pytest.approx(0.1)


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_optimizer_terms_against_an_explicit_step(kind):
    torch.manual_seed(0)
    model = make("mlp")
    x, xb = inputs(2, seed=5), inputs(8, seed=6)
    yb = torch.arange(8) % 10
    if kind == "momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-3)
    for _ in range(2):  # some history
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
    before = snapshot(model)
    state = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    d = decompose_step(model, opt, x[0], x[1], 3, 0.02)
    assert_unchanged(model, before)  # a preview: nothing moved
    assert all(torch.equal(opt.state_dict()["state"][0][k], v) for k, v in state.items())
    # the real step, taken on a copy, is the decomposition's "actual"
    import copy

    m2, o2 = copy.deepcopy(model), None
    o2 = type(opt)(m2.parameters(), **{k: v for k, v in opt.defaults.items()})
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for g in o2.param_groups:
        g["lr"] = 0.02
    theta = torch.cat([p.detach().flatten() for p in m2.parameters()])
    o2.zero_grad()
    F.cross_entropy(m2(x[1:2]), torch.tensor([3])).backward()
    o2.step()
    delta = torch.cat([p.detach().flatten() for p in m2.parameters()]) - theta
    with torch.no_grad():
        actual = F.log_softmax(m2(x[:1]), -1)[0] - F.log_softmax(model(x[:1]), -1)[0]
    np.testing.assert_allclose(d.actual, actual.numpy(), rtol=1e-8, atol=1e-12)
    # first order: A·J(x_o)·Δθ, split into the terms; predicted is their sum
    J = explicit_jacobian(model, x[0])
    first = torch.from_numpy(np.array(d.A)) @ (J @ delta)
    np.testing.assert_allclose(d.predicted, first.numpy(), rtol=1e-6, atol=1e-10)
    total = d.gradient_term + d.momentum + d.weight_decay
    np.testing.assert_allclose(d.predicted, total, rtol=1e-12, atol=1e-15)
    assert np.abs(d.momentum).max() > 0 and np.abs(d.weight_decay).max() > 0
    # the gradient term is −s·A·K_P·G
    np.testing.assert_allclose(d.gradient_term, -d.step_scale * d.A @ d.K @ d.G, rtol=1e-9,
                               atol=1e-14)  # fmt: skip


def test_exports_state_the_optimizer_steps_formula(tmp_path):
    import json

    from ntkviz.results import write_decomposition

    model = make("lenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    x = inputs(2, seed=3)
    step = decompose_step(model, opt, x[0], x[1], 3, 0.1)
    record = json.loads(write_decomposition(step, tmp_path / "s.json").read_text())
    assert record["formula"].startswith("gradient_term = -step_scale * A @ K @ G")
    assert "predicted = gradient_term + momentum + weight_decay" in record["formula"]
    assert record["optimizer"] == "sgd" and record["step_scale"] == pytest.approx(0.1)
    np.testing.assert_allclose(
        np.array(record["predicted"]),
        np.array(record["gradient_term"]) + record["momentum"] + np.array(record["weight_decay"]),
    )
    with np.load(write_decomposition(step, tmp_path / "s.npz")) as f:
        assert str(f["formula"]) == record["formula"] and str(f["optimizer"]) == "sgd"
    csv = write_decomposition(step, tmp_path / "s.csv").read_text()
    assert '# optimizer: "sgd"' in csv and '# formula: "gradient_term' in csv
    plain = json.loads(
        write_decomposition(decompose(model, x[0], x[1], 3, 0.1), tmp_path / "p.json").read_text()
    )
    assert plain["formula"] == "predicted = -lr * A @ K @ G ; residual = actual - predicted"
