"""MainWindow: assembles the feature views (docks, tabs, menus), the status bar, settings and
error boxes, and starts the engine's thread. It never touches the model: the controller sends
commands to the engine's :class:`~ntkviz.gui.worker_host.WorkerHost` and takes its events on
this thread."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal, Slot
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFrame,
    QLabel,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QTabWidget,
    QWidget,
)

from ntkviz.app.controller import AppController
from ntkviz.app.state import AppState
from ntkviz.gui.dialogs import show_about
from ntkviz.gui.files import FileMenu
from ntkviz.gui.widgets import StepKeys, WheelScrolls

log = logging.getLogger(__name__)

ORGANIZATION = "ntkviz"
APPLICATION = "ntkviz"
MENUS = ("File", "View", "Step", "Help")


#: the status bar's hint for a model that has not trained yet
READY_HINT = "ready; train it, or pick x_u and x_o"


class MainWindow(QMainWindow):
    """The ntkviz main window. ``config``: the first model's ``TrainConfig``; ``dataset``: a
    loaded ``ImageDataset`` (else the engine loads ``dataset_name``); ``settings``: where the
    layout is remembered; ``autostart``: start from the event loop (else call :meth:`start`);
    ``features``: the view classes (default :data:`ntkviz.gui.features.FEATURES`);
    ``user_model`` (an engine ``UserModel``) and ``model`` (the first model, as given): a model
    of the user's (see :func:`ntkviz.gui.app.show`).

    Construction builds only the frame (menus, status bar, a notice): nothing but Qt before the
    first paint. :meth:`start` then builds the views (pyqtgraph) and starts the engine's thread,
    which loads PyTorch and the dataset."""

    ready = Signal()  # dataset and first model are loaded
    shown = Signal(str, object)  # a view shows a new result: its topic and the result
    error_shown = Signal(str, str)  # title, message
    error_raised = Signal(str, str)  # from any thread: shown by show_error on the GUI thread
    command = Signal(object)  # to the engine's thread

    def __init__(
        self, config=None, dataset=None, dataset_name: str = "mnist",
        settings: QSettings | None = None, autostart: bool = True, features=None,
        user_model=None, model=None,
    ):  # fmt: skip
        super().__init__()
        self.setWindowTitle("ntkviz — learning dynamics of one gradient step")
        self.settings = settings or QSettings(ORGANIZATION, APPLICATION)
        self._engine_args = (config, dataset, dataset_name, user_model, model)
        self.last_error: tuple[str, str] | None = None
        self.show_message_boxes = True
        self.log_file: Path | None = None  # where errors are logged (set by app.run)
        self._close_after_save: str | None = None  # the session asked for on closing
        self._closed = False
        self.engine = None  # the EngineThread, once started
        self.thread: QThread | None = None
        self.state = AppState()
        self.controller = AppController(
            self.state, self.command.emit, self.confirm, self.show_error
        )
        self.views: dict[str, QWidget] = {}
        self._features = features
        self._build()
        self._restore_geometry()
        if autostart:
            QTimer.singleShot(0, self.start)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        self.tabs = QTabWidget()
        self.tabs.setObjectName("centralTabs")
        self.notice = QLabel("Starting ntkviz…")
        self.notice.setAlignment(Qt.AlignCenter)
        self.tabs.addTab(self.notice, "ntkviz")
        self.setCentralWidget(self.tabs)
        self.menus = {name: self.menuBar().addMenu(f"&{name}") for name in MENUS}
        self.menu_actions: dict[str, QAction] = {}
        self._model_actions: list[QAction] = []
        self._file_menu()
        self._finish_menus()
        self.status_labels = {k: QLabel(v) for k, v in (
            ("device", "device: –"), ("params", "parameters: –"), ("path", ""),
            ("step", "step: 0"), ("state", "loading…"))}  # fmt: skip
        for label in self.status_labels.values():
            self.statusBar().addPermanentWidget(label)
        self._path_of = -1  # the model number whose kernel path the status bar shows
        self.statusBar().showMessage("Loading PyTorch and the dataset…")
        self.error_raised.connect(self.show_error)  # queued when emitted off the GUI thread
        for event_filter in (StepKeys(self), WheelScrolls(self)):
            QApplication.instance().installEventFilter(event_filter)
        s = self.state
        s.events.model.connect(self._on_model)
        s.events.run_state.connect(self._on_run_state)
        self.controller.on("records", self._on_records)
        self.controller.on("kernel_path", self._on_kernel_path)
        self.controller.on("message", lambda event: self._status(event.payload, 10000))
        self.controller.on("session_saved", self._saved_before_closing)
        self.controller.on("session_not_saved", self._saved_before_closing)
        self._enable_model_actions(False)

    def _build_views(self) -> None:
        """Every feature's view: docks, the centre tab, the other tabs (each in a scroll area:
        wide control rows scroll instead of widening the window), menus, session parts."""
        from ntkviz.gui.features import FEATURES
        from ntkviz.gui.features.base import FeatureContext

        ctx = FeatureContext(
            self.controller, self.state, self._status, self.shown.emit, self.show_error,
            self.files.ask_path, self._attempt,
        )  # fmt: skip
        self.tabs.removeTab(self.tabs.indexOf(self.notice))
        for feature in self._features or FEATURES:
            self._add_view(feature(ctx))
        self.tabs.setCurrentIndex(0)
        self._refresh_plot_menu()
        state = self.settings.value("windowState")
        if state is None:
            docks = self.findChildren(QDockWidget)
            self.resizeDocks(docks, [250, 290][: len(docks)], Qt.Horizontal)  # at their least
        else:
            self.restoreState(state)
        for view in self.views.values():
            view.restore_settings(self.settings)

    def _add_view(self, view) -> None:
        self.views[view.name] = view
        if view.placement in ("left", "right"):
            area = Qt.LeftDockWidgetArea if view.placement == "left" else Qt.RightDockWidgetArea
            self.addDockWidget(area, self._dock(view))
        elif view.placement == "center":
            self.tabs.insertTab(0, view, view.title)
        else:
            scroll = QScrollArea()
            scroll.setWidgetResizable(True)
            scroll.setFrameShape(QFrame.NoFrame)
            scroll.setWidget(view)
            self.tabs.setTabToolTip(self.tabs.addTab(scroll, view.title), view.tooltip)
        for action in view.actions():
            self._action(action.menu, action.text, action.slot, action.shortcut, action.needs_model)
        part = view.session_state()
        if part is not None:
            self.controller.add_session_part(view.name, view.session_state, view.restore_session)

    def _dock(self, view) -> QDockWidget:
        scroll = QScrollArea()
        scroll.setWidget(view)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(view.minimumSizeHint().width() + 16)  # room for the scroll bar
        dock = QDockWidget(view.title, self)
        dock.setObjectName(f"{view.name}Dock")
        dock.setWidget(scroll)
        self.menus["View"].addAction(dock.toggleViewAction())
        return dock

    def _file_menu(self) -> None:
        self.files = FileMenu(self)
        self.plot_menu = self.files.build(partial(self._action, "File"), self.menus["File"])

    def _finish_menus(self) -> None:
        self._file_tail = self.menus["File"].addSeparator()  # views' File entries go above
        # QKeySequence.Quit is empty on some platforms (Windows, offscreen): Ctrl+Q there
        quit_keys = QKeySequence(QKeySequence.Quit)
        quit_action = QAction("&Quit", self)
        quit_action.setShortcut(quit_keys if not quit_keys.isEmpty() else QKeySequence("Ctrl+Q"))
        quit_action.triggered.connect(self.close)
        self.menus["File"].addAction(quit_action)
        self.menu_actions["&Quit"] = quit_action
        self._action("Help", "&About ntkviz", self.show_about, None, False)

    def _action(self, menu: str, text: str, slot, shortcut=None, needs_model=True) -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        tail = getattr(self, "_file_tail", None) if menu == "File" else None
        self.menus[menu].insertAction(tail, action)
        self.menu_actions[text] = action
        if needs_model:
            self._model_actions.append(action)
            action.setEnabled(self.state.model is not None)
        return action

    def _enable_model_actions(self, on: bool) -> None:
        for action in self._model_actions:
            action.setEnabled(on)

    def plots(self) -> dict:
        """Every exportable plot of every view built so far: name -> callable giving it."""
        return {name: item for view in self.views.values() for name, item in view.plots().items()}

    def _refresh_plot_menu(self) -> None:
        self.plot_menu.clear()
        for name in self.plots():
            self.plot_menu.addAction(name, lambda n=name: self.files.export_plot_dialog(n))

    def show_view(self, view: QWidget) -> None:
        """Bring the tab holding ``view`` (a tab's view sits in a scroll area) to the front."""
        for i in range(self.tabs.count()):
            page = self.tabs.widget(i)
            if page is view or page.isAncestorOf(view):
                self.tabs.setCurrentIndex(i)
                return
        raise ValueError(f"{type(view).__name__} is not in a tab")

    # ------------------------------------------------------------------ settings
    def _restore_geometry(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            screen = self.screen().availableGeometry() if self.screen() else None
            width, height = 1600, 1000
            if screen is not None:  # fit smaller screens
                width, height = min(width, screen.width()), min(height, screen.height())
            self.resize(width, height)

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        if self.views:  # the docks exist
            self.settings.setValue("windowState", self.saveState())
        for view in self.views.values():
            view.save_settings(self.settings)
        self.settings.sync()

    # ------------------------------------------------------------------ the engine
    def start(self) -> None:
        """Build the views, then start the engine's thread; it loads PyTorch and the dataset."""
        if self.engine is not None or self._closed:
            return
        from ntkviz.gui.worker_host import EngineThread, make_engine

        self.engine = EngineThread(make_engine(*self._engine_args))
        self._engine_args = None  # the engine owns the dataset now
        self.thread = self.engine.thread
        self.command.connect(self.engine.send)  # queued until the thread runs: none is lost
        self.engine.event.connect(self._on_event)
        self._build_views()  # views may send commands (periodic jobs) as they are built
        self.engine.start()
        self.controller.send("load")

    @Slot(object)
    def _on_event(self, event) -> None:
        self.controller.handle(event)

    def shutdown(self) -> None:
        """Stop the engine; wait at most :attr:`STOP_WAIT_MS` for its thread (idempotent)."""
        if self.engine is not None:
            self.engine.stop(self.STOP_WAIT_MS)
            self.engine, self.thread = None, None

    #: How long closing waits for the engine to finish the step of work it is in.
    STOP_WAIT_MS = 2000

    def closeEvent(self, event) -> None:
        if not self._may_close():
            event.ignore()
            return
        self._closed = True  # a start still queued (closed before the event loop ran) is void
        self._save_settings()
        self.shutdown()
        super().closeEvent(event)

    def _may_close(self) -> bool:
        """Ask before closing loses unsaved work: Save (a session, then close), Discard, or
        Cancel; a session still being written closes the window once it is. True when the window
        may close now."""
        if self.controller.saving and self.engine is not None:
            self._close_after_save = self.controller.saving[-1]  # close once it is written
            return False
        what = self.controller.unsaved_changes()
        if not what or not self.show_message_boxes or self.engine is None:
            return True
        box = QMessageBox(QMessageBox.Question, "Save before closing?", "", parent=self)
        box.setText(f"The model ({what}) has not been saved.")
        box.setInformativeText("Save it as a session (weights, curves, selection), or discard it?")
        box.setStandardButtons(QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
        box.setDefaultButton(QMessageBox.Save)
        answer = box.exec()
        if answer == QMessageBox.Discard:
            return True
        if answer == QMessageBox.Save:
            path = self.files.ask_path("Save session", "ntkviz session (*.ntks)")
            if path:  # close once the engine has written it (an error keeps the window open)
                self._close_after_save = path
                self.controller.save_session(path)
        return False

    def _saved_before_closing(self, event) -> None:
        """Close once the session asked for on closing is written; if it could not be written
        the window stays open, and later saves do not close it."""
        if event.payload == self._close_after_save:
            self._close_after_save = None
            if event.topic == "session_saved":
                self.close()

    def _on_run_state(self, state: str) -> None:
        self.status_labels["state"].setText(state)
        # "… ready; train it" is stale once it trains (one batch goes from ready to paused);
        # other messages stay, such as the parameters a fresh start could not reset
        bar = self.statusBar()
        if state in ("training", "paused") and READY_HINT in bar.currentMessage():
            bar.clearMessage()

    def _on_kernel_path(self, event) -> None:
        """The kernel path and one pair's cost of the model now held (earlier models' dropped)."""
        k, info = event.payload, self.state.model
        if info is None or k.number != info.number:
            return
        self._path_of = k.number
        label = self.status_labels["path"]
        label.setText(f"{k.description.split(' ')[0]} path · {1000 * k.pair_cost:.3g} ms a pair")
        label.setToolTip(f"{k.description}; one pair's K measured at {k.pair_cost:.3g} s")

    def _on_model(self, info) -> None:
        if info is None:
            return
        first = not self.menu_actions["&Save checkpoint…"].isEnabled()
        self.status_labels["device"].setText(f"device: {info.device}")
        self.status_labels["params"].setText(f"parameters: {info.num_parameters:,}")
        if info.number != self._path_of:
            self.status_labels["path"].setText("kernel path: measuring…")
            self.status_labels["path"].setToolTip("")
        self.status_labels["step"].setText(f"step: {info.step}")
        self._enable_model_actions(True)
        if first:
            self._status(f"{info.name} ({info.source}) {READY_HINT}", 8000)
            self.ready.emit()

    def _on_records(self, event) -> None:
        self.status_labels["step"].setText(f"step: {event.payload[-1].step}")

    # ------------------------------------------------------------------ messages
    def _status(self, text: str, ms: int = 5000) -> None:
        """A message in the status bar, elided to the room the permanent labels leave (the whole
        text in its tooltip)."""
        bar = self.statusBar()
        room = bar.width() - sum(w.width() for w in self.status_labels.values()) - 40
        bar.showMessage(bar.fontMetrics().elidedText(text, Qt.ElideRight, max(room, 100)), ms)
        bar.setToolTip(text)

    @Slot(str, str)
    def show_error(self, title: str, message: str) -> None:
        """Report an error: log, status bar, and a non-blocking message box."""
        log.warning("%s: %s", title, message)
        self.last_error = (title, message)
        self._status(f"{title}: {message}", 15000)
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

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (modal); always yes when message boxes are off (scripts)."""
        if not self.show_message_boxes:
            return True
        box = QMessageBox(QMessageBox.Question, title, text, QMessageBox.Cancel, self)
        yes = box.addButton("Discard it", QMessageBox.AcceptRole)
        box.setDefaultButton(QMessageBox.Cancel)
        box.exec()
        return box.clickedButton() is yes

    def show_about(self) -> None:
        show_about(self, self.log_file)

    # ------------------------------------------------------------------ files
    def _attempt(self, title: str, do, done: str) -> bool:
        try:
            do()
        except (OSError, ValueError) as e:
            self.show_error(title, str(e))
            return False
        self._status(done, 5000)
        return True

    def export_plot(self, name: str, path: str, width: int = 1600) -> bool:
        """Write the plot ``name`` (a key of :meth:`plots`) to ``path``; False on error."""
        return self.files.export_plot(name, path, width)
