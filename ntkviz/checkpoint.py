"""Checkpoints: weights, training config and metadata in one versioned file, written atomically.

Files are read with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
Every field is checked on load (types, ranges, that the weights fit the model); a file that fails
is refused with one :class:`~ntkviz.errors.CheckpointError` naming the field.
"""

from __future__ import annotations

import time
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ntkviz.checks import plain_values
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


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    config: TrainConfig,
    metadata: dict | None = None,
) -> Path:
    """Write ``model``'s weights with its config and ``metadata`` (plain values) to ``path``.
    Raises :class:`~ntkviz.errors.FileWriteError` (an ``OSError``) when it cannot be written."""
    from ntkviz import __version__

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}")
    metadata = {"ntkviz_version": __version__, "saved_at": time.time(), **(metadata or {})}
    plain_values(metadata, "metadata")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "num_classes": num_classes_of(state),
        "config": config.to_dict(),
        "metadata": metadata,
        "state_dict": state,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def num_classes_of(state: dict) -> int:
    """The number of outputs of a state dict: the length of its last bias."""
    last_bias = [v for k, v in state.items() if k.endswith("bias")][-1]
    return int(last_bias.shape[0])


# --------------------------------------------------------------------------- reading


def read_payload(path: str | Path, fmt: str, version: int, what: str, error=CheckpointError):
    """Load an ntkviz file (``torch.load(..., weights_only=True)``: no code runs) and check its
    format tag, format version and model name. Returns ``(payload dict, model name)``; raises
    ``error`` with the reason, ``what`` naming the kind of file ("checkpoint", "session")."""
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
    if not isinstance(name, str) or name not in MODELS:
        raise error(
            f"{path} holds an unknown model {name!r}; this ntkviz knows {', '.join(MODELS)}"
        )
    return payload, name


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
    """``payload[key]``: a dict of plain values (an empty dict when absent)."""
    meta = payload.get(key, {})
    if not isinstance(meta, dict):
        raise ValueError(f"{key} must be a dict, got {type(meta).__name__}")
    plain_values(meta, key)
    return dict(meta)


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


def _num_classes(payload: dict) -> int:
    n = payload.get("num_classes", 10)
    if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= 100_000:
        raise ValueError(f"num_classes must be an int ≥ 2, got {n!r}")
    return n


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    payload, name = read_payload(path, FORMAT, VERSION, "checkpoint")
    try:
        num_classes = _num_classes(payload)
        config = config_from(payload)
        metadata = metadata_from(payload)
        model = build_model(name, num_classes=num_classes, seed=None)
        state = check_state_dict(payload.get("state_dict"), model)
    except ValueError as e:
        raise CheckpointError(f"{path} is not a valid ntkviz checkpoint: {e}") from None
    model.load_state_dict(state, strict=True)
    model.eval()
    return Checkpoint(model, name, num_classes, config, metadata)


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
