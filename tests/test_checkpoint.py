from pathlib import Path

import pytest
import torch

from ntkviz.checkpoint import load_checkpoint, load_weights_into, save_checkpoint
from ntkviz.errors import CheckpointError
from ntkviz.models import build_model
from ntkviz.training import TrainConfig


def test_round_trip_is_bit_exact(tmp_path):
    model = build_model("lenet", seed=5)
    path = save_checkpoint(tmp_path / "m.pt", model, "lenet", TrainConfig(seed=5), {"step": 42})
    ckpt = load_checkpoint(path)
    assert ckpt.model_name == "lenet" and ckpt.config.seed == 5 and ckpt.metadata["step"] == 42
    for (k, a), (_, b) in zip(model.state_dict().items(), ckpt.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob("*.part"))


def test_corrupt_file_gives_a_clear_error_and_leaves_the_model_untouched(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    model = build_model("lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="not a readable"):
        load_weights_into(model, bad)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "mlp.pt", build_model("mlp"), "mlp", TrainConfig())
    model = build_model("lenet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="another architecture"):
        load_weights_into(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_file_with_code_is_not_executed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": "ntkviz-checkpoint", "x": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_newer_format_version_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("mlp"), "mlp", TrainConfig())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="version 99"):
        load_checkpoint(path)


def test_unwritable_path_raises_and_leaves_nothing(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "dir" / "m.pt", build_model("mlp"), "mlp", TrainConfig())


def _set(key, value):
    def mutate(payload):
        payload[key] = value

    return mutate


def _set_config(key, value):
    def mutate(payload):
        payload["config"][key] = value

    return mutate


def _set_weight(fn):
    def mutate(payload):
        state = payload["state_dict"]
        state["fc3.bias"] = fn(state["fc3.bias"])

    return mutate


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_set("config", "lr=0.1"), "config must be a dict"),
        (_set("metadata", [1, 2]), "metadata must be a dict"),
        (_set("metadata", {"when": torch.float32}), r"metadata\['when'\] holds a dtype"),
        (_set("metadata", {1: "a"}), "not a string"),
        (_set("metadata", {"step": None}), r"metadata\['step'\] \(the training step\) must be"),
        (_set("metadata", {"step": "abc"}), r"must be an int ≥ 0, got 'abc'"),
        (_set("metadata", {"step": -5}), r"must be an int ≥ 0, got -5"),
        (_set_config("lr", None), "config lr must be a number, got None"),
        (_set_config("lr", "0.1"), "config lr must be a number"),
        (_set_config("lr", -1.0), "learning rate must be a positive"),
        (_set_config("epochs", 2.5), "config epochs must be an int"),
        (_set_config("batch_size", True), "config batch_size must be an int"),
        (_set_config("momentum", 1.5), "momentum"),
        (_set_config("train_size", "all"), "config train_size must be an int or None"),
        (_set("version", "1"), "version '1' is not a positive integer"),
        (_set("version", 0), "version 0 is not a positive integer"),
        (_set("num_classes", "10"), "num_classes must be an int"),
        (_set("num_classes", 5), r"has shape \(10, 42\); the model needs \(5, 42\)"),
        (_set("model", ["lenet"]), "unknown model"),
        (_set("state_dict", "weights"), "state_dict must be a dict of tensors"),
        (_set("state_dict", {}), "does not fit the model"),
        (_set_weight(lambda b: b.long()), "must be floating-point"),
        (_set_weight(lambda b: b.fill_(float("nan"))), "non-finite"),
        (_set_weight(lambda b: b[:5]), r"has shape \(5,\)"),
        (_set_weight(lambda b: b.tolist()), "must be a tensor"),
    ],
)
def test_every_field_is_validated_and_the_model_is_kept(tmp_path, mutate, match):
    path = save_checkpoint(tmp_path / "m.pt", build_model("lenet", seed=1), "lenet", TrainConfig())
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)
    model = build_model("lenet", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as info:
        load_weights_into(model, path)
    assert str(path) in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_file_with_foreign_objects_gets_no_advice_to_disable_weights_only(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('ran')",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "ntkviz-checkpoint", "x": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "objects other than tensors and plain values" in message
    assert "weights_only" not in message and "Unpickler" not in message
    path.write_bytes(pickle.dumps([1, 2]) + b"garbage")
    with pytest.raises(CheckpointError, match="not a readable ntkviz checkpoint") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)
    for junk in (bytes(range(7, 256)), b"PK" + bytes(range(7, 256))):  # no torch.save file
        path.write_bytes(junk)  # at all, even starting like a zip archive: damaged, not dangerous
        with pytest.raises(CheckpointError, match="damaged or another kind of file") as info:
            load_checkpoint(path)
        assert "objects other than" not in str(info.value)


def test_unsavable_metadata_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="metadata"):
        save_checkpoint(
            tmp_path / "m.pt", build_model("mlp"), "mlp", TrainConfig(), {"x": object()}
        )
    assert not list(tmp_path.iterdir())


def test_a_resnet20_for_cifar_shapes_round_trips(tmp_path):
    model = build_model("resnet20", 10, seed=3, in_channels=3, image_size=32)
    path = save_checkpoint(tmp_path / "r.pt", model, "resnet20", TrainConfig(model="resnet20"),
                           input_shape=(3, 32, 32))  # fmt: skip
    assert torch.load(path, weights_only=True)["input_shape"] == [3, 32, 32]
    ckpt = load_checkpoint(path)
    assert ckpt.input_shape == (3, 32, 32) and ckpt.model_name == "resnet20"
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(ckpt.model(x), model(x), rtol=0, atol=0)
    # recognised without input_shape; an MLP's first layer gives its shape away
    mlp = build_model("mlp", 7, in_channels=3, image_size=32)
    path = save_checkpoint(tmp_path / "m.pt", mlp, "mlp", TrainConfig())
    assert load_checkpoint(path).input_shape == (3, 32, 32)
    assert load_checkpoint(path).model.fc1.in_features == 3 * 32 * 32


def test_files_without_an_input_shape_are_mnist_models(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("lenet"), "lenet", TrainConfig())
    payload = torch.load(path, weights_only=True)
    del payload["input_shape"], payload["custom"]
    torch.save(payload, path)
    assert load_checkpoint(path).input_shape == (1, 28, 28)


@pytest.mark.parametrize("bad", [[3, 32], [0, 32, 32], [3, 32.0, 32], [True, 2, 2], "3x32x32"])
def test_a_bad_input_shape_is_refused(tmp_path, bad):
    path = save_checkpoint(tmp_path / "m.pt", build_model("lenet"), "lenet", TrainConfig())
    payload = torch.load(path, weights_only=True)
    payload["input_shape"] = bad
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"input_shape must be three positive ints"):
        load_checkpoint(path)


def test_a_checkpoint_for_other_channels_does_not_fit(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", build_model("lenet"), "lenet", TrainConfig())
    payload = torch.load(path, weights_only=True)
    payload["input_shape"] = [3, 28, 28]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"conv1.weight.*has shape \(6, 1, 5, 5\)"):
        load_checkpoint(path)


def test_your_own_models_checkpoint_is_weights_for_that_model(tmp_path):
    from ntkviz.modelspec import load_model_spec, read_state_dict

    spec = f"{Path(__file__).parent / 'user_models.py'}:small_cnn"
    model = load_model_spec(spec)
    with torch.no_grad():
        model[0].weight.mul_(2)
    with pytest.raises(ValueError, match="custom=True"):
        save_checkpoint(tmp_path / "c.pt", model, spec, TrainConfig())
    path = save_checkpoint(tmp_path / "c.pt", model, spec, TrainConfig(), custom=True)
    payload = torch.load(path, weights_only=True)
    assert payload["custom"] is True and "input_shape" not in payload
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert f"holds the weights of your own model {spec!r}" in message
    assert f"--model {spec} --weights {path}" in message and "File > Open model" in message
    fresh = load_model_spec(spec, weights=path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert read_state_dict(path).keys() == model.state_dict().keys()
    payload["custom"] = "yes"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="custom must be true or false"):
        load_checkpoint(path)
