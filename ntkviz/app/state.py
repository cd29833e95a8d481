"""AppState: the one evented model of what the user has chosen and what the engine holds.

Widgets show it and write to it; the controller reacts to its changes (psygnal events, emitted
synchronously on the thread that sets a field — the GUI thread). Qt-free and torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from psygnal import evented

from ntkviz.app.messages import DatasetInfo, EngineInfo, ModelInfo

LOSSES = (("ce", "learn y_u (cross-entropy)"), ("neg", "negative gradient on y_u"))
STEP_KINDS = (("sgd", "plain SGD"), ("optimizer", "this run's optimizer"))


@dataclass(frozen=True)
class Example:
    """One example of the dataset: ``split`` ("train" or "test") and ``index``."""

    split: str
    index: int

    def __str__(self) -> str:
        return f"{self.split}[{self.index}]"


@evented
@dataclass
class AppState:
    """``x_u`` learnt as class ``y_u`` with ``loss`` ("ce" or "neg") and learning rate ``lr`` by
    a plain SGD step or (``step_kind`` "optimizer") the run's optimizer's real next step, seen
    from ``x_o``; ``model_kind``: the registry model a new run or dataset takes (the training
    dock's choice; None: the current model's kind); the engine's run state, dataset, model and
    capabilities (None until loaded)."""

    x_u: Example = Example("train", 0)
    y_u: int = 0
    x_o: Example = Example("test", 0)
    lr: float = 0.01
    loss: str = "ce"
    step_kind: str = "sgd"
    model_kind: str | None = None
    run_state: str = "loading"
    engine: EngineInfo | None = None
    dataset: DatasetInfo | None = None
    model: ModelInfo | None = None

    def label(self, example: Example) -> int:
        """The true class of ``example`` (the dataset must be loaded)."""
        return self.dataset.label(example.split, example.index)
