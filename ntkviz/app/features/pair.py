"""The pair: one update (x_u learnt as y_u with learning rate η) seen from x_o.

Jobs: its :class:`~ntkviz.decomposition.Decomposition` (feature "pair"), π of the pair at every
state of the step-through stack (feature "history"), and the search for the most confidently
wrong example (feature "search"). The model is changed only by the engine's ``apply_step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkviz.app.jobs import Progress
from ntkviz.app.state import AppState, Example
from ntkviz.arrays import readonly

#: Interactive jobs run before probe sweeps.
INTERACTIVE = 0


@dataclass(frozen=True)
class PairRequest:
    """x_u learnt as class ``y_u`` with ``loss`` ("ce" or "neg") and learning rate ``lr``,
    observed on x_o; by a plain SGD step, or (``optimizer``) the run's optimizer's next step."""

    x_u: Example
    y_u: int
    x_o: Example
    lr: float
    loss: str = "ce"
    optimizer: bool = False

    @classmethod
    def of(cls, state: AppState) -> PairRequest:
        optimizer = state.step_kind == "optimizer"
        return cls(state.x_u, state.y_u, state.x_o, float(state.lr), state.loss, optimizer)

    def same_update(self, other: PairRequest | None) -> bool:
        """Whether ``other`` learns the same x_u as the same class the same way (η aside)."""
        return other is not None and (other.x_u, other.y_u, other.loss, other.optimizer) == (
            self.x_u, self.y_u, self.loss, self.optimizer,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return {
            "x_u": [self.x_u.split, self.x_u.index], "y_u": self.y_u,
            "x_o": [self.x_o.split, self.x_o.index], "lr": self.lr, "loss": self.loss,
            "optimizer": self.optimizer,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d, num_classes: int | None = None) -> PairRequest:
        """The request stored by :meth:`to_dict`; ``ValueError`` saying which field is wrong."""
        from ntkviz.checks import class_index, real_number  # torch: not before the first paint

        if not isinstance(d, dict):
            raise ValueError(f"the pair must be a dict, got {type(d).__name__}")
        try:
            x_u, x_o = example_from(d["x_u"], "x_u"), example_from(d["x_o"], "x_o")
            y_u = class_index(d["y_u"], "y_u", num_classes)
            lr = real_number(d["lr"], "η")
        except KeyError as e:
            raise ValueError(f"the pair has no {e.args[0]}") from None
        if lr < 0:
            raise ValueError(f"η must be ≥ 0, got {lr}")
        loss, optimizer = d.get("loss", "ce"), d.get("optimizer", False)
        if loss not in ("ce", "neg"):
            raise ValueError(f"loss must be 'ce' or 'neg', got {loss!r}")
        if not isinstance(optimizer, bool):
            raise ValueError(f"optimizer must be true or false, got {optimizer!r}")
        return cls(x_u, y_u, x_o, lr, loss, optimizer)


def example_from(value, name: str) -> Example:
    """``[split, index]`` as an :class:`Example`."""
    from ntkviz.checks import class_index

    if not isinstance(value, list | tuple) or len(value) != 2 or value[0] not in ("train", "test"):
        raise ValueError(f'{name} must be ["train" or "test", index], got {value!r}')
    return Example(value[0], class_index(value[1], f"{name} index"))


def describe_steps(pairs, current: PairRequest, classes) -> str:
    """How the model was moved by step-through: "" for no step, "3 applied step(s)" when every
    step learnt the current update, else which updates they learnt ("3 applied step(s):
    train[2] → 4 ×2, train[5] → 7")."""
    if not pairs:
        return ""
    text = f"{len(pairs)} applied step(s)"
    if all(current.same_update(p) for p in pairs):
        return text
    counts: dict[str, int] = {}
    for p in pairs:
        key = "an unknown update" if p is None else f"{p.x_u} → {classes[p.y_u]}"
        if p is not None and p.loss == "neg":
            key += " (negative)"
        counts[key] = counts.get(key, 0) + 1
    parts = [k if n == 1 else f"{k} ×{n}" for k, n in counts.items()]
    return f"{text}: {', '.join(parts)}"


@dataclass(frozen=True, eq=False)
class DecompositionResult:
    """The core's ``Decomposition`` of ``request`` at training step ``step``, after
    ``applied_steps`` step-through steps."""

    request: PairRequest
    decomposition: object
    step: int
    applied_pairs: tuple  #: the PairRequest of each applied step (None: unknown)
    model_name: str
    seed: int

    @property
    def applied_steps(self) -> int:
        return len(self.applied_pairs)


@dataclass(frozen=True)
class Decompose:
    """Job: decompose ``pair``'s update. ``after_step``: the model was just stepped (a diverging
    decomposition then says that the step itself was applied)."""

    pair: PairRequest
    after_step: bool = False
    priority = INTERACTIVE

    def run(self, engine):
        from ntkviz.decomposition import decompose
        from ntkviz.errors import StepDiverged

        r = self.pair
        yield from ()
        x_o, x_u = engine.x(r.x_o), engine.x(r.x_u)
        try:
            if r.optimizer:
                from ntkviz.accounting import decompose_step

                opt = engine.step_optimizer()
                dec = decompose_step(engine.model, opt, x_o, x_u, r.y_u, r.lr, r.loss)
            else:
                dec = decompose(engine.model, x_o, x_u, r.y_u, r.lr, r.loss)
        except StepDiverged as e:
            if not self.after_step:
                raise
            raise StepDiverged(
                r.lr,
                "the model's outputs",
                prefix="The step was applied, but its successor cannot be previewed: ",
            ) from e
        return DecompositionResult(
            r,
            dec,
            engine.step,
            tuple(engine.applied_pairs),
            engine.model_name,
            engine.config.seed,
        )


@dataclass(frozen=True, eq=False)
class StepHistory:
    """π of the pair at each state of the step-through stack (first: before stepping):
    ``probs_o (S + 1, V)``, ``probs_u (S + 1, V)``; ``lrs (S,)`` the η of each applied step and
    ``pairs (S,)`` its update (a PairRequest; None: unknown)."""

    request: PairRequest
    probs_o: np.ndarray
    probs_u: np.ndarray
    lrs: tuple[float, ...]
    pairs: tuple = ()


@dataclass(frozen=True)
class History:
    """Job: the :class:`StepHistory` of ``pair``."""

    pair: PairRequest
    priority = INTERACTIVE

    def run(self, engine):
        import torch
        import torch.nn.functional as F

        from ntkviz.kernel import eval_mode, functional_forward

        yield from ()
        r, model = self.pair, engine.model
        x = torch.stack([engine.x(r.x_o), engine.x(r.x_u)])
        probs = []
        with torch.no_grad(), eval_mode(model):
            for undo in [*engine.undo_stack, None]:
                z = model(x) if undo is None else functional_forward(model, undo.state, x)
                probs.append(F.softmax(z.double(), -1).cpu().numpy())
        probs = np.stack(probs)  # (S + 1, 2, V)
        return StepHistory(
            r,
            readonly(probs[:, 0]),
            readonly(probs[:, 1]),
            tuple(engine.applied_lrs),
            tuple(engine.applied_pairs),
        )


@dataclass(frozen=True)
class SearchResult:
    """The example the model misclassifies most confidently (None: it classifies every
    candidate correctly)."""

    example: Example | None
    confidence: float


@dataclass(frozen=True)
class FindConfidentlyWrong:
    """Job: search ``split`` (examples of class ``label`` only, or all when -1)."""

    split: str
    label: int = -1
    priority = INTERACTIVE

    def run(self, engine):
        import torch
        import torch.nn.functional as F

        from ntkviz.kernel import eval_mode

        s = engine.data.split(self.split)
        idx = torch.arange(len(s)) if self.label < 0 else (s.y == self.label).nonzero()[:, 0]
        best, best_p = -1, -1.0
        for start in range(0, len(idx), 4000):
            chunk = idx[start : start + 4000]
            with torch.no_grad(), eval_mode(engine.model):
                probs = F.softmax(engine.model(s.x[chunk].to(engine.device)), -1).cpu()
            p, pred = probs.max(1)
            p = torch.where(pred != s.y[chunk], p, torch.tensor(-1.0))
            k = int(p.argmax())
            if float(p[k]) > best_p:
                best, best_p = int(chunk[k]), float(p[k])
            yield Progress(start + len(chunk), len(idx))
        found = Example(self.split, best) if best_p >= 0 else None
        return SearchResult(found, max(best_p, 0.0))
