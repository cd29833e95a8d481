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
from ntkviz.decomposition import decompose


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
    for suffix in (".json", ".npz", ".csv"):
        out = root / f"r{suffix}"
        r = run(
            "decompose",
            "--checkpoint",
            str(ckpt_path),
            "--xu",
            "2",
            "--xo",
            "7",
            "--lr",
            "0.3",
            "--loss",
            "neg",
            "--out",
            str(out),
            env_cache=root,
        )
        assert r.returncode == 0, r.stderr
        assert "relative residual" in r.stdout
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


def test_export_writes_every_figure_without_a_display(trained, monkeypatch):
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
    assert main(["export", *pair, "--figure", "trajectory", "--steps", "0", "--out", "t.png"]) == 2


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
        (["train", "--out", "x.pt", "--lr", "-1"], 2, "learning rate"),
        (["train", "--out", "no/such/dir/x.pt"], 2, "does not exist"),
        (["decompose", "--bogus"], 2, "usage"),
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
