"""TrainingWorker: the one object that owns the model, living on its own ``QThread``.

The window talks to it only through queued signals; it answers with immutable results (frozen
dataclasses holding read-only numpy copies), never live tensors. Long work (training) is a
generator stepped for a few tens of milliseconds per zero-timeout timer tick, after which control
returns to the worker's event loop, so pause, stop and other commands take effect at once.
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

from ntkviz.checkpoint import load_checkpoint, save_checkpoint
from ntkviz.data import ImageDataset, load_dataset
from ntkviz.decomposition import Decomposition, decompose
from ntkviz.errors import DeviceError, NtkvizError, TrainingDiverged
from ntkviz.models import build_model, count_parameters
from ntkviz.training import TrainConfig, TrainRecord, make_optimizer, resolve_device, train

log = logging.getLogger(__name__)


def _readonly(a) -> np.ndarray:
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


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


def _reporting(fn):
    """Turn any exception of a slot into an ``error`` signal (and a log entry)."""

    @functools.wraps(fn)
    def wrapper(self, *args):
        try:
            return fn(self, *args)
        except NtkvizError as e:
            log.warning("%s: %s", fn.__name__, e)
            self.error.emit(type(e).__name__, str(e))
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
                {s: _readonly(d.split(s).images.numpy()) for s in ("train", "test")},
                {s: _readonly(d.split(s).y.numpy()) for s in ("train", "test")},
            )
        )
        self._new_model(self.config, "fresh weights")
        self.state_changed.emit("ready")

    def _device(self, name: str) -> torch.device:
        try:
            return resolve_device(name)
        except DeviceError as e:
            self.error.emit("Device not available", f"{e}; using the CPU instead")
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
        if self._iter is None or not (self._running or self._single):
            self._timer.stop()
            return
        out: list[TrainRecord] = []
        deadline = time.perf_counter() + self.tick_seconds
        try:
            while not self.stop_requested:
                out.append(next(self._iter))
                self._step = out[-1].step
                if self._single or time.perf_counter() > deadline:
                    break
        except StopIteration:
            self._iter, self._running = None, False
            self.state_changed.emit("finished")
        except TrainingDiverged as e:
            log.warning("%s", e)
            self._iter, self._running = None, False
            self.error.emit("Training diverged", str(e))
            self.state_changed.emit("stopped")
        except Exception as e:
            log.exception("training failed")
            self._iter, self._running = None, False
            self.error.emit("Training failed", f"{type(e).__name__}: {e}")
            self.state_changed.emit("stopped")
        finally:
            if out:
                self.records.emit(tuple(out))
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
    def _decompose_now(self, generation: int, r: PairRequest) -> None:
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
        finally:
            model.train(was)
        self._after_step_change(generation, r)

    @Slot(int, object)
    @_reporting
    def undo(self, generation: int, r: PairRequest) -> None:
        """Restore the parameters from before the last applied step, bit for bit."""
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
        if self._stack:
            self._model.load_state_dict(self._stack[0])
            self._stack.clear()
            self._lrs.clear()
        self._after_step_change(generation, r)

    def _after_step_change(self, generation: int, r: PairRequest) -> None:
        self.history_changed.emit(generation, self._history(r))
        self._decompose_now(generation, r)

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
        return StepHistory(r, _readonly(probs[:, 0]), _readonly(probs[:, 1]), tuple(self._lrs))

    # ------------------------------------------------------------ state I/O
    @Slot(int)
    def send_state_dict(self, generation: int) -> None:
        """Emit a CPU copy of the model's state_dict (for tests and inspection)."""
        state = {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}
        self.state_dict_ready.emit(generation, state)

    @Slot(str, object)
    @_reporting
    def save_checkpoint(self, path: str, metadata: dict) -> None:
        save_checkpoint(path, self._model, self._model_name, self.config, metadata)
        self.message.emit(f"saved checkpoint {path}")

    @Slot(str)
    @_reporting
    def load_checkpoint(self, path: str) -> None:
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

    @Slot()
    def shutdown(self) -> None:
        """Stop everything and end the thread's event loop."""
        self._timer.stop()
        if self._iter is not None:
            self._iter.close()
            self._iter = None
        QThread.currentThread().quit()
