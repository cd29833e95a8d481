"""A run's accounts, accumulated: who moved each watched x_o over the whole run.

:class:`RunAccount` adds up the account of every step (the trainer's
:class:`~ntkviz.accounting.WatchAccount` or a :class:`~ntkviz.accounting.StepAccount`): per watched
example the running sum of every term ``(W, V)``; per training example (its index in the training
split) the summed gradient-term contribution to Δlog π of the watched example's chosen class ``(W,
N_train)``; per class of training example the summed gradient terms ``(W, C, V)``. The most helpful
and most harmful training examples of the run are then exact sums of exact per-step terms (up to the
recorded residual), not an estimate made after training. Memory is bounded by these arrays; with
``keep_steps`` it also keeps the per-step (W, V) terms and (W, B) contributions (a timeline).

A :class:`~ntkviz.accounting.WatchAccount` holds the other classes' terms only for its focused
examples: for the others, the entries of the other classes (and their logit-level terms, except
``actual``) are NaN in the totals, ``by_class`` and the timeline. ``by_example``, the rankings,
``actual`` and everything at each example's own class are always complete.

Saved as NPZ (``np.load(path, allow_pickle=False)`` reads it; metadata as JSON in ``meta_json``) or
the timeline as CSV.
"""

from __future__ import annotations

import csv
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ntkviz.accounting import StepAccount, WatchAccount
from ntkviz.arrays import readonly
from ntkviz.checks import count
from ntkviz.errors import FileReadError
from ntkviz.files import atomic_write, write_npz

FORMAT = "ntkviz-run-account"
CSV_HEADER = "# ntkviz run account"  #: how a CSV export begins
VERSION = 2  #: 2: the statistics term (files of version 1 read it as zeros)
#: The (W, V) terms accumulated, at the log-probability level (and the logit level, ``dz_``).
TERMS = StepAccount.TERMS
#: Number of top helpful / harmful training examples written to files.
TOP_K = 10


@dataclass(frozen=True)
class Ranking:
    """The training examples that raised (``helpful``) and lowered (``harmful``) log π of a
    watched example's class the most over the run: indices into the training split ``(k,)`` int64,
    best first, with their summed contributions ``(k,)`` float64 (nats). Only examples with a
    positive (helpful) or negative (harmful) sum appear, so either may hold fewer than k."""

    helpful: np.ndarray
    helpful_values: np.ndarray
    harmful: np.ndarray
    harmful_values: np.ndarray


class RunAccount:
    """Running sums of a run's step accounts for W watched examples.

    ``classes (W,)``: the class whose log π each watched example's per-example contributions follow
    (e.g. its label); ``num_train``: the size of the training split the batch indices point into;
    ``num_classes``: classes of the training examples (C; default: the models' V at the first
    :meth:`add`). ``keep_steps``: also keep the per-step timeline (about ``8·(14·W·V + (W+2)·B)``
    bytes a step). ``meta``: plain values written with the account (indices, model, seed …).
    """

    def __init__(
        self,
        classes: Sequence[int],
        num_train: int,
        num_classes: int | None = None,
        *,
        keep_steps: bool = False,
        meta: dict | None = None,
    ):
        classes = np.asarray(classes)
        if classes.ndim != 1 or len(classes) == 0 or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"classes must be a non-empty list of ints, got {classes!r}")
        if (classes < 0).any():
            raise ValueError(f"classes must be ≥ 0, got {classes.tolist()}")
        if num_train < 1 or (num_classes is not None and num_classes < 1):
            raise ValueError("num_train and num_classes must be ≥ 1")
        self.classes = readonly(classes.astype(np.int64))
        self.num_train = int(num_train)
        self.num_classes = num_classes
        self.keep_steps = keep_steps
        self.meta = dict(meta or {})
        self.steps = 0
        W = len(classes)
        self._by_example = np.zeros((W, self.num_train))
        self._by_class: np.ndarray | None = None
        self._totals: dict[str, np.ndarray] = {}
        self._timeline: dict[str, list] = {}

    @property
    def watched(self) -> int:
        return len(self.classes)

    def add(
        self, account: StepAccount | WatchAccount, batch_indices, step: int | None = None
    ) -> None:
        """Add one step's account; ``batch_indices (B,)``: the batch's indices into the training
        split (``TrainRecord.batch_indices``); ``step``: its step number (default: a count). A
        :class:`~ntkviz.accounting.WatchAccount` must follow this run account's classes."""
        W, B = account.contributions.shape
        V = account.probs_before.shape[1]
        idx = np.asarray(batch_indices)
        if self.watched != W:
            raise ValueError(
                f"the account has {W} watched examples, this run account {self.watched}"
            )
        watch = isinstance(account, WatchAccount)
        if watch and not np.array_equal(account.classes, self.classes):
            raise ValueError(
                f"the account follows classes {account.classes.tolist()}, this run account "
                f"{self.classes.tolist()}"
            )
        if idx.shape != (B,) or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"batch_indices must be {B} ints, got shape {idx.shape}")
        if B and not (idx.min() >= 0 and idx.max() < self.num_train):
            raise ValueError(f"batch_indices must be in [0, {self.num_train})")
        if self.classes.max() >= V:
            raise ValueError(f"classes must be < V = {V}, got {self.classes.tolist()}")
        labels = account.batch_labels
        if self._by_class is None:
            self.num_classes = self.num_classes or V
            self._by_class = np.zeros((W, self.num_classes, V))
            for name in TERMS:
                self._totals[name] = np.zeros((W, V))
                self._totals["dz_" + name] = np.zeros((W, V))
        if B and labels.max() >= self.num_classes:
            raise ValueError(f"batch labels must be < num_classes = {self.num_classes}")

        if watch:
            contributions = account.contributions
            gradient = np.full((W, B, V), np.nan)  # known: each one's class, focused ones whole
            gradient[np.arange(W), :, self.classes] = contributions
            if account.focused is not None:
                gradient[account.focus] = account.focused.gradient
        else:
            gradient = account.gradient
            contributions = gradient[np.arange(W), :, self.classes]  # (W, B)
        np.add.at(self._by_example, (slice(None), idx), contributions)
        np.add.at(self._by_class, (slice(None), labels), gradient)
        for logits in (False, True):
            prefix = "dz_" if logits else ""
            for name, value in account.terms(logits).items():
                self._totals[prefix + name] += value
        self.steps += 1
        if self.keep_steps:
            row = {
                "step": self.steps if step is None else int(step),
                "lr": account.lr,
                "loss": account.loss,
                "batch_indices": idx.astype(np.int64),
                "batch_labels": labels,
                "contributions": contributions,
                "probs_before": account.probs_before,
                "log_probs_before": account.log_probs_before,
            }
            for logits in (False, True):
                prefix = "dz_" if logits else ""
                row.update({prefix + k: v for k, v in account.terms(logits).items()})
            for key, value in row.items():
                self._timeline.setdefault(key, []).append(value)

    # ------------------------------------------------------------------ results (read-only copies)

    @property
    def by_example(self) -> np.ndarray:
        """``(W, N_train)``: per training example, its summed gradient-term contribution to
        Δlog π of each watched example's class over the run (nats)."""
        return readonly(self._by_example)

    @property
    def by_class(self) -> np.ndarray:
        """``(W, C, V)``: summed gradient terms (Δlog π) by class of the training example (C)
        and output class (V); zeros before the first step; NaN where not accounted (see the
        module's docstring)."""
        if self._by_class is None:
            return readonly(np.zeros((self.watched, self.num_classes or 0, 0)))
        return readonly(self._by_class)

    def totals(self, logits: bool = False) -> dict[str, np.ndarray]:
        """Per term (``TERMS``) its sum over the run ``(W, V)``, at the log-probability level or,
        with ``logits``, at the logit level. Empty before the first step."""
        prefix = "dz_" if logits else ""
        return {name: readonly(self._totals[prefix + name]) for name in TERMS if self._totals}

    def top(self, watched: int, k: int = TOP_K) -> Ranking:
        """The k most helpful and most harmful training examples of the run for watched example
        ``watched``; ties go to the lower index."""
        if not 0 <= watched < self.watched:
            raise ValueError(f"watched must be in [0, {self.watched}), got {watched}")
        if k < 0:
            raise ValueError(f"k must be ≥ 0, got {k}")
        v = self._by_example[watched]
        up = np.argsort(-v, kind="stable")[:k]
        up = up[v[up] > 0]
        down = np.argsort(v, kind="stable")[:k]
        down = down[v[down] < 0]
        return Ranking(
            readonly(up.astype(np.int64)),
            readonly(v[up]),
            readonly(down.astype(np.int64)),
            readonly(v[down]),
        )

    def timeline(self) -> dict[str, np.ndarray]:
        """The kept per-step records, stacked (S steps): ``step``, ``lr``, ``loss`` ``(S,)``;
        ``batch_indices``, ``batch_labels`` ``(S, B)`` int64 and ``contributions (S, W, B)``
        (a short last batch padded with index −1, label −1, contribution 0); ``probs_before``,
        ``log_probs_before`` (from the logits: finite where π underflows; from ``probs_before``
        in files written before it) and every term (``TERMS``, with ``dz_`` at the logit
        level) ``(S, W, V)``."""
        if not self.keep_steps:
            raise ValueError("this run account keeps no timeline (create it with keep_steps=True)")
        out = {}
        for key, rows in self._timeline.items():
            if key in ("batch_indices", "batch_labels", "contributions"):
                width = max(r.shape[-1] for r in rows)
                fill = 0.0 if key == "contributions" else -1
                pad = [
                    np.pad(
                        r,
                        [(0, 0)] * (r.ndim - 1) + [(0, width - r.shape[-1])],
                        constant_values=fill,
                    )
                    for r in rows
                ]
                out[key] = readonly(np.stack(pad))
            else:
                out[key] = readonly(np.array(rows))
        return out

    # ------------------------------------------------------------------ files

    def _arrays(self) -> dict[str, np.ndarray]:
        W = self.watched
        arrays = {
            "format": np.array(FORMAT),
            "version": np.array(VERSION),
            "meta_json": np.array(json.dumps(self.meta)),
            "classes": self.classes,
            "num_train": np.array(self.num_train),
            "num_classes": np.array(self.num_classes or 0),
            "steps": np.array(self.steps),
            "by_example": self._by_example,
            "by_class": self.by_class,
        }
        for logits in (False, True):
            for name, value in self.totals(logits).items():
                arrays[f"total_{'dz_' if logits else ''}{name}"] = value
        k = min(TOP_K, self.num_train)
        for kind in ("helpful", "harmful"):
            arrays[f"{kind}_index"] = np.full((W, k), -1, np.int64)
            arrays[f"{kind}_value"] = np.full((W, k), np.nan)
        for w in range(W):
            r = self.top(w, k)
            arrays["helpful_index"][w, : len(r.helpful)] = r.helpful
            arrays["helpful_value"][w, : len(r.helpful)] = r.helpful_values
            arrays["harmful_index"][w, : len(r.harmful)] = r.harmful
            arrays["harmful_value"][w, : len(r.harmful)] = r.harmful_values
        if self.keep_steps and self.steps:
            arrays.update({f"step_{k}": v for k, v in self.timeline().items()})
        return arrays

    def save(self, path: str | Path) -> Path:
        """Write the account atomically: ``.npz`` (everything: sums, rankings of the top
        ``TOP_K`` (index −1 / value NaN where fewer), and the timeline as ``step_*`` arrays when
        kept) or ``.csv`` (the timeline, one row per step and watched example, at its class; needs
        ``keep_steps``). Raises ``ValueError`` for another suffix, ``OSError`` when unwritable."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".npz":
            return write_npz(path, self._arrays())
        if suffix == ".csv":
            text = self._csv_text()
            return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        raise ValueError(f"unknown account format {path.suffix!r}; use .npz or .csv")

    def _csv_text(self) -> str:
        t = self.timeline()
        out = io.StringIO()
        out.write(
            f"{CSV_HEADER}: one row per step and watched example, the terms of Δlog π at its "
            "class (read with comment='#')\n"
        )
        for key, value in {"format": FORMAT, "version": VERSION, **self.meta}.items():
            out.write(f"# {key}: {json.dumps(value)}\n")
        w = csv.writer(out)
        w.writerow(["step", "lr", "loss", "watched", "class", "log_prob_before", *TERMS])
        for s in range(len(t.get("step", ()))):  # none yet: the header alone
            for i, c in enumerate(self.classes):
                values = [t[name][s, i, c] for name in TERMS]
                w.writerow(
                    [
                        int(t["step"][s]),
                        repr(float(t["lr"][s])),
                        repr(float(t["loss"][s])),
                        i,
                        int(c),
                        repr(float(t["log_probs_before"][s, i, c])),
                        *(repr(float(v)) for v in values),
                    ]
                )
        return out.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> RunAccount:
        """Read an account written by :meth:`save` (NPZ); :class:`~ntkviz.errors.FileReadError`
        (a ``ValueError``) names what is wrong."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                csv_export = f.read(len(CSV_HEADER)) == CSV_HEADER.encode()
        except OSError:
            csv_export = False
        if csv_export:
            raise FileReadError(
                f"{path} is the CSV export of a run account (its timeline, for other tools); "
                "ntkviz reads the .npz it saves"
            )
        try:
            f = np.load(path, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # one array (.npy), not an archive
                raise ValueError
            with f:
                arrays = {k: f[k] for k in f.files}
        except FileNotFoundError:
            raise FileReadError(f"{path}: no such file") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            raise FileReadError(
                f"{path} is not a readable ntkviz run account (damaged, or another kind of file)"
            ) from None
        if str(arrays.get("format", "")) != FORMAT:
            raise FileReadError(f"{path} is not an ntkviz run account")
        try:
            version = count(arrays.get("version", VERSION), "version")
        except ValueError as e:
            raise FileReadError(f"{path} is a damaged ntkviz run account: {e}") from None
        if version > VERSION:
            raise FileReadError(
                f"{path} has run-account format version {version}; this ntkviz reads up to "
                f"{VERSION} — upgrade it"
            )
        try:
            return cls._from_arrays(arrays)
        except (KeyError, ValueError, TypeError, IndexError) as e:
            what = f"no {e}" if isinstance(e, KeyError) else str(e)
            raise FileReadError(f"{path} is a damaged ntkviz run account: {what}") from None

    @classmethod
    def _from_arrays(cls, arrays: dict) -> RunAccount:
        """The account of a file's arrays, every one checked against the others (ValueError)."""
        timeline = {k[len("step_") :]: v for k, v in arrays.items() if k.startswith("step_")}
        classes = np.asarray(arrays["classes"])
        if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f"classes must be a list of ints, got {classes.dtype} {classes.shape}")
        meta = json.loads(str(arrays["meta_json"]))
        if not isinstance(meta, dict):
            raise ValueError("meta_json must hold a JSON object")
        num_classes = count(arrays["num_classes"], "num_classes")
        run = cls(
            classes,
            count(arrays["num_train"], "num_train"),
            num_classes or None,
            keep_steps=bool(timeline),
            meta=meta,
        )
        run.steps = count(arrays["steps"], "steps")
        W = run.watched
        run._by_example = _floats(arrays["by_example"], "by_example", (W, run.num_train))
        if run.steps:
            totals = {}
            for prefix in ("", "dz_"):
                for name in TERMS:
                    key = f"total_{prefix}{name}"
                    if name == "statistics" and key not in arrays:  # written before that term
                        continue
                    totals[prefix + name] = np.asarray(arrays[key])
            V = totals["actual"].shape[-1] if totals["actual"].ndim == 2 else 0
            for key, value in totals.items():
                run._totals[key] = _floats(value, f"total_{key}", (W, V))
            for prefix in ("", "dz_"):
                run._totals.setdefault(prefix + "statistics", np.zeros((W, V)))
            if V == 0 or classes.max() >= V:
                raise ValueError(f"classes must be < V = {V}, got {classes.tolist()}")
            C = run.num_classes or 0
            run._by_class = _floats(arrays["by_class"], "by_class", (W, C, V))
        _check_timeline(timeline, run)
        for prefix in ("", "dz_"):  # the statistics term, in a file written before it
            if prefix + "actual" in timeline and prefix + "statistics" not in timeline:
                timeline[prefix + "statistics"] = np.zeros_like(timeline[prefix + "actual"])
        if timeline and "log_probs_before" not in timeline:  # a file written before it
            with np.errstate(divide="ignore"):
                timeline["log_probs_before"] = np.log(timeline["probs_before"])
        for key, stacked in timeline.items():
            rows = list(stacked)
            if key in ("batch_indices", "batch_labels", "contributions"):
                valid = [r >= 0 for r in timeline["batch_indices"]]
                rows = [r[..., keep] for r, keep in zip(rows, valid)]
            run._timeline[key] = rows
        return run


def _floats(value, name: str, shape: tuple) -> np.ndarray:
    """A file's array as float64 if it has ``shape`` (ValueError otherwise)."""
    a = np.asarray(value)
    if a.shape != shape or not (np.issubdtype(a.dtype, np.floating) or a.size == 0):
        raise ValueError(f"{name} is {a.dtype} {a.shape}, not a float array {shape}")
    return np.array(a, np.float64)


#: The timeline's arrays: name -> the shape of one step's row, from (W, B, V).
_ROW_SHAPES = {"step": (), "lr": (), "loss": (), "batch_indices": ("B",), "batch_labels": ("B",),
               "contributions": ("W", "B")}  # fmt: skip


def _check_timeline(timeline: dict, run: RunAccount) -> None:
    """ValueError unless the ``step_*`` arrays hold one row for each of the run's steps, each of
    its shape: ``(S,)`` for step, lr, loss; ``(S, B)`` for the batch's indices (into the
    training split; −1 pads a short batch) and labels (classes; −1 where padded); ``(S, W, B)``
    for contributions; ``(S, W, V)`` for probs_before and every term (the statistics term may
    be absent: files written before it)."""
    if not timeline:
        return
    W, totals = run.watched, run._totals
    V = totals["actual"].shape[1] if totals else None
    terms = {prefix + name for prefix in ("", "dz_") for name in TERMS if name != "statistics"}
    missing = sorted({*_ROW_SHAPES, "probs_before", *terms} - set(timeline))
    if missing or V is None:
        raise ValueError(f"its timeline lacks step_{(missing or ['actual'])[0]}")
    S, B = run.steps, np.asarray(timeline["batch_indices"]).shape[-1]
    sizes = {"W": W, "B": B, "V": V}
    for key, value in timeline.items():
        row = _ROW_SHAPES.get(key, ("W", "V"))
        shape = (S, *(sizes[d] for d in row))
        a = np.asarray(value)
        integer = key in ("step", "batch_indices", "batch_labels")
        kind_ok = np.issubdtype(a.dtype, np.integer if integer else np.floating)
        if a.shape != shape or not kind_ok:
            raise ValueError(f"step_{key} is {a.dtype} {a.shape}, not {shape} (steps = {S})")
    index, labels = np.asarray(timeline["batch_indices"]), np.asarray(timeline["batch_labels"])
    padded = index == -1
    if ((index < -1) | (index >= run.num_train)).any():
        raise ValueError(f"step_batch_indices must be in [0, {run.num_train}) (−1: padding)")
    C = run.num_classes or 0
    if ((labels != -1) == padded).any() or ((labels < -1) | (labels >= C)).any():
        raise ValueError(f"step_batch_labels must be classes in [0, {C}) (−1 where padded)")
