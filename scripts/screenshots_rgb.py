"""Screenshot of the app on RGB data of the user's (issue 11), opened from Python the way a
notebook would: ``ntkviz.show(model, (train, test))``.

The data is "colour MNIST", made here from the shipped MNIST: every digit's strokes in a random
hue on a dark background of another random hue, 3×28×28 in [0, 1] (the colours say nothing about
the class). The model is the registry's ResNet-8 built for 3×28×28, given as a plain nn.Module;
it trains for one epoch on 6,000 images, then a "4" is learnt as 4 and seen from a "9".

    QT_QPA_PLATFORM=offscreen python scripts/screenshots_rgb.py [out_dir]
"""

from __future__ import annotations

import colorsys
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import screenshots
import torch
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QApplication
from torch.utils.data import TensorDataset


def colour_mnist(split, seed: int) -> TensorDataset:
    """The digits of ``split`` (an ntkviz ``Split``) in colour: ``(N, 3, 28, 28)`` in [0, 1]."""
    rng = np.random.default_rng(seed)
    n = len(split)
    hue = rng.random(n)
    stroke = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hue], np.float32)
    back = np.array([colorsys.hsv_to_rgb((h + 0.5) % 1, 0.7, 0.3) for h in hue], np.float32)
    ink = split.images.numpy().astype(np.float32)[:, None] / 255.0  # (N, 1, 28, 28)
    x = ink * stroke[:, :, None, None] + (1 - ink) * back[:, :, None, None]
    return TensorDataset(torch.from_numpy(x), split.y)


def main(out_dir: str = "docs/screenshots") -> int:
    import ntkviz
    from ntkviz.training import TrainConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    settings = QSettings(str(Path(tempfile.mkdtemp()) / "ntkviz.ini"), QSettings.IniFormat)
    import ntkviz.gui.window as window_module

    window_module.QSettings = lambda *args: settings  # fresh settings, not the user's
    mnist = ntkviz.load_dataset("mnist")
    data = (colour_mnist(mnist.train, 0), colour_mnist(mnist.test, 1))
    model = ntkviz.build_model("resnet8", 10, in_channels=3, image_size=28)
    config = TrainConfig(train_size=6000, epochs=1, lr=0.05)
    window = ntkviz.show(model, data, config=config, block=False)
    window.show_message_boxes = False
    window.resize(1680, 1050)
    screenshots.wait_until(
        app, lambda: window.state.model is not None and screenshots.current(window), 300
    )
    screenshots.start_training(app, window)
    screenshots.select(app, window, lr=0.005)  # a ResNet-8 moves far: a small step
    for _ in range(20):
        app.processEvents()
    window.grab().save(str(out / "rgb.png"))
    window.close()
    print(f"wrote {out / 'rgb.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
