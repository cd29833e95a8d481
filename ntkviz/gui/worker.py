"""TrainingWorker: the one object that owns the model, living on its own ``QThread``.

The window talks to it only through queued signals; it answers with immutable results (frozen
dataclasses holding read-only numpy copies), never live tensors. Long work (training) is a
generator stepped for a few tens of milliseconds per zero-timeout timer tick, after which control
returns to the worker's event loop, so pause, stop and other commands take effect at once.

Every torch op of the app runs here, none on the GUI thread (tests check this). Beyond the
house rule it is a matter of speed: a thread that has run one parallel op keeps an OpenMP team,
and with two teams on a 2-core machine libgomp throttles its spin-waiting, so that the worker's
convolutions and matrix products run about 3× slower from then on.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot
from torch.func import functional_call

from ntkviz.analysis import (
    SqueezeRun,
    balanced_indices,
    class_influence,
    ntk_spectrum,
    rank_correlation,
    readonly,
    squeeze_steps,
    squeeze_survey,
)
from ntkviz.checkpoint import load_checkpoint, save_checkpoint
from ntkviz.data import ImageDataset, load_dataset
from ntkviz.decomposition import Decomposition, Influence, decompose, iter_influence
from ntkviz.errors import DeviceError, NtkvizError, StepDiverged, TrainingDiverged
from ntkviz.kernel import empirical_ntk, empirical_ntk_by_layer
from ntkviz.models import build_model, count_parameters
from ntkviz.session import Session, SessionError, load_session, save_session
from ntkviz.training import TrainConfig, TrainRecord, make_optimizer, resolve_device, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DatasetInfo:
    """What the window needs to show examples: per split, ``images`` uint8 ``(N, 28, 28)`` and
    ``labels`` int64 ``(N,)`` (read-only)."""

    name: str
    classes: tuple[str, ...]
    images: dict
    labels: dict


@dataclass(frozen=True)
class ModelInfo:
    """The model the worker holds now."""

    name: str
    num_parameters: int
    device: str
    config: TrainConfig
    step: int  #: optimizer steps of the current training run
    source: str  #: "fresh weights", "trained", or the checkpoint path


@dataclass(frozen=True)
class PairRequest:
    """One update and one observation: x_u = ``split_u[index_u]`` learnt with label ``y_u``,
    x_o = ``split_o[index_o]``; ``lr`` = η; ``loss`` "ce" or "neg"."""

    split_u: str
    index_u: int
    y_u: int
    split_o: str
    index_o: int
    lr: float
    loss: str = "ce"


@dataclass(frozen=True)
class DecompositionResult:
    """The core's :class:`Decomposition` for ``request`` at training step ``step``, after
    ``applied_steps`` step-through updates."""

    request: PairRequest
    decomposition: Decomposition
    step: int
    applied_steps: int
    model_name: str
    seed: int


@dataclass(frozen=True)
class StepHistory:
    """π of the current pair at each state of the step-through stack (first: before stepping):
    ``probs_o (S + 1, V)``, ``probs_u (S + 1, V)``; ``lrs (S,)`` the η of each applied step."""

    request: PairRequest
    probs_o: np.ndarray
    probs_u: np.ndarray
    lrs: tuple[float, ...]


# ------------------------------------------------------------------ probe analyses (issue 4)
@dataclass(frozen=True)
class ProbeRequest:
    """Influence of one update (x_u = ``split_u[index_u]`` learnt as ``y_u`` with ``loss``, η =
    ``lr``) on a probe set of the test split: ``size`` examples (all when ≥ the split), the
    actual change after a real step when ``actual``, ‖K(x_o, x_u)‖_F on the first
    ``norm_size`` probe examples (0: none)."""

    split_u: str
    index_u: int
    y_u: int
    lr: float
    loss: str = "ce"
    size: int = 10000
    actual: bool = False
    norm_size: int = 0
    seed: int = 0


def probe_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The probe set: all ``n`` examples when ``size >= n``, else ``size`` seeded random ones,
    sorted."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


@dataclass(frozen=True)
class InfluenceResult:
    """``influence`` (the core's :class:`Influence`) on test examples ``indices`` (true classes
    ``labels``); ``classes`` = ``class_influence(influence, labels, V)``; ``kernel_norm`` ``(M,)``
    = ‖K(x_o, x_u)‖_F of the first M probe examples (``norm_indices``), or None."""

    request: ProbeRequest
    indices: np.ndarray
    labels: np.ndarray
    influence: Influence
    classes: dict
    norm_indices: np.ndarray | None
    norm_labels: np.ndarray | None
    kernel_norm: np.ndarray | None
    step: int


@dataclass(frozen=True)
class KernelMaps:
    """Class×class kernel maps recorded so far: ``steps (T,)``, ``maps (T, C, C)``, and
    ``correlations (T,)``, the Spearman rank correlation of each map with the latest."""

    steps: np.ndarray
    maps: np.ndarray
    correlations: np.ndarray
    per_class: int


SURVEY_SIZE = 150  #: test images in the squeezing survey (one negative step on each one's label)


@dataclass(frozen=True)
class SqueezeResult:
    """Negative- and positive-gradient runs (core :class:`SqueezeRun`) of ``steps`` steps on x,
    and the η sweep: ``sweep_lrs (L,)``, ``sweep_mass (L,)`` = π gain of the most likely other
    class after one negative step with each η."""

    split: str
    index: int
    y: int
    neg: SqueezeRun
    ce: SqueezeRun
    sweep_lrs: np.ndarray
    sweep_mass: np.ndarray
    step: int
    survey_indices: np.ndarray  #: test images of the survey, each stepped on its own label
    survey: object  #: core ``SqueezeSurvey``: squeezed mass against max π and π(ȳ)


@dataclass(frozen=True)
class LayerResult:
    """``blocks[name] (V, V)`` = the part of K(x_o, x_u) from parameter group ``name``;
    ``norms (L,)`` their Frobenius norms in ``names`` order; ``total_norm`` = ‖K‖_F."""

    request: PairRequest
    names: tuple[str, ...]
    norms: np.ndarray
    blocks: dict
    total_norm: float
    step: int


@dataclass(frozen=True)
class SpectrumResult:
    """Eigenvalues (descending) of the NTK Gram matrix of test examples ``indices``."""

    indices: np.ndarray
    eigenvalues: np.ndarray
    step: int


def kernel_map_job(model, x: torch.Tensor, labels: np.ndarray, num_classes: int, chunk: int = 20):
    """Generator form of :func:`ntkviz.analysis.class_kernel_map`: yields ``(done, total)`` per
    chunk of rows, then the ``(C, C)`` map (the same reduction as the core)."""
    norms = np.zeros((len(x), len(x)))
    for start in range(0, len(x), chunk):
        block = empirical_ntk(model, x[start : start + chunk], x)
        norms[start : start + chunk] = block.flatten(2).norm(dim=2).double().cpu().numpy()
        yield min(start + chunk, len(x)), len(x)
    onehot = np.eye(num_classes)[labels]
    off_diagonal = 1 - np.eye(len(x))
    sums = onehot.T @ (norms * off_diagonal) @ onehot
    counts = onehot.T @ off_diagonal @ onehot
    yield readonly(sums / np.maximum(counts, 1))


def _reporting(fn):
    """Turn any exception of a slot into an ``error`` signal (and a log entry)."""

    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except NtkvizError as e:
            log.warning("%s: %s", fn.__name__, e)
            self.error.emit(e.title, str(e))
        except Exception as e:
            log.exception("error in worker.%s", fn.__name__)
            self.error.emit("Internal error", f"{fn.__name__}: {type(e).__name__}: {e}")

    return wrapper


class TrainingWorker(QObject):
    """Owns dataset, model, optimizer, training generator and the step-through undo stack.

    Create it, ``moveToThread`` a ``QThread``, then call its slots only through queued signals.
    """

    dataset_ready = Signal(object)  # DatasetInfo
    model_changed = Signal(object)  # ModelInfo
    records = Signal(object)  # tuple[TrainRecord, ...] of one tick
    state_changed = Signal(str)  # loading, ready, training, paused, stopped, finished
    decomposition_ready = Signal(int, object)  # generation, DecompositionResult
    history_changed = Signal(int, object)  # generation, StepHistory
    search_done = Signal(int, str, int)  # generation, split, index (-1: none found)
    state_dict_ready = Signal(int, object)  # generation, {name: cpu tensor clone}
    error = Signal(str, str)  # title, message
    message = Signal(str)  # short status text
    job_progress = Signal(int, str, int, int)  # generation, kind, done, total
    job_cancelled = Signal(int, str)  # generation, kind
    influence_ready = Signal(int, object)  # generation, InfluenceResult
    kernel_maps_changed = Signal(object)  # KernelMaps
    squeeze_ready = Signal(int, object)  # generation, SqueezeResult
    layers_ready = Signal(int, object)  # generation, LayerResult
    spectrum_ready = Signal(int, object)  # generation, SpectrumResult
    session_saved = Signal(str)  # path
    session_loaded = Signal(object)  # the loaded Session (curves and selection for the window)

    #: Seconds of training per tick before returning to the event loop.
    tick_seconds = 0.03

    def __init__(
        self,
        config: TrainConfig | None = None,
        dataset: ImageDataset | None = None,
        dataset_name: str = "mnist",
    ):
        super().__init__()
        self.config = config or TrainConfig()
        self.stop_requested = False  # set from the GUI thread when closing; read between batches
        self._data = dataset
        self._dataset_name = dataset_name
        self._model: torch.nn.Module | None = None
        self._model_name = self.config.model
        self._source = "fresh weights"
        self._optimizer = None
        self._iter = None
        self._running = False
        self._single = False
        self._step = 0
        self._stack: list[dict] = []  # state_dict clones before each applied step
        self._lrs: list[float] = []
        self._pending: tuple[int, PairRequest] | None = None
        #: set from the GUI thread to cancel the running job at its next chunk
        self.cancel_requested = False
        self._job: tuple[int, str, object] | None = None  # generation, kind, generator
        self._record_maps = False
        self._record_every = 200
        self._per_class = 20
        self._next_record = 0
        self._maps: list[tuple[int, np.ndarray]] = []
        self._timer = QTimer(self)  # moves with the worker to its thread
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._tick)

    # ----------------------------------------------------------------- setup
    @Slot()
    @_reporting
    def load(self) -> None:
        """Load the dataset (unless given) and build a fresh model from the config."""
        self.state_changed.emit("loading")
        if self._data is None:
            self._data = load_dataset(self._dataset_name)
        d = self._data
        self.dataset_ready.emit(
            DatasetInfo(
                d.name,
                tuple(d.classes),
                {s: readonly(d.split(s).images.numpy()) for s in ("train", "test")},
                {s: readonly(d.split(s).y.numpy()) for s in ("train", "test")},
            )
        )
        self._new_model(self.config, "fresh weights")
        self.state_changed.emit("ready")

    def _device(self, name: str) -> torch.device:
        try:
            return resolve_device(name)
        except DeviceError as e:
            self.error.emit(e.title, f"{e}; using the CPU instead")
            return torch.device("cpu")

    def _new_model(self, config: TrainConfig, source: str) -> None:
        config.validate()
        self.config = config
        self._model_name = config.model
        self._model = build_model(config.model, len(self._data.classes), seed=config.seed)
        self._model.to(self._device(config.device))
        self._optimizer, self._iter, self._running, self._step = None, None, False, 0
        self._stack.clear()
        self._lrs.clear()
        self._source = source
        self._maps.clear()
        self._next_record = 0
        self._emit_maps()
        self._emit_model()

    def _emit_model(self) -> None:
        m = self._model
        self.model_changed.emit(
            ModelInfo(
                self._model_name,
                count_parameters(m),
                str(next(m.parameters()).device),
                self.config,
                self._step,
                self._source,
            )
        )

    # -------------------------------------------------------------- training
    @Slot(object)
    @_reporting
    def start(self, config: TrainConfig) -> None:
        """Start a new run from freshly initialised weights."""
        self._abandon_job()
        self._new_model(config, "trained")
        self._optimizer = make_optimizer(self._model, config)
        self._iter = train(self._model, self._data, config, self._optimizer)
        self._running = True
        self.state_changed.emit("training")
        self._timer.start()

    @Slot()
    def pause(self) -> None:
        if self._running:
            self._running = False
            self.state_changed.emit("paused")

    @Slot()
    def resume(self) -> None:
        if self._iter is not None and not self._running:
            self._stack.clear()  # steps taken before are now part of training history
            self._lrs.clear()
            self._running = True
            self.state_changed.emit("training")
            self._timer.start()

    @Slot()
    def stop(self) -> None:
        if self._iter is not None:
            self._iter.close()
            self._iter, self._running = None, False
            self.state_changed.emit("stopped")

    @Slot(object)
    @_reporting
    def one_batch(self, config: TrainConfig) -> None:
        """Train exactly one batch (starting a paused run with ``config`` if none is active)."""
        self._abandon_job()
        if self._iter is None:
            self._new_model(config, "trained")
            self._optimizer = make_optimizer(self._model, config)
            self._iter = train(self._model, self._data, config, self._optimizer)
        self._running = False
        self._single = True
        self._timer.start()

    def _tick(self) -> None:
        if self.stop_requested:
            self._timer.stop()
            return
        if self._pending is not None:
            gen, request = self._pending
            self._pending = None
            self._decompose_now(gen, request)
        if self._job is not None:
            self._step_job()
            return
        if self._iter is not None and self._running and self._record_due():
            self._start_job(-1, "kernel_map", self._kernel_map_record())
            return
        if self._iter is None or not (self._running or self._single):
            self._timer.stop()
            return
        out: list[TrainRecord] = []
        ended, error = None, None  # the run's end state and error, reported after its records
        deadline = time.perf_counter() + self.tick_seconds
        try:
            while not self.stop_requested:
                out.append(next(self._iter))
                self._step = out[-1].step
                if self._single or time.perf_counter() > deadline:
                    break
        except StopIteration:
            ended = "finished"
        except TrainingDiverged as e:
            log.warning("%s", e)
            ended, error = "stopped", (e.title, str(e))
        except Exception as e:
            log.exception("training failed")
            ended, error = "stopped", ("Training failed", f"{type(e).__name__}: {e}")
        if ended is not None:
            self._iter, self._running = None, False
        if out:
            self.records.emit(tuple(out))
        if error is not None:
            self.error.emit(*error)
        if ended is not None:
            self.state_changed.emit(ended)
        if self._single:
            self._single = False
            if self._iter is not None:
                self.state_changed.emit("paused")

    # ---------------------------------------------------------- decomposition
    def _x(self, split: str, index: int) -> torch.Tensor:
        s = self._data.split(split)
        if not 0 <= index < len(s):
            raise NtkvizError(
                f"index {index} is out of range for the {split} split (0–{len(s) - 1})"
            )
        return s.x[index].to(next(self._model.parameters()).device)

    @Slot(int, object)
    def request_decomposition(self, generation: int, request: PairRequest) -> None:
        """Queue a decomposition; only the newest queued request is computed."""
        self._pending = (generation, request)
        if not self._timer.isActive():
            self._timer.start()

    @_reporting
    def _decompose_now(self, generation: int, r: PairRequest, after_step: bool = False) -> None:
        try:
            self._decompose(generation, r)
        except StepDiverged as e:
            if not after_step:
                raise
            raise StepDiverged(
                r.lr,
                "the model's outputs",
                prefix="The step was applied, but its successor cannot be previewed: ",
            ) from e

    def _decompose(self, generation: int, r: PairRequest) -> None:
        dec = decompose(
            self._model, self._x(r.split_o, r.index_o), self._x(r.split_u, r.index_u), r.y_u,
            r.lr, r.loss,
        )  # fmt: skip
        result = DecompositionResult(
            r, dec, self._step, len(self._stack), self._model_name, self.config.seed
        )
        self.decomposition_ready.emit(generation, result)

    @Slot(int, str, int)
    @_reporting
    def find_confidently_wrong(self, generation: int, split: str, label: int) -> None:
        """Find the example of ``split`` (of class ``label``, or any if -1) that the model
        misclassifies with the highest confidence."""
        s = self._data.split(split)
        idx = torch.arange(len(s)) if label < 0 else (s.y == label).nonzero()[:, 0]
        device = next(self._model.parameters()).device
        best, best_p = -1, -1.0
        with torch.no_grad():
            was = self._model.training
            self._model.eval()
            for chunk in idx.split(4000):
                probs = F.softmax(self._model(s.x[chunk].to(device)), -1).cpu()
                p, pred = probs.max(1)
                p = torch.where(pred != s.y[chunk], p, torch.tensor(-1.0))
                k = int(p.argmax())
                if float(p[k]) > best_p:
                    best, best_p = int(chunk[k]), float(p[k])
            self._model.train(was)
        self.search_done.emit(generation, split, best if best_p >= 0 else -1)

    # ----------------------------------------------------------- step-through
    def _clone_state(self) -> dict:
        return {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    @Slot(int, object)
    @_reporting
    def apply_step(self, generation: int, r: PairRequest) -> None:
        """One plain-SGD step (no momentum, no weight decay) on (x_u, y_u) in eval mode."""
        self._abandon_job()
        if not math.isfinite(r.lr):
            raise NtkvizError(f"η must be finite, got {r.lr}")
        self.pause()
        self._stack.append(self._clone_state())
        self._lrs.append(r.lr)
        model = self._model
        was = model.training
        model.eval()
        try:
            xu = self._x(r.split_u, r.index_u)[None]
            y = torch.tensor([r.y_u], device=xu.device)
            model.zero_grad(set_to_none=True)
            ce = F.cross_entropy(model(xu), y)
            (ce if r.loss == "ce" else -ce).backward()
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad and p.grad is not None:
                        p -= r.lr * p.grad
            model.zero_grad(set_to_none=True)
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                raise StepDiverged(r.lr, "the parameters")
            with torch.no_grad():
                both = torch.cat([xu, self._x(r.split_o, r.index_o)[None]])
                if not torch.isfinite(model(both)).all():
                    raise StepDiverged(r.lr, "the logits of x_u or x_o")
        except Exception:  # the model is left as it was before the step
            model.load_state_dict(self._stack.pop())
            self._lrs.pop()
            raise
        finally:
            model.train(was)
        self._after_step_change(generation, r)

    @Slot(int, object)
    @_reporting
    def undo(self, generation: int, r: PairRequest) -> None:
        """Restore the parameters from before the last applied step, bit for bit."""
        self._abandon_job()
        if not self._stack:
            self.message.emit("nothing to undo")
            return
        self._model.load_state_dict(self._stack.pop())
        self._lrs.pop()
        self._after_step_change(generation, r)

    @Slot(int, object)
    @_reporting
    def reset_steps(self, generation: int, r: PairRequest) -> None:
        """Return to the state before the first applied step."""
        self._abandon_job()
        if self._stack:
            self._model.load_state_dict(self._stack[0])
            self._stack.clear()
            self._lrs.clear()
        self._after_step_change(generation, r)

    def _after_step_change(self, generation: int, r: PairRequest) -> None:
        self.history_changed.emit(generation, self._history(r))
        self._decompose_now(generation, r, True)  # after a step

    @Slot(int, object)
    @_reporting
    def send_history(self, generation: int, r: PairRequest) -> None:
        self.history_changed.emit(generation, self._history(r))

    def _history(self, r: PairRequest) -> StepHistory:
        x = torch.stack([self._x(r.split_o, r.index_o), self._x(r.split_u, r.index_u)])
        states = [*self._stack, None]
        probs = []
        with torch.no_grad():
            was = self._model.training
            self._model.eval()
            for state in states:
                z = self._model(x) if state is None else functional_call(self._model, state, (x,))
                probs.append(F.softmax(z.double(), -1).cpu().numpy())
            self._model.train(was)
        probs = np.stack(probs)  # (S + 1, 2, V)
        return StepHistory(r, readonly(probs[:, 0]), readonly(probs[:, 1]), tuple(self._lrs))

    # ------------------------------------------------------------ state I/O
    @Slot(int)
    def send_state_dict(self, generation: int) -> None:
        """Emit a CPU copy of the model's state_dict (for tests and inspection)."""
        state = {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}
        self.state_dict_ready.emit(generation, state)

    @Slot(str, object)
    @_reporting
    def save_checkpoint(self, path: str, metadata: dict) -> None:
        """Save the model with ``metadata`` and its training step (and applied steps)."""
        metadata = {**metadata, "step": self._step, "applied_steps": len(self._stack)}
        save_checkpoint(path, self._model, self._model_name, self.config, metadata)
        self.message.emit(f"saved checkpoint {path}")

    @Slot(str)
    @_reporting
    def load_checkpoint(self, path: str) -> None:
        self._abandon_job()
        ckpt = load_checkpoint(path)
        self.stop()
        self.config = ckpt.config
        self._model_name = ckpt.model_name
        self._model = ckpt.model.to(self._device(ckpt.config.device))
        self._optimizer, self._iter, self._running = None, None, False
        self._step = int(ckpt.metadata.get("step", 0))
        self._stack.clear()
        self._lrs.clear()
        self._source = path
        self._emit_model()
        self.state_changed.emit("ready")
        self.message.emit(f"loaded checkpoint {path}")

    # ------------------------------------------------------------------ jobs
    def _start_job(self, generation: int, kind: str, gen) -> None:
        """Run ``gen`` chunk by chunk from the timer: it yields ``(done, total)`` tuples, then
        its result. A new job replaces (cancels) the running one."""
        if self._job is not None:
            old_generation, old_kind, old = self._job
            old.close()
            self.job_cancelled.emit(old_generation, old_kind)
        self.cancel_requested = False
        self._job = (generation, kind, gen)
        if not self._timer.isActive():
            self._timer.start()

    def _abandon_job(self) -> None:
        """The model is about to change: a running job would mix two sets of weights, so cancel
        it (its requester is told through ``job_cancelled``)."""
        if self._job is not None:
            generation, kind, gen = self._job
            gen.close()
            self._job, self.cancel_requested = None, False
            self.job_cancelled.emit(generation, kind)
            self.message.emit(f"{kind.replace('_', ' ')} cancelled: the model changed")

    @Slot()
    def cancel_job(self) -> None:
        """Cancel the running job (the GUI also sets ``cancel_requested`` directly)."""
        if self._job is not None:
            self.cancel_requested = True
            self._step_job()

    def _step_job(self) -> None:
        generation, kind, gen = self._job
        deadline = time.perf_counter() + self.tick_seconds
        try:
            while True:
                if self.cancel_requested or self.stop_requested:
                    gen.close()
                    self._job, self.cancel_requested = None, False
                    self.job_cancelled.emit(generation, kind)
                    self.message.emit(f"{kind.replace('_', ' ')} cancelled")
                    return
                item = next(gen)
                if isinstance(item, tuple):
                    self.job_progress.emit(generation, kind, int(item[0]), int(item[1]))
                    if time.perf_counter() > deadline:
                        return
                    continue
                self._job = None
                self._finish_job(generation, kind, item)
                return
        except StopIteration:
            self._job = None
        except Exception as e:
            self._job = None
            if not isinstance(e, NtkvizError | ValueError):
                log.exception("job %s failed", kind)
            self.error.emit(f"{kind.replace('_', ' ').capitalize()} failed", str(e))
            self.job_cancelled.emit(generation, kind)

    def _finish_job(self, generation: int, kind: str, item) -> None:
        if kind == "influence":
            self.influence_ready.emit(generation, item)
        elif kind == "spectrum":
            self.spectrum_ready.emit(generation, item)
        elif kind == "kernel_map":
            self._maps.append((item["step"], item["map"]))
            self._emit_maps()

    def _device_of_model(self) -> torch.device:
        return next(self._model.parameters()).device

    # ---------------------------------------------------------- influence
    @Slot(int, object)
    @_reporting
    def compute_influence(self, generation: int, r: ProbeRequest) -> None:
        """Start the influence sweep of ``r`` over the test split (chunked; cancellable)."""
        self._x(r.split_u, r.index_u)  # a clear error for a bad index, now
        self._start_job(generation, "influence", self._influence_job(r))

    def _influence_job(self, r: ProbeRequest):
        s = self._data.split("test")
        idx = probe_indices(len(s), r.size, r.seed)
        nidx = idx[: r.norm_size] if r.norm_size > 0 else None
        total = len(idx) + (0 if nidx is None else len(nidx))
        x_u = self._x(r.split_u, r.index_u)
        device = self._device_of_model()
        yield 0, total
        inf = None
        for item in iter_influence(
            self._model, s.x[idx].to(device), x_u, r.y_u, r.lr, r.loss, actual=r.actual,
            chunk_size=250,
        ):  # fmt: skip
            if isinstance(item, Influence):
                inf = item
            else:
                yield item[0], total
        norms = None
        if nidx is not None:
            for item in iter_influence(
                self._model, s.x[nidx].to(device), x_u, r.y_u, r.lr, r.loss, kernel_norm=True,
                chunk_size=100,
            ):  # fmt: skip
                if isinstance(item, Influence):
                    norms = item.kernel_norm
                else:
                    yield len(idx) + item[0], total
        labels = s.y[idx].numpy()
        yield InfluenceResult(
            request=r,
            indices=readonly(idx),
            labels=readonly(labels),
            influence=inf,
            classes=class_influence(inf, labels, len(self._data.classes)),
            norm_indices=None if nidx is None else readonly(nidx),
            norm_labels=None if nidx is None else readonly(s.y[nidx].numpy()),
            kernel_norm=norms,
            step=self._step,
        )

    # ------------------------------------------------------------ kernel maps
    @Slot(bool, int, int)
    def set_kernel_recording(self, on: bool, every: int, per_class: int) -> None:
        """Record a class×class kernel map at the start and every ``every`` training steps on
        ``per_class`` test examples of each class (a new ``per_class`` clears the maps)."""
        if per_class != self._per_class and self._maps:
            self._maps.clear()
            self._emit_maps()
        self._record_maps, self._record_every, self._per_class = on, max(1, every), per_class
        if on:
            last = self._maps[-1][0] if self._maps else None
            self._next_record = self._step if last is None else last + self._record_every

    @Slot(int)
    @_reporting
    def record_kernel_map(self, generation: int) -> None:
        """Record one class×class kernel map now."""
        self._start_job(generation, "kernel_map", self._kernel_map_record())

    def _record_due(self) -> bool:
        return self._record_maps and self._step >= self._next_record

    def _kernel_map_record(self):
        s = self._data.split("test")
        idx = balanced_indices(s.y, self._per_class)
        step = self._step
        self._next_record = step + self._record_every
        x = s.x[idx].to(self._device_of_model())
        for item in kernel_map_job(self._model, x, s.y[idx].numpy(), len(self._data.classes)):
            if isinstance(item, tuple):
                yield item
            else:
                yield {"step": step, "map": item}

    def _emit_maps(self) -> None:
        C = len(self._data.classes) if self._data is not None else 10
        maps = np.stack([m for _, m in self._maps]) if self._maps else np.zeros((0, C, C))
        corr = [rank_correlation(m, maps[-1]) for m in maps]
        self.kernel_maps_changed.emit(
            KernelMaps(
                readonly(np.array([s for s, _ in self._maps], dtype=np.int64)),
                readonly(maps),
                readonly(np.array(corr, dtype=np.float64)),
                self._per_class,
            )
        )

    # -------------------------------------------------------------- squeeze
    @Slot(int, str, int, int, float, int)
    @_reporting
    def compute_squeeze(
        self, generation: int, split: str, index: int, y: int, lr: float, steps: int
    ) -> None:
        """Negative and positive runs of ``steps`` steps on (x, y) and a one-step η sweep."""
        x = self._x(split, index)
        neg = squeeze_steps(self._model, x, y, lr, steps, loss="neg")
        ce = squeeze_steps(self._model, x, y, lr, steps, loss="ce")
        lrs = np.geomspace(lr / 100, lr * 10, 7)
        p0 = neg.probs[0].copy()
        p0[y] = -np.inf
        top = int(p0.argmax())
        mass = [
            squeeze_steps(self._model, x, y, float(e), 1, "neg").probs[1, top] - neg.probs[0, top]
            for e in lrs
        ]
        test = self._data.split("test")
        idx = np.sort(np.random.default_rng(0).choice(len(test), SURVEY_SIZE, replace=False))
        xs = test.x[idx].to(next(self._model.parameters()).device)
        survey = squeeze_survey(self._model, xs, test.y[idx].numpy(), lr)
        result = SqueezeResult(
            split, index, y, neg, ce, readonly(lrs), readonly(mass), self._step,
            readonly(idx), survey,
        )  # fmt: skip
        self.squeeze_ready.emit(generation, result)

    # ------------------------------------------------------- layers, spectrum
    @Slot(int, object)
    @_reporting
    def compute_layers(self, generation: int, r: PairRequest) -> None:
        """K(x_o, x_u) split by parameter group."""
        x_o, x_u = self._x(r.split_o, r.index_o), self._x(r.split_u, r.index_u)
        parts = empirical_ntk_by_layer(self._model, x_o[None], x_u[None])
        blocks = {k: readonly(v[0, 0].double().cpu().numpy()) for k, v in parts.items()}
        names = tuple(blocks)
        norms = np.array([np.linalg.norm(blocks[n]) for n in names])
        total = float(np.linalg.norm(sum(blocks.values())))
        self.layers_ready.emit(
            generation, LayerResult(r, names, readonly(norms), blocks, total, self._step)
        )

    @Slot(int, int)
    @_reporting
    def compute_spectrum(self, generation: int, n: int) -> None:
        """Eigenvalues of the NTK Gram matrix of ``n`` balanced test examples (a job)."""
        self._start_job(generation, "spectrum", self._spectrum_job(n))

    def _spectrum_job(self, n: int):
        s = self._data.split("test")
        idx = balanced_indices(s.y, max(1, n // len(self._data.classes)))
        yield 0, 1
        eig = ntk_spectrum(self._model, s.x[idx].to(self._device_of_model()))
        yield SpectrumResult(readonly(idx), eig, self._step)

    # ------------------------------------------------------------- sessions
    @Slot(str, object)
    @_reporting
    def save_session(self, path: str, gui: dict) -> None:
        """Write weights, config, step-through stack and kernel maps, with the window's
        ``gui`` part (``curves``, ``selection``), to ``path``."""
        history = [
            {"lr": float(lr), "state_before": {k: v.detach().cpu() for k, v in st.items()}}
            for lr, st in zip(self._lrs, self._stack, strict=True)
        ]
        session = Session(
            model_name=self._model_name,
            state_dict={k: v.detach().cpu() for k, v in self._model.state_dict().items()},
            config=self.config,
            step=self._step,
            curves=dict(gui.get("curves", {})),
            selection=dict(gui.get("selection", {}), kernel_map_per_class=self._per_class),
            history=history,
            kernel_maps=list(self._maps),
        )
        save_session(path, session)
        self.session_saved.emit(str(path))
        self.message.emit(f"saved session {path}")

    @Slot(str)
    @_reporting
    def open_session(self, path: str) -> None:
        """Replace everything by the session in ``path``; a bad file changes nothing."""
        session = load_session(path)
        model = session.build_model()
        stack, lrs = [], []
        probe = session.build_model()
        for k, h in enumerate(session.history):
            try:
                probe.load_state_dict(h["state_before"])
                lrs.append(float(h["lr"]))
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise SessionError(
                    f"{path}: step-through history entry {k} is damaged: {e}"
                ) from None
            stack.append({k2: v.clone() for k2, v in h["state_before"].items()})
        maps = [(int(s), readonly(m)) for s, m in session.kernel_maps]
        try:
            session.config.validate()
        except ValueError as e:
            raise SessionError(f"{path}: invalid training config: {e}") from None
        # ---- everything checked: now replace the state
        self._abandon_job()
        self.stop()
        device = self._device(session.config.device)
        self.config = session.config
        self._model_name = session.model_name
        self._model = model.to(device)
        self._optimizer, self._iter, self._running = None, None, False
        self._step = session.step
        self._stack = [{k: v.to(device) for k, v in st.items()} for st in stack]
        self._lrs = lrs
        self._maps = maps
        self._per_class = int(session.selection.get("kernel_map_per_class", self._per_class))
        self._source = str(path)
        self._emit_model()
        self._emit_maps()
        self.session_loaded.emit(session)
        self.state_changed.emit("ready")
        self.message.emit(f"opened session {path}")

    @Slot()
    def shutdown(self) -> None:
        """Stop everything and end the thread's event loop."""
        self._timer.stop()
        if self._job is not None:
            self._job[2].close()
            self._job = None
        if self._iter is not None:
            self._iter.close()
            self._iter = None
        QThread.currentThread().quit()
