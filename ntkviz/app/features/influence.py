"""Influence of one update over a probe set of the test split (feature "influence")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkviz.app.features.pair import PairRequest
from ntkviz.app.jobs import Progress
from ntkviz.arrays import readonly


def probe_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The probe set: all ``n`` examples when ``size >= n``, else ``size`` seeded random ones,
    sorted."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


@dataclass(frozen=True, eq=False)
class InfluenceResult:
    """The core's ``Influence`` on test examples ``indices`` (true classes ``labels``);
    ``classes`` = ``class_influence(influence, labels, V)``; ``kernel_norm`` ``(M,)`` =
    ‖K(x_o, x_u)‖_F of the first M probe examples (``norm_indices``), or None."""

    request: InfluenceRequest
    indices: np.ndarray
    labels: np.ndarray
    influence: object
    classes: dict
    norm_indices: np.ndarray | None
    norm_labels: np.ndarray | None
    kernel_norm: np.ndarray | None
    step: int
    applied_steps: int = 0  #: step-through steps applied on top of ``step``
    lineage: tuple = ()  #: the model's state besides ``step`` (``Engine.lineage``)


@dataclass(frozen=True)
class InfluenceRequest:
    """Job: the update of ``pair`` (its x_o is not used) over ``size`` test examples (all when
    ≥ the split), the actual change after a real step when ``actual``, and ‖K(x_o, x_u)‖_F on
    the first ``norm_size`` probe examples (0: none)."""

    pair: PairRequest
    size: int = 10000
    actual: bool = False
    norm_size: int = 0
    seed: int = 0

    def run(self, engine):
        from ntkviz.analysis import class_influence
        from ntkviz.decomposition import Influence, iter_influence

        r = self.pair
        s = engine.data.split("test")
        idx = probe_indices(len(s), self.size, self.seed)
        nidx = idx[: self.norm_size] if self.norm_size > 0 else None
        total = len(idx) + (0 if nidx is None else len(nidx))
        x_u = engine.x(r.x_u)
        yield Progress(0, total)
        found = {}
        for key, subset, offset, options in (
            ("inf", idx, 0, {"actual": self.actual}),
            ("norm", nidx, len(idx), {"kernel_norm": True, "chunk_size": 100}),
        ):
            if subset is None:
                continue
            x = s.x[subset].to(engine.device)
            for item in iter_influence(engine.model, x, x_u, r.y_u, r.lr, r.loss, **options):
                if isinstance(item, Influence):
                    found[key] = item
                else:
                    yield Progress(offset + item[0], total)
        inf, labels = found["inf"], s.y[idx].numpy()
        return InfluenceResult(
            request=self,
            indices=readonly(idx),
            labels=readonly(labels),
            influence=inf,
            classes=class_influence(inf, labels, len(engine.data.classes)),
            norm_indices=None if nidx is None else readonly(nidx),
            norm_labels=None if nidx is None else readonly(s.y[nidx].numpy()),
            kernel_norm=found["norm"].kernel_norm if nidx is not None else None,
            step=engine.step,
            applied_steps=len(engine.applied_lrs),
            lineage=engine.lineage,
        )
