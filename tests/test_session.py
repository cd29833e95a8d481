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
    with pytest.raises(SessionError, match="does not fit the model"):
        load_session(path)
    torch.save({"format": "something else"}, path)
    with pytest.raises(SessionError, match="not an ntkviz session"):
        load_session(path)


def _mutation(key, value=None, fn=None):
    def mutate(payload):
        payload[key] = fn(payload[key]) if fn else value

    return mutate


def _history_state(payload):
    state = dict(payload["state_dict"])
    state.pop("fc3.bias")
    payload["history"] = [{"lr": 0.1, "state_before": state}]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (_mutation("version", "1"), "version '1' is not a positive integer"),
        (_mutation("config", "lr=0.1"), "config must be a dict"),
        (_mutation("config", fn=lambda c: {**c, "lr": None}), "config lr must be a number"),
        (_mutation("step", "17"), "step must be an int ≥ 0"),
        (_mutation("step", -1), "step must be"),
        (_mutation("ntkviz_version", 1.0), "ntkviz_version must be a string"),
        (_mutation("curves", ["loss"]), "curves must be a dict"),
        (_mutation("curves", {"loss": "2.3"}), "curves"),
        (_mutation("curves", {"loss": [2.3, None]}), r"curves\['loss'\]\[1\]"),
        (_mutation("selection", [1]), "selection must be a dict"),
        (_mutation("selection", fn=lambda s: {**s, "lr": None}), "selection lr"),
        (_mutation("selection", fn=lambda s: {**s, "y_u": 10}), "selection y_u"),
        (_mutation("selection", fn=lambda s: {**s, "split_u": "val"}), "selection split_u"),
        (_mutation("selection", fn=lambda s: {**s, "x": torch.zeros(2)}), "holds a Tensor"),
        (_mutation("history", {"lr": 0.1}), "history must be a list"),
        (_mutation("history", ["step"]), "history entry 0 must be a dict"),
        (_mutation("history", [{"lr": "fast"}]), "history entry 0 lr"),
        (_mutation("history", fn=lambda h: h), None),  # unchanged: loads
        (_history_state, "history entry 0 state_before does not fit"),
        (_mutation("kernel_maps", [(0, torch.zeros(3))]), r"kernel map 0 must be a \(10, 10\)"),
        (_mutation("kernel_maps", [("start", torch.eye(10))]), "kernel map 0 step"),
        (_mutation("kernel_maps", [(0, torch.full((10, 10), float("nan")))]), "non-finite"),
        (_mutation("kernel_maps", [(0, torch.eye(10), 1)]), "kernel map 0 must be a"),
        (_mutation("optimizer", {"state": {}}), "optimizer must be a dict of state and"),
        (_mutation("optimizer", {"state": {"w": {}}, "param_groups": []}), "keyed by parameter"),
        (_mutation("optimizer", {"state": {}, "param_groups": [{"lr": 1}]}), "dicts with params"),
        (_mutation("optimizer", {"state": {"0": {"b": {3: 4}}}, "param_groups": []}), "not a str"),
    ],
)
def test_every_field_is_validated(tmp_path, mutate, match):
    path = save_session(tmp_path / "s.ntkviz", make_session())
    payload = torch.load(path, weights_only=True)
    mutate(payload)
    torch.save(payload, path)
    if match is None:
        assert load_session(path).step == 17
        return
    with pytest.raises(SessionError, match=match) as info:
        load_session(path)
    assert str(path) in str(info.value)


def test_the_runs_optimizer_round_trips(tmp_path):
    model = build_model("lenet", seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1, 28, 28)).sum().backward()
    opt.step()
    s = make_session()
    s.state_dict, s.optimizer = model.state_dict(), opt.state_dict()
    t = load_session(save_session(tmp_path / "s.ntkviz", s))
    again = torch.optim.Adam(build_model("lenet", seed=2).parameters(), lr=0.5)
    again.load_state_dict(t.optimizer)
    assert again.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for k, state in opt.state_dict()["state"].items():
        assert all(torch.equal(v, again.state_dict()["state"][k][n]) for n, v in state.items())
    assert load_session(save_session(tmp_path / "none.ntkviz", make_session())).optimizer is None


def test_history_with_the_models_weights_round_trips(tmp_path):
    s = make_session()
    s.history = [{"lr": 0.5, "state_before": {k: v + 1 for k, v in s.state_dict.items()}}]
    t = load_session(save_session(tmp_path / "s.ntkviz", s))
    assert torch.equal(t.history[0]["state_before"]["fc3.bias"], s.state_dict["fc3.bias"] + 1)


def test_a_cifar_resnet_session_round_trips(tmp_path):
    model = build_model("resnet20", 10, seed=1, in_channels=3, image_size=32)
    s = Session("resnet20", model.state_dict(), TrainConfig(model="resnet20"),
                input_shape=(3, 32, 32))  # fmt: skip
    t = load_session(save_session(tmp_path / "s.ntkviz", s))
    assert t.input_shape == (3, 32, 32) and not t.custom
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(t.build_model().eval()(x), model(x), rtol=0, atol=0)


def test_your_models_session_keeps_its_number_of_classes(tmp_path):
    from user_models import HeadFirst, no_bias

    for model in (no_bias(), HeadFirst()):  # no bias vector; the last one is not the output's
        maps = [(5, np.ones((10, 10)))]
        s = Session("m.py:f", model.state_dict(), TrainConfig(), custom=True, num_classes=10,
                    kernel_maps=maps, selection={"y_u": 9})  # fmt: skip
        t = load_session(save_session(tmp_path / "s.ntkviz", s), model=model)
        assert t.classes == 10 and t.kernel_maps[0][1].shape == (10, 10)


def test_a_session_of_your_own_model_needs_that_model(tmp_path):
    from pathlib import Path

    from ntkviz.modelspec import load_model_spec

    spec = f"{Path(__file__).parent / 'user_models.py'}:small_cnn"
    model = load_model_spec(spec)
    s = Session(spec, model.state_dict(), TrainConfig(), step=3, custom=True,
                history=[{"lr": 0.1, "state_before": model.state_dict()}])  # fmt: skip
    path = save_session(tmp_path / "s.ntkviz", s)
    with pytest.raises(SessionError, match=r"your own model .*open that model first \(File > Open"):
        load_session(path)
    with pytest.raises(SessionError, match="open that model first"):
        s.build_model()
    t = load_session(path, model=load_model_spec(spec))
    assert t.custom and t.model_name == spec and t.step == 3
    rebuilt = t.build_model(load_model_spec(spec))
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k
    with pytest.raises(SessionError, match="does not fit the model"):
        load_session(path, model=build_model("lenet"))
    wrong_kind = load_model_spec(spec)
    wrong_kind[1].num_batches_tracked = torch.zeros(())  # a float where an int was
    with pytest.raises(SessionError, match=r"num_batches_tracked.. must be floating-point"):
        load_session(path, model=wrong_kind)
