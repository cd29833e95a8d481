"""Control panels: training settings and buttons, example pickers for x_u / x_o, step-through."""

from __future__ import annotations

import math

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ntkviz.gui.plots import PreviewBars, ProbabilityBars, TrainingCurves, TrajectoryPlot

LOSS_KINDS = (("ce", "learn y_u (cross-entropy)"), ("neg", "negative gradient on y_u"))


def _double_spin(lo: float, hi: float, decimals: int, step: float) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(lo, hi)
    box.setDecimals(decimals)
    box.setSingleStep(step)
    return box


class TrainingPanel(QWidget):
    """Hyper-parameters, run buttons, progress with ETA, and the loss / accuracy curves."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model_box = QComboBox()
        self.train_size = QSpinBox()
        self.train_size.setRange(0, 60000)
        self.train_size.setSingleStep(1000)
        self.train_size.setSpecialValueText("all")
        self.train_size.setToolTip("examples drawn (seeded) from the training split; 0 = all")
        self.lr = _double_spin(1e-6, 1e6, 5, 0.01)
        self.momentum = _double_spin(0, 0.999, 3, 0.05)
        self.weight_decay = _double_spin(0, 1, 6, 1e-4)
        self.batch_size = QSpinBox()
        self.batch_size.setRange(1, 4096)
        self.epochs = QSpinBox()
        self.epochs.setRange(1, 1000)
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.device = QComboBox()
        for name in ("auto", "cpu", "cuda"):
            self.device.addItem(name, name)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        for label, widget in (
            ("Model", self.model_box),
            ("Training set", self.train_size),
            ("Learning rate", self.lr),
            ("Momentum", self.momentum),
            ("Weight decay", self.weight_decay),
            ("Batch size", self.batch_size),
            ("Epochs", self.epochs),
            ("Seed", self.seed),
            ("Device", self.device),
        ):
            form.addRow(label, widget)
        self.start_button = QPushButton("Start")
        self.start_button.setToolTip("start a new run from freshly initialised weights")
        self.pause_button = QPushButton("Pause")
        self.resume_button = QPushButton("Resume")
        self.stop_button = QPushButton("Stop")
        self.batch_button = QPushButton("One batch")
        self.batch_button.setToolTip("train exactly one batch, then pause")
        buttons = QGridLayout()
        for k, b in enumerate(
            (self.start_button, self.pause_button, self.resume_button, self.stop_button)
        ):
            buttons.addWidget(b, 0, k)
        buttons.addWidget(self.batch_button, 1, 0, 1, 4)
        self.progress = QProgressBar()
        self.progress.setFormat("step %v / %m")
        self.eta = QLabel("not started")
        self.curves = TrainingCurves()
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.eta)
        lay.addWidget(self.curves, 1)
        self.set_state("loading")

    def set_models(self, models: dict, cuda_available: bool) -> None:
        """Fill the model list from ``ntkviz.models.MODELS``; disable CUDA when absent."""
        self.model_box.clear()
        for name, (_, description) in models.items():
            self.model_box.addItem(name, name)
            self.model_box.setItemData(self.model_box.count() - 1, description, Qt.ToolTipRole)
        item = self.device.model().item(2)
        item.setEnabled(cuda_available)
        if cuda_available:
            item.setToolTip("train on the GPU")
            self.device.setToolTip("auto: the GPU (CUDA) when there is one, else the CPU")
        else:
            why = (
                "CUDA is not available: torch.cuda.is_available() is False (no NVIDIA GPU, "
                "driver, or CUDA build of PyTorch)"
            )
            item.setText("cuda (not available)")
            item.setToolTip(why)
            self.device.setToolTip(f"auto and cpu train on the CPU. {why}.")

    def set_config(self, c) -> None:
        """Show a ``TrainConfig``."""
        i = self.model_box.findData(c.model)
        self.model_box.setCurrentIndex(max(i, 0))
        self.train_size.setValue(c.train_size or 0)
        self.lr.setValue(c.lr)
        self.momentum.setValue(c.momentum)
        self.weight_decay.setValue(c.weight_decay)
        self.batch_size.setValue(c.batch_size)
        self.epochs.setValue(c.epochs)
        self.seed.setValue(c.seed)
        j = self.device.findData(c.device if c.device in ("auto", "cpu", "cuda") else "auto")
        self.device.setCurrentIndex(j)

    def config(self, base):
        """A ``TrainConfig`` from the fields (other settings taken from ``base``)."""
        from dataclasses import replace

        return replace(
            base,
            model=self.model_box.currentData() or base.model,
            train_size=self.train_size.value() or None,
            lr=self.lr.value(),
            momentum=self.momentum.value(),
            weight_decay=self.weight_decay.value(),
            batch_size=self.batch_size.value(),
            epochs=self.epochs.value(),
            seed=self.seed.value(),
            device=self.device.currentData(),
        )

    def set_state(self, state: str) -> None:
        """Enable the buttons that make sense in ``state``."""
        ready = state not in ("loading",)
        self.start_button.setEnabled(ready and state != "training")
        self.pause_button.setEnabled(state == "training")
        self.resume_button.setEnabled(state == "paused")
        self.stop_button.setEnabled(state in ("training", "paused"))
        self.batch_button.setEnabled(ready and state != "training")

    def set_progress(self, step: int, total: int, eta_seconds: float | None) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(step)
        if eta_seconds is None or not math.isfinite(eta_seconds):
            self.eta.setText(f"step {step} of {total}")
        else:
            m, s = divmod(round(eta_seconds), 60)
            self.eta.setText(f"{100 * step / total:.0f} % · ETA {m}:{s:02d}")


def digit_pixmap(image: np.ndarray, size: int) -> QPixmap:
    """uint8 ``(H, W)`` -> a nearest-neighbour scaled grey pixmap of ``size`` pixels."""
    a = np.ascontiguousarray(image)
    h, w = a.shape
    q = QImage(a.data, w, h, w, QImage.Format.Format_Grayscale8).copy()
    return QPixmap.fromImage(q).scaled(size, size, Qt.KeepAspectRatio, Qt.FastTransformation)


class SamplePicker(QGroupBox):
    """Choose one example: split, class filter, index, Random; shows the image, its label and the
    model's current π as bars. ``changed`` fires when the example changes."""

    changed = Signal()

    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.images: dict = {}
        self.labels: dict = {}
        self.classes: tuple[str, ...] = ()
        self.rng = np.random.default_rng()
        self.split_box = QComboBox()
        self.split_box.addItems(["train", "test"])
        self.class_box = QComboBox()
        self.index_box = QSpinBox()
        self.index_box.setRange(0, 0)
        self.index_box.setKeyboardTracking(False)
        self.random_button = QPushButton("Random")
        self.random_button.setToolTip("a random example of the split (of the filtered class)")
        self.image = QLabel()
        self.image.setFixedSize(112, 112)
        self.image.setStyleSheet("background: black; border: 1px solid #888;")
        self.caption = QLabel("—")
        self.caption.setWordWrap(True)
        self.bars = ProbabilityBars("π (current model)")
        controls = QGridLayout()
        controls.addWidget(QLabel("Split"), 0, 0)
        controls.addWidget(self.split_box, 0, 1)
        controls.addWidget(QLabel("Class"), 1, 0)
        controls.addWidget(self.class_box, 1, 1)
        controls.addWidget(QLabel("Index"), 2, 0)
        controls.addWidget(self.index_box, 2, 1)
        controls.addWidget(self.random_button, 3, 0, 1, 2)
        self.extra = QVBoxLayout()
        controls.addLayout(self.extra, 4, 0, 1, 2)
        top = QHBoxLayout()
        left = QVBoxLayout()
        left.addWidget(self.image)
        left.addWidget(self.caption)
        left.addStretch(1)
        top.addLayout(left)
        top.addLayout(controls, 1)
        self.thumbnails = QListWidget()
        self._thumbnail_key: tuple[str, int] | None = None
        self.thumbnails.setViewMode(QListView.IconMode)
        self.thumbnails.setIconSize(QSize(self.THUMB, self.THUMB))
        self.thumbnails.setMovement(QListView.Static)
        self.thumbnails.setResizeMode(QListView.Adjust)
        # icons only, on a fixed grid two rows high: rows are never cut, the selected one framed
        cell = self.THUMB + 6
        self.thumbnails.setGridSize(QSize(cell, cell))
        self.thumbnails.setUniformItemSizes(True)
        self.thumbnails.setStyleSheet(
            "QListWidget::item { border: 2px solid transparent; }"
            "QListWidget::item:selected { border: 2px solid palette(highlight); }"
        )
        self.thumbnails.setFixedHeight(2 * cell + 2 * self.thumbnails.frameWidth())
        self.thumbnails.setToolTip("examples of the split and class filter from the current index")
        self.thumbnails.itemClicked.connect(
            lambda item: self.select(self.split, int(item.data(Qt.UserRole)))
        )
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.thumbnails)
        lay.addWidget(self.bars, 1)
        self.split_box.currentTextChanged.connect(self._split_changed)
        self.index_box.valueChanged.connect(self._index_changed)
        self.class_box.currentIndexChanged.connect(self._class_changed)
        self.random_button.clicked.connect(lambda: self.pick_random())
        self.setEnabled(False)

    THUMB = 30  #: thumbnail size in pixels
    THUMBS = 40  #: thumbnails shown

    def thumbnail_indices(self) -> list[int]:
        """The examples the thumbnail strip shows: up to :attr:`THUMBS` of the split that pass
        the class filter, from the current index on (wrapping around)."""
        y = self.labels[self.split]
        label = self.class_filter
        candidates = np.flatnonzero(y == label) if label >= 0 else np.arange(len(y))
        start = int(np.searchsorted(candidates, self.index))
        return np.roll(candidates, -start)[: self.THUMBS].tolist()

    def _fill_thumbnails(self) -> None:
        key = (self.split, self.class_filter)
        shown = [self.thumbnails.item(k).data(Qt.UserRole) for k in range(self.thumbnails.count())]
        if key == self._thumbnail_key and self.index in shown:
            self.thumbnails.setCurrentRow(shown.index(self.index))  # highlight; keep the strip
            return
        self._thumbnail_key = key
        self.thumbnails.clear()
        images, labels = self.images[self.split], self.labels[self.split]
        for i in self.thumbnail_indices():
            pixmap = digit_pixmap(images[i], self.THUMB)
            icon = QIcon(pixmap)
            icon.addPixmap(pixmap, QIcon.Selected)  # framed when selected, not tinted
            item = QListWidgetItem(icon, "")
            item.setData(Qt.UserRole, i)
            item.setToolTip(f"{self.split}[{i}], label {self.classes[int(labels[i])]}")
            self.thumbnails.addItem(item)
        self.thumbnails.setCurrentRow(0)  # the strip starts at the current example

    def add_button(self, text: str, tooltip: str, slot) -> QPushButton:
        button = QPushButton(text)
        button.setToolTip(tooltip)
        button.clicked.connect(slot)
        self.extra.addWidget(button)
        return button

    def set_dataset(self, info) -> None:
        """``info``: a worker ``DatasetInfo``."""
        self.images, self.labels, self.classes = info.images, info.labels, info.classes
        self.class_box.blockSignals(True)
        self.class_box.clear()
        self.class_box.addItem("any", -1)
        for k, name in enumerate(self.classes):
            self.class_box.addItem(name, k)
        self.class_box.blockSignals(False)
        self.setEnabled(True)
        self._split_changed(self.split)

    @property
    def split(self) -> str:
        return self.split_box.currentText()

    @property
    def index(self) -> int:
        return self.index_box.value()

    @property
    def label(self) -> int:
        return int(self.labels[self.split][self.index])

    @property
    def class_filter(self) -> int:
        return self.class_box.currentData() if self.class_box.count() else -1

    def select(self, split: str, index: int) -> None:
        """Show ``split[index]`` (emits ``changed`` once)."""
        self.split_box.blockSignals(True)
        self.split_box.setCurrentText(split)
        self.split_box.blockSignals(False)
        self.index_box.blockSignals(True)
        self.index_box.setRange(0, len(self.labels[split]) - 1)
        self.index_box.setValue(index)
        self.index_box.blockSignals(False)
        self._show()
        self.changed.emit()

    def pick_random(self, label: int | None = None, exclude_label: int | None = None) -> None:
        """A random example of the current split: of class ``label`` (default: the class filter),
        or of any class but ``exclude_label``."""
        y = self.labels[self.split]
        label = self.class_filter if label is None else label
        mask = np.ones(len(y), bool) if label < 0 else y == label
        if exclude_label is not None:
            mask &= y != exclude_label
        candidates = np.flatnonzero(mask)
        if len(candidates):
            self.select(self.split, int(self.rng.choice(candidates)))

    def _split_changed(self, split: str) -> None:
        if not self.labels:
            return
        self.select(split, min(self.index, len(self.labels[split]) - 1))

    def _class_changed(self) -> None:
        if self.labels and self.class_filter >= 0 and self.label != self.class_filter:
            self.pick_random()

    def _index_changed(self) -> None:
        self._show()
        self.changed.emit()

    def _show(self) -> None:
        self._fill_thumbnails()
        self.image.setPixmap(digit_pixmap(self.images[self.split][self.index], 112))
        self.caption.setText(f"{self.split}[{self.index}]\nlabel {self.classes[self.label]}")

    def set_probs(self, probs: np.ndarray, target: int | None = None) -> None:
        """Show π ``(V,)``; the caption gains the prediction."""
        self.bars.set_probs(probs, self.label, target)
        k = int(np.argmax(probs))
        self.caption.setText(
            f"{self.split}[{self.index}]\nlabel {self.classes[self.label]}\n"
            f"predicted {self.classes[k]} ({probs[k]:.2f})"
        )


class StepPanel(QWidget):
    """η (spin box and log-scale slider), Preview / Apply / Undo / Reset, predicted-vs-actual
    bars and the trajectory of π(x_o) over applied steps."""

    lr_changed = Signal(float)

    SLIDER_SCALE = 20  # slider ticks per decade

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.lr = _double_spin(1e-6, 100.0, 6, 0.001)
        self.lr.setValue(0.01)
        self.lr.setKeyboardTracking(False)
        self.slider = QSlider(Qt.Horizontal)
        self.slider.setRange(-6 * self.SLIDER_SCALE, 2 * self.SLIDER_SCALE)
        self.slider.setToolTip("η on a log scale, 1e-6 … 100")
        self.preview_button = QPushButton("Preview")
        self.preview_button.setToolTip("compute predicted and actual Δ without changing the model")
        self.apply_button = QPushButton("Apply step")
        self.apply_button.setToolTip("one real plain-SGD step on (x_u, y_u) (Space)")
        self.undo_button = QPushButton("Undo")
        self.undo_button.setToolTip("restore the parameters before the last applied step (Ctrl+Z)")
        self.reset_button = QPushButton("Reset")
        self.reset_button.setToolTip("return to the model before the first applied step")
        self.log_box = QCheckBox("log π")
        self.summary = QLabel("")
        self.summary.setWordWrap(True)  # a long line must not widen the window
        self.summary.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.summary.setToolTip(
            "residual = actual − predicted is the O(η²) remainder: halving η roughly quarters it"
        )
        row = QHBoxLayout()
        row.addWidget(QLabel("η"))
        row.addWidget(self.lr)
        row.addWidget(self.slider, 1)
        for w in (self.preview_button, self.apply_button, self.undo_button, self.reset_button):
            row.addWidget(w)
        row.addWidget(self.log_box)
        self.preview = PreviewBars()
        self.trajectory = TrajectoryPlot()
        plots = QHBoxLayout()
        plots.addWidget(self.preview, 1)
        plots.addWidget(self.trajectory, 1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(row)
        lay.addWidget(self.summary)
        lay.addLayout(plots, 1)
        self.lr.valueChanged.connect(self._spin_changed)
        self.slider.valueChanged.connect(self._slider_changed)
        self.log_box.toggled.connect(self.trajectory.set_log)
        self._spin_changed(self.lr.value())

    def _spin_changed(self, value: float) -> None:
        self.slider.blockSignals(True)
        self.slider.setValue(round(math.log10(max(value, 1e-6)) * self.SLIDER_SCALE))
        self.slider.blockSignals(False)
        self.lr_changed.emit(value)

    def _slider_changed(self, ticks: int) -> None:
        value = float(f"{10 ** (ticks / self.SLIDER_SCALE):.3g}")
        self.lr.setValue(value)  # emits lr_changed through _spin_changed

    def set_decomposition(self, dec) -> None:
        self.preview.set_values(dec.predicted, dec.actual)
        self.summary.setText(
            f"‖predicted‖ = {np.linalg.norm(dec.predicted):.4g}   ‖actual‖ = "
            f"{np.linalg.norm(dec.actual):.4g}   ‖residual‖ = {np.linalg.norm(dec.residual):.3g}"
            f"   relative residual = {dec.relative_residual:.3g}"
        )
