"""Probe views of the desktop app (issue 4): influence over a probe set, kernel maps over
training, the squeezing lab, layers and spectrum, sessions."""

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
import torch

pytest.importorskip("PySide6")
pytest.importorskip("pyqtgraph")

from conftest import TorchCalls
from PySide6.QtCore import QSettings

from ntkviz.analysis import (
    balanced_indices,
    class_influence,
    class_kernel_map,
    ntk_spectrum,
    rank_correlation,
    squeeze_steps,
    squeeze_survey,
)
from ntkviz.decomposition import influence
from ntkviz.gui.main_window import MainWindow
from ntkviz.gui.worker import probe_indices
from ntkviz.kernel import empirical_ntk_by_layer
from ntkviz.models import build_model
from ntkviz.training import TrainConfig

SMALL = TrainConfig(train_size=640, batch_size=64, epochs=2, eval_every=5, eval_size=200)
TIMEOUT = 60_000


@pytest.fixture
def settings(tmp_path):
    return QSettings(str(tmp_path / "ntkviz.ini"), QSettings.IniFormat)


@pytest.fixture
def window(qtbot, settings, mnist):
    w = MainWindow(config=SMALL, dataset=mnist, settings=settings)
    w.show_message_boxes = False
    qtbot.addWidget(w)
    with qtbot.waitSignal(w.ready, timeout=TIMEOUT):
        w.show()
    qtbot.waitUntil(lambda: w.shown_generation == w.generation, timeout=TIMEOUT)
    for _ in range(2):
        with qtbot.waitSignal(w.records_shown, timeout=TIMEOUT):
            w.one_batch()
        qtbot.waitUntil(lambda: w.state == "paused", timeout=TIMEOUT)
    qtbot.waitUntil(lambda: w.shown_generation == w.generation, timeout=TIMEOUT)
    return w


def model_of(qtbot, window):
    with qtbot.waitSignal(window.worker.state_dict_ready, timeout=TIMEOUT) as blocker:
        window.state_dict_requested.emit(1)
    model = build_model(window.model_info.name, 10, seed=None)
    model.load_state_dict(blocker.args[1])
    return model


def test_influence_heatmap_equals_core_and_thumbnail_sets_x_o(qtbot, window, mnist):
    window.show_view(window.influence_view)  # built after the first paint, inside a scroll area
    assert window.tabs.currentIndex() == 1 and window.influence_view.isVisible()
    window.influence_view.set_probe_size(200)
    window.influence_view.norm_box.setValue(60)
    window.influence_view.actual_box.setChecked(True)
    with qtbot.waitSignal(window.influence_shown, timeout=TIMEOUT) as blocker:
        window.influence_view.compute_button.click()
    result = blocker.args[0]
    model = model_of(qtbot, window)
    r = result.request
    test = mnist.split("test")
    idx = probe_indices(len(test), 200)
    assert np.array_equal(result.indices, idx)
    x_u = mnist.split(r.split_u).x[r.index_u]
    core = influence(model, test.x[idx], x_u, r.y_u, r.lr, r.loss, actual=True)
    expected = class_influence(core, test.y[idx].numpy(), 10)
    view = window.influence_view
    np.testing.assert_allclose(view.heatmap.image, expected["delta_probs"], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(result.classes["delta_probs_actual"], expected["delta_probs_actual"],
                               rtol=1e-6, atol=1e-12)  # fmt: skip
    # ‖K‖ per class on the first 60 probe examples
    norms = influence(model, test.x[idx[:60]], x_u, r.y_u, r.lr, r.loss, kernel_norm=True)
    labels = test.y[idx[:60]].numpy()
    for c in np.unique(labels):
        assert view.norm_means[c] == pytest.approx(norms.kernel_norm[labels == c].mean(), 1e-6)
    # the most raised thumbnail is the argmax of the predicted Δlog π of y_u
    top = int(idx[np.argmax(core.predicted[:, r.y_u])])
    button = view.raised_buttons[0]
    assert button.property("index") == top
    button.click()
    assert (window.x_o_picker.split, window.x_o_picker.index) == ("test", top)
    qtbot.waitUntil(lambda: window.last_result.request.index_o == top, timeout=TIMEOUT)


def test_cancel_stops_a_running_sweep(qtbot, window):
    window.worker.tick_seconds = 0.0  # one chunk per tick: plenty of chances to cancel
    window.influence_view.set_probe_size(10000)
    window.influence_view.norm_box.setValue(0)
    with qtbot.waitSignal(window.worker.job_progress, timeout=TIMEOUT):
        window.compute_influence()
    assert window.influence_view.cancel_button.isEnabled()
    with qtbot.waitSignal(window.job_cancelled, timeout=TIMEOUT) as blocker:
        window.influence_view.cancel_button.click()
    assert blocker.args == ["influence"]
    assert window.last_influence is None
    assert window.influence_view.compute_button.isEnabled()
    assert window.worker._job is None


def test_changing_the_model_cancels_a_running_sweep(qtbot, window):
    """A sweep must never mix two sets of weights: applying a step mid-sweep cancels it."""
    window.worker.tick_seconds = 0.0
    window.influence_view.set_probe_size(10000)
    window.influence_view.norm_box.setValue(0)
    with qtbot.waitSignal(window.worker.job_progress, timeout=TIMEOUT):
        window.compute_influence()
    with qtbot.waitSignal(window.job_cancelled, timeout=TIMEOUT) as blocker:
        window.step_panel.apply_button.click()
    assert blocker.args == ["influence"]
    assert window.last_influence is None
    assert window.worker._job is None


def test_kernel_maps_equal_core_and_record_while_training(qtbot, window, mnist):
    kv = window.kernel_map_view
    kv.per_class_box.setValue(3)
    with qtbot.waitSignal(window.kernel_maps_shown, timeout=TIMEOUT) as blocker:
        window.record_kernel_map()
    maps = blocker.args[0]
    model = model_of(qtbot, window)
    test = mnist.split("test")
    idx = balanced_indices(test.y, 3)
    expected = class_kernel_map(model, test.x[idx], test.y[idx].numpy(), 10)
    np.testing.assert_allclose(kv.heatmap.image, expected, rtol=1e-6)
    assert maps.steps.tolist() == [2]
    # recording while training: a map every 2 steps
    kv.every_box.setValue(2)
    kv.record_box.setChecked(True)
    window.resume_requested.emit()
    qtbot.waitUntil(lambda: window.kernel_maps is not None and len(window.kernel_maps.steps) >= 3,
                    timeout=TIMEOUT)  # fmt: skip
    window.pause_requested.emit()
    m = window.kernel_maps
    assert list(m.steps) == sorted(m.steps) and m.steps[-1] > m.steps[0]
    assert m.correlations[-1] == pytest.approx(1.0)
    assert m.correlations[0] == pytest.approx(rank_correlation(m.maps[0], m.maps[-1]))
    kv.slider.setValue(0)
    np.testing.assert_array_equal(kv.heatmap.image, m.maps[0])


def test_squeeze_layers_and_spectrum_equal_core(qtbot, window, mnist, tmp_path):
    sv = window.squeeze_view
    sv.steps_box.setValue(3)
    sv.lr_box.setValue(0.3)
    sv.label_box.setCurrentIndex(4)
    with qtbot.waitSignal(window.squeeze_shown, timeout=TIMEOUT) as blocker:
        sv.run_button.click()
    res = blocker.args[0]
    model = model_of(qtbot, window)
    u = window.x_u_picker
    x = mnist.split(u.split).x[u.index]
    for key in ("neg", "ce"):
        core = squeeze_steps(model, x, 4, 0.3, 3, loss=key)
        np.testing.assert_allclose(getattr(res, key).probs, core.probs, rtol=1e-6, atol=1e-12)
        before, after = sv.curves[key]
        np.testing.assert_allclose(after.getData()[1], core.probs[-1], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(before.getData()[1], core.probs[0], rtol=1e-6, atol=1e-12)
    neg = squeeze_steps(model, x, 4, 0.3, 3, loss="neg")
    assert np.array_equal(res.neg.label_fell, neg.label_fell)
    assert np.array_equal(res.neg.top_rose, neg.top_rose)
    assert "✓" in sv.checks.text() or "✗" in sv.checks.text()
    assert len(res.sweep_lrs) == len(res.sweep_mass) == 7
    test = mnist.split("test")
    idx = np.array(res.survey_indices)  # a writable copy: the result is read-only
    survey = squeeze_survey(model, test.x[idx], test.y[idx].numpy(), 0.3)
    for key in ("peak", "p_label"):
        xs, ys = sv.survey_points[key].getData()
        np.testing.assert_allclose(xs, getattr(survey, key), rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ys, survey.gained, rtol=1e-5, atol=1e-9)

    with qtbot.waitSignal(window.layers_shown, timeout=TIMEOUT) as blocker:
        window.layers_view.layers_button.click()
    lay = blocker.args[0]
    r = lay.request
    parts = empirical_ntk_by_layer(
        model, mnist.split(r.split_o).x[r.index_o][None], mnist.split(r.split_u).x[r.index_u][None]
    )
    expected = np.array([float(parts[n][0, 0].norm()) for n in lay.names])
    assert set(lay.names) == set(parts)
    np.testing.assert_allclose(window.layers_view.bars.opts["height"], expected, rtol=1e-5)

    window.layers_view.n_box.setValue(20)
    with qtbot.waitSignal(window.spectrum_shown, timeout=TIMEOUT) as blocker:
        window.layers_view.spectrum_button.click()
    spec = blocker.args[0]
    test = mnist.split("test")
    np.testing.assert_allclose(
        spec.eigenvalues, ntk_spectrum(model, test.x[spec.indices.copy()]), rtol=1e-6, atol=1e-9
    )
    assert len(spec.indices) == 20
    for name, view in (("sq", sv), ("layers", window.layers_view)):
        for suffix in (".png", ".svg", ".csv", ".npz"):
            path = view.export(tmp_path / f"{name}{suffix}", width=400)
            assert path.stat().st_size > 0
    assert np.load(tmp_path / "sq.npz")["neg_probs"].shape == (4, 10)


def test_probe_views_run_no_torch_op_on_the_gui_thread(qtbot, window, tmp_path):
    # see tests/test_gui.py::test_the_gui_thread_runs_no_torch_op
    calls = TorchCalls()
    with calls:
        window.influence_view.set_probe_size(50)
        window.kernel_map_view.per_class_box.setValue(2)
        window.squeeze_view.steps_box.setValue(2)
        window.layers_view.n_box.setValue(10)
        for signal, start in (
            (window.influence_shown, window.compute_influence),
            (window.kernel_maps_shown, window.record_kernel_map),
            (window.squeeze_shown, window.run_squeeze),
            (window.layers_shown, window.compute_layers),
            (window.spectrum_shown, window.compute_spectrum),
        ):
            with qtbot.waitSignal(signal, timeout=TIMEOUT):
                start()
        for view in (window.squeeze_view, window.layers_view):
            assert view.export(tmp_path / "v.npz", width=400).stat().st_size > 0
        window.close()
    assert calls.calls == []


def test_session_round_trip_and_corrupt_file_refused(qtbot, window, settings, mnist, tmp_path):
    window.x_o_picker.select("test", 7)
    window.step_panel.lr.setValue(0.2)
    window.apply_step()
    qtbot.waitUntil(lambda: window.last_history is not None and len(window.last_history.lrs) == 1,
                    timeout=TIMEOUT)  # fmt: skip
    window.kernel_map_view.per_class_box.setValue(2)
    with qtbot.waitSignal(window.kernel_maps_shown, timeout=TIMEOUT):
        window.record_kernel_map()
    state = model_of(qtbot, window).state_dict()
    curves = window.training_panel.curves.curves()
    path = tmp_path / "s.ntks"
    with qtbot.waitSignal(window.worker.session_saved, timeout=TIMEOUT):
        window.save_session(str(path))

    other = MainWindow(config=SMALL, dataset=mnist, settings=settings)
    other.show_message_boxes = False
    qtbot.addWidget(other)
    with qtbot.waitSignal(other.ready, timeout=TIMEOUT):
        other.show()
    with qtbot.waitSignal(other.session_restored, timeout=TIMEOUT):
        other.open_session(str(path))
    qtbot.waitUntil(lambda: other.last_history is not None and len(other.last_history.lrs) == 1
                    and other.shown_generation == other.generation, timeout=TIMEOUT)  # fmt: skip
    assert other.training_panel.curves.curves() == curves
    assert (other.x_o_picker.split, other.x_o_picker.index) == ("test", 7)
    assert other.step_panel.lr.value() == pytest.approx(0.2)
    np.testing.assert_allclose(other.last_history.probs_o, window.last_history.probs_o)
    loaded = model_of(qtbot, other).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert len(other.kernel_maps.steps) == 1
    np.testing.assert_array_equal(other.kernel_maps.maps[0], window.kernel_maps.maps[0])

    # a corrupt file and a newer version: a clear message, nothing changes
    bad = tmp_path / "bad.ntks"
    bad.write_bytes(b"not a session at all")
    gen_before = other.generation
    with qtbot.waitSignal(other.error_shown, timeout=TIMEOUT) as blocker:
        other.open_session(str(bad))
    assert "not a readable ntkviz session" in blocker.args[1]
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    newer = tmp_path / "newer.ntks"
    torch.save(payload, newer)
    with qtbot.waitSignal(other.error_shown, timeout=TIMEOUT) as blocker:
        other.open_session(str(newer))
    assert "version 99" in blocker.args[1]
    after = model_of(qtbot, other).state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert other.training_panel.curves.curves() == curves
    assert other.generation == gen_before and len(other.kernel_maps.steps) == 1
    with qtbot.waitSignal(other.worker.history_changed, timeout=TIMEOUT) as blocker:
        other.history_requested.emit(other.generation, other.pair_request())
    assert len(blocker.args[1].lrs) == 1
    other.close()
