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


def ask_save_path(parent, title: str, filters: str, directory: str = "") -> str:
    """A path from a modal save dialog, ``""`` if cancelled. A name typed without a suffix gets
    the chosen filter's (``"PNG image (*.png)"`` → ``.png``) before the dialog checks whether
    the file exists, so an existing file is never replaced without asking."""
    from PySide6.QtWidgets import QDialog, QFileDialog

    dialog = QFileDialog(parent, title, directory, filters)
    dialog.setAcceptMode(QFileDialog.AcceptMode.AcceptSave)

    def use_suffix_of(name_filter: str) -> None:
        match = re.search(r"\*\.(\w+)", name_filter)
        dialog.setDefaultSuffix(match.group(1) if match else "")

    dialog.filterSelected.connect(use_suffix_of)
    use_suffix_of(dialog.selectedNameFilter())
    try:
        accepted = dialog.exec() == QDialog.DialogCode.Accepted
        files = dialog.selectedFiles()
    finally:
        dialog.deleteLater()
    return files[0] if accepted and files else ""


def export_decomposition_data(dec, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``dec`` (a core ``Decomposition``) to ``path`` as .csv, .npz or .json, each with
    ``meta`` (indices, labels, η, loss, model, training step, seed; the ntkviz version is
    added). The numbers are the core's float64 values."""
    from ntkviz.results import write_decomposition

    return write_decomposition(dec, path, meta)


def export_graphics(item, path: str | Path, width: int = 1600) -> Path:
    """Render a pyqtgraph ``item`` (a PlotItem, a GraphicsLayout, or a scene) to ``path``: PNG
    ``width`` pixels wide (height in proportion) or SVG, by suffix."""
    from ntkviz.files import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        if width < 16 or width > 20000:
            raise ValueError(f"PNG width must be between 16 and 20000 pixels, got {width}")
        image = _png_image(item, width)

        def write(tmp):
            if not image.save(tmp, "PNG"):
                raise OSError(f"cannot write {path}: the PNG encoder failed")

        return atomic_write(path, write)
    if suffix == ".svg":
        data = _svg_bytes(item)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    raise ValueError(f"unknown figure format {path.suffix!r}; use .png or .svg")


def _scene_and_source(item):
    """The scene of ``item`` (or ``item`` itself if it is one) and the rectangle to render."""
    from PySide6.QtWidgets import QGraphicsScene

    scene = item if isinstance(item, QGraphicsScene) else item.scene()
    source = scene.sceneRect() if scene is item else item.sceneBoundingRect()
    if hasattr(scene, "prepareForPaint"):
        scene.prepareForPaint()
    return scene, source


def _png_image(item, width: int):
    """``item`` rendered ``width`` pixels wide: the scene is painted at its on-screen layout on
    an image whose device pixel ratio is the scale, so that everything grows alike — legends
    and text labels included, which ignore the painter's transformation and so keep their
    screen size in pyqtgraph's ImageExporter."""
    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QImage, QPainter

    scene, source = _scene_and_source(item)
    scale = width / source.width()
    image = QImage(int(width), max(1, round(source.height() * scale)), QImage.Format_ARGB32)
    image.setDevicePixelRatio(scale)
    image.fill(Qt.GlobalColor.white)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    scene.render(painter, QRectF(0, 0, source.width(), source.height()), source)
    painter.end()
    image.setDevicePixelRatio(1.0)
    return image


def _svg_bytes(item) -> bytes:
    """A vector SVG of a pyqtgraph item (or scene), rendered through QSvgGenerator (pyqtgraph's
    SVGExporter cannot parse the paths that Qt 6.12 writes)."""
    from PySide6.QtCore import QBuffer, QIODevice, QRectF, QSize, Qt
    from PySide6.QtGui import QPainter
    from PySide6.QtSvg import QSvgGenerator

    scene, source = _scene_and_source(item)
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


def _export_offscreen(widget, item, path: str | Path, width: int, size: tuple[int, int]) -> Path:
    """Lay ``widget`` out offscreen at ``size``, export its pyqtgraph ``item``, dispose of it."""
    from PySide6.QtCore import Qt

    widget.setAttribute(Qt.WA_DontShowOnScreen, True)
    widget.resize(*size)
    widget.show()
    _ensure_app().processEvents()
    try:
        return export_graphics(item, path, width)
    finally:
        widget.close()
        widget.deleteLater()


def _check_figure_path(path: str | Path) -> None:
    if Path(path).suffix.lower() not in FIGURE_FORMATS:
        raise ValueError(f"unknown figure format {Path(path).suffix!r}; use .png or .svg")


def export_decomposition_figure(
    dec, path: str | Path, width: int = 1600, meta: dict | None = None, classes=None
) -> Path:
    """Render the decomposition view of ``dec`` offscreen to ``path`` (.png ``width`` px wide, or
    .svg). Creates a QApplication if none exists."""
    _check_figure_path(path)
    _ensure_app()
    from ntkviz.gui.plots import DecompositionView

    view = DecompositionView()
    view.set_decomposition(dec, classes, describe_meta(meta))
    return _export_offscreen(view, view.ci, path, width, (1500, 820))


def export_preview_figure(dec, path: str | Path, width: int = 1200, meta=None) -> Path:
    """The step panel's bars of ``dec``: predicted vs actual Δlog π(x_o) per class, offscreen,
    to ``path`` (.png ``width`` px wide, or .svg)."""
    _check_figure_path(path)
    _ensure_app()
    from ntkviz.gui.plots import PreviewBars

    bars = PreviewBars()
    bars.set_values(dec.predicted, dec.actual)
    _add_caption(bars.getPlotItem(), meta, f"η = {dec.lr:g}, {dec.loss}, y_u = {dec.y_u}")
    return _export_offscreen(bars, bars.getPlotItem(), path, width, (900, 480))


def export_trajectory_figure(
    trajectory, path: str | Path, width: int = 1200, meta=None, log: bool = False
) -> Path:
    """The step panel's trajectory of a core ``StepTrajectory``: π(x_o) (or log π) per class and
    π_{y_u}(x_u) over the steps, offscreen, to ``path`` (.png ``width`` px wide, or .svg)."""
    _check_figure_path(path)
    _ensure_app()
    from ntkviz.gui.plots import TrajectoryPlot

    plot = TrajectoryPlot()
    plot.set_log(log)
    t = trajectory
    plot.set_trajectory(t.probs_o, t.probs_u, t.y_u)
    _add_caption(plot.getPlotItem(), meta, f"η = {t.lr:g}, {t.loss}, y_u = {t.y_u}")
    return _export_offscreen(plot, plot.getPlotItem(), path, width, (900, 480))


def _add_caption(plot_item, meta: dict | None, step: str) -> None:
    """Append the pair, the model and the step's settings to ``plot_item``'s title."""
    caption = "  ·  ".join(p for p in (describe_meta(meta), step) if p)
    title = plot_item.titleLabel.text
    plot_item.setTitle(f"{title}<br><span style='font-size:8pt'>{caption}</span>", size="10pt")
