"""The influence tab (feature "influence"): one update's effect over a probe set of the test
split — class×class mean Δπ, the most raised / lowered x_o (clickable), ‖K(x_o, x_u)‖_F per
class."""

from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QCheckBox, QComboBox

from ntkviz.app.features.influence import InfluenceRequest
from ntkviz.app.state import Example
from ntkviz.gui.features.base import ProbeView
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import (
    HeatmapView,
    bar_pen,
    elide,
    let_wrap,
    model_step,
    plain_numbers,
    set_class_axis,
    wrap_title,
)
from ntkviz.gui.widgets import THUMB_NAME, ThumbnailRow, labelled, spin

QUANTITIES = (
    ("delta_probs", "mean Δπ (predicted)"),
    ("delta_log_probs", "mean Δlog π (predicted)"),
    ("delta_probs_actual", "mean Δπ (actual step)"),
)
THUMBS = 8
NORM_BAR, NORM_BAR_Y_U = "#9ecae1", "#fdae6b"  # ‖K‖ bars: y_u's class in orange
COMPUTE = "Compute to see one update's effect"


#: Probe sizes offered (test examples), each cut to the data's test split.
PROBE_SIZES = (200, 1000, 10000)


class InfluenceView(ProbeView):
    """The class map, the thumbnails and the kernel norms of one update."""

    name = "influence"
    marks_stale = True
    title = "Influence"
    tooltip = "Influence over a probe set"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.classes = tuple(str(i) for i in range(10))
        self.size_box = QComboBox()
        self.test_size = max(PROBE_SIZES)
        self._fill_sizes(max(PROBE_SIZES))
        self.actual_box = QCheckBox("actual change")
        self.actual_box.setToolTip("also take the real step and measure the change")
        self.norm_box = spin(0, 10000, 1000, 100)
        self.norm_box.setToolTip("‖K(x_o, x_u)‖_F on this many probe examples (0: off; slower)")
        self.quantity_box = QComboBox()
        for key, text in QUANTITIES:
            self.quantity_box.addItem(text, key)
        self.rank_box = QComboBox()
        self.rank_box.addItem("y_u", -1)
        self.rank_box.setToolTip("rank x_o by the predicted Δlog π of this output class")
        self.add_controls(
            labelled("probe", self.size_box), self.actual_box, labelled("‖K‖ on", self.norm_box),
            labelled("show", self.quantity_box), labelled("rank by", self.rank_box),
        )  # fmt: skip
        self.finish_controls()
        g = self.graphics
        self.caption = let_wrap(g.addLabel(COMPUTE, 0, 0, 1, 2))
        self.heatmap = HeatmapView(
            "mean Δπ per true class of x<sub>o</sub>", self._describe, "true class of x<sub>o</sub>",
            "output class",
        )  # fmt: skip
        g.addItem(self.heatmap, 1, 0)
        self.norm_plot = g.addPlot(1, 1, title="‖K(x<sub>o</sub>, x<sub>u</sub>)‖<sub>F</sub>")
        wrap_title(self.norm_plot)
        self.norm_plot.setLabel("bottom", "true class of x<sub>o</sub>")
        plain_numbers(self.norm_plot)
        self.norm_plot.setMenuEnabled(False)
        self.norm_bars = pg.BarGraphItem(
            x=[], height=[], width=0.6, brush=NORM_BAR, pen=bar_pen(NORM_BAR)
        )  # fmt: skip
        self.norm_err = pg.ErrorBarItem(
            x=np.zeros(0), y=np.zeros(0), height=np.zeros(0), pen=pg.mkPen("#555555", width=1)
        )  # fmt: skip
        self.norm_strip = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(30, 30, 30, 70))
        for item in (self.norm_bars, self.norm_err, self.norm_strip):
            self.norm_plot.addItem(item)
        g.ci.layout.setColumnStretchFactor(0, 3)
        g.ci.layout.setColumnStretchFactor(1, 2)
        self.raised = ThumbnailRow("most raised", THUMBS)
        self.lowered = ThumbnailRow("most lowered", THUMBS)
        for row in (self.raised, self.lowered):
            self.layout_.addWidget(row)
            row.clicked.connect(lambda index: setattr(self.state, "x_o", Example("test", index)))
        self.state.events.dataset.connect(self._on_dataset)
        self.quantity_box.currentIndexChanged.connect(self.redraw)
        self.rank_box.currentIndexChanged.connect(self.redraw)

    def _fill_sizes(self, chosen: int) -> None:
        """The probe sizes this data has (:data:`PROBE_SIZES` up to its test split), ``chosen``
        (cut to the split) selected."""
        N = self.test_size
        sizes = sorted({min(n, N) for n in (*PROBE_SIZES, chosen)})
        self.size_box.blockSignals(True)
        self.size_box.clear()
        for n in sizes:
            self.size_box.addItem(f"all {n} test examples" if n == N else f"{n} test examples", n)
        self.size_box.setCurrentIndex(sizes.index(min(chosen, N)))
        self.size_box.blockSignals(False)

    def _on_dataset(self, info) -> None:
        chosen = self.probe_size
        self.test_size = len(info.labels["test"])
        keep = chosen in PROBE_SIZES and chosen <= self.test_size  # else the largest there is
        self._fill_sizes(chosen if keep else max(PROBE_SIZES))
        self.rank_box.blockSignals(True)
        self.rank_box.clear()
        self.rank_box.addItem("y_u", -1)
        for k, name in enumerate(info.classes):
            self.rank_box.addItem(name, k)
        self.rank_box.blockSignals(False)
        self.norm_plot.setXRange(-0.6, len(info.classes) - 0.4)
        set_class_axis(self.norm_plot, info.classes)

    def session_state(self) -> dict:
        return {"size": self.probe_size}

    def restore_session(self, part: dict) -> None:
        self.set_probe_size(int(part["size"]))

    @property
    def probe_size(self) -> int:
        return int(self.size_box.currentData())

    def set_probe_size(self, n: int) -> None:
        """Probe ``n`` test examples (at most the split's)."""
        self._fill_sizes(n)

    def request(self) -> InfluenceRequest:
        return InfluenceRequest(
            self.controller.pair(), self.probe_size, self.actual_box.isChecked(),
            self.norm_box.value(),
        )  # fmt: skip

    def show_result(self, result) -> None:
        self.classes = self.state.dataset.classes
        self.redraw()

    def quantity(self) -> str:
        key = self.quantity_box.currentData()
        if self.result is not None and key not in self.result.classes:
            return "delta_probs"
        return key

    def rank_class(self) -> int:
        c = self.rank_box.currentData()
        return self.result.request.pair.y_u if c is None or c < 0 else int(c)

    def clear(self) -> None:
        self.heatmap.clear_matrix()
        self.caption.setText(COMPUTE, size="11pt")
        for row, title in ((self.raised, "most raised"), (self.lowered, "most lowered")):
            row.set_items([])
            row.title.setText(title)
        self._draw_norms()

    def redraw(self) -> None:
        r = self.result
        if r is None:
            return
        c, key = self.classes, self.quantity()
        images = self.state.dataset.images["test"]
        self.heatmap.set_matrix(r.classes[key], c)
        title = dict(QUANTITIES)[key]
        self.heatmap.titleLabel.setText(f"{title} per true class of x<sub>o</sub>", size="11pt")
        q = r.request.pair
        kind = "learn" if q.loss == "ce" else "negative gradient on"
        self.caption.setText(
            f"update: x<sub>u</sub> = {q.x_u}, {kind} y<sub>u</sub> = {c[q.y_u]}, η = "
            f"{q.lr:.3g}  ·  {len(r.indices)} test examples  ·  {model_step(r)}",
            size="11pt",
        )
        col = self.rank_class()
        score = r.influence.predicted[:, col]
        ranked = f"by predicted Δlog π of class {elide(c[col], 16)}, not the map's quantity"
        order = np.argsort(score, kind="stable")
        # when the step raises (lowers) every one, the other row holds the least raised (lowered)
        up = "most raised" if score[order[-1]] > 0 else "least lowered"
        down = "most lowered" if score[order[0]] < 0 else "least raised"
        self.raised.title.setText(f"{up}, {ranked}")
        self.lowered.title.setText(down)
        for row, picks in ((self.raised, order[::-1]), (self.lowered, order)):
            items = []
            for k in picks[: len(row.buttons)]:
                idx, label = int(r.indices[k]), c[int(r.labels[k])]
                tip = (f"test[{idx}], label {label}: predicted Δlog π_{c[col]} = {score[k]:+.4g}; "
                       "click to make it x_o")  # fmt: skip
                items.append(
                    (images[idx], f"{elide(label, THUMB_NAME)}: {score[k]:+.3g}", tip, idx)
                )
            row.set_items(items)
        self._draw_norms()

    def _draw_norms(self) -> None:
        r = self.result
        if r is None or r.kernel_norm is None:
            self.norm_bars.setOpts(x=[], height=[])
            self.norm_err.setData(x=np.zeros(0), y=np.zeros(0), height=np.zeros(0))
            self.norm_strip.setData([], [])
            self.norm_plot.setTitle(
                "‖K(x<sub>o</sub>, x<sub>u</sub>)‖<sub>F</sub>" + (": off" if r else "")
            )
            return
        C = len(self.classes)
        labels, norms = r.norm_labels, r.kernel_norm
        present = [labels == k for k in range(C)]
        means = np.array([norms[m].mean() if m.any() else 0 for m in present])
        stds = np.array([norms[m].std() if m.any() else 0 for m in present])
        x = np.arange(C)
        y_u = r.request.pair.y_u
        colors = [NORM_BAR_Y_U if k == y_u else NORM_BAR for k in x]
        self.norm_bars.setOpts(
            x=x, height=means, brushes=[pg.mkBrush(c) for c in colors],
            pens=[bar_pen(c) for c in colors],
        )  # fmt: skip
        self.norm_err.setData(x=x, y=means, height=2 * stds, beam=0.25)
        jitter = np.random.default_rng(0).uniform(-0.22, 0.22, len(norms))
        self.norm_strip.setData(labels + jitter, norms)
        self.norm_plot.setTitle(
            f"‖K(x<sub>o</sub>, x<sub>u</sub>)‖<sub>F</sub> per class<br>(mean ± std, "
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
