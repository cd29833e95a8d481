"""A whole working session in one versioned file: model weights, training config, curves,
selections, step-through history and recorded kernel maps.

Written atomically with ``torch.save`` of plain values and tensors; read with
``torch.load(..., weights_only=True)``, so opening a session never runs code from it. Every field
is checked on load; a file that fails is refused with one :class:`SessionError` naming the field.

A session records the input shape ``[C, H, W]`` of its data (files without one: 1×28×28) and
whether its model is the user's own (``custom``). A registry model is rebuilt for that shape; the
weights of the user's own model are checked against (and later loaded into) the model the caller
passes — ntkviz cannot build it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ntkviz.checkpoint import (
    DEFAULT_INPUT_SHAPE,
    atomic_write,
    build_for,
    check_state_dict,
    config_from,
    input_shape_value,
    num_classes_of,
    read_payload,
    stored_num_classes,
)
from ntkviz.checks import class_index, count, plain_values, positive_int, real_number
from ntkviz.errors import CheckpointError
from ntkviz.training import TrainConfig

FORMAT = "ntkviz-session"
VERSION = 1

#: Selection keys the app writes, with a check of each (other keys: any plain value).
SELECTION_CHECKS = {
    "split_u": lambda v, n: _choice(v, n, ("train", "test")),
    "split_o": lambda v, n: _choice(v, n, ("train", "test")),
    "index_u": class_index,
    "index_o": class_index,
    "y_u": class_index,
    "lr": real_number,
    "loss": lambda v, n: _choice(v, n, ("ce", "neg")),
    "influence_size": positive_int,
    "kernel_map_per_class": positive_int,
}


class SessionError(CheckpointError):
    """A session file cannot be read; the open session is unchanged."""

    title = "Session not readable"


@dataclass
class Session:
    """Everything needed to pick up where a user left off.

    ``curves``: name -> list of numbers (e.g. ``{"step": [...], "loss": [...]}``);
    ``selection``: plain values (indices, splits, y_u, η, loss kind);
    ``history``: one dict per applied step: plain values, and tensors (e.g. ``"state_before"``,
    a state dict of the model, and ``"lr"``, a finite number);
    ``kernel_maps``: ``[(training step, (C, C) array)]``;
    ``input_shape``: ``(C, H, W)`` of the data; ``custom``: the model is the user's own
    (``model_name`` then names it, e.g. by its factory spec); ``num_classes``: V, the model's
    outputs (None: the length of the state dict's last bias vector, right for registry models);
    ``dataset``: the data it was made on, ``{"name", "source", "root"}`` (strings or None;
    ``source`` and ``root`` as :func:`~ntkviz.data.load_dataset` takes them, ``source`` None for
    data given from Python); empty in sessions of older versions. ``optimizer``: the run's
    optimizer's ``state_dict()`` (its momentum or Adam moments, so that "this run's optimizer"
    steps on as before), or None.
    """

    model_name: str
    state_dict: dict[str, torch.Tensor]
    config: TrainConfig
    step: int = 0
    curves: dict[str, list[float]] = field(default_factory=dict)
    selection: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    kernel_maps: list[tuple[int, np.ndarray]] = field(default_factory=list)
    input_shape: tuple[int, int, int] = DEFAULT_INPUT_SHAPE
    custom: bool = False
    num_classes: int | None = None
    dataset: dict = field(default_factory=dict)
    optimizer: dict | None = None

    @property
    def classes(self) -> int:
        """V, the number of the model's outputs."""
        return self.num_classes if self.num_classes is not None else num_classes_of(self.state_dict)

    def build_model(self, template: torch.nn.Module | None = None) -> torch.nn.Module:
        """The session's model with its weights: a registry model built for ``input_shape``, or
        for the user's own model a copy of ``template`` (that model) with the weights loaded.
        Raises :class:`SessionError` for a custom session without a template."""
        if self.custom:
            if template is None:
                raise SessionError(_needs_model(self.model_name))
            model = copy.deepcopy(template)
        else:
            model = build_for(self.model_name, self.classes, self.input_shape)
        model.load_state_dict(self.state_dict)
        return model


def _needs_model(name: str) -> str:
    return (
        f"this session holds the weights of your own model {name!r}; open that model first "
        "(File > Open model…)"
    )


def save_session(path: str | Path, session: Session) -> Path:
    """Write ``session`` to ``path`` atomically (an ``OSError`` naming ``path`` if it cannot)."""
    from ntkviz import __version__

    payload = {
        "format": FORMAT,
        "version": VERSION,
        "ntkviz_version": __version__,
        "model": session.model_name,
        "custom": bool(session.custom),
        "num_classes": session.classes,
        "input_shape": list(input_shape_value(tuple(session.input_shape))),
        "state_dict": {k: v.detach().cpu().clone() for k, v in session.state_dict.items()},
        "config": session.config.to_dict(),
        "step": int(session.step),
        "curves": {k: [float(v) for v in vs] for k, vs in session.curves.items()},
        "selection": dict(session.selection),
        "history": [dict(h) for h in session.history],
        "kernel_maps": [(int(s), torch.from_numpy(np.array(m))) for s, m in session.kernel_maps],
        "dataset": _dataset_source(session.dataset),
        "optimizer": _optimizer_payload(session.optimizer),
    }
    plain_values(payload["optimizer"], "optimizer", tensors=True)
    plain_values(payload["selection"], "selection")
    plain_values(payload["history"], "history", tensors=True)
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _dataset_source(value) -> dict:
    """A session's ``dataset`` entry checked: a dict of "name", "source" and "root", each a
    string or None (ValueError otherwise)."""
    if not isinstance(value, dict) or not set(value) <= {"name", "source", "root"}:
        raise ValueError(f"dataset must be a dict of name, source and root, got {value!r}")
    if any(v is not None and not isinstance(v, str) for v in value.values()):
        raise ValueError(f"dataset entries must be strings or None, got {value!r}")
    return dict(value)


def _cpu(value):
    """A tensor copied to the CPU; anything else as it is."""
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def _optimizer_payload(state: dict | None) -> dict | None:
    """An optimizer's ``state_dict()`` as plain values: its per-parameter state under string
    keys, tensors copied to the CPU."""
    if state is None:
        return None
    return {
        "state": {str(k): {n: _cpu(v) for n, v in st.items()} for k, st in state["state"].items()},
        "param_groups": [dict(g) for g in state["param_groups"]],
    }


def snapshot_payload(snapshot) -> dict | None:
    """An undo's :class:`~ntkviz.accounting.OptimizerSnapshot` as plain values for a session's
    history: per parameter its optimizer state, per group its hyper-parameters (tensors on the
    CPU); None for None."""
    if snapshot is None:
        return None
    return {
        "state": [{k: _cpu(v) for k, v in st.items()} for st in snapshot.state],
        "groups": [{k: _cpu(v) for k, v in g.items()} for g in snapshot.groups],
    }


def _optimizer_state(raw) -> dict | None:
    """The optimizer state of a session file (None: none stored), its per-parameter keys as
    ints again, as ``Optimizer.load_state_dict`` takes it (which checks it against the model)."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) != {"state", "param_groups"}:
        raise ValueError("optimizer must be a dict of state and param_groups")
    plain_values(raw, "optimizer", tensors=True)
    state, groups = raw["state"], raw["param_groups"]
    if not isinstance(state, dict) or not all(k.isdigit() for k in state):
        raise ValueError("optimizer state must be keyed by parameter numbers")
    if not isinstance(groups, list | tuple) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list | tuple) for g in groups
    ):
        raise ValueError("optimizer param_groups must be a list of dicts with params")
    return {"state": {int(k): dict(v) for k, v in state.items()}, "param_groups": list(groups)}


def _choice(value, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _outputs(state) -> int:
    """The number of classes of a stored state dict, for files that record none."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("state_dict must be a dict of the model's tensors")
    return num_classes_of(state)


def _curves(raw) -> dict[str, list[float]]:
    if not isinstance(raw, dict):
        raise ValueError(f"curves must be a dict of lists of numbers, got {type(raw).__name__}")
    out = {}
    for k, values in raw.items():
        if not isinstance(k, str) or not isinstance(values, list | tuple):
            raise ValueError(f"curves[{k!r}] must be a list of numbers under a string name")
        out[k] = [real_number(v, f"curves[{k!r}][{i}]") for i, v in enumerate(values)]
    return out


def _selection(raw, num_classes: int) -> dict:
    if not isinstance(raw, dict):
        raise ValueError(f"selection must be a dict, got {type(raw).__name__}")
    plain_values(raw, "selection")
    for key, check in SELECTION_CHECKS.items():
        if key in raw:
            check(raw[key], f"selection {key}")
    if "y_u" in raw:
        class_index(raw["y_u"], "selection y_u", num_classes)
    return dict(raw)


def _history(raw, model: torch.nn.Module) -> list[dict]:
    if not isinstance(raw, list | tuple):
        raise ValueError(f"history must be a list of dicts, got {type(raw).__name__}")
    out = []
    for k, entry in enumerate(raw):
        where = f"history entry {k}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} must be a dict, got {type(entry).__name__}")
        plain_values(entry, where, tensors=True)
        if "lr" in entry:
            real_number(entry["lr"], f"{where} lr")
        if "state_before" in entry:
            check_state_dict(entry["state_before"], model, f"{where} state_before")
        out.append(dict(entry))
    return out


def _kernel_maps(raw, num_classes: int) -> list[tuple[int, np.ndarray]]:
    if not isinstance(raw, list | tuple):
        raise ValueError(f"kernel_maps must be a list of (step, map), got {type(raw).__name__}")
    out = []
    for k, item in enumerate(raw):
        where = f"kernel map {k}"
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise ValueError(f"{where} must be a (training step, map) pair")
        step, m = count(item[0], f"{where} step"), item[1]
        shape = (num_classes, num_classes)
        if not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.shape != shape:
            raise ValueError(f"{where} must be a {shape} floating-point tensor")
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError(f"{where} holds negative or non-finite kernel norms")
        out.append((step, m.double().numpy()))
    return out


def load_session(path: str | Path, model: torch.nn.Module | None = None) -> Session:
    """Read and validate a session file; raise :class:`SessionError` with the reason.

    ``model``: for a session of the user's own model (``custom``), that model — the template its
    weights are checked against (keys, shapes, kinds); without it such a session is refused with
    a message saying to open the model first. Registry sessions ignore ``model``."""
    payload, name = read_payload(path, FORMAT, VERSION, "session", SessionError, custom_ok=True)
    custom = payload.get("custom", False)
    if custom and model is None:
        raise SessionError(_needs_model(name))
    try:
        version = payload.get("ntkviz_version")
        if version is not None and not isinstance(version, str):
            raise ValueError(f"ntkviz_version must be a string, got {version!r}")
        state = payload.get("state_dict")
        num_classes = stored_num_classes(payload) if "num_classes" in payload else _outputs(state)
        shape = input_shape_value(payload.get("input_shape", list(DEFAULT_INPUT_SHAPE)))
        if custom:
            if not isinstance(model, torch.nn.Module):
                raise ValueError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
            template = model
        else:
            template = build_for(name, num_classes, shape)
        model = template
        session = Session(
            model_name=name,
            state_dict=check_state_dict(state, model),
            config=config_from(payload),
            step=count(payload.get("step", 0), "step"),
            curves=_curves(payload.get("curves", {})),
            selection=_selection(payload.get("selection", {}), num_classes),
            history=_history(payload.get("history", []), model),
            kernel_maps=_kernel_maps(payload.get("kernel_maps", []), num_classes),
            input_shape=shape,
            custom=custom,
            num_classes=num_classes,
            dataset=_dataset_source(payload.get("dataset", {})),
            optimizer=_optimizer_state(payload.get("optimizer")),
        )
    except ValueError as e:
        raise SessionError(f"{path} is not a valid ntkviz session: {e}") from None
    return session


# --------------------------------------------------------------------------- optimizer state


def _state_keys(optimizer: torch.optim.Optimizer, group: dict) -> set[str]:
    """The entries a parameter's state holds once the optimizer has stepped it: SGD its momentum
    buffer (none without momentum), Adam and AdamW their step and moments."""
    if isinstance(optimizer, torch.optim.SGD):
        return {"momentum_buffer"} if group["momentum"] != 0 else set()
    return {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if group["amsgrad"] else set())


def _check_states(optimizer: torch.optim.Optimizer, states) -> None:
    """ValueError unless each ``(k, state)`` of ``states`` is a state the optimizer could hold
    for its k-th parameter: empty (not stepped yet) or exactly its entries (:func:`_state_keys`),
    ``step`` a finite 0-d float tensor ≥ 0, the others finite tensors of the parameter's shape
    and dtype (a momentum buffer may be None)."""
    owned = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    for k, state in states:
        p, group = owned[k]
        want = _state_keys(optimizer, group)
        if state and set(state) != want:
            missing, extra = sorted(want - set(state)), sorted(set(state) - want)
            raise ValueError(
                f"its optimizer's state of parameter {k} "
                + (f"lacks {', '.join(missing)}" if missing else f"has {', '.join(extra)}")
                + f" ({type(optimizer).__name__} holds {', '.join(sorted(want)) or 'nothing'})"
            )
        for name, value in state.items():
            tensor = isinstance(value, torch.Tensor)
            if name == "step":
                ok = tensor and value.dim() == 0 and value.is_floating_point()
                ok = ok and math.isfinite(value.item()) and value.item() >= 0
            elif value is None:
                ok = name == "momentum_buffer"
            else:
                ok = (
                    tensor
                    and value.shape == p.shape
                    and value.dtype == p.dtype
                    and bool(torch.isfinite(value).all())
                )
            if not ok:
                what = f"a {tuple(value.shape)} {value.dtype} tensor" if tensor else repr(value)
                raise ValueError(
                    f"its optimizer's {name} of parameter {k} is {what}, not "
                    + (
                        "a 0-d float tensor ≥ 0"
                        if name == "step"
                        else f"finite {tuple(p.shape)} {p.dtype}"
                    )
                )


#: Hyper-parameters with a range: name -> whether a (finite) value is in it.
_IN_RANGE = {
    "lr": lambda v: v >= 0,
    "weight_decay": lambda v: v >= 0,
    "eps": lambda v: v >= 0,
    "momentum": lambda v: 0 <= v < 1,
    "dampening": lambda v: 0 <= v <= 1,
    "betas": lambda v: all(0 <= b < 1 for b in v),
}


def _same_kind(saved, own) -> bool:
    """Whether a stored hyper-parameter is of the kind of the optimizer's own value: a finite
    number for a number, the same for bools, None and strings, element by element for tuples."""
    if isinstance(own, bool) or own is None or isinstance(own, str):
        return type(saved) is type(own)
    if isinstance(own, int | float):
        return (
            isinstance(saved, int | float) and not isinstance(saved, bool) and math.isfinite(saved)
        )
    if isinstance(own, list | tuple):
        return (
            isinstance(saved, list | tuple)
            and len(saved) == len(own)
            and all(_same_kind(a, b) for a, b in zip(saved, own))
        )
    if isinstance(own, torch.Tensor):
        return isinstance(saved, torch.Tensor) and saved.shape == own.shape
    return False


def _check_groups(optimizer: torch.optim.Optimizer, groups) -> None:
    """ValueError unless each stored group holds the optimizer's own hyper-parameters, each of
    its kind (``params`` aside)."""
    for own, saved in zip(optimizer.param_groups, groups, strict=True):
        keys = set(own) - {"params"}
        if set(saved) - {"params"} != keys:
            raise ValueError(
                f"it is not the state of this run's optimizer ({type(optimizer).__name__})"
            )
        for key in sorted(keys):
            value = saved[key]
            ok = _same_kind(value, own[key]) and _IN_RANGE.get(key, lambda v: True)(value)
            if not ok:
                raise ValueError(f"its optimizer's {key} is {value!r}")


def check_snapshot(optimizer: torch.optim.Optimizer, saved) -> None:
    """ValueError unless ``saved`` (see :func:`~ntkviz.session.snapshot_payload`) holds a state
    per parameter of ``optimizer`` that fits it, and its hyper-parameters per group."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if (
        not isinstance(saved, dict)
        or not isinstance(saved.get("state"), list | tuple)
        or not isinstance(saved.get("groups"), list | tuple)
        or len(saved["state"]) != len(params)
        or len(saved["groups"]) != len(optimizer.param_groups)
        or not all(isinstance(x, dict) for x in (*saved["state"], *saved["groups"]))
    ):
        raise ValueError("its optimizer state is not one of this model's optimizer")
    _check_groups(optimizer, saved["groups"])
    _check_states(optimizer, enumerate(saved["state"]))


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` (a state dict) into ``optimizer`` if it is one of that optimizer's kind, of
    those parameters; ValueError otherwise (``load_state_dict`` checks only the group sizes)."""
    own = optimizer.state_dict()["param_groups"]
    if len(saved["param_groups"]) != len(own) or any(
        list(s["params"]) != g["params"] for g, s in zip(own, saved["param_groups"])
    ):
        raise ValueError(
            f"it is not the state of this run's optimizer ({type(optimizer).__name__})"
        )
    _check_groups(optimizer, saved["param_groups"])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if any(not 0 <= k < len(params) for k in saved["state"]):
        raise ValueError("it holds state of a parameter the model lacks")
    _check_states(optimizer, saved["state"].items())
    optimizer.load_state_dict(saved)


def session_parts(session: Session) -> dict:
    """The features' parts of ``session``: its ``selection`` field holds them by feature name;
    files of ntkviz 0.1's first format kept curves, kernel maps and a flat selection apart."""
    sel = dict(session.selection)
    if "split_u" not in sel:
        return sel
    parts = {
        "pair": {
            "x_u": [sel["split_u"], sel["index_u"]],
            "x_o": [sel["split_o"], sel["index_o"]],
            **{k: sel[k] for k in ("y_u", "lr")},
        },
        "training": {"curves": dict(session.curves)},
        "kernel_maps": {
            "per_class": sel.get("kernel_map_per_class", 20),
            "maps": [(s, m.tolist()) for s, m in session.kernel_maps],
        },
    }
    parts["pair"]["loss"] = sel.get("loss", "ce")
    if "influence_size" in sel:
        parts["influence"] = {"size": sel["influence_size"]}
    return parts
