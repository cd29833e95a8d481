"""Writing files: atomic, with the user's umask for new files and the old mode for replaced ones;
failures say which file and leave nothing behind."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from models import inputs, make

from ntkviz.checkpoint import atomic_write, save_checkpoint
from ntkviz.decomposition import decompose
from ntkviz.errors import FileWriteError, NtkvizError
from ntkviz.models import build_model
from ntkviz.results import write_decomposition
from ntkviz.session import Session, save_session
from ntkviz.training import TrainConfig


@pytest.fixture
def umask():
    """Set a umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def writers(tmp_path):
    """Every core writer, as name -> function(path)."""
    model = build_model("mlp")
    dec = decompose(make("mlp"), inputs(1)[0], inputs(1, seed=2)[0], 1, 0.1)
    session = Session("mlp", model.state_dict(), TrainConfig())
    return {
        "m.pt": lambda p: save_checkpoint(p, model, "mlp", TrainConfig()),
        "s.ntkviz": lambda p: save_session(p, session),
        "r.json": lambda p: write_decomposition(dec, p),
        "r.npz": lambda p: write_decomposition(dec, p),
        "r.csv": lambda p: write_decomposition(dec, p),
        "t.txt": lambda p: atomic_write(p, lambda tmp: Path(tmp).write_text("x")),
    }


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_get_the_users_umask(tmp_path, umask, mask):
    umask(mask)
    for name, write in writers(tmp_path).items():
        write(tmp_path / name)
        assert mode(tmp_path / name) == 0o666 & ~mask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(writers(tmp_path))


def test_replaced_files_keep_their_mode(tmp_path, umask):
    umask(0o077)
    for k, (name, write) in enumerate(writers(tmp_path).items()):
        path = tmp_path / name
        path.write_text("old")
        wanted = (0o640, 0o604, 0o644, 0o600, 0o664, 0o444)[k]
        os.chmod(path, wanted)
        write(path)
        assert mode(path) == wanted, name
        assert path.read_bytes() != b"old"


def test_a_failed_write_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous")

    def full_disk(obj, f):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FileWriteError, match=f"cannot write {path}") as info:
        save_checkpoint(path, build_model("mlp"), "mlp", TrainConfig())
    assert isinstance(info.value, OSError) and isinstance(info.value, NtkvizError)
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_directory_or_a_file_in_the_way_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(FileWriteError, match="is a directory"):
        atomic_write(tmp_path / "d", lambda tmp: None)
    (tmp_path / "f").write_text("")
    with pytest.raises(FileWriteError, match=r"f is a file, not a directory"):
        atomic_write(tmp_path / "f" / "x.json", lambda tmp: None)
    with pytest.raises(FileWriteError, match=r"nowhere does not exist"):
        atomic_write(tmp_path / "nowhere" / "x.json", lambda tmp: None)
    np.testing.assert_equal(sorted(p.name for p in tmp_path.iterdir()), ["d", "f"])


@pytest.mark.parametrize("suffix", [".json", ".npz", ".csv"])
def test_non_finite_results_are_never_written(tmp_path, suffix):
    from dataclasses import replace

    dec = decompose(make("mlp"), inputs(1)[0], inputs(1, seed=2)[0], 1, 0.1)
    bad = replace(dec, predicted=np.full(10, np.nan), residual=np.full(10, np.inf))
    with pytest.raises(ValueError, match=r"non-finite values .* in predicted, residual"):
        write_decomposition(bad, tmp_path / f"r{suffix}")
    with pytest.raises(ValueError):
        write_decomposition(dec, tmp_path / f"r{suffix}", {"loss_before": float("nan")})
    assert not list(tmp_path.iterdir())
