"""A user's model: load_model_spec (factory string + weights), check_model, and the CLI's --model."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_unchanged, snapshot
from torch import nn

from ntkviz.checkpoint import save_checkpoint
from ntkviz.cli import main
from ntkviz.decomposition import decompose
from ntkviz.errors import ModelError
from ntkviz.models import LeNet, build_model
from ntkviz.modelspec import check_model, load_model_spec
from ntkviz.training import TrainConfig

USER = Path(__file__).resolve().parent / "user_models.py"
SPEC = f"{USER}:small_cnn"


def test_factories_load_by_path_by_module_and_by_dotted_name():
    model = load_model_spec(SPEC)
    assert isinstance(model, nn.Sequential) and len(model) == 7
    assert isinstance(load_model_spec("ntkviz.models:LeNet"), LeNet)
    assert type(load_model_spec(f"{USER}:Wrapped.build")).__name__ == "Wrapped"


def test_weights_load_from_a_state_dict_file_and_from_a_checkpoint(tmp_path):
    trained = load_model_spec(SPEC)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    trained[1].running_mean.fill_(0.25)
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    loaded = load_model_spec(SPEC, tmp_path / "w.pt")
    for (k, a), b in zip(loaded.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), k
    lenet = build_model("lenet", seed=3)
    save_checkpoint(tmp_path / "c.pt", lenet, "lenet", TrainConfig())
    from_checkpoint = load_model_spec("ntkviz.models:LeNet", tmp_path / "c.pt")
    for a, b in zip(from_checkpoint.state_dict().values(), lenet.state_dict().values()):
        assert torch.equal(a, b)


class Payload:
    """Unpickling this would create a file: a weights file must never run code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_weights_file_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"fc.weight": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="not a readable weights file") as info:
        load_model_spec(SPEC, tmp_path / "evil.pt")
    assert not marker.exists()
    assert "holds objects other than tensors and plain values" in str(info.value)
    assert "weights_only=False" not in str(info.value)
    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 256)))
    # random bytes behind a pickle's first byte are damaged, not objects that could run code
    (tmp_path / "noise2.pt").write_bytes(b"\x80\x02" + bytes(range(7, 256)))
    for noise in ("noise.pt", "noise2.pt"):
        with pytest.raises(ModelError, match=r"not a torch\.save file") as info:
            load_model_spec(SPEC, tmp_path / noise)
        assert "could run code" not in str(info.value) and "weights_only" not in str(info.value)


def _files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "broken.py").write_text("def build(:\n    pass\n")
    (tmp_path / "imports.py").write_text("import no_such_module_for_ntkviz\n")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save(build_model("lenet").state_dict(), tmp_path / "lenet.pt")
    state = load_model_spec(SPEC).state_dict()
    state["6.weight"] = torch.zeros(10, 100)
    torch.save(state, tmp_path / "shape.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "shape.pt").read_bytes()[:300])
    nan = load_model_spec(SPEC).state_dict()
    nan["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    (tmp_path / "models").mkdir()
    return {"tmp": tmp_path}


@pytest.mark.parametrize(
    ("spec", "weights", "message"),
    [
        ("user_models.py", None, "given as PATH_OR_MODULE:FACTORY"),
        (":small_cnn", None, "names no file or module"),
        (f"{USER}:1st", None, "the factory '1st' is not a Python name"),
        ("TMP/missing.py:build", None, "missing.py does not exist"),
        ("TMP/broken.py:build", None, "broken.py failed: SyntaxError"),
        ("TMP/imports.py:build", None, "ModuleNotFoundError: No module named"),
        ("no_such_module_for_ntkviz:build", None, "cannot import the module"),
        (f"{USER}:nope", None, "has no attribute 'nope'"),
        (f"{USER}:NOT_CALLABLE", None, "NOT_CALLABLE is a int, not callable"),
        (f"{USER}:raises", None, "the factory raised RuntimeError: no GPU here"),
        (f"{USER}:not_a_module", None, "returned a dict, not a torch.nn.Module"),
        (SPEC, "TMP/none.pt", "none.pt does not exist"),
        (SPEC, "TMP/tensor.pt", "holds no state dict"),
        (SPEC, "TMP/lenet.pt", "do not fit the model 'USER:small_cnn': missing: 0.weight"),
        (SPEC, "TMP/lenet.pt", "unexpected: conv1.weight, conv1.bias, conv2.weight"),
        (SPEC, "TMP/shape.pt", "shapes: 6.weight (10, 100) for (10, 196)"),
        (
            SPEC,
            "TMP/cut.pt",
            "cut.pt is not a readable weights file (a state dict saved with "
            "torch.save or an ntkviz checkpoint): it is not a complete torch.save file",
        ),
        (SPEC, "TMP/nan.pt", "nan.pt: state_dict['0.weight'] holds non-finite values"),
        ("TMP/models:build", None, "models is a directory, not a .py file"),
    ],
)
def test_every_failure_is_one_clear_model_error(tmp_path, spec, weights, message):
    _files(tmp_path)

    def fill(text):
        return text.replace("TMP", str(tmp_path)).replace("USER", str(USER))

    with pytest.raises(ModelError) as info:
        load_model_spec(fill(spec), None if weights is None else fill(weights))
    assert fill(message) in str(info.value)
    assert ModelError.title == "Model not usable"


def test_a_model_file_may_import_its_neighbours(tmp_path):
    (tmp_path / "widths.py").write_text("WIDTH = 7\n")
    (tmp_path / "net.py").write_text(
        "from torch import nn\nfrom widths import WIDTH\n\n"
        "def build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, WIDTH))\n"
    )
    path = list(sys.path)
    assert load_model_spec(f"{tmp_path / 'net.py'}:build")[1].out_features == 7
    assert sys.path == path  # the file's directory was on the path only meanwhile


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


def _checked(kind: str) -> tuple[nn.Module, tuple, int]:
    if kind == "wrong channels":
        return build_model("lenet"), (3, 32, 32), 10
    if kind == "wrong classes":
        return load_model_spec(f"{USER}:five_classes"), (1, 28, 28), 10
    if kind == "not (N, V)":
        return (
            nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Unflatten(1, (10, 1))),
            (
                1,
                28,
                28,
            ),
            10,
        )
    if kind == "tuple":
        return Tuple(), (1, 28, 28), 10
    if kind == "non-finite":
        model = build_model("mlp")
        with torch.no_grad():
            model.fc3.bias[2] = float("nan")
        return model, (1, 28, 28), 10
    if kind == "frozen":
        return build_model("mlp").requires_grad_(False), (1, 28, 28), 10
    if kind == "meta":
        with torch.device("meta"):
            return nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 28, 28), 10
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "wrong channels",
            "fails on a batch of shape (2, 3, 32, 32), examples of shape (3, 32, 32): ",
        ),
        ("wrong classes", "returns 5 logits per example but the data has 10 classes"),
        ("not (N, V)", "returns shape (2, 10, 1) on a batch of shape (2, 1, 28, 28), examples"),
        ("tuple", "returns a tuple on a batch of shape (2, 1, 28, 28)"),
        (
            "non-finite",
            "returns non-finite logits (NaN or ±inf) on a batch of shape (2, 1, 28, 28)",
        ),
        ("frozen", "has no trainable parameters"),
        ("meta", "cannot be used on examples of shape (1, 28, 28): the model's parameters are on "
         "the meta device"),
    ],
)  # fmt: skip
def test_check_model_names_the_model_the_data_and_the_problem(kind, message):
    model, shape, classes = _checked(kind)
    with pytest.raises(ModelError) as info:
        check_model(model, torch.zeros(2, *shape), classes, name="my.py:build")
    assert message in str(info.value)
    assert str(info.value).startswith(f"model 'my.py:build' ({type(model).__name__}) ")
    if kind == "wrong channels":
        assert "to have 1 channels, but got 3 channels" in str(info.value)


def test_check_model_returns_v_and_leaves_the_model_alone():
    model = build_model("resnet8", 7, in_channels=3, image_size=32).train()
    snap = snapshot(model)
    assert check_model(model, torch.randn(2, 3, 32, 32)) == 7
    assert check_model(model, torch.randn(2, 3, 32, 32), 7) == 7
    assert_unchanged(model, snap)


def test_cli_decomposes_a_users_model_with_its_weights(mnist, tmp_path, capsys):
    model = load_model_spec(SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    args = ["decompose", "--model", SPEC, "--weights", str(tmp_path / "w.pt"), "--xu", "2"]
    args += ["--xo", "7", "--data-dir", str(mnist.root), "--out", str(tmp_path / "r.json")]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["meta"]["model"] == SPEC and record["meta"]["weights"] == str(tmp_path / "w.pt")
    dec = decompose(model, mnist.test.x[7], mnist.train.x[2], int(mnist.train.y[2]), 0.1)
    np.testing.assert_allclose(record["K"], dec.K, rtol=1e-6, atol=1e-6 * np.abs(dec.K).max())
    np.testing.assert_allclose(record["actual"], dec.actual, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--checkpoint", "c.pt", "--weights", "w.pt"], 2, "--weights goes with --model"),
        (["--model", "nowhere.py:build"], 1, "model 'nowhere.py:build': nowhere.py does not exist"),
        (["--model", f"{USER}:raises"], 1, "the factory raised RuntimeError"),
        (["--model", f"{USER}:five_classes"], 1, "5 logits per example but the data has 10"),
        (["--model", "ntkviz.models:ViT", "--weights", "missing.pt"], 1, "missing.pt does not"),
    ],
)
def test_cli_model_errors_have_exit_codes_and_messages(mnist, extra, code, message, capsys):
    args = ["decompose", *extra, "--xu", "0", "--xo", "0", "--data-dir", str(mnist.root)]
    assert main(args) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_takes_a_checkpoint_or_a_model_not_both(capsys):
    with pytest.raises(SystemExit) as info:
        main(["decompose", "--checkpoint", "c.pt", "--model", SPEC, "--xu", "0", "--xo", "0"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
