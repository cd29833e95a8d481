"""What a new user and a bad-input sweep found in the window (issue 12, points 1-7)."""

import os
from dataclasses import replace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("PySide6")

from gui_helpers import (
    SMALL,
    TIMEOUT,
    cut_off,
    model_state,
    open_window,
    settings_in,
    train_batches,
    wait_current,
    wait_event,
    wait_shown,
)
from PySide6.QtCore import QPoint, QPointF, Qt, QTimer
from PySide6.QtGui import QWheelEvent
from PySide6.QtWidgets import (
    QApplication,
    QMessageBox,
    QScrollArea,
)

from ntkviz.app.state import Example


@pytest.fixture
def settings(tmp_path):
    return settings_in(tmp_path)


@pytest.fixture
def window(qtbot, settings, mnist):
    return open_window(qtbot, settings, mnist)


# ---------------------------------------------------------------------------- 1. layout
@pytest.mark.parametrize("size", [(1280, 770), (1366, 738), (1600, 970)])
def test_every_view_is_usable_at_common_sizes_with_the_docks_shown(qtbot, window, size):
    # the heights leave room for a title bar: 1280×800, 1366×768 and 1600×1000 screens
    views = window.views
    views["influence"].set_probe_size(200)
    views["influence"].norm_box.setValue(50)
    for topic, run in (("influence", views["influence"].run), ("squeeze", views["squeeze"].run),
                       ("layers", views["layers"].run)):  # fmt: skip
        wait_shown(qtbot, window, topic, run)
    window.resize(*size)
    problems = {}
    for i in range(window.tabs.count()):
        window.tabs.setCurrentIndex(i)
        qtbot.waitUntil(lambda: window.tabs.currentWidget().isVisible())
        QApplication.processEvents()
        if found := cut_off(window):
            problems[window.tabs.tabText(i)] = found
    assert problems == {}
    # no minimum size forced the window past the screen (offscreen, nothing else would stop it)
    assert (window.width(), window.height()) == size
    # A and K stay readable beside both docks: ≥ 5 px a column of their 10×10 cells
    window.tabs.setCurrentIndex(0)
    QApplication.processEvents()
    heatmaps = views["pair"].decomposition_view.heatmaps
    assert min(heatmaps[n].vb.width() for n in ("A", "K")) >= 50


# ---------------------------------------------------------------------------- 2. selection
def strip(picker) -> list[int]:
    return [picker.thumbnails.item(k).data(Qt.UserRole) for k in range(picker.thumbnails.count())]


def test_the_class_filter_refreshes_the_strip_even_when_the_example_passes_it(window, mnist):
    picker = window.views["examples"].x_u_picker
    assert window.state.x_u == Example("train", 2) and picker.label == 4
    before = strip(picker)
    assert {int(mnist.train.y[i]) for i in before} != {4}
    picker.class_box.setCurrentIndex(picker.class_box.findData(4))
    assert window.state.x_u == Example("train", 2)  # it passes the filter: it stays
    assert {int(mnist.train.y[i]) for i in strip(picker)} == {4} and strip(picker)[0] == 2


def test_a_selection_made_elsewhere_resets_a_class_filter_it_does_not_pass(qtbot, window):
    picker = window.views["examples"].x_o_picker
    picker.class_box.setCurrentIndex(picker.class_box.findData(9))
    assert picker.label == 9
    influence = window.views["influence"]
    influence.set_probe_size(200)
    wait_shown(qtbot, window, "influence", influence.run)
    button = next(b for b in influence.raised.buttons + influence.lowered.buttons
                  if window.state.dataset.label("test", b.property("payload")) != 9)  # fmt: skip
    button.click()
    assert window.state.x_o == Example("test", button.property("payload"))
    assert picker.example == window.state.x_o
    assert picker.class_filter == -1 and picker.class_box.currentText() == "any"
    assert picker.example.index in strip(picker)


def test_y_u_chosen_by_the_user_stays_when_x_u_changes(qtbot, window, mnist):
    status = []
    window.controller.on("message", lambda e: status.append(e.payload))
    window.state.x_u = Example("train", 11)  # y_u followed the label so far: it follows
    assert window.state.y_u == int(mnist.train.y[11])
    window.views["examples"].y_u_box.setCurrentIndex(7)
    random = window.views["examples"].x_u_picker.random_button
    random.click()
    while window.state.label(window.state.x_u) == 7:  # the note is for an x_u of another class
        random.click()
    assert window.state.x_u != Example("train", 11) and window.state.y_u == 7
    assert "y_u stays 7" in status[-1]
    wait_current(qtbot, window)
    assert window.views["pair"].last_result.request.y_u == 7


def test_a_chosen_y_u_stays_through_an_x_u_of_its_own_class(qtbot, window, mnist):
    window.views["examples"].y_u_box.setCurrentIndex(7)
    sevens, others = (mnist.train.y == 7).nonzero()[:, 0], (mnist.train.y == 3).nonzero()[:, 0]
    window.state.x_u = Example("train", int(sevens[0]))  # labelled as chosen
    window.state.x_u = Example("train", int(others[0]))
    assert window.state.y_u == 7  # still the user's choice, not x_u's label 3
    window.views["examples"].y_u_box.setCurrentIndex(3)  # x_u's own label: follows again
    window.state.x_u = Example("train", int(sevens[1]))
    assert window.state.y_u == 7


def test_applied_steps_say_which_update_they_learnt(qtbot, window):
    pair = window.views["pair"]
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    wait_current(qtbot, window)
    caption = pair.decomposition_view.info.text
    assert "1 applied step(s)" in caption and "→" not in caption  # on the update shown
    window.state.x_u = Example("train", 5)  # another x_u: the step learnt something else
    wait_current(qtbot, window)
    assert "1 applied step(s): train[2] → 4" in pair.decomposition_view.info.text
    title = pair.step_panel.trajectory.getPlotItem().titleLabel.text
    assert "the steps learnt another update: 1 applied step(s): train[2] → 4" in title
    assert len(pair.last_history.probs_o) == 2  # π of the new pair before and after the step


# ---------------------------------------------------------------------------- 4. closing
def answer_close_question(qtbot, button) -> list:
    """Answer the next "Save before closing?" box with ``button``; returns the texts seen."""
    seen = []

    def answer():
        box = next((w for w in QApplication.topLevelWidgets()
                    if isinstance(w, QMessageBox) and w.isVisible()), None)  # fmt: skip
        if box is None:
            QTimer.singleShot(20, answer)
            return
        seen.append(box.text())
        box.button(button).click()

    QTimer.singleShot(0, answer)
    return seen


def test_closing_with_unsaved_work_asks_save_discard_or_cancel(qtbot, window, mnist, tmp_path):
    window.show_message_boxes = True
    window.close()  # an untouched model: no question
    assert window.engine is None
    other = open_window(qtbot, settings_in(tmp_path / "b"), mnist)
    other.show_message_boxes = True
    train_batches(qtbot, other, 1)
    seen = answer_close_question(qtbot, QMessageBox.Cancel)
    other.close()
    assert "trained for 1 steps" in seen[0] and other.isVisible() and other.engine is not None
    seen = answer_close_question(qtbot, QMessageBox.Save)
    path = tmp_path / "kept.ntks"
    other.files.ask_path = lambda *args, **kwargs: str(path)
    other.close()
    qtbot.waitUntil(lambda: not other.isVisible(), timeout=TIMEOUT)  # closes once written
    assert path.exists() and other.engine is None

    third = open_window(qtbot, settings_in(tmp_path / "c"), mnist)
    third.show_message_boxes = True
    wait_shown(qtbot, third, "history", third.controller.apply_step)
    seen = answer_close_question(qtbot, QMessageBox.Discard)
    third.close()
    assert "moved by 1 applied step(s)" in seen[0] and not third.isVisible()


def test_a_save_on_closing_that_fails_keeps_the_window_and_later_saves_do_not_close_it(
    qtbot, window, tmp_path, monkeypatch
):
    train_batches(qtbot, window, 1)
    window.show_message_boxes = True
    monkeypatch.setattr(QMessageBox, "exec", lambda self: QMessageBox.Save)
    monkeypatch.setattr(QMessageBox, "open", lambda self: None)  # the error box
    window.files.ask_path = lambda *args, **kwargs: str(tmp_path / "no such folder" / "s.ntks")
    errors = []
    window.error_shown.connect(lambda title, message: errors.append(title))
    window.close()
    qtbot.waitUntil(lambda: bool(errors), timeout=TIMEOUT)
    assert window.isVisible() and window.engine is not None
    # an ordinary File ▸ Save session later does not close the window
    path = tmp_path / "kept.ntks"
    wait_event(qtbot, window, "session_saved", lambda: window.controller.save_session(str(path)))
    assert path.exists() and window.isVisible() and window.engine is not None


EXIT_PROBE = r"""
import os, sys, time
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from PySide6.QtCore import QTimer
import ntkviz.gui.window as win
init = win.MainWindow.__init__
def patched(self, *args, **kwargs):
    init(self, *args, **kwargs)
    self.show_message_boxes = False
    def on_ready():
        self.views["training"].start_button.click()
        QTimer.singleShot(500, self.deleteLater)  # no close event
    self.ready.connect(on_ready)
win.MainWindow.__init__ = patched
from ntkviz.cli import main
sys.exit(main([]))
"""


def test_the_process_ends_when_the_window_is_destroyed_without_a_close_event(tmp_path):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path), NTKVIZ_LOG=str(tmp_path / "log"))
    r = subprocess.run([sys.executable, "-c", EXIT_PROBE], env=env, capture_output=True,
                       text=True, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------- 5. squeezing
def test_squeezing_defaults_to_y_u_and_shows_moves_of_a_saturated_example(qtbot, window):
    view = window.views["squeeze"]
    window.views["examples"].y_u_box.setCurrentIndex(7)
    assert view.label_box.currentIndex() == 7  # ȳ = y_u
    window.views["examples"].y_u_box.setCurrentIndex(4)
    window.state.lr = 10.0  # one step learns x_u as 4 up to π(4) = 1 − 1.7e-7
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    view.lr_box.setValue(0.05)
    result = wait_shown(qtbot, window, "squeeze", view.run)
    assert result.y == 4 and result.p_label_float32 > 1 - 1e-6 and result.saturated
    assert result.neg.label_fell.all() and result.neg.top_rose.all()  # visible in float64
    assert "below its resolution" in view.checks.text() and "✗" not in view.checks.text()
    # π(ȳ) exactly 1 in float64 too (e.g. after η = 100): the message said "1 − 0.0e+00"
    probs = result.neg.probs.copy()
    probs[0] = np.eye(len(probs[0]))[4]
    view.result = replace(result, neg=replace(result.neg, probs=probs))
    view.show_result(view.result)
    text = view.checks.text()
    assert "π(ȳ) = 1 even in float64" in text and "0.0e+00" not in text


# ------------------------------------------------------------------- 6. misleading figures
def test_a_step_that_moves_nothing_has_no_relative_residual(qtbot, window):
    window.state.lr = 1e-30
    wait_current(qtbot, window)
    dec = window.views["pair"].last_result.decomposition
    assert not np.any(dec.actual)  # even the float64 step cannot see a step this small
    summary = window.views["pair"].step_panel.summary.text()
    assert "relative residual = —" in summary and "relative residual = 0" not in summary


def test_empty_plots_have_sane_axes_and_the_preview_legend_covers_no_bar(qtbot, settings):
    from ntkviz.gui.window import MainWindow

    window = MainWindow(settings=settings, autostart=False)
    qtbot.addWidget(window)
    window._build_views()
    heatmap = window.views["pair"].decomposition_view.heatmaps["A"]
    (x0, x1), (y0, y1) = heatmap.getViewBox().viewRange()
    assert (x0, x1, y0, y1) == pytest.approx((-0.5, 9.5, -0.5, 9.5))
    preview = window.views["pair"].step_panel.preview
    assert (
        preview.getPlotItem().legend is None and "actual" in preview.getPlotItem().titleLabel.text
    )
    assert not hasattr(window.views["pair"].step_panel, "preview_button")
    spectrum = window.views["layers"].spec_plot.getViewBox().viewRange()
    assert spectrum[0] == pytest.approx([0, 50], abs=5)


def test_the_eta_gives_way_to_where_the_run_ended(qtbot, window):
    training = window.views["training"]
    training.start_button.click()
    wait_event(qtbot, window, "records", lambda: None)
    training.stop_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "stopped", timeout=TIMEOUT)
    assert training.eta.text().startswith("stopped at step") and "ETA" not in training.eta.text()


def test_the_wheel_scrolls_the_tab_and_ctrl_wheel_zooms(qtbot, window):
    view = window.views["squeeze"]
    wait_shown(qtbot, window, "squeeze", view.run)
    window.show_view(view)
    window.resize(1280, 600)  # the tab scrolls vertically
    qtbot.waitUntil(view.isVisible)
    scroll = next(a for a in window.findChildren(QScrollArea) if a.widget() is view)
    qtbot.waitUntil(lambda: scroll.verticalScrollBar().maximum() > 0)
    graphics = view.graphics
    box = view.run_plots["neg"].getViewBox()
    before = box.viewRange()

    def wheel(modifiers):
        centre = box.mapSceneToView(box.sceneBoundingRect().center())
        pos = QPointF(graphics.mapFromScene(box.mapViewToScene(centre)))
        event = QWheelEvent(pos, QPointF(graphics.mapToGlobal(pos.toPoint())), QPoint(0, 0),
                            QPoint(0, -120), Qt.NoButton, modifiers, Qt.NoScrollPhase, False)  # fmt: skip
        QApplication.sendEvent(graphics.viewport(), event)

    wheel(Qt.NoModifier)
    assert box.viewRange() == before and scroll.verticalScrollBar().value() > 0
    wheel(Qt.ControlModifier)
    assert box.viewRange() != before


# ---------------------------------------------------------------------------- 7. basics
def test_continue_training_from_a_loaded_checkpoint(qtbot, window, tmp_path):
    training = window.views["training"]
    train_batches(qtbot, window, 2)
    path = tmp_path / "m.pt"
    wait_event(
        qtbot, window, "checkpoint_saved", lambda: window.controller.save_checkpoint(str(path))
    )
    wait_event(qtbot, window, "model", lambda: window.controller.open_checkpoint(str(path)))
    loaded = model_state(qtbot, window)
    assert window.state.model.source == str(path) and window.state.model.step == 2
    steps = []
    window.controller.on("records", lambda e: steps.extend(r.step for r in e.payload))
    training.epochs.setValue(1)
    training.continue_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert steps == list(range(3, 3 + 10))  # 640 / 64 steps, counted on from the model's 2
    assert window.controller.records_received == 2 + 10  # the curves go on
    trained = model_state(qtbot, window)
    assert any(not np.array_equal(loaded[k], trained[k]) for k in loaded)
    assert training.accuracy.text().startswith("test accuracy ")
    assert "% at step 12 (200 test images)" in training.accuracy.text()


def test_kernel_maps_are_recorded_from_the_start_of_a_run_by_default(qtbot, window):
    view = window.views["kernel_maps"]
    assert view.record_box.isChecked()
    view.per_class_box.setValue(2)
    window.views["training"].start_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    qtbot.waitUntil(lambda: view.maps is not None and len(view.maps.steps) >= 1, timeout=TIMEOUT)
    assert view.maps.steps[0] == 0 and view.maps.per_class == 2


def test_kernel_maps_are_recorded_while_a_run_goes_one_batch_at_a_time(qtbot, window):
    view = window.views["kernel_maps"]
    view.per_class_box.setValue(1)
    view.every_box.setValue(5)
    train_batches(qtbot, window, 11)
    qtbot.waitUntil(
        lambda: view.maps is not None and list(view.maps.steps) == [0, 5, 10], timeout=TIMEOUT
    )


def test_a_save_on_closing_closes_the_window_though_another_error_comes_first(
    qtbot, window, tmp_path, monkeypatch
):
    from ntkviz.app.messages import ErrorReport, Event

    train_batches(qtbot, window, 1)
    window.show_message_boxes = True
    monkeypatch.setattr(QMessageBox, "exec", lambda self: QMessageBox.Save)
    path = tmp_path / "kept.ntks"
    window.files.ask_path = lambda *args, **kwargs: str(path)
    monkeypatch.setattr(QMessageBox, "open", lambda self: None)  # the unrelated error's box
    window.close()  # asks, then saves; the window closes once the file is written
    window.controller.handle(Event("error", ErrorReport("Unrelated", "a job failed")))
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=TIMEOUT)
    assert path.exists() and window.engine is None


def test_closing_right_after_a_save_while_training_waits_for_it(
    qtbot, tmp_path, mnist, monkeypatch
):
    # the save waited for the engine to pause, closing shut the engine first: nothing written
    from dataclasses import replace as changed

    window = open_window(qtbot, settings_in(tmp_path), mnist, changed(SMALL, epochs=50))
    window.show_message_boxes = True
    monkeypatch.setattr(QMessageBox, "exec", lambda box: pytest.fail(f"asked: {box.text()}"))
    window.views["training"].start_button.click()
    qtbot.waitUntil(lambda: window.controller.trained_steps > 0, timeout=TIMEOUT)
    path = tmp_path / "s.ntks"
    window.controller.save_session(str(path))
    window.close()
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=TIMEOUT)
    assert path.exists() and window.engine is None


def test_a_window_closed_before_its_event_loop_ran_starts_nothing(qtbot, tmp_path, mnist):
    # its queued start built every view and started the engine's thread after the close
    from ntkviz.gui.window import MainWindow

    window = MainWindow(config=SMALL, dataset=mnist, settings=settings_in(tmp_path))
    qtbot.addWidget(window)
    window.close()
    after_start = []
    QTimer.singleShot(0, lambda: after_start.append(True))  # fires after the queued start
    qtbot.waitUntil(lambda: bool(after_start), timeout=TIMEOUT)
    assert window.engine is None and window.thread is None and window.views == {}


def test_the_ready_message_goes_once_a_single_batch_has_trained(qtbot, window):
    # "lenet (fresh weights) ready; train it, or pick x_u and x_o" stayed after One batch
    assert "ready; train it" in window.statusBar().currentMessage()
    train_batches(qtbot, window, 1)
    assert "ready; train it" not in window.statusBar().currentMessage()
