"""Engine: the one object that owns dataset, model, optimizer, training run and undo stack.

It is plain Python, driven from one thread (the worker's, in the app; the test's, in tests):
commands arrive through :meth:`handle` (or direct calls), work advances in :meth:`tick` slices of
about ``tick_seconds``, and everything it reports goes out through ``emit`` as immutable
messages (:class:`~ntkviz.app.messages.Event`, :class:`~ntkviz.app.jobs.JobEvent`). Errors in
a command or a tick are reported as "error" events, never raised.

Feature jobs are requests with a ``run(engine)`` generator (see :mod:`ntkviz.app.jobs`); the
engine runs them in its :class:`~ntkviz.app.jobs.JobRunner` and gives them read access through
:meth:`example`, :attr:`model`, :attr:`data`, :attr:`step`. Anything that changes the model
cancels the running jobs first: a job must never see two sets of weights.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ntkviz.accounting import depends_on_mode, optimizer_snapshot
from ntkviz.app.jobs import JobEvent, JobRunner, describe_error, wait_for_helpers
from ntkviz.app.messages import (
    Command,
    DatasetInfo,
    EngineInfo,
    ErrorReport,
    Event,
    KernelPath,
    ModelInfo,
    RunStarted,
    SessionOpened,
)
from ntkviz.arrays import readonly
from ntkviz.checkpoint import load_checkpoint, save_checkpoint
from ntkviz.data import ImageDataset, load_dataset
from ntkviz.errors import (
    CheckpointError,
    DeviceError,
    ModelError,
    NtkvizError,
    StepDiverged,
    TrainingDiverged,
)
from ntkviz.kernel import eval_mode
from ntkviz.models import MODELS, count_parameters
from ntkviz.session import (
    Session,
    SessionError,
    check_snapshot,
    load_optimizer_state,
    load_session,
    save_session,
    session_parts,
    snapshot_payload,
)
from ntkviz.training import (
    TrainConfig,
    make_optimizer,
    resolve_device,
    scheduled_lr,
    train,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserModel:
    """A model of the user's: ``label`` (its factory spec, or its class), ``build()`` a fresh
    one (the factory called again, or :func:`reinitialised` of the model as it was given);
    ``note``: what the user should know of each fresh one (parameters it cannot reset)."""

    label: str
    build: Callable[[], torch.nn.Module]
    note: str = ""

    @classmethod
    def given(cls, model: torch.nn.Module) -> UserModel:
        """The user's model as given from Python (a copy is kept): fresh ones are
        :func:`reinitialised` copies, and the note names what those keep (:func:`not_reset`)."""
        template = copy.deepcopy(model)
        kept = not_reset(template)
        note = f"fresh weights: {', '.join(kept)} keep their given values (no reset_parameters)"
        return cls(type(model).__name__, lambda: reinitialised(template), note if kept else "")


#: The methods by which PyTorch's modules initialise their own parameters (``nn.MultiheadAttention``
#: has the second).
_RESETS = ("reset_parameters", "_reset_parameters")


def reinitialised(template: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``template`` with fresh weights: every submodule's ``reset_parameters()`` (or
    ``_reset_parameters()``: the initialisation PyTorch's layers use), seeded by the caller's
    random state. Parameters of modules without one keep their values (:func:`not_reset`)."""
    model = copy.deepcopy(template)
    for module in model.modules():
        reset = next((getattr(module, r) for r in _RESETS if hasattr(module, r)), None)
        if callable(reset):
            reset()
    return model


def not_reset(model: torch.nn.Module) -> list[str]:
    """The names of the parameters that :func:`reinitialised` leaves as they are: those held by
    a module without a reset method (a position embedding or class token as a bare Parameter)."""
    return [
        f"{name}.{p}" if name else p
        for name, module in model.named_modules()
        if not any(callable(getattr(module, r, None)) for r in _RESETS)
        for p, value in module._parameters.items()
        if value is not None
    ]


@dataclass(frozen=True)
class Undo:
    """What an applied step changed: the weights before it (a state_dict clone) and the engine's
    optimizer then (None: none yet) with its :class:`~ntkviz.accounting.OptimizerSnapshot`."""

    state: dict
    optimizer: object
    snapshot: object


class Engine:
    """Owns the model and everything that changes it. Not thread-safe: one thread calls it.

    ``emit``: receives every event; ``config``: the first model's ``TrainConfig``; ``dataset``:
    a loaded ``ImageDataset`` (else :meth:`load` reads ``dataset_name``).
    """

    #: Seconds of work per :meth:`tick` before returning to the caller's event loop.
    tick_seconds = 0.03

    def __init__(
        self,
        emit: Callable[[object], None],
        config: TrainConfig | None = None,
        dataset=None,  # an ImageDataset, or anything as_image_dataset takes
        dataset_name: str = "mnist",
        user_model: UserModel | None = None,
        model: torch.nn.Module | None = None,
    ):
        self.emit = emit
        self.config = config or TrainConfig()
        self.data = dataset
        self._dataset_name = dataset_name
        self.user_model = user_model
        self._given = model  # the first model, as given (else a fresh one of the config's)
        self._no_model = False  # the given model did not fit and no registry model takes the data
        self.model: torch.nn.Module | None = None
        self.model_name = self.config.model
        self.source = "fresh weights"
        self.optimizer = None
        self.step = 0  #: optimizer steps of the current run
        self.undo_stack: list[Undo] = []  #: what each applied step changed, to undo it
        self._serials = itertools.count(1)
        self._base = 0  # this model's state before any applied step, apart from training steps
        self._applied_ids: list[int] = []  # one serial an applied step, beside undo_stack
        self._held: dict[str, Session] = {}  # the model as it was when a save paused the run
        self.applied_lrs: list[float] = []  #: η of each applied step
        self.applied_pairs: list = []  #: its PairRequest (None: unknown, from an old session)
        self.runner = JobRunner(emit)
        self._iter = None  # the training generator
        self._running = False
        self._single = False
        # feature -> [generation, request, every, due step, step of the last one taken]
        self._periodic: dict[str, list] = {}
        self._models = 0  # models held so far
        self._offset = 0  # steps of the model before the current run (a continued run)
        self._next_lr = math.nan  # η of the current run's next step (its schedule's)
        self._emitted_run_lr = math.nan  # the run's η the view was last told
        #: the model's kernel path and one pair's cost (s); None: to measure at the next tick
        self._path: tuple[str, float] | None = ("", float("nan"))
        #: features that ride along each training run (see :meth:`set_observer`), and those
        #: that ride along the current one (a new observer waits for the next run)
        self.observers: dict[str, object] = {}
        self.run_observers: dict[str, object] = {}

    # ------------------------------------------------------------------ plumbing
    def handle(self, command: Command) -> None:
        """Run ``command`` (a method of this engine); report any error as an event."""
        try:
            getattr(self, command.name)(*command.args)
        except Exception as e:
            self.report(*describe_error(command.name, e))

    def report(self, title: str, message: str) -> None:
        if title != "Internal error":
            log.warning("%s: %s", title, message)
        self.emit(Event("error", ErrorReport(title, message)))

    def message(self, text: str) -> None:
        self.emit(Event("message", text))

    def _run_state(self, state: str) -> None:
        self.emit(Event("run_state", state))

    @property
    def busy(self) -> bool:
        """True while there is work for :meth:`tick`."""
        return (
            self.runner.busy
            or (self._iter is not None and (self._running or self._single))
            or self._path is None
            or self._periodic_due()
        )

    def _periodic_due(self) -> bool:
        """A periodic job is due while a run is on (also paused between single batches: it is
        taken then, at the step it names, before anything else can change the model)."""
        return self._iter is not None and any(self.step >= p[3] for p in self._periodic.values())

    # ------------------------------------------------------------------ setup
    def load(self) -> None:
        """Load the dataset (unless given) and build a fresh model from the config."""
        self._run_state("loading")
        self.emit_info()
        if self.data is None:
            self.data = load_dataset(self._dataset_name)
        elif not isinstance(self.data, ImageDataset):  # torchvision-style sets, a name, a folder
            from ntkviz.data import as_image_dataset

            self.data = as_image_dataset(self.data)
        self._emit_dataset()
        if self._given is not None:
            from ntkviz.modelspec import check_model

            given, self._given = self._given, None
            label = self.user_model.label if self.user_model else type(given).__name__
            try:
                check_model(given, self.data.test.x[:2], len(self.data.classes), name=label)
            except ModelError as e:  # the app opens all the same, on the registry's model
                self._fall_back(e)
                return
            self._set_model(given, self.config, "given from Python")
        else:
            self._new_model(self.config, "fresh weights")
        self._run_state("ready")

    def _fall_back(self, refused: ModelError) -> None:
        """The model given to the app does not fit the data: open with a fresh registry model
        and say so, or, where none takes the data (not square), with no model ("no model": File
        ▸ Open model… or Open dataset… goes on)."""
        fallback = replace(self.config, model=TrainConfig().model)
        try:
            self._new_model(fallback, "fresh weights")
        except ModelError:
            shape = "×".join(str(n) for n in self.data.input_shape)
            self._no_model = True
            self._run_state("no model")
            self.report(
                ModelError.title,
                f"{refused}. No registry model takes {shape} images (they take square ones): "
                "File ▸ Open model… takes another model of yours, File ▸ Open dataset… other data.",
            )
            return
        self._run_state("ready")
        self.report(
            ModelError.title,
            f"{refused}. The app opened with a fresh {fallback.model} instead; File ▸ Open model… "
            "takes another model of yours.",
        )

    def _emit_dataset(self) -> None:
        d = self.data
        self.emit(
            Event(
                "dataset",
                DatasetInfo(
                    d.name,
                    tuple(d.classes),
                    {s: readonly(d.split(s).images.numpy()) for s in ("train", "test")},
                    {s: readonly(d.split(s).y.numpy()) for s in ("train", "test")},
                ),
            )
        )

    def open_dataset(
        self, source, root: str | None = None, download: bool = False, model: str | None = None
    ) -> None:
        """Replace the data by ``source`` (a dataset name whose files are in ``root``, default
        the cache; a directory of class folders; or an ``ImageDataset``; ``download``: let
        torchvision fetch a named set) and the model by a fresh one of the kind ``model`` (a
        registry name or the user's model's label; default the current kind) built for it. Data
        that cannot be read, or that the user's model does not fit, changes nothing."""
        from ntkviz.data import as_image_dataset

        data = (
            load_dataset(source, root, download=download)
            if isinstance(source, str)
            else as_image_dataset(source)
        )
        config = replace(self.config, model=model or self.config.model)
        try:
            fresh = self._fresh_model(config, data)
        except ModelError as e:
            if self.user_model is None or config.model != self.user_model.label:
                raise
            raise ModelError(
                f"{str(e).rstrip('.')}. Your model is built for other data: to open {data.name} "
                f"({'×'.join(map(str, data.input_shape))}, {data.num_classes} classes), choose a "
                "registry model in the Model box first (e.g. lenet)."
            ) from None
        self.config = config
        self.data = data
        self._emit_dataset()
        self._set_model(fresh, config, "fresh weights")
        self._run_state("ready")
        C, H, W = data.test.x.shape[1:]
        self.message(
            f"opened {data.name}: {len(data.train):,} training and {len(data.test):,} test "
            f"images {C}×{H}×{W}, {data.num_classes} classes"
        )

    def emit_info(self) -> None:
        models = {k: v[1] for k, v in MODELS.items()}
        if self.user_model is not None:
            models[self.user_model.label] = f"your model: {self.user_model.label}"
        self.emit(Event("info", EngineInfo(models, torch.cuda.is_available())))

    def _device(self, name: str) -> torch.device:
        try:
            return resolve_device(name)
        except DeviceError as e:
            self.report(e.title, f"{e}; using the CPU instead")
            return torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lineage(self) -> tuple:
        """Which state the parameters are in, apart from training steps (``step``): the model,
        its base (a new one when applied steps become training history) and one serial each
        applied step. Undo returns to an earlier lineage; no two states share one."""
        return (self._models, self._base, *self._applied_ids)

    def _set_model(
        self, model, config: TrainConfig, source: str, step: int = 0, emit: bool = True
    ) -> None:
        """Replace the model (and forget the optimizer, the run and the undo stack)."""
        self._models += 1
        self.runner.cancel_all("the model changed")
        self._close_run()
        self.run_observers = {}  # their accounts were of the old model
        self.config = config
        self.model_name = config.model
        self.model = model.to(self._device(config.device))
        self.optimizer = None
        self.step = step
        self._forget_applied_steps(emit=False)
        self.source = source
        for p in self._periodic.values():
            p[3], p[4] = step, None  # periodic jobs start over with the new model
        self._path = None  # measured at the next tick, once the burst of a new model is over
        if emit:
            self.emit_model()
        if self._no_model:  # a load that found no model for the data: ready now
            self._no_model = False
            self._run_state("ready")

    def _new_model(self, config: TrainConfig, source: str) -> None:
        """A freshly initialised model for ``config.model``: from the registry, built for the
        data's input shape and classes, or the user's model (its factory, or a copy of it as it
        was given)."""
        config.validate()
        self._set_model(self._fresh_model(config), config, source)
        if self._user_model_current and self.user_model.note:
            log.warning("%s", self.user_model.note)
            self.message(self.user_model.note)

    def _fresh_model(
        self, config: TrainConfig, data: ImageDataset | None = None
    ) -> torch.nn.Module:
        """A fresh ``config.model`` for ``data`` (default: the engine's), checked on it (a model
        that does not fit raises and changes nothing): the user's (its factory, seeded), or the
        registry's built for the data's input shape and classes (square images only)."""
        from ntkviz.checkpoint import build_for
        from ntkviz.modelspec import check_model

        d = data or self.data
        if self.user_model is not None and config.model == self.user_model.label:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = self.user_model.build()
        else:
            try:
                model = build_for(config.model, d.num_classes, d.input_shape, seed=config.seed)
            except ValueError as e:
                raise ModelError(f"{config.model} cannot take {d.name}: {e}") from None
        check_model(model, d.test.x[:2], d.num_classes, name=config.model)
        return model

    def open_model(self, spec: str, weights: str | None = None) -> None:
        """Replace the model by the user's: ``spec`` "file.py:factory" or "module:factory" (run
        to build it), ``weights`` a state dict or checkpoint file (read without running code).
        Checked on the data first: a model that does not fit changes nothing."""
        from ntkviz.modelspec import check_model, load_model_spec

        model = load_model_spec(spec, weights)
        check_model(model, self.data.test.x[:2], len(self.data.classes), name=spec)
        self.user_model = UserModel(spec, lambda: load_model_spec(spec))
        config = replace(self.config, model=spec)
        self.emit_info()
        self._set_model(model, config, spec if weights is None else f"{spec} with {weights}")
        self._run_state("ready")
        self.message(f"opened model {spec}")

    def emit_model(self) -> None:
        self._emitted_run_lr = self._next_lr if self._iter is not None else float(self.config.lr)
        self.emit(
            Event(
                "model",
                ModelInfo(
                    self.model_name,
                    count_parameters(self.model),
                    str(self.device),
                    self.config,
                    self.step,
                    self.source,
                    len(self.undo_stack),
                    self._models,
                    self._describe_optimizer(),
                    self._emitted_run_lr,
                    depends_on_mode(self.model),
                    self.lineage,
                ),
            )
        )

    def _kernel_path(self) -> tuple[str, float]:
        """Which kernel algorithm the model takes, and why, and one pair's measured cost (s)."""
        from ntkviz.kernel import kernel_path, pair_cost_seconds

        x = self.data.test.x[:2].to(self.device)
        try:
            path = kernel_path(self.model, x[:1])
            cost = pair_cost_seconds(self.model, x, 2)
            if cost < 0.05:  # cheap: the best of a few more
                cost = min(cost, pair_cost_seconds(self.model, x, 5))
            return f"{path.path} kernel path: {path.reason}", cost
        except (ValueError, RuntimeError) as e:
            return f"kernel path unknown: {e}", float("nan")

    def _describe_optimizer(self) -> str:
        c = self.config
        kind = getattr(c, "optimizer", "sgd")
        if kind == "sgd":
            text = f"SGD, momentum {c.momentum:g}" + (", Nesterov" if c.nesterov else "")
        else:
            text = f"{'Adam' if kind == 'adam' else 'AdamW'}, β = {tuple(c.betas)}, ε = {c.eps:g}"
        text += f", weight decay {c.weight_decay:g}"
        state = "with the run's state" if self.optimizer is not None else "fresh (no run yet)"
        return f"{text} — {state}"

    def example(self, split: str, index: int) -> torch.Tensor:
        """The normalised example ``split[index]`` on the model's device."""
        s = self.data.split(split)
        if not 0 <= index < len(s):
            raise NtkvizError(
                f"index {index} is out of range for the {split} split (0–{len(s) - 1})"
            )
        return s.x[index].to(self.device)

    def x(self, example) -> torch.Tensor:
        """:meth:`example` of an :class:`~ntkviz.app.state.Example`."""
        return self.example(example.split, example.index)

    # ------------------------------------------------------------------ training
    def start(self, config: TrainConfig) -> None:
        """Start a new run from freshly initialised weights."""
        self._new_model(config, "trained")
        self._begin_run(config)
        self._running = True
        self._run_state("training")

    def continue_training(self, config: TrainConfig) -> None:
        """Train the current model further with ``config``'s settings (its model is the current
        one): a fresh optimizer and schedule; steps count on from the model's."""
        config = replace(config, model=self.model_name)
        config.validate()
        self.runner.cancel_all("the model changed")
        self._close_run()
        untouched = not self.undo_stack  # since the last run's last step
        self._forget_applied_steps(emit=False)  # they become part of the training history
        self.config, self.source = config, "trained"
        log.info("continuing to train %s from its step %d", self.model_name, self.step)
        self._begin_run(config, offset=self.step, continues=untouched)
        self.emit_model()
        self._running = True
        self._run_state("training")

    def _begin_run(self, config: TrainConfig, offset: int = 0, continues: bool = False) -> None:
        """Start a run; ``continues``: it trains on from the last run's last step, the model
        untouched since (its observers may carry their accounts on)."""
        self.optimizer = make_optimizer(self.model, config)
        extra = {}
        previous = self.run_observers if continues else {}
        self.run_observers = dict(self.observers)
        for name, observer in self.run_observers.items():
            extra.update(observer.train_kwargs(self, previous.get(name)))
        self._iter = train(self.model, self.data, config, self.optimizer, **extra)
        self._offset = offset
        self._next_lr = float(config.lr)
        continued = tuple(n for n, o in self.run_observers.items() if o.continued)
        observed = {n: o.examples for n, o in self.run_observers.items()}
        self.emit(Event("run_started", RunStarted(offset, continued, observed)))
        self.emit_model()  # its optimizer now has a run's state

    def set_observer(self, name: str, observer) -> None:
        """Let ``observer`` ride along the training runs from the next one on (None: stop):
        ``observer.train_kwargs(engine, previous)`` adds arguments to ``train`` when a run
        begins (``previous``: the same feature's observer of the last run when this run trains
        on from its last step, else None; ``observer.continued`` then says whether it carried
        that run's account on), ``observer.observe(engine, records)`` turns each slice's records
        into events, ``observer.restart(engine)`` (events) begins its account again when a
        paused run resumes after steps taken by hand."""
        if observer is None:
            self.observers.pop(name, None)
        else:
            self.observers[name] = observer

    def pause(self) -> None:
        if self._running:
            self._running = False
            self._run_state("paused")
            self.emit_model()  # η of the run's next step

    def resume(self) -> None:
        if self._iter is not None and not self._running:
            self._take_in_applied_steps()
            self._running = True
            self._run_state("training")

    def _take_in_applied_steps(self) -> None:
        """Steps applied by hand in a paused run become part of its training history (no undo);
        the run's observers, which did not see them, begin their accounts again."""
        if self.undo_stack:
            for observer in self.run_observers.values():
                for event in observer.restart(self):
                    self.emit(event)
        self._forget_applied_steps()

    def stop(self) -> None:
        if self._iter is not None:
            self._close_run()
            self._run_state("stopped")

    def _close_run(self) -> None:
        if self._iter is not None:
            self._iter.close()
        self._iter, self._running, self._single = None, False, False

    def one_batch(self, config: TrainConfig) -> None:
        """Train exactly one batch (starting a paused run with ``config`` if none is active)."""
        if self._iter is None:
            self._new_model(config, "trained")
            self._begin_run(config)
        else:  # steps by hand, then a batch: as on Resume
            self._take_in_applied_steps()
        # a periodic job under way is of the model as it is: it finishes before the batch
        self.runner.cancel_all("the model changed", keep=set(self._periodic))
        self._running, self._single = False, True

    def _forget_applied_steps(self, emit: bool = True, taken_in: bool = True) -> None:
        """No applied steps to undo any more: ``taken_in`` (the parameters keep them: they
        become training history, a new base), or the parameters are back before them (reset)."""
        had = bool(self.undo_stack)
        self.undo_stack.clear()
        self.applied_lrs.clear()
        self.applied_pairs.clear()
        self._applied_ids.clear()
        if had and taken_in:
            self._base = next(self._serials)
        if had and emit:
            self.emit_model()

    def tick(self) -> bool:
        """Do about ``tick_seconds`` of work: jobs first, then due periodic jobs, then training.
        Returns :attr:`busy`."""
        try:
            if self.runner.busy:
                self.runner.step(self.tick_seconds)
            elif self._path is None and self.model is not None:
                self._path = self._kernel_path()
                self.emit(Event("kernel_path", KernelPath(self._models, *self._path)))
            elif not self._start_due_periodic():
                self._train_slice()
        except Exception as e:  # a bug: report it, keep the engine alive
            self._close_run()
            self.report(*describe_error("engine", e))
        return self.busy

    def _train_slice(self) -> None:
        if self._iter is None or not (self._running or self._single):
            return
        records, ended, error = [], None, None
        deadline = time.perf_counter() + self.tick_seconds
        due = min((p[3] for p in self._periodic.values()), default=math.inf)
        try:
            while True:
                record = next(self._iter)
                if record.step < record.total_steps:  # the schedule's η of the run's next step
                    self._next_lr = scheduled_lr(self.config.lr, record.step + 1,
                                                 record.total_steps)  # fmt: skip
                if self._offset:
                    record = replace(
                        record, step=record.step + self._offset,
                        total_steps=record.total_steps + self._offset,
                    )  # fmt: skip
                records.append(record)
                self.step = record.step
                if self._single or self.step >= due or time.perf_counter() > deadline:
                    break
        except StopIteration:
            ended = "finished"
        except TrainingDiverged as e:
            ended, error = "stopped", (e.title, str(e))
        except Exception as e:
            ended, error = "stopped", describe_error("training", e)
        if ended is not None:
            self._iter, self._running = None, False
        events = [e for o in self.run_observers.values() for e in o.observe(self, records)]
        if any(r.account is not None for r in records):  # the observers took the accounts
            records = [replace(r, account=None) for r in records]
        if records:
            self.emit(Event("records", tuple(records)))
        for event in events:
            self.emit(event)
        if error is not None:
            self.report(*error)
        if ended is not None:
            self._run_state(ended)
        if self._single:
            self._single = False
            if self._iter is not None:
                self._run_state("paused")
                self.emit_model()  # η of the run's next step

    # ------------------------------------------------------------------ jobs
    def submit(self, feature: str, generation: int, request) -> None:
        """Run ``request.run(self)`` as ``feature``'s job (replacing its running one)."""
        self.runner.start(feature, generation, request.run(self), getattr(request, "priority", 10))

    def cancel(self, feature: str, generation: int) -> None:
        """Cancel ``feature``'s job; a "cancelled" event of the requester's ``generation``
        answers even when no job of it was running (its result may be on its way, or an older
        request's job was running), so that the controller knows what came before the cancel."""
        running = self.runner.generation(feature)
        self.runner.cancel(feature)  # its event answers if it is of this generation
        if running != generation:  # none, or an older request's (its event is stale)
            self.emit(JobEvent(feature, generation, "cancelled", "nothing was running"))

    def set_periodic(self, feature: str, generation: int, request, every: int) -> None:
        """While training, run ``request`` as ``feature``'s job at the current step and then
        every ``every`` steps (``request`` None: stop)."""
        if request is None:
            self._periodic.pop(feature, None)
            return
        every = max(1, int(every))
        due, last = self.step, None  # a new one: at once
        if feature in self._periodic:  # the next one after the last taken, at the new period
            *_, due, last = self._periodic[feature]
            due = due if last is None else last + every
        self._periodic[feature] = [generation, request, every, due, last]

    def _start_due_periodic(self) -> bool:
        """Start the first periodic job that is due while a run is on (running, or paused
        between single batches); True if one was."""
        if not self._periodic_due():
            return False
        for feature, p in self._periodic.items():
            generation, request, every, due, _ = p
            if self.step >= due:
                p[3], p[4] = self.step + every, self.step
                self.submit(feature, generation, request)
                return True
        return False

    # ------------------------------------------------------------------ step-through
    def _clone_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _before_step(self) -> Undo:
        opt = self.optimizer
        snap = None if opt is None else optimizer_snapshot(self.model, opt)
        return Undo(self._clone_state(), opt, snap)

    def _undo_of(self, state: dict, optimizer_before: dict | None) -> Undo:
        """An undo of a session's history: the weights before that step and, where the session
        kept it, the optimizer's state then (restored into the run's optimizer)."""
        state = {k: v.to(self.device) for k, v in state.items()}
        if optimizer_before is None:
            return Undo(state, None, None)
        from ntkviz.accounting import OptimizerSnapshot

        opt = self.optimizer or make_optimizer(self.model, self.config)
        named = dict(self.model.named_parameters())
        params = tuple(state.get(n, p.detach()).clone() for n, p in named.items())
        buffers = tuple(state.get(n, b.detach()).clone() for n, b in self.model.named_buffers())
        device = lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
        snapshot = OptimizerSnapshot(
            parameters=params,
            grads=(None,) * len(params),
            buffers=buffers,
            state=tuple({k: device(v) for k, v in st.items()} for st in optimizer_before["state"]),
            groups=tuple(dict(g) for g in optimizer_before["groups"]),
        )
        return Undo(state, opt, snapshot)

    def _restore(self, undo: Undo) -> None:
        self.model.load_state_dict(undo.state)
        self.optimizer = undo.optimizer
        if undo.snapshot is not None:
            undo.snapshot.restore(self.model, undo.optimizer)

    def step_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer that "this run's optimizer" steps take: the run's, with its state, or
        a fresh one of the config's kind when there is none (a new or loaded model)."""
        return self.optimizer or make_optimizer(self.model, self.config)

    def apply_step(self, pair) -> None:
        """One step on ``pair``'s (x_u, y_u): plain SGD in eval mode, or (``pair.optimizer``) the
        real next step of :meth:`step_optimizer` (its momentum or Adam state moves on too). Refused,
        and model and optimizer kept, when it makes the model non-finite."""
        if not math.isfinite(pair.lr):
            raise NtkvizError(f"η must be finite, got {pair.lr}")
        x_u = self.x(pair.x_u)[None]
        x_o = self.x(pair.x_o)[None]
        self.runner.cancel_all("the model changed")
        # η that followed the run (the view got it at the last pause) is the run's η now
        followed = pair.optimizer and self._iter is not None and pair.lr == self._emitted_run_lr
        self.pause()
        if followed and math.isfinite(self._next_lr):
            pair = replace(pair, lr=self._next_lr)
        before = self._before_step()
        model = self.model
        y = torch.tensor([pair.y_u], device=x_u.device)
        try:
            if pair.optimizer:
                from ntkviz.accounting import account_step

                self.optimizer = self.step_optimizer()
                account_step(model, self.optimizer, x_u, y, x_o, pair.lr, loss=pair.loss)
            else:
                with eval_mode(model):
                    model.zero_grad(set_to_none=True)
                    ce = F.cross_entropy(model(x_u), y)
                    (ce if pair.loss == "ce" else -ce).backward()
                    with torch.no_grad():
                        for p in model.parameters():
                            if p.requires_grad and p.grad is not None:
                                p -= pair.lr * p.grad
            model.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise StepDiverged(pair.lr, "the parameters")
            with torch.no_grad(), eval_mode(model):
                if not torch.isfinite(model(torch.cat([x_u, x_o]))).all():
                    raise StepDiverged(pair.lr, "the logits of x_u or x_o")
        except Exception:
            self._restore(before)  # model and optimizer as they were before the step
            raise
        self.undo_stack.append(before)
        self._applied_ids.append(next(self._serials))
        self.applied_lrs.append(float(pair.lr))
        self.applied_pairs.append(pair)
        self.emit_model()

    def undo(self) -> None:
        """Restore the parameters (and the optimizer) from before the last applied step, bit for
        bit."""
        if not self.undo_stack:
            self.message("nothing to undo")
            return
        self.runner.cancel_all("the model changed")
        self._restore(self.undo_stack.pop())
        self._applied_ids.pop()
        self.applied_lrs.pop()
        self.applied_pairs.pop()
        self.emit_model()

    def reset_steps(self) -> None:
        """Return to the state before the first applied step."""
        if self.undo_stack:
            self.runner.cancel_all("the model changed")
            self._restore(self.undo_stack[0])
            self._forget_applied_steps(taken_in=False)

    # ------------------------------------------------------------------ files
    def send_state_dict(self) -> None:
        """Emit a numpy copy of the model's state_dict (for tests and inspection)."""
        state = {k: readonly(v) for k, v in self.model.state_dict().items()}
        self.emit(Event("state_dict", state))

    def save_checkpoint(self, path: str, metadata: dict) -> None:
        """Save the model with ``metadata`` and its training step (and applied steps)."""
        metadata = {**metadata, "step": self.step, "applied_steps": len(self.undo_stack)}
        save_checkpoint(
            path, self.model, self.model_name, self.config, metadata,
            input_shape=self.data.input_shape, custom=self._user_model_current,
            num_classes=self.data.num_classes,
        )  # fmt: skip
        self.emit(Event("checkpoint_saved", str(path)))
        self.message(f"saved checkpoint {path}")

    @property
    def _user_model_current(self) -> bool:
        """Whether the model is the user's own (not one of the registry's)."""
        return self.user_model is not None and self.model_name == self.user_model.label

    def load_checkpoint(self, path: str) -> None:
        """A registry model's checkpoint (built for the data), or the weights of the user's own
        model in its checkpoint (into a copy of the current one). Nothing changes unless the
        checkpoint fits the data."""
        from ntkviz.checkpoint import FORMAT, VERSION, config_from, metadata_from, read_payload

        payload, _ = read_payload(path, FORMAT, VERSION, "checkpoint", custom_ok=True)
        if payload.get("custom"):
            model = self._user_template()
            if model is None:
                load_checkpoint(path)  # raises, saying how to open the user's model
            from ntkviz.modelspec import load_weights

            load_weights(model, path, self.user_model.label)
            try:
                config, metadata = config_from(payload), metadata_from(payload)
            except ValueError as e:
                raise CheckpointError(f"{path} is not a valid ntkviz checkpoint: {e}") from None
            config = replace(config, model=self.user_model.label, device=self.config.device)
        else:
            ckpt = load_checkpoint(path)
            self._check_fits(ckpt.input_shape, ckpt.num_classes, f"{path} holds a model")
            model, config, metadata = ckpt.model, ckpt.config, ckpt.metadata
        self._set_model(model, config, path, metadata.get("step", 0))
        self._run_state("ready")
        self.message(f"loaded checkpoint {path}")

    def _user_template(self) -> torch.nn.Module | None:
        """A model of the user's to load their checkpoint or session into: a copy of the current
        one, or a fresh one checked on the data when another model is current; None if the
        user has given none."""
        if self._user_model_current:
            return copy.deepcopy(self.model)
        if self.user_model is None:
            return None
        return self._fresh_model(replace(self.config, model=self.user_model.label))

    def _check_fits(
        self, input_shape, num_classes: int, what: str, data=None, error=CheckpointError
    ) -> None:
        """Refuse a model built for other images or another number of classes than the data's
        (``data``, default the engine's), with an ``error``."""
        d = data or self.data
        if not self._fits(input_shape, num_classes, d):
            have = "×".join(map(str, input_shape))
            want = "×".join(map(str, d.input_shape))
            raise error(
                f"{what} for {have} images and {num_classes} classes; {d.name}'s images are "
                f"{want} with {d.num_classes} classes (File ▸ Open dataset… first)"
            )

    @staticmethod
    def _fits(input_shape, num_classes: int, data) -> bool:
        return tuple(input_shape) == tuple(data.input_shape) and num_classes == data.num_classes

    def _session_data(self, session: Session, path: str) -> tuple[ImageDataset, str]:
        """The data ``session`` was made on: the engine's when it is that data (or the session
        names none it can read again), else that data read again; with a note for the user when
        the session's data could not be read but the current data fits."""
        want, d = session.dataset, self.data
        source, name = want.get("source"), want.get("name")
        if not source and name is not None and name != d.name:
            raise SessionError(
                f"{path} was made on data given from Python ({name}), not on the open data "
                f"({d.name}): open it with that data (e.g. ntkviz.show(model, data)), since its "
                "examples, curves and steps refer to that data"
            )
        if not source or (name, source) == (d.name, d.source):
            return d, ""
        try:
            return load_dataset(source, want.get("root")), ""
        except NtkvizError as e:
            if self._fits(session.input_shape, session.classes, d):
                return d, f"; its data ({source}) could not be read again, so it is on {d.name}"
            raise SessionError(
                f"{path} was made on {want.get('name')} ({source}), which cannot be read here: {e}"
            ) from None

    def save_session(self, path: str, parts: dict, held: bool = False) -> None:
        """Write weights, config, the undo stack and the features' ``parts`` (plain values) to
        ``path``: the model as it is, or (``held``) as :meth:`hold_for_save` took it for
        ``path``."""
        session = self._held.pop(path, None) if held else None
        session = replace(session or self._session(copies=False), selection=dict(parts))
        try:
            save_session(path, session)
        except Exception:
            self.emit(Event("session_not_saved", str(path)))  # the error follows
            raise
        self.emit(Event("session_saved", str(path)))
        self.message(f"saved session {path}")

    def hold_for_save(self, path: str) -> None:
        """Pause the run and take the model as it is now for the session ``path``; a
        "held_for_save" event ``(path, whether it was training)`` follows every record of its
        steps, so that the curves of :meth:`save_session` end where its weights are."""
        was_running = self._running
        self.pause()
        self._held[path] = self._session(copies=True)
        self.emit(Event("held_for_save", (path, was_running)))

    def drop_hold(self, path: str) -> None:
        """Forget the model taken for the session ``path`` (it will not be written)."""
        self._held.pop(path, None)

    def _session(self, copies: bool) -> Session:
        """The model as it is now, as a :class:`Session` without the features' parts; with
        ``copies`` its weights and optimizer state are copies that later steps do not change
        (the undo stack's snapshots never change)."""

        def kept(t):
            t = t.detach().cpu()
            return t.clone() if copies else t

        history = [
            {
                "lr": float(lr),
                "pair": None if pair is None else pair.to_dict(),
                "state_before": {k: v.detach().cpu() for k, v in st.state.items()},  # (kept)
                "optimizer_before": snapshot_payload(st.snapshot),
            }
            for lr, pair, st in zip(
                self.applied_lrs, self.applied_pairs, self.undo_stack, strict=True
            )
        ]
        optimizer = None if self.optimizer is None else self.optimizer.state_dict()
        return Session(
            model_name=self.model_name,
            state_dict={k: kept(v) for k, v in self.model.state_dict().items()},
            config=self.config,
            step=self.step,
            history=history,
            input_shape=self.data.input_shape,
            custom=self._user_model_current,
            num_classes=self.data.num_classes,
            dataset={
                "name": self.data.name, "source": self.data.source,
                "root": None if self.data.root is None else str(self.data.root),
            },
            optimizer=copy.deepcopy(optimizer) if copies else optimizer,
        )  # fmt: skip

    def open_session(self, path: str) -> None:
        """Replace everything by the session in ``path``; a bad file changes nothing."""
        try:
            template = self._user_template()
        except ModelError:  # the user's model cannot take this data; a registry session can
            template = None
        session = load_session(path, template)
        V = session.classes
        data, note = self._session_data(session, path)
        if not session.custom:
            self._check_fits(
                session.input_shape, V, f"{path} holds a model", data, error=SessionError
            )
        model = session.build_model(template)
        from ntkviz.app.features.pair import PairRequest, example_from

        stack, lrs, pairs, optimizers = [], [], [], []
        probe = session.build_model(template)
        probe_optimizer = make_optimizer(probe, session.config)
        parts = session_parts(session)
        try:
            examples = []
            if "pair" in parts:
                pair = PairRequest.from_dict(parts["pair"], V)
                examples += [pair.x_u, pair.x_o]
            watched = parts.get("watch_ranking", {}).get("watched", [])
            examples += [example_from(w, f"watched example {k}") for k, w in enumerate(watched)]
            for example in examples:
                if example.index >= len(data.split(example.split).y):
                    raise ValueError(f"{example} is not an example of {data.name}")
        except (ValueError, AttributeError) as e:
            raise SessionError(f"{path}: its selection is damaged: {e}") from None
        for k, h in enumerate(session.history):
            try:
                probe.load_state_dict(h["state_before"])
                lrs.append(float(h["lr"]))
                pairs.append(PairRequest.from_dict(h["pair"], V) if h.get("pair") else None)
                if h.get("optimizer_before") is not None:
                    check_snapshot(probe_optimizer, h["optimizer_before"])
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise SessionError(
                    f"{path}: step-through history entry {k} is damaged: {e}"
                ) from None
            # as the model holds them (load_state_dict converted them to its dtypes)
            stack.append({k2: v.detach().clone() for k2, v in probe.state_dict().items()})
            optimizers.append(h.get("optimizer_before"))
        try:
            session.config.validate()
        except ValueError as e:
            raise SessionError(f"{path}: invalid training config: {e}") from None
        config = session.config
        if session.custom:
            config = replace(config, model=self.user_model.label)
        if session.optimizer is not None:  # the run's optimizer: checked on a copy of the model
            try:
                load_optimizer_state(probe_optimizer, session.optimizer)
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                raise SessionError(f"{path}: its optimizer's state is damaged: {e}") from None
        # everything checked: now replace the state
        if data is not self.data:
            self.data = data
            self._emit_dataset()
        self._set_model(model, config, str(path), session.step, emit=False)
        if session.optimizer is not None:
            self.optimizer = make_optimizer(self.model, config)
            self.optimizer.load_state_dict(session.optimizer)
        self.undo_stack = [self._undo_of(st, before) for st, before in zip(stack, optimizers)]
        self._applied_ids = [next(self._serials) for _ in self.undo_stack]
        self.applied_lrs, self.applied_pairs = lrs, pairs
        self.emit_model()
        self.emit(Event("session_opened", SessionOpened(str(path), parts)))
        self._run_state("ready")
        self.message(f"opened session {path}{note}")

    def shutdown(self) -> None:
        """Stop everything (the caller then ends the engine's thread), waiting for work still on
        a helper thread: a process that ends while one computes is aborted."""
        self.runner.close()
        self._close_run()
        self._held.clear()
        wait_for_helpers()
