"""Training as a generator: one small immutable record per batch, so a worker can pause or stop
between any two batches.

SGD (momentum, weight decay, optionally Nesterov), Adam or AdamW, with a cosine learning-rate
schedule (per step, to 0 at the end). Seeded and deterministic on CPU: the same config and seed give
identical losses. A step whose loss or updated parameters are not finite stops training with
:class:`~ntkviz.errors.TrainingDiverged`, the model put back as the last completed step left it.
With a :class:`~ntkviz.accounting.Watch`, each record
also carries the exact account of its step for the watched examples (the trajectory is unchanged).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ntkviz.data import ImageDataset, subset_indices
from ntkviz.errors import DeviceError, TrainingDiverged
from ntkviz.kernel import _device_dtype

if TYPE_CHECKING:
    from ntkviz.accounting import Watch, WatchAccount

#: Optimizers :func:`make_optimizer` builds, by ``TrainConfig.optimizer``.
OPTIMIZERS = ("sgd", "adam", "adamw")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. Defaults reach ≥ 95 % MNIST test accuracy in well under a minute on a
    2-core CPU; :meth:`paper` gives the paper's settings (2,000 images, lr 1e-3)."""

    model: str = "lenet"
    train_size: int | None = None  #: examples drawn (seeded) from the training split; None = all
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 2
    seed: int = 0
    device: str = "auto"
    eval_every: int = 100  #: steps between test-accuracy evaluations (and at the end)
    eval_size: int | None = 2000  #: test images used for periodic accuracy; None = all
    optimizer: str = "sgd"  #: "sgd" (uses momentum, nesterov), "adam" or "adamw" (betas, eps)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self):
        # Configs read back from files may hold betas as a list.
        if isinstance(self.betas, list | tuple):
            object.__setattr__(self, "betas", tuple(self.betas))

    @classmethod
    def paper(cls, **overrides) -> TrainConfig:
        """Ren & Sutherland's MNIST setting."""
        return replace(cls(train_size=2000, lr=1e-3, epochs=50), **overrides)

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message for impossible values."""
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"learning rate must be a positive finite number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be ≥ 0, got {self.weight_decay}")
        for name in ("batch_size", "epochs", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2⁶³), got {self.seed!r}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size must be ≥ 1 or None, got {self.train_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum <= 0):
            raise ValueError("nesterov needs the sgd optimizer with a momentum > 0")
        betas = self.betas
        if not (
            isinstance(betas, tuple)
            and len(betas) == 2
            and all(isinstance(b, int | float) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if not (isinstance(self.eps, int | float) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a positive finite number, got {self.eps!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainRecord:
    """State after one batch. ``test_accuracy`` is set only on evaluation steps."""

    step: int  #: 1-based count of optimizer steps taken
    total_steps: int
    epoch: int  #: 0-based
    loss: float
    batch_accuracy: float
    lr: float  #: learning rate used for this step
    test_accuracy: float | None = None
    #: indices into ``data.train`` of the batch's examples ``(B,)`` int64, read-only
    batch_indices: np.ndarray | None = field(default=None, compare=False)
    #: the step's account for the watched examples (``train(..., watch=...)``), else None
    account: WatchAccount | None = field(default=None, compare=False)


def resolve_device(name: str) -> torch.device:
    """ "auto" (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:N" or "mps"; raises DeviceError."""
    name = (name or "auto").lower()
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} requested but CUDA is not available on this machine"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    if name == "mps":
        if not has_mps:
            raise DeviceError("device 'mps' requested but MPS is not available on this machine")
        return torch.device("mps")
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda or mps")


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2000) -> float:
    """Fraction of ``x (N, ...)`` classified as ``y (N,)``, in eval mode (mode restored)."""
    was = model.training
    model.eval()
    dev, dtype = _device_dtype(model)
    correct = 0
    for xs, ys in zip(x.split(batch), y.split(batch)):
        correct += (model(xs.to(dev, dtype)).argmax(1).cpu() == ys).sum().item()
    model.train(was)
    return correct / max(1, len(y))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over the model's parameters: SGD (lr, momentum, weight decay,
    Nesterov), Adam (lr, betas, eps, L2 weight decay) or AdamW (decoupled weight decay)."""
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {config.optimizer!r}"
        )
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            nesterov=config.nesterov,
        )
    kind = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return kind(
        model.parameters(),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        weight_decay=config.weight_decay,
    )


def train(
    model: nn.Module,
    data: ImageDataset,
    config: TrainConfig,
    optimizer: torch.optim.Optimizer | None = None,
    start_step: int = 0,
    watch: Watch | None = None,
) -> Iterator[TrainRecord]:
    """Train ``model`` in place, yielding a :class:`TrainRecord` after every batch.

    The model must already be on the config's device. Pass ``optimizer`` and ``start_step`` to
    continue a run. ``watch``: examples to account for; each record then carries the
    :class:`~ntkviz.accounting.WatchAccount` of its step (identical losses and weights as without).
    Raises :class:`TrainingDiverged` when a step's loss or updated parameters are not finite:
    the model's parameters and buffers are put back as they were before that step (as the last
    record left them) and, if the update was taken, the optimizer's state is cleared. Raises
    ``ValueError`` for settings or watched examples that cannot work — at once, before the first
    step.
    """
    config.validate()
    floats = [p for p in model.parameters() if p.is_floating_point()]
    # Adam's first step is η/(1 − β₁) per unit of its normalised gradient
    step_size = config.lr / (1 - config.betas[0]) if config.optimizer != "sgd" else config.lr
    if floats and step_size > torch.finfo(floats[0].dtype).max:
        adam = f" (Adam's first step: η/(1 − β₁) = {step_size:g})" if step_size != config.lr else ""
        raise ValueError(
            f"the learning rate {config.lr:g} overflows the parameters' {floats[0].dtype}{adam}"
        )
    if watch is not None:
        if optimizer is not None:
            from ntkviz.accounting import _check_optimizer

            _check_optimizer(model, optimizer)
        if watch.x.shape[1:] != data.train.x.shape[1:]:
            raise ValueError(
                f"watched examples must be shaped like the data's {tuple(data.train.x.shape[1:])}, "
                f"got {tuple(watch.x.shape[1:])}"
            )
        if max(watch.classes) >= data.num_classes:
            raise ValueError(f"watched classes must be in [0, {data.num_classes})")
    idx = subset_indices(len(data.train), config.train_size, config.seed)
    # BatchNorm1d on (N, C) features has one value per channel in a batch of one (BatchNorm2d
    # has the image's positions too): torch refuses to train on it
    if (config.batch_size == 1 or len(idx) % config.batch_size == 1) and any(
        isinstance(m, nn.BatchNorm1d) for m in model.modules()
    ):
        which = (
            "every batch holds one"
            if config.batch_size == 1
            else f"with {len(idx)} training examples in batches of {config.batch_size} the last "
            "batch of every epoch holds one"
        )
        raise ValueError(
            f"BatchNorm1d cannot train on a batch of one example, and {which}: choose another "
            "training-set size or batch size"
        )
    return _steps(model, data, config, optimizer, start_step, watch, idx)


def _steps(model, data, config, optimizer, start_step, watch, idx) -> Iterator[TrainRecord]:
    """:func:`train`'s steps, its arguments checked."""
    device, dtype = _device_dtype(model)
    if watch is not None:
        from ntkviz.accounting import AccountedStep

        x_watch = watch.x.to(device, dtype)
    x_all, y_all = data.train.x[idx], data.train.y[idx]
    eval_idx = subset_indices(len(data.test), config.eval_size, config.seed)
    x_eval, y_eval = data.test.x[eval_idx], data.test.y[eval_idx]
    steps_per_epoch = math.ceil(len(idx) / config.batch_size)
    total = steps_per_epoch * config.epochs
    opt = optimizer or make_optimizer(model, config)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    kept = [*params, *model.buffers()]  # as they were before the step being taken
    last_good = [t.detach().clone() for t in kept]
    model.train()
    accounting = None
    log.info(
        "training %s on %d images: %d steps (its schedule from step %d), %s",
        type(model).__name__,
        len(idx),
        total,
        start_step,
        config,
    )
    step, test_acc = 0, None
    for epoch in range(config.epochs):
        order = torch.randperm(len(idx), generator=gen)
        for b in range(steps_per_epoch):
            step += 1
            if step <= start_step:
                continue
            lr = scheduled_lr(config.lr, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = order[b * config.batch_size : (b + 1) * config.batch_size]
            xb, yb = x_all[batch].to(device, dtype), y_all[batch].to(device)
            with torch.no_grad():
                for t, good in zip(kept, last_good):
                    good.copy_(t)
            if watch is not None and accounting is None:  # set up once: each step starts the next
                accounting = AccountedStep(
                    model, opt, x_watch, classes=watch.classes, top_kernels=True,
                    focus=watch.focus, continued=True,
                )  # fmt: skip
            value, updating = math.nan, False
            try:
                logits = accounting.forward(xb) if watch is not None else model(xb)
                if logits.ndim != 2 or len(logits) != len(yb) or logits.shape[1] < data.num_classes:
                    raise ValueError(
                        f"in training mode the model maps a batch {tuple(xb.shape)} to logits of "
                        f"shape {tuple(logits.shape)}, not (B, V) for the data's "
                        f"{data.num_classes} classes"
                    )
                loss = F.cross_entropy(logits, yb)
                value = loss.item()
                if not math.isfinite(value):  # no update yet: the forward's statistics go back
                    raise TrainingDiverged(step, lr, value)
                opt.zero_grad(set_to_none=True)
                updating = True
                account = None
                if watch is not None:
                    account = accounting.step(loss, yb)
                else:
                    loss.backward()
                    opt.step()
                if not all(bool(p.isfinite().all()) for p in params):
                    raise TrainingDiverged(step, lr, value)
            except BaseException as e:  # the model as before this step, whatever went wrong
                _put_back(kept, last_good)
                if updating:
                    opt.state.clear()  # it may hold this step's update, or part of it
                # torch's "value cannot be converted … without overflow": Adam's η/(1 − β₁ᵗ)
                overflow = isinstance(e, RuntimeError) and "overflow" in str(e)
                if isinstance(e, TrainingDiverged) or overflow:
                    log.info("training diverged at step %d (lr %.3g, loss %s)", step, lr, value)
                    raise TrainingDiverged(step, lr, value) from None
                raise
            acc = (logits.argmax(1) == yb).float().mean().item()
            test_acc = None
            if step % config.eval_every == 0 or step == total:
                test_acc = accuracy(model, x_eval, y_eval)
                model.train()
            batch_indices = idx[batch].numpy()
            batch_indices.flags.writeable = False
            yield TrainRecord(step, total, epoch, value, acc, lr, test_acc, batch_indices, account)
    log.info("training ended after %d steps, test accuracy %s", step, test_acc)


def scheduled_lr(base: float, step: int, total: int) -> float:
    """η of step ``step`` (1-based) of a run of ``total`` steps: the cosine schedule from
    ``base`` towards 0."""
    return 0.5 * base * (1 + math.cos(math.pi * (step - 1) / total))


def _put_back(kept: list, last_good: list) -> None:
    """The model's parameters and buffers as they were before the step being taken."""
    with torch.no_grad():
        for t, good in zip(kept, last_good):
            t.copy_(good)


@dataclass(frozen=True)
class RunHealth:
    """How a run ended compared with how it started. ``initial_loss``/``final_loss``: means of
    its first and last losses (cross-entropy, nats; see :func:`run_health`); ``accuracy``: the
    final test accuracy (None if unknown); ``chance``: 1/C.

    A run ends *far worse than it started* when its final loss exceeds its initial loss by more
    than 10 % (the steps made the model worse overall: a learning rate that diverges without
    overflowing), or when after ``steps`` ≥ 50 steps its accuracy is at chance level, at most
    1.25/C (12.5 % for 10 classes); a shorter run may not have learnt anything yet."""

    initial_loss: float
    final_loss: float
    accuracy: float | None
    chance: float
    steps: int = 0

    @property
    def loss_rose(self) -> bool:
        return self.final_loss > 1.1 * self.initial_loss

    @property
    def at_chance(self) -> bool:
        return (
            self.steps >= 50 and self.accuracy is not None and self.accuracy <= 1.25 * self.chance
        )

    @property
    def ok(self) -> bool:
        return not (self.loss_rose or self.at_chance)

    @property
    def warning(self) -> str:
        """A sentence for the user, empty when the run is ok."""
        if self.ok:
            return ""
        parts = []
        if self.loss_rose:
            parts.append(f"the loss rose from {self.initial_loss:.3g} to {self.final_loss:.3g}")
        if self.at_chance:
            parts.append(
                f"test accuracy {self.accuracy:.1%} is at chance level ({self.chance:.0%})"
            )
        return (
            f"the run ended far worse than it started: {' and '.join(parts)}; the learning rate "
            "is probably too large"
        )


def run_health(
    losses: Sequence[float],
    accuracy: float | None = None,
    num_classes: int = 10,
    window: int = 20,
) -> RunHealth:
    """Judge a finished run from its ``losses`` (one per step, in order) and its final test
    ``accuracy``: the initial and final losses are the means of the first and last ``window``
    steps (at most a quarter of the run each), chance is 1/``num_classes``."""
    if len(losses) == 0:
        raise ValueError("need the losses of at least one step")
    k = max(1, min(window, len(losses) // 4))
    return RunHealth(
        initial_loss=float(sum(losses[:k]) / k),
        final_loss=float(sum(losses[-k:]) / k),
        accuracy=None if accuracy is None else float(accuracy),
        chance=1.0 / num_classes,
        steps=len(losses),
    )
