"""Probe views of the desktop app (issue 4): influence over a probe set, kernel maps over
training, the squeezing lab, layers and spectrum, sessions."""

import copy
import csv
import dataclasses
import json
import os
from types import SimpleNamespace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

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
    wait_event,
    wait_shown,
)
from PySide6.QtCore import QPointF
from PySide6.QtWidgets import QApplication

import ntkviz
from ntkviz.analysis import (
    SqueezeRun,
    balanced_indices,
    class_influence,
    class_kernel_map,
    ntk_spectrum,
    rank_correlation,
    squeeze_steps,
    squeeze_survey,
)
from ntkviz.app.engine import Engine
from ntkviz.app.features.influence import probe_indices
from ntkviz.app.features.pair import History
from ntkviz.app.messages import Event, KernelPath
from ntkviz.app.state import Example
from ntkviz.decomposition import influence
from ntkviz.gui.window import MainWindow
from ntkviz.kernel import empirical_ntk_by_layer
from ntkviz.models import build_model


@pytest.fixture
def settings(tmp_path):
    return settings_in(tmp_path)


@pytest.fixture
def window(qtbot, settings, mnist):
    w = open_window(qtbot, settings, mnist)
    train_batches(qtbot, w, 2)
    return w


def model_of(qtbot, window):
    model = build_model(window.state.model.name, 10, seed=None)
    model.load_state_dict(model_state(qtbot, window))
    return model


def test_influence_heatmap_equals_core_and_thumbnail_sets_x_o(qtbot, window, mnist):
    view = window.views["influence"]
    window.show_view(view)  # built after the first paint, inside a scroll area
    assert window.tabs.currentIndex() == 1 and view.isVisible()
    view.set_probe_size(200)
    view.norm_box.setValue(60)
    view.actual_box.setChecked(True)
    result = wait_shown(qtbot, window, "influence", view.job.run_button.click)
    model = model_of(qtbot, window)
    r = result.request.pair
    test = mnist.split("test")
    idx = probe_indices(len(test), 200)
    assert np.array_equal(result.indices, idx)
    x_u = mnist.split(r.x_u.split).x[r.x_u.index]
    core = influence(model, test.x[idx], x_u, r.y_u, r.lr, r.loss, actual=True)
    expected = class_influence(core, test.y[idx].numpy(), 10)
    assert view.job.progress.value() == view.job.progress.maximum() > 0
    np.testing.assert_allclose(view.heatmap.image, expected["delta_probs"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.classes["delta_probs_actual"], expected["delta_probs_actual"],
                               rtol=1e-6, atol=1e-12)  # fmt: skip
    # ‖K‖ per class on the first 60 probe examples
    norms = influence(model, test.x[idx[:60]], x_u, r.y_u, r.lr, r.loss, kernel_norm=True)
    labels = test.y[idx[:60]].numpy()
    heights = view.norm_bars.opts["height"]  # the bars drawn: mean ± std (error bars) a class
    err = view.norm_err.opts
    for c in np.unique(labels):
        of_c = norms.kernel_norm[labels == c]
        assert heights[c] == pytest.approx(of_c.mean(), 1e-6)
        assert err["y"][c] == pytest.approx(of_c.mean(), 1e-6)
        assert err["height"][c] == pytest.approx(2 * of_c.std(), rel=1e-5, abs=1e-9)
    # the most raised thumbnail is the argmax of the predicted Δlog π of y_u
    top = int(idx[np.argmax(core.predicted[:, r.y_u])])
    button = view.raised.buttons[0]
    assert button.property("payload") == top
    lowest = core.predicted[:, r.y_u].min()  # a row of only raised ones says so
    assert view.lowered.title.text() == ("most lowered" if lowest < 0 else "least raised")
    button.click()
    assert window.state.x_o == Example("test", top)
    assert window.views["examples"].x_o_picker.example == Example("test", top)
    wait_current(qtbot, window)
    assert window.views["pair"].last_result.request.x_o == Example("test", top)


def start_long_sweep(qtbot, window, monkeypatch):
    """An influence sweep over the whole test split, one chunk per engine tick."""
    monkeypatch.setattr(Engine, "tick_seconds", 0.0)  # plenty of chances to cancel
    view = window.views["influence"]
    view.set_probe_size(10000)
    view.norm_box.setValue(0)
    wait_event(qtbot, window, "influence", view.job.run_button.click, kind="progress")
    return view


def test_cancel_stops_a_running_sweep(qtbot, window, monkeypatch):
    view = start_long_sweep(qtbot, window, monkeypatch)
    assert view.job.cancel_button.isEnabled()
    event = wait_event(qtbot, window, "influence", view.job.cancel_button.click, "cancelled")
    assert event.payload == "cancelled"
    assert window.controller.current("influence") is None and view.result is None
    assert view.job.run_button.isEnabled() and not view.job.cancel_button.isEnabled()
    assert view.job.progress.value() == 0
    # the engine is free: a new sweep runs to its end
    view.set_probe_size(200)
    wait_shown(qtbot, window, "influence", view.job.run_button.click)


def test_changing_the_model_cancels_a_running_sweep(qtbot, window, monkeypatch):
    """A sweep must never mix two sets of weights: applying a step mid-sweep cancels it."""
    view = start_long_sweep(qtbot, window, monkeypatch)
    apply = window.views["pair"].step_panel.apply_button.click
    event = wait_event(qtbot, window, "influence", apply, "cancelled")
    assert event.payload == "the model changed"
    assert window.controller.current("influence") is None
    assert view.job.run_button.isEnabled()


def test_kernel_maps_equal_core_and_record_while_training(qtbot, window, mnist, tmp_path):
    kv = window.views["kernel_maps"]
    kv.per_class_box.setValue(3)
    maps = wait_shown(qtbot, window, "kernel_map_history", kv.job.run_button.click)
    model = model_of(qtbot, window)
    test = mnist.split("test")
    idx = balanced_indices(test.y, 3)
    expected = class_kernel_map(model, test.x[idx], test.y[idx].numpy(), 10)
    np.testing.assert_allclose(kv.heatmap.image, expected, rtol=1e-6)
    assert maps.steps.tolist() == [2]
    with np.load(kv.export(tmp_path / "maps.npz")) as saved:  # says which images it is over
        np.testing.assert_array_equal(saved["maps"][0], kv.heatmap.image)
        meta = json.loads(str(saved["meta_json"]))
    assert meta["per_class"] == 3 and "balanced_indices" in meta["probe"]
    # recording while training: a map every 2 steps
    kv.every_box.setValue(2)
    kv.record_box.setChecked(True)
    window.controller.resume()
    qtbot.waitUntil(lambda: len(kv.maps.steps) >= 3, timeout=TIMEOUT)
    window.controller.pause()
    m = kv.maps
    assert list(m.steps) == sorted(m.steps) and m.steps[-1] > m.steps[0]
    assert m.correlations[-1] == pytest.approx(1.0)
    assert m.correlations[0] == pytest.approx(rank_correlation(m.maps[0], m.maps[-1]))
    kv.slider.setValue(0)
    np.testing.assert_array_equal(kv.heatmap.image, m.maps[0])


def test_kernel_maps_that_would_hold_training_up_are_not_recorded_unless_asked(qtbot, window):
    """A model whose map of the probe set takes long (the generic path computes every pair) has
    recording switched off, with a note; a faster model has it back; the user's choice stands."""
    kv = window.views["kernel_maps"]
    number = window.state.model.number
    # the engine's own measurement first (LeNet's maps are cheap), so that it cannot come between
    qtbot.waitUntil(lambda: window.status_labels["path"].text().endswith("a pair"), timeout=TIMEOUT)
    n_maps = len(kv.history.records)
    assert kv.record_box.isChecked() and n_maps >= 1  # recorded at the start of the run

    def path(kind, cost):
        kv._on_kernel_path(Event("kernel_path", KernelPath(number, f"{kind} kernel path", cost)))

    path("generic", 0.01)  # 100 images: 5,050 pairs, ≈ 50 s
    assert not kv.record_box.isChecked() and kv.estimate() == pytest.approx(50.5)
    kv.history.clear()
    assert kv.slider_label.text() == "no maps yet: ≈ 50 s a map here"
    assert kv.slider_label.toolTip().startswith("Recording while training is off")
    train_batches(qtbot, window, 2)
    assert len(kv.history.records) == 0
    path("structured", 0.01)  # 100 sweeps: ≈ 1 s
    assert kv.record_box.isChecked()
    path("generic", 0.01)
    kv.record_box.setChecked(True)  # the user asks for it: a map at once, paused or not
    assert not kv._switched_off
    qtbot.waitUntil(lambda: len(kv.history.records) >= 1, timeout=TIMEOUT)


def test_squeeze_layers_and_spectrum_equal_core(qtbot, window, mnist, tmp_path):
    sv = window.views["squeeze"]
    sv.steps_box.setValue(3)
    sv.lr_box.setValue(0.3)
    sv.label_box.setCurrentIndex(4)
    res = wait_shown(qtbot, window, "squeeze", sv.job.run_button.click)
    model = model_of(qtbot, window)
    u = window.state.x_u
    x = mnist.split(u.split).x[u.index]
    # the lab computes on a float64 copy of the model (moves below float32 resolution show)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        assert res.p_label_float32 == pytest.approx(float(model(x[None]).softmax(-1)[0, 4]), 1e-6)
    for key in ("neg", "ce"):
        core = squeeze_steps(model64, x64, 4, 0.3, 3, loss=key)
        np.testing.assert_allclose(getattr(res, key).probs, core.probs, rtol=1e-10, atol=1e-15)
        before, after = sv.curves[key]
        np.testing.assert_allclose(after.getData()[1], core.probs[-1], rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(before.getData()[1], core.probs[0], rtol=1e-10, atol=1e-15)
    neg = squeeze_steps(model64, x64, 4, 0.3, 3, loss="neg")
    assert np.array_equal(res.neg.label_fell, neg.label_fell)
    assert np.array_equal(res.neg.top_rose, neg.top_rose)
    assert "✓" in sv.checks.text() or "✗" in sv.checks.text()
    assert len(res.sweep_lrs) == len(res.sweep_mass) == 7
    assert "left out" not in sv.checks.text()
    for shown in (dataclasses.replace(res, left_out="the sweep's η = 3: diverges, left out"), res):
        sv.result = shown
        sv.show_result(shown)
        note = "The sweep's η = 3: diverges, left out." in sv.checks.text()
        assert note == bool(shown.left_out)
    test = mnist.split("test")
    idx = np.array(res.survey_indices)  # a writable copy: the result is read-only
    survey = squeeze_survey(model64, test.x[idx].double(), test.y[idx].numpy(), 0.3)
    for key in ("peak", "p_label"):
        xs, ys = sv.survey_points[key].getData()
        np.testing.assert_allclose(xs, getattr(survey, key), rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(ys, survey.gained, rtol=1e-8, atol=1e-15)

    # the marks stand above every bar they span (a label is wider than a bar), and a second one
    # over the same bars goes a line further out (the two never meet): ȳ = 4 is low beside class
    # 3, the top other
    probs = np.full((2, 10), 0.01)
    probs[:, 3], probs[:, 4] = (0.6, 0.7), (0.05, 0.02)
    run = SqueezeRun(probs, np.array([True]), np.array([True]), 0.3, "neg", 4)
    sv.log_box.setChecked(False)
    window.resize(800, 600)  # three plots abreast: a bar is narrower than "top other ↑"
    window.show_view(sv)
    qtbot.waitUntil(lambda: sv.run_plots["neg"].getViewBox().width() > 100, timeout=TIMEOUT)
    sv.result = dataclasses.replace(res, y=4, neg=run, ce=dataclasses.replace(run, loss="ce"))
    sv.show_result(sv.result)
    QApplication.sendPostedEvents()  # the labels placed in the view as drawn
    QApplication.processEvents()
    y_mark, top_mark = sv.marks["neg"]
    assert "ȳ" in y_mark.toPlainText() and "top other" in top_mark.toPlainText()
    assert y_mark.pos().y() == top_mark.pos().y() == pytest.approx(0.7)  # class 3's bar
    assert (y_mark.pos().x(), top_mark.pos().x()) == (4, 3)
    assert not y_mark.sceneBoundingRect().intersects(top_mark.sceneBoundingRect())
    probs[:, 5] = 0.9  # now the top of the plot is class 5's: marks above the others' bars
    run = dataclasses.replace(run, probs=probs)
    sv.result = dataclasses.replace(res, y=4, neg=run, ce=dataclasses.replace(run, loss="ce"))
    sv.show_result(sv.result)
    QApplication.sendPostedEvents()
    QApplication.processEvents()
    y_mark, top_mark = sv.marks["neg"]
    assert top_mark.pos().x() == 5 and y_mark.pos().y() == pytest.approx(0.9)
    assert not y_mark.sceneBoundingRect().intersects(top_mark.sceneBoundingRect())
    sv.result = res
    sv.show_result(res)

    lv = window.views["layers"]
    lay = wait_shown(qtbot, window, "layers", lv.job.run_button.click)
    r = lay.request
    parts = empirical_ntk_by_layer(
        model, mnist.split(r.x_o.split).x[r.x_o.index][None],
        mnist.split(r.x_u.split).x[r.x_u.index][None],
    )  # fmt: skip
    expected = np.array([float(parts[n][0, 0].norm()) for n in lay.names])
    assert set(lay.names) == set(parts)
    np.testing.assert_allclose(lv.bars.opts["width"], expected, rtol=1e-5)
    assert lv.bars.names == lay.names
    assert [name for _, name in lv._ticks] == list(lay.names)  # LeNet's five fit
    hover = SimpleNamespace(isExit=lambda: False, pos=lambda: QPointF(expected[1] / 2, 1.2))
    lv.bars.hoverEvent(hover)
    assert lv.bars.toolTip() == f"{lay.names[1]}: ‖K‖_F = {expected[1]:.4g}"

    lv.n_box.setValue(20)
    spec = wait_shown(qtbot, window, "spectrum", lv.spectrum_job.run_button.click)
    test = mnist.split("test")
    core = ntk_spectrum(model, test.x[spec.indices.copy()])
    # float32 kernels summed in another order: Weyl's bound, |Δλ| ≤ ‖ΔK‖ ≈ float32 · λ_max
    np.testing.assert_allclose(spec.eigenvalues, core, rtol=1e-6, atol=1e-6 * core[0])
    assert len(spec.indices) == 20
    (x0, x1), (y0, y1) = lv.spec_plot.viewRange()  # every eigenvalue in view (log10 on y)
    eig = np.log10(np.clip(spec.eigenvalues, 1e-12, None))
    assert x0 <= 1 and x1 >= 20 and y0 <= eig.min() and y1 >= eig.max()
    for name, view in (("sq", sv), ("layers", lv)):
        for suffix in (".png", ".svg", ".csv", ".npz"):
            path = view.export(tmp_path / f"{name}{suffix}", width=400)
            assert path.stat().st_size > 0
    assert np.load(tmp_path / "sq.npz")["neg_probs"].shape == (4, 10)
    meta = json.loads(str(np.load(tmp_path / "sq.npz")["meta_json"]))  # what it was run on
    assert meta["view"] == "squeeze" and meta["request"]["x"] == [res.x.split, res.x.index]
    assert meta["request"]["y"] == res.y == 4 and meta["request"]["lr"] == 0.3
    assert meta["request"]["steps"] == 3
    meta = json.loads(str(np.load(tmp_path / "layers.npz")["meta_json"]))
    assert meta["view"] == "layers" and meta["training_step"] == lay.step
    assert meta["request"]["x_u"] == [r.x_u.split, r.x_u.index] and meta["request"]["lr"] == r.lr
    assert meta["classes"] == [str(k) for k in range(10)] and meta["dataset"] == "mnist"
    lines = (tmp_path / "layers.csv").read_text().splitlines()
    assert json.loads(lines[0].removeprefix("# ntkviz_version: ")) == ntkviz.__version__
    assert f"# model: {json.dumps(window.state.model.name)}" in lines
    for name in ("sq", "layers"):  # one long table: every row as wide as the header
        text = (tmp_path / f"{name}.csv").read_text().splitlines()
        header, *rows = csv.reader(line for line in text if not line.startswith("#"))
        assert header[0] == "array" and header[-1] == "value"
        assert all(len(row) == len(header) for row in rows)
        with np.load(tmp_path / f"{name}.npz") as saved:
            for key in saved.files:
                if key == "meta_json" or saved[key].dtype.kind not in "fi":
                    continue
                got = [row for row in rows if row[0] == key]
                values = np.array([float(row[-1]) for row in got])
                np.testing.assert_array_equal(values, saved[key].ravel(), err_msg=key)
                index = [tuple(int(v) for v in row[1 : 1 + saved[key].ndim]) for row in got]
                assert index == list(np.ndindex(saved[key].shape)), key


def run_probe_jobs(qtbot, window, kernel_map: bool = False) -> None:
    """Every probe tab's job at a small size, each waited for until shown."""
    views = window.views
    views["influence"].set_probe_size(50)
    views["kernel_maps"].per_class_box.setValue(2)
    views["squeeze"].steps_box.setValue(2)
    views["layers"].n_box.setValue(10)
    jobs = [("kernel_maps", views["kernel_maps"].run)] if kernel_map else []
    jobs += [
        ("influence", views["influence"].run),
        ("squeeze", views["squeeze"].run),
        ("layers", views["layers"].run),
        ("spectrum", views["layers"].run_spectrum),
    ]
    for topic, start in jobs:
        wait_shown(qtbot, window, topic, start)


def test_views_forget_the_old_model_when_another_replaces_it(qtbot, window, tmp_path):
    views = window.views
    run_probe_jobs(qtbot, window)
    training = views["training"]
    assert training.run_curves.steps and "test accuracy" in training.accuracy.text()
    path = tmp_path / "c.ntkc"
    wait_event(
        qtbot, window, "checkpoint_saved", lambda: window.controller.save_checkpoint(str(path))
    )
    number = window.state.model.number
    wait_event(qtbot, window, "model", lambda: window.controller.open_checkpoint(str(path)))
    assert window.state.model.number != number
    assert training.run_curves.steps == [] and training.accuracy.text() == "test accuracy: –"
    assert training.eta.text() == "trained for 2 steps"
    assert views["influence"].result is None and views["influence"].heatmap.image is None
    assert not any(b.isVisible() for b in views["influence"].raised.buttons)
    assert views["squeeze"].result is None
    assert views["squeeze"].curves["neg"][1].getData()[0] is None  # no curve
    assert views["layers"].result is None and len(views["layers"].bars.opts["width"]) == 0
    assert views["layers"].spectra == [] and views["layers"].spec_curves == []
    assert views["kernel_maps"].history.maps(10).steps.size == 0
    wait_current(qtbot, window)  # the pair is decomposed again on the loaded model


def test_probe_views_run_no_torch_op_on_the_gui_thread(qtbot, window, tmp_path):
    # see tests/test_gui.py::test_the_gui_thread_runs_no_torch_op
    views = window.views
    calls = TorchCalls()
    with calls:
        run_probe_jobs(qtbot, window, kernel_map=True)
        for view in (views["squeeze"], views["layers"]):
            assert view.export(tmp_path / "v.npz", width=400).stat().st_size > 0
        window.close()
    assert calls.calls == []


def test_session_round_trip_and_corrupt_file_refused(qtbot, window, settings, mnist, tmp_path):
    pair = window.views["pair"]
    window.state.x_o = Example("test", 7)
    pair.step_panel.lr.setValue(0.2)
    window.controller.apply_step()
    wait_current(qtbot, window)
    assert len(pair.last_history.lrs) == 1
    window.views["kernel_maps"].per_class_box.setValue(2)
    wait_shown(qtbot, window, "kernel_map_history", window.views["kernel_maps"].run)
    window.views["influence"].set_probe_size(1000)
    state = model_of(qtbot, window).state_dict()
    curves = window.views["training"].run_curves.to_dict()
    path = tmp_path / "s.ntks"
    wait_event(qtbot, window, "session_saved", lambda: window.controller.save_session(str(path)))

    other = MainWindow(config=SMALL, dataset=mnist, settings=settings)
    other.show_message_boxes = False
    qtbot.addWidget(other)
    with qtbot.waitSignal(other.ready, timeout=TIMEOUT):
        other.show()
    wait_event(qtbot, other, "session_opened", lambda: other.controller.open_session(str(path)))
    wait_current(qtbot, other)
    other_pair = other.views["pair"]
    assert len(other_pair.last_history.lrs) == 1
    assert other.views["training"].run_curves.to_dict() == curves
    assert other.state.x_o == Example("test", 7)
    assert other.views["examples"].x_o_picker.example == Example("test", 7)
    assert other_pair.step_panel.lr.value() == pytest.approx(0.2)
    assert other.views["influence"].probe_size == 1000
    np.testing.assert_allclose(other_pair.last_history.probs_o, pair.last_history.probs_o)
    loaded = model_of(qtbot, other).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    other_maps, maps = other.views["kernel_maps"].maps, window.views["kernel_maps"].maps
    assert len(other_maps.steps) == 1
    np.testing.assert_array_equal(other_maps.maps[0], maps.maps[0])

    # a corrupt file and a newer version: a clear message, nothing changes
    bad = tmp_path / "bad.ntks"
    bad.write_bytes(b"not a session at all")
    gen_before = other.controller.generation["pair"]
    with qtbot.waitSignal(other.error_shown, timeout=TIMEOUT) as blocker:
        other.controller.open_session(str(bad))
    assert "not a readable ntkviz session" in blocker.args[1]
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    newer = tmp_path / "newer.ntks"
    torch.save(payload, newer)
    with qtbot.waitSignal(other.error_shown, timeout=TIMEOUT) as blocker:
        other.controller.open_session(str(newer))
    assert "version 99" in blocker.args[1]
    after = model_of(qtbot, other).state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert other.views["training"].run_curves.to_dict() == curves
    assert other.controller.generation["pair"] == gen_before
    assert len(other.views["kernel_maps"].maps.steps) == 1
    request = History(other.controller.pair())
    event = wait_event(
        qtbot, other, "history", lambda: other.controller.submit("history", request), "result"
    )
    assert len(event.payload.lrs) == 1
    other.close()


def test_a_probe_result_says_when_the_model_has_moved_since(qtbot, window):
    # after Apply step (or more training) Influence kept its result with nothing marking it
    # out of date but the step in its caption
    view = window.views["influence"]
    window.show_view(view)
    view.set_probe_size(50)
    wait_shown(qtbot, window, "influence", view.job.run_button.click)
    assert view.stale_note.isHidden()
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    qtbot.waitUntil(view.stale_note.isVisible, timeout=TIMEOUT)
    assert view.stale_note.text() == "computed at training step 2; the model has moved since"
    wait_shown(qtbot, window, "history", window.controller.undo_step)
    qtbot.waitUntil(view.stale_note.isHidden, timeout=TIMEOUT)  # the same model again
    window.tabs.setCurrentIndex(0)  # on another tab, the note follows all the same
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    qtbot.waitUntil(lambda: not view.stale_note.isHidden(), timeout=TIMEOUT)
    wait_shown(qtbot, window, "history", window.controller.undo_step)
    qtbot.waitUntil(view.stale_note.isHidden, timeout=TIMEOUT)
    train_batches(qtbot, window, 1)
    qtbot.waitUntil(lambda: not view.stale_note.isHidden(), timeout=TIMEOUT)
    window.show_view(view)
    assert view.stale_note.isVisible()
    wait_shown(qtbot, window, "influence", view.job.run_button.click)
    assert view.stale_note.isHidden()
    # another step in the place of an undone one: the same counts, another model
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    wait_shown(qtbot, window, "influence", view.job.run_button.click)
    wait_shown(qtbot, window, "history", window.controller.undo_step)
    window.controller.select(lr=0.5)
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    qtbot.waitUntil(view.stale_note.isVisible, timeout=TIMEOUT)


def test_a_new_probe_set_while_a_map_is_recorded_frees_the_controls(qtbot, window):
    # the per-class box superseded the running "Record now" while paused: its answer was
    # dropped and the controls stayed "running" (Compute disabled) until Cancel
    kv = window.views["kernel_maps"]
    kv.per_class_box.setValue(50)
    kv.job.run_button.click()
    assert kv.job.running
    kv.per_class_box.setValue(2)
    assert not kv.job.running and kv.job.run_button.isEnabled()
    maps = wait_shown(qtbot, window, "kernel_map_history", kv.job.run_button.click)
    assert maps.maps[-1].shape == (10, 10) and not kv.job.running
    assert kv.history.per_class == 2
