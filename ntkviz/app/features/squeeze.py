"""The squeezing effect of a negative gradient (feature "squeeze")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkviz.app.jobs import Progress
from ntkviz.app.state import Example
from ntkviz.arrays import readonly

SURVEY_SIZE = 150  #: test images in the survey (one negative step on each one's label)
SURVEY_CHUNK = 15
SWEEP = 7  #: learning rates in the η sweep, from η/100 to 10·η


@dataclass(frozen=True, eq=False)
class SqueezeResult:
    """Negative- and positive-gradient runs (core ``SqueezeRun``) of ``steps`` steps on x, the η
    sweep (``sweep_lrs (L,)``, ``sweep_mass (L,)`` = π gain of the most likely other class after
    one negative step with each η), and the survey (core ``SqueezeSurvey`` of test images
    ``survey_indices``, each stepped on its own label)."""

    x: Example
    y: int
    neg: object
    ce: object
    sweep_lrs: np.ndarray
    sweep_mass: np.ndarray
    step: int
    survey_indices: np.ndarray
    survey: object
    p_label_float32: float  #: π(ȳ) of x by the model as it is (float32): 1.0 when saturated
    request: SqueezeRequest | None = None  #: what was asked (x, ȳ, η, steps): for exports
    left_out: str = ""  #: what diverged and was left out of the sweep and the survey, if any
    applied_steps: int = 0  #: step-through steps applied on top of ``step``
    lineage: tuple = ()  #: the model's state besides ``step`` (``Engine.lineage``)

    @property
    def saturated(self) -> bool:
        """π(ȳ) is within float32 resolution of 1: the moves show only in float64."""
        return 1.0 - self.p_label_float32 < 1e-6


@dataclass(frozen=True)
class SqueezeRequest:
    """Job: ``steps`` negative and positive steps of η = ``lr`` on (x, y), the η sweep and the
    survey, on a float64 copy of the model: a saturated π (1 − 1e-9, which is 1.0 in float32)
    still shows its moves."""

    x: Example
    y: int
    lr: float
    steps: int

    def run(self, engine):
        import copy

        import torch

        from ntkviz.analysis import SqueezeSurvey, squeeze_steps, squeeze_survey
        from ntkviz.errors import StepDiverged
        from ntkviz.kernel import eval_mode

        x32 = engine.x(self.x)
        with torch.no_grad(), eval_mode(engine.model):
            p32 = float(torch.softmax(engine.model(x32[None]), -1)[0, self.y])
        model = copy.deepcopy(engine.model).double()
        x = x32.double()
        total = 2 + SWEEP + SURVEY_SIZE
        neg = squeeze_steps(model, x, self.y, self.lr, self.steps, loss="neg")
        yield Progress(1, total)
        ce = squeeze_steps(model, x, self.y, self.lr, self.steps, loss="ce")
        yield Progress(2, total)
        lrs = np.geomspace(self.lr / 100, self.lr * 10, SWEEP)
        p0 = neg.probs[0].copy()
        p0[self.y] = -np.inf
        top = int(p0.argmax())
        kept, mass = [], []  # the sweep goes to 10·η: steps that diverge are left out
        for k, eta in enumerate(lrs):
            try:
                run = squeeze_steps(model, x, self.y, float(eta), 1, "neg")
                kept.append(eta)
                mass.append(run.probs[1, top] - neg.probs[0, top])
            except StepDiverged:
                pass
            yield Progress(3 + k, total)
        test = engine.data.split("test")
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(len(test), min(SURVEY_SIZE, len(test)), replace=False))
        parts, survived = [], []
        for start in range(0, len(idx), SURVEY_CHUNK):
            chunk = idx[start : start + SURVEY_CHUNK]
            xs = test.x[chunk].to(engine.device, torch.float64)
            ys = test.y[chunk].numpy()
            try:
                parts.append(squeeze_survey(model, xs, ys, self.lr))
                survived.append(chunk)
            except StepDiverged:  # image by image: those whose step diverges are left out
                for n in range(len(chunk)):
                    try:
                        parts.append(squeeze_survey(model, xs[n : n + 1], ys[n : n + 1], self.lr))
                        survived.append(chunk[n : n + 1])
                    except StepDiverged:
                        pass
            yield Progress(2 + SWEEP + start + len(chunk), total)
        survey = SqueezeSurvey(
            *(readonly(np.concatenate([getattr(p, f) for p in parts] or [np.zeros(0)])) for f in
              ("peak", "p_label", "gained", "label_fell")),
            lr=float(self.lr),
        )  # fmt: skip
        kept_idx = np.concatenate(survived) if survived else np.zeros(0, dtype=idx.dtype)
        left_out = []
        if len(kept) < len(lrs):
            dropped = ", ".join(f"{eta:.3g}" for eta in lrs if eta not in kept)
            left_out.append(f"the sweep's η = {dropped}")
        if len(kept_idx) < len(idx):
            left_out.append(f"{len(idx) - len(kept_idx)} of the {len(idx)} survey images")
        note = f"{' and '.join(left_out)}: the step diverges, left out" if left_out else ""
        return SqueezeResult(
            self.x, self.y, neg, ce, readonly(np.array(kept)), readonly(np.array(mass)),
            engine.step, readonly(kept_idx), survey, p32, self, note, len(engine.applied_lrs),
            engine.lineage,
        )  # fmt: skip
