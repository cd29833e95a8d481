"""Screenshots of the probe views (issue 4): train a LeNet for one epoch on 20,000 MNIST images
while recording class×class kernel maps, then learn a "4" as 4 and look at its influence on the
whole test split, the kernel map, the squeezing lab, the watch of the run, and the per-layer
split and spectrum.

    QT_QPA_PLATFORM=offscreen python scripts/screenshots_probe.py [out_dir]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np
import screenshots
from PySide6.QtWidgets import QApplication, QDockWidget


def settle(app: QApplication) -> None:
    for _ in range(30):
        app.processEvents()
        time.sleep(0.01)


def wait_until(app: QApplication, condition, timeout: float = 600.0) -> None:
    screenshots.wait_until(app, condition, timeout)


def main(out_dir: str = "docs/screenshots") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = screenshots.open_window(app)
    views = window.views
    shown = {}
    window.shown.connect(lambda topic, result: shown.__setitem__(topic, result))

    # the spectrum at initialisation, kept as a faded curve
    lv = views["layers"]
    lv.n_box.setValue(50)
    lv.run_spectrum()
    wait_until(app, lambda: "spectrum" in shown)

    views["watch_ranking"].watching.setChecked(True)  # account for the run's steps
    kv = views["kernel_maps"]
    kv.per_class_box.setValue(10)
    kv.every_box.setValue(50)
    kv.record_box.setChecked(True)
    screenshots.start_training(app, window)
    t0 = time.monotonic()
    print("trained; kernel maps at steps", kv.maps.steps.tolist())

    screenshots.select(app, window)
    iv = views["influence"]
    iv.set_probe_size(10000)
    iv.norm_box.setValue(1000)
    iv.actual_box.setChecked(True)
    iv.run()
    wait_until(app, lambda: "influence" in shown)
    print(f"influence in {time.monotonic() - t0:.0f} s")
    r = shown["influence"]
    dp = r.classes["delta_probs"]
    print("mean Δπ, row 9:", np.array2string(dp[9], precision=5))
    print("mean Δπ, row 4:", np.array2string(dp[4], precision=5))
    print("mean Δπ_4 by true class:", np.array2string(dp[:, 4], precision=5))
    if r.kernel_norm is not None:
        print(
            "mean ‖K‖ by class:",
            np.array2string(np.asarray(iv.norm_bars.opts["height"]), precision=3),
        )
    # the probe views are wide: give them the whole window (View menu: hide both docks)
    for dock in window.findChildren(QDockWidget):
        dock.hide()
    window.show_view(iv)
    settle(app)
    window.centralWidget().grab().save(str(out / "influence.png"))

    window.show_view(kv)
    settle(app)
    window.centralWidget().grab().save(str(out / "kernel_map.png"))

    sv = views["squeeze"]
    sv.label_box.setCurrentIndex(4)
    sv.steps_box.setValue(5)
    sv.lr_box.setValue(0.05)
    sv.log_box.setChecked(True)
    sv.run()
    wait_until(app, lambda: "squeeze" in shown)
    window.show_view(sv)
    settle(app)
    window.centralWidget().grab().save(str(out / "squeeze.png"))

    # the watch: what the run did to the watched 9, step 200's batch, who moved it most
    wv = views["watch_ranking"]
    window.show_view(wv)
    wv.show_step(200)
    wait_until(app, lambda: "watch_detail" in shown)
    shown.pop("watch_ranking", None)
    wv.run()
    wait_until(app, lambda: "watch_ranking" in shown)
    settle(app)
    window.centralWidget().grab().save(str(out / "watch.png"))

    shown.pop("spectrum")
    lv.run()
    lv.run_spectrum()
    wait_until(app, lambda: "layers" in shown and "spectrum" in shown)
    window.show_view(lv)
    settle(app)
    window.centralWidget().grab().save(str(out / "layers.png"))
    window.close()
    print(f"wrote screenshots to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
