"""A whole working session in one versioned file: model weights, training config, curves,
selections, step-through history and recorded kernel maps.

Written atomically with ``torch.save`` of plain values and tensors; read with
``torch.load(..., weights_only=True)``, so opening a session never runs code from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ntkviz.checkpoint import atomic_write, config_from, read_payload
from ntkviz.errors import CheckpointError
from ntkviz.models import build_model
from ntkviz.training import TrainConfig

FORMAT = "ntkviz-session"
VERSION = 1


class SessionError(CheckpointError):
    """A session file cannot be read; the open session is unchanged."""

    title = "Session not readable"


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
    payload, name = read_payload(path, FORMAT, VERSION, "session", SessionError)
    try:
        session = Session(
            model_name=name,
            state_dict=dict(payload["state_dict"]),
            config=config_from(payload),
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
