"""Checkpoints: weights, training config and metadata in one versioned file, written atomically.

Files are read with ``torch.load(..., weights_only=True)``: opening a checkpoint never runs code.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ntkviz.errors import CheckpointError
from ntkviz.models import MODELS, build_model
from ntkviz.training import TrainConfig

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


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file.
    Raises ``OSError`` with the path when the directory cannot be written."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OSError(f"cannot write {path}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".part")
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    config: TrainConfig,
    metadata: dict | None = None,
) -> Path:
    """Write ``model``'s weights with its config and ``metadata`` (plain values) to ``path``."""
    from ntkviz import __version__

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    num_classes = _num_classes(state)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "num_classes": num_classes,
        "config": config.to_dict(),
        "metadata": {"ntkviz_version": __version__, "saved_at": time.time(), **(metadata or {})},
        "state_dict": state,
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _num_classes(state: dict) -> int:
    last_bias = [v for k, v in state.items() if k.endswith("bias")][-1]
    return int(last_bias.shape[0])


def read_payload(path: str | Path, fmt: str, version: int, what: str, error=CheckpointError):
    """Load an ntkviz file (``torch.load(..., weights_only=True)``: no code runs) and check its
    format tag, format version and model name. Returns ``(payload dict, model name)``; raises
    ``error`` with the reason, ``what`` naming the kind of file ("checkpoint", "session")."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise error(f"{path} is not a readable ntkviz {what} ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != fmt:
        raise error(f"{path} is not an ntkviz {what}")
    found = payload.get("version")
    if not isinstance(found, int) or found > version:
        raise error(
            f"{path} has {what} format version {found}; this ntkviz reads up to {version}"
            " — upgrade it"
        )
    name = payload.get("model")
    if name not in MODELS:
        raise error(f"{path} holds an unknown model {name!r}")
    return payload, name


def config_from(payload: dict) -> TrainConfig:
    """The training config stored in ``payload``, ignoring keys this version does not know."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in payload.get("config", {}).items() if k in known})


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; raise :class:`CheckpointError` with the reason."""
    path = Path(path)
    payload, name = read_payload(path, FORMAT, VERSION, "checkpoint")
    config = config_from(payload)
    num_classes = int(payload.get("num_classes", 10))
    model = build_model(name, num_classes=num_classes, seed=None)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the {name} model: {e}") from None
    model.eval()
    return Checkpoint(model, name, num_classes, config, dict(payload.get("metadata", {})))


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
