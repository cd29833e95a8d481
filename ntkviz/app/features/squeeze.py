"""The squeezing effect of a negative gradient (feature "squeeze")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkviz.app.jobs import Progress
from ntkviz.app.messages import readonly
from ntkviz.app.state import Example

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
        mass = []
        for k, eta in enumerate(lrs):
            run = squeeze_steps(model, x, self.y, float(eta), 1, "neg")
            mass.append(run.probs[1, top] - neg.probs[0, top])
            yield Progress(3 + k, total)
        test = engine.data.split("test")
        rng = np.random.default_rng(0)
        idx = np.sort(rng.choice(len(test), min(SURVEY_SIZE, len(test)), replace=False))
        parts = []
        for start in range(0, len(idx), SURVEY_CHUNK):
            chunk = idx[start : start + SURVEY_CHUNK]
            xs = test.x[chunk].to(engine.device, torch.float64)
            parts.append(squeeze_survey(model, xs, test.y[chunk].numpy(), self.lr))
            yield Progress(2 + SWEEP + start + len(chunk), total)
        survey = SqueezeSurvey(
            *(readonly(np.concatenate([getattr(p, f) for p in parts])) for f in
              ("peak", "p_label", "gained", "label_fell")),
            lr=float(self.lr),
        )  # fmt: skip
        return SqueezeResult(
            self.x, self.y, neg, ce, readonly(lrs), readonly(mass), engine.step, readonly(idx),
            survey, p32, self,
        )  # fmt: skip
