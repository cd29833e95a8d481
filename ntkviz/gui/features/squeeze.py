"""The squeezing tab (feature "squeeze"): S negative-gradient steps on (x_u, ȳ) beside S
positive ones; π before and after (linear or log), the guaranteed moves checked per step, the η
sweep and the survey of the squeezed mass over test images."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLabel

from ntkviz.app.features.squeeze import SURVEY_SIZE, SqueezeRequest
from ntkviz.gui.features.base import ProbeView
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import let_wrap, model_step, plain_numbers, set_class_axis, wrap_title
from ntkviz.gui.widgets import labelled, spin

RUN = "Run to compare"


class SqueezeView(ProbeView):
    """The squeezing lab: negative against positive steps on x_u."""

    name = "squeeze"
    marks_stale = True
    title = "Squeezing"
    tooltip = "Squeezing effect"
    run_text = "Run"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.classes = tuple(str(i) for i in range(10))
        self.label_box = QComboBox()
        self.label_box.addItems([str(i) for i in range(10)])
        self.state.events.dataset.connect(self._on_dataset)
        self.steps_box = spin(1, 100, 5)
        self.lr_box = QDoubleSpinBox()
        self.lr_box.setDecimals(4)
        self.lr_box.setRange(1e-4, 10.0)
        self.lr_box.setSingleStep(0.05)
        self.lr_box.setValue(0.05)  # small: the first-order guarantees hold step by step
        self.log_box = QCheckBox("log scale")
        self.add_controls(
            labelled("x = x_u, ȳ", self.label_box), labelled("steps S", self.steps_box),
            labelled("η", self.lr_box), self.log_box,
        )  # fmt: skip
        self.finish_controls()
        self.caption = let_wrap(self.graphics.addLabel(RUN, 0, 0, 1, 3))
        self.run_plots, self.curves, self.marks = {}, {}, {}
        for col, (key, title, color) in enumerate(
            (("neg", "negative gradient on ȳ", "#d62728"),
             ("ce", "positive gradient (learn ȳ)", "#2ca02c"))
        ):  # fmt: skip
            # the legend is in the title: inside the plot it would cover the marks
            p = self.graphics.addPlot(1, col, title=(
                f"{title}<br><span style='color:#7f7f7f'>━</span> before  "
                f"<span style='color:{color}'>━</span> after S steps"
            ))  # fmt: skip
            wrap_title(p)
            plain_numbers(p)  # π reads 0.8, not 800 with "(x0.001)" by the axis
            p.setLabel("bottom", "class")
            p.setMenuEnabled(False)
            before = p.plot(stepMode="center", pen=pg.mkPen("#7f7f7f", width=2), fillLevel=None)
            after = p.plot(stepMode="center", pen=pg.mkPen(color, width=2.5))
            self.run_plots[key], self.curves[key] = p, (before, after)
            self.marks[key] = []
            p.getViewBox().sigResized.connect(self._resized)  # the marks' spans follow the width
        self.sweep_plot = self.graphics.addPlot(
            1, 2, title="squeezed mass against η (one negative step)"
        )  # fmt: skip
        for col, plot in enumerate((*self.run_plots.values(), self.sweep_plot)):
            plot.setPreferredWidth(100)  # the columns share the width evenly
            self.graphics.ci.layout.setColumnStretchFactor(col, 1)
        wrap_title(self.sweep_plot)
        self.sweep_plot.setLogMode(x=True, y=False)
        self.sweep_plot.setLabel("bottom", "η")
        self.sweep_plot.setLabel("left", "π gain of the top other class")
        plain_numbers(self.sweep_plot)
        self.sweep_curve = self.sweep_plot.plot(
            pen=pg.mkPen("#9467bd", width=2), symbol="o", symbolSize=7, symbolBrush="#9467bd"
        )
        self.survey_plots, self.survey_points = {}, {}
        survey_row = self.graphics.addLayout(2, 0, colspan=3)
        for col, (key, xlabel) in enumerate(
            (("peak", "max π before (how peaked π is)"), ("p_label", "π(ȳ) before"))
        ):
            p = survey_row.addPlot(0, col, title=self._survey_title(key, SURVEY_SIZE))
            plain_numbers(p)
            wrap_title(p)
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
        self.log_box.toggled.connect(self.redraw)
        self.state.events.y_u.connect(lambda y: self.label_box.setCurrentIndex(y))  # ȳ = y_u

    @staticmethod
    def _survey_title(key: str, n: int) -> str:
        what = "max π before" if key == "peak" else "π(ȳ) before"
        return f"squeezed mass against {what}<br>over {n} test images, ȳ = each one's label"

    def _on_dataset(self, info) -> None:
        self.label_box.blockSignals(True)
        self.label_box.clear()
        self.label_box.addItems(list(info.classes))
        self.label_box.setCurrentIndex(min(self.state.y_u, len(info.classes) - 1))  # ȳ = y_u
        self.label_box.blockSignals(False)
        n = min(SURVEY_SIZE, len(info.labels["test"]))
        for key, p in self.survey_plots.items():
            p.setTitle(self._survey_title(key, n))
        for p in self.run_plots.values():
            set_class_axis(p, info.classes)

    def plots(self):
        return {"Squeezing": lambda: self.graphics.ci}

    def request(self) -> SqueezeRequest:
        return SqueezeRequest(
            self.state.x_u, self.label_box.currentIndex(), float(self.lr_box.value()),
            self.steps_box.value(),
        )  # fmt: skip

    def show_result(self, result) -> None:
        self.classes = self.state.dataset.classes
        self.redraw()

    def clear(self) -> None:
        for key, p in self.run_plots.items():
            for curve in self.curves[key]:
                curve.setData([], [])
            for item in self.marks[key]:
                p.removeItem(item)
            self.marks[key] = []
        self.sweep_curve.setData([], [])
        for points in self.survey_points.values():
            points.setData([], [])
        self.checks.setText("")
        self.caption.setText(RUN, size="11pt")

    def _resized(self) -> None:
        if self.result is not None:
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
            p = self.run_plots[key]
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
            shown = run.probs[[0, -1]]
            p.setXRange(-0.5, len(c) - 0.5, padding=0.02)  # now, for the marks' widths
            _leave_room_for_marks(p, shown, log)
            placed = []  # (span, y) of each mark: a second one over the same bars stacks on it
            for cls, text, color in (
                (r.y, f"ȳ {'↓' if run.probs[-1, r.y] < run.probs[0, r.y] else '↑'}", "#d62728"),
                (top, f"top other {'↑' if run.probs[-1, top] > run.probs[0, top] else '↓'}",
                 "#2ca02c"),
            ):  # fmt: skip
                # centred over its class; towards the middle at the edges (else cut off there)
                side = 0.0 if cls < 2 else 1.0 if cls >= len(c) - 2 else 0.5
                label = pg.TextItem(text, color=color)
                # a label is wider than a bar: above the bars it spans, not only its own
                width = _classes_wide(p, label)
                span = (cls - width * side, cls + width * (1 - side))
                first, last = max(0, math.floor(span[0])), min(len(c) - 1, math.ceil(span[1]))
                y = shown[:, first : last + 1].max()
                # above those bars (the plot leaves room for two lines); a second label over
                # the same bars a line above the first
                under = [y0 for (a, b), y0 in placed if a <= span[1] and span[0] <= b]
                y = max([y, *under])
                placed.append((span, y))
                label.setAnchor((side, 2.0 if under else 1.0))
                label.setPos(cls, np.log10(max(y, 1e-300)) if log else y)
                p.addItem(label)
                self.marks[key].append(label)
            if key == "neg":
                marks = " ".join(
                    f"{k + 1}:{'✓' if f else '✗'}{'✓' if t else '✗'}"
                    for k, (f, t) in enumerate(zip(run.label_fell, run.top_rose, strict=True))
                )
                lines.append(
                    "<b>negative gradient</b>, guaranteed moves per step (π(ȳ) fell, the most "
                    f"likely other class at that step rose): {marks}  →  π(ȳ) fell at every step: "
                    f"{'✓' if held_y else '✗'}, the top other rose at every step: "
                    f"{'✓' if held_top else '✗'}"
                )
            else:
                lines.append(
                    f"<b>positive gradient</b>: π(ȳ) {run.probs[0, r.y]:.3g} → "
                    f"{run.probs[-1, r.y]:.3g}"
                )
        gap = 1 - r.neg.probs[0, r.y]
        if r.saturated and gap > 0:
            lines.append(
                f"<span style='color:#b05000'>π(ȳ) = 1 − {gap:.1e}: in float32 it is 1.0 and these "
                "moves are below its resolution, so this lab computes in float64. A less confident "
                "x (e.g. Most confidently wrong) shows larger ones.</span>"
            )
        elif r.saturated:
            lines.append(
                "<span style='color:#b05000'>π(ȳ) = 1 even in float64: no step can move it by a "
                "visible amount, so the guaranteed moves cannot show (✗). A less confident x "
                "(e.g. Most confidently wrong) shows them.</span>"
            )
        if r.left_out:  # sweep points or survey images whose step diverged
            lines.append(
                f"<span style='color:#b05000'>{r.left_out[0].upper()}{r.left_out[1:]}.</span>"
            )
        self.checks.setText("<br>".join(lines))
        self.sweep_curve.setData(r.sweep_lrs, r.sweep_mass)
        for key, points in self.survey_points.items():
            points.setData(getattr(r.survey, key), r.survey.gained)
        self.caption.setText(
            f"x = {r.x}, ȳ = {c[r.y]}, S = {len(r.neg.probs) - 1} steps of "
            f"η = {r.neg.lr:.3g}  ·  {model_step(r)}",
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


def _classes_wide(plot, label) -> float:
    """How many bars (classes, one unit of x each) of ``plot`` the text ``label`` covers: its
    width in pixels over a bar's (2 before the plot has a width)."""
    vb = plot.getViewBox()
    low, high = vb.viewRange()[0]
    pixels = vb.width()
    return label.boundingRect().width() * (high - low) / pixels if pixels > 0 else 2.0


#: The marks' text height in pixels (one line), and the lines the plot leaves room for above
#: its bars (a mark and one stacked over it).
MARK_LINE, MARK_LINES = 22, 2


def _leave_room_for_marks(plot, shown: np.ndarray, log: bool) -> None:
    """Set ``plot``'s y range to ``shown`` (π before and after) with room above the highest bar
    for :data:`MARK_LINES` lines of marks (log10 units on a log scale)."""
    height = plot.getViewBox().height()
    room = (MARK_LINES * MARK_LINE + 6) / height if height > 4 * MARK_LINE else 0.25
    if log:
        lo, hi = np.log10(np.maximum([shown.min(), shown.max()], 1e-300))
        lo -= 0.05 * max(hi - lo, 1e-3)
    else:
        lo, hi = 0.0, float(shown.max())
    plot.setYRange(lo, lo + (hi - lo) / (1 - room), padding=0)
