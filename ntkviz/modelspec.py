"""A user's model: load it from a factory string and a weights file, and check it on the data.

``load_model_spec("path/to/file.py:factory")`` or ``load_model_spec("package.module:factory")``
imports the factory — a callable returning an ``nn.Module`` — and calls it without arguments. That
runs the user's own code, as intended. Weights come from a state dict file (``torch.save(
model.state_dict(), path)``) or an ntkviz checkpoint and are read with
``torch.load(..., weights_only=True)``: a weights file never runs code.

Every failure raises one :class:`~ntkviz.errors.ModelError` whose message names the model (its
spec), the file or data shape involved, and what went wrong.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from ntkviz.errors import ModelError
from ntkviz.files import refused_objects
from ntkviz.kernel import _as_batch, _device_dtype, eval_mode

EXAMPLE = "my_models.py:build or mypackage.models:build"


def _split_spec(spec: str) -> tuple[str, str]:
    usage = f"a model is given as PATH_OR_MODULE:FACTORY (e.g. {EXAMPLE})"
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelError(f"{usage}, got {spec!r}")
    source, factory = spec.rsplit(":", 1)  # a Windows path keeps its drive colon
    if not source:
        raise ModelError(f"{usage}; {spec!r} names no file or module")
    if not all(part.isidentifier() for part in factory.split(".")):
        raise ModelError(f"{usage}; in {spec!r} the factory {factory!r} is not a Python name")
    return source, factory


def _is_file(source: str) -> bool:
    return source.endswith(".py") or "/" in source or "\\" in source


@contextlib.contextmanager
def _on_path(directory: Path) -> Iterator[None]:
    """Put the model file's directory first on ``sys.path`` (for its sibling imports)."""
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _import_file(path: Path, spec: str):
    if not path.is_file():
        why = "is a directory, not a .py file" if path.is_dir() else "does not exist"
        raise ModelError(f"model {spec!r}: {path} {why}")
    resolved = path.resolve()
    name = "ntkviz_user_" + re.sub(r"\W", "_", str(resolved))
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise ModelError(f"model {spec!r}: {path} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # classes defined there can be found by their module's name
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        sys.modules.pop(name, None)
        raise ModelError(f"model {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(source: str, spec: str):
    try:
        return importlib.import_module(source)
    except (Exception, SystemExit) as e:
        raise ModelError(
            f"model {spec!r}: cannot import the module {source!r}: {type(e).__name__}: {e}"
        ) from e


def load_model_spec(spec: str, weights: str | Path | None = None) -> nn.Module:
    """The model a factory spec builds, with ``weights`` loaded when given.

    ``spec``: ``"path/to/file.py:factory"`` or ``"package.module:factory"`` (the factory may be a
    dotted attribute, e.g. ``"models.py:Net.small"``); the factory is called without arguments and
    must return an ``nn.Module``. ``weights``: a state dict file or an ntkviz checkpoint; its keys
    and shapes must match the model's exactly. The model is returned as the factory left it
    (train/eval mode, device, dtype). Raises :class:`ModelError`.
    """
    source, factory = _split_spec(spec)
    directory = Path(source).expanduser().parent if _is_file(source) else Path.cwd()
    with _on_path(directory):
        if _is_file(source):
            module = _import_file(Path(source).expanduser(), spec)
        else:
            module = _import_module(source, spec)
        target = module
        for part in factory.split("."):
            if not hasattr(target, part):
                raise ModelError(f"model {spec!r}: {source} has no attribute {factory!r}")
            target = getattr(target, part)
        if not callable(target):
            raise ModelError(
                f"model {spec!r}: {factory} is a {type(target).__name__}, not callable"
            )
        try:
            model = target()
        except (Exception, SystemExit) as e:
            raise ModelError(f"model {spec!r}: the factory raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec!r}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if weights is not None:
        load_weights(model, weights, spec)
    return model


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a file: a plain state dict, a dict with a ``"state_dict"`` entry, or an
    ntkviz checkpoint. Read with ``weights_only=True`` (no code runs). Raises
    :class:`ModelError`."""
    path = Path(path).expanduser()
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise ModelError(f"the weights file {path} {why}")
    try:
        with warnings.catch_warnings():  # torch's advice on old pickle protocols is not ours
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if refused_objects(path, e):
            why = (
                "it holds objects other than tensors and plain values, which are refused: "
                "reading them could run code"
            )
        elif "weights only" in str(e).lower():  # torch's advice to drop the check is not ours
            why = "it is not a torch.save file (damaged, or another kind of file)"
        else:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            why = f"it is not a complete torch.save file ({type(e).__name__}: {detail})"
        raise ModelError(
            f"{path} is not a readable weights file (a state dict saved with torch.save or an "
            f"ntkviz checkpoint): {why}"
        ) from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items())
    ):
        raise ModelError(
            f"{path} holds no state dict (a dict of parameter names to tensors), "
            f"but a {type(payload).__name__}"
        )
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelError(f"{path}: state_dict[{key!r}] holds non-finite values (NaN or ±inf)")
    return state


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" … ({len(names) - 5} more)" if len(names) > 5 else "")


def load_weights(model: nn.Module, path: str | Path, name: str | None = None) -> None:
    """Copy the state dict in ``path`` (see :func:`read_state_dict`) into ``model`` if its keys
    and shapes match exactly; otherwise raise :class:`ModelError` listing the differences and
    leave ``model`` untouched. ``name`` names the model in messages."""
    label = repr(name) if name else type(model).__name__
    state = read_state_dict(path)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} for {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    problems = [
        f"{what}: {_listing(items)}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("shapes", shapes))
        if items
    ]
    if problems:
        raise ModelError(
            f"the weights in {path} do not fit the model {label}: {'; '.join(problems)}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelError(f"the weights in {path} do not fit the model {label}: {e}") from None


def check_model(
    model: nn.Module,
    example_batch: Tensor,
    num_classes: int | None = None,
    *,
    name: str | None = None,
) -> int:
    """Run one forward pass of ``model`` on ``example_batch (N, C, H, W)`` (eval mode, no
    gradients; the model is left unchanged) and raise one :class:`ModelError` naming the model
    (``name``, default its class), the data shape and what went wrong: no trainable parameters,
    the model raises on the batch (e.g. a wrong input shape), the output is not logits ``(N, V)``,
    V differs from ``num_classes``, the logits are not finite floating-point numbers, or they do
    not depend on the parameters (detached). Returns V."""
    kind = type(model).__name__
    label = f"{name!r} ({kind})" if name and name != kind else kind
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {label} is not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ModelError(
            f"model {label} has no trainable parameters (none with requires_grad): it has no "
            "kernel and cannot learn"
        )
    try:  # a model without values names the model
        _device_dtype(model)
    except ValueError as e:
        shape = tuple(getattr(example_batch, "shape", ()))[1:]
        raise ModelError(
            f"model {label} cannot be used on examples of shape {shape}: {e}"
        ) from None
    x = _as_batch(model, example_batch, "example_batch", kernels=False)
    shape = tuple(x.shape)
    data = f"a batch of shape {shape}, examples of shape {shape[1:]}"
    with eval_mode(model), torch.no_grad():
        try:
            z = model(x)
        except Exception as e:
            raise ModelError(f"model {label} fails on {data}: {type(e).__name__}: {e}") from None
    if not isinstance(z, Tensor):
        raise ModelError(f"model {label} returns a {type(z).__name__} on {data}, not logits (N, V)")
    expected = f"({len(x)}, {num_classes if num_classes is not None else 'V'})"
    if z.ndim != 2 or len(z) != len(x):
        raise ModelError(
            f"model {label} returns shape {tuple(z.shape)} on {data}; expected logits (N, V) = "
            f"{expected}"
        )
    if num_classes is not None and z.shape[1] != num_classes:
        raise ModelError(
            f"model {label} returns {z.shape[1]} logits per example but the data has "
            f"{num_classes} classes (on {data})"
        )
    if z.shape[1] < 2:
        raise ModelError(f"model {label} returns {z.shape[1]} logit per example; need ≥ 2 classes")
    if not z.is_floating_point():
        raise ModelError(
            f"model {label} returns {z.dtype} logits on {data}; logits must be floating point"
        )
    if not torch.isfinite(z).all():
        raise ModelError(f"model {label} returns non-finite logits (NaN or ±inf) on {data}")
    with eval_mode(model), torch.enable_grad():
        if not model(x).requires_grad:
            raise ModelError(
                f"model {label} returns logits that do not depend on its trainable parameters "
                f"(detached, or computed without autograd) on {data}: they have no kernel"
            )
    return int(z.shape[1])
