"""Small models for the tests: each path of the kernel code, in float64."""

from collections import OrderedDict

import torch
from torch import nn

from ntkviz.models import BranchSum, build_model


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


class KitchenSink(nn.Sequential):
    """Every layer kind of the structured path on 3×16×16 inputs: "same" padding, BatchNorm 2d
    and 1d, GELU/SiLU/ELU, overlapping max pooling after an in-place ReLU (ties at 0), nested
    residual blocks with a parameter-free branch, Dropout, adaptive average pooling and a
    parameter-free layer without a closed form (LocalResponseNorm: torch.func per layer)."""

    def __init__(self):
        super().__init__(
            OrderedDict(
                conv=nn.Conv2d(3, 4, 3, padding="same"),
                bn=nn.BatchNorm2d(4),
                relu=nn.ReLU(inplace=True),
                pool=nn.MaxPool2d(3, stride=2, padding=1),
                block=BranchSum(
                    nn.Sequential(
                        nn.Conv2d(4, 4, 3, padding=1, bias=False),
                        nn.BatchNorm2d(4),
                        nn.GELU(),
                        nn.Dropout2d(0.5),
                    ),
                    nn.Identity(),
                    BranchSum(nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(4, 4, 1)),
                ),
                silu=nn.SiLU(),
                norm=nn.LocalResponseNorm(2),
                gap=nn.AdaptiveAvgPool2d(2),
                flatten=nn.Flatten(),
                fc1=nn.Linear(16, 12),
                bn1=nn.BatchNorm1d(12),
                elu=nn.ELU(),
                drop=nn.Dropout(0.3),
                fc2=nn.Linear(12, 10),
            )
        )


def randomise_batch_norms(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that any of them left out of a
    kernel shows (the global generator; seed it first)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


#: name -> input shape of one example, for the models that do not take 1×28×28.
SHAPES = {
    "frozen_same_inplace": (1, 28, 28),
    "kitchen_sink": (3, 16, 16),
    "resnet8_cifar": (3, 32, 32),
    "vit_cifar": (3, 32, 32),
}


class BatchNormBlocks(nn.Sequential):
    """A chain with a trainable BatchNorm and a residual block (kernels: structured path; step
    accounts: generic path)."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            BranchSum(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.Identity()),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 7 * 7, 10),
        )  # fmt: skip


class FrozenSameInplace(nn.Sequential):
    """Frozen layers between trainable ones: a "same"-padded convolution and in-place
    activations (ELU, ReLU6) whose inputs the pull-backs must not see overwritten."""

    def __init__(self):
        frozen = nn.Conv2d(3, 3, 3, padding="same")
        frozen.requires_grad_(False)
        super().__init__(
            nn.Conv2d(1, 3, 5, stride=2), nn.ELU(inplace=True), frozen, nn.ReLU6(inplace=True),
            nn.AvgPool2d(3), nn.Flatten(), nn.Linear(48, 10),
        )  # fmt: skip


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "tiny_cnn":
        m = TinyCNN()
    elif name == "residual":
        m = Residual()
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    elif name == "bn_blocks":
        m = randomise_batch_norms(BatchNormBlocks())
    elif name == "frozen_same_inplace":
        m = FrozenSameInplace()
    elif name == "kitchen_sink":
        m = randomise_batch_norms(KitchenSink())
    elif name in ("resnet8_cifar", "vit_cifar"):
        kind = name.removesuffix("_cifar")
        m = randomise_batch_norms(build_model(kind, seed=seed, in_channels=3, image_size=32))
    else:
        m = build_model(name, seed=seed)
    return m.double()


def inputs(n: int, seed: int = 1, shape: tuple[int, ...] = (1, 28, 28)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=torch.float64)
