"""The watch tab and the optimizer switch (issue 10): the window shows the core's numbers."""

import os
from dataclasses import replace

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import pytest
import torch

pytest.importorskip("PySide6")

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

from ntkviz.accounting import Watch, account_step, decompose_step
from ntkviz.app.state import Example
from ntkviz.models import build_model
from ntkviz.run_account import RunAccount
from ntkviz.training import make_optimizer, scheduled_lr, train


@pytest.fixture
def window(qtbot, tmp_path, mnist):
    return open_window(qtbot, settings_in(tmp_path), mnist)


def core_run(mnist, watched, steps=None):
    """The engine's run, replayed here: model, optimizer and the accounts of each step."""
    model = build_model(SMALL.model, 10, seed=SMALL.seed)
    opt = make_optimizer(model, SMALL)
    x = torch.stack([mnist.split(e.split).x[e.index] for e in watched])
    classes = [int(mnist.split(e.split).y[e.index]) for e in watched]
    records = []
    for r in train(model, mnist, SMALL, opt, watch=Watch(x, classes, focus=(0,))):
        records.append(r)
        if steps is not None and r.step == steps:
            break
    return model, opt, classes, records


def test_the_watch_tab_shows_the_core_accounts(qtbot, window, mnist, tmp_path):
    view = window.views["watch_ranking"]
    watched = view.examples
    assert watched[0] == window.state.x_o and len(watched) == 10  # x_o and one per class
    window.show_view(view)
    assert not view.watching.isChecked() and "to watch" in view.note.text()  # off by default
    view.watching.setChecked(True)
    assert view.note.text() == "10 watched"
    window.views["training"].start_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    ranking = wait_event(qtbot, window, "watch_ranking", lambda: None, "result").payload
    _, _, classes, records = core_run(mnist, watched)
    t = view.timeline_arrays()
    assert t["steps"].tolist() == [r.step for r in records]
    for w in range(len(watched)):
        core_by_class = np.zeros((len(records), 10))
        for k, r in enumerate(records):
            np.add.at(core_by_class[k], r.account.batch_labels, r.account.contributions[w])
        np.testing.assert_allclose(t["by_class"][:, w], core_by_class, rtol=1e-5, atol=1e-9)
        for name in ("momentum", "weight_decay", "residual", "actual"):
            core = [getattr(r.account, f"class_{name}")[w] for r in records]
            np.testing.assert_allclose(t[name][:, w], core, rtol=1e-5, atol=1e-9, err_msg=name)
        core = [r.account.log_probs_before[w, classes[w]] for r in records]
        np.testing.assert_allclose(t["log_prob"][:, w], core, rtol=1e-5)
    # the curves drawn are the cumulative terms; they add up to the actual change
    assert "residual (2nd order)" in view.curves  # LeNet: the same in both modes
    w = view.w
    drawn = sum(view.curves[name].getData()[1] for name in view.curves if name != "actual change")
    np.testing.assert_allclose(drawn, view.curves["actual change"].getData()[1], atol=1e-9)
    # who moved x_o: the run's exact sums
    run = RunAccount(classes, len(mnist.train), 10)
    for r in records:
        run.add(r.account, r.batch_indices, r.step)
    top = run.top(w, len(view.helpful.buttons))
    assert np.array_equal(ranking.helpful[w], top.helpful)
    np.testing.assert_allclose(ranking.harmful_values[w], top.harmful_values, rtol=1e-5)
    shown = [b.property("payload") for b in view.helpful.buttons if b.isVisible()]
    assert shown == top.helpful.tolist()
    view.helpful.buttons[0].click()  # becomes x_u
    assert window.state.x_u == Example("train", int(top.helpful[0]))
    # a step's details: its batch and the largest contributor's A, K_P, G
    detail = wait_shown(qtbot, window, "watch_detail", lambda: view.show_step(7))
    account = records[6].account
    assert detail.step == 7 and np.array_equal(detail.batch_indices, records[6].batch_indices)
    np.testing.assert_allclose(detail.contributions, account.contributions, rtol=1e-5, atol=1e-9)
    assert w == 0 and list(account.focus) == [0]  # the example shown is the focused one
    full = account.focused
    top = int(full.top_index[0])
    np.testing.assert_allclose(detail.top_term(w), full.gradient[0, top], rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(view.factors["K"].image, full.top_kernel[0], rtol=1e-5)
    # another watched example: its contributions, without K_P (class-level accounts only)
    view.which.setCurrentIndex(3)
    assert not detail.has_kernel[3] and view.factors["K"].image is None
    assert view.batch.buttons[0].property("payload") == int(
        records[6].batch_indices[np.argmax(np.abs(account.contributions[3]))]
    )
    view.which.setCurrentIndex(0)
    first = view.batch.buttons[0].property("payload")
    assert first == int(records[6].batch_indices[np.argmax(np.abs(account.contributions[w]))])
    # the export: the run's accounts with what they are of, as the CLI writes them
    path = tmp_path / "accounts.npz"
    wait_event(qtbot, window, "watch_save", lambda: view.export(path), "result")
    saved = RunAccount.load(path)
    assert saved.steps == len(records) and np.array_equal(saved.by_example, run.by_example)
    meta = saved.meta
    assert meta["watched"] == [[e.split, e.index] for e in watched]
    assert meta["watch_labels"] == classes and meta["class_names"] == list(mnist.classes)
    assert {k: meta["config"][k] for k in ("model", "lr", "seed", "batch_size")} == {
        "model": SMALL.model, "lr": SMALL.lr, "seed": SMALL.seed, "batch_size": SMALL.batch_size
    }  # fmt: skip
    assert meta["started_at"] == 0 and meta["dataset"] == mnist.name


def run_to_the_end(qtbot, window, button) -> None:
    wait_event(qtbot, window, "run_started", button.click)
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)


def test_continue_carries_the_watch_on_unless_the_model_was_stepped_by_hand(qtbot, window, mnist):
    view, training = window.views["watch_ranking"], window.views["training"]
    watched = view.examples
    view.watching.setChecked(True)
    training.epochs.setValue(1)
    run_to_the_end(qtbot, window, training.start_button)
    run_to_the_end(qtbot, window, training.continue_button)
    ranking = wait_event(qtbot, window, "watch_ranking", lambda: None, "result").payload
    # the core: one run, then a second with a fresh optimizer on the same model
    config = replace(SMALL, epochs=1)
    model = build_model(SMALL.model, 10, seed=SMALL.seed)
    x = torch.stack([mnist.split(e.split).x[e.index] for e in watched])
    classes = [int(mnist.split(e.split).y[e.index]) for e in watched]
    records = []
    for _ in range(2):
        opt = make_optimizer(model, config)
        watch = Watch(x, classes, focus=(0,))
        records += [
            replace(r, step=r.step + len(records))
            for r in train(model, mnist, config, opt, watch=watch)
        ]
    t = view.timeline_arrays()
    assert t["steps"].tolist() == list(range(1, 21)) == [r.step for r in records]
    core = [r.account.class_actual for r in records]
    np.testing.assert_allclose(t["actual"], core, rtol=1e-5, atol=1e-9)
    run = RunAccount(classes, len(mnist.train), 10)
    for r in records:
        run.add(r.account, r.batch_indices, r.step)
    assert ranking.steps == 20
    for w in range(len(watched)):
        top = run.top(w, len(view.helpful.buttons))
        assert np.array_equal(ranking.helpful[w], top.helpful)
        np.testing.assert_allclose(ranking.helpful_values[w], top.helpful_values, rtol=1e-5)
    # a step applied by hand is not in the accounts: Continue starts a new watch
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    run_to_the_end(qtbot, window, training.continue_button)
    ranking = wait_event(qtbot, window, "watch_ranking", lambda: None, "result").payload
    assert view.timeline_arrays()["steps"].tolist() == list(range(21, 31))
    assert ranking.steps == 10


def test_steps_by_hand_in_a_paused_watched_run_begin_its_account_again(qtbot, window):
    view, training = window.views["watch_ranking"], window.views["training"]
    view.watching.setChecked(True)
    training.epochs.setValue(1)
    wait_event(qtbot, window, "watch_steps", training.batch_button.click)  # paused at step 1
    qtbot.waitUntil(lambda: window.state.run_state == "paused", timeout=TIMEOUT)
    window.controller.select(lr=0.5)
    wait_current(qtbot, window)
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    wait_event(qtbot, window, "watch_restarted", training.resume_button.click)
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    ranking = wait_event(qtbot, window, "watch_ranking", lambda: None, "result").payload
    t = view.timeline_arrays()
    assert t["steps"].tolist() == list(range(2, 11)) and ranking.steps == 9
    # the timeline's actual change is the change of log π since its first step: no gap in it
    log_prob, actual = t["log_prob"][:, 0], t["actual"][:, 0]
    np.testing.assert_allclose(log_prob[1:], log_prob[:-1] + actual[:-1], atol=1e-4)
    # Continue carries this account on: the model is as the run left it
    run_to_the_end(qtbot, window, training.continue_button)
    assert view.timeline_arrays()["steps"].tolist() == list(range(2, 21))


def test_the_show_list_names_the_runs_examples_when_the_list_changes_as_it_starts(qtbot, window):
    # edits made before the engine's "run_started" came back were taken for the run's list:
    # one more example in the "show" box than the run has (an IndexError on choosing it), or
    # other examples' names over the run's numbers
    view, training = window.views["watch_ranking"], window.views["training"]
    view.watching.setChecked(True)
    training.epochs.setValue(1)
    at_start = view.examples
    training.start_button.click()
    window.state.x_o = Example("test", 1000)
    view.add_button.click()  # "Watch x_o", handled before the engine's answer
    assert len(view.examples) == len(at_start) + 1
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert view.run_examples == at_start and view.which.count() == len(at_start)
    view.which.setCurrentIndex(view.which.count() - 1)  # the run's last example
    t = view.timeline_arrays()
    assert t["log_prob"].shape[1] == len(at_start)
    assert str(at_start[-1]) in view.caption.text and "from the next run" in view.note.text()


def test_the_optimizer_switch_previews_applies_and_undoes_its_real_step(qtbot, window, mnist):
    train_batches(qtbot, window, 2)  # momentum has a state now
    pair = window.views["pair"]
    pair.step_panel.step_box.setCurrentIndex(1)  # this run's optimizer, with its next step's η
    model, opt, _, records = core_run(mnist, [window.state.x_o], steps=2)
    total = records[-1].total_steps
    assert window.state.step_kind == "optimizer"
    assert window.state.lr == scheduled_lr(SMALL.lr, 3, total) < SMALL.lr
    window.state.lr = 0.1
    wait_current(qtbot, window)
    dec = pair.last_result.decomposition
    r = window.controller.pair()
    x_o, x_u = mnist.split(r.x_o.split).x[r.x_o.index], mnist.split(r.x_u.split).x[r.x_u.index]
    core = decompose_step(model, opt, x_o, x_u, r.y_u, 0.1, r.loss)
    for name in ("K", "G", "gradient_term", "momentum", "weight_decay", "predicted", "actual"):
        np.testing.assert_allclose(getattr(dec, name), getattr(core, name), rtol=1e-4, atol=1e-8,
                                   err_msg=name)  # fmt: skip
    assert np.abs(dec.momentum).max() > 0  # the run's momentum moves x_o too
    heatmaps = pair.decomposition_view.heatmaps
    np.testing.assert_allclose(heatmaps["predicted"].image[:, 0], dec.gradient_term, rtol=1e-6)
    assert "gradient term" in heatmaps["predicted"].titleLabel.text
    bars = pair.step_panel.preview
    assert bars.momentum.isVisible()
    np.testing.assert_allclose(bars.momentum.opts["height"], dec.momentum, rtol=1e-6)
    before = model_state(qtbot, window)
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    applied = model_state(qtbot, window)
    account_step(model, opt, x_u[None], torch.tensor([r.y_u]), x_o[None], 0.1, loss=r.loss)
    for k, v in model.state_dict().items():
        np.testing.assert_allclose(applied[k], v, rtol=1e-5, atol=1e-7, err_msg=k)
    wait_shown(qtbot, window, "history", window.controller.undo_step)
    undone = model_state(qtbot, window)
    assert all(torch.equal(before[k], undone[k]) for k in before)
    # undo restored the momentum too: the same step again lands on the same weights
    wait_shown(qtbot, window, "history", window.controller.apply_step)
    again = model_state(qtbot, window)
    assert all(torch.equal(applied[k], again[k]) for k in applied)


def test_batch_norm_statistics_are_drawn_as_their_own_term(qtbot, window):
    """A batch-norm model's running statistics: a curve of the timeline and a bar of the
    optimizer's preview, apart from the residual, with the core's numbers."""
    from pathlib import Path

    spec = f"{Path(__file__).parent / 'user_models.py'}:small_cnn"
    wait_event(qtbot, window, "model", lambda: window.controller.open_model(spec))
    view = window.views["watch_ranking"]
    view.watching.setChecked(True)
    train_batches(qtbot, window, 2)
    qtbot.waitUntil(lambda: len(view.rows) > 0, timeout=TIMEOUT)
    window.show_view(view)
    view.redraw()
    t, w = view.timeline_arrays(), view.w
    assert np.all(t["statistics"][:, w] != 0)
    assert "residual (train/eval difference + 2nd order)" in view.curves  # batch norm
    curve = view.curves["running statistics (exact)"].getData()[1]
    np.testing.assert_allclose(curve, np.cumsum(t["statistics"][:, w]), rtol=1e-12)
    drawn = sum(view.curves[name].getData()[1] for name in view.curves if name != "actual change")
    np.testing.assert_allclose(drawn, view.curves["actual change"].getData()[1], atol=1e-9)
    pair = window.views["pair"]
    window.show_view(pair)
    pair.step_panel.step_box.setCurrentIndex(1)  # this run's optimizer
    wait_current(qtbot, window)
    dec = pair.last_result.decomposition
    assert np.any(dec.statistics)
    np.testing.assert_allclose(dec.residual, dec.actual - dec.predicted - dec.statistics)
    assert pair.decomposition_view.heatmaps["residual"].titleLabel.text == "residual (O(η))"
    bars = pair.step_panel.preview
    assert bars.statistics.isVisible()
    np.testing.assert_allclose(bars.statistics.opts["height"], dec.statistics, rtol=1e-6)


def test_a_step_that_cannot_run_leaves_no_stale_numbers(qtbot, window):
    """BatchNorm1d cannot normalise a batch of one in training mode: the optimizer's one-example
    step is refused with a message saying so, and the previous numbers are not left shown."""
    from pathlib import Path

    spec = f"{Path(__file__).parent / 'user_models.py'}:batch_norm"
    wait_event(qtbot, window, "model", lambda: window.controller.open_model(spec))
    train_batches(qtbot, window, 2)
    pair = window.views["pair"]
    assert pair.last_result is not None  # the plain-SGD step (eval mode) works
    title, message = wait_event(
        qtbot, window, "pair", lambda: pair.step_panel.step_box.setCurrentIndex(1), "error"
    ).payload  # fmt: skip
    assert title == "Pair failed"
    assert "cannot pass the model's BatchNorm1d in training mode" in message
    qtbot.waitUntil(lambda: pair.last_result is None, timeout=TIMEOUT)
    view = pair.decomposition_view
    assert all(h.image is None for h in view.heatmaps.values())
    assert view.info.text.startswith("Not computed: a batch of 1 cannot pass")
    assert pair.step_panel.summary.text() == ""


def test_watch_runs_is_remembered_and_restores_without_an_error(qtbot, tmp_path, mnist):
    settings = settings_in(tmp_path)
    settings.setValue("watchRuns", True)  # as the last session left it
    window = open_window(qtbot, settings, mnist)
    view = window.views["watch_ranking"]
    assert window.last_error is None  # the setting is restored before there is anything to watch
    assert view.watching.isChecked() and view.note.text() == "10 watched"
    wait_event(qtbot, window, "watch_steps", window.views["training"].batch_button.click)
    view.watching.setChecked(False)
    window.close()
    assert settings.value("watchRuns") in (False, "false")


def test_a_run_without_watching_leaves_the_show_list_offering_the_next_runs(qtbot, window):
    view, training = window.views["watch_ranking"], window.views["training"]
    view.watching.setChecked(False)
    training.epochs.setValue(1)
    training.start_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert view.run_examples == () and view.which.count() == len(view.examples) > 0


def test_the_watch_tabs_cancel_also_cancels_an_export_of_the_accounts(qtbot, window, monkeypatch):
    # the export runs as the "watch_save" job on the ranking's controls; Cancel cancelled only
    # "watch_ranking"
    view = window.views["watch_ranking"]
    cancelled = []
    monkeypatch.setattr(window.controller, "cancel", cancelled.append)
    view.job.set_running(True)
    view.job.cancel_button.click()
    assert set(cancelled) == {"watch_ranking", "watch_save"}
