"""Exporting figures (PNG at a chosen width, SVG) and decomposition data (CSV, NPZ, JSON).

Data export is Qt-free (it is the core's :func:`ntkviz.results.write_decomposition`); Qt is
imported only inside the figure functions. Every file is written atomically: a failed export
leaves no partial file behind and raises ``OSError``/``ValueError`` with a clear message.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

FIGURE_FORMATS = (".png", ".svg")
DATA_FORMATS = (".csv", ".npz", ".json")


def with_filter_suffix(path: str, selected_filter: str) -> str:
    """``path`` as typed in a save dialog, with the suffix of the chosen filter (``"PNG image
    (*.png)"`` → ``.png``) added when it has none; ``""`` stays ``""``."""
    if not path or Path(path).suffix:
        return path
    match = re.search(r"\*(\.\w+)", selected_filter)
    return path + match.group(1) if match else path


def ask_save_path(parent, title: str, filters: str, directory: str = "") -> str:
    """A save dialog's path with the chosen filter's suffix added if it has none; ``""`` if
    cancelled."""
    from PySide6.QtWidgets import QFileDialog

    path, selected = QFileDialog.getSaveFileName(parent, title, directory, filters)
    return with_filter_suffix(path, selected)


def export_decomposition_data(dec, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``dec`` (a core ``Decomposition``) to ``path`` as .csv, .npz or .json, each with
    ``meta`` (indices, labels, η, loss, model, training step, seed; the ntkviz version is
    added). The numbers are the core's float64 values."""
    from ntkviz.results import write_decomposition

    return write_decomposition(dec, path, meta)


def export_graphics(item, path: str | Path, width: int = 1600) -> Path:
    """Render a pyqtgraph ``item`` (a PlotItem, a GraphicsLayout, or a scene) to ``path``: PNG
    ``width`` pixels wide (height in proportion) or SVG, by suffix."""
    import pyqtgraph.exporters as pgex

    from ntkviz.checkpoint import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if width < 16 or width > 20000:
            raise ValueError(f"PNG width must be between 16 and 20000 pixels, got {width}")
        exporter = pgex.ImageExporter(item)
        source = exporter.getSourceRect()
        exporter.parameters()["width"] = int(width)
        exporter.parameters()["height"] = max(1, round(width * source.height() / source.width()))
        image = exporter.export(toBytes=True)

        def write(tmp):
            if not image.save(tmp, "PNG"):
                raise OSError(f"cannot write {path}: the PNG encoder failed")

        return atomic_write(path, write)
    if suffix == ".svg":
        data = _svg_bytes(item)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    raise ValueError(f"unknown figure format {path.suffix!r}; use .png or .svg")


def _svg_bytes(item) -> bytes:
    """A vector SVG of a pyqtgraph item (or scene), rendered through QSvgGenerator (pyqtgraph's
    SVGExporter cannot parse the paths that Qt 6.12 writes)."""
    from PySide6.QtCore import QBuffer, QIODevice, QRectF, QSize, Qt
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator
    from PySide6.QtWidgets import QGraphicsScene

    scene = item if isinstance(item, QGraphicsScene) else item.scene()
    source = scene.sceneRect() if scene is item else item.sceneBoundingRect()
    if hasattr(scene, "prepareForPaint"):
        scene.prepareForPaint()
    w, h = max(1, round(source.width())), max(1, round(source.height()))
    buffer = QBuffer()
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    generator = QSvgGenerator()
    generator.setOutputDevice(buffer)
    generator.setSize(QSize(w, h))
    generator.setViewBox(QRectF(0, 0, w, h))
    generator.setTitle("ntkviz")
    painter = QPainter(generator)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.fillRect(QRectF(0, 0, w, h), Qt.GlobalColor.white)
    scene.render(painter, QRectF(0, 0, w, h), source)
    painter.end()
    return bytes(buffer.data())


def _ensure_app():
    """The running QApplication, or a new one (offscreen when there is no display)."""
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None:
        no_display = sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
        )
        if no_display:
            os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
        app = QApplication([sys.argv[0] if sys.argv else "ntkviz"])
    return app


def describe_meta(meta: dict | None) -> str:
    """A one-line caption from export metadata (x_u, x_o, model, training step)."""
    if not meta:
        return ""
    parts = []
    for key in ("x_u", "x_o"):
        v = meta.get(key)
        if isinstance(v, dict):
            parts.append(
                f"x<sub>{key[-1]}</sub> = {v.get('split')}[{v.get('index')}] (label {v.get('label')})"
            )
    if "model" in meta:
        step = meta.get("training_step")
        parts.append(f"{meta['model']}" + (f", training step {step}" if step is not None else ""))
    return "  ·  ".join(parts)


def export_decomposition_figure(
    dec, path: str | Path, width: int = 1600, meta: dict | None = None, classes=None
) -> Path:
    """Render the decomposition view of ``dec`` offscreen to ``path`` (.png ``width`` px wide, or
    .svg). Creates a QApplication if none exists."""
    suffix = Path(path).suffix.lower()
    if suffix not in FIGURE_FORMATS:
        raise ValueError(f"unknown figure format {Path(path).suffix!r}; use .png or .svg")
    app = _ensure_app()
    from PySide6.QtCore import Qt

    from ntkviz.gui.plots import DecompositionView

    view = DecompositionView()
    view.setAttribute(Qt.WA_DontShowOnScreen, True)
    view.resize(1500, 820)
    view.set_decomposition(dec, classes, describe_meta(meta))
    view.show()
    app.processEvents()
    try:
        return export_graphics(view.ci, path, width)
    finally:
        view.close()
        view.deleteLater()
