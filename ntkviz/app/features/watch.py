"""Watching a run (feature "watch"): the exact account of every real optimizer step for the
watched examples x_o — who moved each one, and how.

A :class:`WatchObserver` rides along the engine's training run (``train(..., watch=...)``). Per
step it turns the core's ``StepAccount`` into a compact row for the timeline
(:class:`WatchSteps`: each watched example's Δlog π of its class, split into the gradient terms by
class of the batch example, the momentum and weight-decay terms and the residual), keeps the last
``history`` steps' details (the batch and its per-example contributions, A, K_P and G of the
largest contributor) for :class:`WatchDetailRequest`, and adds everything into a ``RunAccount``
(per training example, over the whole run) for :class:`WatchRankingRequest`. Qt-free.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ntkviz.app.messages import Event
from ntkviz.app.state import Example
from ntkviz.arrays import readonly

#: Steps whose details (batch, contributions, top contributor's K) are kept for clicking.
HISTORY = 2000
MAX_WATCHED = 16


@dataclass(frozen=True, eq=False)
class WatchSteps:
    """Timeline rows of T steps for W watched examples, each on its class (nats):
    ``by_class (T, W, C)`` the gradient terms summed per class of batch example,
    ``momentum``, ``weight_decay``, ``statistics`` (the exact change from batch norm's running
    statistics), ``residual``, ``actual`` (Δlog π of the class) and ``log_prob`` (log π of the
    class before the step), each ``(T, W)``; ``steps (T,)``."""

    steps: np.ndarray
    by_class: np.ndarray
    momentum: np.ndarray
    weight_decay: np.ndarray
    statistics: np.ndarray
    residual: np.ndarray
    actual: np.ndarray
    log_prob: np.ndarray


@dataclass(frozen=True, eq=False)
class WatchDetail:
    """One step of the run: its batch (``batch_indices (B,)`` into the training split,
    ``batch_labels (B,)``), each batch example's contribution to each watched example's class
    ``contributions (W, B)``, and per watched example the largest contributor ``top_index (W,)``
    (a position in the batch) with ``top_G (W, V)`` and ``probs_before (W, V)`` (A = I − 1·πᵀ);
    for the focused examples (``has_kernel (W,)``) also ``top_kernel`` = K_P(x_o, x_top) (NaN for
    the others): the top term is −(step_scale/B)·A·K_P·G."""

    step: int
    lr: float
    step_scale: float
    optimizer: str
    batch_indices: np.ndarray
    batch_labels: np.ndarray
    contributions: np.ndarray
    top_index: np.ndarray
    top_kernel: np.ndarray
    top_G: np.ndarray
    probs_before: np.ndarray
    has_kernel: np.ndarray

    def top_term(self, w: int) -> np.ndarray:
        """The top contributor's Δlog π term on watched example ``w``, ``(V,)`` (NaN unless
        ``w`` was focused)."""
        p = self.probs_before[w]
        A = np.eye(len(p)) - p[None, :]
        B = len(self.batch_indices)
        return -(self.step_scale / B) * A @ self.top_kernel[w] @ self.top_G[w]


@dataclass(frozen=True, eq=False)
class WatchRanking:
    """Over the run so far, per watched example: the training examples that raised
    (``helpful``) and lowered (``harmful``) log π of its class most, ``(k,)`` indices into the
    training split with their summed contributions; ``by_class (W, C, V)`` the summed gradient
    terms by class of training example and output class; ``steps`` accounted."""

    examples: tuple
    classes: tuple
    helpful: tuple
    helpful_values: tuple
    harmful: tuple
    harmful_values: tuple
    by_class: np.ndarray
    steps: int


@dataclass
class WatchObserver:
    """Watches ``examples`` (at most :data:`MAX_WATCHED`), each on its class (default: its
    label), during the engine's training runs: a class-level account of every step for each, and
    the full one (with the top contributor's K_P) for the ``focus`` positions. Built on the GUI
    thread, used on the engine's."""

    examples: tuple
    focus: tuple = (0,)
    classes: tuple = ()
    history: int = HISTORY
    run: object = field(default=None, repr=False)  # the RunAccount of the current run
    details: deque = field(default_factory=deque, repr=False)
    accounted: int = 0
    continued: bool = False  # the current run carries the last run's account on

    def __post_init__(self):
        if not 0 < len(self.examples) <= MAX_WATCHED:
            raise ValueError(f"watch 1 to {MAX_WATCHED} examples, got {len(self.examples)}")

    def train_kwargs(self, engine, previous: WatchObserver | None = None) -> dict:
        """Start watching a run: the ``watch`` argument of ``train``. ``previous``: the last
        run's observer when this run trains on from its last step; its account, timeline details
        and step count are carried on (:attr:`continued`) when it watched the same examples on
        the same classes, and a new account begins otherwise."""
        import torch

        from ntkviz.accounting import Watch

        classes = self.classes or tuple(engine.data.split(e.split).y[e.index].item()
                                        for e in self.examples)  # fmt: skip
        self.classes = tuple(int(c) for c in classes)
        x = torch.stack([engine.x(e) for e in self.examples])
        self.continued = (
            previous is not None
            and previous.run is not None
            and (previous.examples, previous.classes) == (self.examples, self.classes)
        )
        if self.continued:
            self.run, self.details, self.accounted = (
                previous.run,
                previous.details,
                previous.accounted,
            )
            continued_at = {"step": engine.step, "optimizer": engine.config.optimizer}
            self.run.meta.setdefault("continued_at", []).append(continued_at)
        else:
            from ntkviz import __version__

            self._new_account(len(engine.data.train), len(engine.data.classes), {
                "watched": [[e.split, e.index] for e in self.examples],
                "watch_labels": list(self.classes),
                "classes": "the watched examples' labels",
                "class_names": list(engine.data.classes),
                "model": engine.model_name, "dataset": engine.data.name,
                "seed": engine.config.seed, "optimizer": engine.config.optimizer,
                "config": engine.config.to_dict(), "started_at": engine.step,
                "ntkviz_version": __version__,
            })  # fmt: skip
        return {"watch": Watch(x, self.classes, focus=tuple(self.focus))}

    def _new_account(self, num_train: int, num_classes: int, meta: dict) -> None:
        """An empty run account (with its timeline) and no step details."""
        from ntkviz.run_account import RunAccount

        self.run = RunAccount(self.classes, num_train, num_classes, keep_steps=True, meta=meta)
        self.details = deque(maxlen=self.history)
        self.accounted = 0

    def restart(self, engine) -> list:
        """Begin the account again (steps by hand moved the model between two of the run's
        steps: the sums would skip them); a "watch_restarted" event with the step it starts
        from."""
        if self.run is None:
            return []
        meta = {**self.run.meta, "restarted_at": engine.step}
        self._new_account(self.run.num_train, self.run.num_classes, meta)
        return [Event("watch_restarted", engine.step)]

    def observe(self, engine, records) -> list:
        """Account for the records of one engine tick; their timeline rows as one event."""
        accounted = [r for r in records if r.account is not None]
        if not accounted:
            return []
        C, W = len(engine.data.classes), len(self.examples)
        terms = ("momentum", "weight_decay", "statistics", "residual", "actual")
        rows = {k: [] for k in ("by_class", *terms)}
        rows["log_prob"] = []
        w = np.arange(W)
        cls = np.asarray(self.classes)
        for r in accounted:
            a = r.account
            self.run.add(a, r.batch_indices, r.step)
            self.accounted += 1
            by_class = np.zeros((W, C))
            for b, label in enumerate(a.batch_labels):
                by_class[:, label] += a.contributions[:, b]
            rows["by_class"].append(by_class)
            for name in terms:
                rows[name].append(getattr(a, f"class_{name}"))
            rows["log_prob"].append(a.log_probs_before[w, cls])
            self.details.append(self._detail(r, a))
        steps = WatchSteps(
            readonly(np.array([r.step for r in accounted], dtype=np.int64)),
            **{k: readonly(np.stack(v)) for k, v in rows.items()},
        )
        return [Event("watch_steps", steps)]

    @staticmethod
    def _detail(record, a) -> WatchDetail:
        """A step's details: the top contributor of every watched example, with K_P for the
        focused ones."""
        W, V = a.probs_before.shape
        top = np.argmax(np.abs(a.contributions), axis=1)
        kernels = np.full((W, V, V), np.nan)
        has = np.zeros(W, bool)
        if a.focused is not None:
            for k, w in enumerate(a.focus):
                top[w] = a.focused.top_index[k]
                kernels[w], has[w] = a.focused.top_kernel[k], True
        return WatchDetail(
            record.step, float(a.lr), float(a.step_scale), a.optimizer,
            readonly(record.batch_indices), a.batch_labels, a.contributions, readonly(top),
            readonly(kernels), readonly(a.G[top]), a.probs_before, readonly(has),
        )  # fmt: skip


def _observer(engine) -> WatchObserver:
    observer = engine.run_observers.get("watch")
    if observer is None or observer.run is None:
        raise ValueError("nothing watched yet: choose examples to watch, then start a run")
    return observer


@dataclass(frozen=True)
class WatchDetailRequest:
    """Job: the details of training step ``step`` (one of the last :data:`HISTORY`)."""

    step: int

    def run(self, engine):
        yield from ()
        observer = _observer(engine)
        for detail in reversed(observer.details):
            if detail.step == self.step:
                return detail
        kept = [d.step for d in observer.details]
        span = f"steps {kept[0]}–{kept[-1]}" if kept else "none yet"
        raise ValueError(
            f"step {self.step} is not among the steps this run's account keeps in detail ({span}; "
            f"the last {observer.history}): a step of an earlier run, or an older one"
        )


@dataclass(frozen=True)
class WatchRankingRequest:
    """Job: the ``k`` most helpful and harmful training examples of the run so far."""

    k: int = 12

    def run(self, engine):
        yield from ()
        o = _observer(engine)
        rankings = [o.run.top(w, self.k) for w in range(len(o.examples))]
        return WatchRanking(
            tuple(o.examples), tuple(o.classes),
            tuple(r.helpful for r in rankings), tuple(r.helpful_values for r in rankings),
            tuple(r.harmful for r in rankings), tuple(r.harmful_values for r in rankings),
            readonly(o.run.by_class), o.accounted,
        )  # fmt: skip


@dataclass(frozen=True)
class SaveAccounts:
    """Job: write the run's accounts (timeline, sums, rankings) to ``path`` (.npz or .csv)."""

    path: str

    def run(self, engine):
        yield from ()
        return str(_observer(engine).run.save(self.path))


def default_watch(dataset, x_o: Example) -> tuple[Example, ...]:
    """x_o and the first test example of every other class (at most :data:`MAX_WATCHED`)."""
    labels = dataset.labels["test"]
    chosen = [x_o]
    for c in range(len(dataset.classes)):
        if len(chosen) >= MAX_WATCHED:
            break
        hits = np.flatnonzero(labels == c)
        if len(hits) and c != dataset.label(x_o.split, x_o.index):
            chosen.append(Example("test", int(hits[0])))
    return tuple(chosen)
