"""Checkpoints: weights, training config and metadata in one versioned file, written atomically.

Files are read with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
Every field is checked on load (types, ranges, that the weights fit the model); a file that fails
is refused with one :class:`~ntkviz.errors.CheckpointError` naming the field.

A checkpoint records the input shape ``[C, H, W]`` its model was built for (files without one are
1×28×28 MNIST models), so that a registry model trained on, say, 3×32×32 CIFAR is rebuilt for it.
A checkpoint of a model outside the registry (the user's own ``nn.Module``, saved with
``custom=True``) holds only weights for that model: :func:`load_checkpoint` refuses it and says how
to use it (``--model FACTORY --weights FILE``; :func:`ntkviz.modelspec.load_weights` reads it).
"""

from __future__ import annotations

import time
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ntkviz.checks import count, plain_values
from ntkviz.errors import CheckpointError
from ntkviz.files import atomic_write, load_torch_file
from ntkviz.models import MODELS, build_model
from ntkviz.training import TrainConfig

__all__ = ["Checkpoint", "atomic_write", "load_checkpoint", "load_weights_into", "save_checkpoint"]

FORMAT = "ntkviz-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: a fresh model (CPU, eval mode) with its config and metadata."""

    model: nn.Module
    model_name: str
    num_classes: int
    config: TrainConfig
    metadata: dict
    input_shape: tuple[int, int, int] = (1, 28, 28)


#: The input shape of files written before input shapes were recorded: MNIST's.
DEFAULT_INPUT_SHAPE = (1, 28, 28)

#: Shapes tried, in order, when a registry model is saved without ``input_shape``.
_COMMON_SHAPES = ((1, 28, 28), (3, 32, 32), (1, 32, 32), (3, 28, 28))


def _fits_registry(name: str, state: dict, shape: tuple[int, int, int]) -> bool:
    try:
        want = build_model(name, num_classes_of(state), 0, in_channels=shape[0],
                           image_size=shape[1]).state_dict()  # fmt: skip
    except ValueError:
        return False
    return want.keys() == state.keys() and all(want[k].shape == state[k].shape for k in want)


def registry_input_shape(name: str, state: dict) -> tuple[int, int, int]:
    """The first of 1×28×28, 3×32×32, 1×32×32, 3×28×28 that the registry model ``name`` with
    the weights ``state`` fits; raises ``ValueError`` (pass ``input_shape``) when none does."""
    for shape in _COMMON_SHAPES:
        if _fits_registry(name, state, shape):
            return shape
    raise ValueError(
        f"cannot tell which input shape this {name} was built for; pass input_shape=(C, H, W)"
    )


def input_shape_value(value, where: str = "input_shape") -> tuple[int, int, int]:
    """``value`` as ``(C, H, W)``: three positive ints (C ≤ 1024, H and W ≤ 4096); else
    ``ValueError`` saying so."""
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok or value[0] > 1024 or max(value[1:]) > 4096:
        raise ValueError(
            f"{where} must be three positive ints [C, H, W] (C ≤ 1024, H and W ≤ 4096), "
            f"got {value!r}"
        )
    return (int(value[0]), int(value[1]), int(value[2]))


def build_for(name: str, num_classes: int, input_shape, seed: int | None = None) -> nn.Module:
    """The registry model ``name`` for images ``input_shape = (C, H, W)`` (square: H = W)."""
    c, h, w = input_shape_value(input_shape)
    if h != w:
        raise ValueError(
            f"the registry models take square images; {name} cannot be built for {c}×{h}×{w} "
            "(use your own model: --model FILE.py:FACTORY)"
        )
    return build_model(name, num_classes, seed, in_channels=c, image_size=h)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    config: TrainConfig,
    metadata: dict | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    custom: bool = False,
    num_classes: int | None = None,
) -> Path:
    """Write ``model``'s weights with its config and ``metadata`` (plain values) to ``path``.

    ``input_shape``: the ``(C, H, W)`` the model was built for (for a registry model it is
    recognised when omitted among 1×28×28, 3×32×32, 1×32×32 and 3×28×28). ``custom``: the model
    is the user's own, not from the registry; ``model_name`` names it (e.g. its factory spec)
    and the file holds its weights for ``--model … --weights FILE``. ``num_classes``: V, the
    model's outputs (default: the length of the last bias vector, right for registry models; give
    it for your own). Raises ``ValueError`` for an unknown registry name and
    :class:`~ntkviz.errors.FileWriteError` (an ``OSError``) when the file cannot be written."""
    from ntkviz import __version__

    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
    if not custom and model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; save your own model with custom=True")
    metadata = {"ntkviz_version": __version__, "saved_at": time.time(), **(metadata or {})}
    plain_values(metadata, "metadata")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    if input_shape is not None:
        input_shape = input_shape_value(tuple(input_shape))
    elif not custom:
        input_shape = registry_input_shape(model_name, state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "custom": bool(custom),
        "num_classes": int(num_classes) if num_classes is not None else num_classes_of(state),
        "config": config.to_dict(),
        "metadata": metadata,
        "state_dict": state,
    }
    if input_shape is not None:
        payload["input_shape"] = list(input_shape)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def num_classes_of(state: dict) -> int:
    """The number of outputs of a registry model's state dict: the length of its last bias
    vector (ValueError when it has none)."""
    biases = [v for k, v in state.items() if str(k).endswith("bias") and getattr(v, "ndim", 0) == 1]
    if not biases:
        raise ValueError("the weights hold no bias vector to tell the number of classes by")
    return int(biases[-1].shape[0])


# --------------------------------------------------------------------------- reading


def read_payload(
    path: str | Path, fmt: str, version: int, what: str, error=CheckpointError, custom_ok=False
):
    """Load an ntkviz file (``torch.load(..., weights_only=True)``: no code runs) and check its
    format tag, format version and model name (a registry name, or any name for the user's own
    model when ``payload["custom"]`` is true and ``custom_ok``). Returns ``(payload dict, model
    name)``; raises ``error`` with the reason, ``what`` naming the kind of file ("checkpoint",
    "session")."""
    path = Path(path)
    payload = load_torch_file(path, what, error)
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path} is not an ntkviz {what}")
    found = payload.get("version")
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise error(
            f"{path} is not a valid ntkviz {what}: its format version {found!r} is not a "
            "positive integer"
        )
    if found > version:
        raise error(
            f"{path} has {what} format version {found}; this ntkviz reads up to {version}"
            " — upgrade it"
        )
    name = payload.get("model")
    custom = payload.get("custom", False)
    if not isinstance(custom, bool):
        raise error(f"{path} is not a valid ntkviz {what}: custom must be true or false")
    if custom and (not isinstance(name, str) or not name):
        raise error(f"{path} is not a valid ntkviz {what}: its model name {name!r} is not a name")
    if custom and not custom_ok:
        raise error(
            f"{path} holds the weights of your own model {name!r}, not of a model ntkviz can "
            f"build: load them into that model with --model {_spec_hint(name)} --weights {path} "
            "(in the app: File > Open model…)"
        )
    if not custom and (not isinstance(name, str) or name not in MODELS):
        raise error(
            f"{path} holds an unknown model {name!r}; this ntkviz knows {', '.join(MODELS)}"
        )
    return payload, name


def _spec_hint(name: str) -> str:
    """``name`` if it looks like a factory spec (``FILE.py:FACTORY``), else a placeholder."""
    return name if ":" in name and " " not in name else "FILE.py:FACTORY"


def _type_name(hint) -> str:
    names = {int: "an int", float: "a number", str: "a string", bool: "true or false"}
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("None" if a is type(None) else names.get(a, str(a)) for a in args)


def _fits(value, hint) -> bool:
    """Whether ``value`` is of the simple type ``hint`` (an int counts as a float; a bool counts
    only as a bool). Hints other than unions of None, bool, int, float and str accept any plain
    value (the config's own ``validate`` checks those)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if not set(args) <= {type(None), bool, int, float, str}:
        return True
    if value is None or isinstance(value, bool | str):
        return type(value) in args
    if isinstance(value, int):
        return int in args or float in args
    return isinstance(value, float) and float in args


def config_from(payload: dict) -> TrainConfig:
    """The training config stored in ``payload["config"]``: a dict whose known keys have the
    types and ranges of :class:`~ntkviz.training.TrainConfig` (missing keys take the defaults;
    keys this version does not know are ignored). Raises ``ValueError`` saying what is wrong."""
    raw = payload.get("config")
    if not isinstance(raw, dict):
        raise ValueError(f"config must be a dict of training settings, got {type(raw).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    values = {}
    for f in fields(TrainConfig):
        if f.name in raw:
            v = raw[f.name]
            if not _fits(v, hints[f.name]):
                raise ValueError(f"config {f.name} must be {_type_name(hints[f.name])}, got {v!r}")
            values[f.name] = v
    config = TrainConfig(**values)
    config.validate()
    return config


def metadata_from(payload: dict, key: str = "metadata") -> dict:
    """``payload[key]``: a dict of plain values (an empty dict when absent); its training
    ``step``, where recorded, an int ≥ 0."""
    meta = payload.get(key, {})
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must be a dict, got {type(meta).__name__}")
    plain_values(meta, key)
    meta = dict(meta)
    if "step" in meta:
        meta["step"] = count(meta["step"], f"{key}['step'] (the training step)")
    return meta


def check_state_dict(state, model: nn.Module, where: str = "state_dict") -> dict:
    """Check that ``state`` is a dict of finite tensors with exactly ``model``'s keys, shapes
    and kinds (floating-point, or integer like BatchNorm's batch counter); returns it. Raises
    ``ValueError`` naming the first misfit."""
    if not isinstance(state, dict):
        raise ValueError(f"{where} must be a dict of tensors, got {type(state).__name__}")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if missing or extra:
        parts = [f"missing {', '.join(map(str, missing[:3]))}" if missing else "",
                 f"unexpected {', '.join(map(str, extra[:3]))}" if extra else ""]  # fmt: skip
        raise ValueError(f"{where} does not fit the model ({'; '.join(p for p in parts if p)})")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}[{k!r}] must be a tensor, got {type(v).__name__}")
        if v.is_floating_point() != want[k].is_floating_point() or v.is_complex():
            kind = "floating-point" if want[k].is_floating_point() else "an integer tensor"
            raise ValueError(f"{where}[{k!r}] must be {kind}, got {v.dtype}")
        if v.shape != want[k].shape:
            raise ValueError(
                f"{where}[{k!r}] has shape {tuple(v.shape)}; the model needs {tuple(want[k].shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}[{k!r}] holds non-finite values (NaN or infinity)")
    return dict(state)


def stored_num_classes(payload: dict, default=10) -> int:
    """The file's recorded number of classes (``default`` when absent); ValueError if bad."""
    n = payload.get("num_classes", default)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 100_000:
        raise ValueError(f"num_classes must be an int ≥ 2, got {n!r}")
    return n


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint of a registry model, built for the checkpoint's input
    shape; raise :class:`CheckpointError` with the reason (also for a checkpoint of the user's
    own model, saying how to load its weights)."""
    path = Path(path)
    payload, name = read_payload(path, FORMAT, VERSION, "checkpoint")
    try:
        num_classes = stored_num_classes(payload)
        config = config_from(payload)
        metadata = metadata_from(payload)
        shape = input_shape_value(payload.get("input_shape", list(DEFAULT_INPUT_SHAPE)))
        model = build_for(name, num_classes, shape)
        state = check_state_dict(payload.get("state_dict"), model)
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid ntkviz checkpoint: {e}") from None
    model.load_state_dict(state, strict=True)
    model.eval()
    return Checkpoint(model, name, num_classes, config, metadata, shape)


def load_weights_into(model: nn.Module, path: str | Path) -> Checkpoint:
    """Copy a checkpoint's weights into ``model`` only if it fully matches (same architecture);
    otherwise raise :class:`CheckpointError` and leave ``model`` untouched."""
    ckpt = load_checkpoint(path)
    target = model.state_dict()
    source = ckpt.model.state_dict()
    if target.keys() != source.keys() or any(target[k].shape != source[k].shape for k in target):
        raise CheckpointError(f"{path} holds a {ckpt.model_name} of another architecture")
    model.load_state_dict(source)
    return ckpt
