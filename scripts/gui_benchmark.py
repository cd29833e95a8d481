"""Benchmark the ntkviz desktop app: launch time, event-loop stalls, training throughput, and the
cost of every probe job in the app against the core calls it wraps.

1. Launch: the ``ntkviz`` console script in a fresh process per repetition (offscreen, or on the
   X display of ``$DISPLAY`` with ``--x11``; an empty ``XDG_CONFIG_HOME`` so no saved layout is
   used). A ``sitecustomize`` probe on ``PYTHONPATH`` (nothing in ntkviz itself) watches the
   window: the time from process start (``time.time()`` taken by this script just before
   spawning) to the window's first paint and to ``MainWindow.ready`` (dataset loaded and first
   model built by the engine). "first paint" is the end of the first burst of paint events of
   the window; the creation time of the process from ``/proc/self/stat`` is reported beside it.
2. Event-loop stall: with a preloaded dataset, the window trains a ``TrainConfig`` in its engine
   with its own live decomposition updates (at most one every ``LIVE_EVERY`` steps and
   ``LIVE_INTERVAL_S`` seconds, and at the end); a second scenario also asks for a decomposition
   every 0.5 s (as F5 / a user browsing x_o would). A 5 ms precise ``QTimer`` on the main thread
   records its tick times; the longest gap and the 99th percentile of the gaps are reported. An
   idle window gives the noise floor. The controller's event handling (per topic), the pair
   view's paint steps and the window's repaints are timed, so that long stalls can be attributed.
3. Throughput: steps/s of the same config through ``ntkviz.training.train`` in a plain loop in a
   fresh subprocess (the core trainer as a script or ``ntkviz train`` runs it), against the
   records the window receives per wall second, in a window run without the 5 ms tick timer.
   Bare and GUI runs are paired back to back, in alternating order, and the median of the pair
   ratios is reported: this shared machine's speed drifts by ±20 % within minutes.
4. Probe jobs: each tab's job at its default settings (influence of one update on the 10,000
   test images with ‖K‖ on 1,000; the class×class kernel map of 10 images per class; the
   squeezing lab; the per-layer split; the spectrum of 50 images), from the click to the result
   on screen, against the same core calls in a fresh process (main thread, no Qt), on the same
   model (a LeNet, seed 0) and pair. Medians of the repetitions; app/core per job.

The main thread of the GUI process never runs a torch op, as in the app (the dataset is loaded by
a helper thread that has ended): a thread that runs one parallel op keeps an OpenMP team, and
with two teams on two cores libgomp throttles its spin-waiting, so that every parallel op of the
engine runs about 3× slower (measured: 0.65 of the bare speed when this benchmark trained both
in one process, 0.95–1.0 now).

    python scripts/gui_benchmark.py [--quick] [--reps N] [--x11] [--json out.json]
        [--launch-only | --jobs-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FIRST_PAINT_TARGET_S = 1.0
JOB_RATIO_TARGET = 1.3  # a probe job in the app may cost at most 1.3× its core calls
READY_TARGET_S = 8.0
STALL_TARGET_MS = 50.0
SLOWDOWN_TARGET = 0.10  # the GUI may slow training by at most ~10 %
TICK_MS = 5
BROWSE_INTERVAL_MS = 500
PAINT_BURST_GAP_S = 0.2  # paint events closer than this belong to the same (first) frame


def median(values):
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ------------------------------------------------------------------------------- launch

#: ``sitecustomize`` for the launched console script: when ``ntkviz.gui.window`` is imported,
#: wrap ``MainWindow.show`` to watch the window's paint events from then on (an app-wide filter
#: installed earlier would slow its construction) and report once the window is ready.
LAUNCH_PROBE = r"""
import importlib.abc, json, os, sys, time

REPORT = os.environ["NTKVIZ_BENCH_REPORT"]


def process_start():
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


START = process_start()


def patch(window_module):
    from PySide6.QtCore import QEvent, QObject, QTimer
    from PySide6.QtWidgets import QApplication, QWidget

    MainWindow = window_module.MainWindow
    times = {"paints": [], "ready": None, "process_start": START}

    class Probe(QObject):
        def eventFilter(self, obj, event):
            if (event.type() == QEvent.Paint and times["ready"] is None
                    and isinstance(obj, QWidget) and isinstance(obj.window(), MainWindow)):
                times["paints"].append(time.time())
            return False

    probe = Probe()
    show = MainWindow.show

    def on_ready():
        times["ready"] = time.time()
        with open(REPORT, "w") as f:
            json.dump(times, f)
        QTimer.singleShot(0, QApplication.instance().quit)

    def show_and_watch(window):
        window.ready.connect(on_ready)
        QApplication.instance().installEventFilter(probe)
        show(window)

    MainWindow.show = show_and_watch


class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "ntkviz.gui.window":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module
        return spec


import importlib.util
sys.meta_path.insert(0, Hook())
"""


def console_script() -> str:
    """The ``ntkviz`` console script beside this Python (the project's venv)."""
    path = Path(sys.executable).with_name("ntkviz")
    if not path.exists():
        raise SystemExit(f"no ntkviz console script at {path}: run scripts/setup.sh first")
    return str(path)


def measure_launch(reps: int, x11: bool) -> list[dict]:
    """First paint and ready of the ``ntkviz`` console script, from process start."""
    results = []
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as probe:
        Path(probe, "sitecustomize.py").write_text(LAUNCH_PROBE)
        env = dict(os.environ, XDG_CONFIG_HOME=tmp, PYTHONPATH=probe)
        env.pop("PYTHONSTARTUP", None)
        if x11:
            if not env.get("DISPLAY"):
                raise SystemExit("--x11 needs an X display in $DISPLAY (e.g. Xvfb)")
            env.pop("QT_QPA_PLATFORM", None)
        else:
            env["QT_QPA_PLATFORM"] = "offscreen"
        for i in range(reps):
            report = Path(tmp, f"launch{i}.json")
            env["NTKVIZ_BENCH_REPORT"] = str(report)
            t0 = time.time()
            proc = subprocess.run(
                [console_script()], env=env, capture_output=True, text=True, timeout=300
            )
            if not report.exists():
                raise RuntimeError(f"the app gave no launch report (rc {proc.returncode}):\n"
                                   f"{proc.stderr}")  # fmt: skip
            times = json.loads(report.read_text())
            paints = times["paints"]
            first = paints[0] if paints else None
            for t in paints[1:]:
                if t - first > PAINT_BURST_GAP_S:
                    break
                first = t
            rel = lambda t, t0=t0: None if t is None else t - t0  # noqa: E731
            r = {
                "first_paint_s": rel(first),
                "first_paint_event_s": rel(paints[0] if paints else None),
                "ready_s": rel(times["ready"]),
                "spawn_to_exec_s": rel(times["process_start"]),
            }
            results.append(r)
            print(
                f"  launch {i + 1}/{reps}: first paint {r['first_paint_s']:.2f} s, "
                f"ready {r['ready_s']:.2f} s",
                flush=True,
            )
    return results


def run_child(args: list[str], env=None, timeout: float = 1800) -> dict:
    """Run this script with ``args`` in a fresh process; the JSON of its ``RESULT`` line."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args[0]} child failed (rc {proc.returncode}):\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


# ------------------------------------------------------------------ stall and throughput


def bare_training(config, data) -> dict:
    """Steps/s of ``train`` in a plain loop, model built as the worker builds it."""
    from ntkviz.models import build_model
    from ntkviz.training import make_optimizer, resolve_device, train

    t0 = time.perf_counter()
    model = build_model(config.model, len(data.classes), seed=config.seed)
    model.to(resolve_device(config.device))
    steps = sum(1 for _ in train(model, data, config, make_optimizer(model, config)))
    wall = time.perf_counter() - t0
    return {"steps": steps, "wall_s": wall, "steps_per_s": steps / wall}


def child_bare(config_json: str) -> int:
    """Load the dataset and run :func:`bare_training` on this (main) thread; print JSON."""
    from ntkviz.data import load_dataset
    from ntkviz.training import TrainConfig

    config = TrainConfig(**json.loads(config_json))
    print("RESULT " + json.dumps(bare_training(config, load_dataset("mnist"))))
    return 0


def measure_bare(config) -> dict:
    """:func:`bare_training` in a fresh subprocess."""
    return run_child(["--child-bare", json.dumps(config.to_dict())])


def load_off_main_thread():
    """The shipped dataset, loaded by a helper thread that ends before this returns, so that
    the main thread keeps no OpenMP team (see the module docstring)."""
    import threading

    from ntkviz.data import load_dataset

    box = {}
    thread = threading.Thread(target=lambda: box.update(data=load_dataset("mnist")))
    thread.start()
    thread.join()
    return box["data"]


def make_timed_window_class():
    """A MainWindow subclass that times its repaints and, after :meth:`time_handlers`, the
    controller's handling of each engine event (by topic) and the pair view's paint steps."""
    from PySide6.QtCore import QEvent

    from ntkviz.gui.window import MainWindow

    class TimedWindow(MainWindow):
        timing = False
        handler_times: dict

        def _timed(self, name: str, call):
            def wrapper(*args):
                t = time.perf_counter()
                result = call(*args)
                if self.timing:
                    self.handler_times.setdefault(name, []).append(time.perf_counter() - t)
                return result

            return wrapper

        def time_handlers(self) -> None:
            handle = self.controller.handle

            def timed_handle(event):
                topic = getattr(event, "topic", None) or f"job {event.feature} {event.kind}"
                return self._timed(f"handle {topic}", handle)(event)

            self.controller.handle = timed_handle
            paints = self.views["pair"].paints
            paints._next = self._timed("pair view paint step", paints._next)

        def event(self, event):
            if self.timing and event.type() == QEvent.UpdateRequest:
                return self._timed("repaint (UpdateRequest)", super().event)(event)
            return super().event(event)

    return TimedWindow


#: The probe jobs measured: topic, how the app starts it (on a window), and its core calls.
JOBS = ("influence", "kernel_maps", "squeeze", "layers", "spectrum")


def core_jobs(data, reps: int) -> dict:
    """Seconds per repetition of each probe job's core calls, as the app's jobs make them at
    their default settings, on the app's first model and pair (main thread, no Qt)."""
    import numpy as np

    from ntkviz.analysis import (
        balanced_indices,
        class_influence,
        class_kernel_map,
        ntk_spectrum,
        squeeze_steps,
        squeeze_survey,
    )
    from ntkviz.app.features.influence import probe_indices
    from ntkviz.app.features.squeeze import SURVEY_SIZE, SWEEP
    from ntkviz.decomposition import influence
    from ntkviz.kernel import empirical_ntk_by_layer
    from ntkviz.models import build_model

    model = build_model("lenet", len(data.classes), seed=0)
    test = data.test
    u = int((data.train.y == 4).nonzero()[0])
    o = int((test.y == 9).nonzero()[0])
    x_u, x_o, y_u, lr = data.train.x[u], test.x[o], 4, 0.01  # the app's first pair and η

    def run_influence():
        idx = probe_indices(len(test), 10000)
        inf = influence(model, test.x[idx], x_u, y_u, lr)
        class_influence(inf, test.y[idx].numpy(), 10)
        influence(model, test.x[idx[:1000]], x_u, y_u, lr, kernel_norm=True, chunk_size=100)

    def run_kernel_map():
        idx = balanced_indices(test.y, 10)  # the view's default: PROBE_IMAGES // 10 classes
        class_kernel_map(model, test.x[idx], test.y[idx].numpy(), 10)

    def run_squeeze():
        neg = squeeze_steps(model, x_u, y_u, 0.5, 5, "neg")
        squeeze_steps(model, x_u, y_u, 0.5, 5, "ce")
        for eta in np.geomspace(0.5 / 100, 0.5 * 10, SWEEP):
            squeeze_steps(model, x_u, y_u, float(eta), 1, "neg")
        idx = np.sort(np.random.default_rng(0).choice(len(test), SURVEY_SIZE, replace=False))
        squeeze_survey(model, test.x[idx], test.y[idx].numpy(), 0.5)
        return neg

    def run_layers():
        empirical_ntk_by_layer(model, x_o[None], x_u[None])

    def run_spectrum():
        ntk_spectrum(model, test.x[balanced_indices(test.y, 5)])

    calls = dict(zip(JOBS, (run_influence, run_kernel_map, run_squeeze, run_layers,
                            run_spectrum)))  # fmt: skip
    out = {}
    for name, call in calls.items():
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        out[name] = times
    return out


def child_core_jobs(reps: str) -> int:
    from ntkviz.data import load_dataset

    print("RESULT " + json.dumps(core_jobs(load_dataset("mnist"), int(reps))))
    return 0


class Harness:
    """One QApplication, preloaded data; runs the GUI scenarios in blocking event loops."""

    def __init__(self, data):
        from PySide6.QtWidgets import QApplication

        self.app = QApplication.instance() or QApplication(sys.argv[:1])
        self.data = data
        self.window_class = make_timed_window_class()
        self.tmp = tempfile.TemporaryDirectory()

    def run_loop(self, done, timeout_s: float, signals=()) -> None:
        """Run the event loop (blocking, no busy wait) until ``done()`` or the timeout.
        ``done`` is checked whenever one of ``signals`` fires, and every 250 ms (so that the
        harness itself wakes the main thread seldom while training is measured)."""
        from PySide6.QtCore import QEventLoop, QTimer

        loop = QEventLoop()
        check = lambda *_: done() and loop.quit()  # noqa: E731
        for signal in signals:
            signal.connect(check)
        poll = QTimer()
        poll.setInterval(250)
        poll.timeout.connect(check)
        guard = QTimer()
        guard.setSingleShot(True)
        guard.timeout.connect(loop.quit)
        poll.start()
        guard.start(int(timeout_s * 1000))
        if not done():
            loop.exec()
        poll.stop()
        guard.stop()
        for signal in signals:
            signal.disconnect(check)
        if not done():
            raise TimeoutError(f"timed out after {timeout_s} s")

    def tick_recorder(self):
        from PySide6.QtCore import Qt, QTimer

        ticks: list[float] = []
        timer = QTimer()
        timer.setTimerType(Qt.PreciseTimer)
        timer.setInterval(TICK_MS)
        timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
        return timer, ticks

    @staticmethod
    def current(window) -> bool:
        """The shown decomposition and history answer the newest requests."""
        pair, generation = window.views["pair"], window.controller.generation
        return (
            pair.shown_generation == generation["pair"]
            and pair.shown_history_generation == generation["history"]
        )

    def open_window(self, config):
        from PySide6.QtCore import QSettings

        settings = QSettings(str(Path(self.tmp.name) / "ntkviz.ini"), QSettings.IniFormat)
        window = self.window_class(config=config, dataset=self.data, settings=settings)
        window.show_message_boxes = False
        window.handler_times = {}
        window.show()
        self.run_loop(lambda: window.state.model is not None, 120)
        self.run_loop(lambda: self.current(window), 120)
        window.time_handlers()
        return window

    def close_window(self, window) -> None:
        window.close()
        window.deleteLater()
        self.app.processEvents()

    def idle_floor(self, config, seconds: float) -> dict:
        window = self.open_window(config)
        timer, ticks = self.tick_recorder()
        timer.start()
        end = time.perf_counter() + seconds
        self.run_loop(lambda: time.perf_counter() > end, seconds + 10)
        timer.stop()
        self.close_window(window)
        return gap_stats(ticks)

    def gui_training(self, config, browse: bool = False, ticks: bool = True) -> dict:
        """Train in a new window. ``ticks``: record the 5 ms timer (for stalls; it wakes the
        main thread 200 times a second, so throughput is measured in runs without it)."""
        from PySide6.QtCore import QTimer

        window = self.open_window(config)
        record_times: list[float] = []
        cpu: list[float] = []
        window.controller.on(
            "records",
            lambda e: (record_times.append(time.perf_counter()), cpu.append(time.thread_time())),
        )
        timer, tick_times = self.tick_recorder()
        browser = QTimer()
        browser.setInterval(BROWSE_INTERVAL_MS)
        browser.timeout.connect(window.controller.refresh)
        window.handler_times = {}
        window.timing = True
        if ticks:
            timer.start()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        window.views["training"].start_button.click()
        if browse:
            browser.start()
        # the run ends with the decomposition of the trained model on screen
        self.run_loop(
            lambda: window.state.run_state == "finished" and self.current(window),
            1800,
            (window.shown,),
        )
        browser.stop()
        timer.stop()
        window.timing = False
        steps = window.controller.records_received
        wall = record_times[-1] - t0 if record_times else float("nan")
        result = {
            "steps": steps,
            "wall_s": wall,
            "steps_per_s": steps / wall if wall > 0 else float("nan"),
            # CPU time of the main (GUI) thread per wall second while training
            "main_thread_cpu": (cpu[-1] - cpu0) / wall if cpu else float("nan"),
            "decompositions_shown": len(window.handler_times.get("handle job pair result", [])),
            "handlers": {
                name: {"calls": len(v), "max_ms": 1000 * max(v), "total_ms": 1000 * sum(v)}
                for name, v in window.handler_times.items()
            },
            **(gap_stats(tick_times) if ticks else {}),
        }
        self.close_window(window)
        return result

    def gui_jobs(self, config, reps: int) -> dict:
        """Seconds from the click to the result on screen for each probe job at the views'
        default settings, on the window's first model and pair."""
        window = self.open_window(config)
        views = window.views
        starts = {
            "influence": views["influence"].run,
            "kernel_maps": views["kernel_maps"].run,
            "squeeze": views["squeeze"].run,
            "layers": views["layers"].run,
            "spectrum": views["layers"].run_spectrum,
        }
        out = {}
        for name in JOBS:
            times = []
            for _ in range(reps):
                shown = []
                catch = lambda topic, result, n=name: topic == n and shown.append(result)  # noqa
                window.shown.connect(catch)
                t = time.perf_counter()
                starts[name]()
                self.run_loop(lambda shown=shown: bool(shown), 600, (window.shown,))
                times.append(time.perf_counter() - t)
                window.shown.disconnect(catch)
            out[name] = times
        self.close_window(window)
        return out


def gap_stats(ticks: list[float]) -> dict:
    import numpy as np

    if len(ticks) < 2:
        return {"ticks": len(ticks), "max_gap_ms": float("nan"), "p99_gap_ms": float("nan")}
    gaps = np.diff(np.asarray(ticks)) * 1000
    return {
        "ticks": len(ticks),
        "max_gap_ms": float(gaps.max()),
        "p99_gap_ms": float(np.percentile(gaps, 99)),
        "gaps_over_target": int((gaps >= STALL_TARGET_MS).sum()),
    }


# --------------------------------------------------------------------------------- report


def summarize_handlers(runs: list[dict]) -> dict:
    """Per handler: the largest single call over all runs and the median total per run."""
    names = sorted({n for r in runs for n in r["handlers"]})
    out = {}
    for n in names:
        hs = [r["handlers"][n] for r in runs if n in r["handlers"]]
        out[n] = {
            "max_ms": max(h["max_ms"] for h in hs),
            "median_calls": median([h["calls"] for h in hs]),
            "median_total_ms": median([h["total_ms"] for h in hs]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one repetition of everything")
    p.add_argument("--reps", type=int, help="repetitions (default 5, 1 with --quick)")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, help="default 30 (960 steps, about 8 s), 2 with --quick")
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON")
    p.add_argument("--skip-launch", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launch-only", action="store_true", help="measure the launch alone")
    p.add_argument("--jobs-only", action="store_true", help="measure the probe jobs alone")
    p.add_argument("--x11", action="store_true", help="launch on $DISPLAY, not offscreen")
    p.add_argument("--child-bare", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    p.add_argument("--child-core-jobs", metavar="REPS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_bare is not None:
        return child_bare(args.child_bare)
    if args.child_core_jobs is not None:
        return child_core_jobs(args.child_core_jobs)
    reps = args.reps or (1 if args.quick else 5)
    epochs = args.epochs or (2 if args.quick else 30)

    report: dict = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
        "reps": reps,
    }

    # 1. launch ------------------------------------------------------------------------------
    launches = []
    if not (args.skip_launch or args.jobs_only):
        where = f"X display {os.environ.get('DISPLAY')}" if args.x11 else "offscreen"
        print(f"[1] launch: the ntkviz console script, {reps} fresh processes, {where}",
              flush=True)  # fmt: skip
        launches = measure_launch(reps, args.x11)
    report["launch"] = launches

    if args.launch_only:
        fp = median([r["first_paint_s"] for r in launches])
        rd = median([r["ready_s"] for r in launches])
        print(f"launch medians: first paint {fp:.2f} s, ready {rd:.2f} s")
        return 0

    # 2 + 3. stall and throughput ------------------------------------------------------------
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import torch

    from ntkviz.app.controller import LIVE_EVERY, LIVE_INTERVAL_S
    from ntkviz.training import TrainConfig

    config = TrainConfig(train_size=args.train_size, epochs=epochs, device="cpu")
    report["config"] = config.to_dict()
    report["torch_threads"] = torch.get_num_threads()
    harness = Harness(load_off_main_thread())
    if args.jobs_only:
        report["jobs"] = measure_jobs(harness, config, reps)
        report["summary"] = {"jobs": summarize_jobs(report["jobs"])}
        return write_json(args.json, report)
    print(
        f"[2,3] training {config.model}, {config.train_size} images × {config.epochs} epochs, "
        f"batch {config.batch_size} (live decomposition at most every {LIVE_EVERY} steps and "
        f"{LIVE_INTERVAL_S:g} s); "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    floor = harness.idle_floor(config, 2.0 if args.quick else 4.0)
    print(
        f"  idle window: max gap {floor['max_gap_ms']:.1f} ms, p99 {floor['p99_gap_ms']:.1f} ms",
        flush=True,
    )
    bare, gui, live, browse, ratios = [], [], [], [], []
    for i in range(reps):
        # the throughput pair back to back, in alternating order: the machine's speed drifts
        if i % 2 == 0:
            bare.append(measure_bare(config))
            gui.append(harness.gui_training(config, ticks=False))
        else:
            gui.append(harness.gui_training(config, ticks=False))
            bare.append(measure_bare(config))
        ratios.append(gui[-1]["steps_per_s"] / bare[-1]["steps_per_s"])
        live.append(harness.gui_training(config))
        browse.append(harness.gui_training(config, browse=True))
        print(
            f"  rep {i + 1}/{reps}: bare {bare[-1]['steps_per_s']:.1f} steps/s, "
            f"GUI {gui[-1]['steps_per_s']:.1f} steps/s (ratio {ratios[-1]:.2f}, main thread "
            f"{100 * gui[-1]['main_thread_cpu']:.0f} % CPU); max gap {live[-1]['max_gap_ms']:.1f} "
            f"ms (live), {browse[-1]['max_gap_ms']:.1f} ms (+ browsing, "
            f"{browse[-1]['decompositions_shown']} decompositions)",
            flush=True,
        )
    report.update(idle=floor, bare=bare, gui=gui, gui_live=live, gui_browsing=browse)
    report["jobs"] = measure_jobs(harness, config, reps)
    report["loadavg_end"] = os.getloadavg()

    # summary --------------------------------------------------------------------------------
    print()
    print(f"ntkviz GUI benchmark — {reps} rep(s), medians; load average {os.getloadavg()[0]:.2f}")
    summary: dict = {}
    if launches:
        fp = median([r["first_paint_s"] for r in launches])
        rd = median([r["ready_s"] for r in launches])
        ex = [r["spawn_to_exec_s"] for r in launches if r["spawn_to_exec_s"] is not None]
        summary["launch"] = {"first_paint_s": fp, "ready_s": rd}
        print(
            f"1. launch     first paint {fp:6.2f} s (target ≤ {FIRST_PAINT_TARGET_S} s)  "
            f"{verdict(fp <= FIRST_PAINT_TARGET_S)}"
        )
        print(
            f"              ready       {rd:6.2f} s (target ≤ {READY_TARGET_S} s)  "
            f"{verdict(rd <= READY_TARGET_S)}"
        )
        runs = ", ".join(f"{r['first_paint_s']:.2f}/{r['ready_s']:.2f}" for r in launches)
        print(
            f"              (runs, paint/ready s: {runs}; cross-check: process creation per "
            f"/proc/self/stat is {median(ex):+.2f} s after the parent's timestamp)"
        )
    stall = {
        "live": (median([r["max_gap_ms"] for r in live]), median([r["p99_gap_ms"] for r in live])),
        "browsing": (
            median([r["max_gap_ms"] for r in browse]),
            median([r["p99_gap_ms"] for r in browse]),
        ),
    }
    worst = max(r["max_gap_ms"] for r in live + browse)
    summary["stall"] = {k: {"max_gap_ms": v[0], "p99_gap_ms": v[1]} for k, v in stall.items()} | {
        "worst_max_gap_ms": worst,
        "idle_max_gap_ms": floor["max_gap_ms"],
    }
    label = {"live": "training + live", "browsing": "  + refresh/0.5 s"}
    for k, (mx, p99) in stall.items():
        print(
            f"2. stall      {label[k]:17s} longest {mx:6.1f} ms, p99 {p99:5.1f} ms "
            f"(target < {STALL_TARGET_MS:.0f} ms)  {verdict(mx < STALL_TARGET_MS)}"
        )
    print(
        f"              worst single run {worst:.1f} ms; idle-window floor "
        f"{floor['max_gap_ms']:.1f} ms (p99 {floor['p99_gap_ms']:.1f} ms)"
    )
    handlers = summarize_handlers(live + browse)
    summary["handlers"] = handlers
    print("              main-thread handlers (largest call / median total per run):")
    for name, h in sorted(handlers.items(), key=lambda kv: -kv[1]["max_ms"]):
        print(
            f"                {name:26s} {h['max_ms']:7.1f} ms / {h['median_total_ms']:8.1f} ms"
            f" ({h['median_calls']:.0f} calls)"
        )
    b = median([r["steps_per_s"] for r in bare])
    g = median([r["steps_per_s"] for r in gui])
    ratio = median(ratios)
    cpu = median([r["main_thread_cpu"] for r in gui])
    summary["throughput"] = {
        "bare_steps_per_s": b,
        "gui_steps_per_s": g,
        "gui_over_bare": ratio,
        "pair_ratios": ratios,
        "main_thread_cpu": cpu,
    }
    print(
        f"3. throughput bare {b:.1f} steps/s, GUI {g:.1f} steps/s (medians); median of the "
        f"{len(ratios)} back-to-back ratios GUI/bare = {ratio:.3f} (slowdown "
        f"{100 * (1 - ratio):+.1f} %, target ≤ {100 * SLOWDOWN_TARGET:.0f} %)  "
        f"{verdict(1 - ratio <= SLOWDOWN_TARGET)}"
    )
    print(
        f"              ratios {', '.join(f'{r:.2f}' for r in ratios)}; GUI thread CPU while "
        f"training {100 * cpu:.0f} % of one core"
    )
    summary["jobs"] = summarize_jobs(report["jobs"])
    report["summary"] = summary
    return write_json(args.json, report)


def measure_jobs(harness, config, reps: int) -> dict:
    print(f"[4] probe jobs: the app against the core calls (fresh process), {reps} rep(s) each",
          flush=True)  # fmt: skip
    core = run_child(["--child-core-jobs", str(reps)])
    gui = harness.gui_jobs(config, reps)
    for name in JOBS:
        print(f"  {name:12s} core {median(core[name]):6.2f} s, app {median(gui[name]):6.2f} s",
              flush=True)  # fmt: skip
    return {"core": core, "app": gui}


def summarize_jobs(jobs: dict) -> dict:
    out = {}
    for name in JOBS:
        c, a = median(jobs["core"][name]), median(jobs["app"][name])
        out[name] = {"core_s": c, "app_s": a, "app_over_core": a / c}
        print(
            f"4. job        {name:12s} app {a:6.2f} s / core {c:6.2f} s = {a / c:5.2f} "
            f"(target ≤ {JOB_RATIO_TARGET})  {verdict(a / c <= JOB_RATIO_TARGET)}"
        )
    return out


def write_json(path: str | None, report: dict) -> int:
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
