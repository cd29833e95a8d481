"""The app on a model and data of the user's (#11): ``ntkviz.show`` with a Python model and a
pair of torchvision ``FakeData`` sets of RGB images with 5 and with 100 classes — training,
decomposition (against the core), export, a session saved and reopened, class names on the axes,
colour thumbnails — and File ▸ Open dataset on a folder of class folders."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from gui_helpers import (
    SMALL,
    TIMEOUT,
    cut_off,
    model_state,
    settings_in,
    train_batches,
    wait_current,
    wait_event,
)
from PySide6.QtWidgets import QApplication, QDockWidget
from torch import nn
from torchvision.datasets import FakeData
from torchvision.transforms import ToTensor

from ntkviz.app.state import Example
from ntkviz.decomposition import decompose
from ntkviz.gui.widgets import image_pixmap
from ntkviz.training import TrainConfig

CONFIG = TrainConfig(train_size=None, batch_size=16, epochs=1, eval_every=2, eval_size=40, lr=0.05)


def rgb_sets(num_classes: int):
    """Train and test ``FakeData`` of 3×16×16 images in [0, 1] (``ToTensor``)."""
    common = {"image_size": (3, 16, 16), "num_classes": num_classes, "transform": ToTensor()}
    train = FakeData(size=max(96, 2 * num_classes), random_offset=0, **common)
    test = FakeData(size=max(48, num_classes), random_offset=100_000, **common)
    kinds = (
        "aquarium fish",
        "maple tree",
        "pickup truck",
        "sweet pepper",
        "willow tree of the north",
    )
    train.classes = test.classes = [f"{k:02d} {kinds[k % 5]}" for k in range(num_classes)]
    return train, test


def small_cnn(num_classes: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 8 * 8, num_classes),
    )  # fmt: skip


@pytest.fixture
def show_window(qtbot, tmp_path, monkeypatch):
    """``ntkviz.show(model, data, block=False)`` with settings and its log in ``tmp_path``,
    ready."""
    monkeypatch.setattr("ntkviz.gui.window.QSettings", lambda *a: settings_in(tmp_path))
    monkeypatch.setenv("NTKVIZ_LOG", str(tmp_path / "ntkviz.log"))
    logger = logging.getLogger("ntkviz")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate

    def open_(model, data, until="ready", **kwargs):
        from ntkviz import show

        window = show(model, data, config=CONFIG, block=False, **kwargs)
        window.show_message_boxes = False
        qtbot.addWidget(window)
        qtbot.waitUntil(lambda: window.state.run_state == until, timeout=TIMEOUT)
        if until == "ready":
            wait_current(qtbot, window)
        return window

    yield open_
    for handler in set(logger.handlers) - set(handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.setLevel(level)
    logger.propagate = propagate


def test_show_logs_ntkviz_to_its_file_and_leaves_the_callers_logging_alone(show_window, tmp_path):
    class Seen(logging.Handler):  # the caller's own handler on the root logger, at WARNING
        def __init__(self):
            super().__init__()
            self.records = []

        def emit(self, record):
            self.records.append(record)

    root = logging.getLogger()
    seen, level = Seen(), root.level
    root.addHandler(seen)
    root.setLevel(logging.WARNING)  # the caller's logging: warnings and up
    try:
        window = show_window(None, None)
        assert window.log_file == tmp_path / "ntkviz.log"
        show_window(None, None)  # a second window: no second file handler
        files = [
            h for h in logging.getLogger("ntkviz").handlers if isinstance(h, logging.FileHandler)
        ]
        assert len(files) == 1 and all(
            getattr(h, "ntkviz_log", None) is None for h in root.handlers
        )
        logging.getLogger("ntkviz.training").info("an info record")
        logging.getLogger("ntkviz.training").warning("a warning record")
        files[0].flush()
        text = window.log_file.read_text()
        assert "ntkviz.data" in text and "an info record" in text and "a warning record" in text
        # the caller's handler sees what it saw before: ntkviz's warnings, not its info
        assert [r.getMessage() for r in seen.records if r.name.startswith("ntkviz")] == [
            "a warning record"
        ]
    finally:
        root.removeHandler(seen)
        root.setLevel(level)


@pytest.mark.parametrize("num_classes", [5, 100])
def test_the_app_works_on_a_python_model_and_rgb_data(show_window, qtbot, tmp_path, num_classes):
    train, test = rgb_sets(num_classes)
    model = small_cnn(num_classes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    window = show_window(model, (train, test))
    state = window.state
    assert state.dataset.images["train"].shape == (len(train), 16, 16, 3)
    assert state.dataset.classes[3] == "03 sweet pepper"
    assert state.model.name == "Sequential"

    train_batches(qtbot, window, 2)
    for k, v in model.state_dict().items():  # the caller's model is never trained
        assert torch.equal(v, before[k]), k

    # the shown decomposition is the core's on the engine's model
    pair = window.views["pair"]
    state.y_u = 2
    wait_current(qtbot, window)
    r = pair.last_result
    trained = small_cnn(num_classes)
    trained.load_state_dict(model_state(qtbot, window))
    x_u, x_o = train[r.request.x_u.index][0], test[r.request.x_o.index][0]
    want = decompose(trained.eval(), x_o, x_u, y_u=2, lr=r.request.lr)
    np.testing.assert_allclose(r.decomposition.K, want.K, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.decomposition.actual, want.actual, rtol=1e-3, atol=1e-7)

    # the heatmaps' axes carry the class names (elided, full names on hover) where there is room
    docks = window.findChildren(QDockWidget)
    for dock in docks:
        dock.hide()
    window.resize(1600, 970)
    QApplication.processEvents()
    k_view = pair.decomposition_view.heatmaps["K"]
    left = [text for _, text in k_view.getAxis("left")._tickLevels[0]]
    if num_classes == 5:  # named (elided) on a matrix, numbered on a narrow vector
        assert left == ["00 aqu…", "01 map…", "02 pic…", "03 swe…", "04 wil…"]
        g_left = [
            text for _, text in pair.decomposition_view.heatmaps["G"].getAxis("left")._tickLevels[0]
        ]
        assert g_left == ["0", "1", "2", "3", "4"]
    else:  # numbered: every 10th class
        assert left == [str(k) for k in range(0, 100, 10)]
    assert "04 willow tree" in k_view.image_item.describe(4, 1)

    # at 1280×800 with both docks, nothing is cut (long names elided or numbered), even with
    # x_o of the class with the longest name
    for dock in docks:
        dock.show()
    labels, x_o = state.dataset.labels["test"], state.x_o
    window.controller.select(x_o=Example("test", int(np.flatnonzero(labels == 4)[0])))
    wait_current(qtbot, window)
    caption = window.views["examples"].x_o_picker.caption
    assert "label 04 willow tre…" in caption.text()
    assert "label 04 willow tree of the north" in caption.toolTip()
    window.resize(1280, 770)
    QApplication.processEvents()
    assert cut_off(window) == [] and window.width() == 1280
    window.controller.select(x_o=x_o)
    wait_current(qtbot, window)

    # colour thumbnails
    image = state.dataset.images["test"][r.request.x_o.index]
    pixel = image_pixmap(image, 16).toImage().pixelColor(5, 7)
    assert (pixel.red(), pixel.green(), pixel.blue()) == tuple(int(c) for c in image[7, 5])

    # export: the JSON parses and holds the numbers shown
    out = tmp_path / "dec.json"
    pair.export_data(str(out))
    data = json.loads(out.read_text())
    np.testing.assert_allclose(np.array(data["K"]), r.decomposition.K)
    assert data["meta"]["classes"] == list(state.dataset.classes)

    # a session of the user's model: saved, then reopened on the same model and data
    window.controller.apply_step()
    wait_current(qtbot, window)
    path = tmp_path / "s.ntks"
    wait_event(qtbot, window, "session_saved", lambda: window.controller.save_session(str(path)))
    saved = model_state(qtbot, window)
    other = show_window(small_cnn(num_classes), (train, test))
    wait_event(qtbot, other, "session_opened", lambda: other.controller.open_session(str(path)))
    wait_current(qtbot, other)
    for k, v in model_state(qtbot, other).items():
        assert torch.equal(v, saved[k]), k
    assert other.state.model.applied_steps == 1 and other.state.y_u == 2


def chosen_in_the_dialog(source: str):
    """A stand-in for File ▸ Open dataset's dialog, with ``source`` chosen."""

    class Dialog:
        def __init__(self, *args):
            pass

        def exec(self):
            return True

        def values(self):
            return source, None, False

    return Dialog


def test_open_dataset_builds_the_model_box_kind_and_says_how_to_leave_your_model(
    show_window, qtbot, tmp_path, monkeypatch
):
    from PIL import Image

    import ntkviz.gui.files

    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            for k in range(4):
                pixels = np.full((20, 20, 3), 40 * k, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / name / f"{k}.png")
    window = show_window(None, None)
    spec = f"{Path(__file__).parent / 'user_models.py'}:small_cnn"
    wait_event(qtbot, window, "model", lambda: window.controller.open_model(spec))
    number, training = window.state.model.number, window.views["training"]
    error = wait_event(
        qtbot, window, "error",
        lambda: window.controller.open_dataset(str(tmp_path / "pets"), model=spec),
    ).payload  # fmt: skip
    assert "choose a registry model in the Model box first" in error.message
    assert "pets (3×20×20, 2 classes)" in error.message
    assert window.state.dataset.name == "mnist" and window.state.model.number == number
    training.model_box.setCurrentIndex(training.model_box.findData("lenet"))
    assert window.state.model_kind == "lenet"  # File ▸ Open dataset reads it there
    monkeypatch.setattr(
        ntkviz.gui.files, "DatasetDialog", chosen_in_the_dialog(str(tmp_path / "pets"))
    )
    wait_event(qtbot, window, "model", window.files.open_dataset)
    qtbot.waitUntil(lambda: window.state.dataset.classes == ("cat", "dog"), timeout=TIMEOUT)
    assert window.state.model.config.model == "lenet"


def test_a_session_reopens_the_folder_it_was_made_on(show_window, qtbot, tmp_path):
    import shutil

    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 6), ("test", 3)):
        for name in ("cat", "dog"):
            (tmp_path / "pets" / split / name).mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "pets" / split / name / f"{k}.png")
    window = show_window(None, None)
    wait_event(
        qtbot, window, "model", lambda: window.controller.open_dataset(str(tmp_path / "pets"))
    )
    wait_current(qtbot, window)
    train_batches(qtbot, window, 1)
    path = tmp_path / "pets.ntks"
    wait_event(qtbot, window, "session_saved", lambda: window.controller.save_session(str(path)))
    saved = model_state(qtbot, window)
    other = show_window(None, None)  # on MNIST
    wait_event(qtbot, other, "session_opened", lambda: other.controller.open_session(str(path)))
    wait_current(qtbot, other)
    assert other.state.dataset.classes == ("cat", "dog") and other.state.dataset.name == "pets"
    for k, v in model_state(qtbot, other).items():
        assert torch.equal(v, saved[k]), k
    # its folder gone: on data the model does not fit, a message that names the folder
    shutil.rmtree(tmp_path / "pets")
    third = show_window(None, None)
    error = wait_event(
        qtbot, third, "error", lambda: third.controller.open_session(str(path))
    ).payload
    assert error.title == "Session not readable"
    assert f"was made on pets ({tmp_path / 'pets'}), which cannot be read here" in error.message
    assert third.state.dataset.name == "mnist"


def test_open_dataset_on_a_folder_of_class_folders(show_window, qtbot, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for data, names in (("pets", ("cat", "dog", "owl")), ("zoo", ("ant", "bee", "cow"))):
        for split, n in (("train", 12), ("test", 6)):
            for name in names:
                folder = tmp_path / data / split / name
                folder.mkdir(parents=True)
                for k in range(n):
                    pixels = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(folder / f"{k}.png")
    window = show_window(None, None)
    assert window.state.dataset.name == "mnist"
    # an x_u and a y_u the new data does not have: they give way to its own, without an error
    window.controller.select(x_u=Example("train", 28480), x_o=Example("test", 9000), y_u=2)
    wait_current(qtbot, window)
    messages = []
    window.controller.on("message", lambda event: messages.append(event.payload))
    wait_event(
        qtbot, window, "model",
        lambda: window.controller.open_dataset(str(tmp_path / "pets")),
    )  # fmt: skip
    qtbot.waitUntil(lambda: window.state.dataset.classes == ("cat", "dog", "owl"), timeout=TIMEOUT)
    wait_current(qtbot, window)
    d = window.state.dataset
    assert d.images["train"].shape == (36, 20, 20, 3) and d.size("test") == 18
    assert window.last_error is None and not [m for m in messages if "y_u stays" in m]
    s, examples = window.state, window.views["examples"]
    assert s.x_u.index < 36 and s.x_o.index < 18 and s.y_u == s.label(s.x_u)
    assert (
        examples.x_u_picker.example == s.x_u
        and examples.x_u_picker.index_box.value() == s.x_u.index
    )
    assert examples.x_o_picker.example == s.x_o
    assert window.views["training"].train_size.maximum() == 36
    sizes = window.views["influence"].size_box
    assert [sizes.itemText(k) for k in range(sizes.count())] == ["all 18 test examples"]
    squeeze = window.views["squeeze"]
    assert squeeze.label_box.currentIndex() == s.y_u  # ȳ = y_u on the new classes
    assert "over 18 test images" in squeeze.survey_plots["peak"].titleLabel.text
    assert window.views["pair"].last_result.decomposition.K.shape == (3, 3)
    watch = window.views["watch_ranking"]
    assert [watch.which.itemText(k) for k in range(watch.which.count())] == [
        f"{e} ({d.classes[s.label(e)]})" for e in watch.examples
    ]  # the "show" list: this data's watched examples, not the last run's
    # other data whose first examples are again train[0] and test[0]: shown all the same
    before = (s.x_u, s.x_o)
    wait_event(
        qtbot, window, "model", lambda: window.controller.open_dataset(str(tmp_path / "zoo"))
    )
    qtbot.waitUntil(lambda: window.state.dataset.classes == ("ant", "bee", "cow"), timeout=TIMEOUT)
    wait_current(qtbot, window)
    assert (s.x_u, s.x_o) == before
    for picker, example in ((examples.x_u_picker, s.x_u), (examples.x_o_picker, s.x_o)):
        want = image_pixmap(s.dataset.images[example.split][example.index], picker.IMAGE)
        assert picker.image.pixmap().toImage() == want.toImage()  # the new data's image
        assert picker.caption.text().startswith(f"{example}\nlabel ant"), picker.caption.text()
    train_batches(qtbot, window, 2)  # evaluated at step 2 on the 18 test images there are
    assert window.views["training"].accuracy.text().endswith("at step 2 (all test images)")
    d = window.state.dataset
    # a folder that is not a dataset: one message, the data and model kept
    (tmp_path / "empty").mkdir()
    number = window.state.model.number
    window.controller.open_dataset(str(tmp_path / "empty"))
    qtbot.waitUntil(lambda: window.last_error is not None, timeout=TIMEOUT)
    assert "empty" in window.last_error[1]
    assert window.state.dataset is d and window.state.model.number == number


class Embedded(nn.Module):
    """A CNN with a learned bias image held as a bare Parameter (no reset method covers it)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.pos = nn.Parameter(torch.full((3, 16, 16), 0.5))
        self.net = small_cnn(num_classes)

    def forward(self, x):
        return self.net(x + self.pos)


def test_start_says_which_parameters_keep_the_given_values(show_window, qtbot, tmp_path):
    # the note went to the status bar, which the switch to "training" cleared at once
    window = show_window(Embedded(5), rgb_sets(5))
    note = "fresh weights: pos keep their given values (no reset_parameters)"
    shown = []  # the status bar as each run state has been taken in (after the window's slot)
    bar = window.statusBar()
    window.state.events.run_state.connect(lambda s: shown.append((s, bar.currentMessage())))
    window.views["training"].start_button.click()
    qtbot.waitUntil(lambda: window.state.run_state == "finished", timeout=TIMEOUT)
    assert any(s == "training" and note in message for s, message in shown), shown
    assert note in (tmp_path / "ntkviz.log").read_text()
    assert window.controller.unsaved_work().startswith("trained for ")


def test_a_misfit_model_on_data_no_registry_model_takes_opens_with_no_model(show_window):
    # the window hung at "loading…", its dock showing the spin boxes' minimums as settings
    common = {"image_size": (3, 16, 24), "num_classes": 3, "transform": ToTensor()}
    data = FakeData(size=30, **common), FakeData(size=12, random_offset=9, **common)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 24, 7))  # 7 logits for 3 classes
    window = show_window(model, data, until="no model")
    training = window.views["training"]
    assert "returns 7 logits" in window.last_error[1] and "3×16×24" in window.last_error[1]
    assert not training.start_button.isEnabled() and not training.lr.isEnabled()
    assert training.eta.text() == "no model: File ▸ Open model… or Open dataset…"


def test_the_dataset_dialog_gives_a_name_with_its_directory_or_a_folder(qtbot):
    from ntkviz.gui.dialogs import IMAGE_FOLDER, DatasetDialog

    dialog = DatasetDialog(None, "/tmp", "kmnist")
    qtbot.addWidget(dialog)
    assert dialog.values() == ("kmnist", None, False)  # the cache, offline
    dialog.folder.setText("/data/sets")
    dialog.download.setChecked(True)
    assert dialog.values() == ("kmnist", "/data/sets", True)
    dialog.source.setCurrentText(IMAGE_FOLDER)
    assert not dialog.download.isEnabled() and dialog.values() == ("/data/sets", None, False)


def test_show_refuses_what_is_not_a_model_or_a_config():
    from ntkviz import show

    with pytest.raises(TypeError, match=r"config must be a ntkviz\.TrainConfig, got int"):
        show(None, None, config=5, block=False)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module, got str"):
        show("lenet", None, block=False)


def test_a_window_without_the_training_dock_opens_a_dataset(qtbot, tmp_path, mnist, monkeypatch):
    # File ▸ Open dataset read the training dock's Model box: a KeyError without that dock
    import ntkviz.gui.files
    from ntkviz.gui.features import ExamplesView, PairView
    from ntkviz.gui.window import MainWindow

    window = MainWindow(config=SMALL, dataset=mnist, settings=settings_in(tmp_path),
                        features=[ExamplesView, PairView])  # fmt: skip
    window.show_message_boxes = False
    qtbot.addWidget(window)
    with qtbot.waitSignal(window.ready, timeout=TIMEOUT):
        window.show()
    number = window.state.model.number
    monkeypatch.setattr(ntkviz.gui.files, "DatasetDialog", chosen_in_the_dialog("mnist"))
    wait_event(qtbot, window, "model", window.files.open_dataset)
    assert window.state.model.number > number and window.state.model.config.model == "lenet"
