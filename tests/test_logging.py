"""The core logs the run's life at info level (the app sends it to its log file)."""

import logging

from models import inputs, make

from ntkviz.checkpoint import load_checkpoint, save_checkpoint
from ntkviz.data import load_dataset
from ntkviz.decomposition import decompose
from ntkviz.models import build_model
from ntkviz.results import write_decomposition
from ntkviz.session import Session, load_session, save_session
from ntkviz.training import TrainConfig, train


def test_training_datasets_and_files_are_logged(mnist, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ntkviz")
    data = load_dataset("mnist", root=mnist.root)
    model = build_model("lenet")
    config = TrainConfig(train_size=128, epochs=1, eval_every=1, eval_size=100)
    records = list(train(model, data, config))
    ckpt = save_checkpoint(tmp_path / "m.pt", model, "lenet", config)
    load_checkpoint(ckpt)
    session = save_session(tmp_path / "s.ntks", Session("lenet", model.state_dict(), config))
    load_session(session)
    dec = decompose(make("mlp"), inputs(1)[0], inputs(1, seed=2)[0], 1, 0.1)
    write_decomposition(dec, tmp_path / "r.json")
    messages = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    text = "\n".join(m for _, _, m in messages)
    assert all(level == logging.INFO and name.startswith("ntkviz.") for name, level, _ in messages)
    assert f"loaded MNIST from {mnist.root / 'MNIST' / 'raw'}: 60000 training" in text
    assert "training LeNet on 128 images: 2 steps (its schedule from step 0)" in text
    accuracy = records[-1].test_accuracy
    assert f"training ended after 2 steps, test accuracy {accuracy}" in text
    for path in (ckpt, session, tmp_path / "r.json"):
        assert f"wrote {path}" in text
    assert f"read checkpoint {ckpt}" in text and f"read session {session}" in text
