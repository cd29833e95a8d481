"""House rule 1: the core and the application layer import and work with Qt absent; the GUI
shows its window before pyqtgraph and PyTorch are imported."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK_QT = r"""
import sys

class BlockQt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PySide6", "shiboken6", "pyqtgraph", "PyQt5", "PyQt6"):
            raise ImportError(f"Qt is blocked in this test: {name}")
        return None

sys.meta_path.insert(0, BlockQt())
"""

CORE = (
    BLOCK_QT
    + r"""
import torch
import ntkviz
from ntkviz import analysis, checkpoint, cli, data, decomposition, kernel, models, results
from ntkviz import modelspec, session, training
model = ntkviz.build_model("mlp")
x = torch.randn(2, 1, 28, 28)
d = ntkviz.decompose(model, x[0], x[1], 3, 0.1)
assert d.K.shape == (10, 10)
assert not [m for m in sys.modules if m.startswith(("PySide6", "pyqtgraph"))]
print("ok")
"""
)

APP = (
    BLOCK_QT
    + r"""
import pkgutil, importlib
import ntkviz.app, ntkviz.app.features
for package in (ntkviz.app, ntkviz.app.features):
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        importlib.import_module(info.name)
from ntkviz.app.controller import AppController
from ntkviz.app.engine import Engine
from ntkviz.app.state import AppState
from ntkviz.training import TrainConfig
events = []
engine = Engine(events.append, TrainConfig(train_size=64, epochs=1))
state = AppState()
controller = AppController(state, engine.handle)
controller.send("load")
while events or engine.busy:
    while events:
        controller.handle(events.pop(0))
    engine.tick()
assert controller.current("pair") is not None and state.run_state == "ready"
assert not [m for m in sys.modules if m.startswith(("PySide6", "pyqtgraph"))]
print("ok")
"""
)

FIRST_PAINT = r"""
import os, sys
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from PySide6.QtCore import QEvent, QObject
from PySide6.QtWidgets import QApplication
app = QApplication([])
from ntkviz.gui.window import MainWindow
window = MainWindow(autostart=False)
painted = []

class Watch(QObject):
    def eventFilter(self, obj, event):
        if event.type() == QEvent.Paint:
            painted.append(obj)
        return False

watch = Watch()
app.installEventFilter(watch)
window.show()
while not painted:
    app.processEvents()
heavy = [m for m in ("torch", "torchvision", "pyqtgraph", "ntkviz.app.engine") if m in sys.modules]
assert not heavy, f"imported before the first paint: {heavy}"
print("ok")
"""


def run(code: str) -> None:
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_core_imports_and_runs_with_qt_blocked():
    run(CORE)


def test_application_layer_imports_and_runs_with_qt_blocked():
    run(APP)


def test_the_window_paints_before_pyqtgraph_and_torch_are_imported():
    run(FIRST_PAINT)


def test_every_module_below_the_gui_is_in_the_qt_free_contract():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = {c["id"]: c for c in config["contracts"]}
    core = contracts["layers"]["layers"][-1].split(":")
    below_gui = {f"ntkviz.{m.strip()}" for m in core} | {"ntkviz.app"}
    assert below_gui == set(contracts["qt-free"]["source_modules"])
    modules = {f"ntkviz.{p.stem}" for p in (ROOT / "ntkviz").glob("*.py")} - {
        "ntkviz.__init__",
        "ntkviz.__main__",
        "ntkviz.cli",
    }
    assert modules <= below_gui, modules - below_gui
