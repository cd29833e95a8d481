import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode


@pytest.fixture(scope="session")
def mnist(tmp_path_factory):
    """The shipped MNIST, decompressed once into a temporary cache for the whole run."""
    from ntkviz.data import load_dataset

    return load_dataset("mnist", root=tmp_path_factory.mktemp("data"))


def explicit_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J = ∂z/∂θ (V, P) of one example by torch.autograd.functional.jacobian, independent of
    ntkviz: trainable parameters only, in eval mode."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters()}
    was = model.training
    model.eval()

    def f(*ps):
        return functional_call(model, {**fixed, **dict(zip(names, ps))}, (x[None],))[0]

    jac = torch.autograd.functional.jacobian(f, tuple(fixed[n] for n in names))
    model.train(was)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1)


def snapshot(model: nn.Module) -> dict:
    """Bit-exact copy of parameters, buffers and every module's training flag."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "flags": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert [m.training for m in model.modules()] == snap["flags"]
    assert [p.requires_grad for p in model.parameters()] == snap["requires_grad"]


class TorchCalls(TorchFunctionMode):
    """Records every torch function and tensor method called on the thread that enters it
    (torch function modes are thread-local)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__qualname__", repr(func)))
        return func(*args, **(kwargs or {}))
