"""An exact account of one real optimizer step, as seen from watched examples x_o.

A step θ → θ + Δθ moves the logits of x_o by Δz = J(x_o)·Δθ to first order, and log π(x_o) by
A(x_o)·Δz, A = I − 1·πᵀ. :func:`account_step` splits Δθ exactly as the optimizer builds it:

* **SGD** (momentum μ, dampening τ, weight decay λ, Nesterov, maximize: g → −g):
  Δθ = −η·(k·(g + λθ) + m·b) with b the momentum buffer before the step, k = 1 − τ and m = μ
  (Nesterov: k = 1 + μ(1 − τ), m = μ²); on the first step (no buffer yet) k = 1 (Nesterov 1 + μ),
  m = 0; without momentum k = 1, m = 0.
* **Adam** (β₁, β₂, ε, L2 weight decay λ, amsgrad, maximize), step t:
  Δθ = −(η/(1 − β₁ᵗ))·P·(β₁·m + (1 − β₁)·(g + λθ)) with the diagonal preconditioner of *this* step
  P = 1/(√v̂ + ε), v̂ = (β₂·v + (1 − β₂)·(g + λθ)²)/(1 − β₂ᵗ) (amsgrad: the running maximum), exactly
  as torch computes it. The L2 decay λθ enters the gradient: its share of the first moment is the
  weight-decay term; P is computed from the decayed gradient, as torch does.
* **AdamW** (decoupled decay): as Adam without λθ in the gradient, plus −η·λ·θ.

Terms of Δz(x_o) (and of Δlog π(x_o) after A): one **gradient** term per batch example b,
−J(x_o)·Q·∇θℓ_b/B = −(s/B)·K_P(x_o, x_b)·G_b with Q = s·P the step's diagonal map on the gradient
(s = η·k for SGD, η(1 − β₁)/(1 − β₁ᵗ) for Adam; negative when the optimizer maximizes), the
optimizer-aware kernel K_P = J(x_o)·P·J(x_b)ᵀ (P = I for SGD, so K_P = K) and G_b = π(x_b) − e_{y_b};
the **momentum** (history) term; the **weight-decay** term; the **residual** = actual − their sum,
second order in Δθ.

Per-example gradients come from the trainer's own backward pass in training mode (per trainable
layer its inputs and output gradients; nothing of size B × parameters is formed for Linear
layers). Kernels and Δlog π are taken in eval mode. For models whose modules behave differently in
the two modes (dropout, batch norm) the batch's Jacobians are taken in eval mode by a second pass,
with G from the training-mode loss, so each gradient term is exactly −(s/B)·A·K_P·G_b and the
difference between that and the real step lands in the residual. (With Adam this difference can be
large: a bias that batch norm cancels in training mode gets no gradient, hence P ≈ 1/ε, while its
eval-mode per-example gradients are not zero.)

The trainer's watch (:class:`Watch`, :class:`WatchAccount`) needs of most watched examples only
the class c it follows: [A(x_o)·Δz]_c = ⟨J(x_o)ᵀ(e_c − π(x_o)), Δθ⟩, so one vector–Jacobian
product per example gives every term of Δlog π_c (a dot product with each batch example's share
of Δθ, with the momentum and with the decay); only its ``focus`` examples get all V rows of J.

Structured path (``nn.Sequential`` chains of Linear/Conv2d, as in :mod:`ntkviz.kernel`): J(x_o) is
kept factored per layer (inputs, R output cotangents: V rows, or one for a class); a Conv2d's
weight Jacobian rows are formed per example (out × in·k·k each), except that against one or two
watched rows the batch's convolution weight terms are one convolution with those rows as filters.
Any other model: ``torch.func`` (``jacrev`` of x_o, ``vmap``-ed per-example gradients).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from ntkviz.arrays import frozen, readonly
from ntkviz.checks import class_index, real_number
from ntkviz.decomposition import Decomposition
from ntkviz.kernel import (
    _BACKWARD_HOOKS,
    _as_batch,
    _call,
    _chain,
    _derivative,
    _input_cotangent,
    _jacobians,
    _kind,
    _plain_pool,
    _rows_of,
    _same_examples,
    _through_torch_func,
    _Unsupported,
    _upsampled,
    empirical_ntk,
    eval_mode,
    functional_forward,
)
from ntkviz.models import BranchSum

#: Optimizer kinds the accounting understands, by ``StepAccount.optimizer`` name.
SUPPORTED = "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW"
LOSSES = ("ce", "neg")
#: Modules that compute differently in training and eval mode.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True, eq=False)
class StepAccount:
    """The account of one optimizer step for W watched examples x_o and a batch of B examples.

    Every array is read-only; float64 unless noted. Log-probability level (nats):

    - ``probs_before (W, V)``: π(x_o) before the step (eval mode); ``log_probs_before (W, V)``:
      log π(x_o), from the logits (finite where π underflows to 0);
    - ``actual (W, V)``: Δlog π(x_o) after the real step (eval mode, before vs after);
    - ``gradient (W, B, V)``: per batch example b, −(s/B)·A(x_o)·K_P(x_o, x_b)·G_b;
    - ``momentum (W, V)``: the optimizer's history (SGD's momentum buffer, Adam's first moment
      before this gradient); zeros for plain SGD and on the first step;
    - ``weight_decay (W, V)``: SGD's or Adam's λθ share, AdamW's decoupled −η·λ·θ;
    - ``predicted (W, V)`` = ``gradient.sum(1) + momentum + weight_decay`` (the first order);
    - ``statistics (W, V)``: what the training forward's update of running statistics (batch
      norm's running mean and variance) changed, exactly: log π(θ', stats') − log π(θ', stats)
      at the new parameters θ'; zeros for models without running statistics. It does not shrink
      with η, so it stands apart from the residual;
    - ``residual (W, V)`` = ``actual − predicted − statistics`` (second order, plus the first-order
      difference between training- and eval-mode gradients of batch-norm models).

    The same at the logit level (Δz, no A): ``dz_actual``, ``dz_gradient (W, B, V)``,
    ``dz_momentum``, ``dz_weight_decay``, ``dz_predicted``, ``dz_statistics``, ``dz_residual``.

    The batch: ``G (B, V)`` = ∂ℓ_b/∂z_b of each example's own loss in training mode (π − e_y for
    "ce"); ``batch_labels (B,)`` int64. ``classes (W,)`` int64: the class each watched example's
    ``contributions (W, B)`` = ``gradient[w, :, classes[w]]`` refer to. With ``top_kernels``:
    ``top_index (W,)`` int64, the batch example with the largest |contribution| per watched example,
    and ``top_kernel (W, V, V)`` = K_P(x_o, x_top) in eval mode, so that
    ``gradient[w, top_index[w]] = −(step_scale/B)·A·top_kernel[w]·G[top_index[w]]`` (A = I − 1·πᵀ
    from ``probs_before``); else None.

    Scalars: ``loss`` (the batch loss), ``lr`` (η of the first parameter group), ``step_scale`` (s:
    Q = s·P is the step's map on the gradient; for Adam s = η(1 − β₁)/(1 − β₁ᵗ)), ``optimizer``
    ("sgd", "adam" or "adamw").
    """

    probs_before: np.ndarray
    log_probs_before: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    gradient: np.ndarray
    momentum: np.ndarray
    weight_decay: np.ndarray
    statistics: np.ndarray
    residual: np.ndarray
    dz_actual: np.ndarray
    dz_predicted: np.ndarray
    dz_gradient: np.ndarray
    dz_momentum: np.ndarray
    dz_weight_decay: np.ndarray
    dz_statistics: np.ndarray
    dz_residual: np.ndarray
    G: np.ndarray
    batch_labels: np.ndarray
    classes: np.ndarray
    contributions: np.ndarray
    loss: float
    lr: float
    step_scale: float
    optimizer: str
    top_index: np.ndarray | None = field(default=None, compare=False)
    top_kernel: np.ndarray | None = field(default=None, compare=False)

    #: The (W, V) terms, by name, at the log-probability level (gradient summed over the batch).
    TERMS = (
        "actual", "predicted", "gradient", "momentum", "weight_decay", "statistics", "residual"
    )  # fmt: skip

    def terms(self, logits: bool = False) -> dict[str, np.ndarray]:
        """The (W, V) terms by name (``TERMS``; the gradient term summed over the batch), at the
        log-probability level or, with ``logits``, at the logit level (names without ``dz_``)."""
        prefix = "dz_" if logits else ""
        out = {name: getattr(self, prefix + name) for name in self.TERMS}
        out["gradient"] = out["gradient"].sum(1)
        return out


@dataclass(frozen=True, eq=False)
class WatchAccount:
    """The account of one training step for W watched examples, each at its class
    ``classes[w]`` = c (e.g. its label): what the trainer gives with a :class:`Watch`.

    For each watched example the step's change of log π_c is split exactly as in
    :class:`StepAccount` (the same numbers, at class c) from one vector–Jacobian product
    v = J(x_o)ᵀ(e_c − π(x_o)): Δlog π_c ≈ ⟨v, Δθ⟩, each term ⟨v, its part of Δθ⟩. Every array is
    read-only; float64 unless noted; nats.

    - ``contributions (W, B)``: per batch example b, −(s/B)·[A·K_P(x_o, x_b)·G_b]_c;
    - ``class_gradient``, ``class_momentum``, ``class_weight_decay`` ``(W,)``: the first-order
      terms of Δlog π_c (``class_gradient`` = ``contributions.sum(1)``); ``class_predicted`` =
      their sum; ``class_statistics``: the exact change from running statistics (see
      :class:`StepAccount`); ``class_actual``: the real Δlog π_c (eval mode, before vs after);
      ``class_residual`` = ``class_actual − class_predicted − class_statistics``;
    - ``probs_before (W, V)``: π(x_o) before the step, ``log_probs_before (W, V)`` its log (from
      the logits); ``actual (W, V)`` and ``dz_actual (W, V)``: the real Δlog π and Δz of every
      class;
    - the batch: ``G (B, V)``, ``batch_labels (B,)`` int64; ``classes (W,)`` int64;
    - ``focus (F,)`` int64: the watched examples (positions in W) that also get the full account,
      ``focused``: their :class:`StepAccount` (every class, logit level, ``top_index`` and
      ``top_kernel``; its ``classes`` = ``classes[focus]``), or None. For them the class terms
      above are the focused account's numbers at their class, bit for bit.

    Scalars as in :class:`StepAccount`: ``loss``, ``lr``, ``step_scale``, ``optimizer``.
    """

    classes: np.ndarray
    probs_before: np.ndarray
    log_probs_before: np.ndarray
    actual: np.ndarray
    dz_actual: np.ndarray
    contributions: np.ndarray
    class_gradient: np.ndarray
    class_momentum: np.ndarray
    class_weight_decay: np.ndarray
    class_statistics: np.ndarray
    class_predicted: np.ndarray
    class_actual: np.ndarray
    class_residual: np.ndarray
    G: np.ndarray
    batch_labels: np.ndarray
    loss: float
    lr: float
    step_scale: float
    optimizer: str
    focus: np.ndarray
    focused: StepAccount | None = None

    TERMS = StepAccount.TERMS

    def terms(self, logits: bool = False) -> dict[str, np.ndarray]:
        """The (W, V) terms by name (``TERMS``), like :meth:`StepAccount.terms`, with NaN where
        this step did not compute them: every class but c of an unfocused example (and, at the
        logit level, all of its terms but ``actual``)."""
        W, V = self.probs_before.shape
        focused = self.focused.terms(logits) if self.focused is not None else {}
        out = {"actual": self.dz_actual if logits else self.actual}
        for name in self.TERMS:
            if name == "actual":
                continue
            a = np.full((W, V), np.nan)
            if not logits:
                a[np.arange(W), self.classes] = getattr(self, "class_" + name)
            if focused:
                a[self.focus] = focused[name]
            a.flags.writeable = False
            out[name] = a
        return out


# --------------------------------------------------------------------------- validation


def _optimizer_kind(optimizer) -> str:
    """ "sgd", "adam" or "adamw"; a ValueError naming the supported optimizers otherwise."""
    kind = type(optimizer)
    if kind is torch.optim.SGD:
        return "sgd"
    if kind in (torch.optim.Adam, torch.optim.AdamW):
        decoupled = kind is torch.optim.AdamW or any(
            g.get("decoupled_weight_decay", False) for g in optimizer.param_groups
        )
        return "adamw" if decoupled else "adam"
    raise ValueError(
        f"step accounting supports {SUPPORTED}; got {kind.__module__}.{kind.__qualname__}"
    )


def _check_optimizer(model: nn.Module, optimizer) -> str:
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    kind = _optimizer_kind(optimizer)
    own = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in own:
                raise ValueError("the optimizer holds parameters that are not the model's")
            if p.is_complex():
                raise ValueError("step accounting needs real parameters, not complex ones")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")
    if len(list(model.named_parameters(remove_duplicate=False))) != len(own):
        raise ValueError(
            "step accounting does not support parameters shared between layers (tied weights, "
            "a layer used twice)"
        )
    return kind


def _check_no_gradient_hooks(model: nn.Module) -> None:
    """ValueError where a hook may change the gradient a step takes: the account's terms are built
    from J(x)ᵀ·∂L/∂z, which such a hook does not see (kernels, being about the function, ignore
    backward hooks)."""
    from torch.nn.modules import module as torch_module

    hooked = [
        f"parameter {name!r}"
        for name, p in model.named_parameters()
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None)
    ]
    hooked += [
        f"module {name!r} ({type(m).__name__})"
        for name, m in model.named_modules()
        if any(getattr(m, n, None) for n in _BACKWARD_HOOKS)
    ]
    if any(getattr(torch_module, f"_global{n}", None) for n in _BACKWARD_HOOKS):
        hooked.append("every module (global module backward hooks)")
    if hooked:
        raise ValueError(
            f"step accounting cannot follow gradient hooks: {', '.join(hooked[:3])}"
            f"{' and more' if len(hooked) > 3 else ''} may change the gradient the step takes, "
            "which the account's terms (built from J(x)ᵀ·∂L/∂z) would not see; remove the hooks "
            "to account for steps (kernels and decompose ignore backward hooks)"
        )


def _check_lr(lr) -> float:
    """``lr`` (a Python, numpy or 0-d tensor number) as a float; ValueError unless finite, ≥ 0."""
    try:
        value = real_number(lr, "lr")
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"lr must be a finite number ≥ 0 or None, got {lr!r}")
    return value


def depends_on_mode(model: nn.Module) -> bool:
    return any(isinstance(m, _MODE_DEPENDENT) for m in model.modules())


def _same_in_both_modes(model: nn.Module) -> bool:
    """Whether the model computes the same in training and eval mode, as far as its code shows:
    a chain of layers of the kinds the structured path knows (no dropout, no batch norm), so
    that the eval-mode sweeps need not switch every module's flag."""
    if _chain(model) is None:
        return False
    for m in model.modules():
        if isinstance(m, _MODE_DEPENDENT):
            return False
        container = isinstance(m, nn.ModuleList) or type(m).forward in _CONTAINERS
        if not container and _kind(m) == "other":
            return False
    return True


_CONTAINERS = (nn.Sequential.forward, BranchSum.forward)


# --------------------------------------------------------------------------- the step's maps


@dataclass
class _StepMaps:
    """How the optimizer turns this step's gradient and state into Δθ, per parameter it moves:
    Δθ_p = −(q[p] ⊙ g_p + c·u + c'·u') with ``decay[p] = (c, u)`` and ``history[p] = (c', u')``
    (a float and a tensor, so that SGD's terms need no scaled copies of θ and of its buffer);
    q = s·P (a float for SGD, a tensor for Adam). ``shape[p] = (lr, P)``.
    ``scale`` = s of the first parameter with s ≠ 0; :meth:`preconditioner` = q/scale."""

    q: dict = field(default_factory=dict)
    decay: dict = field(default_factory=dict)
    history: dict = field(default_factory=dict)
    shape: dict = field(default_factory=dict)
    scale: float = 0.0

    def add(self, p: Tensor, lr: float, s: float, P, decay, history) -> None:
        if self.scale == 0 and s != 0:
            self.scale = s
        self.q[p] = s * P
        self.shape[p] = (lr, P)
        if decay is not None:
            self.decay[p] = decay
        if history is not None:
            self.history[p] = history

    def preconditioner(self) -> dict:
        """P per parameter with the first parameter's scale taken out (``q/scale``). Where the
        gradient moves no parameter (η = 0, or SGD's dampening 1), P itself, times each group's
        η relative to the first non-zero one."""
        if self.scale != 0:
            return {p: q / self.scale for p, q in self.q.items()}
        lr0 = next((lr for lr, _ in self.shape.values() if lr != 0), 0.0)
        return {p: P * (lr / lr0) if lr0 else P for p, (lr, P) in self.shape.items()}


def _sgd_maps(optimizer, moved: list[list[Tensor]]) -> _StepMaps:
    maps = _StepMaps()
    for group, params in zip(optimizer.param_groups, moved):
        lr, mu = float(group["lr"]), float(group["momentum"])
        tau, wd = float(group["dampening"]), float(group["weight_decay"])
        nesterov, sign = group["nesterov"], -1.0 if group["maximize"] else 1.0
        for p in params:
            buf = optimizer.state.get(p, {}).get("momentum_buffer") if mu != 0 else None
            history = None
            if mu == 0:
                k = 1.0
            elif buf is None:  # the first step: the buffer becomes the (decayed) gradient
                k = 1.0 + mu if nesterov else 1.0
            else:
                k = 1.0 + mu * (1.0 - tau) if nesterov else 1.0 - tau
                history = (lr * (mu * mu if nesterov else mu), buf)
            decay = (lr * k * wd, p.detach()) if wd != 0 else None
            maps.add(p, lr, lr * k * sign, 1.0, decay, history)
    return maps


def _adam_maps(optimizer, moved: list[list[Tensor]], grads: dict | None) -> _StepMaps:
    maps = _StepMaps()
    adamw = type(optimizer) is torch.optim.AdamW
    for group, params in zip(optimizer.param_groups, moved):
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = adamw or group.get("decoupled_weight_decay", False)
        sign = -1.0 if group["maximize"] else 1.0
        for p in params:
            state = optimizer.state.get(p, {})
            t = (float(state["step"]) if "step" in state else 0.0) + 1.0
            if grads is not None:  # v as this step computes it, from this gradient
                g = grads[p] if sign > 0 else -grads[p]
                if wd != 0 and not decoupled:
                    g = g.add(p.detach(), alpha=wd)
                v = state["exp_avg_sq"] if state else torch.zeros_like(p)
                v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
            elif state:  # the next step without its own gradient's share
                v = state["exp_avg_sq"].mul(beta2)
            else:  # no gradient yet: no preconditioner to apply (checked: some have one)
                continue
            if group["amsgrad"] and "max_exp_avg_sq" in state:
                v = torch.maximum(state["max_exp_avg_sq"], v)
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            denom = (v.sqrt() / bias2**0.5).add_(eps)
            step_size = lr / bias1
            P = denom.reciprocal_()
            if wd == 0:
                decay = None
            elif decoupled:
                decay = (lr * wd, p.detach())
            else:
                decay = (step_size * (1 - beta1) * wd, P * p.detach())
            history = (step_size * beta1, P * state["exp_avg"]) if state else None
            maps.add(p, lr, step_size * (1 - beta1) * sign, P, decay, history)
    return maps


def _step_maps(optimizer, kind: str, grads: dict | None) -> _StepMaps:
    """The maps of the step ``optimizer.step()`` would take with ``grads`` (param -> gradient, the
    parameters it moves); ``grads`` None: of the next step, for every parameter that requires
    grad, without the next gradient's own share of Adam's second moment."""
    moved = [
        [p for p in g["params"] if (p in grads if grads is not None else p.requires_grad)]
        for g in optimizer.param_groups
    ]
    if kind == "sgd":
        return _sgd_maps(optimizer, moved)
    if grads is None and not any(optimizer.state.get(p) for ps in moved for p in ps):
        raise ValueError(
            "Adam has taken no step yet: its first preconditioner depends on the first gradient; "
            "take a step first (or use account_step, which includes it)"
        )
    return _adam_maps(optimizer, moved, grads)


# --------------------------------------------------------------------------- Jacobians


def _patches(layer: nn.Conv2d, a: Tensor) -> Tensor:
    """The input patches a Conv2d sees, ``(N, in·kh·kw, H'·W')`` like ``F.unfold`` (a strided
    view copied once: several times faster than ``F.unfold`` on CPU)."""
    (kh, kw), (dh, dw), (sh, sw) = layer.kernel_size, layer.dilation, layer.stride
    ph, pw = layer.padding
    if ph or pw:
        a = F.pad(a, (pw, pw, ph, ph))
    p = a.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
    N, C, H, W = p.shape[:4]
    return p.permute(0, 1, 4, 5, 2, 3).reshape(N, C * kh * kw, H * W)


class _LayerRows:
    """J(x) at one Linear/Conv2d layer, factored: the rows of example n are fixed by its input
    ``a[n]`` and its R output cotangents ``g[n] (R, *out)``."""

    def __init__(self, layer: nn.Module, a: Tensor, g: Tensor):
        self.layer, self.a, self.g = layer, a, g
        self._weight_rows = None
        self._bias_rows = None

    def weight_rows(self) -> Tensor:
        """Conv2d only: the weight-Jacobian rows ``(N·R, out·in·kh·kw)``."""
        if self._weight_rows is None:
            N, R, out = self.g.shape[:3]
            u = _patches(self.layer, self.a)
            rows = torch.bmm(self.g.reshape(N, R * out, -1), u.transpose(1, 2))
            self._weight_rows = rows.view(N * R, -1)
        return self._weight_rows

    def weight_times(self, u: Tensor) -> Tensor:
        """The weight-Jacobian rows times a weight-shaped ``u``, ``(N, R)``."""
        L = self.layer
        if isinstance(L, nn.Linear):
            return torch.bmm(self.g, (self.a @ u.T).unsqueeze(-1)).view(self.g.shape[:2])
        if self._weight_rows is not None:
            return (self._weight_rows @ u.reshape(-1)).view(self.g.shape[:2])
        y = F.conv2d(self.a, u, None, L.stride, L.padding, L.dilation)
        return torch.bmm(self.g.flatten(2), y.flatten(1).unsqueeze(-1)).view(self.g.shape[:2])

    def bias_rows(self) -> Tensor:
        """The bias-Jacobian rows ``(N·R, out)``."""
        if self._bias_rows is None:
            g = self.g.sum((-2, -1)) if isinstance(self.layer, nn.Conv2d) else self.g
            self._bias_rows = g.reshape(-1, g.shape[-1])
        return self._bias_rows


def _maps_of(layer: nn.Module, maps: dict):
    w = maps.get(layer.weight) if layer.weight.requires_grad else None
    b = maps.get(layer.bias) if layer.bias is not None and layer.bias.requires_grad else None
    return w, b


def _gram(r1: Tensor, r2: Tensor, q) -> Tensor:
    """``r1·diag(q)·r2ᵀ`` for rows ``r1 (M1, n)``, ``r2 (M2, n)`` and ``q`` a float or a tensor
    of n entries (applied to the side with fewer rows)."""
    if not isinstance(q, Tensor):
        return (r1 @ r2.T).mul_(q)
    q = q.reshape(-1)
    return r1 @ (r2 * q).T if len(r2) <= len(r1) else (r1 * q) @ r2.T


def _pairs_linear(x: _LayerRows, y: _LayerRows, qw, qb) -> Tensor:
    """Σ over a Linear layer's parameters of J_x·Q·J_yᵀ, ``(N1, N2, R1, R2)``."""
    g1, g2 = x.g, y.g
    (N1, R1, out), (N2, R2) = g1.shape, g2.shape[:2]
    if not isinstance(qw, Tensor) and not isinstance(qb, Tensor):
        gg = (g1.reshape(N1 * R1, out) @ g2.reshape(N2 * R2, out).T).view(N1, R1, N2, R2)
        if qw is None:
            return gg.mul_(qb).permute(0, 2, 1, 3)
        factor = (x.a @ y.a.T).mul_(qw)
        if qb is not None:
            factor += qb
        return gg.mul_(factor[:, None, :, None]).permute(0, 2, 1, 3)
    # M[n, m, k] = Σ_l Q_w[k, l]·a1[n, l]·a2[m, l] + Q_b[k]
    M = g1.new_zeros((N1, N2, out))
    if qw is not None:
        qw = qw if isinstance(qw, Tensor) else torch.full_like(x.layer.weight, qw)
        M += ((x.a[:, None, :] * y.a[None, :, :]).reshape(N1 * N2, -1) @ qw.T).view(N1, N2, out)
    if qb is not None:
        M += qb
    return torch.matmul(g1[:, None] * M[:, :, None, :], g2.transpose(1, 2)[None])


#: Up to this many rows on the small side, a Conv2d's weight term against one-row examples (a
#: batch's gradients) is taken as a convolution with those rows as filters, without forming the
#: examples' weight rows: the same multiply-adds for one row, but one fast convolution.
FILTER_ROWS = 2


def _pairs_conv(x: _LayerRows, y: _LayerRows, qw, qb) -> Tensor:
    """Σ over a Conv2d's parameters of J_x·Q·J_yᵀ, ``(N1, N2, R1, R2)``."""
    N1, R1 = x.g.shape[:2]
    N2, R2 = y.g.shape[:2]
    k = None
    if qw is not None and R2 == 1 and y._weight_rows is None and N1 * R1 <= FILTER_ROWS:
        k = _filter_products(x, y, qw)
    elif qw is not None:
        k = _gram(x.weight_rows(), y.weight_rows(), qw)
    if qb is not None:
        part = _gram(x.bias_rows(), y.bias_rows(), qb)
        k = part if k is None else k.add_(part)
    return k.reshape(N1, R1, N2, R2).permute(0, 2, 1, 3)


def _filter_products(x: _LayerRows, y: _LayerRows, q) -> Tensor:
    """``x.weight_rows()·diag(q)·y.weight_rows()ᵀ (M, N2)`` for ``y`` with one row per example,
    as Σ over output positions of y's output gradient times the convolution of y's input with
    x's (M) rows as filters."""
    L = x.layer
    rows = x.weight_rows()
    if isinstance(q, Tensor):
        rows = rows * q.reshape(-1)
    M, N2 = len(rows), len(y.a)
    t = F.conv2d(y.a, rows.view(M * L.out_channels, *L.weight.shape[1:]), None, L.stride,
                 L.padding, L.dilation)  # fmt: skip
    k = (t.view(N2, M, -1) * y.g.reshape(N2, 1, -1)).sum(-1).T
    return k if isinstance(q, Tensor) else k.mul_(q)


class _Factored:
    """J(x) of a chain model: one :class:`_LayerRows` per trainable layer."""

    def __init__(self, layers: list[_LayerRows]):
        self.layers = layers

    def pairs(self, other: _Factored, maps: dict) -> Tensor:
        """Σ_θ J(x1)·Q·J(x2)ᵀ ``(N1, N2, R1, R2)`` with Q = ``maps`` (param -> float or tensor;
        parameters not in ``maps`` do not count)."""
        total = None
        for x, y in zip(self.layers, other.layers):
            qw, qb = _maps_of(x.layer, maps)
            if qw is not None or qb is not None:
                pair = _pairs_linear if isinstance(x.layer, nn.Linear) else _pairs_conv
                part = pair(x, y, qw, qb)  # a new tensor
                total = part if total is None else total.add_(part)
        if total is None:
            N1, R1 = self.layers[0].g.shape[:2]
            N2, R2 = other.layers[0].g.shape[:2]
            return self.layers[0].g.new_zeros((N1, N2, R1, R2))
        return total

    def times(self, vectors: list[dict]) -> Tensor:
        """J(x)·u ``(N, R, K)`` for K parameter-space vectors, each a dict param -> (c, t): u_p =
        c·t (a missing parameter counts as zeros)."""
        g0 = self.layers[0].g
        N, R = g0.shape[:2]
        columns = []
        for vector in vectors:
            total = g0.new_zeros(N * R)
            for x in self.layers:
                uw, ub = _maps_of(x.layer, vector)
                if uw is not None:
                    total.add_(x.weight_times(uw[1]).view(-1), alpha=uw[0])
                if ub is not None:
                    total.add_(x.bias_rows() @ ub[1], alpha=ub[0])
            columns.append(total.view(N, R))
        return torch.stack(columns, -1)


class _Materialised:
    """J(x) (or per-example gradients) as ``param -> (N, R, n)`` for any model (torch.func)."""

    def __init__(self, rows: dict):
        self.rows = rows

    @classmethod
    def jacobian(cls, model: nn.Module, x: Tensor) -> _Materialised:
        """J(x) ``(N, V, n)`` per trainable parameter, in the model's current mode."""
        named, f = _functional(model)
        with _through_torch_func():
            jac = _jacobians(f, named, x)
        params = dict(model.named_parameters())
        return cls({params[n]: _rows_of(j) for n, j in jac.items()})

    @classmethod
    def gradients(cls, model: nn.Module, x: Tensor, cotangents: Tensor) -> _Materialised:
        """Per-example J(x_b)ᵀ·c_b ``(B, 1, n)`` per trainable parameter."""
        named, f = _functional(model)

        def row(xb, c):
            return vjp(lambda p: f(p, xb), named)[1](c)[0]

        with _through_torch_func():
            grads = vmap(row)(x, cotangents)
        params = dict(model.named_parameters())
        return cls({params[n]: g.reshape(len(g), 1, -1) for n, g in grads.items()})

    def pairs(self, other: _Materialised, maps: dict) -> Tensor:
        r1, r2 = next(iter(self.rows.values())), next(iter(other.rows.values()))
        (N1, R1), (N2, R2) = r1.shape[:2], r2.shape[:2]
        total = r1.new_zeros((N1 * R1, N2 * R2))
        for p, rows in self.rows.items():
            q = maps.get(p)
            if q is not None:
                total += _gram(rows.reshape(N1 * R1, -1), other.rows[p].reshape(N2 * R2, -1), q)
        return total.view(N1, R1, N2, R2).permute(0, 2, 1, 3)

    def times(self, vectors: list[dict]) -> Tensor:
        r = next(iter(self.rows.values()))
        out = r.new_zeros((*r.shape[:2], len(vectors)))
        for p, rows in self.rows.items():
            for k, vector in enumerate(vectors):
                if p in vector:
                    c, u = vector[p]
                    out[:, :, k] += c * (rows @ u.reshape(-1))
        return out


def _functional(model: nn.Module):
    """Trainable parameters by name and ``f(params, x) -> logits (V,)`` of one example."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    named = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def f(p, x):
        return functional_forward(model, {**fixed, **p}, x.unsqueeze(0)).squeeze(0)

    return named, f


def _rows(model: nn.Module, chain, x: Tensor):
    """``(logits (N, V), J(x))`` in eval mode: factored when ``chain`` is given, else materialised."""
    with eval_mode(model):
        if chain is not None:
            with torch.no_grad():
                return _chain_rows(chain, x)
        with torch.no_grad():
            z = model(x)
        return z, _Materialised.jacobian(model, x)


def _structured_chain(model: nn.Module, x: Tensor):
    """The model's chain and its eval-mode sweep of ``x`` when the factored path applies, else
    ``(None, None)``."""
    chain, _ = _structured_layers(model)
    if chain is None:
        return None, None
    try:
        with torch.no_grad(), eval_mode(model):
            return chain, _chain_rows(chain, x)
    except _Unsupported:
        return None, None


# --------------------------------------------------------------------------- one step


class _LayerCapture:
    """Forward hooks that record each listed layer's input and either its output gradient during
    the backward pass (training step) or its output (``keep_outputs``, for ``autograd.grad``).
    The hooks return None: the computation is unchanged. The gradient hooks write into a dict
    that holds no graph, so no reference cycle keeps a step's graph alive."""

    def __init__(self, layers: list[nn.Module], keep_outputs: bool = False):
        self.layers = layers
        self.keep_outputs = keep_outputs
        self.inputs: dict[int, Tensor] = {}
        self.outputs: dict[int, Tensor] = {}
        self.grads: dict[int, Tensor] = {}
        self.valid = True

    def hook(self, k: int):
        grads = self.grads

        def forward_hook(module, args, output):
            if k in self.inputs or not isinstance(output, Tensor) or not output.requires_grad:
                self.valid = False  # a layer used twice, or not differentiable here
                return
            self.inputs[k] = args[0].detach()
            if self.keep_outputs:
                self.outputs[k] = output
            else:
                output.register_hook(lambda grad: grads.__setitem__(k, grad))

        return forward_hook

    def run(self, fn):
        handles = [layer.register_forward_hook(self.hook(k)) for k, layer in enumerate(self.layers)]
        try:
            return fn()
        finally:
            for h in handles:
                h.remove()

    def complete(self) -> bool:
        """Every layer ran once, differentiably, and each Linear saw a batch of vectors (the
        structured path's conditions)."""
        n = len(self.layers)
        done = self.outputs if self.keep_outputs else self.grads
        return (
            self.valid
            and len(self.inputs) == n
            and len(done) == n
            and all(
                self.inputs[k].ndim == 2
                for k, L in enumerate(self.layers)
                if isinstance(L, nn.Linear)
            )
        )

    def rows(self) -> _Factored | None:
        """After the backward pass: each layer's input and output gradient (one row an example)."""
        if not self.complete():
            return None
        return self._factored([self.grads[k] for k in range(len(self.layers))])

    def pulled(self, z: Tensor, cotangent: Tensor) -> _Factored:
        """With ``keep_outputs``, after a complete forward to ``z``: the rows for the output
        cotangent ``cotangent`` (same shape as ``z``, one row an example)."""
        outputs = [self.outputs[k] for k in range(len(self.layers))]
        return self._factored(torch.autograd.grad(z, outputs, cotangent))

    def _factored(self, grads) -> _Factored:
        return _Factored(
            [_LayerRows(L, self.inputs[k], g.unsqueeze(1)) for k, (L, g) in
             enumerate(zip(self.layers, grads))]
        )  # fmt: skip


def _slope(layer: nn.Module, a_in: Tensor, a_out: Tensor) -> Tensor | None:
    """The derivative of a Tanh or ReLU at its input, else None."""
    return _derivative(layer, a_in, a_out) if _kind(layer) in ("tanh", "relu") else None


def _pull_back_pooled(act: nn.Module, pool: nn.Module, acts: list[Tensor], g: Tensor):
    """Cotangents ``g (N, R, C, h, w)`` of an activation followed by an average pooling (acts:
    the activation's input, its output, the pool's output) pulled back through both at once (the
    slope and the pooling's 1/(kh·kw) in one product), or None where that does not apply."""
    size = _pool_size(pool)
    if size is None:
        return None
    slope = _slope(act, acts[0], acts[1])
    (kh, kw), (C, h, w) = size, g.shape[2:]
    if slope is None or slope.shape[1:] != (C, h * kh, w * kw):
        return None
    return _upsampled(g, size).mul_((slope * (1.0 / (kh * kw))).unsqueeze(1))


def _pool_size(layer: nn.Module) -> tuple[int, int] | None:
    """The window of a non-overlapping, unpadded average pooling layer, else None."""
    if not isinstance(layer, nn.AvgPool2d) or not _plain_pool(layer):
        return None
    k = layer.kernel_size
    return tuple(k) if isinstance(k, tuple | list) else (k, k)


def _chain_rows(chain, x: Tensor, cotangents=None) -> tuple[Tensor, _Factored]:
    """Forward ``x (N, ...)`` through the chain (call in eval mode, without grad) and pull
    cotangents of the logits back: ``(z (N, V), J(x)ᵀ·u factored per trainable layer)``. The
    cotangents ``u (N, R, V)`` are ``cotangents(z)``; None: the V unit vectors (R = V, the rows of
    J(x)). Raises :class:`~ntkviz.kernel._Unsupported` where the factored path does not apply."""
    acts = [x]
    for _, layer in chain:
        acts.append(_call(layer, acts[-1]))
    z = acts[-1]
    if z.ndim != 2:
        raise _Unsupported
    if cotangents is None:
        N, V = z.shape
        g = torch.eye(V, dtype=z.dtype, device=z.device).expand(N, V, V)
    else:
        g = cotangents(z)
    trainable = [any(p.requires_grad for p in layer.parameters()) for _, layer in chain]
    first = trainable.index(True)
    rows = []
    k = len(chain) - 1
    while k >= first:
        layer = chain[k][1]
        if trainable[k]:
            if isinstance(layer, nn.Linear) and acts[k].ndim != 2:
                raise _Unsupported
            rows.append(_LayerRows(layer, acts[k], g))
        if k - 1 > first and g.ndim == 5:  # activation then pooling, as in LeNet
            pooled = _pull_back_pooled(chain[k - 1][1], layer, acts[k - 1 : k + 2], g)
            if pooled is not None:
                g, k = pooled, k - 2
                continue
        if k > first:
            g = _input_cotangent(layer, acts[k], acts[k + 1], g)
        k -= 1
    return z, _Factored(rows[::-1])


def _class_cotangents(classes: Tensor):
    """The cotangents u = e_c − π(x) ``(N, 1, V)`` of each example's class c (from logits z):
    J(x)ᵀ·u is the gradient of log π_c(x)."""

    def u(z: Tensor) -> Tensor:
        u = -F.softmax(z.double(), -1)
        u[torch.arange(len(z), device=z.device), classes.to(z.device)] += 1
        return u.to(z.dtype).unsqueeze(1)

    return u


def _structured_layers(model: nn.Module):
    """``(chain, trainable layers)`` of a flat chain model for the factored path, else ``(None,
    None)``: the accounts factor Linear and Conv2d layers (numeric padding) only; residual blocks
    and trainable batch norms take the generic path."""
    chain = _chain(model)
    if chain is None:
        return None, None
    layers = []
    for _, m in chain:
        if not isinstance(m, nn.Module):  # a residual block
            return None, None
        if any(p.requires_grad for p in m.parameters()):
            kind = _kind(m)
            if kind not in ("linear", "conv2d") or (
                kind == "conv2d" and isinstance(m.padding, str)
            ):
                return None, None
            layers.append(m)
    return (chain, layers) if layers else (None, None)


class _Stamp:
    """The model's parameters and buffers as they are now (copies), to tell whether they are
    still the same objects with the same values — also after a change through ``.data``, which
    autograd's version counters do not see."""

    def __init__(self, model: nn.Module):
        self.tensors = [*model.parameters(), *model.buffers()]
        self.values = _flat(self.tensors)

    def holds(self, model: nn.Module) -> bool:
        now = [*model.parameters(), *model.buffers()]
        return (
            len(now) == len(self.tensors)
            and all(a is b for a, b in zip(now, self.tensors))
            and torch.equal(_flat(now), self.values)
        )


def _flat(tensors: list[Tensor]) -> Tensor:
    """The values of ``tensors`` in one new vector (their bytes where their dtypes differ, e.g.
    batch norm's int64 step count; on the CPU where their devices do)."""
    parts = [t.detach().reshape(-1) for t in tensors]
    if len({p.device for p in parts}) > 1:
        parts = [p.cpu() for p in parts]
    if len({p.dtype for p in parts}) > 1:
        parts = [p.contiguous().view(torch.uint8) for p in parts]
    return torch.cat(parts) if parts else torch.empty(0)


@dataclass
class _Start:
    """The watched examples at the parameters a step starts from (eval mode): logits ``z (W, V)``;
    on the factored path J of the fully accounted examples (``full``, V rows each) and
    J(x_o)ᵀ·(e_c − π(x_o)) of the others (``light``, one row each); the buffers before the
    training forward (mode-dependent models only) and the model's :class:`_Stamp` (whether this
    start still holds; None for a start that the next forward follows at once)."""

    z: Tensor
    full: _Factored | None
    light: _Factored | None
    buffers: list
    stamp: _Stamp | None


class AccountedStep:
    """Optimizer steps in three calls, for a trainer that checks the loss between them:
    ``step = AccountedStep(model, optimizer, x_watch)`` (π and J of x_watch before the step),
    ``logits = step.forward(x_batch)`` (the batch's forward, in the model's current mode),
    ``account = step.step(loss, y_batch)`` (``loss.backward()``, ``optimizer.step()`` and the
    account). The caller computes the loss from ``logits`` and clears stale gradients
    (``optimizer.zero_grad``) before :meth:`step`. :meth:`forward` and :meth:`step` can be called
    again for each further step (set up once a run). :func:`account_step` is the one-call form.

    ``focus`` None: every watched example gets the full account and :meth:`step` returns a
    :class:`StepAccount`. ``focus`` a sequence of positions in ``x_watch``: those get the full
    account, every other one its class-level account (one vector–Jacobian product), and
    :meth:`step` returns a :class:`WatchAccount`. ``continued``: after each step the watched
    examples' forward at the new parameters serves both that step's actual change and the next
    step's start (used when the next :meth:`forward` finds the model's parameters and buffers
    unchanged; else that start is taken again). ``immediate``: the caller calls :meth:`forward`
    right after this constructor, with the model untouched (as :func:`account_step` does), so the
    first start skips recording the model to check that."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        x_watch: Tensor,
        *,
        classes: Sequence[int] | None = None,
        top_kernels: bool = False,
        focus: Sequence[int] | None = None,
        continued: bool = False,
        immediate: bool = False,
    ):
        self.kind = _check_optimizer(model, optimizer)
        _check_no_gradient_hooks(model)
        self.model, self.optimizer, self.top_kernels = model, optimizer, top_kernels
        self.continued = continued
        self.x_watch = _as_batch(model, x_watch, "x_watch")
        W = len(self.x_watch)
        self.focus = None if focus is None else _check_focus(focus, W)
        full = list(range(W)) if focus is None else list(self.focus)
        self.full_index = torch.tensor(full, dtype=torch.long)
        self.light_index = torch.tensor([w for w in range(W) if w not in full], dtype=torch.long)
        self.chain, self.layers = _structured_layers(model)
        # The training-mode forward updates running statistics (batch norm); the Jacobians are
        # taken with the buffers as they were before it.
        self.mode_dependent = depends_on_mode(model)
        self.same_in_both_modes = _same_in_both_modes(model)
        start = None
        try:
            if len(self.light_index):  # their rows need the classes, which need the logits
                with torch.no_grad(), self._eval_mode():
                    z = model(self.x_watch)
            else:
                start = self._start(stamped=not immediate)
                z = start.z
        except RuntimeError as e:
            raise ValueError(
                f"the model cannot take x_watch of shape {tuple(self.x_watch.shape)} as a batch "
                f"(W, ...) of examples: {e}"
            ) from None
        if z.ndim != 2 or len(z) != W:
            raise ValueError(
                f"the model must map x_watch (W, ...) to logits (W, V); got {tuple(z.shape)}"
            )
        V = z.shape[1]
        if classes is None:
            classes = z.argmax(1).tolist()
        if isinstance(classes, Tensor | np.ndarray):  # e.g. labels, int64
            classes = classes.tolist() if classes.ndim == 1 else [classes.tolist()]
        classes = list(classes)
        if len(classes) != W or any(
            isinstance(c, bool) or not isinstance(c, int | np.integer) or not 0 <= c < V
            for c in classes
        ):
            raise ValueError(f"classes must be {W} ints in [0, {V}), got {classes!r}")
        self.classes = torch.tensor([int(c) for c in classes])
        self.num_classes = V
        self._next: _Start | None = start or self._start(stamped=not immediate)
        self._current: _Start | None = None
        self.capture = None
        self.logit_grad = None
        self.x_batch = None

    def check_batch(self, x_batch) -> Tensor:
        """``x_batch`` as the model's dtype and device; ValueError unless it holds examples shaped
        like the watched ones. (The model's per-example check ran on x_watch, once.)"""
        x_batch = _as_batch(self.model, x_batch, "x_batch", kernels=False)
        if x_batch.shape[1:] != self.x_watch.shape[1:]:
            raise ValueError(
                f"x_batch (B, ...) and x_watch (W, ...) must hold examples of the same shape; got "
                f"{tuple(x_batch.shape[1:])} and {tuple(self.x_watch.shape[1:])}"
            )
        return x_batch

    def _eval_mode(self):
        """Eval mode for the watched examples' sweeps: every module's flag switched, unless the
        model computes the same in both modes."""
        if self.same_in_both_modes:
            return contextlib.nullcontext()
        return eval_mode(self.model)

    # ------------------------------------------------------------------ the watched examples

    def _start(self, stamped: bool = True) -> _Start:
        """The watched examples at the current parameters, in eval mode: their logits, the full
        rows of the focused ones and the class rows of the others (factored path), or only the
        logits and u (the generic path, whose rows are materialised in :meth:`step`)."""
        model, x = self.model, self.x_watch
        fi, li = self.full_index, self.light_index
        buffers = [b.detach().clone() for b in model.buffers()] if self.mode_dependent else []
        full = light = z_full = z_light = None
        with torch.no_grad(), self._eval_mode():
            if self.chain is not None:
                try:
                    if len(fi):
                        z_full, full = _chain_rows(self.chain, x[fi] if len(li) else x)
                    if len(li):
                        z_light, light = _chain_rows(
                            self.chain, x[li] if len(fi) else x, _class_cotangents(self.classes[li])
                        )
                except _Unsupported:
                    self.chain = self.layers = None
            if self.chain is None:
                z = model(x)
                full = light = None
            elif z_light is None or z_full is None:
                z = z_full if z_light is None else z_light
            else:
                z = z_light.new_empty((len(x), z_light.shape[1]))
                z[fi], z[li] = z_full, z_light
        return _Start(z, full, light, buffers, _Stamp(model) if stamped else None)

    # ------------------------------------------------------------------ the step

    def forward(self, x_batch: Tensor) -> Tensor:
        """The batch's logits ``(B, V)`` from ``model(x_batch)``, recording what the account needs
        (each trainable layer's input and output gradient on the structured path)."""
        x_batch = self.check_batch(x_batch)
        start, self._next = self._next, None
        if start is None or (start.stamp is not None and not start.stamp.holds(self.model)):
            start = self._start()
        self._current = start
        self.x_batch = x_batch
        if self.chain is not None and not self.mode_dependent:
            self.capture = _LayerCapture(self.layers)
            logits = self.capture.run(lambda: self.model(x_batch))
        else:
            self.capture = None
            logits = self.model(x_batch)
        if logits.shape != (len(x_batch), self.num_classes):
            raise ValueError(
                f"in training mode the model maps x_batch {tuple(x_batch.shape)} to logits of "
                f"shape {tuple(logits.shape)}, in eval mode to (N, {self.num_classes})"
            )

        box = self.logit_grad = {}
        logits.register_hook(lambda grad: box.__setitem__("grad", grad))
        return logits

    def step(self, loss: Tensor, y_batch: Tensor) -> StepAccount | WatchAccount:
        """``loss.backward()``, then the account of ``optimizer.step()``, then the step itself."""
        if self._current is None:
            raise RuntimeError("call forward(x_batch) before step()")
        start, self._current = self._current, None
        model, optimizer = self.model, self.optimizer
        fi, li = self.full_index, self.light_index
        labels = torch.as_tensor(y_batch)
        loss.backward()
        G_scaled = self.logit_grad["grad"].detach()  # ∂loss/∂z_b: G_b / B for a mean loss
        B = len(G_scaled)

        # J(x_o) and the per-example gradients, at θ (and buffers) before the step.
        full, light, batch = start.full, start.light, None
        with _buffers_restored(model, start.buffers):
            if self.chain is not None:
                capture = self.capture
                batch = capture.rows() if capture is not None else self._eval_rows(G_scaled)
                if batch is None:  # a layer the hooks cannot follow (e.g. used twice)
                    self.chain = self.layers = None
            if batch is None:
                with eval_mode(model), _step_not_taken():
                    x, u = self.x_watch, _class_cotangents(self.classes[li])(start.z[li])
                    full = _Materialised.jacobian(model, x[fi]) if len(fi) else None
                    light = _Materialised.gradients(model, x[li], u[:, 0]) if len(li) else None
                    batch = _Materialised.gradients(model, self.x_batch, G_scaled)
        self.capture = None
        grads = {
            p: p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
        }
        maps = _step_maps(optimizer, self.kind, grads)
        with torch.no_grad():
            if full is not None:
                dz_gradient = -full.pairs(batch, maps.q)[..., 0]  # (F, B, V)
                dz_momentum, dz_decay = (-full.times([maps.history, maps.decay])).unbind(-1)
            if light is not None:  # already at the log level of the class: u = A(x_o)ᵀ e_c
                light_gradient = -light.pairs(batch, maps.q)[:, :, 0, 0]  # (W_l, B)
                light_history = -light.times([maps.history, maps.decay])[:, 0]  # (W_l, 2)

        probs = F.softmax(start.z.double(), -1)
        scalars = {
            "loss": float(loss.detach()),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "step_scale": maps.scale,
            "optimizer": self.kind,
        }
        G = B * G_scaled.double()
        if full is not None:
            classes = self.classes[fi]
            gradient = _log_level(dz_gradient.double(), probs[fi][:, None])
            rows = torch.arange(len(fi), device=gradient.device)
            contributions = gradient[rows, :, classes.to(gradient.device)]
            top_index = top_kernel = None
            if self.top_kernels:
                top_index = contributions.abs().argmax(1)
                with _buffers_restored(model, start.buffers):
                    top_kernel = self._top_kernels(full, top_index, maps.preconditioner())

        optimizer.step()
        if self.continued:
            self._next = self._start()
            z_after = self._next.z
        else:
            with torch.no_grad(), self._eval_mode():
                z_after = model(self.x_watch)
        z_mid = z_after  # the new parameters with the statistics before the step
        if start.buffers and not all(
            torch.equal(b, s) for b, s in zip(model.buffers(), start.buffers)
        ):
            with torch.no_grad(), self._eval_mode(), _buffers_restored(model, start.buffers):
                z_mid = model(self.x_watch)
        focused = None
        if full is not None:
            focused = _account(
                start.z[fi], z_mid[fi], z_after[fi], dz_gradient, dz_momentum, dz_decay,
                gradient, probs[fi], contributions, G, labels, classes, top_index, top_kernel,
                **scalars,
            )  # fmt: skip
        if self.focus is None:
            return focused
        return _watch_account(
            start.z, z_mid, z_after, probs, self.classes, self.focus, focused, li,
            light_gradient if light is not None else None,
            light_history if light is not None else None, G, labels, **scalars,
        )  # fmt: skip

    def _eval_rows(self, G_scaled: Tensor) -> _Factored | None:
        """The batch's per-example gradient factors in eval mode (for dropout / batch norm)."""
        capture = _LayerCapture(self.layers, keep_outputs=True)
        with eval_mode(self.model), torch.enable_grad():
            z = capture.run(lambda: self.model(self.x_batch))
            return capture.pulled(z, G_scaled) if capture.complete() else None

    def _top_kernels(self, watched, top_index: Tensor, P: dict) -> Tensor:
        """K_P(x_o[w], x_batch[top_index[w]]) ``(W, V, V)`` in eval mode."""
        tops, pick = torch.unique(top_index, return_inverse=True)
        _, rows = _rows(self.model, self.chain, self.x_batch[tops.to(self.x_batch.device)])
        with torch.no_grad():
            K = watched.pairs(rows, P)  # (W, T, V, V)
        return K[torch.arange(len(K)), pick.to(K.device)]


@contextlib.contextmanager
def _step_not_taken():
    """Around the account's work between ``loss.backward()`` and ``optimizer.step()``: a
    ValueError says that the step was not taken (the gradients of the batch are left in
    ``.grad``)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{e} (no step was taken)") from None


def _check_focus(focus, W: int) -> tuple[int, ...]:
    focus = tuple(focus)
    if any(
        isinstance(f, bool) or not isinstance(f, int | np.integer) or not 0 <= f < W for f in focus
    ) or len(set(focus)) != len(focus):
        raise ValueError(f"focus must be distinct positions in [0, {W}), got {focus!r}")
    return tuple(int(f) for f in focus)


@contextlib.contextmanager
def _buffers_restored(model: nn.Module, saved: list[Tensor]):
    """Within the block the model's buffers hold ``saved`` (their values before the training
    forward); afterwards their current values again, bit-exactly."""
    if not saved:
        yield
        return
    buffers = list(model.buffers())
    current = [b.detach().clone() for b in buffers]
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, current):
                b.copy_(s)


def _log_level(dz: Tensor, probs: Tensor) -> Tensor:
    """A·Δz = Δz − (π·Δz)·1 along the last axis (float64)."""
    return dz - (dz * probs).sum(-1, keepdim=True)


def _account(
    z_before,
    z_mid,
    z_after,
    dz_gradient,
    dz_momentum,
    dz_decay,
    gradient,
    probs,
    contributions,
    G,
    labels,
    classes,
    top_index,
    top_kernel,
    **scalars,
) -> StepAccount:
    """Assemble the frozen float64 account; predicted and residual are sums of the frozen terms.
    ``z_mid``: the watched logits at the new parameters with the old running statistics (the
    statistics term is ``z_after`` against it)."""
    z0, zm, z1 = z_before.double(), z_mid.double(), z_after.double()
    log_p0 = F.log_softmax(z0, -1)
    momentum = _log_level(dz_momentum.double(), probs)
    decay = _log_level(dz_decay.double(), probs)
    actual = frozen(F.log_softmax(z1, -1) - log_p0)
    dz_actual = frozen(z1 - z0)
    statistics = frozen(F.log_softmax(z1, -1) - F.log_softmax(zm, -1))
    dz_statistics = frozen(z1 - zm)
    terms = {
        "gradient": frozen(gradient),
        "momentum": frozen(momentum),
        "weight_decay": frozen(decay),
        "dz_gradient": frozen(dz_gradient),
        "dz_momentum": frozen(dz_momentum),
        "dz_weight_decay": frozen(dz_decay),
    }
    predicted = frozen(terms["gradient"].sum(1) + terms["momentum"] + terms["weight_decay"])
    dz_predicted = frozen(
        terms["dz_gradient"].sum(1) + terms["dz_momentum"] + terms["dz_weight_decay"]
    )
    return StepAccount(
        probs_before=frozen(probs),
        log_probs_before=frozen(log_p0),
        actual=actual,
        predicted=predicted,
        statistics=statistics,
        residual=frozen(actual - predicted - statistics),
        dz_actual=dz_actual,
        dz_predicted=dz_predicted,
        dz_statistics=dz_statistics,
        dz_residual=frozen(dz_actual - dz_predicted - dz_statistics),
        G=frozen(G),
        batch_labels=readonly(labels, np.int64),
        classes=readonly(classes, np.int64),
        contributions=frozen(contributions),
        top_index=None if top_index is None else readonly(top_index, np.int64),
        top_kernel=None if top_kernel is None else frozen(top_kernel),
        **terms,
        **scalars,
    )


def _watch_account(
    z_before, z_mid, z_after, probs, classes, focus, focused, light_index, light_gradient,
    light_terms, G, labels, **scalars,
) -> WatchAccount:  # fmt: skip
    """Assemble the frozen float64 :class:`WatchAccount`: the light examples' class terms from
    their ``(W_l, B)`` contributions and ``(W_l, 2)`` momentum and decay terms, the focused ones'
    from their ``focused`` :class:`StepAccount`."""
    z0, zm, z1 = z_before.double(), z_mid.double(), z_after.double()
    log_p0 = F.log_softmax(z0, -1)
    actual = (F.log_softmax(z1, -1) - log_p0).cpu().numpy()
    dz_actual = (z1 - z0).cpu().numpy()
    statistics = (F.log_softmax(z1, -1) - F.log_softmax(zm, -1)).cpu().numpy()
    W, B = len(z0), len(G)
    classes = classes.numpy()
    contributions, terms = np.empty((W, B)), np.empty((3, W))
    if light_gradient is not None:
        li = light_index.numpy()
        contributions[li] = light_gradient.double().cpu().numpy()
        terms[0, li] = contributions[li].sum(1)
        terms[1:, li] = light_terms.double().cpu().numpy().T
    if focused is not None:
        f, c = np.array(focus), classes[list(focus)]
        rows = np.arange(len(f))
        contributions[f] = focused.contributions
        terms[0, f] = focused.gradient.sum(1)[rows, c]
        terms[1, f] = focused.momentum[rows, c]
        terms[2, f] = focused.weight_decay[rows, c]
        actual[f], dz_actual[f] = focused.actual, focused.dz_actual
        statistics[f] = focused.statistics
    predicted = terms[0] + terms[1] + terms[2]
    class_actual = actual[np.arange(W), classes]
    class_statistics = statistics[np.arange(W), classes]
    return WatchAccount(
        classes=readonly(classes, np.int64),
        probs_before=frozen(probs),
        log_probs_before=frozen(log_p0),
        actual=frozen(actual),
        dz_actual=frozen(dz_actual),
        contributions=frozen(contributions),
        class_gradient=frozen(terms[0]),
        class_momentum=frozen(terms[1]),
        class_weight_decay=frozen(terms[2]),
        class_statistics=frozen(class_statistics),
        class_predicted=frozen(predicted),
        class_actual=frozen(class_actual),
        class_residual=frozen(class_actual - predicted - class_statistics),
        G=frozen(G),
        batch_labels=readonly(labels, np.int64),
        focus=readonly(focus, np.int64),
        focused=focused,
        **scalars,
    )


def account_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_batch: Tensor,
    y_batch: Tensor,
    x_watch: Tensor,
    lr: float | None = None,
    *,
    classes: Sequence[int] | None = None,
    top_kernels: bool = False,
    loss: str = "ce",
    commit: bool = True,
) -> StepAccount:
    """Take the step ``loss = F.cross_entropy(model(x_batch), y_batch); loss.backward();
    optimizer.step()`` and return its :class:`StepAccount` for the watched examples.

    ``x_batch (B, ...)``, ``y_batch (B,)`` int classes, ``x_watch (W, ...)``: batches the model
    accepts. ``lr``: set every parameter group's learning rate to it first (as the trainer's
    schedule does); None keeps the optimizer's. Stale ``.grad`` are cleared first
    (``zero_grad(set_to_none=True)``, as the trainer does), and the batch's forward runs in training
    mode (each module's flag restored afterwards): parameters, buffers, ``.grad`` and optimizer state
    end bit-identical to those lines'. ``classes (W,)``: the class each watched example's
    ``contributions`` and top contributor follow (default: its predicted class before the step).
    ``top_kernels``: also K_P of each watched example with its top contributor. ``loss``: "ce"
    (learn the labels) or "neg" (ascent: the loss is −cross-entropy). ``commit=False``: compute the
    account (including the actual change) and then restore the model, its ``.grad``, the optimizer
    and torch's random state bit-exactly — a preview of the optimizer's real next step.

    Supports torch.optim.SGD (any momentum, dampening, weight decay, Nesterov), Adam and AdamW
    (including amsgrad, maximize, foreach, fused, capturable); another optimizer raises
    ``ValueError``, as do bad shapes, labels or ``lr``. Non-finite values (a diverging step)
    propagate into the account.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if lr is not None:
        lr = _check_lr(lr)
        params = [p for p in model.parameters() if p.is_floating_point()]
        if params and lr > torch.finfo(params[0].dtype).max:
            raise ValueError(f"lr = {lr:g} overflows the parameters' {params[0].dtype}")
    kind = _check_optimizer(model, optimizer)
    if kind != "sgd":
        _check_adam_step(model, optimizer, lr)
    snapshot = None if commit else optimizer_snapshot(model, optimizer)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices, enabled=not commit):
            step = AccountedStep(
                model, optimizer, x_watch, classes=classes, top_kernels=top_kernels, immediate=True
            )
            x_batch = step.check_batch(x_batch)
            y = _labels(y_batch, step.num_classes, x_batch)
            optimizer.zero_grad(set_to_none=True)
            flags = [(m, m.training) for m in model.modules()]
            model.train()
            try:
                logits = step.forward(x_batch)
            except ValueError as e:
                if "more than 1 value per channel" not in str(e):
                    raise
                raise ValueError(
                    f"a batch of {len(x_batch)} cannot pass the model's BatchNorm1d in training "
                    "mode (it needs more than one value per channel to normalise by the batch): "
                    "step on a larger batch, or take the plain-SGD step, whose gradient comes "
                    "from eval mode"
                ) from None
            finally:
                for m, flag in flags:
                    m.training = flag
            old_lrs = [group["lr"] for group in optimizer.param_groups]
            if lr is not None:  # once the forward has worked: a failing call leaves lr alone
                for group in optimizer.param_groups:
                    group["lr"] = lr
            ce = F.cross_entropy(logits, y)
            try:
                return step.step(ce if loss == "ce" else -ce, y)
            except BaseException:
                for group, old in zip(optimizer.param_groups, old_lrs):
                    group["lr"] = old
                raise
    finally:
        if snapshot is not None:
            snapshot.restore(model, optimizer)


def _check_adam_step(model: nn.Module, optimizer, lr: float | None) -> None:
    """ValueError when Adam's next step size η/(1 − β₁ᵗ) overflows the parameters' dtype (torch
    would fail half-way through its update)."""
    params = [p for g in optimizer.param_groups for p in g["params"] if p.is_floating_point()]
    if not params:
        return
    biggest = torch.finfo(params[0].dtype).max
    for group in optimizer.param_groups:
        eta = float(group["lr"] if lr is None else lr)
        steps = [float(optimizer.state.get(p, {}).get("step", 0)) for p in group["params"]]
        t = max(steps, default=0.0) + 1
        size = eta / (1 - group["betas"][0] ** t)
        if size > biggest:
            raise ValueError(
                f"lr = {eta:g} overflows the parameters' {params[0].dtype} in Adam's next step "
                f"(η/(1 − β₁ᵗ) = {size:g})"
            )


def _labels(y, V: int, x_batch: Tensor) -> Tensor:
    """``y`` as int64 classes on ``x_batch``'s device; ValueError unless B ints in [0, V)."""
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"y_batch must be a 1-D tensor of int classes, got {y.dtype} {tuple(y.shape)}"
        )
    if len(y) != len(x_batch):
        raise ValueError(f"y_batch has {len(y)} labels for {len(x_batch)} examples")
    if not (int(y.min()) >= 0 and int(y.max()) < V):
        raise ValueError(f"y_batch must hold classes in [0, {V}), got {y.tolist()}")
    return y.to(device=x_batch.device, dtype=torch.long)


# --------------------------------------------------------------------------- the kernel


def optimizer_kernel(
    model: nn.Module, optimizer: torch.optim.Optimizer, x1: Tensor, x2: Tensor
) -> Tensor:
    """The optimizer-aware kernel ``K_P (N1, N2, V, V)``, ``K_P[a, b] = J(x1[a])·P·J(x2[b])ᵀ``, in
    eval mode, with P the diagonal preconditioner the optimizer would apply to its next gradient:
    P = I for SGD (so this is :func:`~ntkviz.kernel.empirical_ntk`), for Adam/AdamW
    1/(√v̂ + ε) from its current second moment, v̂ = β₂·v/(1 − β₂ᵗ⁺¹) (amsgrad: the running
    maximum), i.e. without the next gradient's own (1 − β₂)·g² share (unknown before it is taken).
    Parameters the optimizer does not hold, and Adam's parameters that have no state yet (no
    gradient so far), count with P = 0; with several parameter groups P is
    relative to the first group's step scale. Raises ``ValueError`` for an Adam that has taken no
    step (its first preconditioner depends on the first gradient) or an unsupported optimizer.
    Units: logit² per unit parameter step, like K."""
    kind = _check_optimizer(model, optimizer)
    maps = _step_maps(optimizer, kind, None)
    P = maps.preconditioner()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if all(not isinstance(P.get(p), Tensor) and P.get(p) == 1.0 for p in trainable):
        return empirical_ntk(model, x1, x2)
    x1 = _as_batch(model, x1, "x1")
    x2 = _as_batch(model, x2, "x2")
    _same_examples(x1, x2)
    if len(x2) > len(x1):  # keep the small side small: K_P(x1, x2) = K_P(x2, x1)ᵀ
        return optimizer_kernel(model, optimizer, x2, x1).permute(1, 0, 3, 2)
    chain, swept = _structured_chain(model, x2)
    rows2 = swept[1] if swept is not None else _rows(model, None, x2)[1]
    parts = []
    V = next(iter(rows2.rows.values())).shape[1] if swept is None else swept[0].shape[1]
    for xc in x1.split(_chunk_size(model, len(x2), V, structured=swept is not None)):
        _, rows1 = _rows(model, chain, xc)
        with torch.no_grad():
            parts.append(rows1.pairs(rows2, P))
    return torch.cat(parts).detach()


def _chunk_size(model: nn.Module, n2: int, V: int, structured: bool) -> int:
    """Examples of x1 per chunk of :func:`optimizer_kernel`: about 2²³ intermediate numbers (the
    Jacobian rows formed per example and the products with the n2 examples of x2)."""
    trainable = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(False))]
    per_example = n2 * V * V
    for m in trainable:
        if structured and isinstance(m, nn.Linear):
            per_example += n2 * (m.in_features + V * m.out_features)
        else:
            per_example += V * sum(p.numel() for p in m.parameters(False))
    return max(1, 2**23 // per_example)


# --------------------------------------------------------------------------- undo


def _clone(value):
    return value.detach().clone() if isinstance(value, Tensor) else copy.deepcopy(value)


@dataclass(frozen=True, eq=False)
class OptimizerSnapshot:
    """A bit-exact copy of a model's parameters, buffers and ``.grad`` and of its optimizer's
    state and hyper-parameters (learning rates included). :meth:`restore` puts them back, any
    number of times: an undo for an applied step. Take one with :func:`optimizer_snapshot`."""

    parameters: tuple
    grads: tuple
    buffers: tuple
    state: tuple  #: per optimizer parameter (group order): its state dict, cloned
    groups: tuple  #: per parameter group: its hyper-parameters, cloned

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Put the copied values back into ``model`` and ``optimizer`` (in place)."""
        params, buffers = list(model.parameters()), list(model.buffers())
        owned = [p for g in optimizer.param_groups for p in g["params"]]
        if (
            len(params) != len(self.parameters)
            or len(buffers) != len(self.buffers)
            or len(owned) != len(self.state)
            or len(optimizer.param_groups) != len(self.groups)
            or any(p.shape != s.shape for p, s in zip(params, self.parameters))
        ):
            raise ValueError("this snapshot was taken of another model or optimizer")
        with torch.no_grad():
            for p, saved, grad in zip(params, self.parameters, self.grads):
                p.copy_(saved)
                p.grad = None if grad is None else grad.clone()
            for b, saved in zip(buffers, self.buffers):
                b.copy_(saved)
        for p, saved in zip(owned, self.state):
            if saved:
                optimizer.state[p] = {k: _clone(v) for k, v in saved.items()}
            else:
                optimizer.state.pop(p, None)
        for group, saved in zip(optimizer.param_groups, self.groups):
            group.update({k: _clone(v) for k, v in saved.items()})


def optimizer_snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> OptimizerSnapshot:
    """Copy everything a step changes (see :class:`OptimizerSnapshot`)."""
    return OptimizerSnapshot(
        parameters=tuple(p.detach().clone() for p in model.parameters()),
        grads=tuple(None if p.grad is None else p.grad.clone() for p in model.parameters()),
        buffers=tuple(b.detach().clone() for b in model.buffers()),
        state=tuple(
            {k: _clone(v) for k, v in optimizer.state.get(p, {}).items()}
            for g in optimizer.param_groups
            for p in g["params"]
        ),
        groups=tuple(
            {k: _clone(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ),
    )


# --------------------------------------------------------------------------- the trainer's watch


@dataclass(frozen=True, eq=False)
class Watch:
    """Examples the trainer accounts for at every step: ``x (W, ...)`` (e.g. test images) and, per
    example, the class c whose log π its account follows (``classes (W,)``, e.g. the labels).

    Every step gives a :class:`WatchAccount`: each watched example's Δlog π_c split into the batch
    examples' contributions, momentum, weight decay and residual (one vector–Jacobian product an
    example). ``focus``: positions in ``x`` of the examples that also get the full account of
    every step (all V classes, the logit level, the top contributor and its K_P; V products an
    example) — e.g. the one whose step details are shown."""

    x: Tensor
    classes: tuple[int, ...]
    focus: tuple[int, ...] = ()

    def __post_init__(self):
        x = torch.as_tensor(self.x)
        if x.ndim < 2 or len(x) == 0:
            raise ValueError(f"watched examples must be a batch (W, ...), got {tuple(x.shape)}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("watched examples hold NaN or infinite values")
        classes = self.classes
        if isinstance(classes, Tensor | np.ndarray):  # e.g. the dataset's labels, int64
            classes = classes.tolist() if classes.ndim == 1 else [classes.tolist()]
        classes = tuple(classes)
        if len(classes) != len(x) or any(
            isinstance(c, bool) or not isinstance(c, int | np.integer) or c < 0 for c in classes
        ):
            raise ValueError(f"classes must be {len(x)} non-negative ints, got {classes!r}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "classes", tuple(int(c) for c in classes))
        object.__setattr__(self, "focus", _check_focus(self.focus, len(x)))


# --------------------------------------------------------------------------- one update, seen whole


@dataclass(frozen=True)
class StepDecomposition(Decomposition):
    """:class:`~ntkviz.decomposition.Decomposition` of an optimizer's real next step on one
    example (x_u, y_u), seen from x_o. ``K`` is the optimizer-aware kernel K_P(x_o, x_u), ``G`` is
    x_u's ∂L/∂z, and the gradient term is ``gradient_term`` = −s·A·K_P·G with s = ``step_scale``
    (η for plain SGD; see :class:`StepAccount`). The step's other terms stand apart:
    ``momentum`` and ``weight_decay`` ``(V,)`` (Δlog π; ``dz_momentum``, ``dz_weight_decay`` at
    the logit level), so that ``predicted`` = gradient term + momentum + weight decay; and
    ``statistics`` (``dz_statistics``), the exact change from the running statistics the step's
    training-mode forward updated (batch norm; zeros without), so that ``residual`` = actual −
    predicted − statistics. ``optimizer``: "sgd", "adam" or "adamw"."""

    gradient_term: np.ndarray = None
    momentum: np.ndarray = None
    weight_decay: np.ndarray = None
    statistics: np.ndarray = None
    dz_gradient_term: np.ndarray = None
    dz_momentum: np.ndarray = None
    dz_weight_decay: np.ndarray = None
    dz_statistics: np.ndarray = None
    step_scale: float = 1.0
    optimizer: str = "sgd"

    FORMULA = (
        "gradient_term = -step_scale * A @ K @ G with K = J P J^T, the optimizer's kernel ; "
        "predicted = gradient_term + momentum + weight_decay ; statistics = the exact change "
        "from the running statistics ; residual = actual - predicted - statistics"
    )
    SCALARS = ("optimizer", "step_scale")


def decompose_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_o: Tensor,
    x_u: Tensor,
    y_u: int,
    lr: float | None = None,
    loss: str = "ce",
) -> StepDecomposition:
    """Decompose the step ``optimizer`` would take next on the single example ``(x_u, y_u)`` at
    learning rate ``lr`` (None: the optimizer's own), as seen from ``x_o`` (single examples, like
    :func:`decompose`'s): its momentum or Adam state as it is now, and the real change after the
    step. Nothing changes: model, ``.grad``, optimizer state and random state are restored
    bit-exactly (see :func:`account_step` with ``commit=False``). With a plain SGD optimizer (no
    momentum, no decay) this is :func:`decompose`'s step for models that compute alike in training
    and eval mode; with batch norm or dropout the step's gradient comes from training mode (as a
    real step takes it) and :func:`decompose`'s from eval mode."""
    x_o, x_u = torch.as_tensor(x_o), torch.as_tensor(x_u)
    if x_o.shape != x_u.shape:
        raise ValueError(
            f"x_o and x_u must be single examples of one shape, got {tuple(x_o.shape)} and "
            f"{tuple(x_u.shape)}"
        )
    both = _as_batch(model, torch.stack([x_o, x_u]), "x_o, x_u")
    with torch.no_grad(), eval_mode(model):
        try:
            z = model(both).double()
        except RuntimeError as e:
            raise ValueError(
                f"the model cannot take x_o and x_u of shape {tuple(x_o.shape)} as one example "
                f"(expected a dataset item such as (1, 28, 28), not a batch): {e}"
            ) from None
    y_u = class_index(y_u, "y_u", z.shape[-1])
    a = account_step(
        model, optimizer, both[1:], torch.tensor([int(y_u)]), both, lr, classes=[y_u, y_u],
        top_kernels=True, loss=loss, commit=False,
    )  # fmt: skip
    p, log_p = a.probs_before, a.log_probs_before
    dz_after = z + torch.from_numpy(np.array(a.dz_actual))
    return StepDecomposition(
        A=frozen(np.eye(p.shape[1]) - p[0][None, :]),
        K=frozen(a.top_kernel[0]),
        G=frozen(a.G[0]),
        predicted=a.predicted[0],
        actual=a.actual[0],
        residual=a.residual[0],
        delta_logits_predicted=a.dz_predicted[0],
        delta_logits_actual=a.dz_actual[0],
        probs_before=p[0],
        probs_after=frozen(np.exp(log_p[0] + a.actual[0])),
        logits_before=frozen(z[0]),
        logits_after=frozen(dz_after[0]),
        probs_u_before=p[1],
        probs_u_after=frozen(np.exp(log_p[1] + a.actual[1])),
        lr=a.lr,
        loss=loss,
        y_u=int(y_u),
        gradient_term=a.gradient[0, 0],
        momentum=a.momentum[0],
        weight_decay=a.weight_decay[0],
        statistics=a.statistics[0],
        dz_statistics=a.dz_statistics[0],
        dz_gradient_term=a.dz_gradient[0, 0],
        dz_momentum=a.dz_momentum[0],
        dz_weight_decay=a.dz_weight_decay[0],
        step_scale=float(a.step_scale),
        optimizer=a.optimizer,
    )
