"""Screenshots of the ntkviz window for the docs: train briefly, choose a "4" as x_u (train) and a
"9" as x_o (test), show the decomposition, preview and apply steps, and grab the window.

    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py [out_dir]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication


def wait_until(app: QApplication, condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for the window ({condition})")
        app.processEvents()
        time.sleep(0.005)


def open_window(app: QApplication):
    """The real window with fresh settings, a 20,000-image 1-epoch config, shown and ready."""
    from ntkviz.gui.window import MainWindow
    from ntkviz.training import TrainConfig

    settings = QSettings(str(Path(tempfile.mkdtemp()) / "ntkviz.ini"), QSettings.IniFormat)
    window = MainWindow(config=TrainConfig(train_size=20000, epochs=1), settings=settings)
    window.show_message_boxes = False
    window.resize(1680, 1050)
    window.show()
    wait_until(app, lambda: window.state.model is not None and current(window))
    return window


def current(window) -> bool:
    """The shown decomposition and step history answer the newest requests."""
    pair, generation = window.views["pair"], window.controller.generation
    return (
        pair.shown_generation == generation["pair"]
        and pair.shown_history_generation == generation["history"]
    )


def start_training(app: QApplication, window) -> None:
    """Start a run and wait for its end."""
    window.views["training"].start_button.click()
    try:
        wait_until(app, lambda: window.state.run_state == "finished", 600)
    except TimeoutError:
        print("state", window.state.run_state, "error", window.last_error)
        window.close()
        raise


def select(app: QApplication, window, lr: float = 0.05):
    """x_u: the third "4" of the training split, learnt as 4; x_o: the fourth "9" of the test
    split; η = ``lr``. Waits until the window shows them."""
    from ntkviz.app.state import Example

    labels = window.state.dataset.labels
    u = int((labels["train"] == 4).nonzero()[0][2])
    o = int((labels["test"] == 9).nonzero()[0][3])
    window.controller.select(x_u=Example("train", u), y_u=4, x_o=Example("test", o), lr=lr)
    wait_until(app, lambda: current(window))


def main(out_dir: str = "docs/screenshots") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = open_window(app)

    start_training(app, window)
    select(app, window)
    pair = window.views["pair"]
    for _ in range(20):
        app.processEvents()
    window.grab().save(str(out / "main.png"))
    pair.decomposition_view.grab().save(str(out / "decomposition.png"))

    for n in range(5):
        window.controller.apply_step()
        wait_until(app, lambda n=n: current(window) and pair.last_result.applied_steps == n + 1)
    for _ in range(20):
        app.processEvents()
    window.grab().save(str(out / "step.png"))
    pair.step_panel.grab().save(str(out / "step_panel.png"))
    window.close()
    print(f"wrote screenshots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
