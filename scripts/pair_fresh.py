"""One pair's K in a fresh process, where the allocator has not grown its heap yet (as in a new
notebook): median time and page faults a pair, for this checkout and any others given, side by
side (each in its own subprocess, taking turns).

    python scripts/pair_fresh.py [--model resnet20] [--repeats 15] [--threads 1] [OTHER_CHECKOUT ...]

The benchmark's workers load a dataset first, which grows the heap; this measures the case
without that (see docs/benchmark.md, "the sweep frees each layer's cotangents at once").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def measure(model_name: str, repeats: int) -> dict:
    """In this process: the median time of one pair's K and the page faults a pair."""
    import torch

    from ntkviz.kernel import empirical_ntk
    from ntkviz.models import build_model

    model = build_model(model_name, 10, seed=0, in_channels=3, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        empirical_ntk(model, x[:1], x[1:])
    times = []
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t = time.perf_counter()
        empirical_ntk(model, x[:1], x[1:])
        times.append(time.perf_counter() - t)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {"ms": statistics.median(times) * 1e3, "faults": faults / repeats}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkouts", nargs="*", help="other checkouts to compare with this one")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per checkout")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(measure(args.model, args.repeats)))
        return 0
    trees = [str(HERE), *[str(Path(c).resolve()) for c in args.checkouts]]
    results: dict[str, list[dict]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": str(args.threads)}
            command = [sys.executable, __file__, "--worker", "1", "--model", args.model]
            command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            results[tree].append(json.loads(line[7:]))
    print(f"{args.model}, one pair's K, {args.threads} thread(s), fresh processes:")
    for tree, runs in results.items():
        ms = ", ".join(f"{r['ms']:.1f}" for r in runs)
        faults = ", ".join(f"{r['faults']:.0f}" for r in runs)
        print(f"  {tree}: {ms} ms; page faults a pair: {faults}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
