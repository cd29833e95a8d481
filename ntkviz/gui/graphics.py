"""pyqtgraph, imported and configured once for the app: ``from ntkviz.gui.graphics import pg``.

pyqtgraph's ``RawImageWidget`` tries to import CUDA Python (``cuda.bindings``) for a GPU path
ntkviz never uses; with PyTorch's CUDA build installed that import costs about 0.2 s of every
launch, so it is refused while pyqtgraph loads (PyTorch may still import it later).
"""

from __future__ import annotations

import sys


class _RefuseCuda:
    def find_spec(self, name, path=None, target=None):
        if name == "cuda" or name.startswith("cuda."):
            raise ImportError("ntkviz: CUDA Python is not needed to draw plots")
        return None


_guard = _RefuseCuda()
sys.meta_path.insert(0, _guard)
try:
    import pyqtgraph as pg
finally:
    sys.meta_path.remove(_guard)

pg.setConfigOptions(imageAxisOrder="row-major", antialias=True, background="w", foreground="k")

__all__ = ["pg"]
