"""Training runs as the user sees them (feature "training"): the curves of the current run and
its progress. The run itself belongs to the engine (``start``, ``pause``, ``resume``, ``stop``,
``one_batch``); records arrive as "records" events."""

from __future__ import annotations

import math

from psygnal import Signal


class RunCurves:
    """Loss per step (raw and smoothed by an exponential moving average ``ema``) and test
    accuracy of the current run, as plain lists; ``changed`` fires after each change."""

    changed = Signal()

    def __init__(self, ema: float = 0.95):
        self.ema = ema
        self.clear(emit=False)

    def clear(self, emit: bool = True) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.acc_steps: list[int] = []
        self.accuracies: list[float] = []
        self.total_steps = 0  #: of the current run (0: unknown)
        if emit:
            self.changed.emit()

    def add(self, records) -> None:
        """Append the core's ``TrainRecord`` s."""
        for r in records:
            self.steps.append(r.step)
            self._add_loss(r.loss)
            if r.test_accuracy is not None:
                self.acc_steps.append(r.step)
                self.accuracies.append(r.test_accuracy)
            self.total_steps = r.total_steps
        self.changed.emit()

    def _add_loss(self, value: float) -> None:
        self.losses.append(value)
        prev = self.smoothed[-1] if self.smoothed else value
        self.smoothed.append(self.ema * prev + (1 - self.ema) * value)

    def to_dict(self) -> dict[str, list[float]]:
        return {
            "step": [float(s) for s in self.steps],
            "loss": list(self.losses),
            "acc_step": [float(s) for s in self.acc_steps],
            "accuracy": list(self.accuracies),
        }

    def restore(self, curves: dict) -> None:
        """Replace everything by ``curves`` (as :meth:`to_dict` returns)."""
        self.clear(emit=False)
        self.steps[:] = [int(s) for s in curves.get("step", [])]
        for v in curves.get("loss", []):
            self._add_loss(float(v))
        self.acc_steps[:] = [int(s) for s in curves.get("acc_step", [])]
        self.accuracies[:] = [float(v) for v in curves.get("accuracy", [])]
        self.total_steps = self.steps[-1] if self.steps else 0
        self.changed.emit()


class RunProgress:
    """Step, total and estimated time left of the current run, from the records' arrival
    times (no estimate in the first half second)."""

    def __init__(self):
        self.reset()
        self.step, self.total = 0, 0

    def reset(self) -> None:
        self._start: tuple[float, int] | None = None

    def update(self, records, now: float) -> tuple[int, int, float | None]:
        last = records[-1]
        if self._start is None:
            self._start = (now, last.step - len(records))
        t0, s0 = self._start
        rate = (last.step - s0) / max(now - t0, 1e-9)
        eta = (last.total_steps - last.step) / rate if rate > 0 and now - t0 > 0.5 else None
        self.step, self.total = last.step, last.total_steps
        return last.step, last.total_steps, eta if eta is None or math.isfinite(eta) else None
