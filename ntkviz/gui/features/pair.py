"""The pair view (feature "pair"): Δlog π(x_o) = −η·A·K·G as a formula of heatmaps, and the
step-through panel (η, Apply, Undo, Reset, the next step's predicted-vs-actual bars — they
follow η and the pair as they change —, the trajectory over applied steps)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ntkviz.app.features.pair import describe_steps
from ntkviz.app.state import STEP_KINDS
from ntkviz.arrays import norm
from ntkviz.gui.export import DATA_FORMATS, export_decomposition_data
from ntkviz.gui.features.base import Action, FeatureView
from ntkviz.gui.plots import (
    DecompositionView,
    PreviewBars,
    TrajectoryPlot,
    elide,
    relative_residual_text,
)
from ntkviz.gui.widgets import PaintQueue, double_spin, fit_text


class StepPanel(QWidget):
    """η (spin box and log-scale slider), Apply / Undo / Reset, the predicted-vs-actual bars of
    the next step and the trajectory of π(x_o) over applied steps. ``lr_changed`` fires on user
    edits."""

    lr_changed = Signal(float)

    SLIDER_SCALE = 20  # slider ticks per decade

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lr = double_spin(1e-6, 100.0, 6, 0.001)
        self.lr.setValue(0.01)
        self.lr.setKeyboardTracking(False)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(-6 * self.SLIDER_SCALE, 2 * self.SLIDER_SCALE)
        self.slider.setToolTip("η on a log scale, 1e-6 … 100")
        self.apply_button = QPushButton("Apply step")
        self.apply_button.setToolTip(
            "one real plain-SGD step on (x_u, y_u) — Space, from anywhere but a text field"
        )
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip(
            "restore the parameters before the last applied step — Ctrl+Z, from anywhere but a "
            "text field"
        )
        self.reset_button = QPushButton("Reset")
        self.reset_button.setToolTip("return to the model before the first applied step")
        fit_text(self.apply_button, self.undo_button, self.reset_button)
        self.step_box = QComboBox()
        for key, text in STEP_KINDS:
            self.step_box.addItem(text, key)
        self.step_box.setToolTip(
            "plain SGD: −η·A·K·G; this run's optimizer: its real next step (momentum or Adam "
            "state), with K_P and the momentum and weight-decay terms"
        )
        self.log_box = QCheckBox("log π")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)  # a long line must not widen the window
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary.setToolTip(
            "residual = actual − predicted is the O(η²) remainder: halving η roughly quarters it"
        )
        row = QHBoxLayout()
        row.addWidget(self.step_box)
        row.addWidget(QLabel("η"))
        row.addWidget(self.lr)
        row.addWidget(self.slider, 1)
        for w in (self.apply_button, self.undo_button, self.reset_button):
            row.addWidget(w)
        row.addWidget(self.log_box)
        self.preview = PreviewBars()
        self.trajectory = TrajectoryPlot()
        plots = QHBoxLayout()
        plots.addWidget(self.preview, 1)
        plots.addWidget(self.trajectory, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(row)
        lay.addWidget(self.summary)
        lay.addLayout(plots, 1)
        self.lr.valueChanged.connect(self._spin_changed)
        self.slider.valueChanged.connect(self._slider_changed)
        self.log_box.toggled.connect(self.trajectory.set_log)
        self.show_lr(self.lr.value())

    def show_lr(self, value: float) -> None:
        """Show η = ``value`` without emitting ``lr_changed``."""
        for w in (self.lr, self.slider):
            w.blockSignals(True)
        self.lr.setValue(value)
        self.slider.setValue(round(math.log10(max(value, 1e-6)) * self.SLIDER_SCALE))
        for w in (self.lr, self.slider):
            w.blockSignals(False)

    def _spin_changed(self, value: float) -> None:
        self.show_lr(value)
        self.lr_changed.emit(value)

    def _slider_changed(self, ticks: int) -> None:
        self.lr.setValue(float(f"{10 ** (ticks / self.SLIDER_SCALE):.3g}"))  # → _spin_changed

    def set_decomposition(self, dec) -> None:
        term = getattr(dec, "gradient_term", None)
        if term is None:
            self.preview.set_values(dec.predicted, dec.actual)
        else:
            history = (dec.momentum, dec.weight_decay, dec.statistics)
            self.preview.set_values(term, dec.actual, history)
        self.summary.setText(
            f"‖predicted‖ = {norm(dec.predicted):.4g}   ‖actual‖ = "
            f"{norm(dec.actual):.4g}   ‖residual‖ = {norm(dec.residual):.3g}"
            f"   relative residual = {relative_residual_text(dec)}"
        )


class PairView(FeatureView):
    """The decomposition of the current pair above the step-through panel."""

    name = "pair"
    title = "Decomposition"
    placement = "center"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.decomposition_view = DecompositionView()
        self.step_panel = sp = StepPanel()
        self.splitter = QSplitter(Qt.Vertical)
        self.splitter.setObjectName("centralSplitter")
        self.splitter.addWidget(self.decomposition_view)
        self.splitter.addWidget(sp)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 2)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.splitter)
        self.paints = PaintQueue(self)
        self.last_result = None  #: the DecompositionResult on screen
        self.shown_generation = -1  #: the request generation of ``last_result``
        self.last_history = None  #: the StepHistory on screen
        self.shown_history_generation = -1
        c = self.controller
        sp.lr_changed.connect(lambda value: setattr(self.state, "lr", float(value)))
        sp.apply_button.clicked.connect(c.apply_step)
        sp.undo_button.clicked.connect(c.undo_step)
        sp.reset_button.clicked.connect(c.reset_steps)
        self.state.events.lr.connect(sp.show_lr)
        self.state.events.dataset.connect(self._on_dataset)
        sp.step_box.currentIndexChanged.connect(self._step_kind_chosen)
        self.state.events.step_kind.connect(self._show_step_kind)
        self.state.events.model.connect(self._show_step_kind)
        self._run_lr = None  # the run's η that η last followed
        self.state.events.model.connect(self._follow_run_lr)
        self.state.events.model.connect(lambda info: sp.setEnabled(info is not None))
        sp.setEnabled(False)
        c.on("pair", self._on_pair)
        c.on("history", self._on_history)

    def _on_dataset(self, info) -> None:
        self.decomposition_view.classes = tuple(info.classes)
        self.step_panel.preview.classes = tuple(info.classes)
        self.step_panel.trajectory.classes = tuple(info.classes)

    def _step_kind_chosen(self, i: int) -> None:
        """The user's choice of step; the run's optimizer steps with the run's η at first."""
        self.state.step_kind = self.step_panel.step_box.itemData(i)
        self._run_lr = None
        self._follow_run_lr(self.state.model)

    def _follow_run_lr(self, info) -> None:
        """With the run's optimizer chosen, η becomes the run's learning rate whenever that
        changes (a new run, Continue with another rate); η set by hand stays until then."""
        if self.state.step_kind != "optimizer" or info is None or not math.isfinite(info.run_lr):
            return
        if info.run_lr != self._run_lr:
            self._run_lr = info.run_lr
            self.state.lr = info.run_lr

    def _show_step_kind(self, *args) -> None:
        box, info = self.step_panel.step_box, self.state.model
        box.blockSignals(True)
        box.setCurrentIndex(max(0, box.findData(self.state.step_kind)))
        box.blockSignals(False)
        if info is not None:
            box.setItemData(1, f"the run's optimizer: {info.optimizer}", Qt.ToolTipRole)

    def plots(self):
        return {
            "Decomposition": lambda: self.decomposition_view.ci,
            "Predicted vs actual": lambda: self.step_panel.preview.getPlotItem(),
            "Trajectory": lambda: self.step_panel.trajectory.getPlotItem(),
        }

    def actions(self):
        c = self.controller
        return [
            Action("File", "Export &data…", self._export_data_dialog, "Ctrl+Shift+E"),
            Action("Step", "&Apply step", c.apply_step, Qt.Key_Space),
            Action("Step", "&Undo step", c.undo_step, QKeySequence.Undo),
            Action("Step", "&Reset steps", c.reset_steps),
            Action("View", "&Recompute decomposition", c.refresh, "F5"),
        ]

    def save_settings(self, settings) -> None:
        settings.setValue("splitter", self.splitter.saveState())

    def restore_settings(self, settings) -> None:
        state = settings.value("splitter")
        if state is not None:
            self.splitter.restoreState(state)
        else:
            self.splitter.setSizes([560, 380])

    # ------------------------------------------------------------------ results
    def _on_pair(self, event) -> None:
        if event.kind == "error":  # reported by the controller; no stale numbers stay shown
            self.show_failure(event.payload[1])
        if event.kind != "result":
            return
        result = event.payload
        dec, view = result.decomposition, self.decomposition_view
        if self.state.dataset is None:
            return
        classes = self.state.dataset.classes
        # Paint one piece at a time (the decomposition view in three), returning to the event
        # loop in between: the whole set at once is one repaint of ~40-60 ms.
        mixed = self.state.model is not None and self.state.model.mode_dependent
        updates = view.update_steps(dec, classes, self.caption(result), mixed)
        steps = [(view, step) for step in updates]
        steps.append((self.step_panel.preview, lambda: self.step_panel.set_decomposition(dec)))

        def shown():
            self.last_result, self.shown_generation = result, event.generation
            self.ctx.shown("pair", result)

        steps.append((None, shown))
        self.paints.put(steps, "pair")

    def show_failure(self, message: str) -> None:
        """The request could not be decomposed: blank the factors, the bars and the summary, and
        say why where the numbers were."""
        view = self.decomposition_view
        self.paints.clear("pair")  # the pair's own updates (a newer history's stay)
        for heatmap in view.heatmaps.values():
            heatmap.clear_matrix()
        view.info.setText(f"Not computed: {message}", size="11pt")
        self.step_panel.preview.set_values(np.zeros(0), np.zeros(0))
        self.step_panel.summary.setText("")
        self.last_result = None

    def _on_history(self, event) -> None:
        if event.kind != "result":
            return
        history, trajectory = event.payload, self.step_panel.trajectory
        r = history.request
        others = [p for p in history.pairs if not r.same_update(p)]
        note = describe_steps(others, r, self.state.dataset.classes) if others else ""

        def shown():
            self.last_history, self.shown_history_generation = history, event.generation
            self.ctx.shown("history", history)

        update = (trajectory, lambda: trajectory.set_history(history, note))
        self.paints.put([update, (None, shown)])

    def caption(self, result) -> str:
        r, c = result.request, [elide(name, 16) for name in self.state.dataset.classes]
        steps = describe_steps(result.applied_pairs, r, c)
        return (
            f"x<sub>u</sub> = {r.x_u} (label {c[self.state.label(r.x_u)]})  ·  "
            f"x<sub>o</sub> = {r.x_o} (label {c[self.state.label(r.x_o)]})  ·  "
            f"{result.model_name}, step {result.step}{', ' + steps if steps else ''}"
        )

    # ------------------------------------------------------------------ export
    def export_meta(self) -> dict:
        """Metadata of the shown decomposition for exports."""
        from ntkviz import __version__

        result, d = self.last_result, self.state.dataset
        r, c = result.request, d.classes

        def example(ref):  # classes as ints, as the CLI writes them; their names in "classes"
            return {"split": ref.split, "index": ref.index, "label": self.state.label(ref)}

        return {
            "x_u": example(r.x_u), "x_o": example(r.x_o), "y_u": r.y_u, "lr": r.lr,
            "loss": r.loss, "model": result.model_name, "training_step": result.step,
            "applied_steps": result.applied_steps, "seed": result.seed, "dataset": d.name,
            "classes": list(c), "ntkviz_version": __version__,
        }  # fmt: skip

    def _export_data_dialog(self) -> None:
        filters = ";;".join(f"{s[1:].upper()} (*{s})" for s in DATA_FORMATS)
        if path := self.ctx.ask_path("Export data", filters):
            self.ctx.attempt("Export failed", lambda: self.export_data(path), f"wrote {path}")

    def export_data(self, path: str) -> Path:
        """Write the shown decomposition's numbers to ``path`` (.csv, .npz, .json)."""
        if self.last_result is None:
            raise ValueError("no decomposition has been computed yet")
        return export_decomposition_data(self.last_result.decomposition, path, self.export_meta())
