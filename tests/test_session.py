import numpy as np
import pytest
import torch

from ntkviz.models import build_model
from ntkviz.session import Session, SessionError, load_session, save_session
from ntkviz.training import TrainConfig


def make_session():
    model = build_model("lenet", seed=2)
    return Session(
        model_name="lenet",
        state_dict=model.state_dict(),
        config=TrainConfig(seed=2, lr=0.01),
        step=17,
        curves={"step": [1, 2, 3], "loss": [2.3, 2.1, 1.9]},
        selection={"x_u": ["train", 5], "x_o": ["test", 9], "y_u": 4, "lr": 0.1, "loss": "neg"},
        history=[{"lr": 0.1, "loss": "neg", "probs_o": [0.1] * 10}],
        kernel_maps=[(0, np.arange(100.0).reshape(10, 10)), (17, np.eye(10))],
    )


def test_round_trip_keeps_everything(tmp_path):
    s = make_session()
    save_session(tmp_path / "s.ntkviz", s)
    t = load_session(tmp_path / "s.ntkviz")
    assert t.model_name == "lenet" and t.step == 17 and t.config == s.config
    assert t.curves == s.curves and t.selection == s.selection and t.history == s.history
    assert [k for k, _ in t.kernel_maps] == [0, 17]
    np.testing.assert_array_equal(t.kernel_maps[0][1], s.kernel_maps[0][1])
    for k, v in s.state_dict.items():
        assert torch.equal(t.state_dict[k], v)
    model = t.build_model()
    assert torch.equal(model.fc3.bias, s.state_dict["fc3.bias"])


def test_corrupt_newer_and_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "bad.ntkviz"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(SessionError, match="not a readable"):
        load_session(bad)
    path = save_session(tmp_path / "s.ntkviz", make_session())
    payload = torch.load(path, weights_only=True)
    payload["version"] = 2
    torch.save(payload, path)
    with pytest.raises(SessionError, match="version 2"):
        load_session(path)
    payload["version"] = 1
    payload["state_dict"] = build_model("mlp").state_dict()
    torch.save(payload, path)
    with pytest.raises(SessionError, match="damaged"):
        load_session(path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(SessionError, match="not an ntkviz session"):
        load_session(path)
