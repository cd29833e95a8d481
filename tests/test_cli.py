"""The headless command line, run as a user would (a subprocess), with the shipped data."""

import csv
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

from ntkviz.checkpoint import load_checkpoint
from ntkviz.cli import main
from ntkviz.data import load_dataset
from ntkviz.decomposition import decompose, step_trajectory


def float32_tolerance(reference: np.ndarray) -> dict:
    """Tolerances for float32 results computed in another process: a few float32 ulps of the
    largest entry (a wrong figure is off by far more)."""
    return {"rtol": 1e-5, "atol": 4e-6 * float(np.abs(reference).max())}


def run(*args, env_cache):
    env = {"NTKVIZ_CACHE": str(env_cache), "PATH": "/usr/bin:/bin", "PYTHONWARNINGS": "ignore"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])  # this tree's ntkviz
    return subprocess.run(
        [sys.executable, "-m", "ntkviz", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "m.pt"
    r = run("train", "--out", str(out), "--train-size", "640", "--epochs", "1", env_cache=root)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and out.exists()
    return root, out


def test_train_writes_a_loadable_checkpoint_with_progress(trained):
    ckpt = load_checkpoint(trained[1])
    assert ckpt.model_name == "lenet" and ckpt.config.train_size == 640
    assert ckpt.metadata["step"] == 10


def test_decompose_writes_json_and_npz_equal_to_the_api(trained, mnist):
    root, ckpt_path = trained
    outs = [
        arg for suffix in (".json", ".npz", ".csv") for arg in ("--out", str(root / f"r{suffix}"))
    ]
    r = run("decompose", "--checkpoint", str(ckpt_path), "--xu", "2", "--xo", "7", "--lr", "0.3",
            "--loss", "neg", *outs, env_cache=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "relative residual" in r.stdout
    assert all(f"wrote {root / f'r{s}'}" in r.stdout for s in (".json", ".npz", ".csv"))
    model = load_checkpoint(ckpt_path).model
    dec = decompose(model, mnist.test.x[7], mnist.train.x[2], int(mnist.train.y[2]), 0.3, "neg")
    record = json.loads((root / "r.json").read_text())
    # The CLI runs in another process: float32 sums there may run in another order (kernel
    # choice depends on alignment), so the figures agree to float32 precision of their scale.
    np.testing.assert_allclose(record["K"], dec.K, **float32_tolerance(dec.K))
    np.testing.assert_allclose(record["actual"], dec.actual, **float32_tolerance(dec.actual))
    assert record["meta"]["x_u"] == {"split": "train", "index": 2, "label": int(mnist.train.y[2])}
    with np.load(root / "r.npz", allow_pickle=False) as npz:
        np.testing.assert_allclose(npz["A"], dec.A, atol=1e-7)
        np.testing.assert_allclose(
            npz["predicted"], dec.predicted, **float32_tolerance(dec.predicted)
        )
        assert json.loads(str(npz["meta_json"]))["loss"] == "neg"
    with open(root / "r.csv", newline="") as f:
        lines = f.read().splitlines()
    assert f"# x_u: {json.dumps(record['meta']['x_u'])}" in lines and '# loss: "neg"' in lines
    rows = list(csv.DictReader(ln for ln in lines if not ln.startswith("#")))
    assert len(rows) == 10
    row4 = rows[4]
    tol = float32_tolerance(dec.predicted)
    assert float(row4["predicted"]) == pytest.approx(
        dec.predicted[4], rel=tol["rtol"], abs=tol["atol"]
    )
    tol = float32_tolerance(dec.K)
    assert float(row4["K[i,9]"]) == pytest.approx(dec.K[4, 9], rel=tol["rtol"], abs=tol["atol"])


def test_export_writes_every_figure_without_a_display(trained, monkeypatch, capsys):
    from PySide6.QtGui import QImage

    root, ckpt_path = trained
    pair = ["--checkpoint", str(ckpt_path), "--xu", "2", "--xo", "7", "--lr", "0.3"]
    # as a user would: a subprocess with no DISPLAY
    r = run("export", *pair, "--width", "640", "--out", str(root / "d.png"),
            "--out", str(root / "d.svg"), "--out", str(root / "d.json"), env_cache=root)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert QImage(str(root / "d.png")).width() == 640
    assert ET.parse(root / "d.svg").getroot().tag.endswith("svg")
    assert json.loads((root / "d.json").read_text())["meta"]["x_o"]["index"] == 7
    monkeypatch.setenv("NTKVIZ_CACHE", str(root))
    for figure, extra in (("preview", []), ("trajectory", ["--steps", "3", "--log"])):
        out = root / f"{figure}.png"
        args = ["export", *pair, "--figure", figure, *extra, "--width", "500", "--out", str(out)]
        assert main(args) == 0
        image = QImage(str(out))
        assert image.width() == 500 and 100 < image.height() < 500
        assert len({image.pixel(x, y) for x in range(0, 500, 7) for y in range(0, 200, 7)}) > 5
    for steps in ("0", "1001"):
        args = ["export", *pair, "--figure", "trajectory", "--steps", steps, "--out", "t.png"]
        assert main(args) == 2
    # --steps and --log without the trajectory did nothing, silently
    capsys.readouterr()
    assert main(["export", *pair, "--log", "--out", str(root / "d2.json")]) == 0
    assert "apply to --figure trajectory only" in capsys.readouterr().err
    # the trajectory's numbers: π(x_o), π(x_u) at each step, equal to the API's
    outs = [a for s in ("json", "npz", "csv") for a in ("--out", str(root / f"t.{s}"))]
    assert main(["export", *pair, "--figure", "trajectory", "--steps", "3", *outs]) == 0
    model, data = load_checkpoint(ckpt_path).model, load_dataset("mnist")
    x_u = data.train.x[2]
    want = step_trajectory(model, data.test.x[7], x_u, int(data.train.y[2]), 0.3, 3)
    record = json.loads((root / "t.json").read_text())
    assert record["steps"] == 3 and record["lr"] == 0.3 and record["meta"]["x_o"]["index"] == 7
    np.testing.assert_allclose(record["probs_o"], want.probs_o, rtol=1e-9, atol=1e-12)
    with np.load(root / "t.npz") as saved:
        np.testing.assert_array_equal(saved["probs_o"], np.array(record["probs_o"]))
        np.testing.assert_array_equal(saved["probs_u"], np.array(record["probs_u"]))
    rows = [r for r in (root / "t.csv").read_text().splitlines() if r.startswith("probs_o,")]
    assert len(rows) == 4 * 10


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["decompose", "--checkpoint", "CKPT", "--xu", "0", "--xo", "0", "--yu", "10"], 2, "--yu"),
        (["decompose", "--checkpoint", "CKPT", "--xu", "70000", "--xo", "0"], 2, "outside"),
        (
            ["decompose", "--checkpoint", "CKPT", "--xu", "0", "--xo", "0", "--lr", "nan"],
            2,
            "finite",
        ),
        (
            ["decompose", "--checkpoint", "missing.pt", "--xu", "0", "--xo", "0"],
            1,
            "does not exist",
        ),
        (["train", "--out", "x.pt", "--lr", "-1"], 2, "--lr must be a positive finite number"),
        (["demo", "--lr", "nan"], 2, "argument --lr: must be a finite number > 0, got 'nan'"),
        (
            ["decompose", "--checkpoint", "CKPT", "--xu", "0", "--xo", "0", "--lr", "-1"],
            2,
            "argument --lr: must be a finite number > 0, got '-1'",
        ),
        (["train", "--out", "no/such/dir/x.pt"], 2, "does not exist"),
        (["decompose", "--bogus"], 2, "usage"),
        (["train", "--device", "tpu"], 2, "argument --device: must be auto, cpu, cuda, cuda:N"),
    ],
)
def test_errors_have_exit_codes_and_messages(trained, args, code, message, monkeypatch, capsys):
    root, ckpt_path = trained
    monkeypatch.setenv("NTKVIZ_CACHE", str(root))
    monkeypatch.chdir(root)
    args = [str(ckpt_path) if a == "CKPT" else a for a in args]
    try:
        rc = main(args)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    assert rc == code
    assert message in capsys.readouterr().err


def test_user_errors_print_no_traceback(trained):
    root, _ = trained
    r = run("decompose", "--checkpoint", "missing.pt", "--xu", "0", "--xo", "0", env_cache=root)
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_missing_cuda_is_a_failure_with_a_message(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["train", "--out", str(tmp_path / "m.pt"), "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def _forbid(monkeypatch, *names):
    """Make ntkviz.<module>.<function> fail the test if it is called."""
    for name in names:

        def fail(*args, _name=name, **kwargs):
            raise AssertionError(f"{_name} was called before the arguments were checked")

        monkeypatch.setattr(name, fail)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("FILE/m.pt", "is not a directory"),
        ("DIR", "is a directory"),
        ("/proc/self/m.pt", "cannot write /proc/self/m.pt"),
    ],
)
def test_train_checks_that_its_output_can_be_written_before_training(
    tmp_path, monkeypatch, capsys, out, message
):
    if out.startswith("/proc") and not os.path.isdir("/proc/self"):
        pytest.skip("no procfs: no directory that even root cannot write to")
    (tmp_path / "FILE").write_text("")
    (tmp_path / "DIR").mkdir()
    out = out.replace("FILE", str(tmp_path / "FILE")).replace("DIR", str(tmp_path / "DIR"))
    _forbid(monkeypatch, "ntkviz.data.load_dataset", "ntkviz.training.train")
    assert main(["train", "--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and "choose another --out" in err


def test_a_finished_run_is_kept_when_its_checkpoint_cannot_be_written(
    tmp_path, monkeypatch, capsys
):
    """A full disk at the end (torch.save raises RuntimeError in the target directory): the run
    goes to the cache instead, with exit code 1 and a message that says where."""
    target = tmp_path / "full"
    target.mkdir()
    save = torch.save

    def full_disk(obj, f):
        if Path(f).parent == target:
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return save(obj, f)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setenv("NTKVIZ_CACHE", str(tmp_path / "cache"))
    args = ["train", "--out", str(target / "m.pt"), "--train-size", "128", "--epochs", "1"]
    assert main([*args, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"cannot write {target / 'm.pt'}" in err and "Traceback" not in err
    saved = list((tmp_path / "cache" / "runs").glob("m-*.pt"))
    assert len(saved) == 1 and f"saved to {saved[0]}" in err
    ckpt = load_checkpoint(saved[0])
    assert ckpt.metadata["step"] == 2 and ckpt.config.train_size == 128
    assert not list(target.iterdir())


def test_non_finite_results_exit_1_and_write_nothing(trained, capsys, monkeypatch):
    root, ckpt_path = trained
    monkeypatch.setenv("NTKVIZ_CACHE", str(root))
    out = root / "nan.json"
    args = ["--checkpoint", str(ckpt_path), "--xu", "5", "--xo", "9", "--lr", "1e38"]
    assert main(["decompose", *args, "--out", str(out)]) == 1
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_that_ends_far_worse_than_it_started_is_reported(
    trained, tmp_path, capsys, monkeypatch
):
    root, _ = trained
    monkeypatch.setenv("NTKVIZ_CACHE", str(root))
    out = tmp_path / "m.pt"
    args = ["train", "--out", str(out), "--train-size", "640", "--epochs", "1", "--quiet"]
    assert main([*args, "--lr", "20"]) == 0
    err = capsys.readouterr().err
    assert "warning: the run ended far worse than it started: the loss rose from" in err
    assert out.exists()
    assert main([*args, "--lr", "2"]) == 0  # a run that learns: no warning
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--xu", "70000", "--xo", "0"], "--xu index 70000 is outside the train split (0..59999)"),
        (["--xu", "0", "--xo", "10000"], "--xo index 10000 is outside the test split (0..9999)"),
        (["--xu", "0", "--xo", "-1"], "--xo index -1 is outside"),
        (["--xu", "0", "--xo", "0", "--yu", "10"], "--yu must be a class in 0..9, got 10"),
    ],
)
def test_bad_indices_are_refused_before_anything_is_loaded(args, message, monkeypatch, capsys):
    _forbid(monkeypatch, "ntkviz.data.load_dataset", "ntkviz.checkpoint.load_checkpoint")
    assert main(["decompose", "--checkpoint", "missing.pt", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_outputs_in_the_repository_root_are_ignored_by_git():
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(*names):
        r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=root,
                           capture_output=True, text=True)  # fmt: skip
        return r.stdout.split()

    outputs = ["lenet.pt", "paper.pt", "result.json", "s.ntks", "fig.png", "fig.svg", "r.npz"]
    assert ignored(*outputs, "r.csv") == [*outputs, "r.csv"]
    assert ignored("docs/screenshots/main.png", "resources/mnist/x.json", "tests/m.pt") == []


# --------------------------------------------------------------------------- any data, any model

USER_MODELS = Path(__file__).parent / "user_models.py"


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """DIR/<class>/*.png: 3 classes of 8 RGB 8×8 images each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images") / "shapes"
    rng = np.random.default_rng(0)
    for c in ("red", "green", "blue"):
        (root / c).mkdir(parents=True)
        for k in range(8):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{k}.png")
    return root


def test_your_model_trains_on_an_image_folder_and_decomposes(image_folder, tmp_path, capsys):
    from ntkviz.modelspec import load_model_spec

    spec = f"{USER_MODELS}:tiny_rgb"
    out = tmp_path / "f.pt"
    data_args = ["--dataset", str(image_folder)]
    args = ["train", "--model", spec, *data_args, "--epochs", "1", "--train-size", "12"]
    assert main([*args, "--batch-size", "4", "--out", str(out), "--quiet"]) == 0, (
        capsys.readouterr().err
    )
    payload = torch.load(out, weights_only=True)
    assert payload["custom"] is True and payload["model"] == spec
    assert payload["input_shape"] == [3, 8, 8] and payload["metadata"]["dataset"] == "shapes"
    assert main(["decompose", "--checkpoint", str(out), "--xu", "0", "--xo", "1", *data_args]) == 1
    assert "holds the weights of your own model" in capsys.readouterr().err
    result = tmp_path / "r.json"
    args = ["decompose", "--model", spec, "--weights", str(out), *data_args, "--xu", "0"]
    assert main([*args, "--xo", "1", "--out", str(result)]) == 0, capsys.readouterr().err
    record = json.loads(result.read_text())
    assert record["meta"]["x_u"]["index"] == 0 and record["meta"]["dataset"] == "shapes"
    values = np.array(record["actual"], dtype=float)
    assert values.shape == (3,) and np.isfinite(values).all()
    # the same numbers as the API on the same model, weights and data
    data = load_dataset(image_folder)
    model = load_model_spec(spec, weights=out)
    dec = decompose(model, data.test.x[1], data.train.x[0], int(data.train.y[0]), 0.1)
    np.testing.assert_allclose(values, dec.actual, **float32_tolerance(dec.actual))


def test_registry_models_are_built_for_the_datas_shape(image_folder, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["train", "--model", "mlp", "--dataset", str(image_folder), "--epochs", "1"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    ckpt = load_checkpoint(out)
    assert ckpt.input_shape == (3, 8, 8) and ckpt.model.fc1.in_features == 3 * 8 * 8
    assert ckpt.num_classes == 3 and ckpt.config.train_size is None
    n = load_dataset(str(image_folder)).train.x.shape[0]
    assert main([*args, "--out", str(out), "--quiet", "--train-size", "100000"]) == 0
    assert f"--train-size 100000 is more than {image_folder.name}'s {n:,} training images" in (
        capsys.readouterr().err
    )
    assert load_checkpoint(out).config.train_size == n  # what it trained on
    args = ["--checkpoint", str(out), "--dataset", str(image_folder), "--xu", "0", "--xo", "0"]
    assert main(["decompose", *args]) == 0
    assert "green" in capsys.readouterr().out  # rows named by the folder's classes
    assert main(["decompose", *args[:2], "--xu", "0", "--xo", "0"]) == 1  # on MNIST
    assert "was built for 3×8×8 images; mnist's are 1×28×28" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["train", "--dataset", "imagenet"], 2, "unknown dataset 'imagenet'; choose one of mnist"),
        (["train", "--dataset", "./no/such/dir"], 2, "dataset directory no/such/dir does not"),
        (["decompose", "--model", "mlp", "--xu", "0", "--xo", "0", "--dataset", "cifar10",
          "--data-dir", "EMPTY"], 1, "CIFAR10: dataset files not found in EMPTY/cifar-10-batches-py"),
        (["train", "--model", "nonsense"], 2, "unknown model 'nonsense'; choose one of lenet"),
        (["train", "--model", f"{USER_MODELS}:small_cnn", "--dataset", "FOLDER"], 1,
         "fails on a batch of shape (2, 3, 8, 8)"),
        (["train", "--model", f"{USER_MODELS}:five_classes"], 1, "returns 5 logits per example "
         "but the data has 10 classes"),
        (["train", "--model", "lenet", "--dataset", "FOLDER"], 2, "lenet cannot be used on "
         "shapes: LeNet needs images of at least 12×12 pixels"),
        (["demo", "--dataset", "emnist", "--data-dir", "EMPTY"], 1, "EMNIST letters: dataset "
         "files not found in EMPTY/EMNIST/raw: emnist-letters-train-images-idx3-ubyte"),
        (["train", "--dataset", "ODD"], 1, "all images must have one size"),
        (["decompose", "--model", f"{USER_MODELS}:int_logits", "--xu", "0", "--xo", "1"], 1,
         "returns torch.int64 logits on a batch of shape (2, 1, 28, 28), examples of shape (1, 28, 28); "
         "logits must be floating point"),
        (["decompose", "--model", f"{USER_MODELS}:detached", "--xu", "0", "--xo", "1"], 1,
         "returns logits that do not depend on its trainable parameters"),
    ],
)  # fmt: skip
def test_bad_data_and_models_exit_with_one_line(
    args, code, message, image_folder, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    odd = tmp_path / "odd"
    for c, size in (("a", 8), ("b", 9)):
        (odd / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(np.zeros((size, size), np.uint8)).save(odd / c / f"{k}.png")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    subs = {"FOLDER": str(image_folder), "EMPTY": str(tmp_path / "empty"), "ODD": str(odd)}
    args = [subs.get(a, a) for a in args]
    if args[0] == "train":
        args += ["--out", str(tmp_path / "m.pt"), "--epochs", "1", "--quiet"]
    assert main(args) == code
    err = capsys.readouterr().err
    for key, value in subs.items():
        message = message.replace(key, value)
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


MODELS_PY = str(Path(__file__).with_name("user_models.py"))


@pytest.mark.parametrize("factory", ["no_bias", "HeadFirst"])
def test_your_model_is_saved_with_the_datas_number_of_classes(factory, tmp_path, capsys):
    out = tmp_path / "m.pt"
    args = ["train", "--model", f"{MODELS_PY}:{factory}", "--train-size", "128", "--epochs", "1"]
    assert main([*args, "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err
    payload = torch.load(out, weights_only=True)
    assert payload["num_classes"] == 10 and payload["custom"]
    dec = ["decompose", "--model", f"{MODELS_PY}:{factory}", "--weights", str(out), "--xo", "3",
           "--xu", "0"]  # fmt: skip
    assert main(dec) == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("factory", "error"), [("Flaky", "RuntimeError"), ("FlakyIndex", "IndexError")]
)
def test_a_run_that_fails_midway_keeps_its_steps(factory, error, tmp_path, capsys):
    out, accounts = tmp_path / "f.pt", tmp_path / "f.npz"
    args = ["train", "--model", f"{MODELS_PY}:{factory}", "--train-size", "640", "--epochs", "1",
            "--watch", "0", "--accounts", str(accounts), "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"training stopped at step 3: {error}: out of memory (simulated)" in err
    assert "the 2 steps before it are kept" in err and "Traceback" not in err
    assert torch.load(out, weights_only=True)["metadata"]["step"] == 2
    from ntkviz.run_account import RunAccount

    run = RunAccount.load(accounts)
    assert run.steps == 2 and "out of memory" in run.meta["stopped"]
    # again, onto those files: they are kept, the stopped run goes beside them
    kept = b"an earlier model", b"earlier accounts"
    out.write_bytes(kept[0]), accounts.write_bytes(kept[1])
    assert main(args) == 1
    assert f"wrote {tmp_path / 'f.stopped.pt'}" in capsys.readouterr().out
    assert (out.read_bytes(), accounts.read_bytes()) == kept
    assert torch.load(tmp_path / "f.stopped.pt", weights_only=True)["metadata"]["step"] == 2
    assert RunAccount.load(tmp_path / "f.stopped.npz").steps == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--watch", "1", "--accounts", "SAME", "--out", "SAME"],
         "--out and each --accounts must name different files"),
        (["train", "--model", "BN", "--train-size", "65", "--out", "OUT"],
         "BatchNorm1d cannot train on a batch of one example, and with 65 training examples"),
        (["decompose", "--model", "user_models.py", "--xu", "0", "--xo", "0"],
         "give your own as PATH_OR_MODULE:FACTORY"),
        (["decompose", "--model", "lenet", "--out", "DJSON", "--xu", "0", "--xo", "0"],
         "it is a directory; choose another --out"),
        (["train", "--watch", "1", "--accounts", "DIR"], "it is a directory; choose another --accounts"),
        (["train", "--lr", "1e39", "--out", "OUT"], "learning rate 1e+39 overflows"),
        # the settings' checks speak of the options, not of TrainConfig's fields
        (["train", "--train-size", "0", "--out", "OUT"], "train: --train-size must be ≥ 1, got 0\n"),
        (["train", "--batch-size", "0", "--out", "OUT"], "train: --batch-size must be ≥ 1, got 0"),
        (["train", "--lr", "-1", "--out", "OUT"], "train: --lr must be a positive finite number"),
    ],
)  # fmt: skip
def test_more_bad_arguments_exit_2_before_any_work(args, message, tmp_path, capsys):
    subs = {"SAME": str(tmp_path / "same.npz"), "BN": f"{MODELS_PY}:batch_norm",
            "OUT": str(tmp_path / "m.pt"), "DIR": str(tmp_path),
            "DJSON": str(tmp_path / "d.json")}  # fmt: skip
    (tmp_path / "d.json").mkdir()
    assert main([subs.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "same.npz").exists() and not (tmp_path / "m.pt").exists()


def test_no_display_and_unexpected_errors_give_one_line(monkeypatch, capsys):
    import ntkviz.cli as cli

    for name in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    assert main([]) == 1  # Qt would abort the process with its own five lines
    err = capsys.readouterr().err
    assert err.startswith("ntkviz: the desktop app cannot start: no display") and "xvfb-run" in err

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_decompose", broken)
    assert main(["decompose", "--model", "lenet", "--xu", "0", "--xo", "1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == (
        "ntkviz decompose: unexpected error: ZeroDivisionError: a bug (NTKVIZ_DEBUG=1 shows the "
        "traceback)"
    )


def test_a_diverging_run_says_so_on_one_line(tmp_path, capsys):
    out = tmp_path / "d.pt"
    args = ["train", "--lr", "1e30", "--train-size", "256", "--epochs", "1", "--out", str(out)]
    assert main([*args, "--quiet"]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert (
        line.startswith("ntkviz train: training diverged at step 2")
        and "step before it is kept" in line
    )
    assert "after 1 step\n" in captured.out
    assert torch.load(out, weights_only=True)["metadata"]["step"] == 1
