"""pyqtgraph views: heatmaps of the decomposition's factors, probability bars, training curves.

Every array is shown as a matrix: row i is output class i (top to bottom), column j input class j.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
from PySide6.QtCore import QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QFont, QFontMetricsF
from PySide6.QtWidgets import QVBoxLayout, QWidget

from ntkviz.arrays import norm
from ntkviz.gui.graphics import pg

#: Diverging blue–white–red colour map (CET-D1), used symmetrically around zero.
DIVERGING = pg.colormap.get("CET-D1")
#: Category colours (Tableau 10) for per-class curves.
CLASS_COLORS = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip


def class_color(k: int) -> str:
    """Class ``k``'s colour: Tableau 10 for the first ten, then evenly spread hues."""
    if k < len(CLASS_COLORS):
        return CLASS_COLORS[k]
    return pg.intColor(k, hues=23, values=2, minValue=150).name()


def model_step(result) -> str:
    """Which model a probe result is of: "at training step 47", "at training step 47 + 3
    applied" after step-through steps applied by hand, "before training here" (the model as
    built, opened or given, whatever its weights) or "before training here + 3 applied"."""
    applied = getattr(result, "applied_steps", 0)
    when = f"at training step {result.step}" if result.step else "before training here"
    return when + (f" + {applied} applied" if applied else "")


def elide(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters, with "…" when it was longer."""
    return name if len(name) <= width else name[: max(1, width - 1)] + "…"


def elide_middle(name: str, width: int) -> str:
    """``name`` cut to ``width`` characters in its middle (``golden…(bird)``)."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return name[: width - 1 - tail] + "…" + (name[-tail:] if tail else "")


def elide_path(name: str, width: int) -> str:
    """A dotted name (``stage1.0.add.branches.0.conv1``) cut to about ``width`` characters at
    its dots: its first and last parts with "…" between (``stage1.0…0.conv1``)."""
    parts = name.split(".")
    if len(name) <= width or len(parts) == 1:
        return elide(name, width)
    tail = parts[-1]
    for p in reversed(parts[1:-1]):
        if len(p) + 1 + len(tail) > width // 2:
            break
        tail = f"{p}.{tail}"
    head = parts[0]
    for p in parts[1:]:
        if len(head) + 1 + len(p) + 1 + len(tail) > width:
            break
        head = f"{head}.{p}"
    return elide(f"{head}…{tail}", width)


#: Up to this many classes, axes name them; beyond, they number them (names on hover).
NAMED_CLASSES = 20


#: Axes narrower than this many characters a name number their classes rather than show stubs.
MIN_NAME_WIDTH = 6


#: Steps between numbered class ticks (every k-th class), smallest first.
TICK_STEPS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000)
#: Pixels at least between neighbouring tick labels along a horizontal axis.
TICK_GAP = 4


def _label_extent(labels: Sequence[str], font: QFont | None, vertical: bool) -> float:
    """Pixels the widest of ``labels`` takes along an axis (a vertical axis: the text's height)."""
    metrics = QFontMetricsF(font if font is not None else QFont())
    if vertical:
        return metrics.height()
    return max((metrics.horizontalAdvance(t) for t in labels), default=0.0) + TICK_GAP


def class_ticks(
    classes: Sequence[str],
    n_max: int = 12,
    width: int = 8,
    pixels: float | None = None,
    font: QFont | None = None,
    vertical: bool = False,
) -> list:
    """Axis ticks for classes ``[(i, label)]``: names elided to ``width`` characters (cut in
    the middle where their starts alone would read alike); or every k-th class's index, at most
    ``n_max`` of them, for more than :data:`NAMED_CLASSES` classes, names longer than a narrow
    axis (``width`` < :data:`MIN_NAME_WIDTH`) takes, or names that still read alike. The full
    names are in the tooltips.

    ``pixels``: the axis's pixels per class, where known; then no more labels than fit without
    overlapping (in ``font``; along a ``vertical`` axis a label takes its text's height, along a
    horizontal one its width and :data:`TICK_GAP`): names only where each fits its class, and
    indices every k-th class with k large enough (at least the first class is labelled)."""
    names = [str(c) for c in classes]

    def fit(labels: Sequence[str], step: int) -> bool:
        return pixels is None or _label_extent(labels, font, vertical) <= step * pixels

    fits = width >= MIN_NAME_WIDTH or max(map(len, names), default=0) <= width
    if len(names) <= NAMED_CLASSES and fits:
        for cut in (elide, elide_middle):  # names cut alike ("golden…" thrice): their ends
            labels = [cut(name, width) for name in names]
            if len(set(labels)) == len(labels):
                if fit(labels, 1):
                    return list(enumerate(labels))
                break
    least = max(1, -(-len(names) // max(1, n_max)))
    steps = [s for s in TICK_STEPS if s >= least] or [least]
    for step in steps:
        labels = [str(i) for i in range(0, len(names), step)]
        if fit(labels, step):
            break
    else:
        step = max(len(names), 1)  # not even two fit: the first alone
    return [(i, str(i)) for i in range(0, len(names), step)]


def _plot_item(plot) -> pg.PlotItem:
    return plot.getPlotItem() if isinstance(plot, pg.PlotWidget) else plot


def plain_numbers(*plots) -> None:
    """No automatic SI prefix on the axes of ``plots`` (PlotItems or PlotWidgets): pyqtgraph
    would show π = 0.8 as "800" with "(x0.001)" in the axis label; probabilities, nats and
    kernel values read as plain numbers."""
    for plot in plots:
        item = _plot_item(plot)
        for name in ("left", "bottom", "right", "top"):
            item.getAxis(name).enableAutoSIPrefix(False)


def set_class_axis(plot, classes: Sequence[str], axis: str = "bottom", width: int = 5,
                   n_max: int = 12) -> None:  # fmt: skip
    """Label ``plot``'s ``axis`` with ``classes`` (class k at k; see :func:`class_ticks`), as
    many as fit its pixels without overlapping: fitted again whenever the plot's size or range
    changes."""
    item = _plot_item(plot)
    axes = item.__dict__.get("_class_axes")
    if axes is None:
        axes = item._class_axes = {}
        item.vb.sigResized.connect(lambda *_: fit_class_axes(item))
        item.vb.sigRangeChanged.connect(lambda *_: fit_class_axes(item))
    axes[axis] = [tuple(str(c) for c in classes), width, n_max, None]
    fit_class_axes(item)


def fit_class_axes(item: pg.PlotItem) -> None:
    """Fit the class axes :func:`set_class_axis` gave ``item`` to its view's size and range."""
    for name, entry in item.__dict__.get("_class_axes", {}).items():
        classes, width, n_max, shown = entry
        vertical = name in ("left", "right")
        low, high = item.vb.viewRange()[1 if vertical else 0]
        length = item.vb.height() if vertical else item.vb.width()
        pixels = length / (high - low) if length > 1 and high > low else None
        axis = item.getAxis(name)
        ticks = class_ticks(classes, n_max, width, pixels, axis.style["tickFont"], vertical)
        if ticks != shown:
            entry[3] = ticks
            axis.setTicks([ticks])


PREDICTED, ACTUAL = "#4c72b0", "#dd8452"
PROBABILITY = "#8aa6c1"  # π's bars (the true label's and y_u's stand out)
MOMENTUM, DECAY = "#7f7f7f", "#8c564b"
STATISTICS = "#17becf"  # batch norm's running statistics
#: Titles of the formula's K and right-hand side for a plain step and an optimizer's step.
TITLES_PLAIN = {
    "K": "K(x<sub>o</sub>, x<sub>u</sub>) = J<sub>o</sub>J<sub>u</sub><sup>T</sup>",
    "predicted": "Δlog π(x<sub>o</sub>)",
}
TITLES_OPTIMIZER = {
    "K": "K<sub>P</sub>(x<sub>o</sub>, x<sub>u</sub>) = J<sub>o</sub>PJ<sub>u</sub><sup>T</sup>",
    "predicted": "gradient term",
}


def let_shrink(label: pg.LabelItem) -> pg.LabelItem:
    """Let a (long) pyqtgraph label be narrower than its text instead of widening its plot or
    layout (the text stays centred and may be cut at the edges); its height still follows the
    text's lines."""
    update = type(label).updateMin

    def update_min():
        update(label)
        label.setMinimumWidth(1)
        label._sizeHint[Qt.SizeHint.MinimumSize] = (1, label.minimumHeight())
        label.updateGeometry()

    label.updateMin = update_min
    update_min()
    return label


def let_wrap(label: pg.LabelItem, center: bool = False, on_height=None) -> pg.LabelItem:
    """Let a pyqtgraph label break its text into lines at its width (left-aligned, or each line
    centred) instead of widening its layout or being cut; its height follows the lines
    (``on_height(height)`` is called when it changes)."""
    let_shrink(label)
    if center:
        option = label.item.document().defaultTextOption()
        option.setAlignment(Qt.AlignmentFlag.AlignHCenter)
        label.item.document().setDefaultTextOption(option)
    update, resize = label.updateMin, type(label).resizeEvent
    reported = [None]  # the height last given to on_height

    def fit() -> None:
        width = label.size().width()
        if width > 1:
            label.item.setTextWidth(width)
            label.item.setPos(0, 0)  # the lines fill the width: no centring (it lags a resize)
            height = label.item.boundingRect().height()
            if abs(height - label.minimumHeight()) > 0.5:
                label.setMinimumHeight(height)
                label._sizeHint[Qt.SizeHint.MinimumSize] = (1, height)
                label._sizeHint[Qt.SizeHint.PreferredSize] = (width, height)
                label.updateGeometry()
            if on_height is not None and height != reported[0]:
                reported[0] = height
                on_height(height)

    def update_min():
        label.item.setTextWidth(-1)
        update()
        fit()

    def resize_event(event):
        resize(label, event)
        fit()

    label.updateMin = update_min
    label.resizeEvent = resize_event
    return label


def wrap_title(plot: pg.PlotItem) -> None:
    """Let ``plot``'s title break into centred lines at the plot's width; the title's row (30 px
    in pyqtgraph) grows with them."""

    def fit_row(height: float) -> None:
        h = max(30.0, height)
        plot.titleLabel.setMaximumHeight(h)
        plot.layout.setRowFixedHeight(0, h)

    def set_title(title=None, **args) -> None:
        """A new title, its row resized only when its lines need (pyqtgraph's resets it to 30
        px each time: a relayout of the whole figure per title)."""
        if title is None:
            type(plot).setTitle(plot, None)
            return
        plot.titleLabel.setVisible(True)
        plot.titleLabel.setText(title, **args)

    let_wrap(plot.titleLabel, center=True, on_height=fit_row)
    plot.setTitle = set_title


def relative_residual_text(dec) -> str:
    """‖residual‖ / ‖actual‖ of a decomposition, or a dash (with the reason) when
    nothing moved: the ratio is undefined then, not 0."""
    if not norm(dec.actual) > 0:
        return "— (‖actual‖ = 0: the step moved nothing, even in float64)"
    return f"{dec.relative_residual:.3g}"


def symmetric_limit(*arrays: np.ndarray) -> float:
    """max |value| over ``arrays`` (a tiny positive number when all are zero)."""
    m = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    return m if m > 0 and np.isfinite(m) else 1e-12


def nice_ceiling(x: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k that is ≥ ``x`` (1 for x ≤ 0 or
    not finite)."""
    if not (x > 0 and np.isfinite(x)):
        return 1.0
    k = 10.0 ** np.floor(np.log10(x))
    return next(m * k for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * k >= x * (1 - 1e-12))


def compact_tick_strings(values, scale: float, spacing: float) -> list[str]:
    """Tick labels that fit a narrow colour bar (at most 6 characters but for "-2.5e-5"): 3
    significant digits for 1e-3 ≤ |v| < 1e3 ("0.015"), thousands as "1.5k" and "-12k" (not
    "1.5e+03"), otherwise a short mantissa-exponent form ("5e-4", "-2.5e-5", "1.2e5")."""
    out = []
    for v in values:
        x = float(f"{v * scale:.3g}")  # 3 significant digits
        if x == 0:
            out.append("0")
        elif 1e3 <= abs(x) < 1e5:
            out.append(f"{x / 1e3:.3g}k")
        elif 1e-3 <= abs(x) < 1e3:
            out.append(f"{x:.3g}")
        else:
            mantissa, exponent = f"{x:.1e}".split("e")
            out.append(f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}")
    return out


class HeatmapImage(pg.ImageItem):
    """An ImageItem whose tooltip describes the hovered cell via ``describe(row, col)``."""

    def __init__(self, describe: Callable[[int, int], str]):
        super().__init__()
        self.describe = describe

    def hoverEvent(self, ev):
        if ev.isExit() or self.image is None:
            self.setToolTip("")
            return
        pos = ev.pos()
        row, col = int(np.floor(pos.y())), int(np.floor(pos.x()))
        rows, cols = self.image.shape[:2]
        if 0 <= row < rows and 0 <= col < cols:
            self.setToolTip(self.describe(row, col))


def bar_ticks(low: float, high: float, halves: bool = True) -> list[float]:
    """Where a colour bar over ``(low, high)`` is labelled: its ends and 0 for a signed map
    (halfway between them too with ``halves``), else its ends and middle (and quarters)."""
    if low < 0 < high:
        return [low, low / 2, 0.0, high / 2, high] if halves else [low, 0.0, high]
    if halves:
        return [low + (high - low) * k / 4 for k in range(5)]
    return [low, (low + high) / 2, high]


class ColorBar(pg.ColorBarItem):
    """A colour bar labelled where :func:`bar_ticks` says (a signed map always shows a negative,
    a zero and a positive label; halfway ones where the bar is tall enough), in short labels
    (:func:`compact_tick_strings`, a true minus sign), its axis as wide as they need."""

    #: Pixels of bar a label needs (8 pt text and a gap).
    LABEL_PIXELS = 17

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bar_ticks = None  # (values, labelled) shown
        small = QFont()
        small.setPointSize(8)
        self.axis.setTickFont(small)
        self.fit_ticks()

    def setLevels(self, values=None, low=None, high=None, update_items=True):
        super().setLevels(values, low, high, update_items)
        self.fit_ticks()

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        self.fit_ticks()

    def labels(self) -> list[str]:
        """The tick labels shown, top to bottom."""
        if self._bar_ticks is None:
            return []
        return [text for _, text in reversed(self.axis._tickLevels[0])]

    def fit_ticks(self) -> None:
        if not hasattr(self, "_bar_ticks"):
            return  # pyqtgraph's __init__ may set levels or resize before ours has run
        low, high = (float(v) for v in self.values)
        if not high > low:
            return
        height = self.vb.height() if self.vb.height() > 1 else 5 * self.LABEL_PIXELS
        values = bar_ticks(low, high)
        labelled = height >= (len(values) - 1) * self.LABEL_PIXELS + 4
        if (values, labelled) == self._bar_ticks:
            return
        self._bar_ticks = (values, labelled)
        ends = bar_ticks(low, high, halves=False)
        shown = values if labelled else ends
        texts = compact_tick_strings(shown, 1.0, (high - low) / 4)
        if len(shown) > len(ends) and max(map(len, texts[1::2])) > max(map(len, texts[::2])):
            shown, texts = shown[::2], texts[::2]  # "0.0075" between "0.015" and 0: unlabelled
        texts = ["−" + t[1:] if t.startswith("-") else t for t in texts]
        minor = [(v, "") for v in values if v not in shown]
        self.axis.setTicks([list(zip(shown, texts, strict=True)), minor])
        metrics = QFontMetricsF(self.axis.style["tickFont"])
        need = max(metrics.horizontalAdvance(t) for t in texts)
        offset = self.axis.style["tickTextOffset"][0] + max(0, self.axis.style["tickLength"])
        self.axis.setWidth(math.ceil(offset + need + 3))


def _plain(html: str) -> str:
    return re.sub(r"<[^>]*>", "", html)


class RowAxis(pg.AxisItem):
    """A left axis whose label, when it is a letter or two ("i", "j"), stands upright beside
    the ticks rather than turned a quarter (a turned "i" reads as "·–")."""

    SHORT = 2

    def upright(self) -> bool:
        return self.label is not None and len(_plain(self.labelText).strip()) <= self.SHORT

    def _updateLabel(self) -> None:
        super()._updateLabel()
        self._place_label()

    def resizeEvent(self, ev=None) -> None:
        super().resizeEvent(ev)
        self._place_label()

    def _place_label(self) -> None:
        if self.label is None:
            return
        if not self.upright():
            self.label.setRotation(-90)
            return
        self.label.setRotation(0)
        br = self.label.boundingRect()
        room = br.height() * 0.8  # the width pyqtgraph keeps for a turned label
        self.label.setPos((room - br.width()) / 2 - 2, (self.size().height() - br.height()) / 2)


class HeatmapView(pg.PlotItem):
    """One matrix ``(R, C)`` (a vector is shown as ``(V, 1)``) with class ticks on both axes and
    a colour bar symmetric around zero. ``image`` is exactly the array last given."""

    def __init__(
        self,
        title: str,
        describe: Callable[[int, int], str],
        row_label: str = "",
        col_label: str = "",
        colorbar: bool = True,
        colormap=None,
    ):
        super().__init__(title=title, axisItems={"left": RowAxis("left")})
        self.titleLabel.setText(title, size="11pt")
        let_shrink(self.titleLabel)  # a long title must not force the plot's width
        self.image_item = HeatmapImage(describe)
        self.addItem(self.image_item)
        self.invertY(True)
        self.disableAutoRange()
        self.setMouseEnabled(False, False)
        self.setMenuEnabled(False)
        self.hideButtons()
        plain_numbers(self)
        self.tick_font = QFont()
        self.tick_font.setPointSize(9)
        for name, label in (("left", row_label), ("bottom", col_label)):
            axis = self.getAxis(name)
            axis.setTickFont(self.tick_font)
            # the first and last column's labels may reach a few pixels past the matrix
            axis.setStyle(tickLength=0, hideOverlappingLabels=8)
            if label:
                axis.setLabel(label, **{"font-size": "9pt"})
        self._layout = None  # (rows, cols, classes) last shown
        self._ticks = None  # (left, bottom) ticks shown
        self.colorbar = None
        if colorbar:
            self.colorbar = ColorBar(
                values=(-1, 1),
                colorMap=colormap or DIVERGING,
                interactive=False,
                width=8,
                colorMapMenu=False,
            )
            self.colorbar.setImageItem(self.image_item, insert_in=self)
        # until the first matrix: the frame of a 10×10 one (not an axis around nothing)
        self.setRange(xRange=(-0.5, 9.5), yRange=(-0.5, 9.5), padding=0)
        self.vb.sigResized.connect(lambda *_: self._set_ticks())

    @property
    def image(self) -> np.ndarray | None:
        return self.image_item.image

    def clear_matrix(self, classes: Sequence[str] | None = None) -> None:
        """Show no matrix: the frame and ticks stay, or become those of a square matrix of
        ``classes`` when given (a map of other data)."""
        self.image_item.clear()
        if classes is not None:
            self._set_layout(len(classes), len(classes), classes)

    def set_matrix(
        self,
        matrix: np.ndarray,
        classes: Sequence[str],
        limit: float | None = None,
        levels: tuple[float, float] | None = None,
    ) -> None:
        """Show ``matrix (R, C)`` with rows/columns labelled by ``classes``; colour levels
        ±``limit`` (default max |value|) rounded up to a round number (so the colour bar reads
        well and keeps its drawing while values drift), or ``levels`` (low, high) when given."""
        rows, cols = matrix.shape
        lim = nice_ceiling(limit if limit is not None else symmetric_limit(matrix))
        levels = levels if levels is not None else (-lim, lim)
        self.image_item.setImage(matrix, autoLevels=False, levels=levels)
        if self.colorbar is not None:
            self.colorbar.setLevels(levels)
        self._set_layout(rows, cols, classes)

    def _set_layout(self, rows: int, cols: int, classes: Sequence[str]) -> None:
        layout = (rows, cols, tuple(classes))
        if layout != self._layout:  # axes keep their cached drawing unless the layout changes
            self._layout = layout
            self.image_item.setRect(QRectF(-0.5, -0.5, cols, rows))
            self.setRange(xRange=(-0.5, cols - 0.5), yRange=(-0.5, rows - 0.5), padding=0)
            self._ticks = None
            self._set_ticks()

    #: From this width (pixels) on, a matrix names its rows (elided); narrower, long names
    #: would leave no room for the matrix and the rows are numbered.
    NAMED_WIDTH = 230

    def _set_ticks(self) -> None:
        """Class ticks on both axes, as many as the matrix's pixels fit without overlapping."""
        if self._layout is None:
            return
        rows, cols, classes = self._layout
        named = cols > 1 and self.size().width() >= self.NAMED_WIDTH
        width, height = self.vb.width(), self.vb.height()
        font = self.tick_font
        ticks = (
            class_ticks(classes[:rows], n_max=10 if rows > NAMED_CLASSES else 20,
                        width=7 if named else 4, vertical=True, font=font,
                        pixels=height / rows if height > 1 else None),
            class_ticks(classes[:cols], n_max=5 if cols > NAMED_CLASSES else 10, width=4,
                        font=font, pixels=width / cols if width > 1 else None)
            if cols > 1 else [(0, "")],
        )  # fmt: skip
        if ticks != self._ticks:
            self._ticks = ticks
            self.getAxis("left").setTicks([ticks[0]])
            self.getAxis("bottom").setTicks([ticks[1]])


def _operator(text: str, size: str = "18pt") -> pg.LabelItem:
    label = pg.LabelItem(text, size=size, color="k")
    label.setSizePolicy(
        pg.QtWidgets.QSizePolicy.Policy.Fixed, pg.QtWidgets.QSizePolicy.Policy.Preferred
    )
    return label


LOGIT_PLAIN = "logit level:<br>Δz(x<sub>o</sub>) =<br>−η · K · G"
LOGIT_OPTIMIZER = (
    "logit level:<br>Δz(x<sub>o</sub>) =<br>−s · K<sub>P</sub> · G<br>+ momentum<br>+ decay"
)


class DecompositionView(pg.GraphicsLayoutWidget):
    """Δlog π(x_o) = −η · A · K · G laid out as the formula, with the logit level Δz = −η·K·G and
    the actual change and O(η²) residual below. ``heatmaps[name].image`` holds the core's arrays
    (vectors as ``(V, 1)``)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setBackground("w")
        self.classes: tuple[str, ...] = tuple(str(i) for i in range(10))
        self._dec = None
        self.info = let_wrap(self.addLabel("Waiting for a model…", row=0, col=0, size="11pt"))
        top = self.addLayout(row=1, col=0)
        bottom = self.addLayout(row=2, col=0)
        d = self._describe
        self.heatmaps: dict[str, HeatmapView] = {}
        self.eta_label = _operator("−η ·")
        top.addItem(self.eta_label, 0, 0)
        items = [
            ("A", "A(x<sub>o</sub>) = I − 1·π<sup>T</sup>", "i: log π<sub>i</sub>(x<sub>o</sub>)",
             "j: z<sub>j</sub>(x<sub>o</sub>)"),
            ("·", None, None, None),
            ("K", "K(x<sub>o</sub>, x<sub>u</sub>) = J<sub>o</sub>J<sub>u</sub><sup>T</sup>",
             "i: z<sub>i</sub>(x<sub>o</sub>)", "j: z<sub>j</sub>(x<sub>u</sub>)"),
            ("·", None, None, None),
            ("G", "G(x<sub>u</sub>, y<sub>u</sub>)", "j", ""),
            ("=", None, None, None),
            ("predicted", "Δlog π(x<sub>o</sub>)", "i", ""),
        ]  # fmt: skip
        for col, (name, title, rlab, clab) in enumerate(items, start=1):
            if title is None:
                top.addItem(_operator(name), 0, col)
                continue
            view = HeatmapView(title, lambda i, j, n=name: d(n, i, j), rlab, clab)
            if name in ("G", "predicted"):
                view.setMinimumWidth(100)  # a vector: axis, ≥ 20 px of cells, colour bar
                view.setMaximumWidth(120)  # vectors stay narrow; the matrices get the room
            else:
                view.setMinimumWidth(124)  # 10 columns of ≥ 5 px with their tick labels
                view.setPreferredWidth(420)
            self.heatmaps[name] = view
            top.addItem(view, 0, col)
        for col, stretch in enumerate([0, 8, 0, 8, 0, 2, 0, 2]):
            top.layout.setColumnStretchFactor(col, stretch)
        self.logit_label = _operator(LOGIT_PLAIN, "11pt")
        bottom.addItem(self.logit_label, 0, 0)
        lower = [
            ("delta_logits_predicted", "Δz predicted"),
            ("delta_logits_actual", "Δz actual"),
            ("actual", "Δlog π actual"),
            ("residual", "residual (O(η²))"),
        ]
        for col, (name, title) in enumerate(lower, start=1):
            view = HeatmapView(title, lambda i, j, n=name: d(n, i, j), "i", "")
            self.heatmaps[name] = view
            bottom.addItem(view, 0, col)
            bottom.layout.setColumnStretchFactor(col, 3)
        self.ci.layout.setRowStretchFactor(1, 3)
        self.ci.layout.setRowStretchFactor(2, 2)
        self._fit_minimum()

    def _fit_minimum(self) -> None:
        """As wide as the rows need (−η, A and K of ≥ 126 px, G, Δlog π, the operators): a
        narrower window shrinks the docks rather than cut the formula."""
        need = int(self.ci.effectiveSizeHint(Qt.SizeHint.MinimumSize).width()) + 4
        if need != self.minimumWidth():
            self.setMinimumSize(need, 360)

    def set_decomposition(
        self, dec, classes: Sequence[str] | None = None, info: str = "", mixed: bool = False
    ) -> None:
        """Show every factor of ``dec`` (a core ``Decomposition``); ``mixed``: the model computes
        differently in training mode (dropout, batch norm)."""
        for step in self.update_steps(dec, classes, info, mixed):
            step()

    def update_steps(
        self, dec, classes: Sequence[str] | None = None, info: str = "", mixed: bool = False
    ) -> list:
        """The updates of :meth:`set_decomposition` as three callables of about equal painting
        cost, so a caller can repaint between them and never hold the event loop for the whole
        view (each heatmap apart would cost a few ms of repaint overhead more)."""
        if classes is not None:
            self.classes = tuple(classes)
        self._dec = dec
        c = self.classes
        lim = symmetric_limit(dec.predicted, dec.actual)
        lim_z = symmetric_limit(dec.delta_logits_predicted, dec.delta_logits_actual)
        kind = "learn y_u (cross-entropy)" if dec.loss == "ce" else "negative gradient on y_u"
        # the run's optimizer's step: the factor is its step scale s, K its kernel K_P, and the
        # formula gives the gradient term; momentum and weight decay stand beside it
        term = getattr(dec, "gradient_term", None)
        if term is None:
            factor, step = "η", f"plain SGD step, η = {dec.lr:.3g}"
        else:
            factor = "s"
            step = (
                f"{dec.optimizer} step, η = {dec.lr:.3g}, s = {dec.step_scale:.3g}; + momentum "
                f"(‖·‖ = {norm(dec.momentum):.2g}) + weight decay "
                f"(‖·‖ = {norm(dec.weight_decay):.2g})"
            )
            if np.any(dec.statistics):
                step += f" + running statistics, exact (‖·‖ = {norm(dec.statistics):.2g})"
        scale = dec.lr if term is None else dec.step_scale
        text = (
            f"{kind}, y<sub>u</sub> = {elide(c[dec.y_u], 16)}  ·  {step}<br>"
            f"‖residual‖ / ‖actual‖ = {relative_residual_text(dec)}"
        )
        h = self.heatmaps
        titles = dict(TITLES_PLAIN if term is None else TITLES_OPTIMIZER)
        # the optimizer's real step on a dropout / batch-norm model takes its gradient in
        # training mode, its account in eval mode: a first-order part in the residual
        titles["residual"] = "residual (O(η²))" if term is None or not mixed else "residual (O(η))"

        def matrices():
            self.eta_label.setText(
                f"−{factor} ·<br><span style='font-size:10pt'>{factor} = {scale:.3g}</span>"
            )
            self.info.setText(f"{info}<br>{text}" if info else text, size="11pt")
            logit = LOGIT_PLAIN if term is None else LOGIT_OPTIMIZER
            if self.logit_label.text != logit:
                self.logit_label.setText(logit, size="11pt")
            for name, title in titles.items():
                if h[name].titleLabel.text != title:
                    h[name].titleLabel.setText(title, size="11pt")
            h["A"].set_matrix(dec.A, c)
            h["K"].set_matrix(dec.K, c)

        def log_probabilities():
            h["G"].set_matrix(dec.G[:, None], c)
            shown = dec.predicted if term is None else term
            h["predicted"].set_matrix(shown[:, None], c, lim)
            h["actual"].set_matrix(dec.actual[:, None], c, lim)

        def logits():
            h["delta_logits_predicted"].set_matrix(dec.delta_logits_predicted[:, None], c, lim_z)
            h["delta_logits_actual"].set_matrix(dec.delta_logits_actual[:, None], c, lim_z)
            h["residual"].set_matrix(dec.residual[:, None], c)
            self._fit_minimum()  # tick labels of other classes may need other widths

        return [matrices, log_probabilities, logits]

    def _describe(self, name: str, i: int, j: int) -> str:
        dec, c = self._dec, self.classes
        if dec is None:
            return ""
        if name == "A":
            v = dec.A[i, j]
            return (
                f"A[{c[i]},{c[j]}] = {v:.4g}: raising z_{c[j]}(x_o) by 1 changes "
                f"log π_{c[i]}(x_o) by {v:.4g}"
            )
        if name == "K":
            v = dec.K[i, j]
            return (
                f"K[{c[i]},{c[j]}] = {v:.4g}: a step raising z_{c[j]}(x_u) changes z_{c[i]}(x_o) "
                f"by {v:.4g}·(step)"
            )
        if name == "G":
            v = dec.G[i]
            return f"G[{c[i]}] = {v:.4g}: ∂L/∂z_{c[i]}(x_u); the step moves z_{c[i]}(x_u) by −η·G"
        values = {
            "predicted": ("Δlog π", dec.predicted, dec.actual),
            "actual": ("Δlog π", dec.predicted, dec.actual),
            "delta_logits_predicted": ("Δz", dec.delta_logits_predicted, dec.delta_logits_actual),
            "delta_logits_actual": ("Δz", dec.delta_logits_predicted, dec.delta_logits_actual),
        }
        if name in values:
            what, pred, act = values[name]
            return f"{what}_{c[i]}(x_o): predicted {pred[i]:.4g}, actual {act[i]:.4g}"
        return f"residual_{c[i]} = actual − predicted = {dec.residual[i]:.3g}"


def bar_pen(color) -> pg.QtGui.QPen:
    """A bar's outline in its own colour: narrow bars (many classes) keep their colour instead
    of turning into dark outlines, and stay at least a pixel wide."""
    return pg.mkPen(color, width=1)


class ProbabilityBars(pg.PlotWidget):
    """π over classes as bars; the true label in green, optional ``target`` in orange."""

    def __init__(self, title: str = "π", parent: QWidget | None = None):
        super().__init__(parent)
        self.setBackground("w")
        self.setTitle(title, size="9pt")
        self.setYRange(0, 1, padding=0.02)
        self.setMouseEnabled(False, False)
        self.setMenuEnabled(False)
        self.hideButtons()
        plain_numbers(self)
        self.bars = pg.BarGraphItem(
            x=np.arange(10), height=np.zeros(10), width=0.75, pen=bar_pen(PROBABILITY)
        )
        self.addItem(self.bars)
        self.setMinimumHeight(110)
        self.setMaximumHeight(170)
        self.probs = np.zeros(10)
        self.set_classes(tuple(str(i) for i in range(10)))

    def set_classes(self, classes) -> None:
        """Name the bars (the x axis) after ``classes``."""
        self.setXRange(-0.6, len(classes) - 0.4, padding=0)
        set_class_axis(self, classes, n_max=10)

    def set_probs(self, probs: np.ndarray, label: int | None = None, target: int | None = None):
        """``probs (V,)``; ``label`` the true class, ``target`` y_u."""
        self.probs = np.asarray(probs)
        colors = [
            "#2ca02c" if i == label else "#ff7f0e" if i == target else PROBABILITY
            for i in range(len(probs))
        ]
        self.bars.setOpts(
            x=np.arange(len(probs)), height=self.probs, brushes=[pg.mkBrush(c) for c in colors],
            pens=[bar_pen(c) for c in colors],
        )  # fmt: skip


TITLE_PLAIN = (  # no break between a swatch and its name
    "Δlog π(x<sub>o</sub>) after one step<br>"
    f"<span style='color:{PREDICTED}'>■</span>&nbsp;predicted&nbsp;−η·A·K·G  "
    f"<span style='color:{ACTUAL}'>■</span>&nbsp;actual"
)
TITLE_OPTIMIZER = (
    "Δlog π(x<sub>o</sub>) after the optimizer's step<br>"
    f"<span style='color:{PREDICTED}'>■</span>&nbsp;−s·A·K<sub>P</sub>·G "
    f"<span style='color:{MOMENTUM}'>■</span>&nbsp;momentum "
    f"<span style='color:{DECAY}'>■</span>&nbsp;decay "
    f"<span style='color:{ACTUAL}'>■</span>&nbsp;actual"
)
TITLE_STATISTICS = TITLE_OPTIMIZER.replace(
    "&nbsp;decay ", f"&nbsp;decay <span style='color:{STATISTICS}'>■</span>&nbsp;statistics "
)


class PreviewBars(pg.PlotWidget):
    """Predicted vs actual Δlog π(x_o) per class, as paired bars."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setBackground("w")
        # the legend is in the title: inside the plot it would cover the tallest bars
        self.setTitle(TITLE_PLAIN, size="10pt")
        let_wrap(self.getPlotItem().titleLabel)  # a narrow plot wraps its legend
        self.setMenuEnabled(False)
        plain_numbers(self)

        def bars(color, x=(), width=0.19):
            x = np.asarray(x, float)
            return pg.BarGraphItem(
                x=x, height=np.zeros(len(x)), width=width, brush=color, pen=bar_pen(color)
            )

        self.predicted = bars(PREDICTED, np.arange(10) - 0.2, 0.38)
        self.actual = bars(ACTUAL, np.arange(10) + 0.2, 0.38)
        self.momentum = bars(MOMENTUM)
        self.decay = bars(DECAY)
        self.statistics = bars(STATISTICS)
        for item in (self.predicted, self.momentum, self.decay, self.statistics, self.actual):
            self.addItem(item)
        self.addItem(pg.InfiniteLine(pos=0, angle=0, pen=pg.mkPen("#444", width=1)))
        self.setLabel("bottom", "class i")
        self.disableAutoRange()
        self.setRange(xRange=(-0.6, 9.6), yRange=(-1, 1), padding=0.05)
        self.classes = tuple(str(i) for i in range(10))
        self._view = None  # (classes, y low, y high) shown

    def set_values(self, predicted: np.ndarray, actual: np.ndarray, history=None) -> None:
        """Predicted against actual Δlog π ``(V,)``; with ``history`` (an optimizer's step: its
        ``(momentum, weight_decay, statistics)``) the predicted bar is its gradient term and the
        momentum and weight-decay terms stand beside it, and the running statistics' change
        where there is one."""
        x = np.arange(len(predicted))
        bars = [(self.predicted, predicted), (self.actual, actual)]
        stats = history is not None and bool(np.any(history[2]))
        if history is not None:
            bars[1:1] = [(self.momentum, history[0]), (self.decay, history[1])]
            if stats:
                bars[3:3] = [(self.statistics, history[2])]
        width = 0.76 / len(bars)
        for k, (item, values) in enumerate(bars):
            item.setOpts(x=x + (k - (len(bars) - 1) / 2) * width, height=values, width=0.95 * width)
        for item in (self.momentum, self.decay):
            item.setVisible(history is not None)
        self.statistics.setVisible(stats)
        title = TITLE_PLAIN if history is None else TITLE_STATISTICS if stats else TITLE_OPTIMIZER
        if self.getPlotItem().titleLabel.text != title:
            self.setTitle(title, size="10pt")
        # the axes change only when a value leaves the round range around them: a new value
        # alone then repaints the bars and not the axes
        both = np.concatenate([values for _, values in bars])
        low, high = float(np.min(both, initial=0.0)), float(np.max(both, initial=0.0))
        bottom = -nice_ceiling(-low) if low < 0 else 0.0
        top = nice_ceiling(high) if high > 0 else 0.0
        view = (self.classes, bottom, top) if bottom < top else (self.classes, -1.0, 1.0)
        if view != self._view:
            self._view = view
            self.setRange(xRange=(-0.6, len(x) - 0.4), yRange=view[1:], padding=0.05)
            set_class_axis(self, self.classes[: len(x)], n_max=10)


class TrajectoryPlot(pg.PlotWidget):
    """π(x_o) per class (or log π) over applied step-through steps, and π_{y_u}(x_u) dashed.
    ``curves[i]`` holds class i's line; one scatter item marks every step of every class."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setBackground("w")
        self.setMenuEnabled(False)
        self.setLabel("bottom", "applied steps")
        plain_numbers(self)
        self.disableAutoRange()
        self.log_scale = False
        self.classes = tuple(str(i) for i in range(10))
        self.curves: list = []  # class i's line (made as many as there are classes)
        self.end_labels: list = []
        # one scatter item for all markers: ten items with symbols cost ten symbol renderings
        self.markers = pg.ScatterPlotItem(size=5, pen=None)
        self.addItem(self.markers)
        self.own = self.plot([], [], pen=pg.mkPen("k", width=2, style=Qt.PenStyle.DashLine))
        self._history = None
        self._note = ""  # what the applied steps learnt when it was not the shown update
        self._view = None  # (steps, log scale, y low, plot size) shown
        wrap_title(self.getPlotItem())  # the title's row grows with its lines (export captions)
        self._update_labels()

    def _update_labels(self):
        title = (
            ("log π" if self.log_scale else "π")
            + "(x<sub>o</sub>) per class over applied steps"
            + "<br>dashed: "
            + ("log π" if self.log_scale else "π")
            + "<sub>y<sub>u</sub></sub>(x<sub>u</sub>)"
        )
        if self._note:
            title += f"<br><span style='color:#b05000'>the steps learnt another update: {self._note}</span>"
        self.setTitle(title, size="10pt")
        self.setLabel("left", "log π" if self.log_scale else "π")

    def set_log(self, on: bool) -> None:
        self.log_scale = on
        self._update_labels()
        if self._history is not None:
            self.set_trajectory(*self._history)

    def set_history(self, history, note: str = "") -> None:
        """``history``: a ``StepHistory``; ``note``: which other updates its steps learnt."""
        if note != self._note:
            self._note = note
            self._update_labels()
        self.set_trajectory(history.probs_o, history.probs_u, history.request.y_u)

    def set_trajectory(self, probs_o: np.ndarray, probs_u: np.ndarray, y_u: int) -> None:
        """π(x_o) and π(x_u) ``(steps + 1, V)`` over the steps on (x_u, y_u)."""
        self._history = (probs_o, probs_u, y_u)
        steps = np.arange(len(probs_o))
        f = (lambda p: np.log(np.maximum(p, 1e-300))) if self.log_scale else (lambda p: p)
        values = f(probs_o)  # (steps, V)
        own = f(probs_u[:, y_u])
        classes = values.shape[1]
        while len(self.curves) < classes:
            k = len(self.curves)
            self.curves.append(self.plot([], [], pen=pg.mkPen(class_color(k), width=2)))
            self.end_labels.append(pg.TextItem("", color=class_color(k), anchor=(0, 0.5)))
            self.addItem(self.end_labels[-1])
        # the end of each line names its class (the top ten); ends closer than a label's height
        # (16 px) share the label of the highest, which counts the others ("cat +3")
        low = -nice_ceiling(-min(values.min(), own.min())) if self.log_scale else 0.0
        box = self.getPlotItem().vb
        height, width = max(box.height(), 100.0), max(box.width(), 150.0)
        gap = 16 / height * ((0.0 if self.log_scale else 1.0) - low)
        shown: dict[int, list[int]] = {}  # class -> the classes whose ends its label names
        for i in np.argsort(-values[-1], kind="stable")[:10].tolist():
            near = [j for j in shown if abs(values[-1, j] - values[-1, i]) < gap]
            shown.setdefault(near[0] if near else i, []).append(i)

        def name(k: int) -> str:
            return elide(str(self.classes[k]) if k < len(self.classes) else str(k), 8)

        for i, (curve, label) in enumerate(zip(self.curves, self.end_labels, strict=True)):
            curve.setData(steps, values[:, i]) if i < classes else curve.setData([], [])
            label.setVisible(i in shown and len(steps) > 1)  # no lines yet: no ends to name
            if i in shown:
                names = ", ".join(name(k) for k in shown[i])  # "2, 7"; else "cat +3"
                short = len(shown[i]) <= 3 and len(names) <= 12
                label.setText(names if short else f"{name(i)} +{len(shown[i]) - 1}")
                label.setPos(steps[-1] + 0.05, values[-1, i])
        brushes = [pg.mkBrush(class_color(i)) for i in range(classes)]
        self.markers.setData(
            x=np.tile(steps, classes),
            y=values.T.ravel(),
            brush=[brushes[i] for i in range(classes) for _ in steps],
        )
        self.own.setData(steps, own)
        # fixed axes: π in [0, 1]; log π from a round number below its minimum to 0
        view = (len(steps), self.log_scale, low, round(width, -1))
        if view != self._view:
            self._view = view
            right = max(1, steps[-1]) * (1 + min(0.35, 90 / width))  # room for the end labels
            self.setRange(
                xRange=(0, right), yRange=(low, 0.0 if self.log_scale else 1.0), padding=0.03
            )
            major = max(1, len(steps) // 8 + 1)
            self.getPlotItem().getAxis("bottom").setTickSpacing(major=major, minor=major)


RAW_LOSS, SMOOTHED_LOSS = "#a0a0a0", "#1f77b4"


class TrainingCurves(QWidget):
    """Shows a :class:`~ntkviz.app.features.training.RunCurves`: loss per step (raw and
    smoothed) and test accuracy, redrawn at most every ``REDRAW_MS`` while records arrive."""

    REDRAW_MS = 250

    def __init__(self, curves, parent: QWidget | None = None):
        super().__init__(parent)
        self.model = curves
        self._acc_drawn = -1  # accuracy points drawn
        self._ranges = None  # (steps, loss top) of the axes
        self.loss_plot = pg.PlotWidget()
        self.loss_plot.setBackground("w")
        # the legend is in the title: inside the plot it covers a curve that stays high
        self.loss_plot.setTitle(
            f"training loss <span style='color:{RAW_LOSS}'>━</span>&nbsp;per&nbsp;batch "
            f"<span style='color:{SMOOTHED_LOSS}'>━</span>&nbsp;EMA",
            size="10pt",
        )
        let_wrap(self.loss_plot.getPlotItem().titleLabel, center=True)  # a narrow dock wraps it
        self.loss_plot.setLabel("bottom", "step")
        self.raw_curve = self.loss_plot.plot(pen=pg.mkPen(RAW_LOSS, width=1))
        self.ema_curve = self.loss_plot.plot(pen=pg.mkPen(SMOOTHED_LOSS, width=2))
        self.acc_plot = pg.PlotWidget()
        self.acc_plot.setTitle("test accuracy", size="10pt")
        self.acc_plot.setBackground("w")
        self.acc_plot.setLabel("bottom", "step")
        self.acc_plot.getAxis("left").setTickSpacing(major=0.5, minor=0.1)  # not 6 crowded labels
        for plot in (self.loss_plot, self.acc_plot):
            plot.disableAutoRange()
            plain_numbers(plot)
        self.acc_curve = self.acc_plot.plot(
            pen=pg.mkPen("#2ca02c", width=2), symbol="o", symbolSize=5, symbolBrush="#2ca02c"
        )
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.loss_plot, 3)
        lay.addWidget(self.acc_plot, 2)
        self.loss_plot.setMinimumHeight(120)
        self.acc_plot.setMinimumHeight(90)
        # Records arrive many times a second; redrawing the curves each time costs the main
        # thread tens of ms a repaint. Redraw at most every REDRAW_MS instead (flush() forces it).
        self._redraw_timer = QTimer(self)
        self._redraw_timer.setSingleShot(True)
        self._redraw_timer.setInterval(self.REDRAW_MS)
        self._redraw_timer.timeout.connect(self._redraw)
        curves.changed.connect(self._changed)
        self._redraw()

    def sizeHint(self) -> QSize:
        """Modest: the dock's scroll area sizes its content by preferred heights (its labels wrap),
        and pyqtgraph's plots prefer 960 px between them; the curves take the height left."""
        return QSize(240, 300)

    def _changed(self) -> None:
        if not self.model.steps:  # cleared: show it at once
            self._acc_drawn = -1
            self._redraw()
        elif not self._redraw_timer.isActive():
            self._redraw_timer.start()

    def flush(self) -> None:
        """Draw what has arrived now rather than at the next throttled redraw."""
        if self._redraw_timer.isActive():
            self._redraw_timer.stop()
            self._redraw()

    def _redraw(self) -> None:
        m = self.model
        # Fixed ranges (all steps of the run; loss from 0 to a round number above its maximum):
        # the axes then stay as drawn, and a redraw repaints the curves alone.
        steps = max(m.total_steps, m.steps[-1] if m.steps else 1)
        top = nice_ceiling(max(m.losses, default=1.0))
        if (steps, top) != self._ranges:
            self._ranges = (steps, top)
            self.loss_plot.setRange(xRange=(0, steps), yRange=(0, top), padding=0.02)
            # room around the first and last step and accuracies 0 and 1: their points (5 px)
            # are not cut at the plot's edges
            pad = 0.03 * steps + 0.5
            self.acc_plot.setRange(
                xRange=(-pad, steps + pad), yRange=(-0.06, 1.06), padding=0
            )  # fmt: skip
        self.raw_curve.setData(m.steps, m.losses)
        # one record is no line: a point until the second (One batch shows its loss)
        single = {"symbol": "o", "symbolSize": 6, "symbolBrush": SMOOTHED_LOSS, "symbolPen": None}
        self.ema_curve.setData(
            m.steps, m.smoothed, **(single if len(m.steps) == 1 else {"symbol": None})
        )
        if len(m.acc_steps) != self._acc_drawn:  # accuracy arrives every eval_every steps
            self._acc_drawn = len(m.acc_steps)
            self.acc_curve.setData(m.acc_steps, m.accuracies)
