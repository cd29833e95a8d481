"""Benchmark the ntkviz desktop app: launch time, event-loop stalls, training throughput.

1. Launch: in a fresh subprocess per repetition (``QT_QPA_PLATFORM=offscreen``, an empty
   ``XDG_CONFIG_HOME`` so no saved geometry is used), ``ntkviz.gui.app.run`` opens the window;
   the time from process start (``time.time()`` taken by this script just before spawning) to the
   window's first paint and to ``MainWindow.ready`` (dataset loaded and first model built in the
   worker). "first paint" is the end of the first burst of paint events of the window; the
   creation time of the process from ``/proc/self/stat`` is reported beside it as a cross-check.
2. Event-loop stall: with a preloaded dataset, the window trains a ``TrainConfig`` in its worker
   with the window's own live decomposition updates (at most one every ``LIVE_EVERY`` steps
   and ``LIVE_INTERVAL_S`` seconds, and at the end); a second scenario also asks for a
   decomposition every 0.5 s (as F5 / a user browsing x_o would). A 5 ms precise ``QTimer`` on
   the main thread records its tick times; the longest gap and the 99th percentile of the gaps
   are reported. An idle window gives the noise floor (the machine's own scheduling jitter).
   The window's result handlers and repaints are timed (by a subclass that wraps them) so that
   long stalls can be attributed.
3. Throughput: steps/s of the same config through ``ntkviz.training.train`` in a plain loop
   in a fresh subprocess (the core trainer as a script or ``ntkviz train`` runs it: main
   thread, no Qt), against the records the window receives per wall second from
   ``start_training()`` to the last record, in a window run without the 5 ms tick timer (it
   wakes the main thread 200 times a second, which the app itself never does). Bare and GUI
   runs are paired back to back, in alternating order, and the median of the pair ratios is
   reported: this shared machine's speed drifts by ±20 % within minutes. The GUI thread's CPU
   time per wall second while training is reported beside it.

   The main thread of the GUI process never runs a torch op, as in the app (the dataset is
   loaded by a helper thread that has ended): a thread that runs one parallel op keeps an
   OpenMP team, and with two teams on two cores libgomp throttles its spin-waiting, so that
   every parallel op of the worker runs about 3× slower (measured: 0.65 of the bare speed when
   this benchmark trained both in one process, 0.95–1.0 now).

Repetitions are interleaved and medians reported.

    python scripts/gui_benchmark.py [--quick] [--reps N] [--json out.json]
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

FIRST_PAINT_TARGET_S = 1.5
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


# ------------------------------------------------------------------------- launch (child side)


def _process_start_from_proc() -> float | None:
    """Wall-clock creation time of this process from /proc (10 ms resolution), else None."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat; fields[0] is field 3
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def child_launch(t0: float) -> int:
    """Run the real app (``ntkviz.gui.app.run``) until the window is ready; print JSON times."""
    proc_start = _process_start_from_proc()
    from PySide6.QtCore import QEvent, QObject, QTimer
    from PySide6.QtWidgets import QApplication, QWidget

    from ntkviz.gui import app as gui_app
    from ntkviz.gui.main_window import MainWindow

    qapp = QApplication(sys.argv[:1])  # run() reuses it
    times: dict = {"paints": [], "ready": None}

    def on_ready():
        times["ready"] = time.time()
        QTimer.singleShot(0, qapp.quit)

    class Probe(QObject):
        def eventFilter(self, obj, event):
            if (
                event.type() == QEvent.Paint
                and times["ready"] is None
                and isinstance(obj, QWidget)
                and isinstance(obj.window(), MainWindow)
            ):
                times["paints"].append(time.time())
            return False

    probe = Probe()
    show = MainWindow.show

    def show_and_watch(window):
        # The filter sees every event of the application; installed only now, its cost does
        # not inflate the construction of the window.
        window.ready.connect(on_ready)
        qapp.installEventFilter(probe)
        show(window)

    MainWindow.show = show_and_watch
    QTimer.singleShot(120_000, qapp.quit)  # safety net
    gui_app.run(sys.argv[:1])
    paints = times["paints"]
    first_paint = None
    if paints:
        first_paint = paints[0]
        for t in paints[1:]:
            if t - first_paint > PAINT_BURST_GAP_S:
                break
            first_paint = t
    rel = lambda t: None if t is None else t - t0  # noqa: E731
    print(
        "RESULT "
        + json.dumps(
            {
                "first_paint_s": rel(first_paint),
                "first_paint_event_s": rel(paints[0] if paints else None),
                "ready_s": rel(times["ready"]),
                "spawn_to_exec_s": rel(proc_start),
                "paint_events_before_ready": len(paints),
            }
        )
    )
    return 0


def run_child(args: list[str], env=None, timeout: float = 1800) -> dict:
    """Run this script with ``args`` in a fresh process; the JSON of its ``RESULT`` line."""
    proc = subprocess.run(
        [sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{args[0]} child failed (rc {proc.returncode}):\n{proc.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure_launch(reps: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as config_home:
        env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_CONFIG_HOME=config_home)
        for i in range(reps):
            t0 = time.time()
            r = run_child(["--child-launch", repr(t0)], env=env, timeout=300)
            results.append(r)
            print(
                f"  launch {i + 1}/{reps}: first paint {r['first_paint_s']:.2f} s, "
                f"ready {r['ready_s']:.2f} s",
                flush=True,
            )
    return results


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


HANDLERS = {  # worker signal -> (window handler, slot signature)
    "records": ("_on_records", (object,)),
    "decomposition_ready": ("_on_decomposition", (int, object)),
    "history_changed": ("_on_history", (int, object)),
    "state_changed": ("_on_state", (str,)),
}


def make_timed_window_class():
    """A MainWindow subclass that times its repaints and, after :meth:`time_handlers`, the
    handlers of the worker's results."""
    from PySide6.QtCore import QEvent, QObject, Slot

    from ntkviz.gui.main_window import MainWindow

    class Relay(QObject):
        """Receives the worker's signals on the main thread (queued, like the window's own
        slots) and calls the window's handler, timed. Overriding the handlers in the subclass
        does not work: PySide6 then calls them directly in the worker's thread."""

        def __init__(self, window):
            super().__init__(window)
            self.window = window

        def _call(self, name, *args):
            w = self.window
            t = time.perf_counter()
            getattr(w, name)(*args)
            if w.timing:
                w.handler_times.setdefault(name, []).append(time.perf_counter() - t)

        @Slot(object)
        def records(self, records):
            self._call("_on_records", records)

        @Slot(int, object)
        def decomposition_ready(self, generation, result):
            self._call("_on_decomposition", generation, result)

        @Slot(int, object)
        def history_changed(self, generation, history):
            self._call("_on_history", generation, history)

        @Slot(str)
        def state_changed(self, state):
            self._call("_on_state", state)

    class TimedWindow(MainWindow):
        timing = False
        handler_times: dict

        def time_handlers(self) -> None:
            """Route the worker's result signals through a timing relay."""
            self.relay = Relay(self)
            for signal_name, (handler, _) in HANDLERS.items():
                signal = getattr(self.worker, signal_name)
                signal.disconnect(getattr(self, handler))
                signal.connect(getattr(self.relay, signal_name))

        def event(self, event):
            if self.timing and event.type() == QEvent.UpdateRequest:
                t = time.perf_counter()
                result = super().event(event)
                dt = time.perf_counter() - t
                self.handler_times.setdefault("repaint (UpdateRequest)", []).append(dt)
                return result
            return super().event(event)

    return TimedWindow


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

    def open_window(self, config):
        from PySide6.QtCore import QSettings

        settings = QSettings(str(Path(self.tmp.name) / "ntkviz.ini"), QSettings.IniFormat)
        window = self.window_class(config=config, dataset=self.data, settings=settings)
        window.show_message_boxes = False
        window.handler_times = {}
        window.show()
        self.run_loop(lambda: window.model_info is not None, 120)
        self.run_loop(lambda: window.shown_generation == window.generation, 120)
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
        window.records_shown.connect(
            lambda n: (record_times.append(time.perf_counter()), cpu.append(time.thread_time()))
        )
        timer, tick_times = self.tick_recorder()
        browser = QTimer()
        browser.setInterval(BROWSE_INTERVAL_MS)
        browser.timeout.connect(window.refresh)
        window.handler_times = {}
        window.timing = True
        if ticks:
            timer.start()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        window.start_training()
        if browse:
            browser.start()
        # the run ends with the decomposition of the trained model on screen
        self.run_loop(
            lambda: window.state == "finished" and window.shown_generation == window.generation,
            1800,
            (window.records_shown, window.decomposition_shown),
        )
        browser.stop()
        timer.stop()
        window.timing = False
        steps = window.records_received
        wall = record_times[-1] - t0 if record_times else float("nan")
        result = {
            "steps": steps,
            "wall_s": wall,
            "steps_per_s": steps / wall if wall > 0 else float("nan"),
            # CPU time of the main (GUI) thread per wall second while training
            "main_thread_cpu": (cpu[-1] - cpu0) / wall if cpu else float("nan"),
            "decompositions_shown": len(window.handler_times.get("_on_decomposition", [])),
            "handlers": {
                name: {"calls": len(v), "max_ms": 1000 * max(v), "total_ms": 1000 * sum(v)}
                for name, v in window.handler_times.items()
            },
            **(gap_stats(tick_times) if ticks else {}),
        }
        self.close_window(window)
        return result


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
    p.add_argument("--child-launch", type=float, help=argparse.SUPPRESS)
    p.add_argument("--child-bare", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_launch is not None:
        return child_launch(args.child_launch)
    if args.child_bare is not None:
        return child_bare(args.child_bare)
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
    if not args.skip_launch:
        print(f"[1] launch: {reps} fresh subprocess(es), QT_QPA_PLATFORM=offscreen", flush=True)
        launches = measure_launch(reps)
    report["launch"] = launches

    if args.launch_only:
        fp = median([r["first_paint_s"] for r in launches])
        rd = median([r["ready_s"] for r in launches])
        print(f"launch medians: first paint {fp:.2f} s, ready {rd:.2f} s")
        return 0

    # 2 + 3. stall and throughput ------------------------------------------------------------
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import torch

    from ntkviz.gui.main_window import LIVE_EVERY, LIVE_INTERVAL_S
    from ntkviz.training import TrainConfig

    config = TrainConfig(train_size=args.train_size, epochs=epochs, device="cpu")
    report["config"] = config.to_dict()
    report["torch_threads"] = torch.get_num_threads()
    print(
        f"[2,3] training {config.model}, {config.train_size} images × {config.epochs} epochs, "
        f"batch {config.batch_size} (live decomposition at most every {LIVE_EVERY} steps and "
        f"{LIVE_INTERVAL_S:g} s); "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    harness = Harness(load_off_main_thread())
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
    report.update(
        idle=floor,
        bare=bare,
        gui=gui,
        gui_live=live,
        gui_browsing=browse,
        loadavg_end=os.getloadavg(),
    )

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
    report["summary"] = summary
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
