"""Views beyond one pair (issue 4): influence over a probe set, class×class kernel maps over
training, the squeezing-effect lab, and where the influence lives (layers, spectrum).

Each view only shows immutable results of the :class:`~ntkviz.gui.worker.TrainingWorker` and asks
for new ones through its signals; each can export its figure (PNG, SVG) and numbers (CSV, NPZ).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ntkviz.gui.export import ask_save_path, export_graphics
from ntkviz.gui.panels import digit_pixmap
from ntkviz.gui.plots import HeatmapView

SEQUENTIAL = pg.colormap.get("viridis")
VIEW_DATA_FORMATS = (".csv", ".npz")


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write named arrays atomically: ``.npz`` (all of them) or ``.csv`` (one section per array,
    ``# name shape`` then its rows)."""
    from ntkviz.checkpoint import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    if suffix == ".npz":

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        return atomic_write(path, write)
    if suffix == ".csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for name, a in arrays.items():
            w.writerow([f"# {name}", *a.shape])
            for row in np.atleast_2d(a) if a.ndim <= 2 else a.reshape(a.shape[0], -1):
                w.writerow([repr(float(v)) if a.dtype.kind == "f" else v for v in row])
        data = buf.getvalue().encode()
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    raise ValueError(f"unknown data format {path.suffix!r}; use .csv or .npz")


class ProbeView(QWidget):
    """Common frame: a control row, a pyqtgraph layout ``graphics`` and an Export button."""

    export_failed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.classes: tuple[str, ...] = tuple(str(i) for i in range(10))
        self.controls = QHBoxLayout()
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("w")
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("figure (PNG, SVG) or numbers (CSV, NPZ)")
        self.export_button.clicked.connect(self._export_dialog)
        self.layout_ = QVBoxLayout(self)
        self.layout_.setContentsMargins(4, 4, 4, 4)
        self.layout_.addLayout(self.controls)
        self.layout_.addWidget(self.graphics, 1)

    def finish_controls(self) -> None:
        self.controls.addStretch(1)
        self.controls.addWidget(self.export_button)

    def data(self) -> dict[str, np.ndarray]:
        """The shown numbers (for CSV/NPZ export)."""
        return {}

    def export(self, path: str | Path, width: int = 1600) -> Path:
        """Figure (.png, .svg) or numbers (.csv, .npz) by suffix; raises OSError/ValueError."""
        suffix = Path(path).suffix.lower()
        if suffix in VIEW_DATA_FORMATS:
            data = self.data()
            if not data:
                raise ValueError("nothing computed yet")
            return write_arrays(path, data)
        return export_graphics(self.graphics.ci, path, width)

    def _export_dialog(self) -> None:
        path = ask_save_path(self, "Export", "PNG (*.png);;SVG (*.svg);;CSV (*.csv);;NPZ (*.npz)")
        if path:
            try:
                self.export(path)
            except (OSError, ValueError) as e:
                self.export_failed.emit(str(e))


def _spin(lo: int, hi: int, value: int, step: int = 1) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(value)
    box.setSingleStep(step)
    return box


# ----------------------------------------------------------------------------- influence
class InfluenceView(ProbeView):
    """Influence of the selected update over a probe set of the test split: class×class mean
    Δπ heatmap, most raised / most lowered x_o as clickable thumbnails, and ‖K(x_o, x_u)‖_F per
    class of x_o."""

    compute_requested = Signal()
    cancel_requested = Signal()
    thumbnail_clicked = Signal(str, int)  # split, index

    QUANTITIES = (
        ("delta_probs", "mean Δπ (predicted)"),
        ("delta_log_probs", "mean Δlog π (predicted)"),
        ("delta_probs_actual", "mean Δπ (actual step)"),
    )
    THUMBS = 10

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.result = None
        self.images = None
        self.size_box = QComboBox()
        for n in (1000, 10000, 200):
            self.size_box.addItem(f"{n} test examples", n)
        self.size_box.setCurrentIndex(1)
        self.actual_box = QCheckBox("actual change")
        self.actual_box.setToolTip("also take the real step and measure the change")
        self.norm_box = _spin(0, 10000, 1000, 100)
        self.norm_box.setToolTip("‖K(x_o, x_u)‖_F on this many probe examples (0: off; slower)")
        self.quantity_box = QComboBox()
        for key, text in self.QUANTITIES:
            self.quantity_box.addItem(text, key)
        self.rank_box = QComboBox()
        self.rank_box.addItem("y_u", -1)
        for i in range(10):
            self.rank_box.addItem(str(i), i)
        self.rank_box.setToolTip("rank x_o by the predicted Δlog π of this output class")
        self.compute_button = QPushButton("Compute")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(180)
        for w in (
            QLabel("probe"), self.size_box, self.actual_box, QLabel("‖K‖ on"), self.norm_box,
            QLabel("show"), self.quantity_box, QLabel("rank by"), self.rank_box,
            self.compute_button, self.cancel_button, self.progress,
        ):  # fmt: skip
            self.controls.addWidget(w)
        self.finish_controls()
        self.caption = self.graphics.addLabel("Compute to see one update's effect", 0, 0, 1, 2)
        self.heatmap = HeatmapView(
            "mean Δπ per true class of x<sub>o</sub>", self._describe, "true class of x_o",
            "output class",
        )  # fmt: skip
        self.graphics.addItem(self.heatmap, 1, 0)
        self.norm_plot = self.graphics.addPlot(1, 1, title="‖K(x<sub>o</sub>, x<sub>u</sub>)‖_F")
        self.norm_plot.setLabel("bottom", "true class of x_o")
        self.norm_plot.getAxis("bottom").setTicks([[(i, str(i)) for i in range(10)]])
        self.norm_plot.setMenuEnabled(False)
        self.norm_bars = pg.BarGraphItem(x=[], height=[], width=0.6, brush="#9ecae1")
        self.norm_err = pg.ErrorBarItem(x=np.zeros(0), y=np.zeros(0), height=np.zeros(0))
        self.norm_strip = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(30, 30, 30, 70))
        for item in (self.norm_bars, self.norm_err, self.norm_strip):
            self.norm_plot.addItem(item)
        self.graphics.ci.layout.setColumnStretchFactor(0, 3)
        self.graphics.ci.layout.setColumnStretchFactor(1, 2)
        self.norm_means = np.zeros(0)
        self.norm_stds = np.zeros(0)
        thumbs = QGridLayout()
        self.raised_buttons, self.lowered_buttons = [], []
        for row, (text, buttons) in enumerate(
            (("most raised", self.raised_buttons), ("most lowered", self.lowered_buttons))
        ):
            self_label = QLabel(text)
            self_label.setMinimumWidth(90)
            thumbs.addWidget(self_label, row, 0)
            for k in range(self.THUMBS):
                b = QToolButton()
                b.setIconSize(QSize(48, 48))
                b.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
                b.setEnabled(False)
                b.clicked.connect(lambda checked=False, b=b: self._thumb(b))
                buttons.append(b)
                thumbs.addWidget(b, row, k + 1)
        thumbs.setColumnStretch(self.THUMBS + 1, 1)
        self.layout_.addLayout(thumbs)
        self.compute_button.clicked.connect(self.compute_requested)
        self.cancel_button.clicked.connect(self.cancel_requested)
        self.quantity_box.currentIndexChanged.connect(self.redraw)
        self.rank_box.currentIndexChanged.connect(self.redraw)

    @property
    def probe_size(self) -> int:
        return int(self.size_box.currentData())

    def set_probe_size(self, n: int) -> None:
        i = self.size_box.findData(n)
        if i < 0:
            self.size_box.addItem(f"{n} test examples", n)
            i = self.size_box.count() - 1
        self.size_box.setCurrentIndex(i)

    def set_running(self, running: bool) -> None:
        self.compute_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if not running:
            self.progress.setValue(0)

    def set_progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    def _thumb(self, button) -> None:
        index = button.property("index")
        if index is not None and index >= 0:
            self.thumbnail_clicked.emit("test", int(index))

    def quantity(self) -> str:
        key = self.quantity_box.currentData()
        if self.result is not None and key not in self.result.classes:
            return "delta_probs"
        return key

    def rank_class(self) -> int:
        c = self.rank_box.currentData()
        return self.result.request.y_u if c is None or c < 0 else int(c)

    def set_result(self, result, images: dict, classes) -> None:
        """``result``: a worker ``InfluenceResult``; ``images``: the dataset's images by split."""
        self.result, self.images, self.classes = result, images, tuple(classes)
        self.redraw()

    def redraw(self) -> None:
        r = self.result
        if r is None:
            return
        c, key = self.classes, self.quantity()
        self.heatmap.set_matrix(r.classes[key], c)
        title = dict(self.QUANTITIES)[key]
        self.heatmap.titleLabel.setText(f"{title} per true class of x<sub>o</sub>", size="11pt")
        q = r.request
        kind = "learn" if q.loss == "ce" else "negative gradient on"
        self.caption.setText(
            f"update: x<sub>u</sub> = {q.split_u}[{q.index_u}], {kind} y<sub>u</sub> = "
            f"{c[q.y_u]}, η = {q.lr:.3g}  ·  {len(r.indices)} test examples  ·  step {r.step}",
            size="11pt",
        )
        col = self.rank_class()
        score = r.influence.predicted[:, col]
        order = np.argsort(score, kind="stable")
        for buttons, picks in ((self.raised_buttons, order[::-1]), (self.lowered_buttons, order)):
            for b, k in zip(buttons, picks[: len(buttons)], strict=False):
                idx = int(r.indices[k])
                b.setIcon(QIcon(digit_pixmap(self.images["test"][idx], 48)))
                b.setText(f"{c[int(r.labels[k])]}: {score[k]:+.2g}")
                b.setToolTip(
                    f"test[{idx}], label {c[int(r.labels[k])]}: predicted Δlog π_{c[col]} = "
                    f"{score[k]:+.4g}; click to make it x_o"
                )
                b.setProperty("index", idx)
                b.setEnabled(True)
        self._draw_norms()

    def _draw_norms(self) -> None:
        r = self.result
        if r.kernel_norm is None:
            self.norm_means = self.norm_stds = np.zeros(0)
            self.norm_bars.setOpts(x=[], height=[])
            self.norm_err.setData(x=np.zeros(0), y=np.zeros(0), height=np.zeros(0))
            self.norm_strip.setData([], [])
            self.norm_plot.setTitle("‖K(x<sub>o</sub>, x<sub>u</sub>)‖_F: off")
            return
        C = len(self.classes)
        labels, norms = r.norm_labels, r.kernel_norm
        means = np.array(
            [norms[labels == k].mean() if (labels == k).any() else 0 for k in range(C)]
        )
        stds = np.array([norms[labels == k].std() if (labels == k).any() else 0 for k in range(C)])
        self.norm_means, self.norm_stds = means, stds
        x = np.arange(C)
        brushes = [pg.mkBrush("#fdae6b" if k == r.request.y_u else "#9ecae1") for k in x]
        self.norm_bars.setOpts(x=x, height=means, brushes=brushes)
        self.norm_err.setData(x=x, y=means, height=2 * stds, beam=0.25)
        jitter = np.random.default_rng(0).uniform(-0.22, 0.22, len(norms))
        self.norm_strip.setData(labels + jitter, norms)
        self.norm_plot.setTitle(
            f"‖K(x<sub>o</sub>, x<sub>u</sub>)‖<sub>F</sub> per class (mean ± std, "
            f"{len(norms)} x<sub>o</sub>)"
        )

    def _describe(self, i: int, j: int) -> str:
        r, c = self.result, self.classes
        if r is None:
            return ""
        v = r.classes[self.quantity()][i, j]
        n = int(r.classes["count"][i])
        return f"true class {c[i]} (n = {n}), output {c[j]}: {self.quantity_box.currentText()} = {v:.4g}"

    def data(self) -> dict[str, np.ndarray]:
        r = self.result
        if r is None:
            return {}
        out = {f"class_{k}": v for k, v in r.classes.items()}
        out.update(
            indices=r.indices, labels=r.labels, predicted=r.influence.predicted,
            probs_before=r.influence.probs_before, actual=r.influence.actual,
            norm_indices=r.norm_indices, kernel_norm=r.kernel_norm,
        )  # fmt: skip
        return out


# ---------------------------------------------------------------------------- kernel map
class KernelMapView(ProbeView):
    """Mean ‖K‖_F between classes on a balanced probe set, recorded over training, with a time
    slider and the rank correlation of each map with the latest."""

    settings_changed = Signal(bool, int, int)  # record, every, per class
    record_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.maps = None
        self.record_box = QCheckBox("record kernel maps while training")
        self.every_box = _spin(1, 1_000_000, 200, 50)
        self.per_class_box = _spin(2, 1000, 20, 5)
        self.record_button = QPushButton("Record now")
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.setMinimumWidth(200)
        self.slider_label = QLabel("no maps yet")
        for w in (
            self.record_box, QLabel("every"), self.every_box, QLabel("steps,"),
            self.per_class_box, QLabel("per class"), self.record_button, self.slider,
            self.slider_label,
        ):  # fmt: skip
            self.controls.addWidget(w)
        self.finish_controls()
        self.heatmap = HeatmapView(
            "mean ‖K(x, x')‖<sub>F</sub> between classes", self._describe, "class of x",
            "class of x'", colormap=SEQUENTIAL,
        )  # fmt: skip
        self.graphics.addItem(self.heatmap, 0, 0)
        self.corr_plot = self.graphics.addPlot(
            0, 1, title="Spearman rank correlation of class pairs with the latest map"
        )
        self.corr_plot.setLabel("bottom", "training step")
        self.corr_plot.setYRange(-0.05, 1.05)
        self.corr_curve = self.corr_plot.plot(
            pen=pg.mkPen("#1f77b4", width=2), symbol="o", symbolSize=6, symbolBrush="#1f77b4"
        )
        self.corr_marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#d62728", width=1))
        self.corr_plot.addItem(self.corr_marker)
        self.graphics.ci.layout.setColumnStretchFactor(0, 3)
        self.graphics.ci.layout.setColumnStretchFactor(1, 2)
        for w in (self.record_box, self.every_box, self.per_class_box):
            signal = w.toggled if w is self.record_box else w.valueChanged
            signal.connect(self._emit_settings)
        self.record_button.clicked.connect(self.record_requested)
        self.slider.valueChanged.connect(self.redraw)

    def _emit_settings(self) -> None:
        self.settings_changed.emit(
            self.record_box.isChecked(), self.every_box.value(), self.per_class_box.value()
        )

    def set_maps(self, maps, classes=None) -> None:
        """``maps``: a worker ``KernelMaps``; shows the latest."""
        if classes is not None:
            self.classes = tuple(classes)
        self.maps = maps
        n = len(maps.steps)
        self.slider.blockSignals(True)
        self.slider.setRange(0, max(0, n - 1))
        self.slider.setValue(max(0, n - 1))
        self.slider.blockSignals(False)
        self.corr_curve.setData(maps.steps.astype(float), maps.correlations)
        self.redraw()

    @property
    def current(self) -> int:
        return self.slider.value()

    def redraw(self) -> None:
        m = self.maps
        if m is None or not len(m.steps):
            self.slider_label.setText("no maps yet")
            self.heatmap.image_item.clear()
            return
        k = self.current
        top = float(m.maps.max()) or 1.0
        self.heatmap.set_matrix(m.maps[k], self.classes, levels=(0.0, top))
        self.slider_label.setText(
            f"map {k + 1}/{len(m.steps)} · step {int(m.steps[k])} · ρ = {m.correlations[k]:.3f}"
        )
        self.heatmap.titleLabel.setText(
            f"mean ‖K(x, x')‖<sub>F</sub> between classes at step {int(m.steps[k])} "
            f"({m.per_class} per class)",
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


# -------------------------------------------------------------------------------- squeeze
class SqueezeView(ProbeView):
    """The squeezing effect: S negative-gradient steps on (x_u, ȳ) beside S positive ones; π
    before/after (linear or log), the guaranteed moves checked per step, and the η sweep."""

    run_requested = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.result = None
        self.label_box = QComboBox()
        self.label_box.addItems([str(i) for i in range(10)])
        self.steps_box = _spin(1, 100, 5)
        self.lr_box = QDoubleSpinBox()
        self.lr_box.setDecimals(4)
        self.lr_box.setRange(1e-4, 10.0)
        self.lr_box.setSingleStep(0.05)
        self.lr_box.setValue(0.5)
        self.log_box = QCheckBox("log scale")
        self.run_button = QPushButton("Run")
        for w in (
            QLabel("x = x_u, ȳ"), self.label_box, QLabel("steps S"), self.steps_box,
            QLabel("η"), self.lr_box, self.log_box, self.run_button,
        ):  # fmt: skip
            self.controls.addWidget(w)
        self.finish_controls()
        self.caption = self.graphics.addLabel("Run to compare", 0, 0, 1, 3)
        self.plots, self.curves, self.marks = {}, {}, {}
        for col, (key, title) in enumerate(
            (("neg", "negative gradient on ȳ"), ("ce", "positive gradient (learn ȳ)"))
        ):
            p = self.graphics.addPlot(1, col, title=title)
            p.setLabel("bottom", "class")
            p.getAxis("bottom").setTicks([[(i, str(i)) for i in range(10)]])
            p.addLegend(offset=(-5, -5), labelTextSize="8pt")
            p.setMenuEnabled(False)
            before = p.plot(
                stepMode="center", pen=pg.mkPen("#7f7f7f", width=2), fillLevel=None,
                name="before",
            )  # fmt: skip
            color = "#d62728" if key == "neg" else "#2ca02c"
            after = p.plot(stepMode="center", pen=pg.mkPen(color, width=2.5), name="after S steps")
            self.plots[key], self.curves[key] = p, (before, after)
            self.marks[key] = []
        self.sweep_plot = self.graphics.addPlot(
            1, 2, title="squeezed mass: π gain of the top other class after one negative step"
        )
        self.sweep_plot.setLogMode(x=True, y=False)
        self.sweep_plot.setLabel("bottom", "η")
        self.sweep_plot.getAxis("bottom").enableAutoSIPrefix(False)
        self.sweep_curve = self.sweep_plot.plot(
            pen=pg.mkPen("#9467bd", width=2), symbol="o", symbolSize=7, symbolBrush="#9467bd"
        )
        self.survey_plots, self.survey_points = {}, {}
        survey_row = self.graphics.addLayout(2, 0, colspan=3)
        for col, (key, xlabel) in enumerate(
            (("peak", "max π before (how peaked π is)"), ("p_label", "π(ȳ) before"))
        ):
            p = survey_row.addPlot(
                0, col, title="squeezed mass over test images (ȳ = each one's label)"
            )
            p.getAxis("left").enableAutoSIPrefix(False)
            p.setLabel("bottom", xlabel)
            p.setLabel("left", "π gain of the top other class")
            p.setMenuEnabled(False)
            points = pg.ScatterPlotItem(size=5, pen=None, brush=pg.mkBrush(148, 103, 189, 140))
            p.addItem(points)
            self.survey_plots[key], self.survey_points[key] = p, points
        self.graphics.ci.layout.setRowStretchFactor(1, 3)
        self.graphics.ci.layout.setRowStretchFactor(2, 2)
        self.checks = QLabel("")
        self.checks.setWordWrap(True)
        self.layout_.addWidget(self.checks)
        self.run_button.clicked.connect(self.run_requested)
        self.log_box.toggled.connect(self.redraw)

    def set_result(self, result, classes=None) -> None:
        """``result``: a worker ``SqueezeResult``."""
        if classes is not None:
            self.classes = tuple(classes)
        self.result = result
        self.redraw()

    def redraw(self) -> None:
        r = self.result
        if r is None:
            return
        log = self.log_box.isChecked()
        c = self.classes
        lines = []
        for key in ("neg", "ce"):
            run = getattr(r, key)
            p = self.plots[key]
            p.setLogMode(x=False, y=log)
            p.setLabel("left", "π (log scale)" if log else "π")
            edges = np.arange(len(run.probs[0]) + 1) - 0.5
            before, after = self.curves[key]
            before.setData(edges, run.probs[0])
            after.setData(edges, run.probs[-1])
            for item in self.marks[key]:
                p.removeItem(item)
            self.marks[key] = []
            p0 = run.probs[0].copy()
            p0[r.y] = -np.inf
            top = int(p0.argmax())
            held_y, held_top = bool(run.label_fell.all()), bool(run.top_rose.all())
            for cls, text, color in (
                (r.y, f"ȳ {'↓' if run.probs[-1, r.y] < run.probs[0, r.y] else '↑'}", "#d62728"),
                (top, f"top other {'↑' if run.probs[-1, top] > run.probs[0, top] else '↓'}",
                 "#2ca02c"),
            ):  # fmt: skip
                y = max(run.probs[0, cls], run.probs[-1, cls])
                label = pg.TextItem(text, color=color, anchor=(0.5, 1.0))
                label.setPos(cls, np.log10(max(y, 1e-300)) if log else y)
                p.addItem(label)
                self.marks[key].append(label)
            if key == "neg":
                marks = " ".join(
                    f"{k + 1}:{'✓' if f else '✗'}{'✓' if t else '✗'}"
                    for k, (f, t) in enumerate(zip(run.label_fell, run.top_rose, strict=True))
                )
                lines.append(
                    f"<b>negative gradient</b>, guaranteed moves per step (π(ȳ) fell, top other "
                    f"class {c[top]} rose): {marks}  →  π(ȳ) fell at every step: "
                    f"{'✓' if held_y else '✗'}, top rose at every step: "
                    f"{'✓' if held_top else '✗'}"
                )
            else:
                lines.append(
                    f"<b>positive gradient</b>: π(ȳ) {run.probs[0, r.y]:.3g} → "
                    f"{run.probs[-1, r.y]:.3g}"
                )
        self.checks.setText("<br>".join(lines))
        self.sweep_curve.setData(r.sweep_lrs, r.sweep_mass)
        for key, points in self.survey_points.items():
            points.setData(getattr(r.survey, key), r.survey.gained)
        self.caption.setText(
            f"x = {r.split}[{r.index}], ȳ = {c[r.y]}, S = {len(r.neg.probs) - 1} steps of "
            f"η = {r.neg.lr:.3g}  ·  training step {r.step}",
            size="11pt",
        )

    def data(self) -> dict[str, np.ndarray]:
        r = self.result
        if r is None:
            return {}
        return {
            "neg_probs": r.neg.probs, "neg_label_fell": r.neg.label_fell,
            "neg_top_rose": r.neg.top_rose, "ce_probs": r.ce.probs,
            "sweep_lrs": r.sweep_lrs, "sweep_mass": r.sweep_mass,
            "survey_indices": r.survey_indices, "survey_peak": r.survey.peak,
            "survey_p_label": r.survey.p_label, "survey_gained": r.survey.gained,
        }  # fmt: skip


# --------------------------------------------------------------------------------- layers
class LayersView(ProbeView):
    """‖K_layer(x_o, x_u)‖_F per parameter group for the selected pair, and the NTK spectrum of a
    probe set on a log scale (earlier spectra stay as faded curves)."""

    layers_requested = Signal()
    spectrum_requested = Signal(int)  # probe size
    MAX_SPECTRA = 8

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.layers = None
        self.spectra: list = []
        self.layers_button = QPushButton("Split K for the selected pair")
        self.n_box = _spin(10, 500, 50, 10)
        self.spectrum_button = QPushButton("Compute spectrum")
        self.clear_button = QPushButton("Clear old spectra")
        for w in (
            self.layers_button, QLabel("spectrum of N ="), self.n_box, self.spectrum_button,
            self.clear_button,
        ):  # fmt: skip
            self.controls.addWidget(w)
        self.finish_controls()
        self.bar_plot = self.graphics.addPlot(0, 0, title="‖K<sub>layer</sub>(x<sub>o</sub>, "
                                              "x<sub>u</sub>)‖<sub>F</sub>")  # fmt: skip
        self.bar_plot.setMenuEnabled(False)
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.6, brush="#4c72b0")
        self.bar_plot.addItem(self.bars)
        self.total_line = pg.InfiniteLine(angle=0, pen=pg.mkPen("#d62728", style=Qt.DashLine))
        self.bar_plot.addItem(self.total_line)
        self.total_label = pg.TextItem("", color="#d62728", anchor=(0, 1))
        self.bar_plot.addItem(self.total_label)
        self.spec_plot = self.graphics.addPlot(0, 1, title="NTK spectrum (Gram matrix eigenvalues)")
        self.spec_plot.setLogMode(x=False, y=True)
        self.spec_plot.setLabel("bottom", "rank")
        self.spec_plot.setLabel("left", "eigenvalue")
        self.spec_plot.addLegend(offset=(-5, 5), labelTextSize="8pt")
        self.spec_curves: list = []
        self.layers_button.clicked.connect(self.layers_requested)
        self.spectrum_button.clicked.connect(
            lambda: self.spectrum_requested.emit(self.n_box.value())
        )
        self.clear_button.clicked.connect(self.clear_spectra)

    def set_layers(self, result, classes=None) -> None:
        """``result``: a worker ``LayerResult``."""
        self.layers = result
        x = np.arange(len(result.names))
        self.bars.setOpts(x=x, height=result.norms)
        self.bar_plot.getAxis("bottom").setTicks([list(zip(x, result.names, strict=True))])
        self.total_line.setPos(result.total_norm)
        self.total_label.setText(f"‖K‖_F (all layers) = {result.total_norm:.3g}")
        self.total_label.setPos(-0.4, result.total_norm)
        r = result.request
        self.bar_plot.setTitle(
            f"‖K<sub>layer</sub>‖<sub>F</sub>: x<sub>o</sub> = {r.split_o}[{r.index_o}], "
            f"x<sub>u</sub> = {r.split_u}[{r.index_u}], step {result.step}"
        )
        self.bar_plot.setYRange(0, max(result.total_norm, float(result.norms.max())) * 1.12)

    def set_spectrum(self, result) -> None:
        """``result``: a worker ``SpectrumResult``; earlier ones fade."""
        self.spectra.append(result)
        self.spectra = self.spectra[-self.MAX_SPECTRA :]
        self._draw_spectra()

    def clear_spectra(self) -> None:
        self.spectra = self.spectra[-1:]
        self._draw_spectra()

    def _draw_spectra(self) -> None:
        for c in self.spec_curves:
            self.spec_plot.removeItem(c)
        self.spec_curves = []
        legend = self.spec_plot.legend
        if legend is not None:
            legend.clear()
        n = len(self.spectra)
        for k, s in enumerate(self.spectra):
            eig = np.clip(s.eigenvalues, 1e-12, None)
            latest = k == n - 1
            alpha = 255 if latest else int(60 + 120 * k / max(n - 1, 1))
            pen = pg.mkPen((31, 119, 180, alpha) if latest else (120, 120, 120, alpha),
                           width=2.5 if latest else 1.5)  # fmt: skip
            curve = self.spec_plot.plot(np.arange(1, len(eig) + 1), eig, pen=pen,
                                        name=f"step {s.step} (N = {len(s.indices)})")  # fmt: skip
            self.spec_curves.append(curve)

    def data(self) -> dict[str, np.ndarray]:
        out = {}
        if self.layers is not None:
            out["layer_norms"] = self.layers.norms
            for name, block in self.layers.blocks.items():
                out[f"K_{name}"] = block
        for k, s in enumerate(self.spectra):
            out[f"spectrum_{k}_step{s.step}"] = s.eigenvalues
        return out
