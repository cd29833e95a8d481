"""Messages between the GUI thread and the engine's thread: commands in, events out.

Every message is a frozen dataclass of plain values and read-only numpy arrays, never a live
tensor, so it can cross threads as it is. Qt-free and torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    """Call the engine method ``name`` with ``args`` (on the engine's thread)."""

    name: str
    args: tuple = ()


@dataclass(frozen=True)
class Event:
    """Something the engine reports. ``topic``: "info" (:class:`EngineInfo`), "dataset"
    (:class:`DatasetInfo`), "model" (:class:`ModelInfo`), "records" (a tuple of the core's
    ``TrainRecord``), "run_state" (loading, ready, training, paused, stopped, finished),
    "run_started" (:class:`RunStarted`), "message" (status text), "error"
    (:class:`ErrorReport`), "session_opened" (:class:`SessionOpened`), "session_saved",
    "session_not_saved" (before its error) and "checkpoint_saved" (the path), "held_for_save"
    (the session's path, and whether the run was training when its save paused it),
    "state_dict" (name -> numpy array), "kernel_path" (:class:`KernelPath`), and the events
    of the engine's run observers (e.g. "watch_steps")."""

    topic: str
    payload: object = None


@dataclass(frozen=True)
class RunStarted:
    """A training run began at the model's step ``offset`` (0 for a new model); ``continued``:
    the run observers (by feature name) that carry the last run's account on (a Continue of an
    untouched model); ``observed``: feature name -> the examples its observer follows in this
    run (as the engine took them, whatever the view's list became since)."""

    offset: int
    continued: tuple = ()
    observed: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorReport:
    """An error for the user: ``title`` heads the message box, ``message`` says what to do."""

    title: str
    message: str


@dataclass(frozen=True)
class EngineInfo:
    """What the engine can do: ``models`` name -> one-line description; ``cuda_available``."""

    models: dict
    cuda_available: bool


@dataclass(frozen=True, eq=False)
class DatasetInfo:
    """What the window needs to show examples: per split, ``images`` uint8 ``(N, H, W)`` and
    ``labels`` int64 ``(N,)`` (read-only), and the class names."""

    name: str
    classes: tuple[str, ...]
    images: dict
    labels: dict

    def label(self, split: str, index: int) -> int:
        return int(self.labels[split][index])

    def size(self, split: str) -> int:
        return len(self.labels[split])


@dataclass(frozen=True)
class ModelInfo:
    """The model the engine holds now. ``config``: its ``TrainConfig``; ``step``: optimizer steps
    of its training run; ``applied_steps``: step-through steps on top of them; ``source``: "fresh
    weights", "trained", or the file it came from; ``number``: counts the engine's models (a new
    one for each new run, checkpoint or session)."""

    name: str
    num_parameters: int
    device: str
    config: object
    step: int
    source: str
    applied_steps: int = 0
    number: int = 0
    optimizer: str = ""  #: what "this run's optimizer" steps with (its settings and state)
    #: η of the current run's next step (its cosine schedule's), else the config's
    run_lr: float = float("nan")
    #: the model computes differently in training mode (dropout, batch norm): a real step's
    #: gradient is then not the eval-mode one its account uses, a first-order residual
    mode_dependent: bool = False
    #: which state the parameters are in apart from training steps (``Engine.lineage``)
    lineage: tuple = ()


@dataclass(frozen=True)
class KernelPath:
    """Model ``number``'s kernel algorithm (``description``: which path, and why) and one pair's
    measured cost ``pair_cost`` (s), measured once the engine is idle after a model change."""

    number: int
    description: str
    pair_cost: float


@dataclass(frozen=True)
class SessionOpened:
    """A session file was opened: ``parts`` is the features' state (plain values and numpy
    arrays), by feature name, as they saved it."""

    path: str
    parts: dict = field(default_factory=dict)
