"""Small widgets the views share: job controls, a paint queue, spin boxes, images."""

from __future__ import annotations

from collections import deque

import numpy as np
from PySide6.QtCore import QEvent, QObject, Qt, QTimer, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)


def spin(lo: int, hi: int, value: int, step: int = 1) -> QSpinBox:
    box = QSpinBox()
    box.setRange(lo, hi)
    box.setValue(value)
    box.setSingleStep(step)
    return box


def double_spin(lo: float, hi: float, decimals: int, step: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    return box


def digit_pixmap(image: np.ndarray, size: int) -> QPixmap:
    """uint8 ``(H, W)`` -> a nearest-neighbour scaled grey pixmap of ``size`` pixels."""
    a = np.ascontiguousarray(image)
    h, w = a.shape
    q = QImage(a.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    return QPixmap.fromImage(q).scaled(size, size, Qt.KeepAspectRatio, Qt.FastTransformation)


class JobControls(QWidget):
    """A job's Run button, Cancel button and progress bar, following the job's events
    (``follow(event)``): running from ``run_clicked`` to its result, cancellation or error."""

    run_clicked = Signal()
    cancel_clicked = Signal()

    def __init__(self, run_text: str = "Compute", parent: QWidget | None = None):
        super().__init__(parent)
        self.run_button = QPushButton(run_text)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setMaximumWidth(160)
        self.progress.setValue(0)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        for w in (self.run_button, self.cancel_button, self.progress):
            lay.addWidget(w)
        self.run_button.clicked.connect(self.run_clicked)
        self.cancel_button.clicked.connect(self.cancel_clicked)

    @property
    def running(self) -> bool:
        return self.cancel_button.isEnabled()

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setMaximum(1)
            self.progress.setValue(0)

    def follow(self, event) -> None:
        """Show a job event of the feature: progress, or its end."""
        if event.kind == "progress":
            self.set_running(True)
            self.progress.setMaximum(max(event.payload.total, 1))
            self.progress.setValue(event.payload.done)
            return
        self.set_running(False)
        if event.kind == "result":
            self.progress.setValue(self.progress.maximum())
        else:
            self.progress.setValue(0)


class PaintQueue(QObject):
    """Applies queued ``(widget, update)`` pairs one per event-loop turn, painting each changed
    widget at once: a big result never holds the event loop for all its repaints together."""

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._queue: deque = deque()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._next)

    def put(self, steps: list) -> None:
        """Queue ``(widget or None, callable)`` pairs; the newest come last, so they win."""
        self._queue.extend(steps)
        if not self._timer.isActive():
            self._timer.start()

    def _next(self) -> None:
        if not self._queue:
            return
        widget, update = self._queue.popleft()
        update()
        if widget is not None and widget.isVisible():
            widget.repaint()
        if self._queue:
            self._timer.start()


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
