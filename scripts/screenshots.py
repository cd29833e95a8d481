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
    from ntkviz.gui.main_window import MainWindow
    from ntkviz.training import TrainConfig

    settings = QSettings(str(Path(tempfile.mkdtemp()) / "ntkviz.ini"), QSettings.IniFormat)
    window = MainWindow(config=TrainConfig(train_size=20000, epochs=1), settings=settings)
    window.show_message_boxes = False
    window.resize(1680, 1050)
    window.show()
    wait_until(app, lambda: window.model_info is not None and window.last_result is not None)
    return window


def main(out_dir: str = "docs/screenshots") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = open_window(app)

    window.start_training()
    try:
        wait_until(app, lambda: window.state == "finished")
    except TimeoutError:
        print("state", window.state, "error", window.last_error, "records", window.records_received)
        window.close()
        raise
    labels = window.dataset.labels
    u = int((labels["train"] == 4).nonzero()[0][2])
    o = int((labels["test"] == 9).nonzero()[0][3])
    window.x_u_picker.select("train", u)
    window.x_o_picker.select("test", o)
    window.step_panel.lr.setValue(0.05)
    gen = window.generation
    wait_until(app, lambda: window.last_result is not None and window.generation == gen
               and window.last_result.request.index_o == o and window.last_history is not None
               and window.last_history.request.index_o == o)  # fmt: skip
    for _ in range(20):
        app.processEvents()
    window.grab().save(str(out / "main.png"))
    window.decomposition_view.grab().save(str(out / "decomposition.png"))

    for _ in range(5):
        window.apply_step()
        n = window.last_result.applied_steps
        wait_until(app, lambda n=n: window.last_result.applied_steps == n + 1)
    wait_until(app, lambda: window.last_history is not None and len(window.last_history.lrs) == 5)
    for _ in range(20):
        app.processEvents()
    window.grab().save(str(out / "step.png"))
    window.step_panel.grab().save(str(out / "step_panel.png"))
    window.close()
    print(f"wrote screenshots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
