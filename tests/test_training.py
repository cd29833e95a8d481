import dataclasses
import math

import pytest
import torch
from torch import nn

from ntkviz.accounting import Watch
from ntkviz.errors import DeviceError, TrainingDiverged
from ntkviz.models import MODELS, build_model, count_parameters
from ntkviz.training import TrainConfig, make_optimizer, resolve_device, train

SMALL = TrainConfig(train_size=512, epochs=1, batch_size=64, eval_every=4, eval_size=500)


def test_lenet_has_the_papers_size():
    assert count_parameters(build_model("lenet")) == 29624
    assert set(MODELS) >= {"lenet", "mlp"}


def test_records_are_yielded_per_batch_with_periodic_accuracy(mnist):
    model = build_model("lenet")
    records = list(train(model, mnist, SMALL))
    assert [r.step for r in records] == list(range(1, 9))
    assert all(r.total_steps == 8 for r in records)
    assert [r.test_accuracy is not None for r in records] == [False, False, False, True] * 2
    assert records[-1].lr < records[0].lr  # cosine schedule
    assert records[-1].loss < records[0].loss


def test_a_float64_model_trains_on_the_float32_images(mnist):
    # it passed every check and then failed at the first step: "Input type (float) and bias
    # type (double) should be the same"
    import copy

    model = build_model("lenet").double()
    start = copy.deepcopy(model)
    watch = Watch(mnist.test.x[:2], (int(mnist.test.y[0]), int(mnist.test.y[1])))
    records = list(train(model, mnist, SMALL, watch=watch))
    assert len(records) == 8 and all(p.dtype == torch.float64 for p in model.parameters())
    first = torch.from_numpy(records[0].batch_indices.copy())
    x, y = mnist.train.x[first].double(), mnist.train.y[first]
    assert records[0].loss == torch.nn.functional.cross_entropy(start.train()(x), y).item()
    assert records[0].account.class_actual.shape == (2,) and 0 <= records[-1].test_accuracy <= 1


class IndexedFirst(nn.Module):
    """A frozen int64 Parameter (an index table) before the float layers."""

    def __init__(self):
        super().__init__()
        self.order = nn.Parameter(torch.arange(784), requires_grad=False)
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)[:, self.order])


def test_the_inputs_take_the_dtype_of_the_first_floating_point_parameter(mnist):
    from ntkviz.training import accuracy

    model = IndexedFirst()
    records = list(train(model, mnist, SMALL))
    assert len(records) == 8 and math.isfinite(records[-1].loss)
    assert 0 <= accuracy(model, mnist.test.x[:100], mnist.test.y[:100]) <= 1


def test_training_is_deterministic_on_cpu(mnist):
    runs = []
    for _ in range(2):
        model = build_model("lenet", seed=3)
        runs.append(
            ([r.loss for r in train(model, mnist, SMALL)], [p.clone() for p in model.parameters()])
        )
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def state(model) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


@pytest.mark.parametrize("watched", [False, True])
def test_divergence_puts_the_model_back_as_the_last_record_left_it(mnist, watched):
    """A non-finite loss at step k (no update taken): the model stays as step k − 1 left it."""
    model = build_model("mlp")
    config = TrainConfig(train_size=2000, epochs=1, lr=30.0, momentum=0.9, weight_decay=0.0)
    watch = Watch(mnist.test.x[:2], (7, 2)) if watched else None
    seen, states = [], [state(model)]
    with pytest.raises(TrainingDiverged) as info:
        for record in train(model, mnist, config, watch=watch):
            seen.append(record)
            states.append(state(model))
    assert len(seen) >= 2 and info.value.step == len(seen) + 1
    assert not math.isfinite(info.value.loss) and "learning rate" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(state(model), states[-1]))
    assert all(math.isfinite(r.loss) for r in seen)


class RaisesOnThirdForward(nn.Module):
    """Batch norm, then an error (as an out-of-memory) in the third training forward: after the
    running statistics moved."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16))
        self.head, self.calls = nn.Linear(16, 10), 0

    def forward(self, x):
        h = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("out of memory (simulated)")
        return self.head(h)


@pytest.mark.parametrize("watched", [False, True])
def test_an_error_mid_step_leaves_the_model_as_the_last_record_left_it(mnist, watched):
    model = RaisesOnThirdForward()
    config = TrainConfig(train_size=640, epochs=1, lr=0.05)
    watch = Watch(mnist.test.x[:2], (7, 2)) if watched else None
    states = [state(model)]
    with pytest.raises(RuntimeError, match="out of memory"):
        for _ in train(model, mnist, config, watch=watch):
            states.append(state(model))
    assert len(states) == 3  # two records
    assert all(torch.equal(a, b) for a, b in zip(state(model), states[-1]))  # buffers too


def test_adams_first_step_that_overflows_is_refused_at_once(mnist):
    with pytest.raises(ValueError, match=r"Adam's first step: η/\(1 − β₁\) = 4e\+38"):
        train(build_model("mlp"), mnist, TrainConfig(optimizer="adam", lr=4e37))


def test_an_update_that_overflows_is_undone_and_the_optimizer_state_cleared(mnist):
    """A finite loss whose update makes parameters infinite: the model goes back to before that
    step, and the optimizer forgets the diverged momentum."""
    loud = dataclasses.replace(mnist, train=dataclasses.replace(mnist.train, x=mnist.train.x * 1e3))
    model = build_model("mlp")
    before = state(model)
    config = TrainConfig(train_size=2000, epochs=1, lr=1e37, momentum=0.9, weight_decay=0.0)
    optimizer = make_optimizer(model, config)
    with pytest.raises(TrainingDiverged) as info:
        next(train(model, loud, config, optimizer))
    assert info.value.step == 1 and math.isfinite(info.value.loss)
    assert all(torch.equal(a, b) for a, b in zip(state(model), before))
    assert not optimizer.state


def test_invalid_config_and_device_give_clear_errors():
    with pytest.raises(ValueError, match="learning rate"):
        TrainConfig(lr=float("nan")).validate()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0).validate()
    for seed in (2**64, -1, 1.5):
        with pytest.raises(ValueError, match="seed must be an int in"):
            TrainConfig(seed=seed).validate()
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve_device("tpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_defaults_reach_95_percent_quickly(mnist):
    """The interactive default: ≥ 95 % test accuracy (one epoch on all 60k is enough)."""
    from dataclasses import replace

    from ntkviz.training import accuracy

    model = build_model("lenet")
    for _ in train(model, mnist, replace(TrainConfig(), epochs=1)):
        pass
    assert accuracy(model, mnist.test.x, mnist.test.y) >= 0.95


def test_run_health_flags_a_run_that_ends_far_worse_than_it_started():
    from ntkviz.training import run_health

    learning = run_health([2.3, 2.2, 2.0, 1.5, 1.0, 0.6, 0.4, 0.3], accuracy=0.91)
    assert learning.ok and learning.warning == ""
    assert learning.initial_loss == pytest.approx(2.25) and learning.final_loss == 0.35
    exploding = run_health([2.3, 3.8, 24, 152, 92, 121, 162, 203, 257, 151], 0.156)
    assert not exploding.ok and exploding.loss_rose and not exploding.at_chance
    assert "the loss rose from 3.05 to 204" in exploding.warning
    stuck = run_health([2.30] * 100, accuracy=0.1135)
    assert stuck.at_chance and not stuck.loss_rose
    assert "test accuracy 11.3% is at chance level (10%)" in stuck.warning
    assert run_health([2.3] * 100, accuracy=0.30, num_classes=4).at_chance
    assert run_health([5.0], accuracy=None).ok  # one step: nothing to compare
    assert run_health([2.31, 2.312], accuracy=0.1).ok  # two steps: too short to judge
    # the windows: the first and last 20 steps (a quarter of a short run)
    assert run_health([9.0] * 20 + [1.0] * 60 + [2.0] * 20).final_loss == 2.0
    with pytest.raises(ValueError, match="at least one step"):
        run_health([])


def test_batch_norm1d_with_a_batch_of_one_is_refused_before_training(mnist):
    from torch import nn

    bn1d = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    for size, batch, why in ((65, 64, "the last batch of every epoch"), (8, 1, "every batch")):
        with pytest.raises(ValueError, match=f"BatchNorm1d cannot train .* {why} holds one"):
            train(bn1d, mnist, TrainConfig(train_size=size, batch_size=batch))  # at once
    # BatchNorm2d also normalises over the image's positions: a batch of one trains
    resnet = build_model("resnet8", 10, 0, in_channels=1, image_size=28)
    records = list(
        train(resnet, mnist, TrainConfig(model="resnet8", train_size=3, batch_size=2, epochs=1))
    )
    assert len(records) == 2
