"""One SGD step on (x_u, y_u), seen from x_o: Δlog π(x_o) = −η·A(x_o)·K(x_o, x_u)·G(x_u, y_u) + O(η²).

``decompose`` returns the factors, the first-order prediction and the actual change after a real
plain-SGD step (no momentum, no weight decay), so the O(η²) remainder is always visible.
``influence`` does the same for many x_o against one update, in chunks.

All quantities are computed in eval mode and returned as read-only numpy arrays (float64 copies).
Units: logits and log-probabilities in nats; η in parameter units per unit gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ntkviz.arrays import frozen, norm
from ntkviz.checks import class_index, positive_int, real_number
from ntkviz.errors import NonFiniteLogits, StepDiverged
from ntkviz.kernel import (
    _as_batch,
    empirical_ntk,
    eval_mode,
    functional_forward,
    ntk_vector_product,
    pair_kernel_and_gradient,
    trainable_parameters,
)

LOSSES = {
    "ce": "learn y_u: cross-entropy descent, G = π(x_u) − e_y",
    "neg": "negative gradient on y_u: cross-entropy ascent, G = e_y − π(x_u)",
}


def softmax_jacobian_of_log(probs: Tensor) -> Tensor:
    """A = I − 1·πᵀ ``(V, V)``: the Jacobian of log-softmax with respect to the logits."""
    V = probs.shape[-1]
    return torch.eye(V, dtype=probs.dtype, device=probs.device) - probs.unsqueeze(-2)


def loss_gradient(probs: Tensor, y: int, loss: str) -> Tensor:
    """G = ∂L/∂z ``(V,)``: π − e_y for "ce", its opposite for "neg"."""
    if not 0 <= y < probs.shape[-1]:
        raise ValueError(f"y_u must be an int class in [0, {probs.shape[-1]}), got {y}")
    g = probs.clone()
    g[..., y] -= 1
    return g if loss == "ce" else -g


def _validate(model: nn.Module, x_o, x_u, y_u, lr, loss) -> tuple[Tensor, Tensor, int, float]:
    """Check the arguments that need no forward pass; the shapes are checked by :func:`_forward`.
    Returns ``x_o``, ``x_u`` as tensors, ``y_u`` as an int and ``lr`` as a float."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)} (got {loss!r})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters: there is no step to decompose")
    lr = real_number(lr, "lr")
    x_o = torch.as_tensor(x_o)
    x_u = torch.as_tensor(x_u)
    for name, x in (("x_o", x_o), ("x_u", x_u)):
        if not x.is_floating_point():
            raise ValueError(
                f"{name} must hold floating-point inputs such as a normalised image "
                f"(ImageDataset.normalize), got {x.dtype}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds NaN or infinite values")
    if x_o.shape != x_u.shape:
        raise ValueError(
            f"x_o and x_u must be single examples of the same shape, got {tuple(x_o.shape)} "
            f"and {tuple(x_u.shape)}"
        )
    return x_o, x_u, class_index(y_u, "y_u"), lr


def _forward(model: nn.Module, x: Tensor, y_u: int, what: str = "x_u") -> Tensor:
    """Logits ``(N, V)`` of a batch made of single examples; a clear ``ValueError`` when the
    model cannot take them or ``y_u`` is not one of its classes."""
    try:
        z = model(x)
    except RuntimeError as e:
        raise ValueError(
            f"the model cannot take {what} of shape {tuple(x.shape[1:])} as one example (expected "
            f"a dataset item such as (1, 28, 28), not a batch): {e}"
        ) from None
    if not isinstance(z, Tensor) or z.ndim != 2 or z.shape[0] != len(x):
        got = f"shape {tuple(z.shape)}" if isinstance(z, Tensor) else f"a {type(z).__name__}"
        raise ValueError(f"the model must return logits (N, V); got {got}")
    if not z.is_floating_point():
        raise ValueError(f"the model's logits must be floating point, got {z.dtype}")
    if torch.is_grad_enabled() and not z.requires_grad:
        raise ValueError(
            "the model's logits do not depend on trainable parameters (none with requires_grad, "
            "or the logits are detached): there is no gradient step to decompose"
        )
    if not y_u < z.shape[1]:
        raise ValueError(f"y_u must be an int class in [0, {z.shape[1]}), got {y_u}")
    return z


def _loss_grad(model, params, x_u: Tensor, y_u: int, loss: str) -> dict[str, Tensor]:
    """∇θL(x_u, y_u) for the trainable parameters ``params`` (a dict like ``params``)."""
    buffers_and_frozen = {n: p for n, p in model.named_parameters() if n not in params}

    def objective(p):
        z = functional_forward(model, {**buffers_and_frozen, **p}, x_u)
        ce = F.cross_entropy(z, torch.tensor([y_u], device=z.device))
        return ce if loss == "ce" else -ce

    return torch.func.grad(objective)(params)


def _fast_pair(model: nn.Module, both: Tensor, y_u: int, loss: str):
    """Logits, K and ∇θL from one structured sweep, or None for the generic path."""
    try:
        return pair_kernel_and_gradient(
            model, both[:1], both[1:], lambda z_u: loss_gradient(z_u.softmax(-1), y_u, loss)
        )
    except (RuntimeError, IndexError) as e:  # a shape the model cannot take, or y_u too large
        _forward(model, both, y_u)  # raises the clear ValueError
        raise AssertionError("unreachable") from e


def _before_and_after(model, named, trainable, grads, lr, both, z) -> tuple[Tensor, Tensor]:
    """The logits of ``both`` before and after the step θ → θ − lr·grads: in float64 for a model
    of lower precision (its float32 rounding, ~1e-7·|z|, would otherwise swamp the O(η²)
    remainder below η ≈ 1e-3), where the model computes in float64; else in its own dtype (``z``
    as given before the step)."""

    def in_own_dtype() -> tuple[Tensor, Tensor]:
        new = {n: p.detach() for n, p in named.items()}
        for n in trainable:
            new[n] = new[n] - lr * grads[n]
        return z, functional_forward(model, new, both)

    if all(p.dtype == torch.float64 for p in named.values()):
        return in_own_dtype()
    before = {n: p.detach().double() for n, p in named.items()}
    before.update(
        {n: b.double() for n, b in model.named_buffers() if b is not None and b.is_floating_point()}
    )
    after = dict(before)
    for n in trainable:
        after[n] = before[n] - lr * grads[n].double()
        # a finite step to beyond the parameters' dtype's range: no model of this kind holds it
        moved = torch.isfinite(named[n]) & torch.isfinite(grads[n])
        if bool((moved & ~torch.isfinite(after[n].to(named[n].dtype))).any()):
            raise StepDiverged(lr, f"the model's parameters ({named[n].dtype})")
    x = both.double()
    try:
        return functional_forward(model, before, x), functional_forward(model, after, x)
    except RuntimeError:  # the model computes in its own dtype only (e.g. a float32 constant)
        return in_own_dtype()


@dataclass(frozen=True)
class Decomposition:
    """The factors of one update's effect on x_o. Arrays are read-only float64.

    ``A (V, V)``, ``K (V, V)``, ``G (V,)``; ``predicted (V,)`` = −η·A·K·G, ``actual (V,)`` the
    real Δlog π(x_o), ``residual`` = actual − predicted (the O(η²) remainder);
    ``delta_logits_predicted`` = −η·K·G and ``delta_logits_actual`` at the level of logits;
    π and logits of x_o before and after; π of x_u before and after.
    """

    A: np.ndarray
    K: np.ndarray
    G: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    residual: np.ndarray
    delta_logits_predicted: np.ndarray
    delta_logits_actual: np.ndarray
    probs_before: np.ndarray
    probs_after: np.ndarray
    logits_before: np.ndarray
    logits_after: np.ndarray
    probs_u_before: np.ndarray
    probs_u_after: np.ndarray
    lr: float
    loss: str
    y_u: int
    meta: dict = field(default_factory=dict, compare=False)

    #: How the numbers relate (exports state it).
    FORMULA = "predicted = -lr * A @ K @ G ; residual = actual - predicted"
    #: Scalars beside ``lr``, ``loss`` and ``y_u`` that exports carry.
    SCALARS: ClassVar[tuple[str, ...]] = ()

    @property
    def relative_residual(self) -> float:
        """‖residual‖ / ‖actual‖ (0 when nothing moved)."""
        denom = norm(self.actual)
        return norm(self.residual) / denom if denom > 0 else 0.0

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array field by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.type == "np.ndarray"}


def decompose(
    model: nn.Module,
    x_o: Tensor,
    x_u: Tensor,
    y_u: int,
    lr: float,
    loss: str = "ce",
) -> Decomposition:
    """Decompose one plain-SGD step on ``(x_u, y_u)`` at learning rate ``lr`` as seen from ``x_o``.

    ``x_o``, ``x_u``: single examples shaped like a dataset item, e.g. ``(1, 28, 28)``;
    ``y_u``: a class in ``[0, V)``; ``loss``: "ce" or "neg". The model is not changed (the step is
    taken on a functional copy of its parameters, in float64 for a float32 model so that its
    rounding does not swamp the O(η²) residual; K and G in the model's precision). Raises
    ``ValueError`` on bad arguments, :class:`~ntkviz.errors.StepDiverged` when the step makes the
    logits, or the predicted or actual change, non-finite in the model's precision: no result
    holds NaN or infinity.
    """
    x_o, x_u, y_u, lr = _validate(model, x_o, x_u, y_u, lr, loss)
    both = _as_batch(model, torch.stack([x_o, x_u]), "x_o, x_u")
    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    with eval_mode(model):
        fast = _fast_pair(model, both, y_u, loss)
        if fast is not None:
            _, K, grads = fast
            with torch.no_grad():
                # The logits as the model computes them, like z_new below (the sweep may run in
                # another memory layout and round differently).
                z = model(both)
        else:
            with torch.enable_grad():
                z = _forward(model, both, y_u)
                ce = F.cross_entropy(z[1:], torch.tensor([y_u], device=z.device))
                grads = torch.autograd.grad(
                    ce if loss == "ce" else -ce, [named[n] for n in trainable], allow_unused=True
                )
            # A parameter the forward pass does not use has a zero gradient.
            grads = {
                n: torch.zeros_like(named[n]) if g is None else g for n, g in zip(trainable, grads)
            }
            z = z.detach()
            K = empirical_ntk(model, both[:1], both[1:])[0, 0]
        with torch.no_grad():
            z, z_new = _before_and_after(model, named, trainable, grads, lr, both, z)
    K = K.to(z.dtype)
    dtype = named[trainable[0]].dtype  # finite means finite in the model's own precision

    def finite(t: Tensor) -> bool:
        return bool(torch.isfinite(t.to(dtype)).all())

    if not finite(z):
        raise NonFiniteLogits([w for w, row in zip(("x_o", "x_u"), z) if not finite(row)])
    if not finite(z_new):
        raise StepDiverged(lr)
    logp, logp_new = F.log_softmax(z, -1), F.log_softmax(z_new, -1)
    probs_o = logp[0].exp()
    A = softmax_jacobian_of_log(probs_o)
    G = loss_gradient(logp[1].exp(), y_u, loss)
    dz_pred = -lr * (K @ G)
    predicted = A @ dz_pred
    actual = logp_new[0] - logp[0]
    if not all(finite(t) for t in (dz_pred, predicted, actual, K)):
        raise StepDiverged(lr, "the predicted or actual change of x_o")
    return Decomposition(
        A=frozen(A),
        K=frozen(K),
        G=frozen(G),
        predicted=frozen(predicted),
        actual=frozen(actual),
        residual=frozen(actual - predicted),
        delta_logits_predicted=frozen(dz_pred),
        delta_logits_actual=frozen(z_new[0] - z[0]),
        probs_before=frozen(probs_o),
        probs_after=frozen(logp_new[0].exp()),
        logits_before=frozen(z[0]),
        logits_after=frozen(z_new[0]),
        probs_u_before=frozen(logp[1].exp()),
        probs_u_after=frozen(logp_new[1].exp()),
        lr=float(lr),
        loss=loss,
        y_u=y_u,
    )


@dataclass(frozen=True)
class StepTrajectory:
    """π of x_o and of x_u before and after each of several plain-SGD steps on (x_u, y_u):
    ``probs_o``, ``probs_u`` ``(steps + 1, V)``, row 0 before the first step."""

    probs_o: np.ndarray
    probs_u: np.ndarray
    lr: float
    loss: str
    y_u: int


def step_trajectory(
    model: nn.Module, x_o: Tensor, x_u: Tensor, y_u: int, lr: float, steps: int, loss: str = "ce"
) -> StepTrajectory:
    """Take ``steps`` plain-SGD steps on ``(x_u, y_u)`` (on functional copies of the parameters:
    the model is untouched) and record π(x_o) and π(x_u) after each. Raises ``ValueError`` on
    bad arguments and :class:`~ntkviz.errors.StepDiverged` when the logits become non-finite."""
    x_o, x_u, y_u, lr = _validate(model, x_o, x_u, y_u, lr, loss)
    steps = positive_int(steps, "steps")
    both = _as_batch(model, torch.stack([x_o, x_u]), "x_o, x_u")
    params = trainable_parameters(model)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    probs = []
    with eval_mode(model):
        with torch.no_grad():
            probs.append(F.softmax(_forward(model, both, y_u), -1))
        for _ in range(steps):
            grad = _loss_grad(model, params, both[1:], y_u, loss)
            params = {n: params[n] - lr * grad[n] for n in params}
            with torch.no_grad():
                z = functional_forward(model, {**others, **params}, both)
            if not torch.isfinite(z).all():
                raise StepDiverged(lr)
            probs.append(F.softmax(z, -1))
    p = torch.stack(probs).double().cpu().numpy()  # (steps + 1, 2, V)
    return StepTrajectory(frozen(p[:, 0]), frozen(p[:, 1]), float(lr), loss, y_u)


@dataclass(frozen=True)
class Influence:
    """One update's effect on many x_o. Arrays are read-only float64, ``(N, V)`` unless noted.

    ``predicted`` Δlog π = −η·A·K·G per x_o; ``delta_logits_predicted`` = −η·K·G;
    ``probs_before``; ``actual`` (after a real step) and ``kernel_norm`` ``(N,)`` = ‖K(x_o, x_u)‖_F
    when asked for, else None.
    """

    predicted: np.ndarray
    delta_logits_predicted: np.ndarray
    probs_before: np.ndarray
    actual: np.ndarray | None
    kernel_norm: np.ndarray | None
    lr: float
    loss: str
    y_u: int


def iter_influence(
    model: nn.Module,
    x_o: Tensor,
    x_u: Tensor,
    y_u: int,
    lr: float,
    loss: str = "ce",
    *,
    actual: bool = False,
    kernel_norm: bool = False,
    chunk_size: int = 1000,
) -> Iterator[tuple[int, int] | Influence]:
    """Generator form of :func:`influence`: yields ``(done, total)`` after each chunk of x_o, then
    the :class:`Influence`. Stop iterating to cancel."""
    x_o = torch.as_tensor(x_o)
    if x_o.ndim < 2 or len(x_o) == 0:
        raise ValueError(f"x_o must be a non-empty batch (N, ...), got shape {tuple(x_o.shape)}")
    chunk_size = positive_int(chunk_size, "chunk_size")
    _, x_u, y_u, lr = _validate(model, x_o[0], x_u, y_u, lr, loss)
    xu = _as_batch(model, x_u[None], "x_u")
    with torch.no_grad(), eval_mode(model):
        _forward(model, xu, y_u)
    params = trainable_parameters(model)
    chunks = _as_batch(model, x_o, "x_o").split(chunk_size)
    parts: dict[str, list[Tensor]] = {"pred": [], "dz": [], "probs": [], "actual": [], "norm": []}
    all_params = dict(model.named_parameters())
    with eval_mode(model):
        with torch.no_grad():
            z_u = model(xu)
            if not bool(torch.isfinite(z_u).all()):
                raise NonFiniteLogits(["x_u"])
            G = loss_gradient(F.softmax(z_u, -1)[0], y_u, loss)
        if actual:
            grad = _loss_grad(model, params, xu, y_u, loss)
            new = {**all_params, **{n: params[n] - lr * grad[n] for n in params}}
        done = 0
        for xc in chunks:
            # Δz = −η·K(x_o, x_u)·G, as one NTK-vector product per chunk.
            dz = -lr * ntk_vector_product(model, xc, xu, G[None])
            with torch.no_grad():
                z = model(xc)
                probs = F.softmax(z, -1)
                parts["dz"].append(dz)
                parts["probs"].append(probs)
                parts["pred"].append(dz - (probs * dz).sum(-1, keepdim=True))
                if actual:
                    z_new = functional_forward(model, new, xc)
                    parts["actual"].append(F.log_softmax(z_new, -1) - F.log_softmax(z, -1))
            if kernel_norm:
                parts["norm"].append(empirical_ntk(model, xc, xu)[:, 0].flatten(1).norm(dim=1))
            done += len(xc)
            yield done, len(x_o)
    probs = torch.cat(parts["probs"])
    bad = (~torch.isfinite(probs).all(1)).nonzero()[:, 0].tolist()
    if bad:
        raise NonFiniteLogits([f"x_o[{i}]" for i in bad])
    if not all(bool(torch.isfinite(t).all()) for part in parts.values() for t in part):
        raise StepDiverged(lr, "the change of some x_o")
    yield Influence(
        predicted=frozen(torch.cat(parts["pred"])),
        delta_logits_predicted=frozen(torch.cat(parts["dz"])),
        probs_before=frozen(probs),
        actual=frozen(torch.cat(parts["actual"])) if actual else None,
        kernel_norm=frozen(torch.cat(parts["norm"])) if kernel_norm else None,
        lr=float(lr),
        loss=loss,
        y_u=y_u,
    )


def influence(
    model: nn.Module,
    x_o: Tensor,
    x_u: Tensor,
    y_u: int,
    lr: float,
    loss: str = "ce",
    *,
    actual: bool = False,
    kernel_norm: bool = False,
    chunk_size: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> Influence:
    """The predicted Δlog π ``(N, V)`` for every x_o in ``x_o (N, ...)`` after one plain-SGD step
    on ``(x_u, y_u)``, computed as the NTK-vector product −η·J(x_o)·∇θL in chunks of x_o (memory
    bounded by ``chunk_size``). ``actual``: also take the real step and measure; ``kernel_norm``:
    also ‖K(x_o, x_u)‖_F. ``progress(done, total)`` is called after each chunk."""
    for item in iter_influence(
        model,
        x_o,
        x_u,
        y_u,
        lr,
        loss,
        actual=actual,
        kernel_norm=kernel_norm,
        chunk_size=chunk_size,
    ):
        if isinstance(item, Influence):
            return item
        if progress is not None:
            progress(*item)
    raise AssertionError("unreachable")
