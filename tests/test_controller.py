"""The application layer without Qt: an Engine and an AppController driven synchronously (the
engine's events go to the controller, the controller's commands to the engine), with recorded
listeners standing in for the views."""

import copy
import dataclasses
import itertools

import numpy as np
import pytest
import torch

from ntkviz.app.controller import AppController
from ntkviz.app.engine import Engine
from ntkviz.app.features.influence import InfluenceRequest
from ntkviz.app.features.kernel_maps import KernelMapRequest
from ntkviz.app.features.layers import LayersRequest, SpectrumRequest
from ntkviz.app.features.pair import Decompose, FindConfidentlyWrong, History
from ntkviz.app.features.squeeze import SqueezeRequest
from ntkviz.app.jobs import JobEvent, Progress
from ntkviz.app.state import AppState, Example
from ntkviz.training import TrainConfig

CONFIG = TrainConfig(train_size=256, batch_size=64, epochs=2, eval_every=4, eval_size=100)


class App:
    """Engine + controller + a log of what each topic's listeners received."""

    def __init__(self, data, config=CONFIG, ask=None, **engine_options):
        self.events = []  # from the engine, not yet handled
        self.engine = Engine(self.events.append, config, data, **engine_options)
        self.state = AppState()
        self.errors = []
        self.controller = AppController(
            self.state, self.engine.handle, ask, lambda *error: self.errors.append(error)
        )
        self.seen: dict[str, list] = {}
        self.send("load")
        self.drain()

    def send(self, name, *args):
        self.controller.send(name, *args)

    def listen(self, topic):
        self.seen.setdefault(topic, [])
        self.controller.on(topic, self.seen[topic].append)
        return self.seen[topic]

    def handle_events(self):
        while self.events:
            self.controller.handle(self.events.pop(0))

    def drain(self, ticks: int | None = None):
        """Handle events and tick until idle (or ``ticks`` ticks)."""
        done = 0
        while True:
            self.handle_events()
            if not self.engine.busy or (ticks is not None and done >= ticks):
                return
            self.engine.tick()
            done += 1

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.engine.model.state_dict().items()}


@pytest.fixture
def app(mnist):
    return App(mnist)


def requests(app):
    pair = app.controller.pair()
    return {
        "pair": Decompose(pair),
        "history": History(pair),
        "search": FindConfidentlyWrong("test", 3),
        "influence": InfluenceRequest(pair, size=100, norm_size=20),
        "kernel_maps": KernelMapRequest(2),
        "squeeze": SqueezeRequest(pair.x_u, pair.y_u, 0.1, 1),
        "layers": LayersRequest(pair),
        "spectrum": SpectrumRequest(10),
    }


def test_loading_selects_a_pair_and_shows_its_decomposition(app, mnist):
    s = app.state
    assert s.run_state == "ready" and s.dataset.name == "mnist" and s.model.name == "lenet"
    assert s.x_u == Example("train", 2) and int(mnist.train.y[2]) == 4 == s.y_u
    assert s.x_o.split == "test" and int(mnist.test.y[s.x_o.index]) == 9
    result = app.controller.current("pair")
    assert result.request == app.controller.pair() and result.step == 0
    assert app.errors == []


def test_every_feature_drops_stale_results(app):
    for feature, request in requests(app).items():
        seen = app.listen(feature)
        old = app.controller.submit(feature, request)
        new = app.controller.submit(feature, request)  # replaces the running job
        app.drain()
        assert new == old + 1
        # the replaced job's "cancelled" (generation old) was dropped; only the new one counts
        assert [e.generation for e in seen] == [new] * len(seen) and seen[-1].kind == "result"
        result = app.controller.current(feature)
        assert result is seen[-1].payload
        late = JobEvent(feature, old, "result", object())  # a late answer to the old request
        app.controller.handle(late)
        assert app.controller.current(feature) is result and seen[-1].payload is result
    assert app.errors == []


def test_progress_comes_after_one_interval_and_at_most_once_an_interval():
    from ntkviz.app.jobs import JobRunner

    now, events = [0.0], []

    def job(seconds_per_item: float):
        for k in range(5):
            now[0] += seconds_per_item
            yield Progress(k + 1, 5)
        return "done"

    runner = JobRunner(events.append, clock=lambda: now[0], progress_interval=0.1)
    for generation, seconds, want in ((1, 0.04, [("progress", 3)]), (2, 0.01, [])):
        events.clear()
        runner.start("f", generation, job(seconds))
        while runner.busy:
            runner.step(0)
        shown = [(e.kind, e.payload.done) for e in events if e.kind == "progress"]
        assert shown == want  # a job of 0.05 s reports no progress: nothing to repaint
        assert events[-1].kind == "result" and events[-1].payload == "done"


def test_a_job_is_cancelled_and_the_engine_is_free_again(app):
    seen = app.listen("influence")
    request = InfluenceRequest(app.controller.pair(), size=10000)
    app.engine.tick_seconds = 0.0  # one chunk per tick
    app.controller.submit("influence", request)
    while not seen:  # the first progress comes after 0.1 s of work
        app.drain(ticks=1)
    assert [e.kind for e in seen] == ["progress"]
    assert isinstance(seen[-1].payload, Progress) and 0 < seen[-1].payload.done < 10000
    app.controller.cancel("influence")
    app.drain()
    assert seen[-1].kind == "cancelled" and not app.engine.busy
    assert app.controller.current("influence") is None
    app.controller.submit("influence", dataclasses.replace(request, size=50))
    app.drain()
    assert seen[-1].kind == "result" and len(seen[-1].payload.indices) == 50


def test_changing_the_model_cancels_jobs_and_undo_restores_it_bit_exactly(app):
    seen = app.listen("influence")
    app.engine.tick_seconds = 0.0
    before = app.state_dict()
    app.controller.submit("influence", InfluenceRequest(app.controller.pair(), size=10000))
    app.drain(ticks=1)
    app.controller.apply_step()
    app.drain()
    assert seen[-1].kind == "cancelled" and seen[-1].payload == "the model changed"
    assert app.state.model.applied_steps == 1
    assert any(not torch.equal(before[k], v) for k, v in app.state_dict().items())
    history = app.controller.current("history")
    assert len(history.probs_o) == 2 and history.lrs == (app.state.lr,)
    app.controller.submit("influence", InfluenceRequest(app.controller.pair(), size=50))
    app.drain()  # a job on the stepped model says so, then undo
    assert seen[-1].kind == "result" and seen[-1].payload.applied_steps == 1
    app.controller.undo_step()
    app.drain()
    assert all(torch.equal(before[k], v) for k, v in app.state_dict().items())
    assert app.state.model.applied_steps == 0 and len(app.controller.current("history").lrs) == 0


def test_the_pair_follows_the_state(app, mnist):
    seen = app.listen("pair")
    app.controller.select(x_u=Example("train", 11), x_o=Example("test", 3), lr=0.2, loss="neg")
    app.drain()
    assert len(seen) == 1  # one refresh for several changes
    assert app.state.y_u == int(mnist.train.y[11])  # y_u follows x_u's label
    r = app.controller.current("pair").request
    assert (r.x_u, r.x_o, r.lr, r.loss) == (Example("train", 11), Example("test", 3), 0.2, "neg")
    app.state.y_u = 7
    app.drain()
    assert app.controller.current("pair").decomposition.y_u == 7


def test_live_decompositions_while_training_are_throttled(app, monkeypatch):
    import ntkviz.app.controller as controller

    now = [0.0]
    app.controller.clock = lambda: now[0]
    monkeypatch.setattr(controller, "LIVE_EVERY", 2)
    monkeypatch.setattr(controller, "LIVE_INTERVAL_S", 1.0)
    steps = []
    app.listen("pair")
    app.controller.on("pair", lambda e: steps.append(e.payload.step) if e.kind == "result" else 0)
    app.controller.start_training(CONFIG)
    while app.state.run_state == "training":
        app.engine.tick()
        now[0] += 0.4  # 0.4 s per tick: a live refresh at most every third tick
        app.handle_events()
    app.drain()
    live = steps[:-1]
    assert live == sorted(live) and all(b - a >= 2 for a, b in itertools.pairwise(live))
    assert steps[-1] == 8 == app.controller.records_received  # and the trained model's at the end
    assert app.controller.current("history").request == app.controller.pair()


def test_a_new_run_asks_before_it_discards_a_model_worth_keeping(mnist, tmp_path):
    asked = []
    answer = [False]
    app = App(mnist, ask=lambda title, text: asked.append(text) or answer[0])
    assert app.controller.start_training(CONFIG)  # fresh weights: nothing to lose
    app.drain()
    assert asked == [] and app.state.run_state == "finished"
    assert not app.controller.start_training(CONFIG)
    assert not app.controller.one_batch(CONFIG)
    assert "trained for 8 steps" in asked[0] and len(asked) == 2
    assert app.state.run_state == "finished" and app.controller.records_received == 8
    path = tmp_path / "m.pt"
    app.send("save_checkpoint", str(path), {})
    app.send("load_checkpoint", str(path))
    app.drain()
    assert not app.controller.start_training(CONFIG)
    assert f"loaded from {path}" in asked[-1]
    answer[0] = True
    assert app.controller.one_batch(CONFIG)
    app.drain()
    assert app.state.run_state == "paused" and app.controller.records_received == 1
    app.controller.apply_step()
    app.drain()
    answer[0] = False
    assert not app.controller.start_training(CONFIG) and "trained for 1 steps" in asked[-1]
    invalid = dataclasses.replace(CONFIG, lr=-1.0)
    n = len(asked)
    assert not app.controller.start_training(invalid)
    assert len(asked) == n and app.errors[-1][0] == "Invalid settings"


def test_session_parts_are_merged_and_restored(mnist, tmp_path):
    app = App(mnist)
    app.controller.one_batch(CONFIG)
    app.drain()
    app.controller.select(x_o=Example("test", 5), lr=0.3)
    app.controller.apply_step()
    app.drain()
    app.controller.add_session_part("extra", lambda: {"n": 3, "xs": [1.5, 2.5]}, None)
    path = tmp_path / "s.ntks"
    saved = app.listen("session_saved")
    app.controller.save_session(str(path))
    app.drain()
    assert saved and saved[0].payload == str(path)

    other = App(mnist)
    restored = []
    other.controller.add_session_part("extra", lambda: {}, restored.append)
    other.controller.open_session(str(path))
    other.drain()
    assert restored == [{"n": 3, "xs": [1.5, 2.5]}]
    assert other.state.x_o == Example("test", 5) and other.state.lr == 0.3
    assert other.state.model.applied_steps == 1 and other.state.model.step == 1
    for k, v in app.state_dict().items():
        assert torch.equal(other.engine.model.state_dict()[k], v)
    np.testing.assert_array_equal(
        other.controller.current("history").probs_o, app.controller.current("history").probs_o
    )
    # a part that cannot be restored is reported; the rest of the session still is
    other.controller.add_session_part("extra", lambda: {}, lambda part: part["missing"])
    other.controller.open_session(str(path))
    other.drain()
    assert other.errors[-1][0] == "Session part not restored" and "extra" in other.errors[-1][1]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.update(y_u=10), "y_u must be an int class ≥ 0 below 10"),
        (lambda p: p.update(lr=None), "η must be a finite real number"),
        (lambda p: p.update(x_o=["test", 10**9]), "is not an example of mnist"),
        (lambda p: p.update(x_u="train 3"), "x_u must be"),
        (lambda p: p.update(loss="mse"), "loss must be 'ce' or 'neg'"),
    ],
)
def test_a_session_with_a_damaged_selection_is_refused_and_changes_nothing(
    mnist, tmp_path, damage, message
):
    from ntkviz.session import load_session, save_session

    app = App(mnist)
    path = tmp_path / "s.ntks"
    app.controller.save_session(str(path))
    app.drain()
    session = load_session(path)
    damage(session.selection["pair"])
    save_session(path, session)
    before = {k: v.clone() for k, v in app.engine.model.state_dict().items()}
    app.controller.select(lr=0.25)
    app.controller.open_session(str(path))
    app.drain()
    assert app.errors[-1][0] == "Session not readable" and message in app.errors[-1][1]
    assert app.state.lr == 0.25
    for k, v in app.engine.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_periodic_jobs_run_at_the_start_and_every_n_steps(app):
    records = []
    app.controller.on(
        "kernel_maps", lambda e: records.append(e.payload.step) if e.kind == "result" else 0
    )
    app.controller.set_periodic("kernel_maps", KernelMapRequest(2), 3, supersede=True)
    app.controller.start_training(CONFIG)
    app.drain()
    assert records == [0, 3, 6]  # 8 steps; the new run starts the schedule over
    app.controller.set_periodic("kernel_maps", None, 3)
    app.controller.start_training(CONFIG)
    app.drain()
    assert records == [0, 3, 6]


def test_a_batch_after_steps_by_hand_keeps_them_in_the_training_history(app):
    """As on Resume: the batch trains on from the stepped model, and Undo cannot take the hand
    step (and with it the batch) back."""
    app.controller.one_batch(CONFIG)
    app.drain()
    app.controller.apply_step()
    app.drain()
    assert app.state.model.applied_steps == 1
    app.controller.one_batch(CONFIG)
    app.drain()
    assert app.state.model.applied_steps == 0 and app.state.model.step == 2
    trained = app.state_dict()
    app.controller.undo_step()
    app.drain()
    assert all(torch.equal(v, trained[k]) for k, v in app.state_dict().items())


def test_a_step_by_hand_while_training_takes_the_runs_eta_of_that_moment(mnist):
    """η that follows the run's schedule (as the step-through does with "this run's optimizer")
    is the schedule's next η when Apply pauses a running run, not the η of the last pause."""
    from ntkviz.training import scheduled_lr

    config = dataclasses.replace(CONFIG, epochs=4, lr=0.05)  # 16 steps
    app = App(mnist, config)
    app.state.events.model.connect(
        lambda info: info is not None and setattr(app.state, "lr", info.run_lr)
    )  # the view's rule, with the run's optimizer chosen
    app.state.step_kind = "optimizer"
    app.controller.start_training(config)
    app.handle_events()
    app.engine.tick_seconds = 0.0  # a batch a tick
    while app.engine.step < 10:
        app.engine.tick()
        app.handle_events()
    step = app.engine.step
    assert app.state.lr == 0.05  # the view still holds the η of the run's start
    app.controller.apply_step()
    app.drain(ticks=0)
    assert app.engine.applied_lrs == [scheduled_lr(0.05, step + 1, 16)]
    assert app.state.lr == app.engine.applied_lrs[0]


def test_periodic_jobs_follow_single_batches_and_a_new_period(app):
    records = []
    app.controller.on(
        "kernel_maps", lambda e: records.append(e.payload.step) if e.kind == "result" else 0
    )
    app.controller.set_periodic("kernel_maps", KernelMapRequest(2), 2, supersede=True)
    for _ in range(2):  # a run one batch at a time: its maps too, each as soon as it is due
        app.controller.one_batch(CONFIG)
        app.drain()
    assert records == [0, 2]
    app.controller.one_batch(CONFIG)
    app.drain()
    assert records == [0, 2]
    app.controller.set_periodic("kernel_maps", KernelMapRequest(2), 4)  # after the last, at 2
    app.controller.resume()
    app.drain()
    assert records == [0, 2, 6]  # 8 steps


def test_engine_errors_are_reported_not_raised(app):
    app.send("apply_step", dataclasses.replace(app.controller.pair(), x_u=Example("train", 10**6)))
    app.drain()
    assert app.errors[-1][0] == "Error" and "out of range" in app.errors[-1][1]
    app.controller.submit(
        "influence", InfluenceRequest(app.controller.pair(), size=10, norm_size=0)
    )
    app.send("open_session", "/nonexistent/file.ntks")
    app.drain()
    assert app.errors[-1][0] == "Session not readable"
    assert app.controller.current("influence") is not None  # the engine keeps working


# ---------------------------------------------------------------------------- the user's model
def with_user_model(app, label="mine"):
    """Give the engine a model of the user's (an MLP of its own, outside the registry) and make
    the registry's LeNet current."""
    from torch import nn

    from ntkviz.app.engine import UserModel

    def build():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.Tanh(), nn.Linear(16, 10))

    app.engine.user_model = UserModel(label, build)
    app.engine.emit_info()
    app.drain()
    return label


def _rgb(name, h, w):
    from ntkviz.data import ImageDataset, Split

    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8)
        return Split(images, images.permute(0, 3, 1, 2).float() / 255, torch.arange(n) % 3)

    return ImageDataset(name, split(30, 0), split(12, 1), (0.5,) * 3, (0.25,) * 3,
                        ("a", "b", "c"), None)  # fmt: skip


def test_a_model_that_does_not_fit_new_data_changes_nothing(app, mnist, tmp_path):
    number, data = app.state.model.number, app.engine.data
    app.send("open_dataset", _rgb("wide", 16, 24))  # not square: no registry model takes it
    app.drain()
    assert app.errors[-1][0] == "Model not usable" and "square" in app.errors[-1][1]
    assert app.engine.data is data and app.state.model.number == number
    app.send("open_dataset", _rgb("square", 16, 16))
    app.drain()
    assert app.engine.data.name == "square" and app.state.model.name == "lenet"
    number = app.state.model.number
    # the user's model takes 1×28×28: chosen for this data it is refused at Start, LeNet kept
    label = with_user_model(app)
    app.controller.start_training(dataclasses.replace(CONFIG, model=label))
    app.drain()
    assert app.errors[-1][0] == "Model not usable" and "mine" in app.errors[-1][1]
    assert app.state.model.number == number and app.state.model.name == "lenet"
    # a session of the registry's LeNet opens, although the user's model cannot take this data
    app.controller.save_session(str(tmp_path / "lenet.ntks"))
    app.drain()
    errors = len(app.errors)
    app.controller.open_session(str(tmp_path / "lenet.ntks"))
    app.drain()
    assert len(app.errors) == errors, app.errors[-1]
    assert app.state.model.number != number and app.state.model.name == "lenet"


class Attending(torch.nn.Module):
    """Attention over the image's rows with a learned position embedding (a bare Parameter)."""

    def __init__(self):
        super().__init__()
        self.pos = torch.nn.Parameter(torch.zeros(28, 28))
        self.attn = torch.nn.MultiheadAttention(28, 2, batch_first=True)
        self.head = torch.nn.Linear(28, 10)

    def forward(self, x):
        rows = x[:, 0] + self.pos
        return self.head(self.attn(rows, rows, rows)[0].mean(1))


def test_fresh_weights_reset_attention_and_name_what_they_cannot_reset(app):
    # nn.MultiheadAttention resets through _reset_parameters (in_proj kept the given values),
    # and a bare Parameter has no reset at all: Start says which keep their values
    from ntkviz.app.engine import UserModel, not_reset, reinitialised

    given = Attending()
    with torch.no_grad():
        for p in given.parameters():
            p.fill_(0.5)
    fresh = reinitialised(given)
    kept = [
        n for (n, a), b in zip(given.named_parameters(), fresh.parameters()) if torch.equal(a, b)
    ]
    assert kept == ["pos"] == not_reset(given)
    note = "fresh weights: pos keep their given values"
    app.engine.user_model = UserModel("Attending", lambda: reinitialised(given), note)
    messages = app.listen("message")
    app.controller.start_training(dataclasses.replace(CONFIG, model="Attending"))
    app.drain()
    assert app.state.model.name == "Attending" and [e.payload for e in messages] == [note]


def test_a_model_given_from_python_that_does_not_fit_leaves_the_app_usable(mnist):
    # ntkviz.show(model=...) with a model that returns a tuple: the message, then "loading…"
    # for good, with Start disabled
    from torch import nn

    from ntkviz.app.engine import UserModel, reinitialised

    given = nn.Sequential(nn.Flatten(), nn.Linear(784, 7))  # 7 logits for MNIST's 10 classes
    user = UserModel("Sequential", lambda: reinitialised(given))
    app = App(mnist, dataclasses.replace(CONFIG, model="Sequential"), user_model=user, model=given)
    assert app.state.run_state == "ready" and app.state.model.name == "lenet"
    (title, message), *_ = app.errors
    assert title == "Model not usable" and "returns 7 logits per example" in message
    assert "opened with a fresh lenet instead" in message
    assert app.controller.start_training(CONFIG)
    app.drain()
    assert app.state.run_state == "finished" and len(app.errors) == 1


def test_a_start_the_engine_refuses_leaves_the_run_and_its_curves(app):
    # "new_run" (which clears the curves) went out when Start was pressed, before the engine
    # built and checked the model: a refused model wiped the curves of the run still held
    from torch import nn

    from ntkviz.app.engine import UserModel

    app.controller.start_training(CONFIG)
    app.drain()
    records, number = app.controller.records_received, app.state.model.number
    assert records > 0
    new_runs = app.listen("new_run")
    seven = UserModel("seven", lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 7)))
    app.engine.user_model = seven
    assert app.controller.start_training(dataclasses.replace(CONFIG, model="seven"))
    app.drain()
    assert app.errors[-1][0] == "Model not usable" and "returns 7 logits" in app.errors[-1][1]
    assert new_runs == [] and app.controller.records_received == records
    assert app.state.model.number == number
    app.controller.start_training(CONFIG)  # a run that starts clears them, once
    app.drain()
    assert len(new_runs) == 1 and new_runs[0].payload.offset == 0


def test_a_given_model_that_does_not_fit_data_no_registry_model_takes_leaves_no_model():
    # non-square images: LeNet cannot stand in, and the app hung at "loading…"
    from torch import nn

    from ntkviz.app.engine import UserModel, reinitialised

    given = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 24, 7))  # 7 logits for 3 classes
    user = UserModel("Sequential", lambda: reinitialised(given))
    config = dataclasses.replace(CONFIG, model="Sequential")
    app = App(_rgb("wide", 16, 24), config, user_model=user, model=given)
    assert app.state.run_state == "no model" and app.state.model is None
    (title, message), *rest = app.errors
    assert title == "Model not usable" and not rest, app.errors
    assert (
        "returns 7 logits per example" in message and "No registry model takes 3×16×24" in message
    )
    app.send("open_dataset", _rgb("square", 16, 16), None, False, "lenet")  # LeNet takes it
    app.drain()
    assert app.state.run_state == "ready" and app.state.model.name == "lenet", app.errors
    assert app.controller.start_training(CONFIG)
    app.drain()
    assert app.state.run_state == "finished" and len(app.errors) == 1


def test_the_users_checkpoint_and_session_open_while_another_model_is_current(app, tmp_path):
    label = with_user_model(app)
    app.controller.start_training(dataclasses.replace(CONFIG, model=label))
    app.drain()
    assert app.state.model.name == label
    saved = app.state_dict()
    for name in ("save_checkpoint", "save_session"):
        getattr(app.controller, name)(str(tmp_path / name))
        app.drain()
    for name, opener in (("save_checkpoint", "open_checkpoint"), ("save_session", "open_session")):
        app.controller.start_training(CONFIG)  # the registry's LeNet is current again
        app.drain()
        assert app.state.model.name == "lenet"
        getattr(app.controller, opener)(str(tmp_path / name))
        app.drain()
        assert app.state.model.name == label, app.errors
        for k, v in app.state_dict().items():
            assert torch.equal(v, saved[k]), k


def test_a_session_keeps_the_runs_optimizer(app, tmp_path):
    """Its momentum comes back: "this run's optimizer" previews the same step after reopening."""
    app.controller.one_batch(CONFIG)
    app.drain()
    app.controller.one_batch(CONFIG)
    app.drain()
    app.state.step_kind = "optimizer"
    app.drain()
    preview = app.controller.results["pair"].decomposition
    before = copy.deepcopy(app.engine.optimizer.state_dict())
    assert before["state"]  # a momentum buffer per parameter
    path = str(tmp_path / "s.ntks")
    app.controller.save_session(path)
    app.drain()
    app.controller.start_training(CONFIG)  # another run, another optimizer
    app.drain()
    app.controller.open_session(path)
    app.drain()
    after = app.engine.optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for k, state in before["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in state.items())
    app.state.step_kind = "optimizer"
    app.drain()
    again = app.controller.results["pair"].decomposition
    assert np.array_equal(again.momentum, preview.momentum) and np.any(preview.momentum)
    assert np.array_equal(again.actual, preview.actual)
    current = app.state_dict()
    for damage, message in (
        (lambda o: o["param_groups"][0].__setitem__("params", [0]), "not the state of this run's"),
        (lambda o: o["param_groups"][0].__setitem__("params", [0] * 10), "not the state of"),
        (lambda o: o["state"]["0"].__setitem__("momentum_buffer", torch.zeros(3)), "is a (3,)"),
        (lambda o: o["state"]["0"].__setitem__("momentum_buffer", torch.tensor(1.0)), "is a ()"),
        (lambda o: o["state"]["0"].__setitem__("momentum_buffer", [1.0]), "is [1.0], not"),
        (
            lambda o: o["state"]["0"].__setitem__(
                "momentum_buffer", o["state"]["0"]["momentum_buffer"].double()
            ),
            "torch.float64 tensor, not finite",
        ),
        (lambda o: o["param_groups"][0].pop("momentum"), "not the state of this run's"),
        (lambda o: o["param_groups"][0].__setitem__("lr", "fast"), "its optimizer's lr is 'fast'"),
        (lambda o: o["param_groups"][0].__setitem__("lr", -0.1), "its optimizer's lr is -0.1"),
        (lambda o: o["param_groups"][0].__setitem__("momentum", 1.5), "momentum is 1.5"),
        (lambda o: o["state"]["0"].__setitem__("step", torch.tensor(1.0)), "has step (SGD holds"),
    ):
        payload = torch.load(path, weights_only=True)  # another optimizer's state: refused
        damage(payload["optimizer"])
        torch.save(payload, tmp_path / "bad.ntks")
        app.controller.open_session(str(tmp_path / "bad.ntks"))
        app.drain()
        assert "its optimizer's state is damaged" in app.errors[-1][1]
        assert message in app.errors[-1][1], app.errors[-1][1]
        assert all(torch.equal(v, current[k]) for k, v in app.state_dict().items())


def test_undo_after_reopening_a_session_restores_the_optimizer_too(app, tmp_path):
    for _ in range(2):
        app.controller.one_batch(CONFIG)
        app.drain()
    app.state.step_kind = "optimizer"
    app.drain()
    before = copy.deepcopy(app.engine.optimizer.state_dict())
    weights = app.state_dict()
    app.controller.apply_step()  # the run's optimizer: its momentum moves on
    app.drain()
    path = str(tmp_path / "s.ntks")
    app.controller.save_session(path)
    app.drain()
    app.controller.start_training(CONFIG)
    app.drain()
    app.controller.open_session(path)
    app.drain()
    assert app.state.model.applied_steps == 1, app.errors
    app.controller.undo_step()
    app.drain()
    after = app.engine.optimizer.state_dict()
    for k, state in before["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in state.items())
    assert all(torch.equal(v, weights[k]) for k, v in app.state_dict().items())

    # A history entry whose optimizer snapshot does not fit is refused, nothing changed; weights
    # stored in another float dtype are taken in the model's (the history job then works).
    current = app.state_dict()
    payload = torch.load(path, weights_only=True)
    payload["history"][0]["optimizer_before"]["state"][0]["momentum_buffer"] = torch.tensor(1.0)
    torch.save(payload, tmp_path / "bad.ntks")
    app.controller.open_session(str(tmp_path / "bad.ntks"))
    app.drain()
    assert "history entry 0 is damaged" in app.errors[-1][1], app.errors[-1][1]
    assert "momentum_buffer of parameter 0 is a ()" in app.errors[-1][1]
    assert all(torch.equal(v, current[k]) for k, v in app.state_dict().items())
    payload = torch.load(path, weights_only=True)
    before = payload["history"][0]["state_before"]
    payload["history"][0]["state_before"] = {k: v.double() for k, v in before.items()}
    torch.save(payload, tmp_path / "f64.ntks")
    errors = len(app.errors)
    app.controller.open_session(str(tmp_path / "f64.ntks"))
    app.drain()
    assert len(app.errors) == errors and app.state.model.applied_steps == 1
    assert "history" in app.controller.results  # the trajectory over the applied step
    app.controller.undo_step()
    app.drain()
    assert len(app.errors) == errors
    restored = app.state_dict()
    assert all(v.dtype == torch.float32 for v in restored.values())
    assert all(torch.equal(v, before[k]) for k, v in restored.items())


def test_a_session_watching_examples_the_data_lacks_is_refused(app, tmp_path):
    from ntkviz.session import load_session

    path = tmp_path / "s.ntks"
    app.controller.add_session_part("watch_ranking", lambda: {"watched": [["test", 10**6]]}, None)
    app.controller.save_session(str(path))
    app.drain()
    assert load_session(path).selection["watch_ranking"] == {"watched": [["test", 10**6]]}
    app.controller.open_session(str(path))
    app.drain()
    assert app.errors[-1][0] == "Session not readable" and "test[1000000]" in app.errors[-1][1]


def test_a_session_on_data_given_from_python_is_refused_on_other_data(mnist, tmp_path):
    from ntkviz.data import as_image_dataset

    pairs = [(mnist.train.x[k], int(mnist.train.y[k])) for k in range(300)]
    tests = [(mnist.test.x[k], int(mnist.test.y[k])) for k in range(100)]
    mine = App(as_image_dataset((pairs, tests), name="mydigits"))
    path = str(tmp_path / "mine.ntks")
    mine.controller.save_session(path)
    mine.drain()
    again = App(as_image_dataset((pairs, tests), name="mydigits"))  # the same data: it opens
    again.controller.open_session(path)
    again.drain()
    assert again.errors == [] and again.state.dataset.name == "mydigits"
    app = App(mnist)
    current = app.state_dict()
    app.controller.open_session(path)
    app.drain()
    assert app.errors[-1][0] == "Session not readable", app.errors
    assert (
        "made on data given from Python (mydigits), not on the open data (mnist)"
        in (app.errors[-1][1])
    )
    assert all(torch.equal(v, current[k]) for k, v in app.state_dict().items())


def test_a_session_with_a_negative_step_size_is_refused(app, tmp_path):
    path = tmp_path / "s.ntks"
    app.controller.save_session(str(path))
    app.drain()
    payload = torch.load(path, weights_only=True)
    payload["selection"]["pair"]["lr"] = -0.5
    torch.save(payload, path)
    app.controller.open_session(str(path))
    app.drain()
    assert app.errors[-1][0] == "Session not readable", app.errors
    assert "η must be ≥ 0, got -0.5" in app.errors[-1][1]


def test_a_session_with_a_damaged_adam_state_is_refused(mnist, tmp_path):
    adam = dataclasses.replace(CONFIG, optimizer="adam", lr=1e-3)
    app = App(mnist, adam)
    app.controller.one_batch(adam)
    app.drain()
    app.state.step_kind = "optimizer"
    app.drain()
    app.controller.apply_step()  # an undo snapshot of Adam's state
    app.drain()
    path = tmp_path / "s.ntks"
    app.controller.save_session(str(path))
    app.drain()
    app.controller.open_session(str(path))  # as saved: it opens
    app.drain()
    assert app.errors == [] and app.state.model.applied_steps == 1
    current = app.state_dict()
    for damage, message in (
        (lambda p: p["optimizer"]["state"]["0"].pop("exp_avg_sq"), "lacks exp_avg_sq (Adam"),
        (lambda p: p["optimizer"]["param_groups"][0].__setitem__("betas", (1.5, 0.999)), "betas"),
        (lambda p: p["optimizer"]["param_groups"][0].__setitem__("eps", -1.0), "eps is -1.0"),
        (
            lambda p: p["history"][0]["optimizer_before"]["state"][0].__setitem__("step", 5),
            "step of parameter 0 is 5, not a 0-d float tensor",
        ),
        (
            lambda p: p["history"][0]["optimizer_before"]["state"][0].pop("exp_avg"),
            "history entry 0 is damaged: its optimizer's state of parameter 0 lacks exp_avg",
        ),
        (
            lambda p: p["history"][0]["optimizer_before"]["groups"][0].__setitem__("lr", -1.0),
            "lr is -1.0",
        ),
    ):
        payload = torch.load(path, weights_only=True)
        damage(payload)
        torch.save(payload, tmp_path / "bad.ntks")
        app.controller.open_session(str(tmp_path / "bad.ntks"))
        app.drain()
        assert app.errors[-1][0] == "Session not readable", app.errors
        assert message in app.errors[-1][1], app.errors[-1][1]
        assert all(torch.equal(v, current[k]) for k, v in app.state_dict().items())


def test_the_squeeze_lab_leaves_out_what_diverges_and_says_so(app, monkeypatch):
    """The η sweep goes to 10·η and the survey steps 150 images: a step that diverges there is
    left out with a note, not the whole result lost."""
    import ntkviz.analysis as analysis
    from ntkviz.errors import StepDiverged

    real = analysis.squeeze_steps
    survey, largest = set(), [float("inf")]

    def steps(model, x, y, lr, n=1, loss="neg"):
        if lr > largest[0] or (x.ndim == 3 and float(x.sum()) in survey):
            raise StepDiverged(lr)
        return real(model, x, y, lr, n, loss)

    monkeypatch.setattr(analysis, "squeeze_steps", steps)
    test = app.engine.data.split("test")
    pair = app.controller.pair()
    request = SqueezeRequest(pair.x_u, pair.y_u, 0.1, 1)

    def result():
        gen = request.run(app.engine)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                return stop.value

    clean = result()
    assert clean.left_out == "" and len(clean.sweep_lrs) == 7
    diverging = clean.survey_indices[[3, 40]]
    survey.update(float(test.x[i].double().sum()) for i in diverging)
    largest[0] = 0.5
    partial = result()
    np.testing.assert_array_equal(partial.sweep_lrs, clean.sweep_lrs[:6])  # η = 10·0.1 is out
    np.testing.assert_array_equal(partial.sweep_mass, clean.sweep_mass[:6])
    kept = ~np.isin(clean.survey_indices, diverging)
    np.testing.assert_array_equal(partial.survey_indices, clean.survey_indices[kept])
    np.testing.assert_array_equal(partial.survey.gained, clean.survey.gained[kept])
    assert partial.left_out == (
        "the sweep's η = 1 and 2 of the 150 survey images: the step diverges, left out"
    )


def test_a_result_finished_before_the_engine_saw_the_cancel_is_dropped(app):
    # the engine handles a cancel between slices: a job that ended in the slice running when
    # Cancel was pressed sent its result first, and that result was shown
    seen = app.listen("layers")
    request = requests(app)["layers"]
    app.controller.submit("layers", request)
    app.drain()  # the job ran to its result
    result = [e for e in seen if e.kind == "result"]
    assert len(result) == 1
    seen.clear()
    app.controller.results.pop("layers")
    generation = app.controller.generation["layers"]
    app.controller.cancel("layers")  # pressed while a result was on its way
    app.controller.handle(JobEvent("layers", generation, "result", result[0].payload))
    assert seen == [] and app.controller.current("layers") is None
    app.drain()  # the engine answers the cancel though nothing ran any more
    assert [(e.kind, e.payload) for e in seen] == [("cancelled", "nothing was running")]
    # results after the engine's answer count again, periodic ones of the same generation too
    app.controller.submit("layers", request, supersede=False)
    app.drain()
    assert seen[-1].kind == "result" and app.controller.current("layers") is seen[-1].payload


def test_a_new_request_after_a_cancel_is_not_held_back_by_it(app):
    seen = app.listen("layers")
    app.controller.cancel("layers")
    app.controller.submit("layers", requests(app)["layers"])  # before the engine's answer
    app.drain()
    assert [e.kind for e in seen] == ["result"]  # the answer (older generation) was dropped


def test_the_spectrum_job_yields_while_it_computes_and_a_cancel_stops_it(app, mnist):
    # it was one slice: N = 500 held Cancel, pause and closing for 13 s
    from ntkviz.analysis import ntk_spectrum

    seen = app.listen("spectrum")
    app.engine.tick_seconds = 0.0  # one item per tick
    app.controller.submit("spectrum", SpectrumRequest(40))
    ticks = 0
    while app.engine.busy:
        app.drain(ticks=1)
        ticks += 1
    result = app.controller.current("spectrum")
    assert ticks >= 8 and seen[-1].kind == "result"
    x = mnist.test.x[result.indices.copy()]
    core = ntk_spectrum(app.engine.model, x)
    np.testing.assert_allclose(result.eigenvalues, core, rtol=1e-6, atol=1e-6 * core[0])
    app.controller.submit("spectrum", SpectrumRequest(40))
    app.drain(ticks=2)
    assert app.engine.busy
    app.controller.cancel("spectrum")
    app.drain()
    assert seen[-1].kind == "cancelled" and not app.engine.busy


def test_work_on_a_helper_thread_lets_the_job_yield_and_returns_its_result_or_error():
    import threading

    from ntkviz.app.jobs import JobRunner, on_helper_thread

    gate = threading.Event()

    def job(fn):
        return (yield from on_helper_thread(fn, progress=Progress(0, 1)))

    def fail():
        raise ValueError("no such spectrum")

    events = []
    runner = JobRunner(events.append, progress_interval=0.0)
    runner.start("f", 1, job(lambda: gate.wait(30) and 42))
    for _ in range(3):
        runner.step(0)
    assert runner.busy and [e.kind for e in events] == ["progress"] * 3  # yielded meanwhile
    gate.set()
    while runner.busy:
        runner.step(0)
    assert (events[-1].kind, events[-1].payload) == ("result", 42)
    runner.start("f", 2, job(fail))
    while runner.busy:
        runner.step(0)
    assert events[-1].kind == "error" and events[-1].payload[1] == "no such spectrum"


def test_a_session_saved_while_training_holds_the_curves_of_its_weights(app, tmp_path):
    # the parts were taken at the click, the weights when the engine got to it, steps later
    from ntkviz.session import load_session

    config = dataclasses.replace(CONFIG, epochs=20)
    app.controller.add_session_part(
        "probe", lambda: {"records": app.controller.trained_steps}, lambda part: None
    )
    app.controller.start_training(config)
    while app.controller.trained_steps == 0:
        app.engine.tick()
        app.handle_events()
    assert app.state.run_state == "training"
    app.engine.tick()  # steps whose records are still on their way when Save is clicked
    path = tmp_path / "mid.ntks"
    app.controller.save_session(str(path))
    app.handle_events()
    assert app.state.run_state == "training"  # it resumed after saving
    session = load_session(path)
    assert session.step > 0 and session.selection["probe"]["records"] == session.step
    app.controller.stop()
    app.drain()


def test_a_watch_detail_of_a_step_not_kept_says_which_steps_are(app):
    from ntkviz.app.features.watch import WatchDetailRequest, WatchObserver

    app.send("set_observer", "watch", WatchObserver((Example("test", 0), Example("test", 1))))
    for _ in range(2):
        app.controller.one_batch(CONFIG)
        app.drain()
    seen = app.listen("watch_detail")
    app.controller.submit("watch_detail", WatchDetailRequest(2))
    app.drain()
    assert seen[-1].kind == "result" and seen[-1].payload.step == 2
    app.controller.submit("watch_detail", WatchDetailRequest(40))  # e.g. of an earlier run
    app.drain()
    title, message = app.errors[-1]
    assert title == "Watch detail failed"
    assert "step 40 is not among the steps this run's account keeps in detail" in message
    assert "(steps 1–2; the last" in message


def test_a_cancel_while_an_older_request_runs_still_frees_the_feature(app):
    # the engine answered with the running job's (older) generation, which the controller
    # dropped: the feature stayed "cancelling" and dropped every later result
    seen = app.listen("influence")
    request = InfluenceRequest(app.controller.pair(), size=10000)
    app.engine.tick_seconds = 0.0
    app.controller.submit("influence", request)
    app.drain(ticks=1)
    app.controller.set_periodic("influence", None, 1, supersede=True)  # a newer generation
    app.controller.cancel("influence")
    app.drain()
    assert seen[-1].kind == "cancelled" and not app.engine.busy
    app.controller.submit("influence", dataclasses.replace(request, size=20), supersede=False)
    app.drain()
    assert seen[-1].kind == "result" and app.controller.current("influence") is seen[-1].payload


def train_until_records(app, config):
    app.controller.start_training(config)
    while app.controller.trained_steps == 0:
        app.engine.tick()
        app.handle_events()
    assert app.state.run_state == "training"


@pytest.mark.parametrize("then", ["pause", "apply_step", "stop"])
def test_a_save_while_training_leaves_the_run_as_the_user_left_it(app, tmp_path, then):
    # the run resumed after the save whatever the user did meanwhile: a Pause was undone, and a
    # step applied after Save became part of the run (its undo lost)
    train_until_records(app, dataclasses.replace(CONFIG, epochs=20))
    app.controller.save_session(str(tmp_path / "s.ntks"))
    getattr(app.controller, then)()
    app.drain()
    assert (tmp_path / "s.ntks").exists()
    assert app.state.run_state == ("stopped" if then == "stop" else "paused")
    assert not app.engine._running
    if then == "apply_step":
        assert len(app.engine.undo_stack) == 1


def test_a_pause_before_a_save_while_training_is_kept(app, tmp_path):
    train_until_records(app, dataclasses.replace(CONFIG, epochs=20))
    app.controller.pause()  # its answer not yet in: the state still says training
    app.controller.save_session(str(tmp_path / "s.ntks"))
    app.drain()
    assert (tmp_path / "s.ntks").exists() and app.state.run_state == "paused"


def test_two_saves_while_training_both_write_and_the_run_goes_on(app, tmp_path):
    train_until_records(app, dataclasses.replace(CONFIG, epochs=20))
    saved = app.listen("session_saved")
    for name in ("1.ntks", "2.ntks"):
        app.controller.save_session(str(tmp_path / name))
    app.handle_events()
    assert [e.payload for e in saved] == [str(tmp_path / n) for n in ("1.ntks", "2.ntks")]
    assert app.state.run_state == "training"
    app.controller.stop()
    app.drain()


def test_helper_threads_of_one_kind_do_not_pile_up():
    import threading

    from ntkviz.app.jobs import on_helper_thread

    gate = threading.Event()

    def slow():
        gate.wait(30)
        return 1

    first = on_helper_thread(slow, progress=Progress(0, 1))
    next(first)
    first.close()  # cancelled: its call goes on
    second = on_helper_thread(slow, progress=Progress(0, 1))
    for _ in range(3):
        next(second)  # waits for the first call, yielding
    helpers = [t for t in threading.enumerate() if t.name == "ntkviz-helper"]
    assert len(helpers) == 1
    gate.set()
    with pytest.raises(StopIteration) as stop:
        while True:
            next(second)
    assert stop.value.value == 1


def test_the_lineage_names_the_models_state_apart_from_training_steps(app):
    # the probe tabs' "the model has moved since" compared counts: an undone step replaced by
    # another, or applied steps taken into the run, looked like the state they left
    engine = app.engine
    app.controller.one_batch(CONFIG)
    app.drain()
    base = engine.lineage
    app.controller.apply_step()
    app.drain()
    first = engine.lineage
    app.controller.undo_step()
    app.drain()
    assert engine.lineage == base and app.state.model.lineage == base
    app.controller.select(lr=0.5)
    app.controller.apply_step()
    app.drain()
    assert engine.lineage not in (base, first) and len(engine.lineage) == len(first)
    app.controller.reset_steps()
    app.drain()
    assert engine.lineage == base
    app.controller.apply_step()
    app.drain()
    app.controller.resume()  # the applied step becomes part of the run: a new base
    app.controller.pause()
    app.drain()
    assert engine.lineage != base and len(engine.lineage) == len(base)
    assert app.state.model.lineage == engine.lineage


def test_the_engine_stops_after_the_work_on_its_helper_threads(app):
    # a process that ended while the spectrum's eigen-decomposition ran was aborted (exit 134)
    import threading

    from ntkviz.app.jobs import on_helper_thread

    release = threading.Event()
    threading.Timer(0.3, release.set).start()
    job = on_helper_thread(lambda: release.wait(30), progress=Progress(0, 1))
    next(job)
    job.close()  # cancelled: the call goes on
    helpers = [t for t in threading.enumerate() if t.name == "ntkviz-helper"]
    assert helpers and all(t.is_alive() for t in helpers)
    app.engine.shutdown()
    assert release.is_set() and not any(t.is_alive() for t in helpers)


@pytest.mark.parametrize("then", ["one_batch", "start_training"])
def test_a_session_saved_while_training_is_the_model_of_that_moment(app, tmp_path, then):
    # the engine wrote it after the commands that followed: the next batch's weights with the
    # curves before it, or a new run's fresh weights with the old run's curves
    from ntkviz.session import load_session

    train_until_records(app, dataclasses.replace(CONFIG, epochs=20))
    app.controller.add_session_part(
        "probe", lambda: {"records": app.controller.trained_steps}, lambda part: None
    )
    path = tmp_path / "s.ntks"
    app.controller.save_session(str(path))
    held = app.state_dict()  # the engine has taken the model for it (the engine runs in line)
    getattr(app.controller, then)(CONFIG)
    app.engine.tick()  # the engine trains on before the controller takes its answer
    app.drain()
    session = load_session(path)
    assert session.step > 0 and session.selection["probe"]["records"] == session.step
    assert all(torch.equal(session.state_dict[k], v) for k, v in held.items())
    assert not any(torch.equal(session.state_dict[k], v) for k, v in app.state_dict().items()
                   if v.is_floating_point())  # fmt: skip


def test_a_part_that_fails_while_a_held_session_is_written_is_reported(app, tmp_path):
    # the run stayed paused with no message, and the engine kept the model's copy
    train_until_records(app, dataclasses.replace(CONFIG, epochs=20))

    def broken():
        raise KeyError("boom")

    app.controller.add_session_part("broken", broken, lambda part: None)
    path = tmp_path / "s.ntks"
    app.controller.save_session(str(path))
    app.drain(ticks=0)
    assert app.errors and app.errors[-1][0] == "Session not saved" and "boom" in app.errors[-1][1]
    assert not path.exists() and app.engine._held == {} and app.state.run_state == "training"
    app.controller.stop()
    app.drain()
