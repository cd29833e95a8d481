"""Where the kernel lives: K(x_o, x_u) split by parameter group (feature "layers") and the
spectrum of the NTK Gram matrix of a probe set (feature "spectrum")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ntkviz.app.features.pair import PairRequest
from ntkviz.app.jobs import Progress, on_helper_thread
from ntkviz.arrays import norm, readonly


@dataclass(frozen=True, eq=False)
class LayerResult:
    """``blocks[name] (V, V)`` = the part of K(x_o, x_u) from parameter group ``name``;
    ``norms (L,)`` their Frobenius norms in ``names`` order; ``total_norm`` = ‖K‖_F."""

    request: PairRequest
    names: tuple[str, ...]
    norms: np.ndarray
    blocks: dict
    total_norm: float
    step: int
    applied_steps: int = 0  #: step-through steps applied on top of ``step``
    lineage: tuple = ()  #: the model's state besides ``step`` (``Engine.lineage``)


@dataclass(frozen=True)
class LayersRequest:
    """Job: split K of ``pair`` by parameter group."""

    pair: PairRequest

    def run(self, engine):
        from ntkviz.kernel import empirical_ntk_by_layer

        yield from ()
        r = self.pair
        parts = empirical_ntk_by_layer(engine.model, engine.x(r.x_o)[None], engine.x(r.x_u)[None])
        blocks = {k: readonly(v[0, 0].double().cpu().numpy()) for k, v in parts.items()}
        names = tuple(blocks)
        norms = np.array([norm(blocks[n]) for n in names])
        total = norm(sum(blocks.values()))
        return LayerResult(
            r,
            names,
            readonly(norms),
            blocks,
            total,
            engine.step,
            len(engine.applied_lrs),
            engine.lineage,
        )


@dataclass(frozen=True, eq=False)
class SpectrumResult:
    """Eigenvalues (descending) of the NTK Gram matrix of test examples ``indices``."""

    indices: np.ndarray
    eigenvalues: np.ndarray
    step: int


@dataclass(frozen=True)
class SpectrumRequest:
    """Job: the spectrum of about ``n`` class-balanced test examples."""

    n: int = 50

    def run(self, engine):
        from ntkviz.analysis import balanced_indices, gram_spectrum
        from ntkviz.kernel import iter_kernel_gram

        s = engine.data.split("test")
        idx = balanced_indices(s.y, max(1, self.n // len(engine.data.classes)))
        for item in iter_kernel_gram(engine.model, s.x[idx].to(engine.device)):
            if isinstance(item, tuple):
                done, total = item
                yield Progress(done, total + 1)  # the last unit: the eigenvalues
            else:
                K = item
        eig = yield from on_helper_thread(gram_spectrum, K, progress=Progress(total, total + 1))
        return SpectrumResult(readonly(idx), eig, engine.step)
