"""House rule 1: the core imports and works with Qt absent."""

import subprocess
import sys

CODE = r"""
import sys

class BlockQt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PySide6", "shiboken6", "pyqtgraph", "PyQt5", "PyQt6"):
            raise ImportError(f"Qt is blocked in this test: {name}")
        return None

sys.meta_path.insert(0, BlockQt())
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


def test_core_imports_and_runs_with_qt_blocked():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
