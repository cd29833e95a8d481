"""Class×class kernel maps recorded over training (feature "kernel_maps"): mean ‖K(x, x')‖_F
between the classes of a balanced probe set of the test split, and how stable their ranking is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from psygnal import Signal

from ntkviz.app.jobs import Progress
from ntkviz.arrays import readonly


@dataclass(frozen=True, eq=False)
class KernelMapRecord:
    """One map ``(C, C)`` at training step ``step`` on ``per_class`` examples of each class."""

    step: int
    per_class: int
    map: np.ndarray


@dataclass(frozen=True)
class KernelMapRequest:
    """Job: record one map on ``per_class`` test examples of each class."""

    per_class: int = 20

    def run(self, engine):
        from ntkviz.analysis import balanced_indices, iter_class_kernel_map

        s = engine.data.split("test")
        idx = balanced_indices(s.y, self.per_class)
        step = engine.step
        x = s.x[idx].to(engine.device)
        labels = s.y[idx].numpy()
        for item in iter_class_kernel_map(engine.model, x, labels, len(engine.data.classes)):
            if isinstance(item, tuple):
                yield Progress(*item)
            else:
                return KernelMapRecord(step, self.per_class, readonly(item))


@dataclass(frozen=True, eq=False)
class KernelMaps:
    """The maps recorded so far: ``steps (T,)``, ``maps (T, C, C)``, and ``correlations (T,)``,
    the Spearman rank correlation of each map's class pairs with the latest map's."""

    steps: np.ndarray
    maps: np.ndarray
    correlations: np.ndarray
    per_class: int

    @classmethod
    def of(cls, records: list[KernelMapRecord], per_class: int, num_classes: int) -> KernelMaps:
        from ntkviz.analysis import rank_correlation

        C = num_classes
        maps = np.stack([r.map for r in records]) if records else np.zeros((0, C, C))
        corr = [rank_correlation(m, maps[-1]) for m in maps]
        steps = np.array([r.step for r in records], dtype=np.int64)
        return cls(readonly(steps), readonly(maps), readonly(np.array(corr, float)), per_class)


class KernelMapHistory:
    """The maps recorded in the current run on ``per_class`` examples of each class (maps of
    another ``per_class`` are not comparable and are refused); ``changed`` fires on change."""

    changed = Signal()

    def __init__(self, per_class: int = 20):
        self.per_class = per_class
        self.records: list[KernelMapRecord] = []

    def add(self, record: KernelMapRecord) -> None:
        if record.per_class == self.per_class:
            self.records.append(record)
            self.changed.emit()

    def clear(self, per_class: int | None = None) -> None:
        self.per_class = self.per_class if per_class is None else per_class
        self.records.clear()
        self.changed.emit()

    def maps(self, num_classes: int) -> KernelMaps:
        return KernelMaps.of(self.records, self.per_class, num_classes)

    def to_dict(self) -> dict:
        return {
            "per_class": self.per_class,
            "maps": [(r.step, r.map.tolist()) for r in self.records],
        }

    def restore(self, part: dict) -> None:
        self.per_class = int(part["per_class"])
        self.records = [
            KernelMapRecord(int(step), self.per_class, readonly(np.asarray(m, dtype=np.float64)))
            for step, m in part["maps"]
        ]
        self.changed.emit()
