"""Small widgets the views share: job controls, a paint queue, spin boxes, images."""

from __future__ import annotations

from collections import deque

import numpy as np
from PySide6.QtCore import QEvent, QObject, QPoint, QRect, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QIcon, QImage, QKeySequence, QPixmap, QValidator
from PySide6.QtWidgets import (
    QAbstractSpinBox,
    QApplication,
    QDoubleSpinBox,
    QGraphicsView,
    QHBoxLayout,
    QLabel,
    QLayout,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QTextEdit,
    QToolButton,
    QVBoxLayout,
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
    box.setDecimals(decimals)  # first: the range is rounded to the decimals
    box.setRange(lo, hi)
    box.setSingleStep(step)
    return box


class ScientificSpinBox(QDoubleSpinBox):
    """A spin box for a positive quantity that spans decades (a learning rate): shown with six
    significant digits ("0.05", "4e-06"), typed in any float form ("3e-4"), stepped ×/÷ 2."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.setDecimals(15)
        self.setRange(lo, hi)
        self.setToolTip(f"from {lo:g} to {hi:g}; the arrows halve or double it")

    def textFromValue(self, value: float) -> str:
        return f"{value:.6g}"

    def valueFromText(self, text: str) -> float:
        return float(text)

    def validate(self, text: str, pos: int):
        try:
            ok = self.minimum() <= float(text) <= self.maximum()
        except ValueError:
            ok = False
        return (QValidator.State.Acceptable if ok else QValidator.State.Intermediate, text, pos)

    def stepBy(self, steps: int) -> None:
        self.setValue(self.value() * 2.0**steps)


def fit_text(*buttons: QPushButton) -> None:
    """Let buttons be as narrow as their text (the style's 80 px minimum would widen docks)."""
    for b in buttons:
        b.setMinimumWidth(b.fontMetrics().horizontalAdvance(b.text()) + 20)


def image_pixmap(image: np.ndarray, size: int) -> QPixmap:
    """uint8 ``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) -> a pixmap of at most ``size`` pixels a
    side, nearest-neighbour when enlarged (pixels stay crisp), smooth when reduced."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    h, w = a.shape[:2]
    if a.ndim == 3:
        q = QImage(a.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    else:
        q = QImage(a.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    mode = Qt.FastTransformation if size >= max(h, w) else Qt.SmoothTransformation
    return QPixmap.fromImage(q).scaled(size, size, Qt.KeepAspectRatio, mode)


#: Class names under thumbnails are cut to this many characters.
THUMB_NAME = 10


class ThumbnailRow(QWidget):
    """A titled row of clickable example thumbnails, wrapping when narrow: ``set_items`` takes
    ``(image, text, tooltip, payload)`` tuples; a click emits ``clicked(payload)``."""

    clicked = Signal(object)

    def __init__(self, title: str, count: int, size: int = 40, parent: QWidget | None = None):
        super().__init__(parent)
        self.size = size
        self.buttons: list[QToolButton] = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.title = QLabel(title)
        lay.addWidget(self.title)
        row = FlowLayout()
        for _ in range(count):
            b = QToolButton()
            b.setIconSize(QSize(size, size))
            b.setToolButtonStyle(Qt.ToolButtonTextUnderIcon)
            b.setEnabled(False)
            b.clicked.connect(lambda checked=False, b=b: self.clicked.emit(b.property("payload")))
            self.buttons.append(b)
            row.addWidget(b)
        lay.addLayout(row)

    def set_items(self, items) -> None:
        """Show ``items`` (as many as there are buttons); hide the other buttons."""
        for k, b in enumerate(self.buttons):
            b.setVisible(k < len(items))
            if k < len(items):
                image, text, tooltip, payload = items[k]
                b.setIcon(QIcon(image_pixmap(image, self.size)))
                b.setText(text)
                b.setToolTip(tooltip)
                b.setProperty("payload", payload)
                b.setEnabled(True)


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
        fit_text(self.run_button, self.cancel_button)
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
        """Show a job event of the feature: progress, or its end (a failure says so on the bar,
        with the message as its tooltip)."""
        failed = event.kind == "error"
        self.progress.setFormat("failed" if failed else "%p%")
        self.progress.setToolTip(": ".join(event.payload) if failed else "")
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

    def put(self, steps: list, tag: str = "") -> None:
        """Queue ``(widget or None, callable)`` pairs under ``tag``; the newest come last, so
        they win."""
        self._queue.extend((widget, update, tag) for widget, update in steps)
        if not self._timer.isActive():
            self._timer.start()

    def clear(self, tag: str) -> None:
        """Drop the updates queued under ``tag`` and not applied yet."""
        self._queue = deque(item for item in self._queue if item[2] != tag)

    def _next(self) -> None:
        if not self._queue:
            return
        widget, update, _ = self._queue.popleft()
        update()
        if widget is not None and widget.isVisible():
            widget.repaint()
        if self._queue:
            self._timer.start()


class StepKeys(QObject):
    """Application event filter that makes the step keys window-wide: Space (apply a step) and
    Ctrl+Z (undo it) reach the window's shortcuts from any control — a focused button, list,
    slider or spin box — except a field where text is typed (a line edit, a text box)."""

    def eventFilter(self, obj, event) -> bool:
        if event.type() != QEvent.ShortcutOverride or not self._step_key(event):
            return False
        focus = QApplication.focusWidget()
        if isinstance(focus, QTextEdit | QPlainTextEdit) or (
            isinstance(focus, QLineEdit) and not isinstance(focus.parent(), QAbstractSpinBox)
        ):
            return False  # typing: the field keeps its keys
        event.ignore()  # not overridden: the shortcut fires
        return True

    @staticmethod
    def _step_key(event) -> bool:
        plain = event.key() == Qt.Key_Space and event.modifiers() == Qt.NoModifier
        return plain or event.matches(QKeySequence.Undo)


class WheelScrolls(QObject):
    """Application event filter: the mouse wheel over a plot scrolls the tab or dock around
    it, as over any other widget; Ctrl+wheel zooms the plot."""

    def eventFilter(self, obj, event) -> bool:
        if (
            event.type() != QEvent.Wheel
            or event.modifiers() & Qt.ControlModifier
            or not isinstance(obj.parent(), QGraphicsView)
        ):
            return False
        area = obj.parent().parent()
        while area is not None and not isinstance(area, QScrollArea):
            area = area.parent()
        if area is not None:
            QApplication.sendEvent(area.verticalScrollBar(), event)
        return True


def labelled(*parts) -> QWidget:
    """Texts (as labels) and widgets in one row that a :class:`FlowLayout` keeps together."""
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    for part in parts:
        row.addWidget(QLabel(part) if isinstance(part, str) else part)
    return box


class FlowLayout(QLayout):
    """Lays widgets out left to right and wraps them onto the next line when the width runs
    out (control rows that must not set a tab's minimum width)."""

    def __init__(self, parent: QWidget | None = None, spacing: int = 6):
        super().__init__(parent)
        self._items: list = []
        self.setContentsMargins(0, 0, 0, 0)
        self.setSpacing(spacing)

    def addItem(self, item) -> None:
        self._items.append(item)

    def count(self) -> int:
        return len(self._items)

    def itemAt(self, index: int):
        return self._items[index] if 0 <= index < len(self._items) else None

    def takeAt(self, index: int):
        return self._items.pop(index) if 0 <= index < len(self._items) else None

    def expandingDirections(self):
        return Qt.Orientation(0)

    def hasHeightForWidth(self) -> bool:
        return True

    def heightForWidth(self, width: int) -> int:
        return self._place(QRect(0, 0, width, 0), move=False)

    def setGeometry(self, rect: QRect) -> None:
        super().setGeometry(rect)
        self._place(rect, move=True)

    def sizeHint(self) -> QSize:
        return self.minimumSize()

    def minimumSize(self) -> QSize:
        size = QSize()
        for item in self._items:
            size = size.expandedTo(item.minimumSize())
        m = self.contentsMargins()
        return size + QSize(m.left() + m.right(), m.top() + m.bottom())

    def _place(self, rect: QRect, move: bool) -> int:
        m = self.contentsMargins()
        area = rect.adjusted(m.left(), m.top(), -m.right(), -m.bottom())
        x, y, line = area.x(), area.y(), 0
        for item in self._items:
            hint = item.sizeHint()
            if x + hint.width() > area.right() + 1 and line > 0:
                x, y, line = area.x(), y + line + self.spacing(), 0
            if move:
                item.setGeometry(QRect(QPoint(x, y), hint))
            x += hint.width() + self.spacing()
            line = max(line, hint.height())
        return y + line - rect.y() + m.bottom()
