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
