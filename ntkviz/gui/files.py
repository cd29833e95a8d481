"""The window's File menu: checkpoints, sessions, a model and a dataset of the user's, plot exports,
through file dialogs that remember the last directory."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QObject
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QFileDialog, QInputDialog

from ntkviz.gui.dialogs import DatasetDialog, ModelDialog
from ntkviz.gui.export import ask_save_path, export_graphics

CHECKPOINTS = "ntkviz checkpoint (*.pt)"
SESSIONS = "ntkviz session (*.ntks)"


class FileMenu(QObject):
    """Fills the window's File menu and carries out its entries through the controller."""

    def __init__(self, window):
        super().__init__(window)
        self.window = window
        self.controller = window.controller

    def build(self, add, menu):
        """Add the entries (``add(text, slot, shortcut, needs_model)``); returns the "Export
        plot" submenu, which the window fills once its views are built."""
        add("&Open checkpoint…", self.open_checkpoint, QKeySequence.Open, False)
        add("&Save checkpoint…", self.save_checkpoint, QKeySequence.Save)
        add("Open s&ession…", self.open_session, "Ctrl+Shift+O", False)
        add("Save sessio&n…", self.save_session, "Ctrl+Shift+S")
        add("Open &model…", self.open_model, "Ctrl+M", False)
        add("Open &dataset…", self.open_dataset, "Ctrl+D", False)
        menu.addSeparator()
        add("Export &figure…", lambda: self.export_plot_dialog("Decomposition"), "Ctrl+E")
        return menu.addMenu("Export &plot")

    def ask_path(self, title: str, filters: str, save: bool = True) -> str:
        """A path from a file dialog (a saved file gets the chosen filter's suffix if it has
        none); ``""`` if cancelled."""
        settings = self.window.settings
        directory = str(settings.value("lastDirectory", str(Path.home())))
        if save:
            path = ask_save_path(self.window, title, filters, directory)
        else:
            path, _ = QFileDialog.getOpenFileName(self.window, title, directory, filters)
        if path:
            settings.setValue("lastDirectory", str(Path(path).parent))
        return path

    def open_checkpoint(self) -> None:
        if path := self.ask_path("Open checkpoint", CHECKPOINTS, save=False):
            self.controller.open_checkpoint(path)

    def save_checkpoint(self) -> None:
        if path := self.ask_path("Save checkpoint", CHECKPOINTS):
            self.controller.save_checkpoint(path)

    def open_session(self) -> None:
        if path := self.ask_path("Open session", SESSIONS, save=False):
            self.controller.open_session(path)

    def save_session(self) -> None:
        if path := self.ask_path("Save session", SESSIONS):
            self.controller.save_session(path)

    def open_model(self) -> None:
        """A model of the user's: a factory and optional weights (checked on the data by the
        engine; a model that does not fit changes nothing)."""
        directory = str(self.window.settings.value("lastDirectory", str(Path.home())))
        dialog = ModelDialog(self.window, directory)
        if dialog.exec() and dialog.values()[0]:
            self.controller.open_model(*dialog.values())

    def open_dataset(self) -> None:
        """A named dataset or a folder of class folders, with a fresh model for it."""
        directory = str(self.window.settings.value("lastDirectory", str(Path.home())))
        dataset = self.controller.state.dataset
        dialog = DatasetDialog(self.window, directory, dataset.name if dataset else "")
        if dialog.exec():
            source, root, download = dialog.values()
            if not source:
                self.window.show_error("No dataset", "choose a folder of class folders")
                return
            state = self.controller.state  # the model kind chosen in the training dock
            kind = (state.model_kind or state.model.config.model) if state.model else None
            self.controller.open_dataset(source, root, download, kind)

    def export_plot_dialog(self, name: str) -> None:
        path = self.ask_path(f"Export {name}", "PNG image (*.png);;SVG vector image (*.svg)")
        if not path:
            return
        width = 1600
        if Path(path).suffix.lower() == ".png":
            width, ok = QInputDialog.getInt(
                self.window, "PNG width", "width in pixels", 1600, 100, 20000, 100
            )
            if not ok:
                return
        self.window.export_plot(name, path, width)

    def export_plot(self, name: str, path: str, width: int = 1600) -> bool:
        """Write the plot ``name`` (a key of the window's ``plots()``) to ``path``."""
        window = self.window
        if name == "Decomposition" and self.controller.current("pair") is None:
            window.show_error("Nothing to export", "no decomposition has been computed yet")
            return False
        from ntkviz.gui.features.base import ProbeView  # pyqtgraph: after the first paint

        owner = next(v for v in window.views.values() if name in v.plots())
        if isinstance(owner, ProbeView) and not owner.data():
            window.show_error(
                "Nothing to export", f"{owner.title}: nothing computed yet ({owner.run_text} first)"
            )
            return False
        item = window.plots()[name]
        return window._attempt(
            "Export failed", lambda: export_graphics(item(), path, width), f"wrote {path}"
        )
