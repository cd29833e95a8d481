"""Model factories for the tests of ``--model PATH:FACTORY`` (ntkviz.modelspec): loaded by path."""

import torch
from torch import nn


def small_cnn() -> nn.Module:
    """A BatchNorm CNN with a residual block for 1×28×28 MNIST, outside the registry."""
    from ntkviz.models import BranchSum

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        BranchSum(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.Identity()),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 7 * 7, 10),
    )


class Wrapped(nn.Module):
    """Not a chain: the generic path."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn()

    def forward(self, x):
        return self.body(x) * 0.5

    @classmethod
    def build(cls) -> "Wrapped":
        return cls()


def five_classes() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))


class _Rounded(nn.Module):
    """Integer logits (argmax of a linear layer's output, one-hot): no kernel to take."""

    def __init__(self, detach: bool):
        super().__init__()
        self.fc, self.detach = nn.Linear(784, 10), detach

    def forward(self, x):
        z = self.fc(x.flatten(1))
        return z.detach() if self.detach else z.round().long()


def int_logits() -> nn.Module:
    return _Rounded(detach=False)


def detached() -> nn.Module:
    return _Rounded(detach=True)


def raises() -> nn.Module:
    raise RuntimeError("no GPU here (raised by the factory)")


def not_a_module():
    return {"weights": torch.zeros(3)}


NOT_CALLABLE = 42


def tiny_rgb() -> nn.Module:
    """A tiny CNN for 3×8×8 RGB images of 3 classes (the CLI tests' image folder)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def no_bias() -> nn.Module:
    """No bias anywhere: the number of classes shows only in the output."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32, bias=False), nn.ReLU(), nn.Linear(32, 10, bias=False)
    )


class HeadFirst(nn.Module):
    """Its head is registered before its body: the last bias of its state dict is the body's."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(32, 10)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


class Flaky(nn.Module):
    """Raises a RuntimeError (as an out-of-memory would) in its third training-mode forward."""

    error = RuntimeError

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 3:
                raise self.error("out of memory (simulated)")
        return self.net(x)


class FlakyIndex(Flaky):
    error = IndexError


def batch_norm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.Linear(16, 10))
