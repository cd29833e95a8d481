"""The ``ntkviz`` command: the desktop app by default, and headless subcommands.

Exit codes: 0 ok, 2 bad arguments, 1 failure. Messages go to stderr; user errors never print a
traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

EPILOG = "Run 'ntkviz COMMAND --help' for a command's options. Without a command the app opens."


FIGURES = ("decomposition", "preview", "trajectory")


class _UsageError(Exception):
    """Bad arguments: exit code 2."""


DATASET_HELP = (
    "a dataset by name — mnist (shipped), fashion-mnist, kmnist, emnist-letters, cifar10, "
    "cifar100, svhn — or a directory of images: DIR/<class>/*.png (a sixth held out as the test "
    "split) or DIR/train/<class>/… and DIR/test/<class>/… (default mnist)"
)


def _add_data_args(p) -> None:
    p.add_argument("--dataset", default="mnist", metavar="NAME_OR_DIR", help=DATASET_HELP)
    p.add_argument("--data-dir", help="where named datasets' files are (default: the ntkviz cache)")
    p.add_argument(
        "--download", action="store_true", help="let torchvision download a named dataset"
    )


#: Most steps of an exported trajectory (each is a real step on a copy of the model).
MAX_STEPS = 1000


def _step_size(text: str) -> float:
    """``--lr`` of decompose, export and demo: a finite number > 0 (argparse: exit code 2)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _device_name(text: str) -> str:
    """``--device``: auto, cpu, mps, cuda or cuda:N (argparse: exit code 2; one that this machine
    lacks is a failure later, exit code 1)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text.strip().lower()


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model; write a checkpoint and/or the exact account of every step",
        description="Train a model. With --watch and --accounts, every optimizer step is "
        "accounted for exactly on the watched examples: Δlog π split into one gradient term "
        "per batch example, the momentum (history) term, the weight-decay term and the residual, "
        "and the run's most helpful and harmful training examples.",
    )
    p.add_argument("--out", help="checkpoint file to write (.pt)")
    p.add_argument(
        "--model",
        default="lenet",
        metavar="NAME_OR_PATH:FACTORY",
        help="lenet, mlp, resnet8, resnet20 or vit (built for the data's image shape; default "
        "lenet), or your own model: a callable returning an nn.Module, in a .py file or an "
        "importable module (e.g. my_models.py:build; this runs that code)",
    )
    p.add_argument(
        "--weights",
        help="start from these weights: a state dict file (torch.save) or an ntkviz checkpoint; "
        "read without running code",
    )
    _add_data_args(p)
    p.add_argument(
        "--paper", action="store_true", help="the paper's setting: 2,000 images, lr 1e-3, 50 epochs"
    )
    p.add_argument("--train-size", type=int, help="training examples (default: all)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), help="default sgd")
    p.add_argument("--nesterov", action="store_true", help="Nesterov momentum (sgd)")
    p.add_argument("--betas", help="Adam's β₁,β₂ (default 0.9,0.999)")
    p.add_argument("--eps", type=float, help="Adam's ε (default 1e-8)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", type=_device_name, help="auto, cpu, cuda or mps (default auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--watch",
        help="comma-separated indices of examples to account for at every step, e.g. 7,16 "
        "(indices into the TEST split unless --watch-split train)",
    )
    p.add_argument("--watch-split", default="test", choices=("test", "train"))
    p.add_argument(
        "--accounts",
        action="append",
        help="write the per-step accounts and the run's rankings of the watched examples: .npz "
        "(everything) or .csv (one row per step and watched example, at its label); repeatable",
    )


def _add_pair_args(p) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint written by 'ntkviz train'")
    source.add_argument(
        "--model",
        metavar="PATH_OR_MODULE:FACTORY",
        help="your own model instead of a checkpoint: a callable returning an nn.Module, in a .py "
        "file or an importable module (e.g. my_models.py:build); this runs that code. A registry "
        "name (lenet, mlp, …) is built for the data's image shape",
    )
    p.add_argument(
        "--weights",
        help="with --model: a state dict file (torch.save) or an ntkviz checkpoint to load; "
        "read without running code",
    )
    p.add_argument("--xu", type=int, required=True, help="index of x_u")
    p.add_argument("--xu-split", default="train", choices=("train", "test"))
    p.add_argument("--xo", type=int, required=True, help="index of x_o")
    p.add_argument("--xo-split", default="test", choices=("train", "test"))
    p.add_argument("--yu", type=int, help="class to update on (default: x_u's label)")
    p.add_argument("--lr", type=_step_size, default=0.1, help="learning rate η of the step")
    p.add_argument("--loss", default="ce", choices=("ce", "neg"), help="ce: learn y_u; neg: ascent")
    _add_data_args(p)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ntkviz",
        description="See how one SGD step on x_u moves the predictions on x_o: "
        "Δlog π(x_o) = −η·A(x_o)·K(x_o,x_u)·G(x_u,y_u) + O(η²).",
        epilog=EPILOG,
    )
    from ntkviz import __version__

    parser.add_argument("--version", action="version", version=f"ntkviz {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("gui", help="open the desktop app (the default)")
    _add_train(sub)
    p = sub.add_parser("decompose", help="decompose one update; print it and write JSON/NPZ/CSV")
    _add_pair_args(p)
    p.add_argument("--out", action="append", help="result file: .json, .npz or .csv (repeatable)")
    p = sub.add_parser("export", help="export a figure of the app (PNG/SVG) and the data")
    _add_pair_args(p)
    p.add_argument("--out", required=True, action="append", help=".png .svg .json .npz .csv")
    p.add_argument(
        "--figure",
        choices=FIGURES,
        default="decomposition",
        help="what .png/.svg outputs show: the decomposition view (A, K, G, Δ), the predicted vs "
        "actual bars, or π(x_o) over --steps steps on (x_u, y_u) (default: decomposition); "
        ".json/.npz/.csv outputs hold the decomposition's numbers, or with trajectory π(x_o) and "
        "π(x_u) at every step",
    )
    p.add_argument("--steps", type=int, help="steps of the trajectory (default 10)")
    p.add_argument("--log", action="store_true", help="trajectory of log π instead of π")
    p.add_argument("--width", type=int, default=1600, help="PNG width in pixels")
    p = sub.add_parser(
        "demo", help="train briefly, then decompose a 4→9 update (other data: class 0→last; no GUI)"
    )
    p.add_argument("--lr", type=_step_size, default=0.5, help="η of the step decomposed")
    _add_data_args(p)
    return parser


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a line per 10 % otherwise."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last = -1.0

    def __call__(self, record) -> None:
        done = record.step / record.total_steps
        now = time.perf_counter()
        final = record.step == record.total_steps
        if self.tty and now - self.last < 0.1 and not final:
            return
        if not self.tty and int(10 * done) == int(10 * self.last) and not final:
            return
        self.last = now if self.tty else done
        rate = record.step / max(1e-9, now - self.started)
        eta = (record.total_steps - record.step) / max(rate, 1e-9)
        acc = f" test acc {record.test_accuracy:.3f}" if record.test_accuracy is not None else ""
        line = (
            f"[{'#' * int(30 * done):<30}] {record.step}/{record.total_steps} "
            f"loss {record.loss:.4f}{acc} ETA {eta:4.0f}s"
        )
        sys.stderr.write(f"\r{line}" if self.tty else f"{line}\n")
        if self.tty and final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _train_config(args):
    from ntkviz.training import TrainConfig

    base = TrainConfig.paper() if args.paper else TrainConfig()
    overrides = {
        k: v
        for k, v in {
            "model": args.model,
            "train_size": args.train_size,
            "epochs": args.epochs,
            "lr": args.lr,
            "momentum": args.momentum,
            "weight_decay": args.weight_decay,
            "optimizer": args.optimizer,
            "nesterov": args.nesterov or None,
            "betas": _floats(args.betas, "--betas") if args.betas else None,
            "eps": args.eps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "device": args.device,
        }.items()
        if v is not None
    }
    config = replace(base, **overrides)
    try:
        config.validate()
    except ValueError as e:
        raise _UsageError(_as_options(str(e))) from None
    return config


#: TrainConfig's words for its settings (its messages begin with one) and this CLI's options
_OPTIONS = {
    "train_size": "--train-size",
    "batch_size": "--batch-size",
    "learning rate": "--lr",
    "weight decay": "--weight-decay",
    "epochs": "--epochs",
    "momentum": "--momentum",
    "seed": "--seed",
    "optimizer": "--optimizer",
    "nesterov": "--nesterov",
    "betas": "--betas",
    "eps": "--eps",
}


def _as_options(message: str) -> str:
    """A TrainConfig message in this CLI's terms: ``--train-size must be ≥ 1``, not
    ``train_size must be ≥ 1 or None``."""
    for words, option in _OPTIONS.items():
        if message.startswith(words + " "):
            return option + message[len(words) :].replace(" or None", "")
    return message


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise _UsageError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _watch_indices(text: str) -> list[int]:
    try:
        indices = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        indices = []
    if not indices:
        raise _UsageError(f"--watch must be comma-separated indices, got {text!r}")
    return indices


def _check_outputs(args) -> None:
    if not args.out and not args.accounts:
        raise _UsageError("give --out (a checkpoint), --accounts (with --watch), or both")
    if bool(args.watch) != bool(args.accounts):
        raise _UsageError("--watch and --accounts go together")
    paths = [("--out", Path(args.out))] if args.out else []
    paths += [("--accounts", Path(p)) for p in args.accounts or []]
    if len({p.resolve() for _, p in paths}) < len(paths):
        raise _UsageError("--out and each --accounts must name different files")
    for option, path in paths:
        _check_out(path, option)
    for path in map(Path, args.accounts or []):
        if path.suffix.lower() not in (".npz", ".csv"):
            raise _UsageError(f"--accounts {path}: use .npz or .csv")


def _print_run(run, indices, split) -> None:
    """Per watched example: the run's total Δlog π(label), its split, and the top examples."""
    totals = run.totals()
    for w, (i, c) in enumerate(zip(indices, run.classes)):
        terms = ", ".join(f"{k} {totals[k][w, c]:+.4f}" for k in totals if k != "actual")
        top = run.top(w, 3)
        print(
            f"{split}[{i}] (class {c}): Δlog π = {totals['actual'][w, c]:+.4f} = {terms}; most "
            f"helpful train {top.helpful.tolist()}, most harmful {top.harmful.tolist()}"
        )


def _check_out(out: Path, option: str = "--out") -> None:
    """Refuse an output file that cannot be written (exit code 2) before any work is done."""
    from ntkviz.files import check_writable

    try:
        check_writable(out)
    except OSError as e:
        raise _UsageError(f"{e}; choose another {option}") from None


def _fallback_paths(out: Path) -> list[Path]:
    """Where a finished run goes when ``out`` cannot be written: beside it, then in the cache,
    then in the temporary directory; each name carries the time."""
    import tempfile

    from ntkviz.data import default_cache_dir

    name = f"{out.stem}-{time.strftime('%Y%m%d-%H%M%S')}{out.suffix or '.pt'}"
    return [
        out.with_name(name),
        default_cache_dir() / "runs" / name,
        Path(tempfile.gettempdir()) / "ntkviz-runs" / name,
    ]


def _save_run(out: Path, save) -> int:
    """``save(path)`` the trained model to ``out``; when that fails, to the first fallback that
    works, saying where (exit code 1). Never loses the run silently."""
    try:
        save(out)
        return 0
    except OSError as e:
        failure = e
    tried = []
    for path in _fallback_paths(out):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        print(
            f"ntkviz train: {failure}\nntkviz train: the trained model was saved to {path} "
            "instead; move it where you want it",
            file=sys.stderr,
        )
        return 1
    print(
        f"ntkviz train: {failure}\nntkviz train: the trained model could not be saved anywhere "
        f"else either: {'; '.join(tried)}",
        file=sys.stderr,
    )
    return 1


def _check_dataset(args) -> None:
    """Refuse an unknown dataset name or a missing directory (exit code 2) before any work."""
    from ntkviz.data import resolve_dataset
    from ntkviz.errors import DatasetError

    try:
        resolve_dataset(args.dataset)
    except DatasetError as e:
        raise _UsageError(str(e)) from None


def _load_data(args):
    from ntkviz.data import load_dataset

    return load_dataset(args.dataset, args.data_dir, download=args.download)


def _registry_model(name: str, data, seed: int | None):
    """The registry model ``name`` built for ``data``'s image shape and classes."""
    from ntkviz.checkpoint import build_for

    try:
        return build_for(name, data.num_classes, data.input_shape, seed)
    except ValueError as e:
        raise _UsageError(f"{name} cannot be used on {data.name}: {e}") from None


def _registry_name(model: str) -> bool:
    """Whether ``model`` names a registry model (else it is the user's PATH_OR_MODULE:FACTORY;
    a name that is neither: usage error)."""
    from ntkviz.models import MODELS

    if model in MODELS:
        return True
    if ":" not in model:
        raise _UsageError(
            f"unknown model {model!r}; choose one of {', '.join(MODELS)}, or give your own "
            "as PATH_OR_MODULE:FACTORY (e.g. my_models.py:build)"
        )
    return False


def _check_on_data(model, data, name: str) -> None:
    """One forward pass on two test examples: the model must take the data's images and return
    one logit per class (ModelError, exit code 1, otherwise)."""
    from ntkviz.modelspec import check_model

    check_model(model, data.test.x[:2], data.num_classes, name=name)


def cmd_train(args) -> int:
    from ntkviz.checkpoint import save_checkpoint
    from ntkviz.errors import TrainingDiverged
    from ntkviz.training import accuracy, resolve_device, run_health, train

    config = _train_config(args)
    custom = not _registry_name(config.model)
    _check_outputs(args)
    _check_dataset(args)
    indices = _watch_indices(args.watch) if args.watch else []
    device = resolve_device(config.device)
    if custom:
        from ntkviz.modelspec import load_model_spec

        model = load_model_spec(config.model, args.weights)
    data = _load_data(args)
    if not custom:
        model = _registry_model(config.model, data, config.seed)
        if args.weights:
            from ntkviz.modelspec import load_weights

            load_weights(model, args.weights, config.model)
    _check_on_data(model, data, config.model)
    if config.train_size is not None and config.train_size > len(data.train):
        n = len(data.train)
        print(
            f"ntkviz train: note: --train-size {config.train_size} is more than {data.name}'s "
            f"{n:,} training images; training on all {n:,} (recorded as --train-size {n})",
            file=sys.stderr,
        )
        config = replace(config, train_size=n)
    watch = run = None
    if args.watch:
        from ntkviz import __version__
        from ntkviz.accounting import Watch
        from ntkviz.run_account import RunAccount

        split = data.split(args.watch_split)
        if not all(0 <= i < len(split) for i in indices):
            raise _UsageError(
                f"--watch indices must be in the {args.watch_split} split (0..{len(split) - 1})"
            )
        labels = [int(split.y[i]) for i in indices]
        watch = Watch(split.x[indices], tuple(labels), focus=tuple(range(len(indices))))
        meta = {  # the app's keys (watched, class_names, started_at), and the split's own
            "watched": [[args.watch_split, i] for i in indices],
            "watch_split": args.watch_split,
            "watch_indices": indices,
            "watch_labels": labels,
            "classes": "the watched examples' labels",
            "class_names": list(data.classes),
            "dataset": data.name,
            "config": config.to_dict(),
            "started_at": 0,
            "ntkviz_version": __version__,
        }
        run = RunAccount(labels, len(data.train), data.num_classes, keep_steps=True, meta=meta)
    model = model.to(device)
    progress = _Progress()
    last = failure = None
    losses = []
    records = train(model, data, config, watch=watch)  # bad settings raise here: exit code 2
    try:
        for record in records:
            last = record
            losses.append(record.loss)
            if run is not None:
                run.add(record.account, record.batch_indices, record.step)
            if not args.quiet:
                progress(record)
    except Exception as e:  # it diverged, ran out of memory, or the model raised
        steps = last.step if last else 0
        failure = str(e) if isinstance(e, TrainingDiverged) else (
            f"training stopped at step {steps + 1}: {type(e).__name__}: {e}"
        )  # fmt: skip
        if last is None:
            kept = "no step was completed"
        elif steps == 1:
            kept = "the step before it is kept"
        else:
            kept = f"the {steps} steps before it are kept"
        print(f"ntkviz train: {failure}; {kept}", file=sys.stderr)
        if last is None:
            return 1
    model.cpu()
    try:
        test_acc = accuracy(model, data.test.x, data.test.y)
    except RuntimeError as e:
        test_acc = None
        print(f"ntkviz train: the test accuracy could not be computed: {e}", file=sys.stderr)
    steps = last.step if last else 0
    meta = {"step": steps, "test_accuracy": test_acc, "dataset": data.name}
    if failure:
        meta["stopped"] = failure
    health = run_health(losses, test_acc, data.num_classes) if losses else None
    if failure is None and health is not None and not health.ok:
        print(f"ntkviz train: warning: {health.warning}", file=sys.stderr)
    acc_text = "unknown" if test_acc is None else f"{test_acc:.4f}"
    print(f"test accuracy {acc_text} after {steps} step{'' if steps == 1 else 's'}")
    code = 0 if failure is None else 1
    if run is not None:
        if failure:
            run.meta["stopped"] = failure
        _print_run(run, indices, args.watch_split)
    saves = [(Path(p), run.save) for p in args.accounts or []]
    if args.out:

        def save_model(path):
            save_checkpoint(path, model, config.model, config, meta,
                            input_shape=data.input_shape, custom=custom,
                            num_classes=data.num_classes)  # fmt: skip

        saves.append((Path(args.out), save_model))
    for path, save in saves:  # a write that fails keeps the run beside it (exit code 1)
        if failure and path.exists():  # a stopped run does not replace an earlier file
            path = path.with_name(f"{path.stem}.stopped{path.suffix}")
        failed = _save_run(path, save)
        code = max(code, failed)
        if not failed:
            print(f"wrote {path}")
    return code


def _pick(data, split: str, index: int, what: str):
    s = data.split(split)
    if not 0 <= index < len(s):
        raise _UsageError(f"{what} index {index} is outside the {split} split (0..{len(s) - 1})")
    return s.x[index], int(s.y[index])


def _check_indices(args) -> None:
    """Refuse --xu, --xo and --yu outside the dataset before it is loaded, where its sizes are
    known (the shipped MNIST, whose files are verified); other datasets are checked after."""
    from ntkviz.data import DATASETS, SPLIT_SIZES, dataset_key

    key = dataset_key(args.dataset)
    sizes = SPLIT_SIZES.get(key)
    for what, split, index in (("--xu", args.xu_split, args.xu), ("--xo", args.xo_split, args.xo)):
        if index < 0 or (sizes is not None and index >= sizes[split]):
            top = f"0..{sizes[split] - 1}" if sizes is not None else "0 or more"
            raise _UsageError(f"{what} index {index} is outside the {split} split ({top})")
    if args.yu is not None and key in DATASETS and DATASETS[key].classes is not None:
        classes = len(DATASETS[key].classes)
        if not 0 <= args.yu < classes:
            raise _UsageError(f"--yu must be a class in 0..{classes - 1}, got {args.yu}")


def _pair_from_args(args):
    """The model (a checkpoint's, or --model/--weights), x_o, x_u, y_u and the export metadata
    the arguments name."""
    from ntkviz.checkpoint import load_checkpoint

    if args.lr != args.lr or args.lr in (float("inf"), float("-inf")):
        raise _UsageError(f"--lr must be finite, got {args.lr}")
    _check_indices(args)  # before the checkpoint and the dataset are loaded
    _check_dataset(args)
    if args.weights and not args.model:
        raise _UsageError("--weights goes with --model (a checkpoint holds its own weights)")

    registry = bool(args.model) and _registry_name(args.model)
    if args.model:
        from ntkviz.modelspec import load_model_spec

        model = None if registry else load_model_spec(args.model, args.weights)
        source = {"model": args.model, "weights": args.weights}
    else:
        ckpt = load_checkpoint(args.checkpoint)
        model = ckpt.model
        source = {
            "model": ckpt.model_name,
            "training_step": ckpt.metadata.get("step"),
            "seed": ckpt.config.seed,
            "checkpoint": str(args.checkpoint),
        }
    data = _load_data(args)
    if not args.model and ckpt.input_shape != data.input_shape:
        from ntkviz.errors import ModelError

        shapes = "×".join(map(str, ckpt.input_shape)), "×".join(map(str, data.input_shape))
        raise ModelError(
            f"the checkpoint's {ckpt.model_name} was built for {shapes[0]} images; {data.name}'s "
            f"are {shapes[1]}"
        )
    if registry:  # a registry name with --model: built for the data, with --weights if given
        model = _registry_model(args.model, data, seed=0)
        if args.weights:
            from ntkviz.modelspec import load_weights

            load_weights(model, args.weights, args.model)
    _check_on_data(model, data, args.model or ckpt.model_name)
    x_u, label_u = _pick(data, args.xu_split, args.xu, "--xu")
    x_o, label_o = _pick(data, args.xo_split, args.xo, "--xo")
    y_u = label_u if args.yu is None else args.yu
    if not 0 <= y_u < data.num_classes:
        raise _UsageError(f"--yu must be a class in 0..{data.num_classes - 1}, got {y_u}")
    meta = {
        "x_u": {"split": args.xu_split, "index": args.xu, "label": label_u},
        "x_o": {"split": args.xo_split, "index": args.xo, "label": label_o},
        "y_u": y_u,
        "lr": args.lr,
        "loss": args.loss,
        **source,
    }
    meta["dataset"] = data.name
    meta["classes"] = list(data.classes)
    args.classes = data.classes
    return model, x_o, x_u, y_u, meta


def format_decomposition(dec, classes=None) -> str:
    """A plain-text table of one decomposition, one row per class."""
    V = len(dec.G)
    classes = classes or [str(i) for i in range(V)]
    lines = [
        f"η = {dec.lr:g}, loss = {dec.loss}, y_u = {dec.y_u}; relative residual "
        f"‖actual − predicted‖/‖actual‖ = {dec.relative_residual:.3g}",
        f"{'class':>6} {'π before':>9} {'π after':>9} {'G':>9} {'Δz pred':>10} {'Δz actual':>10} "
        f"{'Δlogπ pred':>11} {'Δlogπ act':>11} {'residual':>10}",
    ]
    for i in range(V):
        lines.append(
            f"{classes[i]:>6} {dec.probs_before[i]:9.4f} {dec.probs_after[i]:9.4f} {dec.G[i]:9.4f} "
            f"{dec.delta_logits_predicted[i]:10.5f} {dec.delta_logits_actual[i]:10.5f} "
            f"{dec.predicted[i]:11.5f} {dec.actual[i]:11.5f} {dec.residual[i]:10.2e}"
        )
    return "\n".join(lines)


def cmd_decompose(args) -> int:
    from ntkviz.results import FORMATS, write_decomposition

    outs = args.out or []
    for out in outs:
        if Path(out).suffix.lower() not in FORMATS:
            raise _UsageError(f"--out must end in one of {', '.join(FORMATS)}, got {out}")
        _check_out(Path(out))
    from ntkviz.decomposition import decompose

    model, x_o, x_u, y_u, meta = _pair_from_args(args)
    dec = decompose(model, x_o, x_u, y_u, args.lr, args.loss)
    print(format_decomposition(dec, list(args.classes)))
    for out in outs:
        write_decomposition(dec, out, meta)
        print(f"wrote {out}")
    return 0


def cmd_export(args) -> int:
    from ntkviz.results import FORMATS

    figure = (".png", ".svg")
    for out in args.out:
        if Path(out).suffix.lower() not in FORMATS + figure:
            raise _UsageError(f"--out {out}: use .png, .svg, .json, .npz or .csv")
    if args.figure != "trajectory" and (args.steps is not None or args.log):
        print("ntkviz export: --steps and --log apply to --figure trajectory only", file=sys.stderr)
    args.steps = 10 if args.steps is None else args.steps
    if not 1 <= args.steps <= MAX_STEPS:
        raise _UsageError(f"--steps must be in 1..{MAX_STEPS}, got {args.steps}")
    for out in args.out:
        _check_out(Path(out))
    from ntkviz.decomposition import decompose, step_trajectory

    model, x_o, x_u, y_u, meta = _pair_from_args(args)
    dec = decompose(model, x_o, x_u, y_u, args.lr, args.loss)
    trajectory = None
    if args.figure == "trajectory":
        trajectory = step_trajectory(model, x_o, x_u, y_u, args.lr, args.steps, args.loss)
    for out in args.out:
        if Path(out).suffix.lower() in figure:
            from ntkviz.gui import export

            if args.figure == "decomposition":
                export.export_decomposition_figure(dec, out, width=args.width, meta=meta)
            elif args.figure == "preview":
                export.export_preview_figure(dec, out, width=args.width, meta=meta)
            else:
                export.export_trajectory_figure(trajectory, out, args.width, meta, args.log)
        elif trajectory is not None:  # the trajectory's numbers
            from ntkviz.results import write_trajectory

            write_trajectory(trajectory, out, meta)
        else:
            from ntkviz.results import write_decomposition

            write_decomposition(dec, out, meta)
        print(f"wrote {out}")
    return 0


def cmd_demo(args) -> int:
    from ntkviz.decomposition import decompose
    from ntkviz.training import TrainConfig, accuracy, train

    _check_dataset(args)
    data = _load_data(args)
    config = TrainConfig(epochs=1)
    model = _registry_model("lenet", data, seed=0)
    progress = _Progress()
    for record in train(model, data, config):
        progress(record)
    print(f"LeNet test accuracy {accuracy(model, data.test.x, data.test.y):.4f}")
    c_u, c_o = (4, 9) if data.num_classes >= 10 else (0, data.num_classes - 1)
    train_of, test_of = (data.train.y == c_u).nonzero(), (data.test.y == c_o).nonzero()
    if not len(train_of) or not len(test_of):
        raise _UsageError(f"{data.name} has no training example of class {c_u} or no test "
                          f"example of class {c_o}")  # fmt: skip
    u, o = int(train_of[0, 0]), int(test_of[0, 0])
    names = data.classes
    print(
        f"x_u = train[{u}] (a {names[c_u]}), y_u = {names[c_u]}; x_o = test[{o}] (a {names[c_o]}); "
        f"one SGD step, η = {args.lr}"
    )
    dec = decompose(model, data.test.x[o], data.train.x[u], c_u, args.lr)
    print(format_decomposition(dec, list(names)))
    return 0


def cmd_gui(argv: list[str]) -> int:
    """Run the desktop app, then end the process at once: when the window closes, the engine's
    thread has stopped and every file is written; what is left is Python's teardown of PyTorch
    (1–2 s of unloading its libraries), which the user need not wait for."""
    try:
        from ntkviz.gui.app import no_display, run
    except ImportError as e:
        print(f"ntkviz: the desktop app is not available ({e})", file=sys.stderr)
        return 1
    if why := no_display():  # Qt would abort the process
        print(f"ntkviz: the desktop app cannot start: {why}", file=sys.stderr)
        return 1
    code = run(argv)
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # torch's own deprecation notice (torch.func reaches torch.jit.script), not the user's to act on
    warnings.filterwarnings("ignore", r".*torch\.jit\.script.* is deprecated", FutureWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    commands = {"train": cmd_train, "decompose": cmd_decompose, "export": cmd_export}
    commands["demo"] = cmd_demo
    from ntkviz.errors import NtkvizError

    try:
        if args.command in (None, "gui"):
            return cmd_gui([sys.argv[0], *argv[1:]] if args.command else [sys.argv[0]])
        return commands[args.command](args)
    except _UsageError as e:
        print(f"ntkviz {args.command}: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"ntkviz {args.command}: {e}", file=sys.stderr)
        return 2
    except (NtkvizError, OSError) as e:
        print(f"ntkviz {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    except Exception as e:  # a bug, or a model that fails in a way no check foresaw
        if os.environ.get("NTKVIZ_DEBUG"):
            raise
        print(
            f"ntkviz {args.command}: unexpected error: {type(e).__name__}: {e} "
            "(NTKVIZ_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
