"""The desktop app: window, worker thread, decomposition heatmaps, step-through, export."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import csv
import dataclasses
import json
import threading
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from conftest import TorchCalls
from gui_helpers import (
    SMALL,
    TIMEOUT,
    model_state,
    open_window,
    settings_in,
    train_batches,
    wait_current,
    wait_shown,
)
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QImage
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication, QMessageBox

from ntkviz.app.features.pair import PairRequest
from ntkviz.app.jobs import JobEvent
from ntkviz.app.state import Example
from ntkviz.checkpoint import load_checkpoint
from ntkviz.decomposition import decompose
from ntkviz.gui.plots import TrajectoryPlot, class_ticks, compact_tick_strings, nice_ceiling
from ntkviz.gui.window import MainWindow
from ntkviz.models import build_model
from ntkviz.training import TrainConfig


@pytest.fixture
def settings(tmp_path):
    return settings_in(tmp_path)


def start_training(qtbot, window) -> None:
    window.views["training"].start_button.click()


def test_window_opens_and_loads_dataset_in_worker(qtbot, settings):
    window = open_window(qtbot, settings)
    assert "ntkviz" in window.windowTitle()
    assert window.thread.isRunning()
    assert window.state.dataset.images["train"].shape == (60000, 28, 28)
    assert window.state.dataset.labels["test"].shape == (10000,)
    examples = window.views["examples"]
    assert examples.x_u_picker.isEnabled() and examples.x_o_picker.isEnabled()
    assert window.state.model.num_parameters == 29624
    assert window.views["pair"].last_result is not None  # the untrained model's decomposition
    assert "29,624" in window.status_labels["params"].text()
    device = window.views["training"].device
    cuda = device.model().item(device.findData("cuda"))
    assert cuda.isEnabled() == torch.cuda.is_available()
    if not torch.cuda.is_available():  # disabled, with the reason where the user looks
        assert "not available" in cuda.text() and "not available" in device.toolTip()
    window.resize(820, 530)
    size = (window.width(), window.height())
    assert size != (1600, 1000)
    window.close()
    assert settings.value("geometry") is not None
    again = MainWindow(settings=settings, autostart=False)
    qtbot.addWidget(again)
    assert again.height() == size[1]  # the offscreen screen is 800 px wide: width is clamped


def test_training_updates_loss_curve(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    states = []  # the run state as each batch of records arrives
    window.controller.on("records", lambda e: states.append(window.state.run_state))
    start_training(qtbot, window)
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert states and set(states) == {"training"}  # "finished" comes after the last records
    curves = window.views["training"].curves
    curves.flush()
    xs, ys = curves.raw_curve.getData()
    assert window.controller.records_received == 20  # 640 / 64 · 2 epochs
    assert len(xs) == len(ys) == window.controller.records_received
    assert list(xs) == list(range(1, 21))
    assert np.all(np.isfinite(ys)) and ys[-1] < ys[0]
    assert len(curves.ema_curve.getData()[0]) == 20
    # the curves' legend is the title's: inside the plot it would cover a loss that stays high
    assert curves.loss_plot.getPlotItem().legend is None
    title = curves.loss_plot.getPlotItem().titleLabel.text
    assert "per&nbsp;batch" in title and "EMA" in title
    acc_x, acc_y = curves.acc_curve.getData()
    assert list(acc_x) == [5, 10, 15, 20] and all(0 <= a <= 1 for a in acc_y)
    # fixed axes: every step of the run, loss from 0 to the round number above its maximum
    (x0, x1), (y0, y1) = curves.loss_plot.getViewBox().viewRange()
    assert x0 <= 0 and 20 <= x1 < 21 and y0 <= 0 and max(ys) <= y1 <= 1.6 * max(ys)
    assert window.views["training"].progress.value() == 20
    assert window.status_labels["step"].text() == "step: 20"
    wait_current(qtbot, window)
    assert (
        window.views["pair"].last_result.step == 20
    )  # the decomposition follows the trained model


def test_decompositions_follow_the_model_while_it_trains(qtbot, settings, mnist, monkeypatch):
    import ntkviz.app.controller as controller

    monkeypatch.setattr(controller, "LIVE_EVERY", 5)
    monkeypatch.setattr(controller, "LIVE_INTERVAL_S", 0.0)
    window = open_window(qtbot, settings, mnist, dataclasses.replace(SMALL, epochs=30))
    shown = []
    window.shown.connect(
        lambda topic, result: shown.append(result.step) if topic == "pair" else None
    )
    start_training(qtbot, window)
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    wait_current(qtbot, window)
    # only live updates are computed mid-run: the others are of step 0 and of the trained model
    live = [step for step in shown if 0 < step < 300]
    assert live and live == sorted(live)
    assert (
        window.views["pair"].last_result.step == shown[-1] == 300
    )  # and the trained model's, at the end


def test_heatmaps_hold_the_core_numbers(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    train_batches(qtbot, window, 3)
    examples, pair = window.views["examples"], window.views["pair"]
    examples.loss_box.setCurrentIndex(1)  # negative gradient
    examples.x_u_picker.index_box.setValue(11)
    examples.y_u_box.setCurrentIndex(7)
    window.state.x_o = Example("test", 3)
    pair.step_panel.lr.setValue(0.2)
    wait_current(qtbot, window)
    assert window.controller.pair() == PairRequest(
        Example("train", 11), 7, Example("test", 3), 0.2, "neg"
    )
    # the step history (the trajectory's data) follows every change of the pair
    qtbot.waitUntil(lambda: pair.last_history.request == window.controller.pair(), timeout=TIMEOUT)
    model = build_model("lenet")
    model.load_state_dict(model_state(qtbot, window))
    dec = decompose(model, mnist.test.x[3], mnist.train.x[11], 7, 0.2, "neg")
    maps = pair.decomposition_view.heatmaps
    expected = {
        "A": dec.A,
        "K": dec.K,
        "G": dec.G[:, None],
        "predicted": dec.predicted[:, None],
        "actual": dec.actual[:, None],
        "residual": dec.residual[:, None],
        "delta_logits_predicted": dec.delta_logits_predicted[:, None],
        "delta_logits_actual": dec.delta_logits_actual[:, None],
    }
    for name, want in expected.items():
        np.testing.assert_allclose(maps[name].image, want, rtol=1e-6, atol=1e-9, err_msg=name)
    assert np.abs(dec.K).max() > 0 and dec.G[7] > 0  # "neg": G = e_y − π
    preview = pair.step_panel.preview
    np.testing.assert_allclose(preview.predicted.opts["height"], dec.predicted, atol=1e-9)
    np.testing.assert_allclose(preview.actual.opts["height"], dec.actual, atol=1e-9)
    (y0, y1) = preview.getViewBox().viewRange()[1]  # every bar is inside the view
    both = np.concatenate([dec.predicted, dec.actual])
    assert y0 <= both.min() and both.max() <= y1 and y1 - y0 <= 3.5 * np.ptp(both)
    np.testing.assert_allclose(examples.x_o_picker.bars.probs, dec.probs_before, atol=1e-9)
    # the colour scale is symmetric around zero and ends at the round number just above max |K|
    low, high = maps["K"].colorbar.levels()
    k_max = np.abs(dec.K).max()
    assert low == pytest.approx(-high) and k_max <= high <= 1.5 * k_max
    assert high == pytest.approx(nice_ceiling(k_max))


@pytest.mark.parametrize(
    "x, want",
    [(2.3, 2.5), (0.07, 0.08), (1.0, 1.0), (9.9, 10.0), (123.0, 150.0), (0.0, 1.0), (np.nan, 1.0)],
)
def test_nice_ceiling(x, want):
    assert nice_ceiling(x) == pytest.approx(want)


def test_class_names_cut_alike_are_cut_in_the_middle_or_numbered():
    names = ["golden eagle (bird)", "golden gate bridge", "golden retriever (dog)", "cat"]
    assert [t for _, t in class_ticks(names, width=10)][:3] == [
        "golden ea…", "golden ga…", "golden re…"
    ]  # fmt: skip
    assert [t for _, t in class_ticks(names, width=7)] == ["gol…rd)", "gol…dge", "gol…og)", "cat"]
    long = [f"class_{k}_with_a_rather_long_descriptive_name" for k in range(5)]
    assert class_ticks(long, width=7) == [(k, str(k)) for k in range(5)]  # names on hover


def test_colour_bar_tick_labels_are_short_and_exact():
    assert compact_tick_strings([-5e-4, 0, 5e-4], 1.0, 5e-4) == ["-5e-4", "0", "5e-4"]
    assert compact_tick_strings([-0.015, 0.25, 1.0, -100], 1.0, 0.005) == [
        "-0.015",
        "0.25",
        "1",
        "-100",
    ]
    assert compact_tick_strings([2.5e-5, 1.2e5], 1.0, 1e-5) == ["2.5e-5", "1.2e5"]
    assert compact_tick_strings([-1500, 999.7, 1234, 12000], 1.0, 100) == [
        "-1.5k", "1k", "1.23k", "12k",
    ]  # fmt: skip
    for text, value in zip(
        compact_tick_strings([-3e-6, 7e-4, 0.125], 1.0, 1e-6), [-3e-6, 7e-4, 0.125]
    ):
        assert float(text) == pytest.approx(value) and len(text) <= 6


def test_stale_results_are_dropped(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    pair = window.views["pair"]
    shown = pair.last_result
    old = window.controller.generation["pair"]
    pair.step_panel.lr.setValue(0.5)  # a newer request
    window.controller.handle(JobEvent("pair", old, "result", shown))  # a late answer to the old one
    wait_current(qtbot, window)
    assert pair.last_result.request.lr == 0.5
    seen = []
    window.controller.on("pair", seen.append)
    window.controller.handle(JobEvent("pair", old, "result", shown))
    assert seen == [] and pair.last_result.request.lr == 0.5  # dropped before any view saw it


def test_apply_step_then_undo_is_bit_exact(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    train_batches(qtbot, window, 2)
    pair, actions = window.views["pair"], window.menu_actions
    pair.step_panel.lr.setValue(0.5)
    wait_current(qtbot, window)
    before = model_state(qtbot, window)
    predicted_after = pair.last_result.decomposition.probs_after
    wait_shown(qtbot, window, "history", actions["&Apply step"].trigger)
    wait_current(qtbot, window)
    assert len(pair.last_history.probs_o) == 2
    # the real step lands where decompose()'s "actual" said it would
    np.testing.assert_allclose(pair.last_history.probs_o[-1], predicted_after, atol=1e-5)
    after = model_state(qtbot, window)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert pair.last_result.applied_steps == 1
    wait_shown(qtbot, window, "history", actions["&Undo step"].trigger)
    undone = model_state(qtbot, window)
    assert all(torch.equal(before[k], undone[k]) for k in before)
    for _ in range(3):
        wait_shown(qtbot, window, "history", window.controller.apply_step)
    history = pair.last_history
    assert len(history.probs_o) == 4
    # the trajectory plot shows exactly these π(x_o), one line per class, and π_{y_u}(x_u)
    trajectory = pair.step_panel.trajectory
    for i, curve in enumerate(trajectory.curves):
        xs, ys = curve.getData()
        assert list(xs) == [0, 1, 2, 3]
        np.testing.assert_allclose(ys, history.probs_o[:, i], rtol=1e-12)
    np.testing.assert_allclose(
        trajectory.own.getData()[1], history.probs_u[:, history.request.y_u], rtol=1e-12
    )
    assert len(trajectory.markers.data) == 40
    (x0, x1), (y0, y1) = trajectory.getViewBox().viewRange()
    assert x0 <= 0 and x1 >= 3 and y0 <= 0 and y1 >= 1
    trajectory.set_log(True)
    np.testing.assert_allclose(
        trajectory.curves[0].getData()[1], np.log(history.probs_o[:, 0]), rtol=1e-12
    )
    assert trajectory.getViewBox().viewRange()[1][0] <= np.log(history.probs_o).min()
    trajectory.set_log(False)
    wait_shown(qtbot, window, "history", window.controller.reset_steps)
    reset = model_state(qtbot, window)
    assert all(torch.equal(before[k], reset[k]) for k in before)
    assert len(pair.last_history.probs_o) == 1


def test_exports_decode(qtbot, settings, mnist, tmp_path):
    window = open_window(qtbot, settings, mnist)
    train_batches(qtbot, window, 1)
    pair = window.views["pair"]
    dec = pair.last_result.decomposition
    png, svg = tmp_path / "fig.png", tmp_path / "fig.svg"
    assert window.export_plot("Decomposition", str(png), width=900)
    image = QImage(str(png))
    assert not image.isNull() and image.width() == 900 and image.height() > 100
    assert window.export_plot("Decomposition", str(svg))
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert window.export_plot("Trajectory", str(tmp_path / "traj.png"), 400)
    assert QImage(str(tmp_path / "traj.png")).width() == 400

    for suffix in ("csv", "npz", "json"):
        pair.export_data(str(tmp_path / f"d.{suffix}"))
    data = np.load(tmp_path / "d.npz")
    for name, array in dec.arrays().items():
        np.testing.assert_array_equal(data[name], array, err_msg=name)
    meta = json.loads(str(data["meta_json"]))
    assert meta["x_u"]["index"] == window.state.x_u.index and meta["training_step"] == 1
    # classes as ints (as the CLI writes them), their names apart
    assert meta["y_u"] == dec.y_u and meta["x_u"]["label"] == window.state.label(window.state.x_u)
    assert meta["classes"] == list(window.state.dataset.classes)
    record = json.loads((tmp_path / "d.json").read_text())
    np.testing.assert_array_equal(np.array(record["K"]), dec.K)
    assert record["meta"]["model"] == "lenet" and record["meta"]["seed"] == 0
    assert record["meta"]["lr"] == dec.lr and "ntkviz_version" in record["meta"]
    # CSV: "# key: <JSON>" lines with the metadata, then a header and one row per class
    with open(tmp_path / "d.csv", newline="") as f:
        lines = f.read().splitlines()
    comments = [ln[2:].split(": ", 1) for ln in lines if ln.startswith("# ") and ": " in ln]
    csv_meta = {key: json.loads(value) for key, value in comments}
    assert csv_meta["x_u"] == record["meta"]["x_u"] and csv_meta["x_o"] == record["meta"]["x_o"]
    for key in ("lr", "loss", "y_u", "model", "seed", "training_step", "ntkviz_version"):
        want = record[key] if key in record else record["meta"][key]
        assert key in csv_meta and csv_meta[key] == want, key
    header, *rows = list(csv.reader(ln for ln in lines if not ln.startswith("#")))
    table = np.array(rows, dtype=float)
    assert len(rows) == 10
    for name, array in dec.arrays().items():
        if array.ndim == 1:
            np.testing.assert_array_equal(table[:, header.index(name)], array, err_msg=name)
    for name, matrix in (("A", dec.A), ("K", dec.K)):
        cols = [header.index(f"{name}[i,{j}]") for j in range(10)]
        np.testing.assert_array_equal(table[:, cols], matrix, err_msg=name)

    bad = tmp_path / "missing" / "fig.png"
    assert not window.export_plot("Decomposition", str(bad))
    assert window.last_error[0] == "Export failed" and "does not exist" in window.last_error[1]
    assert not bad.parent.exists()


def test_save_dialogs_add_the_chosen_filters_suffix(qtbot, settings, mnist, tmp_path, monkeypatch):
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QFileDialog, QInputDialog

    window = open_window(qtbot, settings, mnist)
    train_batches(qtbot, window, 2)
    monkeypatch.setattr(QInputDialog, "getInt", lambda *a, **k: (320, True))
    answers = iter(
        [
            ("plot", "PNG image (*.png)"),
            ("numbers", "NPZ (*.npz)"),
            ("named.csv", "NPZ (*.npz)"),  # a typed suffix wins
            ("model", None),  # the only filter: *.pt
        ]
    )

    errors = []

    def answer():  # fill in and accept the open save dialog, as a user would
        dialogs = [
            w
            for w in QApplication.topLevelWidgets()
            if isinstance(w, QFileDialog) and w.isVisible()
        ]
        try:
            (dialog,) = dialogs
            name, name_filter = next(answers)
            if name_filter:
                dialog.selectNameFilter(name_filter)
                dialog.filterSelected.emit(name_filter)
            dialog.selectFile(str(tmp_path / name))
            dialog.accept()
        except Exception as e:  # never leave a modal dialog open: the test would hang
            errors.append(e)
            for dialog in dialogs:
                dialog.reject()

    for show in (
        lambda: window.files.export_plot_dialog("Trajectory"),
        window.views["pair"]._export_data_dialog,
        window.views["pair"]._export_data_dialog,
        window.files.save_checkpoint,
    ):
        QTimer.singleShot(0, answer)
        show()
    assert errors == []
    qtbot.waitUntil(lambda: (tmp_path / "model.pt").exists(), timeout=TIMEOUT)
    assert QImage(str(tmp_path / "plot.png")).width() == 320
    assert set(np.load(tmp_path / "numbers.npz")) >= {"A", "K", "G", "meta_json"}
    assert (tmp_path / "named.csv").read_text().startswith("# ntkviz decomposition")
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint.metadata["step"] == 2 and checkpoint.metadata["dataset"] == "mnist"
    assert window.last_error is None


def test_export_figure_offscreen_function(qtbot, mnist, tmp_path):
    from ntkviz.gui.export import export_decomposition_figure

    model = build_model("lenet")
    dec = decompose(model, mnist.test.x[0], mnist.train.x[0], int(mnist.train.y[0]), 0.1)
    out = export_decomposition_figure(dec, tmp_path / "d.png", width=640, meta={"model": "lenet"})
    assert QImage(str(out)).width() == 640
    ET.parse(export_decomposition_figure(dec, tmp_path / "d.svg"))
    with pytest.raises(ValueError):
        export_decomposition_figure(dec, tmp_path / "d.jpg")


def test_closing_mid_training_stops_the_thread(qtbot, settings, mnist, qtlog):
    window = open_window(qtbot, settings, mnist, TrainConfig(epochs=5))
    wait_shown(qtbot, window, "records", lambda: start_training(qtbot, window))
    thread = window.thread
    assert window.state.run_state == "training" and thread.isRunning()
    window.close()
    assert not thread.isRunning() and thread.isFinished()
    assert window.thread is None
    assert not [r for r in qtlog.records if "QThread" in r.message]


def test_the_gui_thread_runs_no_torch_op(qtbot, settings, mnist, tmp_path):
    # One torch op on the main thread gives it an OpenMP thread team of its own; libgomp then
    # manages more threads than there are cores and throttles its spin-waiting, and every
    # parallel op of the worker runs about 3× slower from then on (scripts/gui_benchmark.py).
    calls = TorchCalls()
    with calls:
        window = open_window(qtbot, settings, mnist)
        train_batches(qtbot, window, 2)
        window.state.x_u = Example("train", 5)
        window.state.x_o = Example("test", 9)
        wait_current(qtbot, window)
        for action in (window.controller.apply_step, window.controller.undo_step):
            wait_shown(qtbot, window, "history", action)
        wait_current(qtbot, window)
        window.views["pair"].export_data(str(tmp_path / "d.npz"))
        assert window.export_plot("Decomposition", str(tmp_path / "d.png"), width=600)
        start_training(qtbot, window)
        qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
        wait_current(qtbot, window)
        window.close()
    assert window.views["pair"].last_result.step == 20  # a fresh run: 640 / 64 · 2 epochs
    assert calls.calls == []


def test_worker_errors_are_shown_not_raised(qtbot, settings, mnist, monkeypatch):
    window = open_window(qtbot, settings, mnist)
    diverging = dataclasses.replace(window.views["training"].config(), lr=1e6)
    with qtbot.waitSignal(window.error_shown, timeout=TIMEOUT) as blocker:
        window.controller.start_training(diverging)
    assert blocker.args[0] == "Training diverged" and "diverged" in blocker.args[1]
    qtbot.waitUntil(lambda: window.state.run_state == "stopped", timeout=TIMEOUT)
    assert "diverged" in window.statusBar().currentMessage()

    import ntkviz.decomposition

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(ntkviz.decomposition, "decompose", broken)
    with qtbot.waitSignal(window.error_shown, timeout=TIMEOUT) as blocker:
        window.controller.refresh()
    assert blocker.args[0] == "Internal error" and "injected failure" in blocker.args[1]
    monkeypatch.undo()
    window.controller.refresh()  # the app keeps working
    wait_current(qtbot, window)
    assert window.thread.isRunning()


def test_a_diverging_step_is_refused_and_the_model_kept(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    train_batches(qtbot, window, 1)
    before = model_state(qtbot, window)
    huge = dataclasses.replace(window.controller.pair(), lr=1e300)  # the η box stops at 100
    with qtbot.waitSignal(window.error_shown, timeout=TIMEOUT) as blocker:
        window.controller.send("apply_step", huge)
    assert blocker.args[0] == "Step diverged" and "η = 1e+300" in blocker.args[1]
    after = model_state(qtbot, window)
    assert all(torch.equal(before[k], after[k]) for k in before)
    # an ordinary step still works, and is the first in the history
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    assert len(window.views["pair"].last_history.probs_o) == 2


def test_space_and_ctrl_z_step_from_any_control_but_a_text_field(qtbot, settings, mnist):
    from PySide6.QtWidgets import QLineEdit

    window = open_window(qtbot, settings, mnist)
    window.activateWindow()
    qtbot.waitUntil(window.isActiveWindow, timeout=TIMEOUT)
    pair, training = window.views["pair"], window.views["training"]

    def steps() -> int:
        wait_current(qtbot, window)
        return len(pair.last_history.lrs)

    def key(widget, k, modifier=Qt.NoModifier) -> None:
        widget.setFocus()
        assert QApplication.focusWidget() in (widget, widget.focusProxy())
        wait_shown(qtbot, window, "history", lambda: QTest.keyClick(widget, k, modifier))

    key(pair.decomposition_view, Qt.Key_Space)
    assert steps() == 1
    key(pair.step_panel.undo_button, Qt.Key_Space)  # a focused button: still a step, no undo
    assert steps() == 2
    key(training.batch_button, Qt.Key_Space)  # "One batch" is not pressed by Space
    assert steps() == 3 and window.controller.records_received == 0
    key(pair.step_panel.lr, Qt.Key_Space)  # the η box takes no spaces: a step
    assert steps() == 4
    key(pair.step_panel.lr, Qt.Key_Z, Qt.ControlModifier)  # Ctrl+Z in the η box: undo
    assert steps() == 3
    key(pair.step_panel.slider, Qt.Key_Z, Qt.ControlModifier)
    assert steps() == 2
    # a text field keeps its keys: Space types a space, no step
    field = QLineEdit(pair)
    field.show()
    field.setFocus()
    QTest.keyClicks(field, "a b")
    assert field.text() == "a b"
    assert steps() == 2
    tips = pair.step_panel.apply_button.toolTip() + pair.step_panel.undo_button.toolTip()
    assert tips.count("from anywhere but a text field") == 2


def test_a_new_run_asks_before_discarding_a_trained_model(qtbot, settings, mnist, monkeypatch):
    window = open_window(qtbot, settings, mnist)
    training, controller = window.views["training"], window.controller
    asked = []
    monkeypatch.setattr(controller, "ask", lambda title, text: asked.append(text) or False)
    training.start_button.click()  # fresh weights: nothing to lose, no question
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert asked == [] and controller.records_received == 20
    training.start_button.click()
    training.batch_button.click()
    assert len(asked) == 2 and "trained for 20 steps" in asked[0]
    assert window.state.run_state == "finished" and controller.records_received == 20
    monkeypatch.setattr(controller, "ask", lambda title, text: True)
    wait_shown(qtbot, window, "records", training.batch_button.click)
    assert controller.records_received == 1
    qtbot.waitUntil(lambda: window.state.run_state == "paused", timeout=TIMEOUT)
    monkeypatch.setattr(controller, "ask", lambda title, text: asked.append(text) or False)
    training.start_button.click()  # a paused run is a trained model too
    assert "trained for 1 steps" in asked[-1] and window.state.run_state == "paused"


def test_the_same_error_twice_shows_one_box(qtbot, settings):
    window = MainWindow(settings=settings, autostart=False)
    qtbot.addWidget(window)
    window.show()

    def boxes(title):
        return [
            b
            for b in window.findChildren(QMessageBox)
            if b.isVisible() and b.windowTitle() == title
        ]

    window.show_error("A", "first")
    window.show_error("B", "second")
    (a,) = boxes("A")
    a.close()
    qtbot.waitUntil(lambda: not boxes("A"))
    window.show_error("B", "again")
    assert len(boxes("B")) == 1 and boxes("B")[0].text() == "again"
    for box in boxes("B"):
        box.close()


def test_quit_has_a_shortcut_on_every_platform(qtbot, settings):
    window = MainWindow(settings=settings, autostart=False)
    qtbot.addWidget(window)
    quit_action = next(a for a in window.findChildren(QAction) if a.text() == "&Quit")
    assert not quit_action.shortcut().isEmpty()  # QKeySequence.Quit is empty offscreen


def test_errors_go_to_a_log_file(qtbot, settings, tmp_path, monkeypatch):
    import logging

    from ntkviz.gui import app as app_module

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.setenv("NTKVIZ_LOG", str(tmp_path / "logs" / "ntkviz.log"))
    try:
        path = app_module.setup_logging()
        window = MainWindow(settings=settings, autostart=False)
        qtbot.addWidget(window)
        window.show_message_boxes = False
        hook = app_module.excepthook_for(window)
        shown_on = []
        window.error_shown.connect(lambda *_: shown_on.append(threading.current_thread()))

        def fail():
            try:
                raise KeyError("injected")
            except KeyError as e:
                hook(type(e), e, e.__traceback__)

        with qtbot.waitSignal(window.error_shown) as blocker:
            worker = threading.Thread(target=fail)  # a slot of the worker thread that raised
            worker.start()
            worker.join()
        assert blocker.args == ["Internal error", "KeyError: 'injected'"]
        assert shown_on == [threading.main_thread()]  # widgets are touched on the GUI thread
        for handler in root.handlers:
            handler.flush()
        text = path.read_text()
        assert "uncaught exception" in text and "Traceback" in text and "injected" in text
        monkeypatch.setenv("NTKVIZ_LOG", str(path / "not-a-directory" / "x.log"))
        assert app_module.setup_logging() is None  # stderr only, and the app goes on
    finally:
        for handler in set(root.handlers) - set(handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)


def test_thumbnails_follow_the_class_filter_and_select_on_click(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    picker = window.views["examples"].x_o_picker
    picker.class_box.setCurrentIndex(picker.class_box.findData(3))
    items = [picker.thumbnails.item(k) for k in range(picker.thumbnails.count())]
    indices = [int(item.data(Qt.UserRole)) for item in items]
    assert len(indices) == picker.THUMBS
    assert all(int(mnist.test.y[i]) == 3 for i in indices)
    assert window.state.x_o.index in indices and picker.example == window.state.x_o
    target = items[5]
    with qtbot.waitSignal(picker.picked):
        picker.thumbnails.itemClicked.emit(target)
    assert window.state.x_o == Example("test", int(target.data(Qt.UserRole)))
    assert picker.example == window.state.x_o and picker.label == 3


def test_trajectory_end_labels_share_one_label_where_lines_end_together(qtbot):
    plot = TrajectoryPlot()
    qtbot.addWidget(plot)
    plot.classes = tuple("abcdefghij")
    probs = np.full((2, 10), 0.001)
    probs[:, 3], probs[:, 7] = 0.6, 0.392
    plot.set_trajectory(probs, probs, 3)
    shown = {label.toPlainText() for label in plot.end_labels if label.isVisible()}
    assert shown == {"d", "h", "a +7"}  # eight lines end at π = 0.001
    plot.set_trajectory(probs[:1], probs[:1], 3)  # no step applied: dots, no line ends to name
    assert not any(label.isVisible() for label in plot.end_labels)


def test_the_status_bar_gives_the_kernel_path_and_a_measured_pair_cost(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    label = window.status_labels["path"]
    qtbot.waitUntil(lambda: label.text().endswith(" ms a pair"), timeout=TIMEOUT)
    assert label.text().startswith("structured path · ") and window._path_of == 1
    assert 0 < float(label.text().split(" · ")[1].split(" ms")[0]) < 1000
    assert label.toolTip().startswith("structured kernel path: a chain of known layers")


def test_the_training_dock_chooses_the_optimizer(qtbot, settings, mnist):
    window = open_window(qtbot, settings, mnist)
    training = window.views["training"]
    assert training.optimizer.currentData() == "sgd" and training.momentum.isEnabled()
    training.optimizer.setCurrentIndex(training.optimizer.findData("adamw"))
    training.lr.setValue(0.002)
    assert not training.momentum.isEnabled() and training.config().optimizer == "adamw"
    pair = window.views["pair"]
    pair.step_panel.step_box.setCurrentIndex(1)  # this run's optimizer: η is the run's
    assert window.state.lr == window.state.model.run_lr == SMALL.lr
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    assert training.config().optimizer == "adamw" and training.lr.value() == 0.002  # kept
    train_batches(qtbot, window, 1)
    assert window.state.model.optimizer.startswith("AdamW, β = (0.9, 0.999)")
    assert window.state.model.config.optimizer == "adamw"
    # η follows the new run's learning rate: its schedule's for the run's next step
    assert window.state.lr == window.state.model.run_lr == pytest.approx(0.002, rel=0.05)
    assert window.state.lr < 0.002


def test_the_learning_rate_box_holds_any_decade(qtbot, settings, mnist):
    """4e-6 (Adam fine-tuning) is not rounded to 0, 0 is refused, 3e-4 can be typed."""
    window = open_window(qtbot, settings, mnist)
    lr = window.views["training"].lr
    for value, shown in ((4e-6, "4e-06"), (0.05, "0.05"), (0.0, "1e-07"), (1e6, "1000")):
        lr.setValue(value)
        assert lr.text() == shown
    lr.lineEdit().setText("3e-4")
    lr.interpretText()
    assert lr.value() == 3e-4 and window.views["training"].config().lr == 3e-4
    lr.stepBy(1)
    assert lr.value() == pytest.approx(6e-4)


Record = dataclasses.make_dataclass("Record", ["step", "total_steps", "loss", "test_accuracy"])


def test_a_run_that_ends_far_worse_than_it_started_is_reported(qtbot, settings, mnist):
    """A learning rate that diverges without overflowing: the loss rises, the app says so (as the
    CLI does) instead of a plain "finished"."""
    window = open_window(qtbot, settings, mnist)
    training = window.views["training"]
    records = [Record(k + 1, 20, loss, None) for k, loss in enumerate([2.3] * 10 + [2e4] * 10)]
    training.run_curves.add(records)
    training.run_progress.update(records, 0.0)
    training._on_run_state("finished")
    assert training.eta.text() == "finished: 20 steps, far worse than it started"
    title, message = window.last_error
    assert title == "The run went wrong" and "the loss rose from 2.3 to 2e+04" in message
    training._on_run_state("training")  # the next run starts: its judgement is not this one's
    assert training.eta.toolTip() == ""


def test_plots_of_views_that_computed_nothing_are_not_exported(qtbot, settings, mnist, tmp_path):
    window = open_window(qtbot, settings, mnist)
    for name, feature in (("Influence", "influence"), ("Watch", "watch_ranking")):
        view = window.views[feature]
        window.show_view(view)
        assert not window.files.export_plot(name, str(tmp_path / f"{name}.png"))
        assert (
            window.last_error[0] == "Nothing to export"
            and "nothing computed yet" in (window.last_error[1])
        )
        assert not (tmp_path / f"{name}.png").exists()
        with pytest.raises(ValueError, match="nothing computed yet"):
            view.export(tmp_path / f"{name}.svg")
