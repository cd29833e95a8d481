"""ntkviz: see how one gradient step on one example changes a classifier's predictions on another.

    Δlog π(x_o) = −η · A(x_o) · K(x_o, x_u) · G(x_u, y_u) + O(η²)   (Ren & Sutherland, ICLR 2025)

The core (this package minus ``ntkviz.gui``) never imports Qt. Heavy modules load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "show": "ntkviz.gui.app",
    "empirical_ntk": "ntkviz.kernel",
    "empirical_ntk_by_layer": "ntkviz.kernel",
    "ntk_trace": "ntkviz.kernel",
    "ntk_vector_product": "ntkviz.kernel",
    "kernel_path": "ntkviz.kernel",
    "pair_cost_seconds": "ntkviz.kernel",
    "decompose": "ntkviz.decomposition",
    "Decomposition": "ntkviz.decomposition",
    "influence": "ntkviz.decomposition",
    "iter_influence": "ntkviz.decomposition",
    "Influence": "ntkviz.decomposition",
    "load_dataset": "ntkviz.data",
    "ImageDataset": "ntkviz.data",
    "Split": "ntkviz.data",
    "as_image_dataset": "ntkviz.data",
    "build_model": "ntkviz.models",
    "MODELS": "ntkviz.models",
    "load_model_spec": "ntkviz.modelspec",
    "check_model": "ntkviz.modelspec",
    "TrainConfig": "ntkviz.training",
    "TrainRecord": "ntkviz.training",
    "train": "ntkviz.training",
    "make_optimizer": "ntkviz.training",
    "account_step": "ntkviz.accounting",
    "decompose_step": "ntkviz.accounting",
    "StepDecomposition": "ntkviz.accounting",
    "StepAccount": "ntkviz.accounting",
    "WatchAccount": "ntkviz.accounting",
    "optimizer_kernel": "ntkviz.accounting",
    "optimizer_snapshot": "ntkviz.accounting",
    "OptimizerSnapshot": "ntkviz.accounting",
    "Watch": "ntkviz.accounting",
    "RunAccount": "ntkviz.run_account",
    "Ranking": "ntkviz.run_account",
    "class_influence": "ntkviz.analysis",
    "class_kernel_map": "ntkviz.analysis",
    "iter_class_kernel_map": "ntkviz.analysis",
    "ntk_spectrum": "ntkviz.analysis",
    "squeeze_steps": "ntkviz.analysis",
    "save_checkpoint": "ntkviz.checkpoint",
    "load_checkpoint": "ntkviz.checkpoint",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ntkviz' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API too (loaded on first use), for ``dir()`` and tab completion."""
    return sorted({*globals(), *__all__})
