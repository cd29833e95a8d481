"""The model registry: every model for MNIST and CIFAR shapes, seeds, bad arguments, checkpoints."""

import pytest
import torch

from ntkviz.checkpoint import load_checkpoint, save_checkpoint
from ntkviz.kernel import kernel_path
from ntkviz.models import MODELS, build_model, count_parameters
from ntkviz.training import TrainConfig, train

#: trainable parameters for (1×28×28, V = 10) and (3×32×32, V = 10)
COUNTS = {
    "lenet": (29_624, 40_484),
    "mlp": (269_322, 855_050),
    "resnet8": (77_754, 78_042),
    "resnet20": (272_186, 272_474),
    "vit": (71_946, 81_098),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_builds_for_mnist_and_cifar_shapes(name):
    assert set(MODELS) == set(COUNTS)
    for (channels, size), count in zip(((1, 28), (3, 32)), COUNTS[name]):
        model = build_model(name, 10, seed=0, in_channels=channels, image_size=size).eval()
        assert count_parameters(model) == count
        wide = build_model(name, 100, seed=0, in_channels=channels, image_size=size).eval()
        assert wide(torch.randn(2, channels, size, size)).shape == (2, 100)
    expected = "generic" if name == "vit" else "structured"
    assert kernel_path(build_model(name), torch.zeros(1, 1, 28, 28)).path == expected


def test_old_calls_keep_working_and_seeds_are_reproducible():
    state = torch.random.get_rng_state()
    a, b = build_model("resnet8", 10, 3), build_model("resnet8", num_classes=10, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is untouched
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)
    c = build_model("resnet8", seed=4)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    assert build_model("mlp", 5, None).fc3.out_features == 5
    assert count_parameters(build_model("lenet")) == 29_624


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("alexnet",), {}, "unknown model 'alexnet'; choose one of lenet, mlp, resnet8"),
        (("lenet",), {"image_size": 8}, "LeNet needs images of at least 12×12 pixels"),
        (("resnet8",), {"in_channels": 0}, "in_channels must be a positive int"),
        (("vit", 0), {}, "num_classes must be a positive int"),
        (("mlp",), {"image_size": 2.5}, "image_size must be a positive int"),
    ],
)
def test_bad_arguments_say_what_was_expected(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(*args, **kwargs)
    from ntkviz.models import ResNet

    with pytest.raises(ValueError, match="6n \\+ 2"):
        ResNet(depth=9)


@pytest.mark.parametrize("name", ["resnet8", "vit"])
def test_new_models_train_and_round_trip_through_checkpoints(name, mnist, tmp_path):
    model = build_model(name, seed=1)
    config = TrainConfig(model=name, train_size=128, epochs=1, batch_size=64, eval_size=64)
    records = list(train(model, mnist, config))
    assert len(records) == 2 and all(r.loss > 0 for r in records)
    if name == "resnet8":  # batch norm trained in train mode: running statistics moved
        assert model.stem.bn.num_batches_tracked == 2
    path = save_checkpoint(tmp_path / "m.pt", model, name, config, {"step": 2})
    loaded = load_checkpoint(path)
    assert loaded.model_name == name and loaded.num_classes == 10
    for (k, x), y in zip(model.state_dict().items(), loaded.model.state_dict().values()):
        assert torch.equal(x, y), k
