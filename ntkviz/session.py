"""A whole working session in one versioned file: model weights, training config, curves,
selections, step-through history and recorded kernel maps.

Written atomically with ``torch.save`` of plain values and tensors; read with
``torch.load(..., weights_only=True)``, so opening a session never runs code from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ntkviz.checkpoint import atomic_write
from ntkviz.errors import CheckpointError
from ntkviz.models import MODELS, build_model
from ntkviz.training import TrainConfig

FORMAT = "ntkviz-session"
VERSION = 1


class SessionError(CheckpointError):
    """A session file cannot be read; the open session is unchanged."""


@dataclass
class Session:
    """Everything needed to pick up where a user left off.

    ``curves``: name -> list of numbers (e.g. ``{"step": [...], "loss": [...]}``);
    ``selection``: plain values (indices, splits, y_u, η, loss kind);
    ``history``: one dict of plain values per applied step;
    ``kernel_maps``: ``[(training step, (C, C) array)]``.
    """

    model_name: str
    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    step: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    kernel_maps: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def build_model(self) -> torch.nn.Module:
        model = build_model(self.model_name, seed=None)
        model.load_state_dict(self.state_dict)
        return model


def save_session(path: str | Path, session: Session) -> Path:
    """Write ``session`` to ``path`` atomically."""
    from ntkviz import __version__

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "ntkviz_version": __version__,
        "model": session.model_name,
        "state_dict": {k: v.detach().cpu().clone() for k, v in session.state_dict.items()},
        "config": session.config.to_dict(),
        "step": int(session.step),
        "curves": {k: [float(v) for v in vs] for k, vs in session.curves.items()},
        "selection": dict(session.selection),
        "history": [dict(h) for h in session.history],
        "kernel_maps": [(int(s), torch.from_numpy(np.array(m))) for s, m in session.kernel_maps],
    }
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_session(path: str | Path) -> Session:
    """Read and validate a session file; raise :class:`SessionError` with the reason."""
    path = Path(path)
    if not path.is_file():
        raise SessionError(f"session file {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SessionError(f"{path} is not a readable ntkviz session ({e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise SessionError(f"{path} is not an ntkviz session file")
    version = payload.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SessionError(
            f"{path} has session format version {version}; this ntkviz reads up to {VERSION}"
        )
    name = payload.get("model")
    if name not in MODELS:
        raise SessionError(f"{path} holds an unknown model {name!r}")
    known = {f.name for f in fields(TrainConfig)}
    try:
        session = Session(
            model_name=name,
            state_dict=dict(payload["state_dict"]),
            config=TrainConfig(**{k: v for k, v in payload["config"].items() if k in known}),
            step=int(payload.get("step", 0)),
            curves={k: list(v) for k, v in payload.get("curves", {}).items()},
            selection=dict(payload.get("selection", {})),
            history=[dict(h) for h in payload.get("history", [])],
            kernel_maps=[(int(s), m.numpy()) for s, m in payload.get("kernel_maps", [])],
        )
        session.build_model()  # the weights must fit the architecture
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise SessionError(f"{path} is damaged: {e}") from None
    return session
