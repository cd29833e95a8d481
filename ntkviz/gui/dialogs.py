"""Dialogs of the window's Help menu."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMessageBox, QWidget

ABOUT = """<h3>ntkviz</h3>
<p>See how one gradient step on one example x<sub>u</sub> changes a classifier's predictions on
another example x<sub>o</sub>:</p>
<p align="center">Δlog π(x<sub>o</sub>) = −η · A(x<sub>o</sub>) · K(x<sub>o</sub>, x<sub>u</sub>)
· G(x<sub>u</sub>, y<sub>u</sub>) + O(η²)</p>
<p>A = I − 1·π<sup>T</sup>; K = J(x<sub>o</sub>) J(x<sub>u</sub>)<sup>T</sup>, the empirical
neural tangent kernel; G = ∂L/∂z at x<sub>u</sub>.</p>
<p>After Y. Ren and D. J. Sutherland, <i>Learning Dynamics of LLM Finetuning</i>, ICLR 2025.</p>
<p>MNIST: Y. LeCun, C. Cortes and C. J. C. Burges, licensed CC BY-SA 3.0.</p>
<p>ntkviz {version}</p>"""


def show_about(parent: QWidget, log_file: Path | None) -> None:
    """The About box (non-modal): the formula, the paper, the data's licence, the log file."""
    from ntkviz import __version__

    box = QMessageBox(parent)
    box.setWindowTitle("About ntkviz")
    box.setTextFormat(Qt.RichText)
    text = ABOUT.format(version=__version__)
    if log_file is not None:
        text += f"<p>Log file: {log_file}</p>"
    box.setText(text)
    box.setAttribute(Qt.WA_DeleteOnClose)
    box.open()
