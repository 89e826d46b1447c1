"""Saving fitted models and checkpoints: one ``.npz`` per file, written atomically.

A model file holds every dataclass field of the model as arrays plus a JSON
header (``__meta__``) naming the class and how to rebuild each field, so any
frozen dataclass whose fields are arrays, numbers, ``None`` or tuples of those
round-trips: every model class in :data:`MODEL_CLASSES` is registered.
No pickles: files load with ``allow_pickle=False``. :func:`run_em_loop` is the
resumable, checkpointing loop every EM fit runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm

from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.drm import DeepRenderingModel
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.models.factor import FactorRenderingModel
from pgm_drm.models.rendering import RenderingModel

__all__ = [
    "EMLoop",
    "check_loop_args",
    "fingerprint",
    "MODEL_CLASSES",
    "load_checkpoint",
    "load_model",
    "run_em_loop",
    "save_checkpoint",
    "save_model",
]

#: Classes :func:`load_model` may rebuild, by name.
MODEL_CLASSES: dict[str, type] = {
    "ConvRenderingModel": ConvRenderingModel,
    "DeepRenderingModel": DeepRenderingModel,
    "EvolutionaryDRM": EvolutionaryDRM,
    "FactorRenderingModel": FactorRenderingModel,
    "RenderingModel": RenderingModel,
}

FORMAT_VERSION = 1
_META = "__meta__"


def _atomic_savez(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` to a temporary file in the same folder, then ``os.replace``.

    A reader (or a resumed fit) never sees a half-written file: the rename is
    atomic on POSIX and Windows within one file system.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _load_npz(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    if _META not in arrays:
        raise ValueError(f"{path} is not a pgm_drm file (no {_META} entry)")
    meta = json.loads(str(arrays.pop(_META)))
    return arrays, meta


def _encode(name: str, value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """Store ``value`` under keys starting with ``name``; return how to rebuild it."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, tuple):
        return {
            "kind": "tuple",
            "items": [_encode(f"{name}/{i}", v, arrays) for i, v in enumerate(value)],
        }
    if isinstance(value, bool | int | float):
        return {"kind": type(value).__name__, "value": value}
    arrays[name] = np.asarray(value)
    return {"kind": "array", "key": name}


def _decode(spec: Any, arrays: dict[str, np.ndarray]) -> Any:
    kind = spec["kind"]
    if kind == "none":
        return None
    if kind == "tuple":
        return tuple(_decode(s, arrays) for s in spec["items"])
    if kind in ("bool", "int", "float"):
        return {"bool": bool, "int": int, "float": float}[kind](spec["value"])
    return arrays[spec["key"]]


def save_model(path: str | os.PathLike, model: Any) -> Path:
    """Save a fitted model (a registered frozen dataclass) to ``path`` (``.npz``).

    Args:
        path: Destination; parent folders are created; written atomically.
        model: A :class:`RenderingModel`, :class:`DeepRenderingModel` or another
            class in :data:`MODEL_CLASSES`.

    Returns:
        The path written.

    Example:
        >>> import tempfile, os, numpy as np
        >>> from pgm_drm.models import RenderingModel, default_templates
        >>> rm = RenderingModel(default_templates(), sigma=0.5, switch_prior=0.9)
        >>> path = os.path.join(tempfile.mkdtemp(), "rm.npz")
        >>> back = load_model(save_model(path, rm))
        >>> bool(np.array_equal(back.templates, rm.templates)), back.switch_prior
        (True, 0.9)
    """
    cls = type(model)
    if MODEL_CLASSES.get(cls.__name__) is not cls or not dataclasses.is_dataclass(
        model
    ):
        raise ValueError(
            f"cannot save a {cls.__name__}; known model classes: "
            f"{sorted(MODEL_CLASSES)}"
        )
    arrays: dict[str, np.ndarray] = {}
    fields = {
        f.name: _encode(f.name, getattr(model, f.name), arrays)
        for f in dataclasses.fields(model)
    }
    meta = {"format": FORMAT_VERSION, "class": cls.__name__, "fields": fields}
    arrays[_META] = np.asarray(json.dumps(meta))
    return _atomic_savez(path, arrays)


def load_model(path: str | os.PathLike) -> Any:
    """Load a model written by :func:`save_model` (validated by its constructor).

    Raises:
        FileNotFoundError: No file at ``path``.
        ValueError: Not a model file, or an unknown class / format version.
    """
    arrays, meta = _load_npz(path)
    if meta.get("format") != FORMAT_VERSION or "fields" not in meta:
        raise ValueError(f"{path}: unsupported model file format {meta.get('format')}")
    name = meta.get("class")
    if name not in MODEL_CLASSES:
        raise ValueError(
            f"{path} holds a {name!r}; known model classes: {sorted(MODEL_CLASSES)}"
        )
    kwargs = {k: _decode(s, arrays) for k, s in meta["fields"].items()}
    return MODEL_CLASSES[name](**kwargs)


def save_checkpoint(
    path: str | os.PathLike, arrays: dict[str, Any], meta: dict[str, Any]
) -> Path:
    """Write a fit's state (arrays) and its configuration (JSON-able) atomically."""
    out = {k: np.asarray(v) for k, v in arrays.items()}
    out[_META] = np.asarray(json.dumps({"format": FORMAT_VERSION, **meta}))
    return _atomic_savez(path, out)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict]:
    """Read a checkpoint written by :func:`save_checkpoint`: ``(arrays, meta)``."""
    return _load_npz(path)


def check_checkpoint_meta(path: Any, found: dict, expected: dict) -> None:
    """Raise a ValueError naming every configuration entry that differs."""
    diffs = [
        f"{k}: checkpoint has {found.get(k)!r}, this fit has {v!r}"
        for k, v in expected.items()
        if found.get(k) != v
    ]
    if diffs:
        raise ValueError(
            f"checkpoint {path} was written by a different fit; "
            + "; ".join(diffs)
            + " (delete it or pass resume=False to start over)"
        )


def fingerprint(*arrays: Any) -> str:
    """A short hash of arrays (shapes, dtypes, bytes): checkpoints record the data
    and starting parameters they belong to."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def check_loop_args(
    n_iter: int, tol: float | None, min_sigma: float, checkpoint_every: int
) -> None:
    """Arguments every EM fit passes to :func:`run_em_loop`, checked before any
    expensive initialisation."""
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"n_iter must be an integer >= 0, got {n_iter}")
    if tol is not None and not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0 or None, got {tol}")
    if not (np.isfinite(min_sigma) and min_sigma > 0):
        raise ValueError(f"min_sigma must be a finite number > 0, got {min_sigma}")
    if int(checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")


class EMLoop(NamedTuple):
    """Outcome of :func:`run_em_loop`: the last state, the per-iteration histories
    (one list per name, values at the parameters *before* each step) and whether
    the first history changed by less than ``tol``."""

    state: Any
    history: dict[str, list[float]]
    converged: bool


def run_em_loop(
    step: Callable[[Any], tuple[Any, Any]],
    state: Any,
    *,
    n_iter: int,
    tol: float | None,
    history: tuple[str, ...],
    desc: str,
    progress: bool,
    checkpoint: str | os.PathLike | None,
    checkpoint_every: int,
    resume: bool,
    meta: dict[str, Any],
    to_arrays: Callable[[Any], dict[str, Any]],
    from_arrays: Callable[[dict[str, np.ndarray]], Any],
) -> EMLoop:
    """The driver every EM fit shares: iterate ``step`` (an (init, step) pair's
    step, ``state.iteration`` counts steps), record the ``history`` attributes of
    each step's info, stop at ``n_iter`` or when ``history[0]`` changes by less
    than ``tol``, show a tqdm bar with the objective, write an atomic checkpoint
    every ``checkpoint_every`` steps and at the end, and resume from one
    (``check_checkpoint_meta`` refuses a checkpoint of another fit).
    """
    hist: dict[str, list[float]] = {k: [] for k in history}
    converged = False
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        arrays, found = load_checkpoint(checkpoint)
        check_checkpoint_meta(checkpoint, found, meta)
        state = from_arrays(arrays)
        hist = {k: arrays[k].tolist() for k in history}
        converged = bool(arrays["converged"])

    def write(st: Any) -> None:
        arrays = dict(to_arrays(st))
        arrays.update({k: np.asarray(v, dtype=float) for k, v in hist.items()})
        arrays["converged"] = converged
        save_checkpoint(checkpoint, arrays, meta)

    start = int(state.iteration)
    bar = tqdm(
        total=int(n_iter),
        initial=min(start, int(n_iter)),
        disable=not progress,
        desc=desc,
        leave=False,
    )
    monitor = hist[history[0]]
    try:
        it = start
        while it < n_iter and not converged:
            state, info = step(state)
            it += 1
            for k in history:
                hist[k].append(float(getattr(info, k)))
            monitor = hist[history[0]]
            if tol is not None and len(monitor) > 1:
                converged = abs(monitor[-1] - monitor[-2]) < tol
            bar.update(1)
            bar.set_postfix({history[0]: f"{monitor[-1]:.4f}"}, refresh=False)
            if checkpoint is not None and it % checkpoint_every == 0:
                write(state)
    finally:
        bar.close()
    if checkpoint is not None:
        write(state)
    return EMLoop(state, hist, converged)
