"""Probe-set summaries against direct computations."""

import re

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, explicit_jacobian, snapshot
from models import inputs, make

from ntkviz import kernel
from ntkviz.analysis import (
    balanced_indices,
    class_influence,
    class_kernel_map,
    gram_spectrum,
    iter_class_kernel_map,
    ntk_spectrum,
    rank_correlation,
    squeeze_steps,
    squeeze_survey,
)
from ntkviz.decomposition import decompose, influence
from ntkviz.kernel import empirical_ntk, iter_kernel_gram, iter_kernel_norms


def reduce_to_classes(norms: np.ndarray, labels: np.ndarray, C: int) -> np.ndarray:
    """The class×class mean of pair norms without self-pairs, written out loop by loop."""
    out = np.zeros((C, C))
    for i in range(C):
        for j in range(C):
            pairs = [
                norms[a, b]
                for a in np.flatnonzero(labels == i)
                for b in np.flatnonzero(labels == j)
                if a != b
            ]
            out[i, j] = np.mean(pairs) if pairs else 0.0
    return out


def test_balanced_indices_take_per_class_examples_grouped_by_class():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    idx = balanced_indices(labels, 2, seed=0)
    assert labels[idx].tolist() == [0, 0, 1, 1, 2, 2]
    assert len(set(idx.tolist())) == 6
    assert np.array_equal(idx, balanced_indices(labels, 2, seed=0))


def test_class_influence_is_the_mean_per_true_class():
    model = make("mlp")
    x, labels = inputs(9), np.array([0, 1, 2, 0, 1, 2, 0, 0, 2])
    inf = influence(model, x, inputs(1, seed=5)[0], 1, 0.2, actual=True, kernel_norm=True)
    out = class_influence(inf, labels, num_classes=4)
    assert out["delta_probs"].shape == (4, 10) and out["count"].tolist() == [4, 2, 3, 0]
    for c in range(3):
        rows = [
            decompose(model, x[i], inputs(1, seed=5)[0], 1, 0.2)
            for i in np.flatnonzero(labels == c)
        ]
        np.testing.assert_allclose(
            out["delta_probs"][c],
            np.mean([d.probs_before * d.predicted for d in rows], 0),
            atol=1e-12,
        )
        np.testing.assert_allclose(
            out["delta_probs_actual"][c],
            np.mean([d.probs_after - d.probs_before for d in rows], 0),
            atol=1e-12,
        )
        np.testing.assert_allclose(
            out["kernel_norm"][c], np.mean([np.linalg.norm(d.K) for d in rows]), rtol=1e-10
        )
    assert np.all(out["delta_probs"][3] == 0)
    with pytest.raises(ValueError, match="labels"):
        class_influence(inf, labels[:3])


def test_class_kernel_map_averages_frobenius_norms_over_class_pairs():
    model = make("mlp")
    x, labels = inputs(6), np.array([0, 0, 1, 1, 2, 2])
    J = [explicit_jacobian(model, xi) for xi in x]
    norms = np.array([[float(torch.linalg.norm(a @ b.T)) for b in J] for a in J])
    M = class_kernel_map(model, x, labels, chunk=4)
    assert M.shape == (3, 3)
    np.testing.assert_allclose(M, M.T, rtol=1e-12)
    assert M[0, 1] == pytest.approx(norms[np.ix_([0, 1], [2, 3])].mean(), rel=1e-10)
    assert M[2, 2] == pytest.approx(norms[4, 5], rel=1e-10)  # self-pairs excluded


@pytest.mark.parametrize("name", ["lenet", "tiny_cnn", "residual", "lenet_frozen"])
def test_kernel_norms_equal_explicit_jacobian_products(name):
    model = make(name.removesuffix("_frozen"))
    if name.endswith("_frozen"):
        model.conv1.weight.requires_grad_(False)
        model.fc3.bias.requires_grad_(False)
        model.fc1.weight.requires_grad_(False)
    model.train()
    snap = snapshot(model)
    x = inputs(7, seed=3)
    J = [explicit_jacobian(model, xi) for xi in x]
    expected = np.array([[float(torch.linalg.norm(a @ b.T)) for b in J] for a in J])
    items = list(iter_kernel_norms(model, x, chunk_size=3))
    np.testing.assert_allclose(items[-1].numpy(), expected, rtol=1e-10)
    progress = items[:-1]
    assert all(isinstance(p, tuple) for p in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert progress[-1][0] == progress[-1][1]
    assert_unchanged(model, snap)
    assert model.training


def test_generic_kernel_norms_come_in_short_tiles(monkeypatch):
    """The generic path computes every pair: it yields after each tile of a row, timed to
    TILE_SECONDS, so that a job stops promptly; first (0, total), before any work."""
    monkeypatch.setattr(kernel, "TILE_SECONDS", 0.0)  # every tile too slow: one pair each
    model = make("residual")
    x = inputs(5, seed=3)
    items = list(iter_kernel_norms(model, x))
    N, pairs = len(x), len(x) * (len(x) + 1) // 2
    assert items[:-1] == [(k, pairs) for k in range(pairs + 1)]
    J = [explicit_jacobian(model, xi) for xi in x]
    expected = np.array([[float(torch.linalg.norm(a @ b.T)) for b in J] for a in J])
    np.testing.assert_allclose(items[-1].numpy(), expected, rtol=1e-10)
    assert items[-1].shape == (N, N)


@pytest.mark.parametrize("name", ["lenet", "residual"])
def test_class_kernel_map_keeps_the_numbers_of_the_blockwise_kernel(name):
    """The map from one sweep per example equals the map reduced from the full (N, N, V, V)
    kernel (how it was computed before), class pair by class pair."""
    model = make(name)
    x, labels = inputs(10, seed=4), np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 3])
    norms = empirical_ntk(model, x, x).flatten(2).norm(dim=2).numpy()
    for chunk in (None, 3):
        M = class_kernel_map(model, x, labels, 5, chunk=chunk)
        np.testing.assert_allclose(M, reduce_to_classes(norms, labels, 5), rtol=1e-10)
    assert M.shape == (5, 5) and not M.flags.writeable and M.dtype == np.float64


def test_kernel_map_sweeps_each_example_once():
    """200 images cost about 200 example sweeps, not a sweep of all N per chunk of rows."""
    model = make("lenet")
    seen, forward = [], model.conv1._conv_forward  # not a hook: hooks send models generic

    def counted(x, weight, bias):
        seen.append(len(x))
        return forward(x, weight, bias)

    model.conv1._conv_forward = counted
    x, labels = inputs(16, seed=5), np.arange(16) % 4
    gen = iter_class_kernel_map(model, x, labels, chunk=4)
    first, second = next(gen), next(gen)  # (0, total) before any work, then progress
    assert first[0] == 0 and second[1] == first[1] > second[0] > 0
    M = [item for item in gen][-1]
    assert len(x) <= sum(seen) <= len(x) + 2, seen  # one sweep each, plus a probe of one
    np.testing.assert_allclose(M, class_kernel_map(model, x, labels), rtol=1e-12)


def test_kernel_map_can_be_cancelled_and_refuses_bad_labels():
    model = make("mlp")
    x = inputs(6)
    gen = iter_class_kernel_map(model, x, [0, 1, 0, 1, 0, 1], chunk=2)
    assert isinstance(next(gen), tuple)
    gen.close()
    with pytest.raises(ValueError, match="labels must be 6 non-negative ints"):
        class_kernel_map(model, x, [0, 1, 0])
    with pytest.raises(ValueError, match=r"classes in \[0, 2\)"):
        class_kernel_map(model, x, [0, 1, 0, 1, 0, 5], num_classes=2)


def test_rank_correlation_of_class_pair_rankings():
    a = np.array([[0, 1, 2], [1, 0, 3], [2, 3, 0]], float)
    assert rank_correlation(a, a * 10 + 1) == pytest.approx(1.0)
    b = np.array([[0, 3, 2], [3, 0, 1], [2, 1, 0]], float)
    assert rank_correlation(a, b) == pytest.approx(-1.0)
    c = np.array([[0, 1, 3], [1, 0, 2], [3, 2, 0]], float)  # ranks (1,2,3) vs (1,3,2): ρ = 0.5
    assert rank_correlation(a, c) == pytest.approx(0.5)


def test_spectrum_is_that_of_the_explicit_gram_matrix():
    model = make("lenet")
    x = inputs(4)
    J = torch.cat([explicit_jacobian(model, xi) for xi in x])  # (N·V, P)
    expected = torch.linalg.eigvalsh(J @ J.T).flip(0).numpy()
    eig = ntk_spectrum(model, x)
    np.testing.assert_allclose(eig, expected, rtol=1e-8, atol=1e-8)
    assert eig[-1] > -1e-8 and np.all(np.diff(eig) <= 1e-12)


@pytest.mark.parametrize(("name", "chunk"), [("lenet", 3), ("lenet", None), ("residual", None)])
def test_the_kernel_gram_comes_in_steps_and_equals_explicit_jacobians(monkeypatch, name, chunk):
    """iter_kernel_gram: K(x[a], x[b]) = J_a·J_bᵀ for every pair, on the structured path (in
    chunks of rows) and on the generic path (in tiles), with progress before and between."""
    monkeypatch.setattr(kernel, "TILE_SECONDS", 0.0)  # generic: one pair a tile
    model = make(name)
    x = inputs(5, seed=3)
    J = [explicit_jacobian(model, xi) for xi in x]
    items = list(iter_kernel_gram(model, x, chunk_size=chunk))
    K = items[-1]
    assert K.shape == (5, 5, 10, 10)
    expected = torch.stack([torch.stack([a @ b.T for b in J]) for a in J])
    np.testing.assert_allclose(K.double().numpy(), expected.numpy(), rtol=1e-5, atol=1e-7)
    progress = items[:-1]
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1] and len(progress) >= 3
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    eig = gram_spectrum(K)
    np.testing.assert_allclose(eig, ntk_spectrum(model, x), rtol=1e-4, atol=1e-6)


def test_squeeze_steps_follow_real_steps_and_check_the_guarantees():
    model = make("mlp")
    model.train()
    snap = snapshot(model)
    x = inputs(1, seed=2)[0]
    d = decompose(model, x, x, 4, 0.01, "neg")
    run = squeeze_steps(model, x, 4, 0.01, steps=5, loss="neg")  # small η: first order rules
    assert run.probs.shape == (6, 10)
    np.testing.assert_allclose(run.probs[0], d.probs_before, atol=1e-12)
    np.testing.assert_allclose(run.probs[1], d.probs_after, atol=1e-12)
    np.testing.assert_allclose(run.probs.sum(1), 1, atol=1e-12)
    assert run.label_fell.all() and run.label_fell.dtype == bool
    assert run.top_rose.all()
    assert_unchanged(model, snap)
    positive = squeeze_steps(model, x, 4, 0.05, steps=2, loss="ce")
    assert (np.diff(positive.probs[:, 4]) > 0).all()


def test_squeeze_survey_measures_the_mass_gained_by_the_top_other_class():
    model = make("mlp")
    x = inputs(4, seed=9)
    y = [0, 3, 3, 7]
    survey = squeeze_survey(model, x, y, 0.02)
    for n in range(4):
        run = squeeze_steps(model, x[n], y[n], 0.02, 1, "neg")
        before, after = run.probs
        top = max((c for c in range(10) if c != y[n]), key=lambda c: before[c])
        assert survey.gained[n] == pytest.approx(after[top] - before[top], abs=1e-14)
        assert survey.peak[n] == pytest.approx(before.max())
        assert survey.p_label[n] == pytest.approx(before[y[n]])
        assert survey.label_fell[n] == (after[y[n]] < before[y[n]])
    with pytest.raises(ValueError, match="one label per example"):
        squeeze_survey(model, x, y[:2], 0.02)


def test_gram_spectrum_refuses_what_is_not_the_kernel_of_one_batch_with_itself():
    model = make("lenet")
    x, z = inputs(3, seed=1), inputs(3, seed=2)
    K = empirical_ntk(model, x, x)
    np.testing.assert_allclose(gram_spectrum(K.numpy()), gram_spectrum(K), rtol=1e-12)
    cases = [
        (empirical_ntk(model, x, z), "not symmetric"),  # two batches: no spectrum
        (empirical_ntk(model, x, x[:2]), "shape (3, 2, 10, 10)"),
        (K[0, 0], "shape (10, 10)"),
        (torch.full_like(K, float("nan")), "non-finite"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            gram_spectrum(bad)


def test_the_gram_of_the_generic_path_has_symmetric_diagonal_blocks(monkeypatch):
    monkeypatch.setattr(kernel, "TILE_SECONDS", 0.0)
    K = list(iter_kernel_gram(make("residual"), inputs(3, seed=3)))[-1]
    assert torch.equal(K, K.permute(1, 0, 3, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ntk_spectrum_of_a_half_precision_model_on_the_generic_path(dtype):
    # empirical_ntk(x, x) of the generic path is symmetric to the model's rounding only: the
    # ViT's in bfloat16 to 2e-3 of its largest entry, and gram_spectrum refused it
    from ntkviz.models import build_model

    model = build_model("vit", 10, in_channels=3, image_size=16)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eig = ntk_spectrum(model.to(dtype), x.to(dtype))
    exact = ntk_spectrum(model.float(), x)
    assert eig.shape == exact.shape and abs(eig[0] - exact[0]) < 0.05 * exact[0]
