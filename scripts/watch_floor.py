"""How fast can an exact watched training step be? The parts an exact class-level account cannot
avoid, each timed alone on LeNet (batch 64, MNIST), against the trainer's plain step.

    python scripts/watch_floor.py [--threads 2]

For W watched examples x_o at their class c, each batch example b's contribution is ⟨v_o, g_b⟩
with v_o = J(x_o)ᵀ(e_c − π(x_o)) and g_b its gradient, summed over the layers. Whatever the
order of contraction, a step needs:

- the convolutions' share of ⟨v_o, g_b⟩ for all b: for one watched example, the batch convolved
  with v_o as filters (a forward convolution of the batch, conv1 and conv2) and summed against
  its output gradients; for several, the batch's per-example weight gradients (its input patches
  times its output gradients), formed once, and their Gram products with the v_o;
- the Linear layers' share, factored: (g_o·g_b)(a_o·a_b + 1) per layer;
- the watched examples' forward at the new parameters (their actual change, and the next
  step's start) and the pull-back of e_c − π through the network (the rows v_o).

The printout gives the largest throughput ratio (watched / unwatched) that these parts alone
leave, before any Python bookkeeping, the momentum and weight-decay terms (⟨v_o, buffer⟩ and
⟨v_o, θ⟩, also needed) or the float64 assembly.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time


def median_ms(fn, repeats: int = 400, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from ntkviz.accounting import _chain_rows, _class_cotangents, _patches, _structured_layers
    from ntkviz.data import load_dataset
    from ntkviz.models import build_model
    from ntkviz.training import TrainConfig, train

    data = load_dataset("mnist")
    model = build_model("lenet", seed=0).train()
    # benchmark.py's row (8) trains on 211 batches of 64; enough epochs for every round
    epochs = 1 + (2 * args.rounds * 155) // 211
    config = TrainConfig(train_size=211 * 64, epochs=epochs, batch_size=64, eval_every=10**9)
    run = train(copy.deepcopy(model), data, config)

    chain, (conv1, conv2, *_) = _structured_layers(model)
    x = data.train.x[:64]
    with torch.no_grad():  # each trainable layer's input; its output gradients (any values)
        acts = [x]
        for _, layer in chain:
            acts.append(layer(acts[-1]))
    trainable = [k for k, (_, layer) in enumerate(chain) if list(layer.parameters())]
    inputs = [acts[k] for k in trainable]
    grads = [torch.randn_like(acts[k + 1]) for k in trainable]
    (a0, a1, *a_lin), (d1, d2, *d_lin) = inputs, [g.flatten(2) if g.ndim > 2 else g for g in grads]

    def linear_terms(w):  # the Linear layers' terms: (g_o·g_b)(a_o·a_b + 1), factored
        for a, d in zip(a_lin, d_lin):
            (d[:w] @ d.T) * (a[:w] @ a.T + 1)

    v1 = torch.randn_like(conv1.weight), torch.randn_like(conv2.weight)

    def filter_convolutions():  # one watched example: the batch convolved with v_o as filters
        for a, d, layer, v in ((a0, d1, conv1, v1[0]), (a1, d2, conv2, v1[1])):
            t = F.conv2d(a, v, None, layer.stride, layer.padding)
            (t.flatten(2) * d).sum((1, 2))
        linear_terms(1)

    v16 = torch.randn(16, conv1.weight.numel()), torch.randn(16, conv2.weight.numel())

    def per_example_weights():  # several: the batch's per-example weight gradients, then Grams
        for a, d, layer, v in ((a0, d1, conv1, v16[0]), (a1, d2, conv2, v16[1])):
            v @ torch.bmm(d, _patches(layer, a).transpose(1, 2)).flatten(1).T
        linear_terms(16)

    print(f"LeNet, batch 64, {args.threads} thread(s); medians of {args.rounds} rounds, each "
          "timing the plain step and the parts in turn (the shared machine's load varies)")  # fmt: skip
    for w, convs, label in (
        (1, filter_convolutions, "the batch convolved with v_o as filters, and Linear terms"),
        (16, per_example_weights, "the batch's per-example conv weights and Grams, Linear terms"),
    ):
        xw, classes = data.test.x[:w], data.test.y[:w]

        def watched_rows(xw=xw, classes=classes):  # forward and pull-back of e_c − π
            return _chain_rows(chain, xw, _class_cotangents(classes))

        rounds = []
        for _ in range(args.rounds):
            plain = median_ms(lambda: next(run), 150, 5)
            with torch.no_grad():
                conv = median_ms(convs, 150)
                rows = median_ms(watched_rows, 150)
            rounds.append((plain, conv, rows, plain / (plain + conv + rows)))
        plain, conv, rows, bound = (statistics.median(r[k] for r in rounds) for k in range(4))
        low, high = min(r[3] for r in rounds), max(r[3] for r in rounds)
        print(
            f"{w:2d} watched: plain step {plain:.3f} ms; {label} {conv:.3f} ms; the watched "
            f"forward and pull-back {rows:.3f} ms -> at most {bound:.3f}x unwatched "
            f"(rounds: {low:.3f}–{high:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
