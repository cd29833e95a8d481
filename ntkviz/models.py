"""Classifiers that map images ``(N, 1, 28, 28)`` to logits ``(N, V)``.

Both models are :class:`torch.nn.Sequential` chains of named layers, which lets the kernel code use
its structured fast path; any other ``nn.Module`` that returns logits works with the generic path.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class LeNet(nn.Sequential):
    """The LeNet of Ren & Sutherland (2025): 29,624 parameters for V = 10.

    Conv 1→6 k5 pad 2, Tanh, AvgPool 2; Conv 6→16 k5, Tanh, AvgPool 2; Linear 400→60, Tanh;
    60→42, Tanh; 42→V.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__(
            OrderedDict(
                conv1=nn.Conv2d(1, 6, 5, padding=2),
                tanh1=nn.Tanh(),
                pool1=nn.AvgPool2d(2),
                conv2=nn.Conv2d(6, 16, 5),
                tanh2=nn.Tanh(),
                pool2=nn.AvgPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(400, 60),
                tanh3=nn.Tanh(),
                fc2=nn.Linear(60, 42),
                tanh4=nn.Tanh(),
                fc3=nn.Linear(42, num_classes),
            )
        )


class MLP(nn.Sequential):
    """784-256-256-V with ReLU: 269,322 parameters for V = 10."""

    def __init__(self, num_classes: int = 10, hidden: int = 256):
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(784, hidden),
                relu1=nn.ReLU(),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(),
                fc3=nn.Linear(hidden, num_classes),
            )
        )


#: name -> (class, one-line description). Adding a model is one entry here.
MODELS: dict[str, tuple[type[nn.Module], str]] = {
    "lenet": (LeNet, "LeNet (paper): 2 conv + 3 linear layers, tanh, 29.6k parameters"),
    "mlp": (MLP, "MLP 784-256-256-10, ReLU, 269k parameters"),
}


def build_model(name: str, num_classes: int = 10, seed: int | None = 0) -> nn.Module:
    """A freshly initialised model from :data:`MODELS`; ``seed`` makes the initialisation
    reproducible without touching the global random state."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    cls = MODELS[key][0]
    if seed is None:
        return cls(num_classes=num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(num_classes=num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
