"""The empirical neural tangent kernel K(x1, x2) = J(x1) J(x2)ᵀ, J = ∂z/∂θ ``(V, P)``.

``K[a, b, i, j]`` is the change of logit ``z_i(x1[a])`` per unit change of ``z_j(x2[b])`` when θ moves
along ``∂z_j(x2[b])/∂θ``: a step that raises ``z_j(x2[b])`` also raises ``z_i(x1[a])`` when it is > 0.

Two exact algorithms:

* **structured** (Novak et al., "Fast Finite Width Neural Tangent Kernel", ICML 2022) for models that
  are ``nn.Sequential`` chains whose trainable layers are ``Linear`` and ``Conv2d``: one forward pass
  and one reverse sweep of V output cotangents per example; a layer's kernel then factors into its
  input activations and output gradients. Linear layers: ``(g1·g2)(a1·a2 + 1)``; convolutions: the
  small side's weight Jacobian is applied to the large side's activations as a convolution. This also
  gives the per-layer split at no extra cost.
* **generic** (``torch.func``): NTK-vector products, ``vmap`` of ``jvp`` along the rows of the small
  side's Jacobian. Works for any ``nn.Module`` that maps a batch to logits ``(N, V)``.

Every function evaluates the model in eval mode and leaves it exactly as it was (parameters,
buffers, train/eval flags). Only parameters with ``requires_grad`` count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from ntkviz.checks import positive_int

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


def layer_of(param_name: str) -> str:
    """The parameter group (module path) a parameter belongs to: ``"fc1.weight"`` -> ``"fc1"``."""
    return param_name.rpartition(".")[0] or param_name


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None)
    if p is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return p.device, p.dtype


def _as_batch(model: nn.Module, x: Tensor, name: str) -> Tensor:
    """``x`` as a non-empty floating-point batch on the model's device and in its dtype."""
    if not isinstance(x, Tensor):
        x = torch.as_tensor(x)
    device, dtype = _device_dtype(model)
    if x.ndim < 1 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty batch (N, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(
            f"{name} must hold floating-point inputs such as normalised images "
            f"(ImageDataset.normalize), got {x.dtype}"
        )
    return x.to(device=device, dtype=dtype)


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


# --------------------------------------------------------------------------- structured path


class _Unsupported(Exception):
    """The structured path cannot handle this model or input; use the generic path."""


def _chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model's leaf layers in order if it is a (nested) ``nn.Sequential`` whose trainable
    layers are all ``Linear`` or ``Conv2d`` with integer padding; else None."""
    if not isinstance(model, nn.Sequential):
        return None
    leaves: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> bool:
        if isinstance(module, nn.Sequential):
            return all(walk(f"{prefix}{n}.", c) for n, c in module.named_children())
        trainable = any(p.requires_grad for p in module.parameters())
        if trainable:
            if isinstance(module, nn.Conv2d):
                if (
                    module.groups != 1
                    or module.padding_mode != "zeros"
                    or isinstance(module.padding, str)
                ):
                    return False
            elif not isinstance(module, nn.Linear):
                return False
            if any(True for _ in module.children()):
                return False
        leaves.append((prefix[:-1], module))
        return True

    return leaves if walk("", model) else None


def _trainable_flags(module: nn.Module) -> tuple[bool, bool]:
    w = module.weight.requires_grad
    b = module.bias is not None and module.bias.requires_grad
    return w, b


def _input_cotangent(layer: nn.Module, a_in: Tensor, a_out: Tensor, g: Tensor) -> Tensor:
    """Pull V output cotangents ``g (V, N, *out)`` back to the layer's input ``(V, N, *in)``."""
    V, N = g.shape[:2]
    if isinstance(layer, nn.Linear):
        return g @ layer.weight
    if isinstance(layer, nn.Conv2d):
        gi = torch.nn.grad.conv2d_input(
            (V * N, *a_in.shape[1:]),
            layer.weight,
            g.reshape(V * N, *g.shape[2:]),
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        return gi.view(V, *a_in.shape)
    if isinstance(layer, nn.Tanh):
        return g * (1 - a_out * a_out)
    if isinstance(layer, nn.ReLU):
        return g * (a_in > 0)
    if isinstance(layer, nn.Flatten | nn.Unflatten | nn.Identity | nn.Dropout):
        return g.reshape(V, *a_in.shape)
    if isinstance(layer, nn.AvgPool2d) and _plain_pool(layer):
        # Non-overlapping average: the adjoint spreads each cotangent evenly over its window.
        k = layer.kernel_size if isinstance(layer.kernel_size, tuple) else (layer.kernel_size,) * 2
        h, w = g.shape[-2:]
        gi = g[..., :, None, :, None].expand(*g.shape[:-2], h, k[0], w, k[1])
        gi = gi.reshape(*g.shape[:-2], h * k[0], w * k[1]) * (1.0 / (k[0] * k[1]))
        H, W = a_in.shape[-2:]
        return F.pad(gi, (0, W - w * k[1], 0, H - h * k[0])) if gi.shape[-2:] != (H, W) else gi
    _, pull = vjp(layer, a_in)
    return vmap(pull)(g)[0]


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


def _sweep(chain: list[tuple[str, nn.Module]], x: Tensor):
    """Forward through the chain, then pull back the V logit cotangents.

    Returns ``(logits (N, V), [(name, layer, a_in, g_out (N, V, *out))] for trainable layers)``.
    """
    acts = [x]
    for _, layer in chain:
        acts.append(layer(acts[-1]))
    z = acts[-1]
    if z.ndim != 2:
        raise _Unsupported
    N, V = z.shape
    g = torch.eye(V, dtype=z.dtype, device=z.device).unsqueeze(1).expand(V, N, V)
    first_trainable = next(
        (k for k, (_, m) in enumerate(chain) if any(p.requires_grad for p in m.parameters())),
        len(chain),
    )
    records = []
    for k in range(len(chain) - 1, first_trainable - 1, -1):
        name, layer = chain[k]
        a_in, a_out = acts[k], acts[k + 1]
        if any(p.requires_grad for p in layer.parameters()):
            if isinstance(layer, nn.Linear) and a_in.ndim != 2:
                raise _Unsupported
            records.append((name, layer, a_in, g.transpose(0, 1)))
        if k > first_trainable:
            g = _input_cotangent(layer, a_in, a_out, g)
    records.reverse()
    return z, records


def _conv_weight_jacobian(layer: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Per-example, per-logit weight Jacobian ``(N, V, out, in·kh·kw)`` from inputs
    ``a (N, in, H, W)`` and output gradients ``g (N, V, out, H', W')``."""
    u = F.unfold(a, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
    N, V, out = g.shape[:3]
    return torch.einsum("nvop,nkp->nvok", g.reshape(N, V, out, -1), u)


def _structured_blocks(chain, x1: Tensor, small) -> dict[str, Tensor]:
    """Per-layer kernels ``(N1, N2, V, V)`` of ``x1`` against the prepared small side."""
    _, recs1 = _sweep(chain, x1)
    out = {}
    for (name, layer, a1, g1), (_, _, a2, g2, jw2) in zip(recs1, small):
        w_on, b_on = _trainable_flags(layer)
        N1, V = g1.shape[:2]
        N2 = g2.shape[0]
        if isinstance(layer, nn.Linear):
            gg = torch.einsum("nio,mjo->nmij", g1, g2)
            factor = torch.zeros((N1, N2), dtype=gg.dtype, device=gg.device)
            if w_on:
                factor = factor + a1 @ a2.T
            if b_on:
                factor = factor + 1
            out[name] = gg * factor[:, :, None, None]
            continue
        # Conv2d: apply the small side's weight Jacobian to x1 as a convolution when that costs
        # less; else materialise x1's weight Jacobian too and contract (Gram matrices).
        o = g1.shape[2]
        k = torch.zeros((N1, N2, V, V), dtype=g1.dtype, device=g1.device)
        if w_on:
            if _conv_as_filters(layer, g1[0, 0, 0].numel(), N2, V):
                weights = jw2.reshape(N2 * V * o, *layer.weight.shape[1:])
                t = F.conv2d(a1, weights, None, layer.stride, layer.padding, layer.dilation)
                t = torch.bmm(g1.reshape(N1, V, -1), t.reshape(N1, N2 * V, -1).transpose(1, 2))
            else:
                jw1 = _conv_weight_jacobian(layer, a1, g1).reshape(N1 * V, -1)
                t = (jw1 @ jw2.reshape(N2 * V, -1).T).view(N1, V, N2 * V)
            k = k + t.view(N1, V, N2, V).permute(0, 2, 1, 3)
        if b_on:
            k = k + torch.einsum("nio,mjo->nmij", g1.sum((3, 4)), g2.sum((3, 4)))
        out[name] = k
    return out


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
    if isinstance(layer, nn.Linear):
        return t @ layer.weight.T
    if isinstance(layer, nn.Conv2d):
        y = F.conv2d(
            t.reshape(N * M, *t.shape[2:]),
            layer.weight,
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
        )
        return y.view(N, M, *y.shape[1:])
    # ``t`` is always a fresh tensor of ours: scale it in place to save memory traffic.
    if isinstance(layer, nn.Tanh):
        return t.mul_((1 - a_out * a_out).unsqueeze(1))
    if isinstance(layer, nn.ReLU):
        return t.mul_((a_in > 0).unsqueeze(1))
    if isinstance(layer, nn.AvgPool2d) and _plain_pool(layer) and layer.kernel_size in (2, (2, 2)):
        # 2×2 average as two strided adds: several times faster than avg_pool2d here.
        h, w = a_out.shape[-2:]
        t = t[..., : 2 * h, : 2 * w]
        t = t[..., 0::2, :] + t[..., 1::2, :]
        return (t[..., 0::2] + t[..., 1::2]) * 0.25
    if isinstance(layer, nn.Flatten | nn.Unflatten | nn.Identity | nn.Dropout | nn.AvgPool2d):
        y = layer(t.reshape(N * M, *t.shape[2:]))  # linear and per-example
        return y.view(N, M, *y.shape[1:])
    return vmap(lambda tm: jvp(layer, (a_in,), (tm,))[1], in_dims=1, out_dims=1)(t)


def _forward_products(chain, x1: Tensor, small) -> Tensor:
    """Forward-mode NTK-vector products ``(N1, M, V)``: J(x1) times each of the small side's
    M = N2·R rows (R = V Jacobian rows, or 1 after :func:`_contract_small`), using each layer's
    structure for its own tangent."""
    params_of = {name: rec for name, *rec in small}
    a, t = x1, None
    for name, layer in chain:
        y = layer(a)
        if t is not None:
            t = _tangent_through(layer, a, y, t)
        if name in params_of:
            _, a2, g2, jw2 = params_of[name]
            w_on, b_on = _trainable_flags(layer)
            N, (N2, V) = len(a), g2.shape[:2]
            if isinstance(layer, nn.Linear):
                factor = torch.zeros((N, N2), dtype=a.dtype, device=a.device)
                if w_on:
                    factor = factor + a @ a2.T
                if b_on:
                    factor = factor + 1
                own = (factor[:, :, None, None] * g2).reshape(N, N2 * V, -1)
            else:
                bias = g2.sum((3, 4)).reshape(-1) if b_on else None
                if w_on:
                    weights = jw2.reshape(-1, *layer.weight.shape[1:])
                    c = F.conv2d(a, weights, bias, layer.stride, layer.padding, layer.dilation)
                    own = c.view(N, N2 * V, *y.shape[1:])
                else:
                    own = bias.view(1, N2 * V, -1, 1, 1).expand(N, -1, -1, *y.shape[2:]).clone()
            t = own if t is None else t.add_(own)
        a = y
    return t


def _contract_small(small, v: Tensor):
    """Replace the V Jacobian rows of each small-side example by their combination with
    ``v (N2, V)``: the rows of J(x2)ᵀv, one per example."""
    out = []
    for name, layer, a, g, jw in small:
        g = torch.einsum("nj...,nj->n...", g, v).unsqueeze(1)
        jw = None if jw is None else torch.einsum("nj...,nj->n...", jw, v).unsqueeze(1)
        out.append((name, layer, a, g, jw))
    return out


def _prepare_small(chain, x2: Tensor):
    _, recs = _sweep(chain, x2)
    small = []
    for name, layer, a, g in recs:
        jw = None
        if isinstance(layer, nn.Conv2d) and layer.weight.requires_grad:
            jw = _conv_weight_jacobian(layer, a, g)
        small.append((name, layer, a, g, jw))
    return small


def _structured_chunk_size(chain, x1: Tensor, n2: int, v: int, forward: bool) -> int:
    """Examples of x1 per chunk so that one chunk's intermediates fit :data:`MEMORY_BUDGET`:
    activations with their n2·v tangents (forward), or activations, v cotangents, each conv
    layer's filter outputs or unfolded input and weight Jacobian, and each trainable layer's
    ``(n2, v, v)`` block (blocks)."""
    with torch.no_grad():
        probe = x1[:1]
        per_example = 0
        for _, layer in chain:
            probe = layer(probe)
            if forward:
                per_example += probe.numel() * (2 + n2 * v)
                continue
            per_example += probe.numel() * (2 + v)
            if any(p.requires_grad for p in layer.parameters()):
                per_example += 2 * n2 * v * v
                if isinstance(layer, nn.Conv2d):
                    positions = probe[0, 0].numel()
                    if _conv_as_filters(layer, positions, n2, v):
                        per_example += n2 * v * layer.out_channels * positions
                    else:  # unfolded input and weight Jacobian
                        weights = layer.weight[0].numel()
                        per_example += weights * (positions + v * layer.out_channels)
    return max(1, MEMORY_BUDGET // max(1, per_example * x1.element_size()))


# --------------------------------------------------------------------------- generic path


def _generic_blocks(model, params, x1, x2, groups, chunk_size):
    """Per-group kernels via NTK-vector products; ``groups``: name -> list of parameter names."""

    def f1(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    with _taken_by_model(x2, "x2"):
        j2 = vmap(jacrev(f1), (None, 0))(params, x2)  # name -> (N2, V, *shape)
    N2, V = next(iter(j2.values())).shape[:2]
    out = {}
    for group, names in groups.items():
        sub = {n: params[n] for n in names}
        tangents = {n: j2[n].reshape(N2 * V, *params[n].shape) for n in names}

        def ntk_vp(tangent, xc, sub=sub):
            def f(s):
                return functional_call(model, {**params, **s}, (xc,))

            return jvp(f, (sub,), (tangent,))[1]

        blocks = []
        for xc in x1.split(chunk_size):
            prods = vmap(ntk_vp, (0, None))(tangents, xc)  # (N2·V, n, V)
            blocks.append(prods.view(N2, V, len(xc), -1).permute(2, 0, 3, 1))
        out[group] = torch.cat(blocks)
    return out


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
    gradients (N, V, out), bias trainable)``; Conv2d ``("conv", weight Jacobian (N, V,
    out·in·kh·kw) or None, bias Jacobian (N, V, out) or None, False)``."""
    _, records = _sweep(chain, x)
    factors = []
    for _, layer, a, g in records:
        w_on, b_on = _trainable_flags(layer)
        if isinstance(layer, nn.Linear):
            factors.append(("linear", a if w_on else None, g, b_on))
        else:
            jw = _conv_weight_jacobian(layer, a, g).flatten(2) if w_on else None
            factors.append(("conv", jw, g.sum((3, 4)) if b_on else None, False))
    return factors


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
    reduced to its norm at once. Other models take the generic path, chunk by chunk of rows.
    Progress counts swept examples plus kernel blocks computed. The model is put in eval mode
    only while a step runs, never between steps."""
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
    per_row = 2 * N * V * V * x.element_size() if chain is not None else 1
    rows = chunk_size or max(1, min(-(-N // 8), MEMORY_BUDGET // per_row))
    steps = list(_chunks(N, rows))
    total = (N if chain is not None else 0) + sum((e - s) * (N - s) for s, e in steps)
    done, factors = 0, None
    if chain is not None:
        parts = []
        for start, end in _chunks(N, sweep_size):
            with eval_mode(model), torch.no_grad():
                parts.append(_gram_factors(chain, x[start:end]))
            done += end - start
            yield done, total
        factors = _concat_factors(parts)
        del parts
    norms = torch.zeros((N, N), dtype=x.dtype, device=x.device)
    for start, end in steps:
        if factors is not None:
            with torch.no_grad():
                block = _gram_block(factors, slice(start, end), slice(start, N))
                nb = block.square().sum((1, 3)).sqrt()
        else:
            nb = _kernels(model, x[start:end], x[start:], "auto", None, False)["total"]
            nb = nb.flatten(2).norm(dim=2)
        norms[start:end, start:] = nb
        norms[start:, start:end] = nb.T
        done += (end - start) * (N - start)
        yield done, total
    yield norms


# --------------------------------------------------------------------------- public API


def _kernels(
    model: nn.Module, x1: Tensor, x2: Tensor, method: str, chunk_size: int | None, split: bool
) -> dict[str, Tensor]:
    """Kernel blocks ``(N1, N2, V, V)``: one entry ``"total"``, or one per parameter group."""
    if method not in ("auto", "structured", "generic"):
        raise ValueError(f"method must be 'auto', 'structured' or 'generic', got {method!r}")
    x1 = _as_batch(model, x1, "x1")
    x2 = _as_batch(model, x2, "x2")
    _same_examples(x1, x2)
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    if len(x2) > len(x1):  # keep the small side small: K(x1, x2) = K(x2, x1)ᵀ
        swapped = _kernels(model, x2, x1, method, chunk_size, split)
        return {k: v.permute(1, 0, 3, 2) for k, v in swapped.items()}
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    with eval_mode(model):
        chain = _chain(model) if method != "generic" else None
        if chain is None and method == "structured":
            raise ValueError("the structured path needs an nn.Sequential of Linear/Conv2d layers")
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
            except _Unsupported:
                if method == "structured":
                    raise ValueError("the structured path does not support this model") from None
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
    budget), so N1 may be a whole test set. Units: logit² per unit parameter step.
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
    if method not in ("auto", "structured", "generic"):
        raise ValueError(f"method must be 'auto', 'structured' or 'generic', got {method!r}")
    x1 = _as_batch(model, x1, "x1")
    x2 = _as_batch(model, x2, "x2")
    _same_examples(x1, x2)
    if chunk_size is not None:
        chunk_size = positive_int(chunk_size, "chunk_size")
    vectors = torch.as_tensor(vectors).to(x2.device, x2.dtype)
    params = trainable_parameters(model)
    with eval_mode(model):
        chain = _chain(model) if method != "generic" else None
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
            except _Unsupported:
                if method == "structured":
                    raise ValueError("the structured path does not support this model") from None
        elif method == "structured":
            raise ValueError("the structured path needs an nn.Sequential of Linear/Conv2d layers")
        fixed = {n: p.detach() for n, p in model.named_parameters()}

        def f(p, x):
            return functional_call(model, {**fixed, **p}, (x,))

        with _taken_by_model(x2, "x2"):
            z2, pull = vjp(lambda p: f(p, x2), params)
        if vectors.shape != z2.shape:
            raise ValueError(
                f"vectors must have shape {tuple(z2.shape)}, got {tuple(vectors.shape)}"
            )
        (tangent,) = pull(vectors)
        size = chunk_size or 1000
        return torch.cat(
            [jvp(lambda p, xc=xc: f(p, xc), (params,), (tangent,))[1] for xc in x1.split(size)]
        ).detach()


def pair_kernel_and_gradient(
    model: nn.Module, x_o: Tensor, x_u: Tensor, loss_gradient
) -> tuple[Tensor, Tensor, dict[str, Tensor]] | None:
    """One reverse sweep over the batch ``[x_o, x_u]`` for the structured path: returns the logits
    ``(2, V)``, ``K(x_o, x_u) (V, V)`` and ∇θL at x_u by parameter name, where
    ``G = loss_gradient(z_u) (V,)`` is ∂L/∂z (no gradients when ``loss_gradient`` is None).
    None when the model needs the generic path.
    ``x_o``, ``x_u``: batches of one. The model must already be in eval mode."""
    chain = _chain(model)
    if chain is None:
        return None
    try:
        with torch.no_grad():
            z, records = _sweep(chain, torch.cat([x_o, x_u]))
    except _Unsupported:
        return None
    G = loss_gradient(z[1]) if loss_gradient is not None else None
    K = torch.zeros((z.shape[1],) * 2, dtype=z.dtype, device=z.device)
    grads = {}
    with torch.no_grad():
        for name, layer, a, g in records:
            w_on, b_on = _trainable_flags(layer)
            prefix = f"{name}." if name else ""
            if isinstance(layer, nn.Linear):
                gg = g[0] @ g[1].T
                K += gg * ((a[0] @ a[1] if w_on else 0) + (1 if b_on else 0))
                if G is None:
                    continue
                gu = G @ g[1]  # (out,)
                if w_on:
                    grads[prefix + "weight"] = torch.outer(gu, a[1])
                if b_on:
                    grads[prefix + "bias"] = gu
                continue
            if w_on:
                jw = _conv_weight_jacobian(layer, a, g)  # (2, V, out, in·kh·kw)
                K += jw[0].flatten(1) @ jw[1].flatten(1).T
                if G is not None:
                    grads[prefix + "weight"] = torch.einsum("j,jok->ok", G, jw[1]).view_as(
                        layer.weight
                    )
            if b_on:
                jb = g.sum((3, 4))  # (2, V, out)
                K += jb[0] @ jb[1].T
                if G is not None:
                    grads[prefix + "bias"] = G @ jb[1]
    return z, K, grads
