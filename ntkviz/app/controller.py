"""AppController: turns the user's intent into engine commands and engine events into state.

It lives on the GUI thread and is Qt-free: commands leave through ``send`` (in the app a queued
signal to the engine's thread; in tests the engine itself), events come back through
:meth:`handle`. It keeps one generation number per feature and drops stale job events in one
place; it follows the :class:`~ntkviz.app.state.AppState` (a new pair → a new decomposition),
throttles live decompositions while training, asks (through ``ask``) before a new run discards
a model worth keeping, and merges the features' session state.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from ntkviz.app.features.pair import Decompose, History, PairRequest
from ntkviz.app.jobs import JobEvent
from ntkviz.app.messages import Command, Event
from ntkviz.app.state import AppState, Example

log = logging.getLogger(__name__)

#: Commands that change the run or the model: one of them after a save that paused the run
#: leaves it paused (the user's, not the save's, say).
RUN_COMMANDS = frozenset({
    "start", "continue_training", "one_batch", "pause", "resume", "stop", "apply_step", "undo",
    "reset_steps", "open_session", "load_checkpoint", "open_model", "open_dataset",
})  # fmt: skip

#: Live decompositions while training: at least this many steps and seconds apart.
LIVE_EVERY = 50
LIVE_INTERVAL_S = 1.0


class AppController:
    """``state``: the app's :class:`AppState`; ``send(Command)``: to the engine; ``ask(title,
    text) -> bool``: a yes/no question to the user; ``report(title, message)``: an error for the
    user; ``clock``: seconds (monotonic)."""

    def __init__(
        self,
        state: AppState,
        send: Callable[[Command], None],
        ask: Callable[[str, str], bool] | None = None,
        report: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.state = state
        self._send = send
        self.ask = ask or (lambda title, text: True)
        self.report = report or (lambda title, message: log.warning("%s: %s", title, message))
        self.clock = clock
        self.generation: dict[str, int] = defaultdict(int)
        self._cancelling: set[str] = set()  # features whose cancel the engine has not answered
        self.results: dict[str, object] = {}  #: the newest accepted result of each feature
        self.records_received = 0  #: records of the current run
        self.trained_steps = 0  #: optimizer steps of the model's training run
        self.dirty = False  #: the model changed (trained, stepped) since it was saved or loaded
        self._listeners: dict[str, list[Callable]] = defaultdict(list)
        self._session_parts: dict[str, tuple[Callable[[], dict], Callable[[dict], None]]] = {}
        self._last_live = (0, 0.0)  # step and time of the last live decomposition
        self._hold = 0  # > 0: selection changes in progress, refresh once at the end
        self._saves_on_hold: list[str] = []  # sessions to write once the engine has paused
        self._resume_after_save = False  # the run was training when they were asked for
        for name in ("x_u", "y_u", "x_o", "lr", "loss", "step_kind"):
            getattr(state.events, name).connect(self._pair_changed)
        state.events.x_u.connect(self._x_u_changed)
        state.events.y_u.connect(self._y_u_changed)
        self._y_u_follows = True  # y_u follows x_u's label until another class is chosen
        self._following = False  # _x_u_changed is setting y_u
        self.add_session_part("pair", self._pair_state, self._restore_pair)

    # ------------------------------------------------------------------ plumbing
    def send(self, name: str, *args) -> None:
        """Ask the engine to run its method ``name`` with ``args``."""
        if name in RUN_COMMANDS:  # the user's own say over the run: no resume after a save
            self._resume_after_save = False
        self._send(Command(name, args))

    def on(self, topic: str, callback: Callable) -> None:
        """Call ``callback(event)`` for every accepted event of ``topic``: a feature's name (its
        current :class:`JobEvent` s) or an engine event topic (the :class:`Event`)."""
        self._listeners[topic].append(callback)

    def _dispatch(self, topic: str, event) -> None:
        for callback in list(self._listeners[topic]):
            callback(event)

    def handle(self, event) -> None:
        """Take one event of the engine (on the GUI thread)."""
        if isinstance(event, JobEvent):
            if event.generation != self.generation[event.feature]:
                return  # an answer to a request that has been superseded
            if event.feature in self._cancelling:
                if event.kind != "cancelled":
                    return  # sent before the engine saw the cancel
                self._cancelling.discard(event.feature)
            if event.kind == "result":
                self.results[event.feature] = event.payload
            elif event.kind == "error":
                self.report(*event.payload)
            self._dispatch(event.feature, event)
            return
        getattr(self, f"_on_{event.topic}", lambda payload: None)(event.payload)
        self._dispatch(event.topic, event)

    # ------------------------------------------------------------------ jobs
    def submit(self, feature: str, request, *, supersede: bool = True) -> int:
        """Run ``request`` as ``feature``'s job; its results are accepted until the next request
        that ``supersede`` s it (a request that does not keeps the current generation)."""
        if supersede:
            self._supersede(feature)
        self.send("submit", feature, self.generation[feature], request)
        return self.generation[feature]

    def _supersede(self, feature: str) -> None:
        """A new generation of ``feature``'s requests: everything older is dropped."""
        self.generation[feature] += 1
        self._cancelling.discard(feature)  # its answer is of the older generation

    def cancel(self, feature: str) -> None:
        """Cancel ``feature``'s job: whatever it sends until the engine answers the cancel (a
        result finished before the engine saw it) is dropped."""
        self._cancelling.add(feature)
        self.send("cancel", feature, self.generation[feature])

    def set_periodic(self, feature: str, request, every: int, *, supersede: bool = False) -> None:
        """While training, run ``request`` at once and every ``every`` steps (None: stop)."""
        if supersede:
            self._supersede(feature)
        self.send("set_periodic", feature, self.generation[feature], request, every)

    def current(self, feature: str):
        """The newest accepted result of ``feature`` (None if none yet)."""
        return self.results.get(feature)

    # ------------------------------------------------------------------ the pair
    def pair(self) -> PairRequest:
        return PairRequest.of(self.state)

    @property
    def ready(self) -> bool:
        return self.state.model is not None and self.state.dataset is not None

    def refresh(self, history: bool = True, after_step: bool = False) -> None:
        """Decompose the current pair (and fetch its step history if ``history``)."""
        if not self.ready or self._hold:
            return
        pair = self.pair()
        self.submit("pair", Decompose(pair, after_step))
        if history:
            self.submit("history", History(pair))

    def _pair_changed(self, *args) -> None:
        self.refresh()

    def _follow(self, label: int) -> None:
        """y_u := x_u's label, and it follows x_u from now on."""
        self._y_u_follows, self._following = True, True
        try:
            self.state.y_u = label
        finally:
            self._following = False

    def _y_u_changed(self, y_u: int, *args) -> None:
        """y_u chosen (not by following x_u): another class than x_u's label stays; x_u's own
        label follows x_u again."""
        s = self.state
        if self._following or s.dataset is None:
            return
        x_u = s.x_u
        self._y_u_follows = not 0 <= x_u.index < s.dataset.size(x_u.split) or y_u == s.label(x_u)

    def _x_u_changed(self, example: Example, old: Example) -> None:
        """y_u follows x_u's label, unless the user chose another class for it: that stays."""
        s = self.state
        if s.dataset is None:
            return
        label = s.label(example)
        if self._y_u_follows or not 0 <= s.y_u < len(s.dataset.classes):
            self._follow(label)
        elif s.y_u != label:
            c = s.dataset.classes
            self.message(f"y_u stays {c[s.y_u]} (x_u = {example} is labelled {c[label]})")

    def message(self, text: str) -> None:
        """A short note for the status bar."""
        self._dispatch("message", Event("message", text))

    def select(self, **fields) -> None:
        """Set several fields of the state at once, with one refresh at the end."""
        self._hold += 1
        try:
            for name, value in fields.items():
                setattr(self.state, name, value)
        finally:
            self._hold -= 1
        self.refresh()

    def apply_step(self) -> None:
        self._step_command("apply_step", self.pair())

    def undo_step(self) -> None:
        self._step_command("undo")

    def reset_steps(self) -> None:
        self._step_command("reset_steps")

    def _step_command(self, name: str, *args) -> None:
        if self.ready:
            self.send(name, *args)
            self.refresh(after_step=True)

    # ------------------------------------------------------------------ training
    def start_training(self, config) -> bool:
        """Start a new run with ``config`` from fresh weights (asking first if that discards a
        model worth keeping). False if the settings are invalid or the user said no."""
        if not self._new_run_allowed(config):
            return False
        self.send("start", config)
        return True

    def continue_training(self, config) -> bool:
        """Train the current model further with ``config``'s settings (nothing is discarded)."""
        try:
            config.validate()
        except ValueError as e:
            self.report("Invalid settings", str(e))
            return False
        self._last_live = (self.trained_steps, self.clock())
        self.send("continue_training", config)
        return True

    def one_batch(self, config) -> bool:
        """Train one batch of the paused run, or of a new run with ``config`` (which then
        pauses)."""
        new_run = self.state.run_state not in ("paused", "training")
        if new_run and not self._new_run_allowed(config):
            return False
        self.send("one_batch", config)
        return True

    def pause(self) -> None:
        self.send("pause")

    def resume(self) -> None:
        self.send("resume")

    def stop(self) -> None:
        self.send("stop")

    def _new_run_allowed(self, config) -> bool:
        try:
            config.validate()
        except ValueError as e:
            self.report("Invalid settings", str(e))
            return False
        what = self.unsaved_work()
        return not what or self.ask(
            "Start a new run?",
            f"A new run starts from fresh weights: the current model ({what}) will be "
            "discarded. Save it first with File ▸ Save checkpoint to keep it.",
        )

    def unsaved_changes(self) -> str:
        """What closing would lose ("" if nothing): a model trained or moved by applied steps
        since it was last saved or loaded."""
        info = self.state.model
        if not self.dirty or info is None:
            return ""
        if info.applied_steps:
            return f"trained for {self.trained_steps} steps, moved by {info.applied_steps} applied step(s)"
        return f"trained for {self.trained_steps} steps"

    def unsaved_work(self) -> str:
        """What a new run or a new model would discard ("" if nothing worth keeping): a model
        loaded from a file, trained, or moved by applied steps."""
        info = self.state.model
        if info is None:
            return ""
        if info.source == "given from Python":
            return "as given from Python"
        if info.source not in ("fresh weights", "trained"):
            return f"loaded from {info.source}"
        if self.state.run_state in ("finished", "stopped", "paused"):
            return f"trained for {self.trained_steps} steps"
        if info.applied_steps:
            return f"moved by {info.applied_steps} applied step(s)"
        return ""

    # ------------------------------------------------------------------ engine events
    def _on_info(self, info) -> None:
        self.state.engine = info

    def _on_dataset(self, info) -> None:
        self._hold += 1
        try:
            self.state.dataset = info
            first = {}
            for split, label in (("train", 4), ("test", 9)):
                hits = (info.labels[split] == label).nonzero()[0]
                first[split] = int(hits[0]) if len(hits) else 0
            x_u = Example("train", first["train"])
            self._follow(info.label("train", x_u.index))  # new data: y_u follows x_u's label
            self.state.x_o = Example("test", first["test"])
            self.state.x_u = x_u
        finally:
            self._hold -= 1

    def _on_model(self, info) -> None:
        old = self.state.model
        if old is None or info.number != old.number:
            self.dirty = False  # a new model: fresh, or as loaded from a file
            self.results.clear()
            if old is not None:  # the views forget what they showed of the old one
                self._dispatch("model_replaced", Event("model_replaced", info))
        elif info.applied_steps != old.applied_steps:
            self.dirty = True
        self.state.model = info
        self.trained_steps = info.step
        self.refresh()

    def _on_records(self, records) -> None:
        self.dirty = True
        self.records_received += len(records)
        self.trained_steps = records[-1].step
        if self.state.run_state != "training":  # one batch: show its effect at once
            self.refresh()
            return
        step, now = records[-1].step, self.clock()
        last_step, last_time = self._last_live
        if step - last_step >= LIVE_EVERY and now - last_time >= LIVE_INTERVAL_S:
            self._last_live = (step, now)
            self.refresh(history=False)

    def _on_run_started(self, started) -> None:
        """A run of a fresh model (offset 0) begins: the last run's curves go ("new_run") once
        the engine has built and checked the model, not when Start is pressed (a model it
        refuses leaves the current run as it was)."""
        if started.offset == 0:
            self.records_received = 0
            self._last_live = (0, self.clock())
            self._dispatch("new_run", Event("new_run", started))

    def _on_run_state(self, run_state: str) -> None:
        self.state.run_state = run_state
        if run_state in ("finished", "stopped", "paused") and not self._saves_on_hold:
            self.refresh()

    def _on_session_saved(self, path) -> None:
        self.dirty = False

    _on_checkpoint_saved = _on_session_saved

    def _on_error(self, error) -> None:
        self.report(error.title, error.message)

    def _on_session_opened(self, opened) -> None:
        self._hold += 1
        try:
            for name, part in opened.parts.items():
                if name in self._session_parts:
                    try:
                        self._session_parts[name][1](part)
                    except (KeyError, TypeError, ValueError, IndexError) as e:
                        self.report("Session part not restored", f"{name}: {e}")
        finally:
            self._hold -= 1
        self.refresh()

    # ------------------------------------------------------------------ files
    def add_session_part(
        self, name: str, save: Callable[[], dict], restore: Callable[[dict], None]
    ) -> None:
        """A feature's part of a session: ``save()`` gives plain values, ``restore`` takes them."""
        self._session_parts[name] = (save, restore)

    def save_session(self, path: str) -> None:
        """Save a session to ``path``. While training, the engine pauses the run first and the
        features' parts (the curves) are taken on its answer, when every record of its steps is
        in, so that they end at the saved weights' step; then the run resumes, unless the user
        paused, stopped or stepped it meanwhile."""
        if self.state.run_state == "training":
            if path in self._saves_on_hold:
                return  # asked for already
            if not self._saves_on_hold:
                self._resume_after_save = True
            self._saves_on_hold.append(path)
            self._send(Command("hold_for_save", (path,)))
            return
        self._write_session(path)

    @property
    def saving(self) -> tuple[str, ...]:
        """The sessions asked for while training that are not written yet."""
        return tuple(self._saves_on_hold)

    def _on_held_for_save(self, payload: tuple[str, bool]) -> None:
        """The engine has paused the run and taken the model for the session ``path`` (it was
        training until then if ``was_running``): write it with the parts as they are now, then
        let the run go on unless the user paused, stepped or replaced it meanwhile."""
        path, was_running = payload
        if path not in self._saves_on_hold:
            return
        self._saves_on_hold.remove(path)
        self._write_session(path, held=True)
        resume = was_running and self._resume_after_save
        if resume:
            self._send(Command("resume", ()))
        if not self._saves_on_hold:
            if not resume and self.state.run_state == "paused":
                self.refresh()  # as on any pause
            self._resume_after_save = False

    def _write_session(self, path: str, held: bool = False) -> None:
        try:
            parts = {name: save() for name, (save, _) in self._session_parts.items()}
        except Exception as e:  # a feature's bug: say so, and let the engine drop its copy
            log.error("a part of the session %s could not be taken", path, exc_info=e)
            if held:
                self._send(Command("drop_hold", (path,)))
            self.report("Session not saved", f"{path}: a part of it could not be taken: {e}")
            return
        self.send("save_session", path, parts, held)

    def open_session(self, path: str) -> bool:
        return self._replace_model("Open a session", "open_session", path)

    def save_checkpoint(self, path: str) -> None:
        dataset = self.state.dataset
        self.send("save_checkpoint", path, {"dataset": dataset.name if dataset else None})

    def open_checkpoint(self, path: str) -> bool:
        return self._replace_model("Open a checkpoint", "load_checkpoint", path)

    def open_model(self, spec: str, weights: str | None = None) -> bool:
        """The user's model ``spec`` ("file.py:factory") with optional ``weights``."""
        return self._replace_model("Open a model", "open_model", spec, weights)

    def open_dataset(
        self, source, root: str | None = None, download: bool = False, model: str | None = None
    ) -> bool:
        """Other data (a dataset name with its files in ``root``, a directory of class folders
        or an ``ImageDataset``) with a fresh model of the kind ``model`` (default: the current
        one) for it."""
        return self._replace_model("Open a dataset", "open_dataset", source, root, download, model)

    def _replace_model(self, action: str, command: str, *args) -> bool:
        """Send ``command`` that replaces the model, asking first when that loses unsaved
        work; False if the user said no."""
        what = self.unsaved_changes()
        if what and not self.ask(
            f"{action}?",
            f"This replaces the current model ({what}, not saved). Save it first with File ▸ "
            "Save checkpoint or Save session to keep it.",
        ):
            return False
        self.send(command, *args)
        return True

    def _pair_state(self) -> dict:
        return self.pair().to_dict()

    def _restore_pair(self, part: dict) -> None:
        pair = PairRequest.from_dict(part)
        for example in (pair.x_u, pair.x_o):
            if not 0 <= example.index < self.state.dataset.size(example.split):
                raise ValueError(f"{example} is not an example of this dataset")
        s = self.state
        s.x_u, s.x_o, s.y_u, s.lr, s.loss = pair.x_u, pair.x_o, pair.y_u, pair.lr, pair.loss
        s.step_kind = "optimizer" if pair.optimizer else "sgd"
