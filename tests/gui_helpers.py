"""Driving the window in tests: open it, wait for results, read the engine's model."""

import torch
from PySide6.QtCore import QSettings, Qt
from PySide6.QtWidgets import (
    QAbstractButton,
    QAbstractSpinBox,
    QComboBox,
    QDockWidget,
    QScrollArea,
)

from ntkviz.gui.graphics import pg
from ntkviz.gui.window import MainWindow
from ntkviz.training import TrainConfig

SMALL = TrainConfig(train_size=640, batch_size=64, epochs=2, eval_every=5, eval_size=200)
TIMEOUT = 60_000


def settings_in(tmp_path) -> QSettings:
    return QSettings(str(tmp_path / "ntkviz.ini"), QSettings.IniFormat)


def open_window(qtbot, settings, dataset=None, config=SMALL) -> MainWindow:
    window = MainWindow(config=config, dataset=dataset, settings=settings)
    window.show_message_boxes = False
    qtbot.addWidget(window)
    with qtbot.waitSignal(window.ready, timeout=TIMEOUT):
        window.show()
    wait_current(qtbot, window)
    return window


def wait_current(qtbot, window) -> None:
    """Wait until the shown decomposition and step history answer the newest requests."""
    pair, generation = window.views["pair"], window.controller.generation
    qtbot.waitUntil(
        lambda: (
            pair.shown_generation == generation["pair"]
            and pair.shown_history_generation == generation["history"]
        ),
        timeout=TIMEOUT,
    )


def wait_shown(qtbot, window, topic: str, action):
    """Run ``action()`` and return the payload of the next ``shown`` signal of ``topic``."""
    with qtbot.waitSignal(
        window.shown, timeout=TIMEOUT, check_params_cb=lambda t, payload: t == topic
    ) as blocker:
        action()
    return blocker.args[1]


def wait_event(qtbot, window, topic: str, action, kind: str | None = None):
    """Run ``action()`` and return the next accepted event of ``topic`` (of ``kind``)."""
    got = []
    window.controller.on(topic, lambda e: got.append(e) if kind is None or e.kind == kind else None)
    action()
    qtbot.waitUntil(lambda: bool(got), timeout=TIMEOUT)
    return got[0]


def model_state(qtbot, window) -> dict:
    """The engine's state_dict, as tensors."""
    event = wait_event(
        qtbot, window, "state_dict", lambda: window.controller.send("send_state_dict")
    )
    return {k: torch.from_numpy(v.copy()) for k, v in event.payload.items()}


def train_batches(qtbot, window, n: int) -> None:
    training = window.views["training"]
    for _ in range(n):
        wait_shown(qtbot, window, "records", training.batch_button.click)
        qtbot.waitUntil(lambda: window.state.run_state == "paused", timeout=TIMEOUT)
    wait_current(qtbot, window)


def cut_off(window) -> list[str]:
    """Widgets of the current tab and the docks that are not shown at least at their minimum
    size: clipped or squeezed controls, plots whose content is wider than their view, tabs
    behind scroll arrows, sideways scrolling."""
    problems = []
    tabs = window.tabs
    if tabs.tabBar().sizeHint().width() > tabs.width():
        problems.append("tab bar: tabs hidden behind scroll arrows")
    page = tabs.currentWidget()
    roots = [page, *(d.widget() for d in window.findChildren(QDockWidget) if d.isVisible())]
    for root in roots:
        for area in [root, *root.findChildren(QScrollArea)]:
            if isinstance(area, QScrollArea) and area.horizontalScrollBar().maximum() > 0:
                problems.append(f"{type(area.widget()).__name__}: scrolls sideways")
        widgets = root.findChildren(QAbstractButton) + root.findChildren(QComboBox)
        widgets += root.findChildren(QAbstractSpinBox) + root.findChildren(pg.GraphicsView)
        for w in widgets:
            # a graphics view is covered by its viewport: the viewport is what shows
            shown = w.viewport() if isinstance(w, pg.GraphicsView) else w
            if not w.isVisibleTo(window) or shown.visibleRegion().isEmpty():
                continue  # in a hidden part, or scrolled out of a dock vertically
            name = f"{type(w).__name__} {getattr(w, 'text', lambda: '')() or ''}".strip()
            visible = shown.visibleRegion().boundingRect()
            need = w.minimumWidth() or min(w.minimumSizeHint().width(), w.sizeHint().width())
            if visible.width() < need:
                problems.append(f"{name}: {visible.width()} px wide, needs {need}")
            if isinstance(w, pg.GraphicsView):
                item = w.centralWidget
                need = item.effectiveSizeHint(Qt.SizeHint.MinimumSize).width()
                if need > w.viewport().width() + 1:
                    problems.append(f"{name}: its plots need {need:.0f} px, "
                                    f"it has {w.viewport().width()}")  # fmt: skip
    return problems
