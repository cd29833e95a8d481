"""The plots read right: colour bars label both signs, class ticks never overlap, no automatic
SI prefix on probabilities or nats, bars keep their colours, the watch's term curves are no
class's colour, short axis labels stand upright."""

import os
from itertools import pairwise

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest

pytest.importorskip("PySide6")

from gui_helpers import open_window, settings_in
from PySide6.QtGui import QFontMetricsF, QImage, QPainter
from PySide6.QtWidgets import QApplication

from ntkviz.gui.features import watch as watch_module
from ntkviz.gui.graphics import pg
from ntkviz.gui.plots import (
    HeatmapView,
    PreviewBars,
    ProbabilityBars,
    class_color,
    class_ticks,
)

CIFAR100 = [f"class_{k:02d}" for k in range(100)]


def drawn_labels(axis: pg.AxisItem) -> list[str]:
    """The tick labels pyqtgraph really draws on ``axis`` (it leaves out those that do not fit)."""
    image = QImage(10, 10, QImage.Format.Format_ARGB32)
    painter = QPainter(image)
    try:
        specs = axis.generateDrawSpecs(painter)
    finally:
        painter.end()
    return [text for _, _, text in specs[2]] if specs else []


def settle() -> None:
    """Handle the posted layout requests, so that the axes have their final sizes."""
    QApplication.sendPostedEvents()
    QApplication.processEvents()


def heatmap(qtbot, size=(260, 180), **kwargs) -> tuple[pg.GraphicsLayoutWidget, HeatmapView]:
    widget = pg.GraphicsLayoutWidget()
    qtbot.addWidget(widget)
    view = HeatmapView("t", lambda i, j: "", "i", "", **kwargs)
    widget.addItem(view)
    widget.resize(*size)
    widget.show()
    qtbot.waitExposed(widget)
    return widget, view


def number(text: str) -> float:
    return float(text.replace("−", "-"))


@pytest.mark.parametrize("scale", [0.0045, 0.0075, 0.012, 3e-5, 0.4, 60.0])
def test_a_signed_colour_bar_draws_a_negative_a_zero_and_a_positive_label(qtbot, scale):
    # the watch's "its Δlog π(x_o)" (±0.005) and influence's mean Δπ (±0.008) showed 0.004,
    # 0.002, 0 and nothing below: "-0.004" did not fit the 40 px axis and was left out
    _, view = heatmap(qtbot)
    rng = np.random.default_rng(0)
    matrix = rng.uniform(-1, 1, (10, 1)) * scale
    matrix[0, 0] = scale
    view.set_matrix(matrix, [str(k) for k in range(10)])
    settle()
    low, high = view.colorbar.levels()
    drawn = drawn_labels(view.colorbar.axis)
    values = [number(t) for t in drawn]
    assert min(values) == pytest.approx(low) and max(values) == pytest.approx(high)
    assert low < 0 < high and "0" in drawn, drawn
    # every label fits the axis beside the bar
    metrics = QFontMetricsF(view.colorbar.axis.style["tickFont"])
    widest = max(metrics.horizontalAdvance(t) for t in drawn)
    assert widest + 5 <= view.colorbar.axis.width()


def test_a_sequential_colour_bar_labels_its_ends(qtbot):
    _, view = heatmap(qtbot)
    view.set_matrix(np.full((10, 10), 0.3), [str(k) for k in range(10)], levels=(0.0, 0.8))
    settle()
    drawn = drawn_labels(view.colorbar.axis)
    assert number(drawn[0]) == 0.0 and number(drawn[-1]) == pytest.approx(0.8)


def labels_apart(ticks, pixels: float, metrics: QFontMetricsF, vertical=False) -> bool:
    """Neighbouring labels of ``ticks`` (at ``pixels`` per class) do not overlap."""
    for (a, ta), (b, tb) in pairwise(ticks):
        need = (
            metrics.height()
            if vertical
            else (metrics.horizontalAdvance(ta) + metrics.horizontalAdvance(tb)) / 2
        )
        if (b - a) * pixels < need:
            return False
    return True


@pytest.mark.parametrize("pixels", [0.3, 0.56, 1.0, 2.0, 4.0, 9.0, 20.0])
def test_class_ticks_of_100_classes_are_spaced_by_the_pixels_they_have(qtbot, pixels):
    font = pg.QtGui.QFont()
    font.setPointSize(9)
    metrics = QFontMetricsF(font)
    for vertical in (False, True):
        ticks = class_ticks(CIFAR100, n_max=12, width=5, pixels=pixels, font=font,
                            vertical=vertical)  # fmt: skip
        assert ticks[0] == (0, "0")
        assert labels_apart(ticks, pixels, metrics, vertical), (pixels, vertical, ticks)
    # with room, names (elided) for a few classes; numbers where they would run together
    few = ["airplane", "automobile", "bird", "cat", "deer"]
    named = class_ticks(few, width=6, pixels=60, font=font)
    assert [t for _, t in named][:2] == ["airpl…", "autom…"]
    assert class_ticks(few, width=6, pixels=12, font=font)[0] == (0, "0")


@pytest.mark.parametrize("size", [(200, 160), (260, 200), (420, 320)])
def test_a_100_class_heatmap_labels_no_ticks_over_each_other(qtbot, size):
    # at 1280×800 A and K showed "0255075" under a 56 px wide matrix
    _, view = heatmap(qtbot, size)
    view.set_matrix(np.zeros((100, 100)), CIFAR100)
    settle()
    width, height = view.vb.width(), view.vb.height()
    assert width > 20 and height > 20
    metrics = QFontMetricsF(view.tick_font)
    bottom = view.getAxis("bottom")._tickLevels[0]
    left = view.getAxis("left")._tickLevels[0]
    assert len(bottom) >= 2 and len(left) >= 2
    assert labels_apart(bottom, width / 100, metrics)
    assert labels_apart(left, height / 100, metrics, vertical=True)


def test_the_class_ticks_follow_a_resize(qtbot):
    widget, view = heatmap(qtbot, (180, 160))
    view.set_matrix(np.zeros((100, 100)), CIFAR100)
    settle()
    narrow = len(view.getAxis("bottom")._tickLevels[0])
    widget.resize(700, 500)
    qtbot.waitUntil(lambda: len(view.getAxis("bottom")._tickLevels[0]) > narrow)


def test_bars_keep_their_colours_with_many_classes(qtbot):
    # the default black outline turned 100 narrow bars into black lines
    preview = PreviewBars()
    qtbot.addWidget(preview)
    preview.classes = tuple(CIFAR100)
    rng = np.random.default_rng(0)
    preview.set_values(rng.normal(size=100), rng.normal(size=100))
    for item in (preview.predicted, preview.actual):
        pen, brush = item.opts["pen"], item.opts["brush"]
        assert pg.mkPen(pen).color() == pg.mkBrush(brush).color()
    bars = ProbabilityBars()
    qtbot.addWidget(bars)
    bars.set_classes(CIFAR100)
    bars.set_probs(np.full(100, 0.01), label=3, target=5)
    pens, brushes = bars.bars.opts["pens"], bars.bars.opts["brushes"]
    assert [p.color() for p in pens] == [b.color() for b in brushes]


def test_a_letter_row_label_stands_upright(qtbot):
    _, view = heatmap(qtbot)
    assert view.getAxis("left").label.rotation() == 0  # "i" turned reads as "·–"
    widget = pg.GraphicsLayoutWidget()
    qtbot.addWidget(widget)
    long = HeatmapView("t", lambda i, j: "", "i: log π<sub>i</sub>", "")
    widget.addItem(long)
    assert long.getAxis("left").label.rotation() == -90


def test_the_watch_term_curves_wear_no_class_colour():
    palette = {pg.mkColor(class_color(k)).name() for k in range(1000)}
    assert pg.mkColor(watch_module.TERM_COLOR).name() not in palette
    assert watch_module.OTHER_CLASSES.color().name() not in palette
    dashes = [tuple(d) for _, _, d in watch_module.OTHER_TERMS]
    assert len(set(dashes)) == len(dashes)  # each term its own dashes


def test_window_plots_read_plain_numbers_and_the_watch_waits_for_a_step(qtbot, tmp_path, mnist):
    window = open_window(qtbot, settings_in(tmp_path), mnist)
    # no automatic SI prefix ("800 (x0.001)" for π = 0.8) on any labelled axis of these views
    names = ("pair", "examples", "squeeze", "influence", "watch_ranking", "training")
    for name in names:
        for view in window.views[name].findChildren(pg.GraphicsView):
            for item in view.scene().items():
                if isinstance(item, pg.AxisItem) and item.label.isVisible():
                    assert not item.autoSIPrefix, (name, item.labelText)
    squeeze = window.views["squeeze"]
    for plot in squeeze.run_plots.values():
        plot.setYRange(0, 0.8)
        assert "(x" not in plot.getAxis("left").labelString()
    # the training curves leave room for a point at the last step
    curves = window.views["training"].curves
    total = max(curves.model.total_steps, 1)
    assert curves.acc_plot.viewRange()[0][1] > total * 1.02
    # the update's names fit the dock's combo box; the full ones are its tooltips
    box = window.views["examples"].loss_box
    for k in range(box.count()):
        assert len(box.itemText(k)) <= box.minimumContentsLength()
        assert len(box.itemData(k, pg.QtCore.Qt.ItemDataRole.ToolTipRole)) >= len(box.itemText(k))
    # before a step is clicked the watch shows a line saying so, not empty heatmaps
    watch = window.views["watch_ranking"]
    window.show_view(watch)
    assert watch.factor_hint.isVisible()
    assert not any(v.isVisible() for v in watch.factors.values())


def test_probe_captions_say_when_steps_were_applied_by_hand():
    from types import SimpleNamespace

    from ntkviz.gui.plots import model_step

    assert model_step(SimpleNamespace(step=47)) == "at training step 47"
    assert model_step(SimpleNamespace(step=47, applied_steps=0)) == "at training step 47"
    assert (
        model_step(SimpleNamespace(step=47, applied_steps=3)) == "at training step 47 + 3 applied"
    )
    # step 0: a model as built or given from Python (trained elsewhere or not), not "step 0"
    assert model_step(SimpleNamespace(step=0, applied_steps=0)) == "before training here"
    assert (
        model_step(SimpleNamespace(step=0, applied_steps=2)) == "before training here + 2 applied"
    )


def test_an_empty_heatmap_takes_the_frame_of_the_data_it_will_show(qtbot):
    """Before any map of 100-class data, the axes are those of a 100×100 matrix, not the 10×10
    frame a heatmap starts with."""
    _, view = heatmap(qtbot, size=(400, 400))
    view.clear_matrix([f"c{k}" for k in range(100)])
    assert view.image is None
    assert view.viewRange()[0] == pytest.approx([-0.5, 99.5])
    labels = [int(text) for _, text in view.getAxis("bottom")._tickLevels[0]]
    assert labels[0] == 0 and 50 <= labels[-1] <= 99


def test_the_trajectory_legend_names_log_pi_on_a_log_scale(qtbot):
    # "dashed: π_yu(x_u)" stood over an axis of log π
    from ntkviz.gui.plots import TrajectoryPlot

    plot = TrajectoryPlot()
    qtbot.addWidget(plot)
    plot.set_log(True)
    title = plot.getPlotItem().titleLabel.text
    assert "dashed: log π" in title and plot.getAxis("left").labelText == "log π"
    plot.set_log(False)
    assert "dashed: π" in plot.getPlotItem().titleLabel.text


def test_one_training_record_shows_as_a_point_until_a_line_can_be_drawn(qtbot):
    # after One batch the loss plot was empty: one record drawn as a line has no length
    from types import SimpleNamespace

    from ntkviz.app.features.training import RunCurves
    from ntkviz.gui.plots import TrainingCurves

    curves = RunCurves()
    widget = TrainingCurves(curves)
    qtbot.addWidget(widget)

    def record(step):
        return SimpleNamespace(step=step, loss=2.0 / step, test_accuracy=None, total_steps=10)

    curves.add([record(1)])
    widget.flush()
    assert widget.ema_curve.opts["symbol"] == "o" and list(widget.ema_curve.getData()[0]) == [1]
    curves.add([record(2)])
    widget.flush()
    assert widget.ema_curve.opts["symbol"] is None and len(widget.ema_curve.getData()[0]) == 2
