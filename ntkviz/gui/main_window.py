"""MainWindow: docks for training and example choice, the decomposition view and step-through.

The window never touches the model. It sends commands to the :class:`TrainingWorker` through
queued signals and shows the immutable results it gets back; a generation counter drops results
of requests that have been superseded.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from pathlib import Path

from PySide6.QtCore import QEvent, QObject, QSettings, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QApplication,
    QComboBox,
    QDockWidget,
    QFileDialog,
    QFormLayout,
    QFrame,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from ntkviz.gui.export import (
    DATA_FORMATS,
    ask_save_path,
    export_decomposition_data,
    export_graphics,
)
from ntkviz.gui.panels import LOSS_KINDS, SamplePicker, StepPanel, TrainingPanel
from ntkviz.gui.plots import DecompositionView
from ntkviz.gui.probe_views import InfluenceView, KernelMapView, LayersView, SqueezeView

log = logging.getLogger(__name__)

ORGANIZATION = "ntkviz"
APPLICATION = "ntkviz"
#: Live decomposition updates while training: at least this many steps and seconds apart.
LIVE_EVERY = 50
LIVE_INTERVAL_S = 1.0

PROBE_TABS = (
    "Influence over a probe set",
    "Kernel map over training",
    "Squeezing effect",
    "Layers && spectrum",
)
#: Exportable plots: name -> the window's pyqtgraph item (looked up when exporting, as the probe
#: views are built after the menus).
PLOTS = {
    "Decomposition": lambda w: w.decomposition_view.ci,
    "Predicted vs actual": lambda w: w.step_panel.preview.getPlotItem(),
    "Trajectory": lambda w: w.step_panel.trajectory.getPlotItem(),
    "Training loss": lambda w: w.training_panel.curves.loss_plot.getPlotItem(),
    "Test accuracy": lambda w: w.training_panel.curves.acc_plot.getPlotItem(),
    "π(x_u)": lambda w: w.x_u_picker.bars.getPlotItem(),
    "π(x_o)": lambda w: w.x_o_picker.bars.getPlotItem(),
    "Influence": lambda w: w.influence_view.graphics.ci,
    "Kernel map": lambda w: w.kernel_map_view.graphics.ci,
    "Squeezing": lambda w: w.squeeze_view.graphics.ci,
    "Layers and spectrum": lambda w: w.layers_view.graphics.ci,
}

ABOUT = """<h3>ntkviz</h3>
<p>See how one gradient step on one example x<sub>u</sub> changes a classifier's predictions on
another example x<sub>o</sub>:</p>
<p align="center">Δlog π(x<sub>o</sub>) = −η · A(x<sub>o</sub>) · K(x<sub>o</sub>, x<sub>u</sub>)
· G(x<sub>u</sub>, y<sub>u</sub>) + O(η²)</p>
<p>A = I − 1·π<sup>T</sup>; K = J(x<sub>o</sub>) J(x<sub>u</sub>)<sup>T</sup>, the empirical
neural tangent kernel; G = ∂L/∂z at x<sub>u</sub>.</p>
<p>After Y. Ren and D. J. Sutherland, <i>Learning Dynamics of LLM Finetuning</i>, ICLR 2025.</p>
<p>MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, licensed CC BY-SA 3.0.</p>
<p>ntkviz {version}</p>"""


class SpaceKeeper(QObject):
    """Event filter for focused widgets with a Space action of their own (buttons, check
    boxes, combo boxes, lists): Space goes to them rather than to the Apply-step shortcut."""

    WIDGETS = (QAbstractButton, QComboBox, QAbstractItemView)

    def eventFilter(self, obj, event) -> bool:
        if (
            event.type() == QEvent.ShortcutOverride
            and event.key() == Qt.Key_Space
            and event.modifiers() == Qt.NoModifier
        ):
            event.accept()
        return False

    def focus_changed(self, old, new) -> None:
        if isinstance(new, self.WIDGETS):
            new.installEventFilter(self)


class MainWindow(QMainWindow):
    """The ntkviz main window.

    ``config``: the initial ``TrainConfig``; ``dataset``: a preloaded ``ImageDataset`` (else the
    worker loads ``dataset_name``); ``settings``: where geometry is remembered; ``autostart``:
    start the worker from the event loop (else call :meth:`start`).
    """

    ready = Signal()  # dataset and first model are loaded
    error_shown = Signal(str, str)  # title, message
    error_raised = Signal(str, str)  # from any thread: shown by show_error on the GUI thread
    decomposition_shown = Signal(object)  # DecompositionResult
    history_shown = Signal(object)  # StepHistory
    records_shown = Signal(int)  # number of records received so far
    influence_shown = Signal(object)  # InfluenceResult
    kernel_maps_shown = Signal(object)  # KernelMaps
    squeeze_shown = Signal(object)  # SqueezeResult
    layers_shown = Signal(object)  # LayerResult
    spectrum_shown = Signal(object)  # SpectrumResult
    job_cancelled = Signal(str)  # kind
    session_restored = Signal(str)  # path

    # commands to the worker (queued across threads)
    load_requested = Signal()
    start_requested = Signal(object)
    pause_requested = Signal()
    resume_requested = Signal()
    stop_requested = Signal()
    one_batch_requested = Signal(object)
    decomposition_requested = Signal(int, object)
    history_requested = Signal(int, object)
    apply_requested = Signal(int, object)
    undo_requested = Signal(int, object)
    reset_requested = Signal(int, object)
    search_requested = Signal(int, str, int)
    state_dict_requested = Signal(int)
    save_requested = Signal(str, object)
    open_requested = Signal(str)
    shutdown_requested = Signal()
    influence_requested = Signal(int, object)
    cancel_job_requested = Signal()
    kernel_recording_requested = Signal(bool, int, int)
    kernel_map_requested = Signal(int)
    squeeze_requested = Signal(int, str, int, int, float, int)
    layers_requested = Signal(int, object)
    spectrum_requested = Signal(int, int)
    session_save_requested = Signal(str, object)
    session_open_requested = Signal(str)

    def __init__(
        self,
        config=None,
        dataset=None,
        dataset_name: str = "mnist",
        settings: QSettings | None = None,
        autostart: bool = True,
    ):
        super().__init__()
        self.setWindowTitle("ntkviz — learning dynamics of one gradient step")
        self.settings = settings or QSettings(ORGANIZATION, APPLICATION)
        self.initial_config = config
        self.config = config
        self._dataset = dataset
        self._dataset_name = dataset_name
        self.dataset = None  # DatasetInfo once loaded
        self.model_info = None
        self.state = "loading"
        self.generation = 0
        self.last_result = None
        self.shown_generation = -1
        self.last_history = None
        self.last_error: tuple[str, str] | None = None
        self.records_received = 0
        self.show_message_boxes = True
        self.log_file: Path | None = None  # where errors are logged (set by app.run)
        self._last_live = (0, 0.0)  # step and time of the last live update
        self._run_started: tuple[float, int] | None = None
        self._pending_progress: tuple[int, int, float | None] | None = None
        self._paint_queue: deque = deque()
        self._paint_timer = QTimer(self)
        self._paint_timer.setSingleShot(True)
        self._paint_timer.setInterval(0)
        self._paint_timer.timeout.connect(self._paint_next)
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.setInterval(250)
        self._progress_timer.timeout.connect(self._show_progress)
        self._search_generation = 0
        self.thread: QThread | None = None
        self.job_generation = 0
        self.last_influence = None
        self.kernel_maps = None
        self._session_path = ""
        self.worker = None
        self._build()
        self._restore_settings()
        if autostart:
            QTimer.singleShot(0, self.start)

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        self.decomposition_view = DecompositionView()
        self.step_panel = StepPanel()
        splitter = QSplitter(Qt.Vertical)
        splitter.setObjectName("centralSplitter")
        splitter.addWidget(self.decomposition_view)
        splitter.addWidget(self.step_panel)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        self.splitter = splitter
        self.tabs = QTabWidget()
        self.tabs.setObjectName("centralTabs")
        self.tabs.addTab(splitter, "Decomposition")
        self._probe_scrolls = []  # filled by _build_probe_views() after the first paint
        for title in PROBE_TABS:
            # Wide control rows must not set the window's minimum width: scroll instead.
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.NoFrame)
            self._probe_scrolls.append(scroll)
            self.tabs.addTab(scroll, title)
        self.setCentralWidget(self.tabs)

        self.training_panel = TrainingPanel()
        self.training_dock = self._dock("Training", "trainingDock", self.training_panel)
        self.addDockWidget(Qt.LeftDockWidgetArea, self.training_dock)

        self.x_u_picker = SamplePicker("x_u: the example the step learns from")
        self.y_u_box = QComboBox()
        self.loss_box = QComboBox()
        for key, text in LOSS_KINDS:
            self.loss_box.addItem(text, key)
        form = QFormLayout()
        form.addRow("y_u", self.y_u_box)
        form.addRow("update", self.loss_box)
        self.x_u_picker.extra.addLayout(form)
        self.x_o_picker = SamplePicker("x_o: the example we observe")
        self.x_o_picker.add_button(
            "Same class as x_u", "a random x_o with x_u's label", self._same_class
        )
        self.x_o_picker.add_button(
            "Another class", "a random x_o of any other class", self._other_class
        )
        self.x_o_picker.add_button(
            "Most confidently wrong",
            "the example (of the filtered class) the model misclassifies most confidently",
            self._confidently_wrong,
        )
        examples = QWidget()
        lay = QVBoxLayout(examples)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.x_u_picker, 1)
        lay.addWidget(self.x_o_picker, 1)
        self.examples_dock = self._dock("Examples", "examplesDock", examples)
        self.addDockWidget(Qt.RightDockWidgetArea, self.examples_dock)

        self.device_label = QLabel("device: –")
        self.params_label = QLabel("parameters: –")
        self.step_label = QLabel("step: 0")
        self.state_label = QLabel("loading…")
        for w in (self.device_label, self.params_label, self.step_label, self.state_label):
            self.statusBar().addPermanentWidget(w)
        self.statusBar().showMessage("Loading PyTorch and the dataset…")

        self._build_menus()
        self.error_raised.connect(self.show_error)  # queued when emitted off the GUI thread
        self._space_keeper = SpaceKeeper(self)
        QApplication.instance().focusChanged.connect(self._space_keeper.focus_changed)
        tp = self.training_panel
        tp.start_button.clicked.connect(self.start_training)
        tp.pause_button.clicked.connect(self.pause_requested)
        tp.resume_button.clicked.connect(self.resume_requested)
        tp.stop_button.clicked.connect(self.stop_requested)
        tp.batch_button.clicked.connect(self.one_batch)
        self.x_u_picker.changed.connect(self._x_u_changed)
        self.x_o_picker.changed.connect(self.refresh)
        self.y_u_box.currentIndexChanged.connect(self.refresh)
        self.loss_box.currentIndexChanged.connect(self.refresh)
        sp = self.step_panel
        sp.lr_changed.connect(self.refresh)
        sp.preview_button.clicked.connect(self.refresh)
        sp.apply_button.clicked.connect(self.apply_step)
        sp.undo_button.clicked.connect(self.undo_step)
        sp.reset_button.clicked.connect(self.reset_steps)
        self._set_controls_enabled(False)

    def show_view(self, view: QWidget) -> None:
        """Bring the tab holding ``view`` (a probe view sits in a scroll area) to the front."""
        for i in range(self.tabs.count()):
            page = self.tabs.widget(i)
            if page is view or page.isAncestorOf(view):
                self.tabs.setCurrentIndex(i)
                return
        raise ValueError(f"{type(view).__name__} is not in a tab")

    def _build_probe_views(self) -> None:
        """The probe tabs (about a quarter of the window's construction time), built after the
        first paint."""
        self.influence_view = iv = InfluenceView()
        self.kernel_map_view = kv = KernelMapView()
        self.squeeze_view = SqueezeView()
        self.layers_view = LayersView()
        views = (iv, kv, self.squeeze_view, self.layers_view)
        for scroll, view in zip(self._probe_scrolls, views, strict=True):
            scroll.setWidget(view)
        iv.compute_requested.connect(self.compute_influence)
        iv.cancel_requested.connect(self.cancel_job)
        iv.thumbnail_clicked.connect(self._thumbnail_clicked)
        kv.settings_changed.connect(self.kernel_recording_requested)
        kv.record_requested.connect(self.record_kernel_map)
        self.squeeze_view.run_requested.connect(self.run_squeeze)
        self.layers_view.layers_requested.connect(self.compute_layers)
        self.layers_view.spectrum_requested.connect(self.compute_spectrum)
        for v in views:
            v.export_failed.connect(lambda m: self.show_error("Export failed", m))

    def _dock(self, title: str, name: str, widget: QWidget) -> QDockWidget:
        scroll = QScrollArea()
        scroll.setWidget(widget)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(widget.minimumSizeHint().width() + 16)  # room for the scroll bar
        dock = QDockWidget(title, self)
        dock.setObjectName(name)
        dock.setWidget(scroll)
        return dock

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file = bar.addMenu("&File")
        self._action(file, "&Open checkpoint…", self._open_checkpoint_dialog, QKeySequence.Open)
        self._action(file, "&Save checkpoint…", self._save_checkpoint_dialog, QKeySequence.Save)
        self._action(file, "Open s&ession…", self._open_session_dialog, "Ctrl+Shift+O")
        self._action(file, "Save sessio&n…", self._save_session_dialog, "Ctrl+Shift+S")
        file.addSeparator()
        self._action(file, "Export &figure…", self._export_figure_dialog, "Ctrl+E")
        self._action(file, "Export &data…", self._export_data_dialog, "Ctrl+Shift+E")
        plots = file.addMenu("Export &plot")
        for name in PLOTS:
            self._action(plots, name, lambda checked=False, n=name: self._export_plot_dialog(n))
        file.addSeparator()
        # QKeySequence.Quit is empty on some platforms (Windows, offscreen): Ctrl+Q there
        quit_keys = QKeySequence(QKeySequence.Quit)
        self._action(file, "&Quit", self.close, quit_keys if not quit_keys.isEmpty() else "Ctrl+Q")
        view = bar.addMenu("&View")
        view.addAction(self.training_dock.toggleViewAction())
        view.addAction(self.examples_dock.toggleViewAction())
        view.addSeparator()
        self._action(view, "&Recompute decomposition", self.refresh, "F5")
        step = bar.addMenu("&Step")
        self.apply_action = self._action(step, "&Apply step", self.apply_step, Qt.Key_Space)
        self.undo_action = self._action(step, "&Undo step", self.undo_step, QKeySequence.Undo)
        self._action(step, "&Reset steps", self.reset_steps)
        help_menu = bar.addMenu("&Help")
        self._action(help_menu, "&About ntkviz", self.show_about)

    def _action(self, menu, text, slot, shortcut=None) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _set_controls_enabled(self, on: bool) -> None:
        for w in (self.step_panel, self.y_u_box, self.loss_box):
            w.setEnabled(on)
        self.apply_action.setEnabled(on)
        self.undo_action.setEnabled(on)

    def _restore_settings(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            screen = self.screen().availableGeometry() if self.screen() else None
            width, height = 1600, 1000
            if screen is not None:  # fit smaller screens
                width, height = min(width, screen.width()), min(height, screen.height())
            self.resize(width, height)
            self.resizeDocks([self.training_dock, self.examples_dock], [300, 330], Qt.Horizontal)
        state = self.settings.value("windowState")
        if state is not None:
            self.restoreState(state)
        splitter = self.settings.value("splitter")
        if splitter is not None:
            self.splitter.restoreState(splitter)
        else:
            self.splitter.setSizes([560, 380])

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("windowState", self.saveState())
        self.settings.setValue("splitter", self.splitter.saveState())
        self.settings.sync()

    # -------------------------------------------------------------- worker
    def start(self) -> None:
        """Import PyTorch, start the worker thread and load the dataset there."""
        if self.thread is not None:
            return
        self._build_probe_views()
        import torch

        from ntkviz.gui.worker import TrainingWorker
        from ntkviz.models import MODELS
        from ntkviz.training import TrainConfig

        self.config = self.config or TrainConfig()
        self.training_panel.set_models(MODELS, torch.cuda.is_available())
        self.training_panel.set_config(self.config)
        worker = TrainingWorker(self.config, self._dataset, self._dataset_name)
        self._dataset = None  # the worker owns it now
        thread = QThread()
        thread.setObjectName("ntkviz-worker")
        worker.moveToThread(thread)
        thread.finished.connect(worker.deleteLater)
        w = worker
        for signal, slot in (
            (self.load_requested, w.load),
            (self.start_requested, w.start),
            (self.pause_requested, w.pause),
            (self.resume_requested, w.resume),
            (self.stop_requested, w.stop),
            (self.one_batch_requested, w.one_batch),
            (self.decomposition_requested, w.request_decomposition),
            (self.history_requested, w.send_history),
            (self.apply_requested, w.apply_step),
            (self.undo_requested, w.undo),
            (self.reset_requested, w.reset_steps),
            (self.search_requested, w.find_confidently_wrong),
            (self.state_dict_requested, w.send_state_dict),
            (self.save_requested, w.save_checkpoint),
            (self.open_requested, w.load_checkpoint),
            (self.shutdown_requested, w.shutdown),
            (self.influence_requested, w.compute_influence),
            (self.cancel_job_requested, w.cancel_job),
            (self.kernel_recording_requested, w.set_kernel_recording),
            (self.kernel_map_requested, w.record_kernel_map),
            (self.squeeze_requested, w.compute_squeeze),
            (self.layers_requested, w.compute_layers),
            (self.spectrum_requested, w.compute_spectrum),
            (self.session_save_requested, w.save_session),
            (self.session_open_requested, w.open_session),
            (w.job_progress, self._on_job_progress),
            (w.job_cancelled, self._on_job_cancelled),
            (w.influence_ready, self._on_influence),
            (w.kernel_maps_changed, self._on_kernel_maps),
            (w.squeeze_ready, self._on_squeeze),
            (w.layers_ready, self._on_layers),
            (w.spectrum_ready, self._on_spectrum),
            (w.session_loaded, self._on_session_loaded),
            (w.dataset_ready, self._on_dataset),
            (w.model_changed, self._on_model),
            (w.records, self._on_records),
            (w.state_changed, self._on_state),
            (w.decomposition_ready, self._on_decomposition),
            (w.history_changed, self._on_history),
            (w.search_done, self._on_search),
            (w.error, self.show_error),
            (w.message, self._on_message),
        ):
            signal.connect(slot)
        self.worker, self.thread = worker, thread
        app = QApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)
        thread.start()
        self.load_requested.emit()

    def shutdown(self) -> None:
        """Stop the worker and wait for its thread to end (idempotent)."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self.worker.stop_requested = True  # read by the worker between batches
        self.shutdown_requested.emit()
        if not thread.wait(30000):
            log.error("the worker thread did not stop within 30 s")
        self.worker = None

    def closeEvent(self, event) -> None:
        self._save_settings()
        self.shutdown()
        super().closeEvent(event)

    # ------------------------------------------------------------ requests
    def pair_request(self):
        """The ``PairRequest`` for the current choice of x_u, y_u, x_o, η and update kind."""
        from ntkviz.gui.worker import PairRequest

        u, o = self.x_u_picker, self.x_o_picker
        return PairRequest(
            u.split,
            u.index,
            int(self.y_u_box.currentIndex()),
            o.split,
            o.index,
            float(self.step_panel.lr.value()),
            self.loss_box.currentData() or "ce",
        )

    def _next_generation(self) -> int:
        self.generation += 1
        return self.generation

    @Slot()
    def refresh(self) -> None:
        """Recompute the decomposition and the step history for the current choice. (Connected
        to signals with arguments, so it takes none.)"""
        self._request_pair(history=True)

    def _request_pair(self, history: bool) -> None:
        """Ask the worker for the decomposition of the current pair, and its step history if
        ``history`` (live updates while training skip it: no steps are applied while training,
        and the history is refreshed when training pauses or ends)."""
        if self.dataset is None or self.model_info is None or self.thread is None:
            return
        gen = self._next_generation()
        request = self.pair_request()
        self.decomposition_requested.emit(gen, request)
        if history:
            self.history_requested.emit(gen, request)

    def start_training(self) -> None:
        """Start a new run from fresh weights (asking first if that discards a model)."""
        self.config = self.training_panel.config(self.config)
        try:
            self.config.validate()
        except ValueError as e:
            self.show_error("Invalid settings", str(e))
            return
        if not self._confirm_new_run():
            return
        self.training_panel.curves.clear()
        self.records_received = 0
        self._last_live = (0, time.perf_counter())
        self._run_started = None
        self.start_requested.emit(self.config)

    def one_batch(self) -> None:
        """Train one batch of the paused run, or of a new run (which then pauses)."""
        if self.state not in ("paused",):
            self.config = self.training_panel.config(self.config)
            try:
                self.config.validate()
            except ValueError as e:
                self.show_error("Invalid settings", str(e))
                return
            if self.state not in ("training",):
                if not self._confirm_new_run():
                    return
                self.training_panel.curves.clear()
                self.records_received = 0
        self.one_batch_requested.emit(self.config)

    def _confirm_new_run(self) -> bool:
        """Ask before a new run discards a model worth keeping: trained, loaded from a file, or
        moved by applied steps. True when there is nothing to lose or the user agrees."""
        info, result = self.model_info, self.last_result
        if info is None:
            return True
        if info.source not in ("fresh weights", "trained"):
            what = f"loaded from {info.source}"
        elif self.state in ("finished", "stopped", "paused"):
            what = f"trained for {self.records_received} steps"
        elif result is not None and result.applied_steps:
            what = f"moved by {result.applied_steps} applied step(s)"
        else:
            return True
        return self.confirm(
            "Start a new run?",
            f"A new run starts from fresh weights: the current model ({what}) will be "
            "discarded. Save it first with File ▸ Save checkpoint to keep it.",
        )

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (modal); always yes when message boxes are off (scripts)."""
        if not self.show_message_boxes:
            return True
        box = QMessageBox(QMessageBox.Question, title, text, QMessageBox.Cancel, self)
        yes = box.addButton("Discard and start", QMessageBox.AcceptRole)
        box.setDefaultButton(QMessageBox.Cancel)
        box.exec()
        return box.clickedButton() is yes

    def apply_step(self) -> None:
        if self.model_info is not None:
            self.apply_requested.emit(self._next_generation(), self.pair_request())

    def undo_step(self) -> None:
        if self.model_info is not None:
            self.undo_requested.emit(self._next_generation(), self.pair_request())

    def reset_steps(self) -> None:
        if self.model_info is not None:
            self.reset_requested.emit(self._next_generation(), self.pair_request())

    # ------------------------------------------------------ probe analyses
    def _job_gen(self) -> int:
        self.job_generation += 1
        return self.job_generation

    def probe_request(self):
        """The ``ProbeRequest`` for the current update and the influence view's options."""
        from ntkviz.gui.worker import ProbeRequest

        r, iv = self.pair_request(), self.influence_view
        return ProbeRequest(
            r.split_u, r.index_u, r.y_u, r.lr, r.loss, iv.probe_size,
            iv.actual_box.isChecked(), iv.norm_box.value(),
        )  # fmt: skip

    def compute_influence(self) -> None:
        if self.model_info is None or self.thread is None:
            return
        self.influence_view.set_running(True)
        self.influence_requested.emit(self._job_gen(), self.probe_request())

    def cancel_job(self) -> None:
        if self.worker is not None:
            self.worker.cancel_requested = True  # read between chunks
        self.cancel_job_requested.emit()

    def record_kernel_map(self) -> None:
        if self.model_info is not None:
            kv = self.kernel_map_view
            self.kernel_recording_requested.emit(
                kv.record_box.isChecked(), kv.every_box.value(), kv.per_class_box.value()
            )
            self.kernel_map_requested.emit(self._job_gen())

    def run_squeeze(self) -> None:
        if self.model_info is None:
            return
        sv, u = self.squeeze_view, self.x_u_picker
        self.squeeze_requested.emit(
            self._job_gen(), u.split, u.index, sv.label_box.currentIndex(),
            float(sv.lr_box.value()), sv.steps_box.value(),
        )  # fmt: skip

    def compute_layers(self) -> None:
        if self.model_info is not None:
            self.layers_requested.emit(self._job_gen(), self.pair_request())

    def compute_spectrum(self, n: int | None = None) -> None:
        if self.model_info is not None:
            self.statusBar().showMessage("computing the NTK spectrum…")
            self.spectrum_requested.emit(self._job_gen(), n or self.layers_view.n_box.value())

    def _thumbnail_clicked(self, split: str, index: int) -> None:
        self.x_o_picker.select(split, index)

    @Slot(int, str, int, int)
    def _on_job_progress(self, generation: int, kind: str, done: int, total: int) -> None:
        if kind == "influence":
            self.influence_view.set_progress(done, total)
        else:
            self.statusBar().showMessage(f"{kind.replace('_', ' ')}: {done}/{total}", 3000)

    @Slot(int, str)
    def _on_job_cancelled(self, generation: int, kind: str) -> None:
        if kind == "influence":
            self.influence_view.set_running(False)
        self.job_cancelled.emit(kind)

    @Slot(int, object)
    def _on_influence(self, generation: int, result) -> None:
        self.influence_view.set_running(False)
        if generation != self.job_generation and self.last_influence is not None:
            return
        self.last_influence = result
        self.influence_view.set_result(result, self.dataset.images, self.dataset.classes)
        self.influence_shown.emit(result)

    @Slot(object)
    def _on_kernel_maps(self, maps) -> None:
        self.kernel_maps = maps
        classes = self.dataset.classes if self.dataset is not None else None
        self.kernel_map_view.set_maps(maps, classes)
        self.kernel_maps_shown.emit(maps)

    @Slot(int, object)
    def _on_squeeze(self, generation: int, result) -> None:
        self.squeeze_view.set_result(result, self.dataset.classes)
        self.squeeze_shown.emit(result)

    @Slot(int, object)
    def _on_layers(self, generation: int, result) -> None:
        self.layers_view.set_layers(result)
        self.layers_shown.emit(result)

    @Slot(int, object)
    def _on_spectrum(self, generation: int, result) -> None:
        self.layers_view.set_spectrum(result)
        self.statusBar().showMessage("NTK spectrum computed", 3000)
        self.spectrum_shown.emit(result)

    # ------------------------------------------------------------ sessions
    def session_gui_state(self) -> dict:
        """The window's part of a session: curves and the current selection."""
        u, o = self.x_u_picker, self.x_o_picker
        return {
            "curves": self.training_panel.curves.curves(),
            "selection": {
                "split_u": u.split, "index_u": u.index, "y_u": int(self.y_u_box.currentIndex()),
                "split_o": o.split, "index_o": o.index,
                "lr": float(self.step_panel.lr.value()), "loss": self.loss_box.currentData(),
                "influence_size": self.influence_view.probe_size,
            },
        }  # fmt: skip

    def save_session(self, path: str) -> None:
        self.session_save_requested.emit(path, self.session_gui_state())

    def open_session(self, path: str) -> None:
        self._session_path = path
        self.session_open_requested.emit(path)

    @Slot(object)
    def _on_session_loaded(self, session) -> None:
        self.training_panel.curves.set_curves(session.curves)
        self.records_received = len(session.curves.get("step", []))
        sel = session.selection
        try:
            self.x_o_picker.blockSignals(True)
            self.x_o_picker.select(str(sel["split_o"]), int(sel["index_o"]))
            self.x_o_picker.blockSignals(False)
            self.x_u_picker.blockSignals(True)
            self.x_u_picker.select(str(sel["split_u"]), int(sel["index_u"]))
            self.x_u_picker.blockSignals(False)
            for box, value in (
                (self.y_u_box, int(sel["y_u"])),
                (self.loss_box, self.loss_box.findData(sel.get("loss", "ce"))),
            ):
                box.blockSignals(True)
                box.setCurrentIndex(max(0, value))
                box.blockSignals(False)
            self.step_panel.lr.blockSignals(True)
            self.step_panel.lr.setValue(float(sel["lr"]))
            self.step_panel.lr.blockSignals(False)
            if "influence_size" in sel:
                self.influence_view.set_probe_size(int(sel["influence_size"]))
            if "kernel_map_per_class" in sel:
                box = self.kernel_map_view.per_class_box
                box.blockSignals(True)
                box.setValue(int(sel["kernel_map_per_class"]))
                box.blockSignals(False)
        except (KeyError, TypeError, ValueError) as e:
            self.show_error("Session selection not restored", str(e))
        finally:
            self.x_o_picker.blockSignals(False)
            self.x_u_picker.blockSignals(False)
        self.refresh()
        self.session_restored.emit(self._session_path)

    def _open_session_dialog(self) -> None:
        if path := self._ask_path("Open session", "ntkviz session (*.ntks)", save=False):
            self.open_session(path)

    def _save_session_dialog(self) -> None:
        if path := self._ask_path("Save session", "ntkviz session (*.ntks)"):
            self.save_session(path)

    def _x_u_changed(self) -> None:
        self.y_u_box.blockSignals(True)
        self.y_u_box.setCurrentIndex(self.x_u_picker.label)
        self.y_u_box.blockSignals(False)
        self.squeeze_view.label_box.setCurrentIndex(self.x_u_picker.label)
        self.refresh()

    def _same_class(self) -> None:
        self.x_o_picker.pick_random(label=self.x_u_picker.label)

    def _other_class(self) -> None:
        self.x_o_picker.pick_random(label=-1, exclude_label=self.x_u_picker.label)

    def _confidently_wrong(self) -> None:
        self._search_generation += 1
        self.statusBar().showMessage("searching the most confidently wrong example…")
        o = self.x_o_picker
        self.search_requested.emit(self._search_generation, o.split, o.class_filter)

    # -------------------------------------------------------- worker results
    @Slot(object)
    def _on_dataset(self, info) -> None:
        self.dataset = info
        self.y_u_box.blockSignals(True)
        self.y_u_box.clear()
        self.y_u_box.addItems(list(info.classes))
        self.y_u_box.blockSignals(False)
        for picker in (self.x_u_picker, self.x_o_picker):
            picker.blockSignals(True)
            picker.set_dataset(info)
            picker.blockSignals(False)
        self.decomposition_view.classes = tuple(info.classes)
        labels = info.labels
        u = int((labels["train"] == 4).nonzero()[0][0]) if (labels["train"] == 4).any() else 0
        o = int((labels["test"] == 9).nonzero()[0][0]) if (labels["test"] == 9).any() else 0
        self.x_o_picker.blockSignals(True)
        self.x_o_picker.select("test", o)
        self.x_o_picker.blockSignals(False)
        self.x_u_picker.blockSignals(True)
        self.x_u_picker.select("train", u)
        self.x_u_picker.blockSignals(False)
        self.y_u_box.setCurrentIndex(self.x_u_picker.label)

    @Slot(object)
    def _on_model(self, info) -> None:
        first = self.model_info is None
        self.model_info = info
        self.config = info.config
        self.device_label.setText(f"device: {info.device}")
        self.params_label.setText(f"parameters: {info.num_parameters:,}")
        self.step_label.setText(f"step: {info.step}")
        if not first and info.source not in ("trained",):
            self.training_panel.set_config(info.config)
        self._set_controls_enabled(True)
        self.refresh()
        if first:
            self.statusBar().showMessage(
                f"{info.name} ({info.source}) ready; train it, or pick x_u and x_o", 8000
            )
            self.ready.emit()

    @Slot(object)
    def _on_records(self, records) -> None:
        if not records:
            return
        self.records_received += len(records)
        self.training_panel.curves.add_records(records)
        last = records[-1]
        now = time.perf_counter()
        if self._run_started is None:
            self._run_started = (now, last.step - len(records))
        t0, s0 = self._run_started
        rate = (last.step - s0) / max(now - t0, 1e-9)
        eta = (last.total_steps - last.step) / rate if rate > 0 and now - t0 > 0.5 else None
        self._pending_progress = (last.step, last.total_steps, eta)
        if self.state != "training":  # a last batch or one step: show it now
            self.training_panel.curves.flush()
            self._show_progress()
        elif not self._progress_timer.isActive():  # repaint progress at most 4 times a second
            self._progress_timer.start()
        if self.state != "training":
            self.refresh()
        elif (
            last.step - self._last_live[0] >= LIVE_EVERY
            and now - self._last_live[1] >= LIVE_INTERVAL_S
        ):
            self._last_live = (last.step, now)
            self._request_pair(history=False)
        self.records_shown.emit(self.records_received)

    def _show_progress(self) -> None:
        self._progress_timer.stop()
        if self._pending_progress is not None:
            step, total, eta = self._pending_progress
            self._pending_progress = None
            self.training_panel.set_progress(step, total, eta)
            self.step_label.setText(f"step: {step}")

    @Slot(str)
    def _on_state(self, state: str) -> None:
        self.state = state
        self.training_panel.curves.flush()
        self._show_progress()
        self.state_label.setText(state)
        self.training_panel.set_state(state)
        if state in ("finished", "stopped", "paused"):
            self._run_started = None
            self.refresh()
            if state == "finished":
                self.statusBar().showMessage("training finished", 5000)

    @Slot(int, object)
    def _on_decomposition(self, generation: int, result) -> None:
        if generation != self.generation:
            return  # superseded by a newer request
        dec, r = result.decomposition, result.request
        info = self._pair_caption(result)
        view = self.decomposition_view
        # Paint one piece at a time (the decomposition view in three), returning to the event
        # loop in between: the whole set at once is one repaint of ~40-60 ms.
        steps = [(view, step) for step in view.update_steps(dec, self.dataset.classes, info)]
        # the widget to paint is the one that changed, not its panel (whose other plots, e.g.
        # the trajectory, would be repainted for nothing)
        steps.append((self.step_panel.preview, lambda: self.step_panel.set_decomposition(dec)))
        u, o = self.x_u_picker, self.x_o_picker
        if (u.split, u.index) == (r.split_u, r.index_u):
            steps.append((u.bars, lambda: u.set_probs(dec.probs_u_before, r.y_u)))
        if (o.split, o.index) == (r.split_o, r.index_o):
            steps.append((o.bars, lambda: o.set_probs(dec.probs_before)))

        def shown():
            self.last_result = result
            self.shown_generation = generation
            self.decomposition_shown.emit(result)

        steps.append((None, shown))
        self._queue_paints(steps)

    def _queue_paints(self, steps: list) -> None:
        """Queue ``(widget, update)`` pairs; :meth:`_paint_next` applies them in order, one per
        event-loop turn (the newest updates come last, so they win)."""
        self._paint_queue.extend(steps)
        if not self._paint_timer.isActive():
            self._paint_timer.start()

    def _paint_next(self) -> None:
        """Apply one queued update and paint the widget it changed right away."""
        if not self._paint_queue:
            return
        widget, step = self._paint_queue.popleft()
        step()
        if widget is not None and widget.isVisible():
            widget.repaint()
        if self._paint_queue:
            self._paint_timer.start()

    def _pair_caption(self, result) -> str:
        r, c, y = result.request, self.dataset.classes, self.dataset.labels
        steps = f", {result.applied_steps} applied step(s)" if result.applied_steps else ""
        return (
            f"x<sub>u</sub> = {r.split_u}[{r.index_u}] (label {c[y[r.split_u][r.index_u]]})  ·  "
            f"x<sub>o</sub> = {r.split_o}[{r.index_o}] (label {c[y[r.split_o][r.index_o]]})  ·  "
            f"{result.model_name}, step {result.step}{steps}"
        )

    @Slot(int, object)
    def _on_history(self, generation: int, history) -> None:
        if generation != self.generation:
            return

        def shown():
            self.last_history = history
            self.history_shown.emit(history)

        trajectory = self.step_panel.trajectory
        self._queue_paints([(trajectory, lambda: trajectory.set_history(history)), (None, shown)])

    @Slot(int, str, int)
    def _on_search(self, generation: int, split: str, index: int) -> None:
        if generation != self._search_generation:
            return
        if index < 0:
            self.statusBar().showMessage("the model classifies every such example correctly", 5000)
            return
        self.statusBar().showMessage(f"most confidently wrong: {split}[{index}]", 5000)
        self.x_o_picker.select(split, index)

    @Slot(str)
    def _on_message(self, text: str) -> None:
        self.statusBar().showMessage(text, 5000)

    @Slot(str, str)
    def show_error(self, title: str, message: str) -> None:
        """Report an error: log, status bar, and a non-blocking message box."""
        log.warning("%s: %s", title, message)
        self.last_error = (title, message)
        self.statusBar().showMessage(f"{title}: {message}", 15000)
        if self.show_message_boxes:
            shown = [
                b
                for b in self.findChildren(QMessageBox)
                if b.isVisible() and b.windowTitle() == title
            ]
            if shown:  # the same error again (e.g. while η is dragged): no pile of boxes
                shown[-1].setText(message)
            else:
                box = QMessageBox(QMessageBox.Warning, title, message, QMessageBox.Ok, self)
                if self.log_file is not None:
                    box.setInformativeText(f"Logged in {self.log_file}")
                box.setAttribute(Qt.WA_DeleteOnClose)
                box.open()
        self.error_shown.emit(title, message)

    def show_about(self) -> None:
        from ntkviz import __version__

        box = QMessageBox(self)
        box.setWindowTitle("About ntkviz")
        box.setTextFormat(Qt.RichText)
        text = ABOUT.format(version=__version__)
        if self.log_file is not None:
            text += f"<p>Log file: {self.log_file}</p>"
        box.setText(text)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.open()

    # --------------------------------------------------------------- files
    def export_meta(self) -> dict:
        """Metadata of the shown decomposition for exports."""
        from ntkviz import __version__

        result = self.last_result
        r, labels, c = result.request, self.dataset.labels, self.dataset.classes
        return {
            "x_u": {"split": r.split_u, "index": r.index_u,
                    "label": c[int(labels[r.split_u][r.index_u])]},
            "x_o": {"split": r.split_o, "index": r.index_o,
                    "label": c[int(labels[r.split_o][r.index_o])]},
            "y_u": c[r.y_u],
            "lr": r.lr,
            "loss": r.loss,
            "model": result.model_name,
            "training_step": result.step,
            "applied_steps": result.applied_steps,
            "seed": result.seed,
            "dataset": self.dataset.name,
            "ntkviz_version": __version__,
        }  # fmt: skip

    def export_figure(self, path: str, width: int = 1600) -> bool:
        """Write the decomposition view to ``path`` (.png ``width`` px wide, or .svg)."""
        return self.export_plot("Decomposition", path, width)

    def export_plot(self, name: str, path: str, width: int = 1600) -> bool:
        """Write the plot ``name`` (a key of ``PLOTS``) to ``path``; False on error."""
        if name == "Decomposition" and self.last_result is None:
            self.show_error("Nothing to export", "no decomposition has been computed yet")
            return False
        try:
            export_graphics(PLOTS[name](self), path, width)
        except (OSError, ValueError) as e:
            self.show_error("Export failed", str(e))
            return False
        self.statusBar().showMessage(f"wrote {path}", 5000)
        return True

    def export_data(self, path: str) -> bool:
        """Write the shown decomposition's numbers to ``path`` (.csv, .npz, .json)."""
        if self.last_result is None:
            self.show_error("Nothing to export", "no decomposition has been computed yet")
            return False
        try:
            export_decomposition_data(self.last_result.decomposition, path, self.export_meta())
        except (OSError, ValueError) as e:
            self.show_error("Export failed", str(e))
            return False
        self.statusBar().showMessage(f"wrote {path}", 5000)
        return True

    def save_checkpoint(self, path: str) -> None:
        """Save the model (the worker adds its training step) with the dataset's name."""
        self.save_requested.emit(path, {"dataset": self.dataset.name if self.dataset else None})

    def open_checkpoint(self, path: str) -> None:
        self.open_requested.emit(path)

    def _last_dir(self) -> str:
        return str(self.settings.value("lastDirectory", str(Path.home())))

    def _ask_path(self, title: str, filters: str, save: bool = True) -> str:
        """A path from a file dialog (a saved file gets the chosen filter's suffix if it has
        none); ``""`` if cancelled."""
        if save:
            path = ask_save_path(self, title, filters, self._last_dir())
        else:
            path, _ = QFileDialog.getOpenFileName(self, title, self._last_dir(), filters)
        if path:
            self.settings.setValue("lastDirectory", str(Path(path).parent))
        return path

    def _ask_width(self) -> int | None:
        width, ok = QInputDialog.getInt(self, "PNG width", "width in pixels", 1600, 100, 20000, 100)
        return width if ok else None

    def _open_checkpoint_dialog(self) -> None:
        if path := self._ask_path("Open checkpoint", "ntkviz checkpoint (*.pt)", save=False):
            self.open_checkpoint(path)

    def _save_checkpoint_dialog(self) -> None:
        if path := self._ask_path("Save checkpoint", "ntkviz checkpoint (*.pt)"):
            self.save_checkpoint(path)

    def _export_figure_dialog(self) -> None:
        self._export_plot_dialog("Decomposition")

    def _export_plot_dialog(self, name: str) -> None:
        path = self._ask_path(f"Export {name}", "PNG image (*.png);;SVG vector image (*.svg)")
        if not path:
            return
        width = 1600
        if Path(path).suffix.lower() == ".png":
            width = self._ask_width()
            if width is None:
                return
        self.export_plot(name, path, width)

    def _export_data_dialog(self) -> None:
        filters = ";;".join(f"{s[1:].upper()} (*{s})" for s in DATA_FORMATS)
        if path := self._ask_path("Export data", filters):
            self.export_data(path)
