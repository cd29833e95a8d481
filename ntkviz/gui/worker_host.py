"""WorkerHost: the engine's home on its own ``QThread``.

One slot takes commands (queued from the GUI thread), one signal carries the engine's events
back (queued to the GUI thread). A zero-interval timer calls ``Engine.tick`` while the engine has
work, so commands such as pause, cancel and shutdown are taken between two slices of at most
``Engine.tick_seconds``.

The engine, and with it PyTorch, is created on this thread by its first command: every torch op
of the app runs here, none on the GUI thread (tests check this). Beyond the house rule it is a
matter of speed: a thread that has run one parallel op keeps an OpenMP team, and with two teams
on a 2-core machine libgomp throttles its spin-waiting, so that the worker's convolutions and
matrix products run about 3× slower from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from PySide6.QtCore import QCoreApplication, QObject, QThread, QTimer, Signal, Slot

from ntkviz.app.messages import Command

log = logging.getLogger(__name__)


class WorkerHost(QObject):
    """Runs ``make_engine(emit)`` (on its thread, at the first command), then every command.
    Create it, ``moveToThread`` a started ``QThread``, and talk to it only through signals."""

    event = Signal(object)

    def __init__(self, make_engine: Callable):
        super().__init__()
        self._make_engine = make_engine
        self.engine = None
        self._timer = QTimer(self)  # moves with the host to its thread
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._tick)

    @Slot(object)
    def command(self, command: Command) -> None:
        if command.name == "shutdown":
            self._timer.stop()
            if self.engine is not None:
                self.engine.shutdown()
            QThread.currentThread().quit()
            return
        if self.engine is None:
            self.engine = self._make_engine(self.event.emit)
        self.engine.handle(command)
        if self.engine.busy and not self._timer.isActive():
            self._timer.start()

    def _tick(self) -> None:
        if not self.engine.tick():
            self._timer.stop()


class EngineThread(QObject):
    """The engine's thread with its :class:`WorkerHost`, owned by the application: it stops when
    the application quits, whatever became of the window. ``send(Command)`` queues a command;
    ``event`` carries the engine's events (connect it to a slot of a GUI-thread object)."""

    command = Signal(object)

    def __init__(self, make_engine: Callable):
        super().__init__(QCoreApplication.instance())
        self.host = WorkerHost(make_engine)
        self.event = self.host.event
        self.thread = QThread(self)
        self.thread.setObjectName("ntkviz-worker")
        self.host.moveToThread(self.thread)
        self.thread.finished.connect(self.host.deleteLater)
        self.command.connect(self.host.command)
        QCoreApplication.instance().aboutToQuit.connect(self._finish)

    def start(self) -> None:
        self.thread.start()

    def send(self, command: Command) -> None:
        self.command.emit(command)

    @property
    def running(self) -> bool:
        return self.thread.isRunning()

    def stop(self, timeout_ms: int = 30000) -> bool:
        """Stop the engine between two slices of work and wait up to ``timeout_ms`` for its
        thread (idempotent). False if it is still busy then (one step of a long job): it stops
        when that step ends, and this object (the application's) keeps the thread alive."""
        if self.thread.isRunning():
            self.command.emit(Command("shutdown"))
            if not self.thread.wait(timeout_ms):
                log.warning("the engine is still finishing a step of work; it stops after it")
                return False
        return True

    def _finish(self) -> None:
        """As the application quits: stop, and wait for the thread however long its last slice
        of work takes (a QThread destroyed while it runs would abort the process)."""
        if not self.stop():
            self.thread.wait()


def make_engine(config, dataset, dataset_name: str, user_model=None, model=None) -> Callable:
    """A factory for :class:`WorkerHost` that imports the engine (and PyTorch) when called."""

    def make(emit):
        from ntkviz.app.engine import Engine

        return Engine(emit, config, dataset, dataset_name, user_model, model)

    return make
