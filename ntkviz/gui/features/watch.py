"""The watch tab (feature "watch"): what training actually did to the watched examples.

For the watched x_o chosen in the tab, the timeline shows how log π of its class moved since the
run began (a Continue of the model as the run left it carries the timeline on), split exactly into
the gradient terms by class of the batch example, the momentum and weight-decay terms, and the
residual (their sum is the actual change). Clicking the timeline shows that step's batch with each
example's contribution and A, K_P, G of the largest contributor; "who moved x_o" ranks the
training examples over the whole run (click one: it becomes x_u).
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QCheckBox, QComboBox, QLabel, QPushButton

from ntkviz.app.features.watch import (
    MAX_WATCHED,
    SaveAccounts,
    WatchDetailRequest,
    WatchObserver,
    WatchRankingRequest,
    default_watch,
)
from ntkviz.app.state import Example
from ntkviz.gui.features.base import VIEW_DATA_FORMATS, ProbeView
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import (
    HeatmapView,
    class_color,
    elide,
    let_shrink,
    let_wrap,
    plain_numbers,
)
from ntkviz.gui.widgets import THUMB_NAME, ThumbnailRow, fit_text, labelled

OBSERVER = "watch"  #: the engine's name for this tab's run observer
SHOWN_CLASSES = 4  #: classes of training examples drawn apart; the others are summed
#: The terms that are no class's: black lines told apart by their dashes (dash and gap lengths
#: in pen widths), so that no class's colour (Tableau 10, then spread hues) reads as one of them.
OTHER_TERMS = (
    ("momentum", "momentum", [3, 2]),  # short dashes
    ("weight_decay", "weight decay", [7, 2, 1.5, 2]),  # dash-dot
    ("statistics", "running statistics (exact)", [7, 3]),  # long dashes; where nonzero
    ("residual", "residual (2nd order)", [1, 1.6]),  # dots
)
TERM_COLOR = "#000000"
#: The summed classes not drawn apart: a broad light grey band, no class's colour.
OTHER_CLASSES = pg.mkPen("#c4c4c4", width=4)


BATCH_TITLE = "the step's batch, largest contributions first"
FACTOR_HINT = (
    "Click a step on the timeline:<br>A, K<sub>P</sub> and G of its largest contributor appear "
    "here,<br>its batch below"
)
NOT_WATCHING = (
    'Check "watch runs", then start or continue a run: every step it takes is accounted '
    "for on the watched examples"
)


class WatchView(ProbeView):
    """Watched examples, the timeline of one, a step's details, and who moved it."""

    name = "watch_ranking"
    title = "Watch"
    tooltip = "What training did to watched examples: an exact account of every step"
    run_text = "Rank the run's examples"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.examples: tuple = ()  #: watched (applies from the next run)
        self.run_examples: tuple = ()  #: watched in the current run's timeline
        self.rows: list = []  # WatchSteps of the current run
        self.detail = None
        self.ranking = None
        self.watching = QCheckBox("watch runs")
        self.watching.setToolTip(
            "account for every optimizer step of the next runs on the watched examples (exact, "
            "but training takes about 2–4× as long)"
        )
        self.which = QComboBox()
        self.which.setToolTip("the watched x_o shown")
        self.which.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.which.setMinimumContentsLength(14)
        self.add_button = QPushButton("Watch x_o")
        self.add_button.setToolTip(
            f"add the current x_o (at most {MAX_WATCHED}; from the next run)"
        )
        self.reset_button = QPushButton("x_o + one per class")
        self.reset_button.setToolTip("watch x_o and one test image of every other class")
        fit_text(self.add_button, self.reset_button)
        self.note = QLabel("")
        self.add_controls(
            self.watching, labelled("show", self.which), self.add_button, self.reset_button,
            self.note,
        )  # fmt: skip
        self.finish_controls()
        g = self.graphics
        self.caption = let_wrap(g.addLabel(NOT_WATCHING, 0, 0, 1, 4))
        self.timeline = g.addPlot(1, 0, 1, 3)
        self.timeline.setLabel("bottom", "training step")
        self.timeline.setLabel("left", "Δlog π(class) (nats)")
        self.legend = pg.LegendItem(labelTextSize="8pt")  # beside the plot: it covers nothing
        g.addItem(self.legend, 1, 3)
        self.timeline.setMenuEnabled(False)
        plain_numbers(self.timeline)  # "(x0.001)" would lengthen the title into the caption
        self.marker = pg.InfiniteLine(angle=90, pen=pg.mkPen("#d62728", width=1))
        self.marker.setVisible(False)  # until a step is clicked
        self.timeline.addItem(self.marker)
        self.timeline.scene().sigMouseClicked.connect(self._clicked)
        self.curves: dict = {}
        d = self._describe
        self.factors = {}
        row = g.addLayout(2, 0, 1, 4)  # its own columns: the legend above does not set them
        for col, (key, title) in enumerate((
            ("A", "A(x<sub>o</sub>)"), ("K", "K<sub>P</sub>(x<sub>o</sub>, x<sub>top</sub>)"),
            ("G", "G(x<sub>top</sub>)"), ("term", "its Δlog π(x<sub>o</sub>)"),
        )):  # fmt: skip
            view = HeatmapView(title, lambda i, j, k=key: d(k, i, j), "i", "")
            if key in ("G", "term"):  # vectors stay narrow; the matrices get the room
                view.setMaximumWidth(140)
            self.factors[key] = view
            row.addItem(view, 0, col)
        for col, stretch in enumerate((3, 3, 1, 1)):
            row.layout.setColumnStretchFactor(col, stretch)
        # until a step is chosen: a line saying so in the factors' place (not empty axes), as
        # tall as they are: the timeline keeps its height when they appear. (In the row's own
        # layout: a row of the figure's that has a stretch factor keeps its room when hidden.)
        self.factor_hint = let_shrink(pg.LabelItem(FACTOR_HINT, size="10pt", color="#555"))
        option = self.factor_hint.item.document().defaultTextOption()
        option.setAlignment(Qt.AlignmentFlag.AlignHCenter)  # each line centred
        self.factor_hint.item.document().setDefaultTextOption(option)
        self.factor_hint.item.setTextWidth(self.factor_hint.item.document().idealWidth())
        self.factor_hint.setPreferredHeight(
            row.effectiveSizeHint(Qt.SizeHint.PreferredSize).height()
        )
        row.addItem(self.factor_hint, 1, 0, 1, 4)
        self.factor_row = row
        self._show_factors(False)
        g.ci.layout.setRowStretchFactor(1, 3)
        g.ci.layout.setRowStretchFactor(2, 2)
        self.batch = ThumbnailRow(BATCH_TITLE, 12)
        self.helpful = ThumbnailRow("who raised log π(class) most over the run", 10)
        self.harmful = ThumbnailRow("who lowered it most", 10)
        for row in (self.batch, self.helpful, self.harmful):
            self.layout_.addWidget(row)
            row.clicked.connect(lambda index: setattr(self.state, "x_u", Example("train", index)))
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(250)
        self._redraw_timer.timeout.connect(self.redraw)
        c, s = self.controller, self.state
        self.watching.toggled.connect(lambda on: self.set_watched(self.examples))
        self.which.currentIndexChanged.connect(self._which_changed)
        self.add_button.clicked.connect(self._watch_x_o)
        self.reset_button.clicked.connect(self._one_per_class)
        c.on("dataset", lambda event: self._one_per_class())  # once x_o is chosen
        s.events.run_state.connect(self._run_state)
        c.on("run_started", self._run_started)
        c.on("watch_restarted", self._restarted)
        c.on("watch_steps", self._steps)
        c.on("watch_detail", self._on_detail)
        c.on("watch_save", self.job.follow)  # the same controls show the accounts' export
        self.job.cancel_clicked.connect(lambda: c.cancel("watch_save"))  # (its Cancel too)

    # ------------------------------------------------------------------ the watch list
    def _one_per_class(self) -> None:
        if self.state.dataset is not None:
            self.set_watched(default_watch(self.state.dataset, self.state.x_o))

    def _watch_x_o(self) -> None:
        x_o = self.state.x_o
        if x_o not in self.examples:
            self.set_watched((*self.examples, x_o)[-MAX_WATCHED:])

    def set_watched(self, examples) -> None:
        """Watch ``examples`` from the next run (a new run or Continue) on, if "watch runs" is
        checked."""
        shown = self.run_examples[self.w] if self.run_examples else None
        self.examples = tuple(examples)
        focus = self.examples.index(shown) if shown in self.examples else 0
        on = self.watching.isChecked() and self.examples  # none before the data is loaded
        observer = WatchObserver(self.examples, focus=(focus,)) if on else None
        self.controller.send("set_observer", OBSERVER, observer)
        self._note()

    def _note(self) -> None:
        if not self.watching.isChecked():
            self.note.setText(f"{len(self.examples)} to watch")
            return
        pending = self.run_examples and self.examples != self.run_examples
        self.note.setText(
            f"{len(self.examples)} watched" + (", from the next run" if pending else "")
        )

    def save_settings(self, settings) -> None:
        settings.setValue("watchRuns", self.watching.isChecked())

    def restore_settings(self, settings) -> None:
        self.watching.setChecked(str(settings.value("watchRuns", "false")).lower() == "true")

    def session_state(self) -> dict:
        return {"watched": [[e.split, e.index] for e in self.examples]}

    def restore_session(self, part: dict) -> None:
        self.set_watched([Example(*e) for e in part["watched"]])

    # ------------------------------------------------------------------ the run
    def _run_started(self, event) -> None:
        if OBSERVER in event.payload.continued:  # a Continue: the timeline goes on
            return
        self.clear()  # the "show" list offers the next run's examples (this one watches none)
        self.run_examples = event.payload.observed.get(OBSERVER, ())
        if self.run_examples:
            self._list(self.run_examples)
        self._note()
        self.redraw()

    def _restarted(self, event) -> None:
        """Steps by hand paused the run's account: its timeline begins again (same examples)."""
        examples = self.run_examples
        self.clear()
        self.run_examples = examples
        self._list(examples)
        self._note()

    def _list(self, examples) -> None:
        """``examples`` in the "show" list (those of the current data)."""
        d = self.state.dataset
        self.which.blockSignals(True)
        self.which.clear()
        for e in examples:
            if d is not None and e.index < d.size(e.split):
                self.which.addItem(f"{e} ({d.classes[self.state.label(e)]})")
        self.which.blockSignals(False)

    def clear(self) -> None:
        """No run's steps, step details or ranking; the "show" list offers the next run's."""
        self.rows, self.detail, self.ranking = [], None, None
        self.run_examples = ()
        self._list(self.examples)
        self.timeline.enableAutoRange()  # not the old run's steps
        self.marker.setVisible(False)
        for row in (self.batch, self.helpful, self.harmful):
            row.set_items([])
        self.batch.title.setText(BATCH_TITLE)
        for view in self.factors.values():
            view.clear_matrix()
        self._show_factors(False)
        self.redraw()

    def _steps(self, event) -> None:
        self.rows.append(event.payload)
        if not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def _run_state(self, state: str) -> None:
        if state in ("paused", "stopped", "finished") and self.rows:
            self.redraw()
            self.run()  # the ranking of the run so far

    def _which_changed(self) -> None:
        if self.state.run_state != "training":  # the next run focuses on the one shown
            self.set_watched(self.examples)
        self.redraw()
        if self.detail is not None:
            self._show_detail()
        if self.result is not None:
            self.show_result(self.result)

    @property
    def w(self) -> int:
        return max(self.which.currentIndex(), 0)

    def timeline_arrays(self) -> dict[str, np.ndarray]:
        """The current run's rows, concatenated: ``steps (T,)``, ``by_class (T, W, C)``, the
        other terms ``(T, W)``."""
        names = ("steps", "by_class", *(k for k, *_ in OTHER_TERMS), "actual", "log_prob")
        return {n: np.concatenate([getattr(r, n) for r in self.rows]) for n in names}

    def redraw(self) -> None:
        """Draw the timeline of the watched example shown (its curves updated in place while the
        same ones are shown: a run's redraws cost little)."""
        self._redraw_timer.stop()
        if not self.rows:
            self._set_curves(None, [])
            self.caption.setText(
                "Start or continue a run: its steps are accounted for here"
                if self.watching.isChecked()
                else NOT_WATCHING,
                size="10pt",
            )
            return
        t, w, c = self.timeline_arrays(), self.w, self.state.dataset.classes
        steps = t["steps"].astype(float)
        by_class = np.cumsum(t["by_class"][:, w, :], axis=0)  # (T, C)
        shown = np.argsort(-np.abs(by_class[-1]))[:SHOWN_CLASSES]
        series = [
            (
                f"training examples of class {c[k]}",
                by_class[:, k],
                pg.mkPen(class_color(k), width=1.5),
            )
            for k in sorted(shown)
        ]
        rest = np.setdiff1d(np.arange(len(c)), shown)
        if len(rest):
            series.insert(0, (
                "training examples of the other classes", by_class[:, rest].sum(1), OTHER_CLASSES
            ))  # fmt: skip
        mixed = self.state.model is not None and self.state.model.mode_dependent
        for key, label, dashes in OTHER_TERMS:
            if key == "statistics" and not np.any(t[key][:, w]):
                continue  # no batch norm
            if key == "residual" and mixed:  # dropout or batch norm: gradients differ by mode
                label = "residual (train/eval difference + 2nd order)"
            pen = pg.mkPen(TERM_COLOR, width=1.5, dash=dashes)
            series.append((label, np.cumsum(t[key][:, w]), pen))
        series.append(
            ("actual change", np.cumsum(t["actual"][:, w]), pg.mkPen(TERM_COLOR, width=3))
        )
        self._set_curves(steps, series)
        e = self.run_examples[w]
        self.caption.setText(
            f"x<sub>o</sub> = {e} (label {elide(c[self.state.label(e)], 20)}): log π of its class went "
            f"{t['log_prob'][0, w]:.3g} → {t['log_prob'][-1, w] + t['actual'][-1, w]:.3g} in "
            f"{len(steps)} steps<br>the terms of every step since the watch began, added up, sum "
            "to the actual change; "
            "click a step for its batch",
            size="10pt",
        )

    def _set_curves(self, x, series) -> None:
        """Show ``series`` ``[(name, y, pen)]`` over ``x``: new curves only when the names
        change."""
        if [name for name, _, _ in series] != list(self.curves):
            for curve in self.curves.values():
                self.timeline.removeItem(curve)
            self.curves.clear()
            self.legend.clear()
            for name, y, pen in series:
                self.curves[name] = curve = self.timeline.plot(x, y, pen=pen)
                self.legend.addItem(curve, name)
            return
        for name, y, _ in series:
            self.curves[name].setData(x, y)

    def _clicked(self, event) -> None:
        if not self.rows or not self.timeline.sceneBoundingRect().contains(event.scenePos()):
            return
        x = self.timeline.getViewBox().mapSceneToView(event.scenePos()).x()
        steps = self.timeline_arrays()["steps"]
        step = int(steps[np.argmin(np.abs(steps - x))])
        self.show_step(step)

    def show_step(self, step: int) -> None:
        """Ask for the details of training step ``step``."""
        self.marker.setPos(step)
        self.marker.setVisible(True)
        self.controller.submit("watch_detail", WatchDetailRequest(step))

    # ------------------------------------------------------------------ a step
    def _on_detail(self, event) -> None:
        if event.kind == "result":
            self.detail = event.payload
            self._show_detail()
            self.ctx.shown("watch_detail", event.payload)

    def _show_factors(self, on: bool) -> None:
        """The factor heatmaps, or (``on`` false) the line saying to click a step."""
        if self.factor_hint.isVisible() != on and self.factors["A"].isVisible() == on:
            return  # shown as asked
        for view in self.factors.values():
            view.setVisible(on)
        self.factor_hint.setVisible(not on)
        self.factor_row.layout.invalidate()  # its cached sizes still count the hidden items
        self.graphics.ci.layout.invalidate()

    def _show_detail(self) -> None:
        d, w, data = self.detail, self.w, self.state.dataset
        c, images = data.classes, data.images["train"]
        order = np.argsort(-np.abs(d.contributions[w]), kind="stable")
        items = []
        for b in order[: len(self.batch.buttons)]:
            idx, value = int(d.batch_indices[b]), d.contributions[w, b]
            tip = (f"train[{idx}], label {c[int(d.batch_labels[b])]}: its gradient term moved "
                   f"log π of x_o's class by {value:+.4g} at step {d.step}; click: x_u")  # fmt: skip
            name = elide(c[int(d.batch_labels[b])], THUMB_NAME)
            items.append((images[idx], f"{name}: {value:+.2g}", tip, idx))
        self.batch.set_items(items)
        top = int(d.top_index[w])
        self.batch.title.setText(
            f"step {d.step} ({d.optimizer}, η = {d.lr:.3g}): its batch of {len(d.batch_indices)}, "
            f"largest contributions first; above: A, K_P, G of train[{int(d.batch_indices[top])}]"
        )
        p = d.probs_before[w]
        A = np.eye(len(p)) - p[None, :]
        self.factors["A"].set_matrix(A, c)
        self.factors["G"].set_matrix(d.top_G[w][:, None], c)
        for key, value in (("K", d.top_kernel[w]), ("term", d.top_term(w)[:, None])):
            if d.has_kernel[w]:
                self.factors[key].set_matrix(value, c)
            else:
                self.factors[key].clear_matrix()
        self.factors["K"].titleLabel.setText(
            "K<sub>P</sub>(x<sub>o</sub>, x<sub>top</sub>)" if d.has_kernel[w] else
            "K<sub>P</sub>: focused x<sub>o</sub> only", size="10pt",
        )  # fmt: skip
        self._show_factors(True)

    def _describe(self, key: str, i: int, j: int) -> str:
        d = self.detail
        if d is None:
            return ""
        c, w = self.state.dataset.classes, self.w
        if key == "K":
            return f"K_P[{c[i]},{c[j]}] = {d.top_kernel[w][i, j]:.4g} (the optimizer's kernel)"
        if key == "G":
            return f"G[{c[i]}] = {d.top_G[w][i]:.4g}: ∂ℓ/∂z of the top contributor"
        if key == "term":
            return f"Δlog π_{c[i]}(x_o) from the top contributor: {d.top_term(w)[i]:.4g}"
        return f"A[{c[i]},{c[j]}] = {float(i == j) - d.probs_before[w][j]:.4g}"

    # ------------------------------------------------------------------ the run's ranking
    def request(self) -> WatchRankingRequest:
        return WatchRankingRequest(len(self.helpful.buttons))

    def show_result(self, ranking) -> None:
        w, data = self.w, self.state.dataset
        c, images = data.classes, data.images["train"]
        for row, idx, values in (
            (self.helpful, ranking.helpful[w], ranking.helpful_values[w]),
            (self.harmful, ranking.harmful[w], ranking.harmful_values[w]),
        ):
            row.set_items([
                (images[i], f"{elide(c[data.label('train', i)], THUMB_NAME)}: {v:+.2g}",
                 f"train[{i}]: summed contribution {v:+.4g} over {ranking.steps} steps; click: x_u",
                 int(i))
                for i, v in zip(idx, values, strict=True)
            ])  # fmt: skip

    # ------------------------------------------------------------------ export
    def data(self) -> dict[str, np.ndarray]:
        return self.timeline_arrays() if self.rows else {}

    def export(self, path, width: int = 1600):
        """The timeline as PNG/SVG; the run's accounts (written by the engine) as NPZ/CSV."""
        from pathlib import Path

        if Path(path).suffix.lower() in VIEW_DATA_FORMATS:
            self.job.set_running(True)
            self.controller.submit("watch_save", SaveAccounts(str(path)))
            return Path(path)
        return super().export(path, width)
