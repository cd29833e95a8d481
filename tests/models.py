"""Small models for the tests: each path of the kernel code, in float64."""

import torch
from torch import nn

from ntkviz.models import build_model


class TinyCNN(nn.Sequential):
    """A structured-path CNN with ReLU, max pooling (generic pull-back) and dilation/stride."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3, dilation=2),
            nn.MaxPool2d(2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 10),
        )


class Residual(nn.Module):
    """Not a Sequential chain: only the generic path applies (with BatchNorm in eval mode)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 28 * 28, 10)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        return self.fc((h + x).flatten(1))


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "tiny_cnn":
        m = TinyCNN()
    elif name == "residual":
        m = Residual()
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    else:
        m = build_model(name, seed=seed)
    return m.double()


def inputs(n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
