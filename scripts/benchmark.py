"""Benchmark ntkviz's kernel, decomposition, influence and training on CPU, LeNet beside the MLP
and (``--models lenet,mlp,resnet20``) the CIFAR ResNet-20 on random 3×32×32 data.

Every kernel figure stands beside a baseline: the "jacobian contraction" recipe of the PyTorch
NTK tutorial (``vmap(jacrev)`` of a per-example function over ``functional_call`` parameters on
both sides, then ``einsum('Naf,Mbf->NMab')`` summed over parameters).

Each measurement runs in a fresh subprocess of this script. Its peak memory is the peak resident
set size during the measurement (``getrusage(RUSAGE_SELF).ru_maxrss``) minus the resident set size
after imports and data load; on Linux the high-water mark is reset after the load
(``/proc/self/clear_refs``) so the load's own transient peak does not hide smaller ones.
``--quick`` runs all measurements of one model in one subprocess (resetting the high-water mark
between them) with fewer repeats, as a smoke run.

Times are medians of repeats after warm-up (``time.perf_counter``). The baseline at 1,000 x_o
runs only with ``--full`` (it needs ~11 GB for the MLP); otherwise it is extrapolated linearly
from its measurements at 1 and 100 x_o and marked "~", as is the baseline at 10,000 x_o.

The watched-training and ``account_step`` figures (8, 9) compare runs inside one process,
alternating step by step, so that each side sees the same load; their "ratio" is unwatched /
watched throughput (8) and ``account_step`` / plain step time (9), in wall time and in CPU time
of the measuring thread (``time.thread_time``; with ``--threads 1`` that is insensitive to other
processes' load on a shared machine). (8) watches test images at their labels: the class-level
account of each (the trainer's default), full accounts for all (``focus`` = every one), and 16
with one of them focused (as the app shows one example's step details).


The ResNets and the ViT ("heavy" models: ~25× LeNet's arithmetic per example) run on random
CIFAR-10-shaped data (10,000 test and 20,000 training images, 3×32×32, 10 classes) with the
quick repeat counts and without the class×class map; with LeNet in the same run the ResNet's one
pair and ``decompose`` are compared with LeNet's per parameter.

    python scripts/benchmark.py [--quick | --full] [--models lenet,mlp,resnet20] [--only NAMES]
                                [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

LR = 0.1
BUSY = 1.3  # calibration slowdown above which a measurement is reported as disturbed
BASELINE_SMALL_N = 100  # x_o count the baseline is measured at when it is extrapolated
MODEL_LABELS = {
    "lenet": "LeNet",
    "mlp": "MLP",
    "resnet8": "ResNet-8",
    "resnet20": "ResNet-20",
    "vit": "ViT",
}
#: Models measured on random CIFAR-10-shaped data, with the quick repeat counts.
HEAVY = ("resnet8", "resnet20", "vit")

# measurements, in the order they run; each is one function call in ``measure``
MEASUREMENTS = [
    "verify",
    "k_pair",
    "k_pair_base",
    "k_1000",
    "k_1000_base",
    "k_10000",
    "k_10000_x5",
    "k_10000_x50",
    "forward",
    "decompose",
    "vs_lenet",
    "influence",
    "class_map",
    "class_map_200",
    "gram_200",
    "train",
    "train_watch",
    "account",
]


# --------------------------------------------------------------------------- worker side


def _rss_kib() -> int:
    """Current resident set size in KiB (Linux), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> int:
    """Reset the peak-RSS high-water mark where the OS allows; return the baseline RSS (KiB)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_kib()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_mib(baseline_kib: int) -> float:
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024


def _median_time(fn, repeats: int, warmup: int = 1, warm_fn=None, clock=time.perf_counter) -> float:
    """Median time of ``fn()`` (wall time, or ``clock``) over ``repeats`` calls after ``warmup``
    calls of ``warm_fn`` (default ``fn``)."""
    for _ in range(warmup):
        (warm_fn or fn)()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def _calibration() -> float:
    """Median time of a fixed matmul workload: compared across measurements it shows how much CPU
    the shared machine left us (the same work took 2× longer at busy moments)."""
    import torch

    a = torch.ones(256, 256)
    return _median_time(lambda: [a @ a for _ in range(20)], 5, 1)


def jacobian_contraction_ntk(model, x1, x2):
    """The PyTorch NTK tutorial's baseline: K (N1, N2, V, V) from full per-example Jacobians."""
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    result = torch.stack([torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2)])
    return result.sum(0)


def per_parameter_against_lenet(model, x_o, x_u, y_u, rounds: int = 5, repeats: int = 10) -> dict:
    """One pair's K and ``decompose`` of ``model`` and of LeNet (random MNIST-shaped inputs) timed
    alternately in this process — ``rounds`` rounds, each the median of ``repeats`` calls, the
    best round kept — so that both see the same machine: CPU times of the process (all threads;
    time spent waiting for other processes on a shared machine is not counted, which would
    penalise the longer calls), and the ratios of those times per parameter (``model`` /
    LeNet)."""
    import torch

    from ntkviz.decomposition import decompose
    from ntkviz.kernel import empirical_ntk
    from ntkviz.models import build_model, count_parameters

    lenet = build_model("lenet", seed=0).eval()
    xl = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    calls = {
        "k_pair": lambda: empirical_ntk(model, x_o[None], x_u[None]),
        "lenet_k_pair": lambda: empirical_ntk(lenet, xl[:1], xl[1:]),
        "decompose": lambda: decompose(model, x_o, x_u, y_u, LR),
        "lenet_decompose": lambda: decompose(lenet, xl[0], xl[1], y_u, LR),
    }
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for key, fn in calls.items():
            best[key] = min(best[key], _median_time(fn, repeats, 2, clock=time.process_time))
    scale = count_parameters(lenet) / count_parameters(model)
    return {
        **best,
        "params": count_parameters(model),
        "k_pair_per_param": best["k_pair"] / best["lenet_k_pair"] * scale,
        "decompose_per_param": best["decompose"] / best["lenet_decompose"] * scale,
    }


def measure(name: str, model, data, quick: bool, full: bool) -> dict:
    """Run one measurement; returns its numbers (times in seconds)."""
    import torch

    from ntkviz.decomposition import decompose, influence
    from ntkviz.kernel import empirical_ntk
    from ntkviz.training import TrainConfig, train

    x_test = data.test.x
    x_u, y_u = data.train.x[:1], int(data.train.y[0])
    heavy = data.name == "random-cifar"
    quick = quick or heavy
    r = (lambda q, n: q) if quick else (lambda q, n: n)  # repeats: quick or normal

    if name == "verify":
        x1, x2 = x_test[:4], data.train.x[:2]
        k_ours = empirical_ntk(model, x1, x2)
        k_base = jacobian_contraction_ntk(model, x1, x2)
        return {
            "pairs": len(x1) * len(x2),
            "max_abs_diff": float((k_ours - k_base).abs().max()),
            "max_abs_k": float(k_base.abs().max()),
        }
    if name == "k_pair":
        return {"time": _median_time(lambda: empirical_ntk(model, x_test[:1], x_u), r(20, 50), 5)}
    if name == "k_pair_base":
        fn = lambda: jacobian_contraction_ntk(model, x_test[:1], x_u)  # noqa: E731
        return {"time": _median_time(fn, r(3, 10), 2)}
    if name == "k_1000":
        fn = lambda: empirical_ntk(model, x_test[:1000], x_u)  # noqa: E731
        return {"time": _median_time(fn, r(5, 20), 2)}
    if name == "k_1000_base":
        n = 1000 if full else BASELINE_SMALL_N
        fn = lambda: jacobian_contraction_ntk(model, x_test[:n], x_u)  # noqa: E731
        warm = lambda: jacobian_contraction_ntk(model, x_test[:10], x_u)  # noqa: E731
        return {"time": _median_time(fn, 1 if quick or full else 3, 1, warm), "n": n}
    if name == "k_10000":
        fn = lambda: empirical_ntk(model, x_test, x_u)  # noqa: E731
        warm = lambda: empirical_ntk(model, x_test[: 100 if heavy else 1000], x_u)  # noqa: E731
        return {"time": _median_time(fn, r(1, 3), 1, warm), "n": len(x_test)}
    if name in ("k_10000_x5", "k_10000_x50"):
        n2 = int(name.rpartition("_x")[2])
        fn = lambda: empirical_ntk(model, x_test, data.train.x[:n2])  # noqa: E731
        warm = lambda: empirical_ntk(model, x_test[:200], data.train.x[:n2])  # noqa: E731
        result_mib = len(x_test) * n2 * 100 * 4 / 2**20
        return {"time": _median_time(fn, 1, 1, warm), "n2": n2, "result_mib": result_mib}
    if name == "forward":
        with torch.no_grad():
            single = _median_time(lambda: model(x_test), r(3, 5), 1)
            chunked = _median_time(lambda: [model(c) for c in x_test.split(1000)], r(3, 5), 1)
        return {"time": single, "chunked": chunked}
    if name == "decompose":
        fn = lambda: decompose(model, x_test[0], x_u[0], y_u, LR)  # noqa: E731
        return {"time": _median_time(fn, 30 if quick else 100, 5)}
    if name == "vs_lenet":
        if not heavy:
            return {"skipped": "for heavy models"}
        return per_parameter_against_lenet(model, x_test[0], x_u[0], y_u)
    if name == "influence":
        fn = lambda: influence(model, x_test, x_u[0], y_u, LR)  # noqa: E731
        warm = lambda: influence(model, x_test[: 100 if heavy else 1000], x_u[0], y_u, LR)  # noqa: E731
        return {"time": _median_time(fn, r(1, 3), 1, warm)}
    if name == "class_map":
        if heavy:
            return {"skipped": "not run for heavy models"}
        from ntkviz.analysis import balanced_indices, class_kernel_map

        idx = balanced_indices(data.test.y, 50)  # 500 test images, 50 per class
        xs, ys = x_test[idx], data.test.y[idx].numpy()
        fn = lambda: class_kernel_map(model, xs, ys, 10)  # noqa: E731
        warm = lambda: class_kernel_map(model, xs[:50], ys[:50], 10)  # noqa: E731
        return {"time": _median_time(fn, r(1, 3), 1, warm)}
    if name in ("class_map_200", "gram_200"):
        from ntkviz.analysis import balanced_indices, class_kernel_map
        from ntkviz.kernel import empirical_ntk_by_layer

        idx = balanced_indices(data.test.y, 20)  # 200 test images, 20 per class
        xs, ys = x_test[idx], data.test.y[idx].numpy()
        if name == "gram_200":
            fn = lambda: empirical_ntk_by_layer(model, xs, xs)  # noqa: E731
        else:
            fn = lambda: class_kernel_map(model, xs, ys, 10)  # noqa: E731
        return {"time": _median_time(fn, r(1, 3), 1)}
    if name == "train":
        steps, warm = (60, 5) if quick else (300, 10)
        config = TrainConfig(
            model=model.__class__.__name__.lower(),
            train_size=(steps + warm + 1) * 64,
            epochs=1,
            batch_size=64,
            eval_every=10**9,  # no evaluation but the one after the last step (not timed)
            eval_size=64,
        )
        marks = {}
        for rec in train(model, data, config):
            if rec.step in (warm, warm + steps):
                marks[rec.step] = time.perf_counter()
        return {"steps_per_s": steps / (marks[warm + steps] - marks[warm]), "steps": steps}
    if name == "train_watch":
        return _train_watch(model, data, quick)
    if name == "account":
        return _account(model, data, quick)
    raise ValueError(f"unknown measurement {name!r}")


# watched-training runs: name -> (watched test images, how many of them focused)
WATCH_RUNS = {
    "1": (1, 0),
    "16": (16, 0),
    "1 full": (1, 1),
    "16 full": (16, 16),
    "16, 1 full": (16, 1),
}


def _train_watch(model, data, quick: bool) -> dict:
    """Training throughput unwatched and with watched test images (``WATCH_RUNS``: each at its
    label, class level only, or with full accounts for the focused ones): runs of the same config
    and seed, advanced one step each in turn (so each sees the same load)."""
    import copy

    from ntkviz.accounting import Watch
    from ntkviz.training import TrainConfig, train

    steps, warm = (30, 5) if quick else (200, 10)
    config = TrainConfig(
        model=model.__class__.__name__.lower(),
        train_size=(steps + warm + 1) * 64,
        epochs=1,
        batch_size=64,
        eval_every=10**9,  # no evaluation but the one after the last step (not timed)
        eval_size=64,
    )
    runs = {"0": None}
    for name, (w, focused) in WATCH_RUNS.items():
        labels = tuple(int(c) for c in data.test.y[:w])
        runs[name] = Watch(data.test.x[:w], labels, focus=tuple(range(focused)))
    gens = {w: train(copy.deepcopy(model), data, config, watch=watch) for w, watch in runs.items()}
    elapsed = {w: [0.0, 0.0] for w in runs}  # wall, CPU time of this thread
    for step in range(warm + steps):
        for w, gen in gens.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            next(gen)
            if step >= warm:
                elapsed[w][0] += time.perf_counter() - t0
                elapsed[w][1] += time.thread_time() - c0
    out = {"steps": steps, "steps_per_s": {w: steps / t[0] for w, t in elapsed.items()}}
    out["ratio"] = {w: elapsed["0"][0] / elapsed[w][0] for w in WATCH_RUNS}
    out["cpu_ratio"] = {w: elapsed["0"][1] / elapsed[w][1] for w in WATCH_RUNS}
    return out


def _account(model, data, quick: bool) -> dict:
    """``account_step`` with 16 watched test images on a batch of 64 beside the plain training
    step (zero_grad, forward, backward, SGD step), alternating, medians of each."""
    import torch.nn.functional as F

    from ntkviz.accounting import account_step
    from ntkviz.training import TrainConfig, make_optimizer

    optimizer = make_optimizer(model, TrainConfig(lr=1e-3))
    x, y, x_watch = data.train.x[:64], data.train.y[:64], data.test.x[:16]
    model.train()

    def plain():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def account():
        account_step(model, optimizer, x, y, x_watch)

    repeats = 20 if quick else 100
    times = {"plain": [], "account": [], "plain_cpu": [], "account_cpu": []}
    for _ in range(3):
        plain(), account()
    for _ in range(repeats):
        for key, fn in (("plain", plain), ("account", account)):
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            times[key].append(time.perf_counter() - t0)
            times[key + "_cpu"].append(time.thread_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "time": med["account"],
        "plain": med["plain"],
        "ratio": med["account"] / med["plain"],
        "cpu_ratio": med["account_cpu"] / med["plain_cpu"],
    }


def random_cifar():
    """CIFAR-10 shapes with random data: 20,000 training and 10,000 test images ``(3, 32, 32)``
    drawn from N(0, 1) (as normalised images), random labels 0–9; seeded."""
    from pathlib import Path

    import torch

    from ntkviz.data import ImageDataset, Split

    g = torch.Generator().manual_seed(0)

    def split(n):
        x = torch.randn(n, 3, 32, 32, generator=g)
        return Split(images=torch.empty(0), x=x, y=torch.randint(0, 10, (n,), generator=g))

    classes = tuple(str(c) for c in range(10))
    return ImageDataset("random-cifar", split(20_000), split(10_000), 0.0, 1.0, classes, Path("."))


def worker(model_name: str, names: list[str], quick: bool, full: bool, threads: int) -> None:
    """Subprocess entry: load once, run ``names`` in order, print one JSON line per result."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from ntkviz.data import load_dataset
    from ntkviz.models import build_model

    heavy = model_name in HEAVY
    data = random_cifar() if heavy else load_dataset("mnist")
    shape = {"in_channels": 3, "image_size": 32} if heavy else {}
    for name in names:
        model = build_model(model_name, seed=0, **shape).eval()
        torch.manual_seed(0)
        calibration = _calibration()
        base = _reset_peak()
        result = measure(name, model, data, quick, full)
        result["peak_mib"] = _peak_mib(base)
        result["calibration"] = max(calibration, _calibration())
        print("RESULT " + json.dumps({"name": name, **result}), flush=True)


# --------------------------------------------------------------------------- parent side


def run_group(model_name: str, names: list[str], args) -> dict[str, dict]:
    """Run measurements in a fresh subprocess; failures become ``{"error": ...}``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model_name, ",".join(names)]
    cmd += ["--quick"] * args.quick + ["--full"] * args.full
    cmd += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            item = json.loads(line[len("RESULT ") :])
            results[item.pop("name")] = item
    for name in names:
        if name not in results:
            why = "killed (out of memory?)" if proc.returncode < 0 else f"rc {proc.returncode}"
            tail = proc.stderr.strip().splitlines()[-1:] or [""]
            results[name] = {"error": f"{why} {tail[0]}".strip()}
    return results


def extrapolate(t1: float, t_small: float, n_small: int, n: int) -> float:
    """Linear fit through (1, t1) and (n_small, t_small), evaluated at n."""
    return t_small + (t_small - t1) * (n - n_small) / (n_small - 1)


def derive(res: dict[str, dict], full: bool) -> dict:
    """Baseline figures at 1,000 / 10,000 x_o (measured or extrapolated) and the ratios."""
    out = {}
    pair, small = res.get("k_pair_base", {}), res.get("k_1000_base", {})
    for n in (1000, 10000):
        key = f"base_{n}"
        if "time" not in small or "time" not in pair:
            continue
        if full and n == 1000:
            out[key] = {"time": small["time"], "peak_mib": small["peak_mib"], "approx": False}
        else:
            n_small = small["n"]
            out[key] = {
                "time": extrapolate(pair["time"], small["time"], n_small, n),
                "peak_mib": extrapolate(pair["peak_mib"], small["peak_mib"], n_small, n),
                "approx": True,
            }
    return out


GIB = 1024.0


def check_targets(name: str, res: dict, der: dict) -> dict[str, tuple[str, bool]]:
    """Targets for this model: key -> (description, passed)."""
    t = {}

    def has(*keys):
        return all("time" in res.get(k, {}) for k in keys)

    if name == "lenet" and has("decompose"):
        t["decompose"] = ("decompose LeNet median ≤ 5 ms", res["decompose"]["time"] <= 5e-3)
    if name == "mlp" and has("k_pair"):
        t["k_pair"] = ("K one MLP pair ≤ 2 ms", res["k_pair"]["time"] <= 2e-3)
    if name == "mlp" and has("k_1000"):
        t["k_1000"] = ("K 1,000 MLP x_o ≤ 30 ms", res["k_1000"]["time"] <= 30e-3)
    if name == "lenet" and has("k_10000", "forward"):
        ratio = res["k_10000"]["time"] / res["forward"]["time"]
        t["k_10000_ratio"] = ("K 10,000 LeNet ≤ 3× plain single-call forward", ratio <= 3)
        t["k_10000_peak"] = ("K 10,000 LeNet peak ≤ 2 GiB", res["k_10000"]["peak_mib"] <= 2 * GIB)
    if name == "lenet" and "ratio" in res.get("train_watch", {}):
        ratio = res["train_watch"]["ratio"]
        t["watch_1"] = ("LeNet training with 1 watched ≥ 0.85× unwatched", ratio["1"] >= 0.85)
        t["watch_16"] = ("LeNet training with 16 watched ≥ 0.6× unwatched", ratio["16"] >= 0.6)
    if name == "lenet" and "ratio" in res.get("account", {}):
        t["account"] = (
            "LeNet account_step 16 watched × 64 ≤ 3× the plain step",
            res["account"]["ratio"] <= 3,
        )
    label = MODEL_LABELS.get(name, name)
    for key, what in (("k_pair", "K one pair"), ("decompose", "decompose")):
        if f"{key}_per_param" in res.get("vs_lenet", {}):
            ratio = res["vs_lenet"][f"{key}_per_param"]
            t[f"{key}_per_param"] = (
                f"{what} {label} ≤ 3× LeNet per parameter ({ratio:.2f}×, interleaved, CPU time)",
                ratio <= 3,
            )
    if name in HEAVY and has("k_10000"):
        peak = res["k_10000"]["peak_mib"]
        t["k_10000_peak"] = (f"K 10,000 {label} peak ≤ 2 GiB", peak <= 2 * GIB)
    if has("k_10000", "k_10000_x5"):
        ratio = res["k_10000_x5"]["time"] / res["k_10000"]["time"]
        t["k_x5_ratio"] = ("K 10,000 × 5 x ≤ 5× K 10,000 × 1 x", ratio <= 5)
    for key in ("k_10000_x5", "k_10000_x50"):
        if has(key):
            extra = res[key]["peak_mib"] - res[key]["result_mib"]
            t[f"{key}_peak"] = (
                f"K 10,000 × {res[key]['n2']} x: peak beyond the result ≤ 4 × the 64 MiB budget",
                extra <= 4 * 64,
            )
    if has("class_map_200", "gram_200"):
        ratio = res["class_map_200"]["time"] / res["gram_200"]["time"]
        t["class_map_ratio"] = ("class map of 200 ≤ 2× per-layer Gram of 200", ratio <= 2)
    if has("k_1000") and "base_1000" in der:
        ratio = der["base_1000"]["time"] / res["k_1000"]["time"]
        want = 10 if name in HEAVY else 20
        t["ratio_1000"] = (
            f"{label} ≥ {want}× faster than jacobian contraction at 1,000 ({fmt_ratio(ratio)})",
            ratio >= want,
        )
    return t


# --------------------------------------------------------------------------- formatting


def fmt_time(s: float | None, approx: bool = False) -> str:
    if s is None:
        return "n/a"
    value = f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"
    return ("~" if approx else "") + value


def fmt_mem(mib: float | None, approx: bool = False) -> str:
    if mib is None:
        return "n/a"
    value = f"{mib / GIB:.1f} GiB" if mib >= GIB else f"{mib:.0f} MiB"
    return ("~" if approx else "") + value


def fmt_ratio(x: float) -> str:
    return f"{x:.1f}×" if x < 10 else f"{x:.0f}×"


def tag(targets: dict, key: str) -> str:
    return "" if key not in targets else (" PASS" if targets[key][1] else " MISS")


def model_cells(row: str, res: dict, der: dict, targets: dict) -> list[str]:
    """[ntkviz, peak, baseline, baseline peak, ratio] for one model and one row."""
    r = res.get(row.split(":")[0], {})
    if "error" in r:
        return [f"failed: {r['error']}"[:16]]
    if row == "verify":
        if "max_abs_diff" not in r:
            return []
        return [f"{r['max_abs_diff']:.1e}", f"(|K|≤{r['max_abs_k']:.3g})"]
    if row in ("k_pair", "k_1000", "k_10000"):
        if "time" not in r:
            return []
        b = {
            "k_pair": res.get("k_pair_base"),
            "k_1000": der.get("base_1000"),
            "k_10000": der.get("base_10000"),
        }[row] or {}
        approx = bool(b.get("approx"))
        b_time = b.get("time")
        ratio = "n/a" if b_time is None else ("~" if approx else "") + fmt_ratio(b_time / r["time"])
        failed = not b and any("error" in res.get(k, {}) for k in ("k_pair_base", "k_1000_base"))
        return [
            fmt_time(r["time"]) + tag(targets, row),
            fmt_mem(r["peak_mib"]) + (tag(targets, "k_10000_peak") if row == "k_10000" else ""),
            "failed" if failed else fmt_time(b_time, approx),
            fmt_mem(b.get("peak_mib"), approx),
            ratio + (tag(targets, "ratio_1000") if row == "k_1000" else ""),
        ]
    if row == "forward:single":
        return [fmt_time(r.get("time")), fmt_mem(r.get("peak_mib"))]
    if row == "forward:chunked":
        return [fmt_time(r.get("chunked")), "(same run)"]
    if row == "forward:ratio":
        k = res.get("k_10000", {})
        if "time" not in k or "time" not in r:
            return ["n/a"]
        single, chunked = k["time"] / r["time"], k["time"] / r["chunked"]
        return [f"{fmt_ratio(single)} | {fmt_ratio(chunked)}" + tag(targets, "k_10000_ratio")]
    if row == "decompose":
        return [fmt_time(r.get("time")) + tag(targets, "decompose"), fmt_mem(r.get("peak_mib"))]
    if row == "vs_lenet":
        if "k_pair_per_param" not in r:
            return []
        k, d = r["k_pair_per_param"], r["decompose_per_param"]
        return [f"{k:.2f}× | {d:.2f}×", "(CPU time)"]
    if row in ("influence", "class_map", "gram_200"):
        return [fmt_time(r.get("time")), fmt_mem(r.get("peak_mib"))]
    if row in ("k_10000_x5", "k_10000_x50"):
        if "time" not in r:
            return []
        k1 = res.get("k_10000", {}).get("time")
        ratio = "" if k1 is None else fmt_ratio(r["time"] / k1) + " K(3)"
        if row == "k_10000_x5":
            ratio += tag(targets, "k_x5_ratio")
        return [fmt_time(r["time"]), fmt_mem(r["peak_mib"]) + tag(targets, f"{row}_peak"), "",
                f"(result {fmt_mem(r['result_mib'])})", ratio]  # fmt: skip
    if row == "class_map_200":
        if "time" not in r:
            return []
        g = res.get("gram_200", {}).get("time")
        ratio = "" if g is None else fmt_ratio(r["time"] / g) + " Gram"
        return [fmt_time(r["time"]), fmt_mem(r.get("peak_mib")), "", "",
                ratio + tag(targets, "class_map_ratio")]  # fmt: skip
    if row == "train":
        if "steps_per_s" not in r:
            return []
        return [f"{r['steps_per_s']:.0f} steps/s", fmt_mem(r.get("peak_mib"))]
    if row.startswith("train_watch"):
        if "ratio" not in r or not set(WATCH_RUNS) <= set(r["ratio"]):
            return []
        rate, ratio, cpu = r["steps_per_s"], r["ratio"], r["cpu_ratio"]
        if row == "train_watch":
            return [
                f"{rate['0']:.0f}|{rate['1']:.0f}|{rate['16']:.0f}/s",
                fmt_mem(r.get("peak_mib")),
                "",
                "",
                f"{ratio['1']:.2f}{tag(targets, 'watch_1')}|{ratio['16']:.2f}"
                + tag(targets, "watch_16"),
            ]
        if row == "train_watch:full":
            text = f"{ratio['1 full']:.2f}|{ratio['16 full']:.2f}"
            return [f"{rate['1 full']:.0f}|{rate['16 full']:.0f}/s", "", "", "", text]
        if row == "train_watch:focus":
            return [f"{rate['16, 1 full']:.0f}/s", "", "", "", f"{ratio['16, 1 full']:.2f}"]
        names = {"cpu": ("1", "16"), "fullcpu": ("1 full", "16 full"), "focuscpu": ("16, 1 full",)}
        return ["", "", "", "", "|".join(f"{cpu[n]:.2f}" for n in names[row.split(":")[1]])]
    if row == "account":
        if "ratio" not in r:
            return []
        return [
            fmt_time(r["time"]),
            fmt_mem(r.get("peak_mib")),
            fmt_time(r["plain"]),
            "",
            f"{r['ratio']:.2f}×" + tag(targets, "account"),
        ]
    if row == "account:cpu":
        return [] if "cpu_ratio" not in r else ["", "", "", "", f"{r['cpu_ratio']:.2f}×"]
    return []


ROWS = [
    ("verify", "check: max|K − K_baseline|, 4×2 x"),
    ("k_pair", "(1) K, one pair"),
    ("k_1000", "(2) K, 1,000 x_o × 1 x_u"),
    ("k_10000", "(3) K, 10,000 x_o × 1 x_u"),
    ("k_10000_x5", "    K, 10,000 x_o × 5 x"),
    ("k_10000_x50", "    K, 10,000 x_o × 50 x"),
    ("forward:single", "    no_grad forward 10k, one call"),
    ("forward:chunked", "    no_grad forward 10k, 1,000s"),
    ("forward:ratio", "    K(3) / forward (one | 1,000s)"),
    ("decompose", "(4) decompose, one pair (median)"),
    ("vs_lenet", "    per parameter / LeNet: K | dec."),
    ("influence", "(5) influence Δlog π, 10,000 x_o"),
    ("class_map", "(6) class×class ‖K‖ map, 500 x"),
    ("class_map_200", "    class×class ‖K‖ map, 200 x"),
    ("gram_200", "    per-layer Gram K(x, x), 200 x"),
    ("train", "(7) training throughput, batch 64"),
    ("train_watch", "(8) training 0|1|16 watched; ratios"),
    ("train_watch:cpu", "    the same in CPU time of the thread"),
    ("train_watch:full", "    1|16 watched, full accounts"),
    ("train_watch:fullcpu", "    the same in CPU time of the thread"),
    ("train_watch:focus", "    16 watched, 1 of them focused"),
    ("train_watch:focuscpu", "    the same in CPU time of the thread"),
    ("account", "(9) account_step 16×64 | plain step"),
    ("account:cpu", "    the same in CPU time of the thread"),
]
WIDTHS = [16, 12, 9, 10, 10]
HEADS = ["ntkviz", "peak", "baseline", "base peak", "ratio"]


def print_table(
    models: list[str], all_res: dict, all_der: dict, all_targets: dict, names: list[str]
) -> None:
    label_w = 34
    group_w = sum(WIDTHS) + len(WIDTHS) - 1
    line = " " * label_w + " | ".join(f"{MODEL_LABELS.get(m, m):^{group_w}}" for m in models)
    print(line)
    heads = " ".join(f"{h:>{w}}" for h, w in zip(HEADS, WIDTHS))
    print(f"{'measurement':<{label_w}}" + " | ".join(heads for _ in models))
    print("-" * (label_w + len(models) * (group_w + 3) - 3))
    for key, label in ROWS:
        if key.split(":")[0] not in names:
            continue
        groups = []
        for m in models:
            cells = model_cells(key, all_res[m], all_der[m], all_targets[m])
            cells += [""] * (len(WIDTHS) - len(cells))
            groups.append(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)))
        print(f"{label:<{label_w}}" + " | ".join(groups))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer repeats: a smoke run")
    mode.add_argument("--full", action="store_true", help="run the baseline at 1,000 x_o")
    parser.add_argument(
        "--models", default="lenet,mlp", help=f"comma-separated, of {','.join(MODEL_LABELS)}"
    )
    parser.add_argument(
        "--only", metavar="NAMES", help=f"comma-separated measurements ({', '.join(MEASUREMENTS)})"
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads in the measurements (default: torch's choice)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this file")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "NAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker[0], args.worker[1].split(","), args.quick, args.full, args.threads)
        return 0

    import torch

    models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_LABELS]
    if unknown:
        parser.error(
            f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODEL_LABELS)}"
        )
    mode_name = "quick" if args.quick else "full" if args.full else "normal"
    load_before = os.getloadavg()[0]
    print(
        f"ntkviz benchmark ({mode_name}) — torch {torch.__version__}, CPU, "
        f"{args.threads or torch.get_num_threads()} threads, {os.cpu_count()} cores, "
        f"{platform.machine()}, "
        f"load avg {load_before:.2f}",
        flush=True,
    )
    t_start = time.perf_counter()
    all_res, all_der, all_targets = {}, {}, {}
    names = MEASUREMENTS
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        if unknown := [n for n in names if n not in MEASUREMENTS]:
            parser.error(f"unknown measurement(s) {', '.join(unknown)}")
    groups = [names] if args.quick else [[n] for n in names]
    for m in models:
        print(f"  running {MODEL_LABELS[m]} …", file=sys.stderr, flush=True)
        res = {}
        for group in groups:
            res.update(run_group(m, group, args))
        all_res[m] = res
        all_der[m] = derive(res, args.full)
        all_targets[m] = check_targets(m, res, all_der[m])

    print()
    print_table(models, all_res, all_der, all_targets, names)
    print()
    small_n = "1,000 (measured)" if args.full else f"1 and {BASELINE_SMALL_N} x_o"
    print(
        "baseline = torch.func jacobian contraction (PyTorch NTK tutorial); ratio = baseline / "
        f"ntkviz;\n'~' = extrapolated linearly from the baseline measured at {small_n}; "
        "peak = max RSS during the\nmeasurement minus RSS after imports + data load, "
        "each measurement in a fresh process"
        + (
            "\n(quick: one process per model, so memory already held by an earlier "
            "measurement is not counted)."
            if args.quick
            else "."
        )
    )
    print("\ntargets:")
    for m in models:
        for desc, ok in all_targets[m].values():
            print(f"  {'PASS' if ok else 'MISS'}  {desc}")
    calibrations = [
        r["calibration"] for res in all_res.values() for r in res.values() if "calibration" in r
    ]
    if calibrations:
        best = min(calibrations)
        busy = {
            f"{MODEL_LABELS[m]} {n}": c / best
            for m, res in all_res.items()
            for n, r in res.items()
            if (c := r.get("calibration")) and c / best > BUSY
        }
        print(
            f"\nnoise: a fixed matmul workload timed before and after each measurement took > {BUSY}×"
            " its best time in: "
            + (", ".join(f"{k} ({v:.1f}×)" for k, v in busy.items()) or "none")
        )
    load_after = os.getloadavg()[0]
    print(
        f"\ntotal {time.perf_counter() - t_start:.0f} s; load avg {load_before:.2f} → "
        f"{load_after:.2f} (shared machine: numbers are noisy)"
    )
    if args.json:
        payload = {
            "mode": mode_name,
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),  # what the workers used
            "loadavg": [load_before, load_after],
            "results": all_res,
            "derived": all_der,
            "targets": {
                m: {k: {"description": d, "pass": ok} for k, (d, ok) in t.items()}
                for m, t in all_targets.items()
            },
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
