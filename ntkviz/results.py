"""Writing results to disk: decompositions as JSON, NPZ or CSV, named arrays as NPZ or CSV
(atomically, no pickle)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from ntkviz.decomposition import Decomposition
from ntkviz.files import atomic_write, write_npz

FORMATS = (".json", ".npz", ".csv")


def decomposition_record(dec: Decomposition, meta: dict | None = None) -> dict:
    """A JSON-ready dict: every array as nested lists, the scalars, and ``meta``."""
    from ntkviz import __version__

    return {
        "formula": dec.FORMULA,
        "lr": dec.lr,
        "loss": dec.loss,
        "y_u": dec.y_u,
        "relative_residual": dec.relative_residual,
        **{name: getattr(dec, name) for name in dec.SCALARS},
        **{name: array.tolist() for name, array in dec.arrays().items()},
        "meta": {"ntkviz_version": __version__, **(meta or {})},
    }


def _csv_text(dec: Decomposition, record: dict) -> str:
    """Comment lines ``# key: <JSON value>`` with the scalars and the metadata of ``record``,
    then one row per output class i: the vectors at i, then row i of A and K."""
    V = len(dec.G)
    out = io.StringIO()
    out.write("# ntkviz decomposition, one row per output class i (read with comment='#')\n")
    scalars = ("formula", "lr", "loss", "y_u", "relative_residual", *dec.SCALARS)
    top = {k: record[k] for k in scalars}
    for key, value in top.items():
        out.write(f"# {key}: {json.dumps(value, allow_nan=False)}\n")
    for key, value in record["meta"].items():  # a metadata key that repeats a scalar: once
        if key not in top:
            out.write(f"# {key}: {json.dumps(value, allow_nan=False)}\n")
        elif value != top[key]:
            out.write(f"# meta.{key}: {json.dumps(value, allow_nan=False)}\n")
    w = csv.writer(out)
    vectors = [n for n, a in dec.arrays().items() if a.ndim == 1]
    w.writerow(
        ["class", *vectors, *(f"A[i,{j}]" for j in range(V)), *(f"K[i,{j}]" for j in range(V))]
    )
    for i in range(V):
        row = [i, *(repr(float(dec.arrays()[n][i])) for n in vectors)]
        row += [repr(float(v)) for v in dec.A[i]] + [repr(float(v)) for v in dec.K[i]]
        w.writerow(row)
    return out.getvalue()


def write_decomposition(dec: Decomposition, path: str | Path, meta: dict | None = None) -> Path:
    """Write ``dec`` to ``path`` (.json, .npz or .csv by suffix), atomically. ``meta`` (indices,
    labels, model, training step, seed …) goes into every format (CSV: ``# key: <JSON>`` lines
    above the header). Raises ``ValueError`` for an unknown suffix or non-finite values (never
    written: NaN and Infinity are not JSON) and ``OSError`` for an unwritable path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown output format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    bad = [name for name, a in dec.arrays().items() if not np.isfinite(a).all()]
    if bad or not np.isfinite([dec.lr, dec.relative_residual]).all():
        raise ValueError(
            f"not writing {path}: the decomposition holds non-finite values (NaN or infinity) in "
            f"{', '.join(bad) or 'its scalars'}"
        )
    record = decomposition_record(dec, meta)
    if suffix == ".json":
        text = json.dumps(record, indent=2, allow_nan=False)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    if suffix == ".csv":
        text = _csv_text(dec, record)
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    arrays = dict(dec.arrays())
    arrays["lr"] = np.array(dec.lr)
    arrays["y_u"] = np.array(dec.y_u)
    arrays["loss"] = np.array(dec.loss)
    arrays["formula"] = np.array(dec.FORMULA)
    for name in dec.SCALARS:
        arrays[name] = np.array(getattr(dec, name))
    arrays["meta_json"] = np.array(json.dumps(record["meta"], allow_nan=False))
    return write_npz(path, arrays)


def write_arrays(path: str | Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> Path:
    """Write named arrays atomically: ``.npz`` (all of them, ``meta`` as JSON in
    ``meta_json``) or ``.csv`` in long form, one table that CSV readers take as it is
    (``pandas.read_csv(path, comment="#")``): ``# key: <JSON>`` lines, then the header
    ``array, i, j, …, value`` and one row per entry — the array's name, its index (empty past
    its dimensions) and its value. None values are left out."""
    path = Path(path)
    suffix = path.suffix.lower()
    from ntkviz import __version__

    arrays = {k: np.asarray(v) for k, v in arrays.items() if v is not None}
    meta = {"ntkviz_version": __version__, **(meta or {})}
    if suffix == ".npz":
        return write_npz(path, {**arrays, "meta_json": np.array(json.dumps(meta, allow_nan=False))})
    if suffix == ".csv":
        buf = io.StringIO()
        for key, value in meta.items():
            buf.write(f"# {key}: {json.dumps(value, allow_nan=False)}\n")
        w = csv.writer(buf, lineterminator="\n")
        dims = max((a.ndim for a in arrays.values()), default=0)
        w.writerow(["array", *("ijklmn"[k] if k < 6 else f"i{k}" for k in range(dims)), "value"])
        for name, a in arrays.items():
            pad = [""] * (dims - a.ndim)
            for index, v in np.ndenumerate(a):
                w.writerow([name, *index, *pad, repr(float(v)) if a.dtype.kind == "f" else v])
        data = buf.getvalue().encode()
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    raise ValueError(f"unknown data format {path.suffix!r}; use .csv or .npz")


def write_trajectory(traj, path: str | Path, meta: dict | None = None) -> Path:
    """Write a :class:`~ntkviz.decomposition.StepTrajectory` (π of x_o and x_u before and after
    each step, ``(steps + 1, V)``) to ``path``: ``.json`` (the arrays as nested lists, η, loss,
    y_u and ``meta``), or ``.npz`` / ``.csv`` as :func:`write_arrays` writes them (η, loss and
    y_u in the metadata). Raises ``ValueError`` for an unknown suffix, ``OSError`` when
    unwritable."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unknown output format {path.suffix!r}; use one of {', '.join(FORMATS)}")
    from ntkviz import __version__

    scalars = {"lr": traj.lr, "loss": traj.loss, "y_u": traj.y_u, "steps": len(traj.probs_o) - 1}
    arrays = {"probs_o": traj.probs_o, "probs_u": traj.probs_u}
    if suffix != ".json":
        return write_arrays(path, arrays, {**scalars, **(meta or {})})
    record = {
        "what": "π(x_o) and π(x_u) before (row 0) and after each plain-SGD step on (x_u, y_u)",
        **scalars,
        **{k: v.tolist() for k, v in arrays.items()},
        "meta": {"ntkviz_version": __version__, **(meta or {})},
    }
    text = json.dumps(record, indent=2, allow_nan=False)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
