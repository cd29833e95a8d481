"""Entry point of the desktop app: ``run(argv)`` shows the window at once, then loads PyTorch,
the dataset and the model (in the worker thread) while the window says "loading"."""

from __future__ import annotations

import logging
import sys


def run(argv: list[str] | None = None) -> int:
    """Open the ntkviz main window; return the application's exit code."""
    from PySide6.QtWidgets import QApplication

    from ntkviz.gui.main_window import APPLICATION, ORGANIZATION, MainWindow

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    app = QApplication.instance() or QApplication(list(argv or sys.argv[:1]))
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    window = MainWindow(autostart=False)
    window.show()
    app.processEvents()  # first paint before PyTorch is imported
    window.start()
    return app.exec()
