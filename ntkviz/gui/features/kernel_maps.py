"""The kernel-map tab (feature "kernel_maps"): mean ‖K‖_F between classes on a balanced probe
set, recorded at the start of a run and every N steps, with a time slider and the rank
correlation of each map with the latest."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QCheckBox, QLabel, QSlider

from ntkviz.app.features.kernel_maps import KernelMapHistory, KernelMapRequest
from ntkviz.gui.features.base import ProbeView
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import HeatmapView, nice_ceiling, wrap_title
from ntkviz.gui.widgets import labelled, spin

SEQUENTIAL = pg.colormap.get("viridis")
PROBE_IMAGES = 100  #: images in a recorded map by default (per class: this over the classes)
#: Maps estimated to take longer than this (s) are not recorded while training unless asked:
#: the run would wait for each.
MAP_SECONDS = 5.0


def map_seconds(path: str, pair_cost: float, n: int) -> float:
    """A map of ``n`` images, estimated from one pair's measured cost: a structured model sweeps
    each image once (a pair is two sweeps; the block products at most as much again), a generic
    one computes every pair."""
    pairs = n if path == "structured" else n * (n + 1) / 2
    return pairs * pair_cost


class KernelMapView(ProbeView):
    """Recording settings, Record now, the map at the slider's step and the correlations."""

    name = "kernel_maps"
    title = "Kernel maps"
    tooltip = "Kernel map over training"
    run_text = "Record now"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.history = KernelMapHistory()
        self.maps = None  #: the KernelMaps shown
        self.classes = tuple(str(i) for i in range(10))
        self.record_box = QCheckBox("record kernel maps while training")
        self.record_box.setChecked(True)
        self.record_box.setToolTip("at the start of each run and every N steps")
        self.every_box = spin(1, 1_000_000, 200, 50)
        self.per_class_box = spin(2, 1000, 10, 5)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setMinimumWidth(200)
        self.slider_label = QLabel("no maps yet")
        self.add_controls(
            labelled(self.record_box, "every", self.every_box, "steps,"),
            labelled(self.per_class_box, "per class"), self.slider, self.slider_label,
        )  # fmt: skip
        self.finish_controls()
        self.heatmap = HeatmapView(
            "mean ‖K(x, x')‖<sub>F</sub> between classes", self._describe, "class of x",
            "class of x'", colormap=SEQUENTIAL,
        )  # fmt: skip
        self.heatmap.colorbar.setLevels((0.0, 1.0))  # a sequential map: from 0
        self.graphics.addItem(self.heatmap, 0, 0)
        self.corr_plot = self.graphics.addPlot(
            0, 1, title="Spearman rank correlation of the class<br>pairs with the latest map"
        )
        self.corr_plot.setLabel("bottom", "training step")
        self.corr_plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.corr_plot.setRange(xRange=(0, 1), yRange=(-0.05, 1.05))
        wrap_title(self.corr_plot)
        self.corr_curve = self.corr_plot.plot(
            pen=pg.mkPen("#1f77b4", width=2), symbol="o", symbolSize=6, symbolBrush="#1f77b4"
        )
        self.corr_marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#d62728", width=1))
        self.corr_plot.addItem(self.corr_marker)
        self.graphics.ci.layout.setColumnStretchFactor(0, 3)
        self.graphics.ci.layout.setColumnStretchFactor(1, 2)
        self.record_box.toggled.connect(self._record_toggled)
        self.every_box.valueChanged.connect(self._settings_changed)
        self.per_class_box.valueChanged.connect(self._settings_changed)
        self.slider.valueChanged.connect(self.redraw)
        self.history.changed.connect(self._history_changed)
        self.state.events.dataset.connect(self._on_dataset)
        self.controller.on("kernel_path", self._on_kernel_path)
        self._cost = None  #: (kernel path, one pair's cost in s) of the model held
        self._switched_off = False  #: recording was switched off here, not by the user
        self.controller.on("new_run", lambda event: self.history.clear())
        self._configure(supersede=True)

    def _on_kernel_path(self, event) -> None:
        """A model whose maps would hold training up has its recording switched off (with a
        note); a later, faster one has it switched back on, unless the user chose."""
        k, info = event.payload, self.state.model
        if info is None or k.number != info.number:
            return
        self._cost = (k.description.split(" ")[0], k.pair_cost)
        slow = self.estimate() > MAP_SECONDS
        if slow == self.record_box.isChecked() and (slow or self._switched_off):
            self.record_box.blockSignals(True)
            self.record_box.setChecked(not slow)
            self.record_box.blockSignals(False)
            self._switched_off = slow
            self._configure(supersede=False)
        self.redraw()

    def estimate(self) -> float:
        """Seconds one map of the current probe set is estimated to take (0 if not measured)."""
        if self._cost is None or not math.isfinite(self._cost[1]):
            return 0.0
        n = self.per_class_box.value() * len(self.classes)
        return map_seconds(self._cost[0], self._cost[1], n)

    def _on_dataset(self, info) -> None:
        """About :data:`PROBE_IMAGES` images in all, whatever the number of classes; maps of
        other data are forgotten."""
        self.classes = info.classes
        self.per_class_box.setValue(max(2, PROBE_IMAGES // len(info.classes)))
        self.history.clear(self.per_class_box.value())

    def plots(self):
        return {"Kernel map": lambda: self.graphics.ci}

    def session_state(self) -> dict:
        return {
            **self.history.to_dict(),
            "record": self.record_box.isChecked(),
            "every": self.every_box.value(),
        }

    def restore_session(self, part: dict) -> None:
        for box in (self.record_box, self.every_box, self.per_class_box):
            box.blockSignals(True)
        self.record_box.setChecked(bool(part.get("record", self.record_box.isChecked())))
        self.every_box.setValue(int(part.get("every", self.every_box.value())))
        self.per_class_box.setValue(int(part["per_class"]))
        for box in (self.record_box, self.every_box, self.per_class_box):
            box.blockSignals(False)
        self.history.restore(part)
        self._configure(supersede=True)

    # ------------------------------------------------------------------ recording
    def request(self) -> KernelMapRequest:
        return KernelMapRequest(self.per_class_box.value())

    def run(self) -> None:
        """Record one map now (periodic recording goes on: its results stay current)."""
        if self.controller.ready:
            self.job.set_running(True)
            self.controller.submit(self.name, self.request(), supersede=False)

    def _record_toggled(self) -> None:
        self._switched_off = False  # the user's choice from now on
        self._settings_changed()

    def _settings_changed(self) -> None:
        per_class = self.per_class_box.value()
        new_probe_set = per_class != self.history.per_class
        if new_probe_set:
            self.history.clear(per_class)
        self._configure(supersede=new_probe_set)

    def _configure(self, supersede: bool) -> None:
        if supersede and self.job.running:  # a map of the old probe set: its answer is dropped
            self.controller.cancel(self.name)
            self.job.set_running(False)
        request = self.request() if self.record_box.isChecked() else None
        self.controller.set_periodic(
            self.name, request, self.every_box.value(), supersede=supersede
        )

    def show_result(self, record) -> None:
        self.history.add(record)

    def clear(self) -> None:
        self.history.clear()

    def _history_changed(self) -> None:
        dataset = self.state.dataset
        if dataset is not None:
            self.classes = dataset.classes
        self.set_maps(self.history.maps(len(self.classes)))

    def set_maps(self, maps) -> None:
        """Show ``maps`` (a ``KernelMaps``), the latest first."""
        self.maps = maps
        n = len(maps.steps)
        self.slider.blockSignals(True)
        self.slider.setRange(0, max(0, n - 1))
        self.slider.setValue(max(0, n - 1))
        self.slider.blockSignals(False)
        self.corr_curve.setData(maps.steps.astype(float), maps.correlations)
        last = float(maps.steps[-1]) if n else 1.0
        self.corr_plot.setXRange(0, max(last, 1.0), padding=0.05)
        self.redraw()
        self.ctx.shown("kernel_map_history", maps)

    @property
    def current(self) -> int:
        return self.slider.value()

    def redraw(self) -> None:
        m = self.maps
        if m is None or not len(m.steps):
            off = self._switched_off
            self.slider_label.setText(
                f"no maps yet: ≈ {self.estimate():.0f} s a map here" if off else "no maps yet"
            )
            self.slider_label.setToolTip(
                f"Recording while training is off: a map of {self.per_class_box.value()} images "
                f"a class takes about {self.estimate():.0f} s on this model, and training would "
                "wait for each. Record now makes one; tick the box to record anyway."
                if off
                else ""
            )
            self.heatmap.clear_matrix(self.classes)
            return
        k = self.current
        top = nice_ceiling(float(m.maps.max()))  # one colour scale for every map, round top
        self.heatmap.set_matrix(m.maps[k], self.classes, levels=(0.0, top))
        self.slider_label.setText(
            f"map {k + 1}/{len(m.steps)} · step {int(m.steps[k])} · ρ = {m.correlations[k]:.3f}"
        )
        self.heatmap.titleLabel.setText(
            f"mean ‖K(x, x')‖<sub>F</sub> between classes<br>at step {int(m.steps[k])}, "
            f"{m.per_class} examples per class",
            size="11pt",
        )
        self.corr_marker.setPos(float(m.steps[k]))

    def _describe(self, i: int, j: int) -> str:
        m, c = self.maps, self.classes
        if m is None or not len(m.steps):
            return ""
        return f"classes {c[i]}, {c[j]}: mean ‖K‖_F = {m.maps[self.current][i, j]:.4g}"

    def data(self) -> dict[str, np.ndarray]:
        m = self.maps
        if m is None or not len(m.steps):
            return {}
        return {"steps": m.steps, "correlations": m.correlations, "maps": m.maps}

    def export_meta(self) -> dict:
        """The base metadata and which test images the maps are over."""
        meta = super().export_meta()
        if self.maps is not None:
            meta["per_class"] = self.maps.per_class
            meta["probe"] = (
                f"{self.maps.per_class} test images of each class: "
                "ntkviz.analysis.balanced_indices(test labels, per_class, seed=0)"
            )
        return meta
