"""The ntkviz desktop app (PySide6 + pyqtgraph). The only package of ntkviz that imports Qt.

``app.run(argv)`` opens :class:`~ntkviz.gui.main_window.MainWindow`; a
:class:`~ntkviz.gui.worker.TrainingWorker` on its own ``QThread`` owns the model.
"""
