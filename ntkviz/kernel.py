"""The empirical neural tangent kernel K(x1, x2) = J(x1) J(x2)ᵀ, J = ∂z/∂θ ``(V, P)``.

``K[a, b, i, j]`` is the change of logit ``z_i(x1[a])`` per unit change of ``z_j(x2[b])`` when θ moves
along ``∂z_j(x2[b])/∂θ``: a step that raises ``z_j(x2[b])`` also raises ``z_i(x1[a])`` when it is > 0.

Two exact algorithms (:func:`kernel_path` says which one a model takes, and why):

* **structured** (Novak et al., "Fast Finite Width Neural Tangent Kernel", ICML 2022) for models that
  are ``nn.Sequential`` chains — with :class:`~ntkviz.models.BranchSum` residual blocks whose
  branches are chains — whose trainable layers are ``Linear``, ``Conv2d`` and ``BatchNorm`` (eval
  mode: a per-channel affine map whose weight and bias count as parameters). Parameter-free layers
  in between: elementwise activations (ReLU, GELU, tanh, …), max and average pooling, Flatten,
  Dropout (the identity in eval mode); any other parameter-free layer is followed one layer at a
  time with ``torch.func``. One forward pass and one reverse sweep of V output cotangents per
  example; a layer's kernel then factors into its input activations and output gradients. Linear
  layers: ``(g1·g2)(a1·a2 + 1)``; convolutions: the small side's weight Jacobian is applied to the
  large side's activations as a convolution; batch norm: per-channel sums. This also gives the
  per-layer split at no extra cost.
* **generic** (``torch.func``): NTK-vector products, ``vmap`` of ``jvp`` along the rows of the small
  side's Jacobian (reverse-mode Jacobians of the large side where an operation has no forward-mode
  derivative). Works for any ``nn.Module`` that maps a batch to logits ``(N, V)``.

Every function evaluates the model in eval mode and leaves it exactly as it was (parameters,
buffers, train/eval flags). Only parameters with ``requires_grad`` count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ntkviz.checks import positive_int
from ntkviz.models import BranchSum

#: Bytes of intermediate data one chunk of the large side may use.
MEMORY_BUDGET = 64 * 2**20
#: Up to this many x2 the total kernel uses forward-mode NTK-vector products, whose cost grows
#: with each x2; beyond, the per-layer factorisation, whose cost is mostly one reverse sweep per
#: x1 (LeNet, 1,000 x1, CPU seconds: forward 0.67 per x2; factorised 1.5 for one x2, 1.9 for 5,
#: 2.0 for 8). It also serves Gram matrices of whole probe sets.
FORWARD_MAX_N2 = 2


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def trainable_parameters(model: nn.Module) -> dict[str, Tensor]:
    """Detached views of the parameters that require grad, by qualified name."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def functional_forward(model: nn.Module, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
    """``model(x)`` with the given tensors in place of the parameters (or buffers) of those names
    (as ``named_parameters`` gives them), like ``torch.func.functional_call``, whose tied-weight
    handling swaps twice — and leaves the given tensors in the model — when one module is
    reachable under two names (``nn.Sequential(shared, act, shared)``). Each slot (module,
    attribute) is swapped once here; every slot holding a replaced tensor gets its replacement."""
    seen: set[tuple[int, str]] = set()
    names_of: dict[int, list[str]] = {}  # id(tensor) -> every slot's name that holds it
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, t in (*module._parameters.items(), *module._buffers.items()):
            if t is not None and (id(module), attr) not in seen:
                seen.add((id(module), attr))
                names_of.setdefault(id(t), []).append(f"{prefix}.{attr}" if prefix else attr)
    current = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    untied = {}
    for name, t in tensors.items():
        aliases = names_of[id(current[name])] if name in current else [name]
        untied.update(dict.fromkeys(aliases, t))
    with _backward_hooks_off(model):
        return functional_call(model, untied, (x,), tie_weights=False)


_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _backward_hooks_off(model: nn.Module) -> Iterator[None]:
    """The model's module backward hooks (and the global ones) set aside for a while, then put
    back: they change gradients, not the function, so J = ∂z/∂θ is the same without them, and
    ``torch.func`` cannot differentiate through them."""
    from torch.nn.modules import module as torch_module

    held = [
        (owner, name, getattr(owner, name))
        for owner in (*model.modules(), torch_module)
        for name in (*_BACKWARD_HOOKS, *(f"_global{n}" for n in _BACKWARD_HOOKS))
        if getattr(owner, name, None)
    ]
    for owner, name, _ in held:
        setattr(owner, name, type(getattr(owner, name))())
    try:
        yield
    finally:
        for owner, name, hooks in held:
            setattr(owner, name, hooks)


@contextlib.contextmanager
def _through_torch_func() -> Iterator[None]:
    """Around ``torch.func`` transforms of a model whose plain forward pass works: their
    complaints (a forward that branches on values, an autograd.Function without
    ``setup_context``) become a ``ValueError`` that says so."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            "torch.func (vmap, jacrev, jvp), which the generic path uses for models other than "
            "chains of known layers, cannot differentiate this model, though its forward pass "
            f"runs: {first}. A forward that reads tensor values into Python (.item(), float(z), "
            "an if on a tensor) or a custom autograd.Function without setup_context cannot be "
            "transformed; write it with tensor operations (torch.where) instead"
        ) from None


def layer_of(param_name: str) -> str:
    """The parameter group (module path) a parameter belongs to: ``"fc1.weight"`` -> ``"fc1"``."""
    return param_name.rpartition(".")[0] or param_name


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the model takes inputs: its first floating-point parameter's
    (an integer parameter, e.g. a frozen index table, says nothing of the inputs)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    if p is None:
        p = next(model.parameters(), None)
        device = torch.device("cpu") if p is None else p.device
        return device, torch.get_default_dtype()
    if p.device.type == "meta":
        raise ValueError(
            "the model's parameters are on the meta device and hold no values: materialise them "
            "first (e.g. model.to_empty(device='cpu'), then load_state_dict)"
        )
    return p.device, p.dtype


def _as_batch(model: nn.Module, x: Tensor, name: str, kernels: bool = True) -> Tensor:
    """``x`` as a non-empty floating-point batch on the model's device and in its dtype;
    ``kernels``: for per-example kernels, which a model that normalises by the batch lacks."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    if kernels:
        _check_per_example(model)
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"{name} must be a tensor or array (N, ...), got {type(x).__name__}: "
                            f"{e}") from None  # fmt: skip
    device, dtype = _device_dtype(model)
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must hold floating-point inputs such as normalised images "
            f"(ImageDataset.normalize), got {x.dtype}"
        )
    # the sum is finite when every value is (15× faster than isfinite(x).all() on CPU); only
    # a non-finite sum (NaN/inf, or finite values summing past the float range) checks each one
    if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x.to(device=device, dtype=dtype)


def _check_per_example(model: nn.Module) -> None:
    """ValueError for a model whose eval-mode logits of one example depend on the others of its
    batch: a batch norm without running statistics normalises by the batch even in eval mode."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            raise ValueError(
                f"{f'layer {name!r}' if name else 'the model'} ({type(m).__name__}, "
                "track_running_stats=False) normalises by the batch also in eval mode: an "
                "example's logits depend on the other examples of its batch, so no per-example "
                "kernel exists; keep running statistics (track_running_stats=True) or normalise "
                "per example (GroupNorm, LayerNorm)"
            )


def _same_examples(x1: Tensor, x2: Tensor) -> None:
    if x1.shape[1:] != x2.shape[1:]:
        raise ValueError(
            f"x1 and x2 must be batches of examples of one shape, got {tuple(x1.shape)} and "
            f"{tuple(x2.shape)}"
        )


@contextlib.contextmanager
def _taken_by_model(x: Tensor, name: str) -> Iterator[None]:
    """Around the first forward pass of ``x``: the model's complaint about an input it cannot
    take becomes a ``ValueError`` that says what was expected."""
    try:
        yield
    except (RuntimeError, ValueError) as e:  # torch's shape and dtype complaints
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"the model cannot take {name} of shape {tuple(x.shape)}: expected a batch (N, ...) "
            f"of examples shaped as the model needs, e.g. (N, 1, 28, 28) images ({first})"
        ) from None


def _check_logits(model: nn.Module, x: Tensor) -> None:
    """ValueError unless the model maps the batch ``x[:1]`` to logits ``(1, V)`` (call in eval
    mode)."""
    with torch.no_grad(), _taken_by_model(x, "x2"):
        z = model(x[:1])
    if not isinstance(z, Tensor) or z.ndim != 2 or len(z) != 1:
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(
            f"the model must map a batch of examples (N, ...) to logits (N, V); it maps "
            f"{tuple(x[:1].shape)} to {got}"
        )


# --------------------------------------------------------------------------- structured path


class _Unsupported(Exception):
    """The structured path cannot handle this model or input (the message says why); use the
    generic path."""


#: Kinds of layer the structured path knows by their exact ``forward`` (a subclass that overrides
#: ``forward`` is another kind). Parameter-free layers of no kind here are followed one layer at a
#: time with ``torch.func`` (exact for any per-example function).
_ELEMENTWISE = (
    nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Tanhshrink,
    nn.LogSigmoid, nn.Threshold,
)  # fmt: skip
_IDENTITY_IN_EVAL = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)  # fmt: skip
_LINEAR_POOLS = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)  # fmt: skip
_KINDS = {
    nn.Linear.forward: "linear",
    nn.Conv2d.forward: "conv2d",
    nn.modules.batchnorm._BatchNorm.forward: "batchnorm",
    nn.Tanh.forward: "tanh",
    nn.ReLU.forward: "relu",
    nn.MaxPool2d.forward: "maxpool2d",
    nn.Flatten.forward: "reshape",
    nn.Unflatten.forward: "reshape",
    **{c.forward: "elementwise" for c in _ELEMENTWISE},
    **{c.forward: "identity" for c in _IDENTITY_IN_EVAL},
    **{c.forward: "linear_pool" for c in _LINEAR_POOLS},
}
#: Layer kinds whose trainable parameters the structured path handles.
_TRAINABLE_KINDS = ("linear", "conv2d", "batchnorm")


def _kind(layer: nn.Module) -> str:
    kind = _KINDS.get(type(layer).forward, "other")
    if kind == "conv2d" and type(layer)._conv_forward is not nn.Conv2d._conv_forward:
        return "other"
    return kind


def _trainable(module: nn.Module) -> bool:
    if not module._modules:  # a layer: its own parameters (fast; this runs per layer per call)
        return any(p is not None and p.requires_grad for p in module._parameters.values())
    return any(p.requires_grad for p in module.parameters())


class _Block:
    """A :class:`~ntkviz.models.BranchSum` in a chain: the module and one chain per branch."""

    def __init__(self, module: BranchSum, branches: list[list]):
        self.module, self.branches = module, branches


def _has_hooks(module: nn.Module, names=("_forward_hooks", "_forward_pre_hooks", *_BACKWARD_HOOKS)):
    return any(getattr(module, n, None) for n in names)


def _padding(layer: nn.Conv2d) -> tuple[int, int]:
    """A convolution's padding as two ints ("valid" and symmetric "same" converted)."""
    p = layer.padding
    if not isinstance(p, str):
        return p
    if p == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(t % 2 for t in total):
        raise _Unsupported(f"{type(layer).__name__} with asymmetric 'same' padding")
    return (total[0] // 2, total[1] // 2)


def _check_leaf(name: str, layer: nn.Module) -> None:
    """Raise :class:`_Unsupported` unless the structured path computes this layer exactly."""
    kind, what = _kind(layer), f"layer {name!r} ({type(layer).__name__})"
    if _has_hooks(layer) and (kind != "other" or _has_hooks(layer, _BACKWARD_HOOKS)):
        # an "other" layer runs as itself (forward hooks and all), but torch.func, which
        # differentiates it, cannot run through backward hooks
        raise _Unsupported(f"{what} has hooks")
    if kind == "batchnorm" and layer.running_mean is None:
        raise _Unsupported(f"{what} has no running statistics (it normalises by the batch)")
    if kind == "conv2d":  # trainable or not: the pull-backs pad with zeros
        if layer.padding_mode != "zeros":
            raise _Unsupported(f"{what} pads with {layer.padding_mode!r}")
        _padding(layer)
    if not _trainable(layer):
        return
    if kind not in _TRAINABLE_KINDS:
        raise _Unsupported(
            f"{what} has trainable parameters and is not a Linear, Conv2d or BatchNorm layer"
        )
    if any(True for _ in layer.children()):
        raise _Unsupported(f"{what} has submodules (e.g. a parametrization)")
    if kind == "conv2d" and layer.groups != 1:
        raise _Unsupported(f"{what} is grouped")


def _walk(prefix: str, module: nn.Module, trainable_seen: set[int]) -> list:
    """The chain of nodes ``(name, layer)`` or ``(name, _Block)`` that ``module`` computes."""
    name = prefix[:-1]
    is_chain = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    is_sum = isinstance(module, BranchSum) and type(module).forward is BranchSum.forward
    if is_chain or is_sum:
        if _has_hooks(module):
            raise _Unsupported(f"module {name!r} has hooks")
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            raise _Unsupported(f"module {name!r} holds trainable parameters outside its layers")
        owner = module.branches if is_sum else module
        if is_sum and (_has_hooks(owner) or any(True for _ in owner.parameters(recurse=False))):
            raise _Unsupported(f"module {name!r} has hooks or parameters on its branch list")
        sub = "branches." if is_sum else ""
        chains = []
        for key, child in owner._modules.items():
            if child is None:
                raise _Unsupported(f"module {name!r} has an empty slot {key!r}")
            chains.append(_walk(f"{prefix}{sub}{key}.", child, trainable_seen))
        if is_sum:
            return [(name, _Block(module, chains))]
        return [node for chain in chains for node in chain]
    if not name:
        raise _Unsupported(f"the model ({type(module).__name__}) overrides the chain's forward")
    _check_leaf(name, module)
    if _trainable(module):
        ids = {id(p) for p in module.parameters()}
        if ids & trainable_seen:
            raise _Unsupported(
                f"layer {name!r} ({type(module).__name__}) shares trainable parameters with "
                "another layer"
            )
        trainable_seen |= ids
    return [(name, module)]


def _chain_with_reason(model: nn.Module) -> tuple[list | None, str]:
    """The model's nodes in order, or ``(None, why not)``."""
    from torch.nn.modules import module as torch_module

    kinds = ("forward", "forward_pre", "backward", "backward_pre")
    if any(getattr(torch_module, f"_global_{k}_hooks", None) for k in kinds):
        return None, "global module hooks are registered"
    if not isinstance(model, nn.Sequential | BranchSum):
        return None, f"the model is a {type(model).__name__}, not an nn.Sequential chain"
    try:
        return _walk("", model, set()), ""
    except _Unsupported as e:
        return None, str(e)


def _chain(model: nn.Module) -> list | None:
    """The model's layers in order if the structured path applies, else None.

    The model must be a (nested) ``nn.Sequential`` — or :class:`~ntkviz.models.BranchSum` blocks
    whose branches are such chains — whose trainable layers are ``Linear``, ``Conv2d`` (integer,
    "valid" or symmetric "same" zero padding, no groups) or ``BatchNorm`` with running statistics.
    Each node is ``(name, layer)`` for a layer or ``(name, _Block)`` for a ``BranchSum``; names
    are module paths (the prefix of the layer's parameter names)."""
    return _chain_with_reason(model)[0]


def _trainable_flags(module: nn.Module) -> tuple[bool, bool]:
    w = module.weight is not None and module.weight.requires_grad
    b = module.bias is not None and module.bias.requires_grad
    return w, b


def _call(layer: nn.Module, a: Tensor) -> Tensor:
    """``layer(a)``, never overwriting ``a`` (in-place activations get a copy)."""
    return layer(a.clone() if getattr(layer, "inplace", False) else a)


def _derivative(layer: nn.Module, a_in: Tensor, a_out: Tensor) -> Tensor:
    """The elementwise derivative f'(a_in) of an activation layer ``(N, *in)``."""
    kind = _kind(layer)
    if kind == "tanh":
        return 1 - a_out * a_out
    if kind == "relu":
        return a_in > 0
    return jvp(lambda a: _call(layer, a), (a_in,), (torch.ones_like(a_in),))[1]


def _channels(v: Tensor, ndim: int, lead: int) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast over ``(*lead dims, C, *spatial)``."""
    return v.view(-1, *[1] * (ndim - lead - 1))


def _bn_scale(layer: nn.Module) -> Tensor:
    """Eval-mode batch norm is y = x·scale + shift per channel: scale = weight / √(var + ε)."""
    inv = torch.rsqrt(layer.running_var + layer.eps)
    return inv if layer.weight is None else layer.weight * inv


def _bn_normalised(layer: nn.Module, a: Tensor) -> Tensor:
    """(a − running mean) / √(running var + ε) ``(N, C, *spatial)``: ∂y/∂weight per channel."""
    inv = torch.rsqrt(layer.running_var + layer.eps)
    return (a - _channels(layer.running_mean, a.ndim, 1)) * _channels(inv, a.ndim, 1)


def _bn_weight_jacobian(layer: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    """Per-example, per-logit Jacobian of a batch norm's weight ``(N, V, C)`` from its inputs
    ``a (N, C, *spatial)`` and output gradients ``g (N, V, C, *spatial)``."""
    N, V, C = g.shape[:3]
    xhat = _bn_normalised(layer, a).reshape(N, 1, C, -1)
    return (g.reshape(N, V, C, -1) * xhat).sum(-1)


def _bias_jacobian(g: Tensor) -> Tensor:
    """Jacobian of a per-channel bias ``(N, V, C)``: output gradients ``g (N, V, C, *spatial)``
    summed over positions."""
    return g.reshape(*g.shape[:3], -1).sum(-1)


def _input_cotangent(layer: nn.Module, a_in: Tensor, a_out: Tensor, g: Tensor) -> Tensor:
    """Pull V output cotangents ``g (N, V, *out)`` back to the layer's input ``(N, V, *in)``."""
    N, V = g.shape[:2]
    kind = _kind(layer)
    if kind == "linear":
        return g @ layer.weight
    if kind == "conv2d":
        # The adjoint of a convolution is its transpose (in the layout of the activations).
        padding = _padding(layer)
        extra = [
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(
                a_in.shape[2:], g.shape[3:], layer.stride, padding, layer.dilation,
                layer.kernel_size,
            )
        ]  # fmt: skip
        gi = g.reshape(N * V, *g.shape[2:])
        gi = F.conv_transpose2d(
            _channels_last(gi) if _is_channels_last(a_in) else gi,
            layer.weight,
            None,
            layer.stride,
            padding,
            extra,
            layer.groups,
            layer.dilation,
        )
        return gi.view(N, V, *a_in.shape[1:])
    if kind == "batchnorm":
        return g * _channels(_bn_scale(layer), g.ndim, 2)
    if kind in ("tanh", "relu", "elementwise"):
        return g * _derivative(layer, a_in, a_out).unsqueeze(1)
    if kind in ("reshape", "identity"):
        return g.reshape(N, V, *a_in.shape[1:])
    if kind == "maxpool2d" and a_in.ndim == 4:
        # The adjoint of picking each window's maximum: add each cotangent onto that element.
        idx = _maxpool_indices(layer, a_in).flatten(-2).unsqueeze(1)  # (N, 1, C, h·w)
        gi = g.new_zeros((N, V, *a_in.shape[1:])).flatten(-2)
        gi.scatter_add_(-1, idx.expand(N, V, -1, -1), g.flatten(-2))
        return gi.view(N, V, *a_in.shape[1:])
    if kind == "linear_pool" and isinstance(layer, nn.AvgPool2d) and _plain_pool(layer):
        # Non-overlapping average: the adjoint spreads each cotangent evenly over its window.
        k = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
        h, w = g.shape[-2:]
        gi = _upsampled(g, k).mul_(1.0 / (k[0] * k[1]))
        H, W = a_in.shape[-2:]
        return F.pad(gi, (0, W - w * k[1], 0, H - h * k[0])) if gi.shape[-2:] != (H, W) else gi
    if kind == "linear_pool" and _global_average(layer):
        H, W = a_in.shape[-2:]
        return (g * (1.0 / (H * W))).expand(N, V, *a_in.shape[1:])
    if kind == "linear_pool":  # linear and per-example: one pull-back for all N·V cotangents
        _, pull = vjp(layer, a_in.new_zeros((N * V, *a_in.shape[1:])))
        return pull(g.reshape(N * V, *g.shape[2:]))[0].view(N, V, *a_in.shape[1:])
    _, pull = vjp(lambda a: _call(layer, a), a_in)
    return vmap(pull, in_dims=1, out_dims=1)(g)[0]


def _channels_last(x: Tensor) -> Tensor:
    """A 4-D tensor in channels-last memory order; any other tensor as it is."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def _is_channels_last(a: Tensor) -> bool:
    return (
        a.ndim == 4 and not a.is_contiguous() and a.is_contiguous(memory_format=torch.channels_last)
    )


def _input_layout(chain: list, x: Tensor) -> Tensor:
    """The input in the memory order the sweeps use throughout: channels-last — oneDNN's fast
    layout, 3× faster than NCHW for 16 channels at 32×32 here — when a convolution has ≥ 16
    input channels; as given otherwise (channels-last is slower for LeNet's 1–6 channels). Every
    layer's activations, tangents and cotangents then follow this layout."""

    def wide(nodes):
        for _, node in nodes:
            if isinstance(node, _Block):
                if any(wide(branch) for branch in node.branches):
                    return True
            elif _kind(node) == "conv2d" and node.in_channels >= 16:
                return True
        return False

    return _channels_last(x) if wide(chain) else x


def _maxpool_indices(layer: nn.MaxPool2d, a: Tensor) -> Tensor:
    """Flat indices ``(N, C, h, w)`` into each ``(H·W)`` input plane of every window's maximum:
    the elements autograd's max-pooling gradient uses."""
    return F.max_pool2d(
        a,
        layer.kernel_size,
        layer.stride,
        layer.padding,
        layer.dilation,
        ceil_mode=layer.ceil_mode,
        return_indices=True,
    )[1]


def _global_average(layer: nn.Module) -> bool:
    return isinstance(layer, nn.AdaptiveAvgPool2d) and layer.output_size in (1, (1, 1))


def _plain_pool(layer: nn.AvgPool2d) -> bool:
    k, s = layer.kernel_size, layer.stride
    k = k if isinstance(k, tuple) else (k, k)
    s = s if isinstance(s, tuple) else (s, s)
    return (
        k == s
        and layer.padding in (0, (0, 0))
        and not layer.ceil_mode
        and (layer.divisor_override is None)
    )


def _run(chain: list, x: Tensor) -> tuple[Tensor, list]:
    """Forward through the chain: the output and, per node, ``(a_in, a_out, branch traces)``."""
    trace = []
    a = x
    for _, node in chain:
        if isinstance(node, _Block):
            outs = [_run(branch, a) for branch in node.branches]
            y = outs[0][0]
            for out, _ in outs[1:]:  # in BranchSum.forward's order
                y = y + out
            trace.append((a, y, [t for _, t in outs]))
        else:
            y = _call(node, a)
            trace.append((a, y, None))
        a = y
    return a, trace


def _node_trainable(node) -> bool:
    return _trainable(node.module if isinstance(node, _Block) else node)


def _upsampled(g: Tensor, k: tuple[int, int]) -> Tensor:
    """``g (..., h, w)`` repeated ``k = (kh, kw)`` times along each of its last two axes,
    ``(..., h·kh, w·kw)``: a new contiguous tensor, to write into (nearest-neighbour upsampling;
    one axis at a time, which is faster on CPU than one copy of a 7-d broadcast)."""
    (kh, kw), (h, w) = k, g.shape[-2:]
    up = g.unsqueeze(-1).expand(*g.shape, kw).reshape(*g.shape[:-1], w * kw)
    up = up.unsqueeze(-2).expand(*up.shape[:-1], kh, w * kw).reshape(*g.shape[:-2], h * kh, w * kw)
    # where a reshape needed no copy (a factor or a side of 1) it is a view, of g or with
    # repeated elements: copy it
    if not up.is_contiguous():
        return up.contiguous()
    if up.untyped_storage().data_ptr() == g.untyped_storage().data_ptr():
        return up.clone()
    return up


def _pull(chain: list, trace: list, g: Tensor, need_input: bool, record) -> Tensor | None:
    """Pull the cotangents ``g (N, V, *out)`` back through the chain, calling
    ``record(name, layer, a_in, g_out)`` for each trainable layer as the pull reaches it (last
    layer first); returns the input cotangent when ``need_input``."""
    before = [False]
    for _, node in chain[:-1]:
        before.append(before[-1] or _node_trainable(node))
    for k in range(len(chain) - 1, -1, -1):
        name, node = chain[k]
        a_in, a_out, branch_traces = trace[k]
        need = need_input or before[k]
        if isinstance(node, _Block):
            total = None
            for branch, branch_trace in zip(node.branches, branch_traces):
                gb = _pull(branch, branch_trace, g, need, record)
                if need:
                    total = gb if total is None else total + gb
            g = total
        else:
            if _trainable(node):
                if _kind(node) == "linear" and a_in.ndim != 2:
                    raise _Unsupported(
                        f"layer {name!r} (Linear) gets inputs of shape {tuple(a_in.shape)}, "
                        "not (N, features)"
                    )
                record(name, node, a_in, g)
            if need:
                g = _input_cotangent(node, a_in, a_out, g)
        if not need:
            return None
    return g


def _sweep(chain: list, x: Tensor):
    """Forward through the chain, then pull back the V logit cotangents.

    Returns ``(logits (N, V), [(name, layer, a_in, g_out (N, V, *out))] for trainable layers)``
    in forward order (branches of a block in any order); ``layer`` is a ``Linear``, ``Conv2d``
    or ``BatchNorm`` (see :func:`parameter_jacobians` for its parameters' Jacobians). Image
    tensors may be channels-last (see :func:`_input_layout`): reshape them, do not ``view``.
    A caller that reduces each layer's cotangents at once uses :func:`_traced` and
    :func:`_pull_logits` instead: the cotangents are then freed layer by layer, so the sweep's
    memory stays small and in cache (on ResNet-20 that makes one pair ~25 % faster).
    """
    z, trace = _traced(chain, x)
    records: list = []
    _pull_logits(chain, trace, z, lambda *r: records.append(r))
    records.reverse()
    return z, records


def _traced(chain: list, x: Tensor) -> tuple[Tensor, list]:
    """The forward half of :func:`_sweep`: the logits ``(N, V)`` and the chain's trace."""
    z, trace = _run(chain, _input_layout(chain, x))
    if z.ndim != 2:
        raise _Unsupported(f"the model's output has shape {tuple(z.shape)}, not logits (N, V)")
    return z, trace


def _pull_logits(chain: list, trace: list, z: Tensor, record) -> None:
    """The reverse half of :func:`_sweep`: the V unit cotangents of the logits ``z (N, V)``
    pulled back, ``record(name, layer, a_in, g_out (N, V, *out))`` called for each trainable
    layer, last layer first."""
    N, V = z.shape
    g = torch.eye(V, dtype=z.dtype, device=z.device).expand(N, V, V)
    _pull(chain, trace, g, False, record)


def _conv_weight_jacobian(layer: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-example, per-logit weight Jacobian ``(N, V, out, in·kh·kw)`` from inputs
    ``a (N, in, H, W)`` and output gradients ``g (N, V, out, H', W')``."""
    u = F.unfold(a, layer.kernel_size, layer.dilation, _padding(layer), layer.stride)
    N, V, out = g.shape[:3]
    return torch.einsum("nvop,nkp->nvok", g.reshape(N, V, out, -1), u)


def _weight_jacobian(layer: nn.Module, a: Tensor, g: Tensor) -> Tensor | None:
    """The materialised weight Jacobian of a record's layer (None for Linear layers, whose
    kernel factors, and for frozen weights)."""
    if not _trainable_flags(layer)[0]:
        return None
    kind = _kind(layer)
    if kind == "conv2d":
        return _conv_weight_jacobian(layer, a, g)
    if kind == "batchnorm":
        return _bn_weight_jacobian(layer, a, g)
    return None


def parameter_jacobians(layer: nn.Module, a_in: Tensor, g_out: Tensor) -> dict[str, Tensor]:
    """∂z/∂θ per example and logit for the trainable parameters of one record of the structured
    sweep ``(name, layer, a_in, g_out (N, V, *out))``: parameter name (``"weight"``,
    ``"bias"``) -> ``(N, V, *parameter shape)``. Per-example gradients of a loss are their
    contraction with ∂L/∂z ``(N, V)`` over V."""
    w_on, b_on = _trainable_flags(layer)
    N, V = g_out.shape[:2]
    out = {}
    if w_on:
        if _kind(layer) == "linear":
            out["weight"] = g_out.unsqueeze(-1) * a_in[:, None, None, :]
        else:
            out["weight"] = _weight_jacobian(layer, a_in, g_out).reshape(N, V, *layer.weight.shape)
    if b_on:
        out["bias"] = _bias_jacobian(g_out)
    return out


def _structured_blocks(chain, x1: Tensor, small) -> dict[str, Tensor]:
    """Per-layer kernels ``(N1, N2, V, V)`` of ``x1`` against the prepared small side (in the
    chain's order), each layer's taken as the pull of x1 reaches it."""
    z, trace = _traced(chain, x1)
    out = {}
    prepared = reversed(small)  # the pull meets the layers last first

    def record(name, layer, a1, g1):
        _, _, a2, g2, jw2 = next(prepared)
        w_on, b_on = _trainable_flags(layer)
        N1, V = g1.shape[:2]
        N2 = g2.shape[0]
        kind = _kind(layer)
        if kind == "linear":
            gg = torch.einsum("nio,mjo->nmij", g1, g2)
            factor = torch.zeros((N1, N2), dtype=gg.dtype, device=gg.device)
            if w_on:
                factor = factor + a1 @ a2.T
            if b_on:
                factor = factor + 1
            out[name] = gg * factor[:, :, None, None]
            return
        k = torch.zeros((N1, N2, V, V), dtype=g1.dtype, device=g1.device)
        if w_on and kind == "batchnorm":
            k = k + torch.einsum("nic,mjc->nmij", _bn_weight_jacobian(layer, a1, g1), jw2)
        elif w_on:
            # Conv2d: apply the small side's weight Jacobian to x1 as a convolution when that
            # costs less; else materialise x1's weight Jacobian too and contract.
            o = g1.shape[2]
            if _conv_as_filters(layer, g1[0, 0, 0].numel(), N2, V):
                weights = jw2.reshape(N2 * V * o, *layer.weight.shape[1:])
                t = F.conv2d(a1, weights, None, layer.stride, _padding(layer), layer.dilation)
                t = torch.bmm(g1.reshape(N1, V, -1), t.reshape(N1, N2 * V, -1).transpose(1, 2))
            else:
                jw1 = _conv_weight_jacobian(layer, a1, g1).reshape(N1 * V, -1)
                t = (jw1 @ jw2.reshape(N2 * V, -1).T).view(N1, V, N2 * V)
            k = k + t.view(N1, V, N2, V).permute(0, 2, 1, 3)
        if b_on:
            k = k + torch.einsum("nio,mjo->nmij", _bias_jacobian(g1), _bias_jacobian(g2))
        out[name] = k

    _pull_logits(chain, trace, z, record)
    return dict(reversed(out.items()))


def _conv_as_filters(layer: nn.Conv2d, positions: int, n2: int, v: int) -> bool:
    """Whether applying the small side's n2·v weight-Jacobian rows to x1 as filters costs fewer
    multiply-adds per x1 than materialising x1's weight Jacobian (v rows) and contracting."""
    weights = layer.weight[0].numel() * layer.out_channels
    filters = n2 * v * (weights + v * layer.out_channels) * positions
    materialised = v * weights * positions + n2 * v * v * weights
    return filters < materialised


def _tangent_through(layer: nn.Module, a_in: Tensor, a_out: Tensor, t: Tensor) -> Tensor:
    """Push M tangents ``t (N, M, *in)`` through a layer (its parameters held fixed)."""
    N, M = t.shape[:2]
    kind = _kind(layer)
    if kind == "linear":
        return t @ layer.weight.T
    if kind == "conv2d":
        y = t.reshape(N * M, *t.shape[2:])
        y = F.conv2d(
            _channels_last(y) if _is_channels_last(a_in) else y,
            layer.weight,
            None,
            layer.stride,
            _padding(layer),
            layer.dilation,
            layer.groups,
        )
        return y.view(N, M, *y.shape[1:])
    # ``t`` is always a fresh tensor of ours: scale it in place to save memory traffic.
    if kind == "batchnorm":
        return t.mul_(_channels(_bn_scale(layer), t.ndim, 2))
    if kind in ("tanh", "relu", "elementwise"):
        return t.mul_(_derivative(layer, a_in, a_out).unsqueeze(1))
    if kind == "maxpool2d" and a_in.ndim == 4:
        idx = _maxpool_indices(layer, a_in)  # (N, C, h, w)
        picked = t.flatten(-2).gather(-1, idx.flatten(-2).unsqueeze(1).expand(N, M, -1, -1))
        return picked.view(N, M, *idx.shape[1:])
    if (
        kind == "linear_pool"
        and isinstance(layer, nn.AvgPool2d)
        and _plain_pool(layer)
        and layer.kernel_size in (2, (2, 2))
    ):
        # 2×2 average as two strided adds: several times faster than avg_pool2d here.
        h, w = a_out.shape[-2:]
        t = t[..., : 2 * h, : 2 * w]
        t = t[..., 0::2, :] + t[..., 1::2, :]
        return (t[..., 0::2] + t[..., 1::2]) * 0.25
    if kind in ("reshape", "identity", "linear_pool"):
        y = layer(t.reshape(N * M, *t.shape[2:]))  # linear and per-example
        return y.view(N, M, *y.shape[1:])
    return vmap(lambda tm: jvp(lambda a: _call(layer, a), (a_in,), (tm,))[1], 1, 1)(t)


def _own_tangent(layer: nn.Module, a: Tensor, y: Tensor, a2: Tensor, g2: Tensor, jw2) -> Tensor:
    """The tangent ``(N, M, *out)`` that a layer's own parameters add at its output when they
    move along each of the small side's M = N2·R Jacobian rows (R = V, or 1 once contracted)."""
    w_on, b_on = _trainable_flags(layer)
    N, (N2, R) = len(a), g2.shape[:2]
    kind = _kind(layer)
    if kind == "linear":
        factor = torch.zeros((N, N2), dtype=a.dtype, device=a.device)
        if w_on:
            factor = factor + a @ a2.T
        if b_on:
            factor = factor + 1
        return (factor[:, :, None, None] * g2).reshape(N, N2 * R, -1)
    bias = _bias_jacobian(g2).reshape(N2 * R, -1) if b_on else None  # (M, C)
    if kind == "conv2d" and w_on:
        weights = jw2.reshape(-1, *layer.weight.shape[1:])
        bias = None if bias is None else bias.reshape(-1)
        c = F.conv2d(a, weights, bias, layer.stride, _padding(layer), layer.dilation)
        return c.view(N, N2 * R, *y.shape[1:])
    if kind == "batchnorm" and w_on:
        xhat = _bn_normalised(layer, a).unsqueeze(1)  # (N, 1, C, *spatial)
        own = _new_tangents((N, N2 * R, *y.shape[1:]), y)
        torch.mul(xhat, jw2.reshape(N2 * R, -1, *[1] * (y.ndim - 2)), out=own)
        return own if bias is None else own.add_(bias.view(N2 * R, -1, *[1] * (y.ndim - 2)))
    shape = (N, N2 * R, *y.shape[1:])
    return bias.view(1, N2 * R, -1, *[1] * (y.ndim - 2)).expand(shape).clone()


def _push(chain: list, a: Tensor, t: Tensor | None, small_by_name: dict):
    """Forward through the chain carrying tangents ``t (N, M, *)`` (None: zero so far)."""
    for name, node in chain:
        if isinstance(node, _Block):
            y, total = None, None
            last = len(node.branches) - 1
            for b, branch in enumerate(node.branches):
                tb = t if t is None or b == last else t.clone()  # branches scale in place
                yb, tb = _push(branch, a, tb, small_by_name)
                y = yb if y is None else y + yb
                if tb is not None:
                    total = tb if total is None else total.add_(tb)
            t = total
        else:
            y = _call(node, a)
            if t is not None:
                t = _tangent_through(node, a, y, t)
            if name in small_by_name:
                own = _own_tangent(node, a, y, *small_by_name[name])
                t = _tangent_layout(own, y) if t is None else t.add_(own)
        a = y
    return a, t


def _new_tangents(shape: tuple, a: Tensor) -> Tensor:
    """Uninitialised tangents ``(N, M, C, H, W)``: a view of channels-last ``(N·M, C, H, W)``
    when the activations ``a`` are channels-last (elementwise products then run contiguously)."""
    if len(shape) != 5 or not _is_channels_last(a):
        return a.new_empty(shape)
    flat = torch.empty(
        (shape[0] * shape[1], *shape[2:]),
        dtype=a.dtype,
        device=a.device,
        memory_format=torch.channels_last,
    )
    return flat.view(shape)


def _tangent_layout(t: Tensor, a: Tensor) -> Tensor:
    """``t`` in the layout of :func:`_new_tangents` (a copy only when that differs)."""
    if t.ndim != 5 or not _is_channels_last(a):
        return t
    return _new_tangents(tuple(t.shape), a).copy_(t)


def _forward_products(chain, x1: Tensor, small) -> Tensor:
    """Forward-mode NTK-vector products ``(N1, M, V)``: J(x1) times each of the small side's
    M = N2·R rows (R = V Jacobian rows, or 1 after :func:`_contract_small`), using each layer's
    structure for its own tangent."""
    small_by_name = {name: (a2, g2, jw2) for name, _, a2, g2, jw2 in small}
    return _push(chain, _input_layout(chain, x1), None, small_by_name)[1]


def _contract_small(small, v: Tensor):
    """Replace the V Jacobian rows of each small-side example by their combination with
    ``v (N2, V)``: the rows of J(x2)ᵀv, one per example."""
    out = []
    for name, layer, a, g, jw in small:
        g = torch.einsum("nj...,nj->n...", g, v).unsqueeze(1)
        jw = None if jw is None else torch.einsum("nj...,nj->n...", jw, v).unsqueeze(1).contiguous()
        out.append((name, layer, a, g, jw))
    return out


def _prepare_small(chain, x2: Tensor):
    """The small side's sweep: ``(name, layer, a_in, g_out, weight Jacobian or None)`` per
    trainable layer."""
    _, recs = _sweep(chain, x2)
    return [
        (name, layer, a, g, _contiguous(_weight_jacobian(layer, a, g)))
        for name, layer, a, g in recs
    ]


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _leaves(chain: list, trace: list):
    """``(layer, a_out)`` of every layer of a traced chain, branches included."""
    for (_, node), (_, a_out, branch_traces) in zip(chain, trace):
        if isinstance(node, _Block):
            for branch, branch_trace in zip(node.branches, branch_traces):
                yield from _leaves(branch, branch_trace)
        else:
            yield node, a_out


def _structured_chunk_size(chain, x1: Tensor, n2: int, v: int, forward: bool) -> int:
    """Examples of x1 per chunk so that one chunk's intermediates fit :data:`MEMORY_BUDGET`:
    activations with their n2·v tangents (forward), or activations, v cotangents, each conv
    layer's filter outputs or unfolded input and weight Jacobian, and each trainable layer's
    ``(n2, v, v)`` block (blocks)."""
    with torch.no_grad():
        _, trace = _run(chain, x1[:1])
    per_example = 0
    for layer, out in _leaves(chain, trace):
        if forward:  # activations and n2·v tangents
            per_example += out.numel() * (2 + n2 * v)
            continue
        per_example += out.numel() * (2 + v)
        if any(p.requires_grad for p in layer.parameters()):
            per_example += 2 * n2 * v * v
            if isinstance(layer, nn.Conv2d):
                positions = out[0, 0].numel()
                if _conv_as_filters(layer, positions, n2, v):
                    per_example += n2 * v * layer.out_channels * positions
                else:  # unfolded input and weight Jacobian
                    weights = layer.weight[0].numel()
                    per_example += weights * (positions + v * layer.out_channels)
    return max(1, MEMORY_BUDGET // max(1, per_example * x1.element_size()))


# --------------------------------------------------------------------------- generic path


def _generic_blocks(model, params, x1, x2, groups, chunk_size):
    """Per-group kernels; ``groups``: name -> list of parameter names. NTK-vector products
    (forward mode) along the rows of J(x2); when an operation has no forward-mode derivative
    (e.g. weight norm) or no batching rule for it (``nn.PReLU``'s fails on a batch of several
    examples with batched tangents), the rows of J(x1) by reverse mode instead, in chunks,
    contracted with J(x2)."""

    def f1(p, x):
        return functional_forward(model, p, x.unsqueeze(0)).squeeze(0)

    with _through_torch_func():
        j2 = _jacobians(f1, params, x2)  # name -> (N2, V, *shape)
        N2, V = next(iter(j2.values())).shape[:2]
        try:
            out = {}
            for group, names in groups.items():
                sub = {n: params[n] for n in names}
                tangents = {n: j2[n].reshape(N2 * V, *params[n].shape) for n in names}

                def ntk_vp(tangent, xc, sub=sub):
                    def f(s):
                        return functional_forward(model, {**params, **s}, xc)

                    return jvp(f, (sub,), (tangent,))[1]

                blocks = []
                for xc in x1.split(chunk_size):
                    prods = vmap(ntk_vp, (0, None))(tangents, xc)  # (N2·V, n, V)
                    blocks.append(prods.view(N2, V, len(xc), -1).permute(2, 0, 3, 1))
                out[group] = torch.cat(blocks)
            return out
        except (NotImplementedError, RuntimeError):
            pass  # reverse mode on x1 (it may fail too), outside the handler and its memory
        size = _reverse_chunk_size(params, V, x1)
        parts: dict[str, list[Tensor]] = {group: [] for group in groups}
        for xc in x1.split(size):
            j1 = _jacobians(f1, params, xc)
            for group, names in groups.items():
                blocks = [
                    torch.einsum("aip,bjp->abij", _rows_of(j1[n]), _rows_of(j2[n])) for n in names
                ]
                parts[group].append(sum(blocks))
        return {group: torch.cat(p) for group, p in parts.items()}


def _jacobians(f1, params: dict[str, Tensor], x: Tensor) -> dict[str, Tensor]:
    """J(x) ``name -> (N, V, *shape)`` of ``f1(params, example) -> (V,)``: vmapped over the
    examples, or one example at a time where a layer's batching rule fails on a batch of them
    (``nn.PReLU``'s: "The size of tensor a (2) must match the size of tensor b (4)")."""
    try:
        return vmap(jacrev(f1), (None, 0))(params, x)
    except RuntimeError:
        pass  # (the retry runs outside the handler, which would keep the failed try's memory)
    rows = [jacrev(f1)(params, xi) for xi in x]
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def _rows_of(jacobian: Tensor) -> Tensor:
    """A parameter's Jacobian ``(N, V, *shape)`` as rows ``(N, V, n)`` (0-d parameters too)."""
    return jacobian.reshape(*jacobian.shape[:2], -1)


def _reverse_chunk_size(params: dict[str, Tensor], v: int, x: Tensor) -> int:
    """Examples per chunk whose full Jacobians ``(n, V, P)`` fit :data:`MEMORY_BUDGET`."""
    per_example = v * sum(p.numel() for p in params.values()) * x.element_size()
    return max(1, MEMORY_BUDGET // per_example)


def _chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _forward_kernel(chain, x1: Tensor, small, chunk_size: int | None) -> Tensor:
    """K ``(N1, N2, V, V)`` by forward-mode products, chunk by chunk into the result."""
    N1, (N2, V) = len(x1), small[-1][3].shape[:2]
    size = chunk_size or (N1 if N1 <= 16 else _structured_chunk_size(chain, x1, N2, V, True))
    K = torch.empty((N1, N2, V, V), dtype=x1.dtype, device=x1.device)
    for start, end in _chunks(N1, size):
        t = _forward_products(chain, x1[start:end], small)
        K[start:end] = t.view(end - start, N2, V, V).transpose(2, 3)
    return K


def _block_kernels(chain, x1: Tensor, small, chunk_size: int | None, split: bool) -> dict:
    """Per-layer kernels (``split``) or their sum ``"total"``, ``(N1, N2, V, V)`` each, chunk by
    chunk into the result: the memory beyond the result stays within one chunk's budget."""
    N1, (N2, V) = len(x1), small[-1][3].shape[:2]
    size = chunk_size or (N1 if N1 <= 16 else _structured_chunk_size(chain, x1, N2, V, False))
    names = [rec[0] for rec in small] if split else ["total"]
    out = {n: torch.empty((N1, N2, V, V), dtype=x1.dtype, device=x1.device) for n in names}
    for start, end in _chunks(N1, size):
        blocks = _structured_blocks(chain, x1[start:end], small)
        if split:
            for name, block in blocks.items():
                out[name][start:end] = block
        else:
            total = out["total"][start:end]
            total.zero_()
            for block in blocks.values():
                total += block
    return out


# --------------------------------------------------------------------------- Gram norms


def _gram_factors(chain, x: Tensor) -> list[tuple]:
    """One structured sweep of ``x``, reduced per trainable layer to what its Gram blocks need,
    as ``(kind, first, second, bias)``: Linear ``("linear", inputs (N, in) or None, output
    gradients (N, V, out), bias trainable)``; Conv2d and BatchNorm ``("jacobian", weight
    Jacobian (N, V, weights) or None, bias Jacobian (N, V, channels) or None, False)``."""
    z, trace = _traced(chain, x)
    factors = []

    def record(_, layer, a, g):  # each layer reduced as the pull reaches it, its g then freed
        w_on, b_on = _trainable_flags(layer)
        kind = _kind(layer)
        if kind == "linear":
            factors.append(("linear", a if w_on else None, g, b_on))
            return
        if not w_on:
            jw = None
        elif kind == "batchnorm":
            jw = _bn_weight_jacobian(layer, a, g)
        else:
            jw = _conv_weight_jacobian(layer, a, g).flatten(2)
        factors.append(("jacobian", jw, _bias_jacobian(g) if b_on else None, False))

    _pull_logits(chain, trace, z, record)
    return factors[::-1]


def _concat_factors(parts: list[list[tuple]]) -> list[tuple]:
    """The factors of several chunks of examples as one set."""

    def cat(tensors):
        return None if tensors[0] is None else torch.cat(tensors)

    return [
        (kind, cat([p[k][1] for p in parts]), cat([p[k][2] for p in parts]), bias)
        for k, (kind, _, _, bias) in enumerate(parts[0])
    ]


def _gram_block(factors: list[tuple], rows: slice, cols: slice) -> Tensor:
    """K between the examples ``rows`` and ``cols`` of prepared factors, ``(r, V, c, V)``."""
    r, c = rows.stop - rows.start, cols.stop - cols.start
    K = None
    for kind, first, second, bias in factors:
        if kind == "linear":
            V = second.shape[1]
            term = second[rows].flatten(0, 1) @ second[cols].flatten(0, 1).T
            if first is not None:
                factor = first[rows] @ first[cols].T + (1.0 if bias else 0.0)
                term.view(r, V, c, V).mul_(factor[:, None, :, None])
            K = term if K is None else K.add_(term)
            continue
        for f in (first, second):
            if f is not None:
                a, b = f[rows].flatten(0, 1), f[cols].flatten(0, 1)
                K = a @ b.T if K is None else K.addmm_(a, b.T)
    return K.view(r, K.shape[0] // r, c, K.shape[1] // c)


def iter_kernel_norms(
    model: nn.Module, x: Tensor, *, chunk_size: int | None = None
) -> Iterator[tuple[int, int] | Tensor]:
    """‖K(x[a], x[b])‖_F for every pair of ``x (N, ...)``: yields ``(done, total)`` after each
    step, then the symmetric ``(N, N)`` tensor (in the model's dtype). Stop iterating to cancel.

    For ``nn.Sequential`` chains each example is swept once (a forward and a reverse sweep of V
    cotangents) and its per-layer factors are kept (V·(conv weights + linear outputs) + linear
    inputs numbers per example); then chunks of ``chunk_size`` rows (default from
    :data:`MEMORY_BUDGET`) are contracted against the examples from their own on, each block
    reduced to its norm at once. Other models take the generic path, row by row in tiles of
    about :data:`TILE_SECONDS` (``chunk_size`` does not apply). Progress counts swept examples
    plus kernel blocks computed; the first ``(0, total)`` comes before any work. The model is put
    in eval mode only while a step runs, never between steps."""
    return _iter_symmetric(model, x, chunk_size, norms=True)


def iter_kernel_gram(
    model: nn.Module, x: Tensor, *, chunk_size: int | None = None
) -> Iterator[tuple[int, int] | Tensor]:
    """K(x[a], x[b]) for every pair of ``x (N, ...)``: yields ``(done, total)`` after each step,
    then ``K (N, N, V, V)`` (the model's dtype; logit² per unit parameter step; K[b, a] =
    K[a, b]ᵀ exactly, the diagonal blocks symmetric), computed as :func:`iter_kernel_norms`
    computes its norms (eval mode, as every kernel here). Stop iterating to cancel."""
    return _iter_symmetric(model, x, chunk_size, norms=False)


def _iter_symmetric(
    model: nn.Module, x: Tensor, chunk_size: int | None, norms: bool
) -> Iterator[tuple[int, int] | Tensor]:
    """:func:`iter_kernel_norms` (``norms``) or :func:`iter_kernel_gram`."""
    x = _as_batch(model, x, "x")
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    if not trainable_parameters(model):
        raise ValueError("the model has no trainable parameters")
    N = len(x)
    chain = _chain(model)
    if chain is not None:
        try:
            with eval_mode(model), torch.no_grad(), _taken_by_model(x, "x"):
                V = _sweep(chain, x[:1])[0].shape[1]
                sweep_size = _structured_chunk_size(chain, x, 1, V, False)
        except _Unsupported:
            chain = None
    if chain is None:
        yield from _generic_symmetric(model, x, norms)
        return
    per_row = 2 * N * V * V * x.element_size()
    steps = list(_chunks(N, chunk_size or max(1, min(-(-N // 8), MEMORY_BUDGET // per_row))))
    total = N + sum((e - s) * (N - s) for s, e in steps)
    done = 0
    yield done, total  # at once: a caller shows progress (and can stop) from the start
    parts = []
    for start, end in _chunks(N, sweep_size):
        with eval_mode(model), torch.no_grad():
            parts.append(_gram_factors(chain, x[start:end]))
        done += end - start
        yield done, total
    factors = _concat_factors(parts)
    del parts
    out = x.new_zeros((N, N) if norms else (N, N, V, V))
    for start, end in steps:
        with torch.no_grad():
            block = _gram_block(factors, slice(start, end), slice(start, N))
            # (rows, columns), or (rows, columns, V, V)
            block = block.square().sum((1, 3)).sqrt() if norms else block.permute(0, 2, 1, 3)
        _fill_symmetric(out, block, slice(start, end), slice(start, N))
        done += (end - start) * (N - start)
        yield done, total
    yield _symmetric(out)


def _fill_symmetric(out: Tensor, block: Tensor, rows: slice, cols: slice) -> None:
    """``out[rows, cols] = block`` and its mirror ``out[cols, rows]`` (each V×V block transposed
    when ``out`` holds kernels, ``(N, N, V, V)``)."""
    out[rows, cols] = block
    out[cols, rows] = block.transpose(0, 1) if out.ndim == 2 else block.permute(1, 0, 3, 2)


#: The generic path's kernel norms are computed in tiles of one row and as many columns as take
#: about this long (s), so that a caller that stops between two tiles stops within about that.
TILE_SECONDS = 0.05


def _generic_symmetric(
    model: nn.Module, x: Tensor, norms: bool
) -> Iterator[tuple[int, int] | Tensor]:
    """:func:`iter_kernel_norms` or :func:`iter_kernel_gram` on the generic path: row by row,
    each row's columns (from the diagonal on) in tiles timed to about :data:`TILE_SECONDS`."""
    N = len(x)
    total = N * (N + 1) // 2
    out = None
    done, width = 0, 1
    yield done, total
    for row in range(N):
        start = row
        while start < N:
            end = min(N, start + width)
            began = time.perf_counter()
            block = _kernels(model, x[row : row + 1], x[start:end], "auto", None, False)["total"]
            if norms:
                block = block.flatten(2).norm(dim=2)
            took = time.perf_counter() - began
            if out is None:
                out = block.new_zeros((N, N, *block.shape[2:]))
            _fill_symmetric(out, block, slice(row, row + 1), slice(start, end))
            done += end - start
            start = end
            if took < TILE_SECONDS / 2:
                width = min(N, 2 * width)
            elif took > 2 * TILE_SECONDS:
                width = max(1, width // 2)
            yield done, total
    yield _symmetric(out)


def _symmetric(out: Tensor) -> Tensor:
    """Kernel blocks ``(N, N, V, V)`` averaged with their mirror: the off-diagonal blocks are
    exact mirrors already (unchanged), the diagonal ones become symmetric (their two halves were
    summed in different orders). Norms ``(N, N)`` are returned as they are."""
    if out.ndim == 2:
        return out
    return out.add_(out.permute(1, 0, 3, 2).clone()).mul_(0.5)


# --------------------------------------------------------------------------- public API


def _checked(
    model: nn.Module, x1, x2, method: str, chunk_size
) -> tuple[Tensor, Tensor, int | None]:
    """The kernel functions' arguments checked: ``x1``, ``x2`` as batches of the model's dtype and
    device, ``chunk_size`` a positive int or None; ValueError for anything else."""
    if method not in ("auto", "structured", "generic"):
        raise ValueError(f"method must be 'auto', 'structured' or 'generic', got {method!r}")
    x1 = _as_batch(model, x1, "x1")
    x2 = _as_batch(model, x2, "x2")
    _same_examples(x1, x2)
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    return x1, x2, chunk_size


def _kernels(
    model: nn.Module, x1: Tensor, x2: Tensor, method: str, chunk_size: int | None, split: bool
) -> dict[str, Tensor]:
    """Kernel blocks ``(N1, N2, V, V)``: one entry ``"total"``, or one per parameter group."""
    x1, x2, chunk_size = _checked(model, x1, x2, method, chunk_size)
    if len(x2) > len(x1):  # keep the small side small: K(x1, x2) = K(x2, x1)ᵀ
        swapped = _kernels(model, x2, x1, method, chunk_size, split)
        return {k: v.permute(1, 0, 3, 2) for k, v in swapped.items()}
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    with eval_mode(model):
        chain, why = _chain_with_reason(model) if method != "generic" else (None, "")
        if chain is None and method == "structured":
            raise ValueError(f"the structured path does not apply to this model: {why}")
        if chain is not None and not split and len(x1) == len(x2) == 1:
            with _taken_by_model(x2, "x1, x2"):
                pair = pair_kernel_and_gradient(model, x1, x2, None)
            if pair is not None:
                return {"total": pair[1][None, None]}
        if chain is not None:
            try:
                with torch.no_grad():
                    with _taken_by_model(x2, "x2"):
                        small = _prepare_small(chain, x2)
                    # Forward-mode NTK-vector products pay per row of J(x2): best for few x2.
                    if not split and len(x2) <= FORWARD_MAX_N2:
                        return {"total": _forward_kernel(chain, x1, small, chunk_size)}
                    return _block_kernels(chain, x1, small, chunk_size, split)
            except _Unsupported as e:
                if method == "structured":
                    raise ValueError(
                        f"the structured path does not apply to this model: {e}"
                    ) from None
        _check_logits(model, x2)
        groups: dict[str, list[str]] = {}
        for n in params:
            groups.setdefault(layer_of(n) if split else "total", []).append(n)
        size = chunk_size or max(1, 4096 // (len(x2) * 10))
        return _generic_blocks(model, params, x1, x2, groups, size)


def empirical_ntk(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """The empirical NTK blocks ``K (N1, N2, V, V)``, ``K[a, b] = J(x1[a]) J(x2[b])ᵀ``.

    ``x1 (N1, ...)``, ``x2 (N2, ...)`` are batches the model accepts. ``method``: "auto"
    (structured when the model allows it, else generic), "structured" or "generic". The large side
    is processed in chunks (``chunk_size`` examples, default from a cache-friendly 64 MiB
    budget), so N1 may be a whole test set. Taken in eval mode (every module's flag restored
    after), in the model's dtype and on its device. Units: logit² per unit parameter step.
    """
    return _kernels(model, x1, x2, method, chunk_size, split=False)["total"]


def empirical_ntk_by_layer(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """The kernel split by parameter group (module path, e.g. ``"conv1"``): name -> ``(N1, N2,
    V, V)``. The values sum to :func:`empirical_ntk`."""
    return _kernels(model, x1, x2, method, chunk_size, split=True)


def ntk_trace(model: nn.Module, x1: Tensor, x2: Tensor, **kwargs) -> Tensor:
    """The trace kernel ``Σ_i K[a, b, i, i]`` ``(N1, N2)``."""
    return empirical_ntk(model, x1, x2, **kwargs).diagonal(dim1=2, dim2=3).sum(-1)


def ntk_vector_product(
    model: nn.Module,
    x1: Tensor,
    x2: Tensor,
    vectors: Tensor,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """``Σ_b K(x1[a], x2[b]) · vectors[b]`` ``(N1, V)`` without forming K: J(x1) times the
    parameter-space vector Σ_b J(x2[b])ᵀ vectors[b]. With ``vectors`` = ∂L/∂z at x2 this is minus
    the logit change per unit learning rate of a gradient step on x2. ``vectors (N2, V)``."""
    x1, x2, chunk_size = _checked(model, x1, x2, method, chunk_size)
    vectors = torch.as_tensor(vectors).to(x2.device, x2.dtype)
    params = trainable_parameters(model)
    with eval_mode(model):
        chain, why = _chain_with_reason(model) if method != "generic" else (None, "")
        if chain is not None:
            try:
                with torch.no_grad():
                    with _taken_by_model(x2, "x2"):
                        small = _prepare_small(chain, x2)
                    if vectors.shape != small[-1][3].shape[:2]:
                        raise ValueError(
                            f"vectors must have shape {tuple(small[-1][3].shape[:2])}, "
                            f"got {tuple(vectors.shape)}"
                        )
                    small = _contract_small(small, vectors)
                    size = chunk_size or _structured_chunk_size(chain, x1, len(x2), 1, True)
                    parts = [_forward_products(chain, xc, small) for xc in x1.split(size)]
                    return torch.cat(parts).sum(1)
            except _Unsupported as e:
                if method == "structured":
                    raise ValueError(
                        f"the structured path does not apply to this model: {e}"
                    ) from None
        elif method == "structured":
            raise ValueError(f"the structured path does not apply to this model: {why}")
        fixed = {n: p.detach() for n, p in model.named_parameters()}

        def f(p, x):
            return functional_forward(model, {**fixed, **p}, x)

        _check_logits(model, x2)
        with _through_torch_func():
            z2, pull = vjp(lambda p: f(p, x2), params)
            if vectors.shape != z2.shape:
                raise ValueError(
                    f"vectors must have shape {tuple(z2.shape)}, got {tuple(vectors.shape)}"
                )
            (tangent,) = pull(vectors)
            try:
                size = chunk_size or 1000
                products = [
                    jvp(lambda p, xc=xc: f(p, xc), (params,), (tangent,))[1]
                    for xc in x1.split(size)
                ]
            except NotImplementedError:  # no forward-mode derivative: J(x1) by reverse mode
                flat = torch.cat([tangent[n].flatten() for n in params])
                products = []
                for xc in x1.split(chunk_size or _reverse_chunk_size(params, z2.shape[1], x1)):
                    jac = _jacobians(lambda p, x: f(p, x[None])[0], params, xc)
                    products.append(torch.cat([_rows_of(jac[n]) for n in params], 2) @ flat)
        return torch.cat(products).detach()


def pair_kernel_and_gradient(
    model: nn.Module, x_o: Tensor, x_u: Tensor, loss_gradient
) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """One reverse sweep over the batch ``[x_o, x_u]`` for the structured path: returns the logits
    ``(2, V)``, ``K(x_o, x_u) (V, V)`` and ∇θL at x_u by parameter name, where
    ``G = loss_gradient(z_u) (V,)`` is ∂L/∂z (no gradients when ``loss_gradient`` is None).
    None when the model needs the generic path.
    ``x_o``, ``x_u``: batches of one. The model must already be in eval mode. Each layer's
    share is taken as the pull reaches it, so its cotangents are freed at once."""
    chain = _chain(model)
    if chain is None:
        return None
    try:
        with torch.no_grad():
            z, trace = _traced(chain, torch.cat([x_o, x_u]))
    except _Unsupported:
        return None
    G = loss_gradient(z[1]) if loss_gradient is not None else None
    K = torch.zeros((z.shape[1],) * 2, dtype=z.dtype, device=z.device)
    grads = {}

    def record(name, layer, a, g):
        w_on, b_on = _trainable_flags(layer)
        prefix = f"{name}." if name else ""
        if _kind(layer) == "linear":
            gg = g[0] @ g[1].T
            K.add_(gg * ((a[0] @ a[1] if w_on else 0) + (1 if b_on else 0)))
            if G is None:
                return
            gu = G @ g[1]  # (out,)
            if w_on:
                grads[prefix + "weight"] = torch.outer(gu, a[1])
            if b_on:
                grads[prefix + "bias"] = gu
            return
        if w_on and _kind(layer) == "conv2d":
            k, grad = _conv_pair(layer, a, g, G)
            K.add_(k)
            if G is not None:
                grads[prefix + "weight"] = grad
        elif w_on:
            jw = _weight_jacobian(layer, a, g).flatten(2)  # (2, V, weights)
            K.add_(jw[0] @ jw[1].T)
            if G is not None:
                grads[prefix + "weight"] = (G @ jw[1]).view_as(layer.weight)
        if b_on:
            jb = _bias_jacobian(g)  # (2, V, out)
            K.add_(jb[0] @ jb[1].T)
            if G is not None:
                grads[prefix + "bias"] = G @ jb[1]

    try:
        with torch.no_grad():
            _pull_logits(chain, trace, z, record)
    except _Unsupported:
        return None
    return z, K, grads


def _conv_pair(layer: nn.Conv2d, a: Tensor, g: Tensor, G: Tensor | None):
    """A convolution's weight kernel ``(V, V)`` between the two examples of ``a (2, in, H, W)``
    with output gradients ``g (2, V, out, H', W')``, and the weight gradient for ∂L/∂z = ``G``
    at the second (None without ``G``). Of the two exact ways the cheaper one: the two weight
    Jacobians ``(V, out·in·kh·kw)`` and their product, or — when there are few positions P — the
    Gram matrix of the two examples' patches ``(P, P)`` between the output gradients."""
    u = F.unfold(a, layer.kernel_size, layer.dilation, _padding(layer), layer.stride)
    _, V, O = g.shape[:3]
    patch, P = u.shape[1:]
    g = g.reshape(2, V, O, P)
    if P * (patch + V * O) < 2 * V * O * patch:
        h = g[0].reshape(V * O, P) @ (u[0].T @ u[1])  # (V·O, P)
        k = h.reshape(V, O * P) @ g[1].reshape(V, O * P).T
        grad = None if G is None else (G @ g[1].reshape(V, O * P)).view(O, P) @ u[1].T
    else:
        jw = torch.bmm(g.reshape(2, V * O, P), u.transpose(1, 2)).view(2, V, O * patch)
        k = jw[0] @ jw[1].T
        grad = None if G is None else G @ jw[1]
    return k, None if grad is None else grad.view_as(layer.weight)


@dataclass(frozen=True)
class KernelPath:
    """Which exact algorithm the kernel functions take for a model: ``path`` is "structured" or
    "generic"; ``reason`` says why, in one sentence."""

    path: str
    reason: str


def kernel_path(model: nn.Module, example: Tensor | None = None) -> KernelPath:
    """The algorithm :func:`empirical_ntk` (``method="auto"``), :func:`ntk_vector_product` and
    ``decompose`` take for ``model``. The model's structure decides; with ``example`` (a batch,
    e.g. ``x[:1]``) one structured sweep also checks what only data shows (a Linear layer on
    inputs that are not ``(N, features)``, outputs that are not ``(N, V)``). The model is left
    unchanged. Raises ``ValueError`` when the model cannot take ``example``."""
    chain, why = _chain_with_reason(model)
    if chain is None:
        return KernelPath("generic", why)
    if example is not None:
        x = _as_batch(model, example, "example")[:1]
        with eval_mode(model), torch.no_grad():
            try:
                _sweep(chain, x)
            except _Unsupported as e:
                return KernelPath("generic", str(e))
            except RuntimeError as e:
                raise ValueError(
                    f"the model cannot take an example of shape {tuple(x.shape[1:])}: {e}"
                ) from None
    return KernelPath("structured", _describe(chain))


def _describe(chain: list) -> str:
    counts: dict[str, int] = {}
    others: set[str] = set()
    blocks = 0

    def visit(nodes):
        nonlocal blocks
        for _, node in nodes:
            if isinstance(node, _Block):
                blocks += 1
                for branch in node.branches:
                    visit(branch)
            elif _trainable(node):
                counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
            elif _kind(node) == "other":
                others.add(type(node).__name__)

    visit(chain)
    layers = ", ".join(f"{n} {name}" for name, n in counts.items())
    text = f"a chain of known layers; trainable: {layers}"
    if blocks:
        text += f"; {blocks} residual block{'s' * (blocks > 1)} (BranchSum)"
    if others:
        text += f"; followed one layer at a time by torch.func: {', '.join(sorted(others))}"
    return text


def pair_cost_seconds(model: nn.Module, x: Tensor, repeats: int = 3) -> float:
    """Measured time in seconds of one pair's kernel ``K(x[0], x[-1])`` on this machine, on the
    model's device and path: the best of ``repeats`` calls after one warm-up call (other work
    only adds time), each call's wall time — on the CPU its thread's CPU time where that is less
    (time spent waiting for the process's other threads, e.g. a GUI's, is not the kernel's).
    ``x (N, ...)``: one or two examples the model takes. The model is left unchanged."""
    x = _as_batch(model, x, "x")
    pair = (x[:1], x[-1:])
    empirical_ntk(model, *pair)
    times = []
    for _ in range(max(1, repeats)):
        start, cpu = time.perf_counter(), time.thread_time()
        empirical_ntk(model, *pair)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
        else:
            times.append(min(time.perf_counter() - start, time.thread_time() - cpu))
    return min(times)
