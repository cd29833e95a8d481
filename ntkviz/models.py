"""Classifiers that map images ``(N, C, H, W)`` to logits ``(N, V)``, and the model registry.

Every registry model takes ``num_classes``, ``in_channels`` and ``image_size`` (square images), so
each builds for 1×28×28 MNIST and for 3×32×32 CIFAR. LeNet, the MLP and the ResNets are
:class:`torch.nn.Sequential` chains (the ResNets' residual blocks are :class:`BranchSum` modules),
which lets the kernel code use its structured fast path; the ViT, like any other ``nn.Module`` that
returns logits, takes the generic path.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from functools import partial

import torch
from torch import nn


class BranchSum(nn.Module):
    """The sum of several branches applied to one input: ``forward(x) = Σ_b branches[b](x)``.

    A residual block is ``BranchSum(main, nn.Identity())``. The kernel's structured path follows
    each branch (a chain of layers, or another ``BranchSum``) on its own and adds the results.
    """

    def __init__(self, *branches: nn.Module):
        super().__init__()
        if not branches:
            raise ValueError("BranchSum needs at least one branch")
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


def _check_size(name: str, image_size: int, smallest: int) -> None:
    if image_size < smallest:
        raise ValueError(f"{name} needs images of at least {smallest}×{smallest} pixels")


class LeNet(nn.Sequential):
    """The LeNet of Ren & Sutherland (2025): 29,624 parameters for 1×28×28 and V = 10.

    Conv C→6 k5 pad 2, Tanh, AvgPool 2; Conv 6→16 k5, Tanh, AvgPool 2; Linear 16·s·s→60, Tanh;
    60→42, Tanh; 42→V, where s = (image_size // 2 − 4) // 2 (5 for 28, 6 for 32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        _check_size("LeNet", image_size, 12)
        side = (image_size // 2 - 4) // 2
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, 6, 5, padding=2),
                tanh1=nn.Tanh(),
                pool1=nn.AvgPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                tanh2=nn.Tanh(),
                pool2=nn.AvgPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(16 * side * side, 60),
                tanh3=nn.Tanh(),
                fc2=nn.Linear(60, 42),
                tanh4=nn.Tanh(),
                fc3=nn.Linear(42, num_classes),
            )
        )


class MLP(nn.Sequential):
    """(C·H·W)-256-256-V with ReLU: 269,322 parameters for 1×28×28 and V = 10."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 256
    ):
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(in_channels * image_size * image_size, hidden),
                relu1=nn.ReLU(),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(),
                fc3=nn.Linear(hidden, num_classes),
            )
        )


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int) -> list[tuple[str, nn.Module]]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False)
    return [("conv", conv), ("bn", nn.BatchNorm2d(c_out))]


def _basic_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    """conv3×3–BN–ReLU–conv3×3–BN plus the shortcut (identity, or a strided 1×1 conv and BN when
    the shape changes), then ReLU."""
    main = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
            bn1=nn.BatchNorm2d(c_out),
            relu=nn.ReLU(),
            conv2=nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False),
            bn2=nn.BatchNorm2d(c_out),
        )
    )
    if stride == 1 and c_in == c_out:
        shortcut: nn.Module = nn.Identity()
    else:
        shortcut = nn.Sequential(OrderedDict(_conv_bn(c_in, c_out, 1, stride)))
    return nn.Sequential(OrderedDict(add=BranchSum(main, shortcut), relu=nn.ReLU()))


class ResNet(nn.Sequential):
    """He et al.'s CIFAR ResNet (2016, §4.2) with projection shortcuts: a 3×3 conv (16 channels),
    three stages of n basic blocks (16, 32, 64 channels; stride 2 into stages 2 and 3), global
    average pooling and a linear layer; depth = 6n + 2. ResNet-20: 272,474 parameters for 3
    channels and V = 10; ResNet-8: 78,042. Any image size ≥ 8 (the pooling is global)."""

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, depth: int = 20
    ):
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n ≥ 1 (8, 14, 20, …), got {depth}")
        _check_size("ResNet", image_size, 8)
        n = (depth - 2) // 6
        layers: list[tuple[str, nn.Module]] = [
            ("stem", nn.Sequential(OrderedDict([*_conv_bn(in_channels, 16, 3, 1)]))),
            ("relu", nn.ReLU()),
        ]
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64), start=1):
            blocks = [
                _basic_block(c_in if b == 0 else c_out, c_out, 2 if b == 0 and stage > 1 else 1)
                for b in range(n)
            ]
            layers.append((f"stage{stage}", nn.Sequential(*blocks)))
            c_in = c_out
        layers += [
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
            ("fc", nn.Linear(64, num_classes)),
        ]
        super().__init__(OrderedDict(layers))


class Attention(nn.Module):
    """Multi-head self-attention on tokens ``(N, T, D)``, written out as softmax(q·kᵀ/√d)·v so
    that every ``torch.func`` transform applies."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, T, d) each
        weights = (q @ k.transpose(-2, -1) / math.sqrt(D // self.heads)).softmax(-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(N, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attention(LN(x)), then + MLP(LN(x)) with GELU."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping patches (a strided conv) to ``dim``-wide
    tokens plus learnt position embeddings, ``depth`` transformer blocks, LayerNorm, the mean
    token, and a linear head. Patches default to image_size // 4 pixels (4×4 tokens; pixels past
    the last whole patch are ignored). 71,946 parameters for 1×28×28 and V = 10."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int | None = None,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
    ):
        super().__init__()
        patch = patch_size or max(1, image_size // 4)
        if not 1 <= patch <= image_size:
            raise ValueError(f"patch size must be in 1..{image_size}, got {patch}")
        tokens = (image_size // patch) ** 2
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, 2 * dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens)).mean(1))


#: name -> (factory, one-line description). Adding a model is one entry here; a factory takes
#: ``num_classes``, ``in_channels`` and ``image_size`` keywords. Parameter counts for MNIST.
MODELS: dict[str, tuple[type[nn.Module] | partial, str]] = {
    "lenet": (LeNet, "LeNet (paper): 2 conv + 3 linear layers, tanh, 29.6k parameters"),
    "mlp": (MLP, "MLP 784-256-256-10, ReLU, 269k parameters"),
    "resnet8": (partial(ResNet, depth=8), "ResNet-8 (CIFAR): BatchNorm, residual blocks, 78k"),
    "resnet20": (partial(ResNet, depth=20), "ResNet-20 (CIFAR): BatchNorm, residual blocks, 272k"),
    "vit": (ViT, "ViT: 4×4 patches, 2 attention blocks, LayerNorm, 72k parameters"),
}


def build_model(
    name: str,
    num_classes: int = 10,
    seed: int | None = 0,
    *,
    in_channels: int = 1,
    image_size: int = 28,
) -> nn.Module:
    """A freshly initialised model from :data:`MODELS` for images ``(in_channels, image_size,
    image_size)`` and ``num_classes`` classes; ``seed`` makes the initialisation reproducible
    without touching the global random state. Raises ``ValueError`` for an unknown name or an
    impossible shape."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for what, value in shape.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{what} must be a positive int, got {value!r}")
        shape[what] = int(value)
    factory = MODELS[key][0]
    if seed is None:
        return factory(**shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(**shape)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
