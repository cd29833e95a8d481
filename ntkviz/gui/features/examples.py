"""The examples dock (part of the pair feature): pickers for x_u (with y_u and the kind of
update) and x_o, following and setting the selection in the app state."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QIcon
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ntkviz.app.features.pair import FindConfidentlyWrong
from ntkviz.app.state import LOSSES, Example
from ntkviz.gui.features.base import FeatureView
from ntkviz.gui.plots import ProbabilityBars, elide
from ntkviz.gui.widgets import fit_text, image_pixmap

#: Class names in captions are cut to this many characters (the dock keeps its width).
NAME_WIDTH = 14
#: The update kinds' names in the dock's narrow combo box (the full ones are its tooltips).
SHORT_LOSSES = {"ce": "learn y_u (CE)", "neg": "neg. gradient"}


def narrow(box: QComboBox) -> None:
    """A combo box that elides long entries rather than widen the dock."""
    box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    box.setMinimumContentsLength(8)


class SamplePicker(QGroupBox):
    """Shows one example (split, class filter, index, thumbnails, image, label, π bars) and lets
    the user pick another: ``picked(Example)``. :meth:`show_example` never emits it."""

    picked = Signal(object)

    THUMB = 30  #: thumbnail size in pixels
    IMAGE = 84  #: size of the large image
    THUMBS = 40  #: thumbnails shown

    def __init__(self, title: str, parent: QWidget | None = None):
        super().__init__(title, parent)
        self.dataset = None
        self.example = Example("train", 0)
        self.rng = np.random.default_rng()
        self.split_box = QComboBox()
        self.split_box.addItems(["train", "test"])
        self.class_box = QComboBox()
        narrow(self.class_box)
        self.index_box = QSpinBox()
        self.index_box.setRange(0, 0)
        self.index_box.setKeyboardTracking(False)
        self.random_button = QPushButton("Random")
        fit_text(self.random_button)
        self.random_button.setToolTip("a random example of the split (of the filtered class)")
        self.image = QLabel()
        self.image.setFixedSize(self.IMAGE, self.IMAGE)
        self.image.setStyleSheet("background: black; border: 1px solid #888;")
        self.caption = QLabel("—")
        self.caption.setWordWrap(True)
        self.bars = ProbabilityBars("π (current model)")
        controls = QGridLayout()
        for row, (text, widget) in enumerate(
            (("Split", self.split_box), ("Class", self.class_box), ("Index", self.index_box))
        ):
            controls.addWidget(QLabel(text), row, 0)
            controls.addWidget(widget, row, 1)
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
            lambda item: self.pick(Example(self.example.split, int(item.data(Qt.UserRole))))
        )
        lay = QVBoxLayout(self)
        lay.addLayout(top)
        lay.addWidget(self.thumbnails)
        lay.addWidget(self.bars, 1)
        self.split_box.currentTextChanged.connect(self._split_changed)
        self.index_box.valueChanged.connect(
            lambda i: self.pick(Example(self.example.split, int(i)))
        )
        self.class_box.currentIndexChanged.connect(self._class_changed)
        self.random_button.clicked.connect(lambda: self.pick_random())
        self.setEnabled(False)

    def add_button(self, text: str, tooltip: str, slot) -> QPushButton:
        button = QPushButton(text)
        fit_text(button)
        button.setToolTip(tooltip)
        button.clicked.connect(slot)
        self.extra.addWidget(button)
        return button

    @property
    def label(self) -> int:
        return self.dataset.label(self.example.split, self.example.index)

    @property
    def class_filter(self) -> int:
        return self.class_box.currentData() if self.class_box.count() else -1

    def set_dataset(self, info) -> None:
        """``info``: the engine's ``DatasetInfo``."""
        self.dataset = info
        self.class_box.blockSignals(True)
        self.class_box.clear()
        self.class_box.addItem("any", -1)
        for k, name in enumerate(info.classes):
            self.class_box.addItem(name, k)
        self.class_box.blockSignals(False)
        self._thumbnail_key = None
        self.bars.set_classes(info.classes)
        self.setEnabled(True)

    def pick(self, example: Example) -> None:
        """The user picked ``example``."""
        if example != self.example:
            self.picked.emit(example)

    def pick_random(self, label: int | None = None, exclude_label: int | None = None) -> None:
        """A random example of the current split: of class ``label`` (default: the class filter),
        or of any class but ``exclude_label``."""
        y = self.dataset.labels[self.example.split]
        label = self.class_filter if label is None else label
        mask = np.ones(len(y), bool) if label < 0 else y == label
        if exclude_label is not None:
            mask &= y != exclude_label
        candidates = np.flatnonzero(mask)
        if len(candidates):
            self.pick(Example(self.example.split, int(self.rng.choice(candidates))))

    def _split_changed(self, split: str) -> None:
        if self.dataset is not None:
            self.pick(Example(split, min(self.example.index, self.dataset.size(split) - 1)))

    def _class_changed(self) -> None:
        """A new class filter: a random example of that class, or (when the example already
        passes the filter) the strip of that class from it."""
        if self.dataset is None:
            return
        if self.class_filter >= 0 and self.label != self.class_filter:
            self.pick_random()
        else:
            self._fill_thumbnails()

    def show_example(self, example: Example) -> None:
        """Show ``example`` (without emitting ``picked``); a class filter it does not pass (it was
        chosen elsewhere) is reset to "any"."""
        self.example = example
        if self.class_filter >= 0 and self.label != self.class_filter:
            self.class_box.blockSignals(True)
            self.class_box.setCurrentIndex(0)
            self.class_box.blockSignals(False)
        widgets = (self.split_box, self.index_box)
        for w in widgets:
            w.blockSignals(True)
        self.split_box.setCurrentText(example.split)
        self.index_box.setRange(0, self.dataset.size(example.split) - 1)
        self.index_box.setValue(example.index)
        for w in widgets:
            w.blockSignals(False)
        self._fill_thumbnails()
        self.image.setPixmap(
            image_pixmap(self.dataset.images[example.split][example.index], self.IMAGE)
        )
        self._caption(f"{example}", ("label", self.label))

    def thumbnail_indices(self) -> list[int]:
        """The examples the thumbnail strip shows: up to :attr:`THUMBS` of the split that pass
        the class filter, from the current index on (wrapping around)."""
        y = self.dataset.labels[self.example.split]
        label = self.class_filter
        candidates = np.flatnonzero(y == label) if label >= 0 else np.arange(len(y))
        start = int(np.searchsorted(candidates, self.example.index))
        return np.roll(candidates, -start)[: self.THUMBS].tolist()

    def _fill_thumbnails(self) -> None:
        split, index = self.example.split, self.example.index
        key = (split, self.class_filter)
        shown = [self.thumbnails.item(k).data(Qt.UserRole) for k in range(self.thumbnails.count())]
        if key == self._thumbnail_key and index in shown:
            self.thumbnails.setCurrentRow(shown.index(index))  # highlight; keep the strip
            return
        self._thumbnail_key = key
        self.thumbnails.clear()
        images, labels = self.dataset.images[split], self.dataset.labels[split]
        for i in self.thumbnail_indices():
            pixmap = image_pixmap(images[i], self.THUMB)
            icon = QIcon(pixmap)
            icon.addPixmap(pixmap, QIcon.Selected)  # framed when selected, not tinted
            item = QListWidgetItem(icon, "")
            item.setData(Qt.UserRole, i)
            item.setToolTip(f"{split}[{i}], label {self.dataset.classes[int(labels[i])]}")
            self.thumbnails.addItem(item)
        self.thumbnails.setCurrentRow(0)  # the strip starts at the current example

    def set_probs(self, probs: np.ndarray, target: int | None = None) -> None:
        """Show π ``(V,)``; the caption gains the prediction."""
        self.bars.set_probs(probs, self.label, target)
        k = int(np.argmax(probs))
        self._caption(f"{self.example}", ("label", self.label), ("predicted", k, probs[k]))

    def _caption(self, first: str, *lines) -> None:
        """The caption under the image: ``first``, then a line per ``(what, class[, π])``, class
        names elided to :data:`NAME_WIDTH` characters (the full ones in the tooltip)."""
        full, short = [first], [first]
        for what, k, *p in lines:
            name = self.dataset.classes[k]
            tail = f" ({p[0]:.2f})" if p else ""
            full.append(f"{what} {name}{tail}")
            short.append(f"{what} {elide(name, NAME_WIDTH)}{tail}")
        self.caption.setText("\n".join(short))
        self.caption.setToolTip("\n".join(full) if full != short else "")


class ExamplesView(FeatureView):
    """x_u (learnt as y_u, by cross-entropy or a negative gradient) and x_o."""

    name = "examples"
    title = "Examples"
    placement = "right"

    def __init__(self, ctx):
        super().__init__(ctx)
        s, c = self.state, self.controller
        self.x_u_picker = SamplePicker("x_u: the example the step learns from")
        self.y_u_box = QComboBox()
        narrow(self.y_u_box)
        self.loss_box = QComboBox()
        for key, text in LOSSES:  # short names that fit the dock; the full ones as tooltips
            self.loss_box.addItem(SHORT_LOSSES.get(key, text), key)
            self.loss_box.setItemData(self.loss_box.count() - 1, text, Qt.ToolTipRole)
        self.loss_box.setToolTip("; ".join(text for _, text in LOSSES))
        # as wide as the longest short name: never cut mid-word, never widening the dock
        self.loss_box.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.loss_box.setMinimumContentsLength(max(len(t) for t in SHORT_LOSSES.values()))
        form = QFormLayout()
        form.addRow("y_u", self.y_u_box)
        form.addRow("update", self.loss_box)
        self.x_u_picker.extra.addLayout(form)
        self.x_o_picker = SamplePicker("x_o: the example we observe")
        o = self.x_o_picker
        o.add_button("Same class as x_u", "a random x_o with x_u's label", self._same_class)
        o.add_button("Another class", "a random x_o of any other class", self._other_class)
        o.add_button(
            "Most confidently wrong",
            "the example (of the filtered class) the model misclassifies most confidently",
            self._confidently_wrong,
        )
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.x_u_picker, 1)
        lay.addWidget(self.x_o_picker, 1)
        self.x_u_picker.picked.connect(lambda e: setattr(s, "x_u", e))
        self.x_o_picker.picked.connect(lambda e: setattr(s, "x_o", e))
        self.y_u_box.currentIndexChanged.connect(lambda i: setattr(s, "y_u", int(i)))
        self.loss_box.currentIndexChanged.connect(
            lambda i: setattr(s, "loss", self.loss_box.itemData(i))
        )
        s.events.dataset.connect(self._on_dataset)
        s.events.x_u.connect(self.x_u_picker.show_example)
        s.events.x_o.connect(self.x_o_picker.show_example)
        s.events.y_u.connect(lambda y: _set_index(self.y_u_box, y))
        s.events.loss.connect(lambda key: _set_index(self.loss_box, self.loss_box.findData(key)))
        s.events.model.connect(self._on_model)
        c.on("pair", self._on_pair)
        c.on("search", self._on_search)
        c.on("dataset", self._show_selection)  # after the new data's examples are chosen
        self._on_model(None)

    def plots(self):
        return {
            "π(x_u)": lambda: self.x_u_picker.bars.getPlotItem(),
            "π(x_o)": lambda: self.x_o_picker.bars.getPlotItem(),
        }

    def _on_dataset(self, info) -> None:
        self.y_u_box.blockSignals(True)
        self.y_u_box.clear()
        self.y_u_box.addItems(list(info.classes))
        self.y_u_box.blockSignals(False)
        for picker in (self.x_u_picker, self.x_o_picker):
            picker.set_dataset(info)

    def _show_selection(self, event=None) -> None:
        """Show the state's x_u, x_o and y_u (other data: they may equal the old ones)."""
        s = self.state
        self.x_u_picker.show_example(s.x_u)
        self.x_o_picker.show_example(s.x_o)
        _set_index(self.y_u_box, s.y_u)

    def _on_model(self, info) -> None:
        for w in (self.y_u_box, self.loss_box):
            w.setEnabled(info is not None)

    def _on_pair(self, event) -> None:
        if event.kind != "result":
            return
        dec, r = event.payload.decomposition, event.payload.request
        u, o = self.x_u_picker, self.x_o_picker
        if u.example == r.x_u:
            u.set_probs(dec.probs_u_before, r.y_u)
        if o.example == r.x_o:
            o.set_probs(dec.probs_before)

    def _same_class(self) -> None:
        self.x_o_picker.pick_random(label=self.x_u_picker.label)

    def _other_class(self) -> None:
        self.x_o_picker.pick_random(label=-1, exclude_label=self.x_u_picker.label)

    def _confidently_wrong(self) -> None:
        o = self.x_o_picker
        self.ctx.status("searching the most confidently wrong example…", 0)
        self.controller.submit("search", FindConfidentlyWrong(o.example.split, o.class_filter))

    def _on_search(self, event) -> None:
        if event.kind != "result":
            return
        found = event.payload.example
        if found is None:
            self.ctx.status("the model classifies every such example correctly", 5000)
            return
        self.ctx.status(f"most confidently wrong: {found}", 5000)
        self.state.x_o = found


def _set_index(box: QComboBox, index: int) -> None:
    box.blockSignals(True)
    box.setCurrentIndex(max(0, index))
    box.blockSignals(False)
