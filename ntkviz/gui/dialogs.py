"""Dialogs: the About box, and the choice of a model of the user's and of a dataset."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLineEdit,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

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


def _finish(dialog: QDialog, form: QFormLayout) -> None:
    """Lay out ``form`` above Open and Cancel, 560 px wide."""
    buttons = QDialogButtonBox(QDialogButtonBox.Open | QDialogButtonBox.Cancel)
    buttons.accepted.connect(dialog.accept)
    buttons.rejected.connect(dialog.reject)
    lay = QVBoxLayout(dialog)
    lay.addLayout(form)
    lay.addWidget(buttons)
    dialog.resize(560, dialog.sizeHint().height())


class ModelDialog(QDialog):
    """Asks for a model of the user's: a factory spec ("file.py:factory" or "module:factory")
    and an optional weights file (a state dict or an ntkviz checkpoint)."""

    def __init__(self, parent: QWidget | None = None, directory: str = ""):
        super().__init__(parent)
        self.setWindowTitle("Open model")
        self.directory = directory
        self.spec = QLineEdit()
        self.spec.setPlaceholderText("my_models.py:build  or  mypackage.models:build")
        self.spec.setToolTip(
            "a callable returning an nn.Module whose logits are (N, V); it is called without "
            "arguments (this runs your code)"
        )
        self.weights = QLineEdit()
        self.weights.setPlaceholderText("optional: a state dict (.pt) or an ntkviz checkpoint")
        self.weights.setToolTip("read with torch.load(weights_only=True): it never runs code")
        browse_spec, browse_weights = QPushButton("File…"), QPushButton("File…")
        browse_spec.clicked.connect(self._browse_spec)
        browse_weights.clicked.connect(self._browse_weights)
        form = QFormLayout()
        for label, field, button in (
            ("Factory", self.spec, browse_spec), ("Weights", self.weights, browse_weights)
        ):  # fmt: skip
            row = QHBoxLayout()
            row.addWidget(field, 1)
            row.addWidget(button)
            form.addRow(label, row)
        _finish(self, form)

    def _browse_spec(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Model file", self.directory, "Python (*.py)")
        if path:
            self.spec.setText(f"{path}:build")
            self.spec.setFocus()
            self.spec.setSelection(len(path) + 1, len("build"))

    def _browse_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Weights", self.directory, "PyTorch weights (*.pt *.pth);;All files (*)"
        )
        if path:
            self.weights.setText(path)

    def values(self) -> tuple[str, str | None]:
        return self.spec.text().strip(), self.weights.text().strip() or None


#: The dataset chooser's entry for a directory of class folders.
IMAGE_FOLDER = "image folder (one sub-folder per class)"


class DatasetDialog(QDialog):
    """Asks for a dataset: one of ntkviz's named sets (its files in a directory, default the
    ntkviz cache; downloaded by torchvision only when asked) or a directory of class folders."""

    def __init__(self, parent: QWidget | None = None, directory: str = "", current: str = ""):
        from ntkviz.data import DATASETS  # the core's names (imported on demand: torch)

        super().__init__(parent)
        self.setWindowTitle("Open dataset")
        self.directory = directory
        self.source = QComboBox()
        self.source.addItems([*DATASETS, IMAGE_FOLDER])
        if current in DATASETS:
            self.source.setCurrentText(current)
        self.folder = QLineEdit()
        browse = QPushButton("Folder…")
        browse.clicked.connect(self._browse)
        self.download = QCheckBox("Download missing files (needs the internet)")
        self.source.currentTextChanged.connect(self._explain)
        form = QFormLayout()
        form.addRow("Dataset", self.source)
        row = QHBoxLayout()
        row.addWidget(self.folder, 1)
        row.addWidget(browse)
        form.addRow("Directory", row)
        form.addRow("", self.download)
        self._explain(self.source.currentText())
        _finish(self, form)

    def _explain(self, text: str) -> None:
        folder = text == IMAGE_FOLDER
        self.folder.setPlaceholderText(
            "DIR/<class>/*.png, or DIR/train/<class>/… and DIR/test/<class>/…"
            if folder
            else "where the files are (empty: the ntkviz cache)"
        )
        self.download.setEnabled(not folder)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Dataset directory", self.directory)
        if path:
            self.folder.setText(path)

    def values(self) -> tuple[str, str | None, bool]:
        """``(source, root, download)`` for :meth:`AppController.open_dataset`: a name and its
        directory (None: the cache), or a folder of class folders and None."""
        folder = self.folder.text().strip() or None
        if self.source.currentText() == IMAGE_FOLDER:
            return folder or "", None, False
        return self.source.currentText(), folder, self.download.isChecked()
