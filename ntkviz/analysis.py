"""Beyond one pair: summaries over probe sets (the paper's Figure 1 as numbers).

* :func:`class_influence` — one update's mean effect per true class of x_o ``(C, V)``.
* :func:`class_kernel_map` — mean ‖K(x, x')‖_F between examples of class i and class j ``(C, C)``
  (:func:`iter_class_kernel_map`: the same, step by step with progress).
* :func:`rank_correlation` — Spearman correlation of the class-pair ranking of two such maps.
* :func:`ntk_spectrum` — eigenvalues of the (N·V)×(N·V) Gram matrix of a probe set.
* :func:`squeeze_steps` — several plain-SGD steps in a row on one example, π after each.

Everything is Qt-free and returns read-only numpy arrays; models are never modified.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ntkviz.arrays import frozen, readonly
from ntkviz.decomposition import Influence, step_trajectory
from ntkviz.kernel import empirical_ntk, iter_kernel_norms


def balanced_indices(labels: Tensor, per_class: int, seed: int = 0) -> np.ndarray:
    """``per_class`` seeded random indices of each class (fewer if a class has fewer), grouped by
    class in ascending order: ``(≤ C·per_class,)`` int64."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]].sort().values)
    return torch.cat(out).numpy()


def class_influence(
    inf: Influence, labels, num_classes: int | None = None
) -> dict[str, np.ndarray]:
    """Mean effect per true class of x_o (rows) and output class (columns), ``(C, V)`` each:

    ``delta_log_probs`` — mean predicted Δlog π; ``delta_probs`` — mean first-order Δπ = π ⊙ Δlog π;
    ``delta_probs_actual`` — mean real Δπ (only when ``inf.actual`` is set); ``kernel_norm`` —
    ``(C,)`` mean ‖K‖_F (when computed); ``count`` ``(C,)``.
    """
    labels = np.asarray(labels)
    if labels.shape != (len(inf.predicted),):
        raise ValueError(f"labels must have shape ({len(inf.predicted)},), got {labels.shape}")
    C = num_classes or int(labels.max()) + 1
    probs = inf.probs_before
    per_example = {
        "delta_log_probs": inf.predicted,
        "delta_probs": probs * inf.predicted,
    }
    if inf.actual is not None:
        per_example["delta_probs_actual"] = probs * np.expm1(inf.actual)
    if inf.kernel_norm is not None:
        per_example["kernel_norm"] = inf.kernel_norm
    count = np.bincount(labels, minlength=C)
    out = {}
    for name, values in per_example.items():
        sums = np.zeros((C, *values.shape[1:]))
        np.add.at(sums, labels, values)
        out[name] = frozen(sums / np.maximum(count, 1).reshape(-1, *([1] * (values.ndim - 1))))
    out["count"] = readonly(count)
    return out


def iter_class_kernel_map(
    model: nn.Module, x: Tensor, labels, num_classes: int | None = None, chunk: int | None = None
) -> Iterator[tuple[int, int] | np.ndarray]:
    """Generator form of :func:`class_kernel_map`: yields ``(done, total)`` as the pairs' kernel
    norms are computed (:func:`~ntkviz.kernel.iter_kernel_norms`, one structured sweep per
    example, ``chunk`` rows at a time), then the read-only float64 ``(C, C)`` map. Stop iterating
    to cancel."""
    labels = np.asarray(labels)
    if labels.shape != (len(x),) or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise ValueError(f"labels must be {len(x)} non-negative ints, one per example of x")
    C = num_classes or int(labels.max()) + 1
    if labels.max() >= C:
        raise ValueError(f"labels must be classes in [0, {C}), got {int(labels.max())}")
    norms = None
    for item in iter_kernel_norms(model, x, chunk_size=chunk):
        if isinstance(item, tuple):
            yield item
        else:
            norms = item.double().cpu().numpy()
    onehot = np.eye(C)[labels]
    off_diagonal = 1 - np.eye(len(x))
    sums = onehot.T @ (norms * off_diagonal) @ onehot
    counts = onehot.T @ off_diagonal @ onehot
    yield frozen(sums / np.maximum(counts, 1))


def class_kernel_map(
    model: nn.Module, x: Tensor, labels, num_classes: int | None = None, chunk: int | None = None
) -> np.ndarray:
    """Mean ‖K(x_a, x_b)‖_F over pairs with label i and j, ``(C, C)``, symmetric. Pairs of an
    example with itself are left out of the diagonal. ``x (N, ...)``: a probe set, typically
    :func:`balanced_indices` of a split (e.g. 50 per class); ``chunk``: rows of the pair matrix
    per step (default from the kernel's memory budget)."""
    for item in iter_class_kernel_map(model, x, labels, num_classes, chunk):
        if isinstance(item, np.ndarray):
            return item
    raise AssertionError("unreachable")


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of the class pairs i < j ranked by two ``(C, C)`` maps (ties get
    average ranks). 1: the same ordering of class pairs."""
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"need two square maps of one shape, got {a.shape} and {b.shape}")
    iu = np.triu_indices(a.shape[0], k=1)

    def ranks(v):
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):  # average ranks of ties
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a[iu]), ranks(b[iu])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0


def ntk_spectrum(model: nn.Module, x: Tensor) -> np.ndarray:
    """Eigenvalues, descending, of the (N·V)×(N·V) Gram matrix [K(x_a, x_b)] of ``x (N, ...)``."""
    return gram_spectrum(empirical_ntk(model, x, x))


def gram_spectrum(K) -> np.ndarray:
    """Eigenvalues, descending (float64; the kernel's units, logit² per unit parameter step),
    of the (N·V)×(N·V) Gram matrix of the kernel blocks ``K (N, N, V, V)`` of one batch with
    itself (a tensor or an array, e.g. from :func:`~ntkviz.kernel.iter_kernel_gram`). ValueError
    for another shape, non-finite entries, or blocks that are not K[b, a] = K[a, b]ᵀ (a kernel
    between two batches has no spectrum)."""
    K = torch.as_tensor(K)
    # a kernel of one batch is symmetric up to rounding in its own precision
    tolerance = max(1e-4, 50 * torch.finfo(K.dtype).eps) if K.is_floating_point() else 1e-4
    K = K.double()
    if K.ndim != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3]:
        raise ValueError(
            f"K must be the kernel blocks (N, N, V, V) of one batch, got shape {tuple(K.shape)}"
        )
    if not bool(torch.isfinite(K).all()):
        raise ValueError("K has non-finite entries")
    N, _, V, _ = K.shape
    gram = K.permute(0, 2, 1, 3).reshape(N * V, N * V)
    if gram.numel() and float((gram - gram.T).abs().max()) > tolerance * float(gram.abs().max()):
        raise ValueError(
            "K is not symmetric (K[b, a] ≠ K[a, b]ᵀ): give the kernel of one batch with itself, "
            "K(x, x)"
        )
    return frozen(torch.linalg.eigvalsh((gram + gram.T) / 2).flip(0))


@dataclass(frozen=True)
class SqueezeRun:
    """π of x after each of several plain-SGD steps on it: ``probs (steps+1, V)`` (row 0 before),
    and whether the guaranteed moves of a negative gradient held at each step
    (``label_fell (steps,)``: π(y) fell; ``top_rose (steps,)``: the most likely other class rose)."""

    probs: np.ndarray
    label_fell: np.ndarray
    top_rose: np.ndarray
    lr: float
    loss: str
    y: int


def squeeze_steps(
    model: nn.Module, x: Tensor, y: int, lr: float, steps: int = 1, loss: str = "neg"
) -> SqueezeRun:
    """Take ``steps`` plain-SGD steps on ``(x, y)`` (functional copies; the model is untouched) and
    record π(x) after each. ``loss`` "neg" is the paper's negative gradient, "ce" the positive."""
    p = step_trajectory(model, x, x, y, lr, steps, loss).probs_u
    y = int(y)
    fell = p[1:, y] < p[:-1, y]
    masked = p[:-1].copy()
    masked[:, y] = -np.inf
    top = masked.argmax(1)
    rose = p[1:][np.arange(steps), top] > p[:-1][np.arange(steps), top]
    return SqueezeRun(frozen(p), readonly(fell), readonly(rose), float(lr), loss, y)


@dataclass(frozen=True)
class SqueezeSurvey:
    """One negative-gradient step on each of N examples, on label ``y[n]``: per example
    ``peak (N,)`` = max π before, ``p_label (N,)`` = π(y) before, ``gained (N,)`` = the π gained
    by the most likely other class (the squeezed mass), ``label_fell (N,)``."""

    peak: np.ndarray
    p_label: np.ndarray
    gained: np.ndarray
    label_fell: np.ndarray
    lr: float


def squeeze_survey(model: nn.Module, x: Tensor, y, lr: float) -> SqueezeSurvey:
    """How much mass one negative-gradient step of size ``lr`` squeezes into the most likely
    other class, for each ``(x[n], y[n])``, ``x (N, ...)`` — to plot against how peaked π is and
    against π(y). Functional steps; the model is untouched."""
    y = [int(v) for v in np.asarray(y).reshape(-1)]
    if len(y) != len(x):
        raise ValueError(f"need one label per example: {len(x)} examples, {len(y)} labels")
    runs = [squeeze_steps(model, x[n], y[n], lr, 1, "neg") for n in range(len(x))]
    before = np.stack([r.probs[0] for r in runs])
    after = np.stack([r.probs[1] for r in runs])
    masked = before.copy()
    masked[np.arange(len(y)), y] = -np.inf
    top = masked.argmax(1)
    rows = np.arange(len(y))
    return SqueezeSurvey(
        peak=frozen(before.max(1)),
        p_label=frozen(before[rows, y]),
        gained=frozen(after[rows, top] - before[rows, top]),
        label_fell=readonly(after[rows, y] < before[rows, y]),
        lr=float(lr),
    )
