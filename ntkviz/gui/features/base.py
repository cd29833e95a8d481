"""What a feature's view is to the window: a widget with a place, plots to export, actions for
the menus and a part of the session."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PySide6.QtWidgets import QLabel, QPushButton, QVBoxLayout, QWidget

from ntkviz.app.controller import AppController
from ntkviz.app.state import AppState, Example
from ntkviz.gui.export import ask_save_path, export_graphics
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import model_step
from ntkviz.gui.widgets import FlowLayout, JobControls

VIEW_DATA_FORMATS = (".csv", ".npz")


@dataclass(frozen=True)
class Action:
    """A menu entry a view offers: ``menu`` ("File", "Step", …), its text, what it calls, an
    optional shortcut (a QKeySequence argument) and whether it needs a loaded model."""

    menu: str
    text: str
    slot: Callable
    shortcut: object = None
    needs_model: bool = True


@dataclass(frozen=True)
class FeatureContext:
    """What a view may use: the ``controller`` and its ``state``; ``status(text, ms)`` for the
    status bar; ``shown(topic, payload)`` to say a result is on screen (tests and benchmarks
    wait for it); ``error(title, message)`` to report an error; ``ask_path(title, filters)`` for
    a file to save (``""``: cancelled); ``attempt(title, do, done)``: call ``do()``, report an
    ``OSError``/``ValueError`` as an error titled ``title``, else show ``done``; True on success."""

    controller: AppController
    state: AppState
    status: Callable[[str, int], None]
    shown: Callable[[str, object], None]
    error: Callable[[str, str], None]
    ask_path: Callable[[str, str], str]
    attempt: Callable[[str, Callable, str], bool]


class FeatureView(QWidget):
    """Base of every view. Subclasses set ``name`` (their session part and identity),
    ``title`` and ``placement``: "left" or "right" (a dock), "center" (the first tab) or "tab"
    (a tab built after the first paint)."""

    name = ""
    title = ""
    tooltip = ""  #: a longer title for the tab's tooltip
    placement = "tab"

    def __init__(self, ctx: FeatureContext):
        super().__init__()
        self.ctx = ctx
        self.controller, self.state = ctx.controller, ctx.state
        self.controller.on("model_replaced", lambda event: self.model_replaced(event.payload))

    def model_replaced(self, info) -> None:
        """Another model is current (``info``, a ``ModelInfo``: a new run's, from a file, for
        other data): forget what was shown of the old one."""

    def plots(self) -> dict[str, Callable[[], object]]:
        """Exportable plots: name -> a callable giving the pyqtgraph item."""
        return {}

    def actions(self) -> list[Action]:
        return []

    def session_state(self) -> dict | None:
        """This view's part of a session (plain values), or None for none."""
        return None

    def restore_session(self, part: dict) -> None:
        pass

    def save_settings(self, settings) -> None:
        """Remember layout in ``settings`` (a QSettings)."""

    def restore_settings(self, settings) -> None:
        pass


def plain(value):
    """``value`` as JSON-ready values: a dataclass (a request) as a dict of its fields, an
    ``Example`` as ``[split, index]``, numbers as Python numbers, anything else as text."""
    if isinstance(value, Example):
        return [value.split, value.index]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, np.ndarray):
        return plain(value.tolist()) if value.size <= 10_000 else f"array of shape {value.shape}"
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if np.isfinite(value) else str(value)
    return str(value)


class ProbeView(FeatureView):
    """A tab that runs one job of its feature (``name``) on request: a control row ending in
    the job's Run / Cancel / progress and an Export button, above a pyqtgraph layout
    ``graphics``. Subclasses give :meth:`request` and :meth:`show_result`, and :meth:`data`
    for CSV/NPZ export."""

    placement = "tab"
    run_text = "Compute"
    #: The result is of one state of the model (its ``step`` and ``lineage``): say so when the
    #: model has moved on since.
    marks_stale = False

    def __init__(self, ctx: FeatureContext):
        super().__init__(ctx)
        self.result = None  #: the result on screen
        self.controls = FlowLayout()  # wraps: a control row never sets the tab's width
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground("w")
        self.job = JobControls(self.run_text)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip("figure (PNG, SVG) or numbers (CSV, NPZ)")
        self.export_button.clicked.connect(self._export_dialog)
        self.layout_ = QVBoxLayout(self)
        self.layout_.setContentsMargins(4, 4, 4, 4)
        self.layout_.addLayout(self.controls)
        self.layout_.addWidget(self.graphics, 1)
        self.stale_note = QLabel()
        self.stale_note.setStyleSheet("color: #b05000")
        self.stale_note.hide()
        self.job.run_clicked.connect(self.run)
        self.job.cancel_clicked.connect(lambda: self.controller.cancel(self.name))
        self.controller.on(self.name, self._on_event)
        if self.marks_stale:
            self.state.events.model.connect(self._mark_stale)
            self.controller.on("records", self._mark_stale)

    def add_controls(self, *widgets) -> None:
        for w in widgets:
            self.controls.addWidget(w)

    def finish_controls(self) -> None:
        """End the control row: the job controls, Export and the note that the result shown is
        of an earlier model."""
        self.controls.addWidget(self.job)
        self.controls.addWidget(self.export_button)
        self.controls.addWidget(self.stale_note)

    def _mark_stale(self, *args) -> None:
        """Show the note while the result shown is of another state of the model than the one
        held now (trained or stepped by hand since); its text changes only when that does."""
        r, model = self.result, self.state.model
        now = (self.controller.trained_steps, model.lineage if model else ())
        then = None if r is None else (r.step, r.lineage)
        stale = then is not None and then != now
        if stale == self.stale_note.isHidden():  # (isVisible is False on a hidden tab)
            self.stale_note.setText(
                f"computed {model_step(r)}; the model has moved since" if stale else ""
            )
            self.stale_note.setToolTip(f"{self.run_text} again for the model as it is now")
            self.stale_note.setVisible(stale)

    def plots(self):
        return {self.title: lambda: self.graphics.ci}

    def request(self):
        raise NotImplementedError

    def model_replaced(self, info) -> None:
        self.result = None
        self.job.set_running(False)
        self.stale_note.hide()
        self.clear()

    def clear(self) -> None:
        """Show no result."""
        raise NotImplementedError

    def run(self) -> None:
        """Submit :meth:`request` (when a model is loaded)."""
        if self.controller.ready:
            self.job.set_running(True)
            self.controller.submit(self.name, self.request())

    def _on_event(self, event) -> None:
        self.job.follow(event)
        if event.kind == "result":
            self.result = event.payload
            self.show_result(event.payload)
            if self.marks_stale:
                self._mark_stale()
            self.ctx.shown(self.name, event.payload)

    def show_result(self, result) -> None:
        raise NotImplementedError

    def data(self) -> dict[str, np.ndarray]:
        """The shown numbers (for CSV/NPZ export)."""
        return {}

    def export_meta(self) -> dict:
        """What the exported numbers are of: the view, the request of the result shown (its
        pair, η, sizes …), the model, the training step of the result (else the latest), the data
        and its class names."""
        s, m = self.state, self.state.model
        meta = {"view": self.name, "dataset": s.dataset.name, "classes": list(s.dataset.classes)}
        if m is not None:
            meta.update(model=m.name, seed=m.config.seed)
        meta["training_step"] = getattr(self.result, "step", self.controller.trained_steps)
        if hasattr(self.result, "applied_steps"):
            meta["applied_steps"] = self.result.applied_steps
        request = getattr(self.result, "request", None)
        if request is not None:
            meta["request"] = plain(request)
        return meta

    def export(self, path: str | Path, width: int = 1600) -> Path:
        """Figure (.png, .svg) or numbers (.csv, .npz, with :meth:`export_meta`) by suffix;
        raises OSError/ValueError."""
        from ntkviz.results import write_arrays

        data = self.data()
        if not data:
            raise ValueError(f"{self.title}: nothing computed yet ({self.run_text} first)")
        if Path(path).suffix.lower() in VIEW_DATA_FORMATS:
            return write_arrays(path, data, self.export_meta())
        return export_graphics(self.graphics.ci, path, width)

    def _export_dialog(self) -> None:
        path = ask_save_path(self, "Export", "PNG (*.png);;SVG (*.svg);;CSV (*.csv);;NPZ (*.npz)")
        if path:
            self.ctx.attempt("Export failed", lambda: self.export(path), f"wrote {path}")
