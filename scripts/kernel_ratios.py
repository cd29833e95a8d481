"""Kernel timing ratios that survive a shared machine: every job runs R times, interleaved with the
others in one process, and each keeps its best time (the benchmark's fresh-process medians swing
by up to 100x when other jobs share the 2 cores).

    python scripts/kernel_ratios.py [--repeats 5]

prints the best times of K(10,000 test images, one x) and K(…, five x), of the class×class map of
200 test images and of the per-layer Gram matrix of the same 200 (the paths they share), and of
the map of 500, with the two target ratios (K×5 / K×1 ≤ 5, map / Gram ≤ 2). LeNet, float32, CPU.
Run it with ``PYTHONPATH`` set to another checkout to compare two versions on the same machine.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from ntkviz.analysis import balanced_indices, class_kernel_map
    from ntkviz.data import load_dataset
    from ntkviz.kernel import empirical_ntk, empirical_ntk_by_layer
    from ntkviz.models import build_model

    data = load_dataset("mnist")
    model = build_model("lenet", seed=0).eval()
    x, y = data.test.x, data.test.y
    i200, i500 = balanced_indices(y, 20), balanced_indices(y, 50)
    jobs = {
        "K 10,000 × 1": lambda: empirical_ntk(model, x, data.train.x[:1]),
        "K 10,000 × 5": lambda: empirical_ntk(model, x, data.train.x[:5]),
        "map 200": lambda: class_kernel_map(model, x[i200], y[i200].numpy(), 10),
        "Gram 200": lambda: empirical_ntk_by_layer(model, x[i200], x[i200]),
        "map 500": lambda: class_kernel_map(model, x[i500], y[i500].numpy(), 10),
    }
    empirical_ntk(model, x[:200], data.train.x[:5])  # warm-up
    class_kernel_map(model, x[i200[:50]], y[i200[:50]].numpy(), 10)
    best = dict.fromkeys(jobs, float("inf"))
    for _ in range(args.repeats):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            best[name] = min(best[name], time.perf_counter() - start)
    for name, t in best.items():
        print(f"{name:>14}: {t:7.2f} s")
    k_ratio = best["K 10,000 × 5"] / best["K 10,000 × 1"]
    map_ratio = best["map 200"] / best["Gram 200"]
    print(f"K × 5 / K × 1 = {k_ratio:.2f} (target ≤ 5); map 200 / Gram 200 = {map_ratio:.2f} "
          "(target ≤ 2)")  # fmt: skip


if __name__ == "__main__":
    main()
