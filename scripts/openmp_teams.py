"""Why the GUI thread must not run torch ops: time a worker thread's ops with and without one.

Each case runs in a fresh subprocess. A thread (as the app's ``TrainingWorker``) times LeNet-sized
ops: a linear layer's forward and backward, a convolution, an elementwise op. In the second case
the main thread first runs a single parallel op (``torch.randn(10**6).add_(1)``), which leaves it
an OpenMP thread team; with two teams on a machine with as many cores as torch threads, libgomp
throttles its spin-waiting and the worker's parallel ops slow down (about 3× on 2 cores).

    python scripts/openmp_teams.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

REPEATS = 1000


def child(main_op: bool) -> None:
    import torch
    import torch.nn.functional as F

    if main_op:
        torch.randn(10**6).add_(1)
    a, w = torch.randn(64, 256), torch.randn(256, 120, requires_grad=True)
    x, k = torch.randn(64, 6, 14, 14), torch.randn(16, 6, 5, 5)
    y = torch.randn(64, 6, 28, 28)
    ops = {
        "linear fwd+bwd": lambda: (a @ w).sum().backward(),
        "conv2d 6→16": lambda: F.conv2d(x, k),
        "relu + max_pool": lambda: F.max_pool2d(F.relu(y), 2),
    }
    out = {}

    def run():
        for name, op in ops.items():
            for _ in range(50):
                op()
            t = time.perf_counter()
            for _ in range(REPEATS):
                op()
            out[name] = (time.perf_counter() - t) / REPEATS * 1e6

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    out["torch threads"] = torch.get_num_threads()
    print(json.dumps(out))


def main() -> int:
    results = {}
    for main_op in (False, True):
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(int(main_op))],
            capture_output=True,
            text=True,
            check=True,
        )
        results[main_op] = json.loads(proc.stdout.splitlines()[-1])
    threads = results[False].pop("torch threads")
    results[True].pop("torch threads")
    print(f"µs per op in a worker thread, torch threads {threads}")
    print(f"{'op':18s} {'alone':>9s} {'after a main-thread op':>24s} {'ratio':>7s}")
    for name, alone in results[False].items():
        after = results[True][name]
        print(f"{name:18s} {alone:9.1f} {after:24.1f} {after / alone:7.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(bool(int(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
