"""Entry point of the desktop app: ``run(argv)`` shows the window at once, then loads PyTorch,
the dataset and the model (in the worker thread) while the window says "loading"."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from pathlib import Path

log = logging.getLogger("ntkviz")


def log_path() -> Path:
    """The app's log file: ``$NTKVIZ_LOG``, else ``$XDG_STATE_HOME/ntkviz/ntkviz.log``, else
    ``~/.local/state/ntkviz/ntkviz.log``."""
    if path := os.environ.get("NTKVIZ_LOG"):
        return Path(path)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "ntkviz" / "ntkviz.log"


class _Onward(logging.Handler):
    """Passes ntkviz's records on to the root logger's handlers (but ntkviz's own file) from
    ``level`` up: what they received before ntkviz began logging at info level to its file."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger().handlers:
            if getattr(handler, "ntkviz_log", None) is None and record.levelno >= handler.level:
                handler.handle(record)


def setup_logging(process: bool = True) -> Path | None:
    """Log to :func:`log_path` (1 MB, two old files kept) and, for the app's own process
    (``process``), everything to stderr too. From :func:`show` in someone else's process
    (``process=False``) only ntkviz's own records go to the file, at info level, and the caller's
    handlers receive ntkviz's records exactly as before (its level for ntkviz is kept for them).
    Returns the file's path, or None when it cannot be written (with a warning). Called again,
    it adds nothing."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    root, ours = logging.getLogger(), logging.getLogger("ntkviz")
    path = log_path()
    marks = [getattr(h, "ntkviz_log", None) for h in (*root.handlers, *ours.handlers)]
    if path in marks:
        return path
    if process:
        root.setLevel(logging.INFO)
        if "stderr" not in marks:
            stderr = logging.StreamHandler()
            stderr.setFormatter(fmt)
            stderr.ntkviz_log = "stderr"
            root.addHandler(stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=1_000_000, backupCount=2, encoding="utf-8"
        )
    except OSError as e:
        log.warning("no log file (%s); logging to stderr only", e)
        return None
    handler.setFormatter(fmt)
    handler.ntkviz_log = path
    if process:
        root.addHandler(handler)
        return path
    onward = _Onward(ours.getEffectiveLevel())
    onward.ntkviz_log = "onward"
    ours.setLevel(logging.INFO)
    ours.propagate = False  # the onward handler passes on what the caller's handlers saw
    ours.addHandler(onward)
    ours.addHandler(handler)
    return path


def excepthook_for(window):
    """A ``sys.excepthook`` for exceptions escaping a slot (PySide6 reports them to it on the
    thread that raised, and goes on): log them with their traceback and show them in
    ``window``, through a signal, queued to the GUI thread when raised on another."""

    def excepthook(kind, value, tb):
        log.error("uncaught exception", exc_info=(kind, value, tb))
        window.error_raised.emit("Internal error", f"{kind.__name__}: {value}")

    return excepthook


def _qt_running() -> bool:
    """A Qt application runs already in this process (it found its display)."""
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() is not None


def no_display() -> str | None:
    """Why Qt would find no display here (Linux without X11 or Wayland and no platform chosen),
    else None: Qt aborts the process in that case instead of raising."""
    env = os.environ
    if not sys.platform.startswith("linux") or env.get("QT_QPA_PLATFORM"):
        return None
    if env.get("DISPLAY") or env.get("WAYLAND_DISPLAY"):
        return None
    return (
        "no display (neither DISPLAY nor WAYLAND_DISPLAY is set): run it with "
        "`xvfb-run -a`, or set QT_QPA_PLATFORM=offscreen to draw without a screen"
    )


def run(argv: list[str] | None = None) -> int:
    """Open the ntkviz main window; return the application's exit code."""
    from PySide6.QtWidgets import QApplication

    from ntkviz.gui.window import APPLICATION, ORGANIZATION, MainWindow

    path = setup_logging()
    app = QApplication.instance() or QApplication(list(argv or sys.argv[:1]))
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    window = MainWindow(autostart=False)
    window.log_file = path
    sys.excepthook = excepthook_for(window)
    after_first_paint(window, window.start)
    window.show()
    return app.exec()


def after_first_paint(window, callback, wait_ms: int = 1000) -> None:
    """Call ``callback`` once ``window`` has painted (or after ``wait_ms``, if the platform
    paints nothing before): the views, pyqtgraph and PyTorch load after the window is seen."""
    from PySide6.QtCore import QEvent, QObject, QTimer
    from PySide6.QtWidgets import QApplication, QWidget

    app = QApplication.instance()

    class Watch(QObject):
        done = False

        def eventFilter(self, obj, event):
            if (
                not self.done
                and event.type() == QEvent.Paint
                and isinstance(obj, QWidget)
                and obj.window() is window
            ):
                self.fire()
            return False

        def fire(self):
            if not self.done:
                self.done = True
                app.removeEventFilter(self)
                QTimer.singleShot(0, callback)

    watch = Watch(window)
    app.installEventFilter(watch)
    QTimer.singleShot(wait_ms, watch.fire)


def show(model=None, data=None, *, config=None, block: bool = True, train: bool = False):
    """Open the ntkviz app on ``model`` (any ``nn.Module`` mapping a batch to logits ``(N, V)``;
    default: the registry's LeNet) and ``data`` (default: the shipped MNIST): an
    :class:`~ntkviz.data.ImageDataset`, a ``(train, test)`` pair of map-style datasets yielding
    ``(image, label)`` such as torchvision's, one such dataset (a test part is held out), a
    dataset name or a folder of class folders (see :func:`~ntkviz.data.as_image_dataset`),
    from a script or a notebook.

    The model is copied: the app never trains the caller's object unless ``train`` is true (then
    it works on it in its own thread — leave it alone meanwhile). "Start" re-initialises a copy
    of the model as given (each layer's ``reset_parameters``); "Continue" trains the current one.
    ``config``: a ``TrainConfig`` for training. ``block``: run the event loop until the window
    closes and return None; else return the window at once (in IPython the Qt event loop is
    integrated, as napari does, so the notebook stays usable).
    """
    import copy

    import torch

    from ntkviz.training import TrainConfig

    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a ntkviz.TrainConfig, got {type(config).__name__}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (why := no_display()) and not _qt_running():
        raise RuntimeError(f"the desktop app cannot start: {why}")

    from PySide6.QtWidgets import QApplication

    from ntkviz.gui.window import APPLICATION, ORGANIZATION, MainWindow

    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "ntkviz"])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    user, given = None, None
    if model is not None:
        from dataclasses import replace

        from ntkviz.app.engine import UserModel

        user = UserModel.given(model)
        given = model if train else copy.deepcopy(model)
        config = replace(config or TrainConfig(), model=user.label)
    window = MainWindow(config=config, dataset=data, user_model=user, model=given)
    window.log_file = setup_logging(process=False)
    window.show()
    if block:
        app.exec()
        return None
    try:  # a notebook: let IPython run Qt's event loop between cells
        from IPython import get_ipython

        shell = get_ipython()
        if shell is not None:
            shell.enable_gui("qt")
    except ImportError:
        pass
    return window
