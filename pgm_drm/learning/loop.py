"""The one training loop: every iterative fit (EM, FA-EM, DRM EM, SVI, the
discriminative relaxation) is an :class:`Algorithm` run by :func:`run_loop`.

An :class:`Algorithm` is an ``(init, step)`` pair over a *state*, a pytree with an
integer ``iteration`` leaf (steps done; a step may do several, as SVI's scan
chunks do):

* ``init(start) -> state``: the loop state of a fit that starts at ``start``
  (a model, a network, ...);
* ``step(state) -> (state, info)``: one step; ``info`` holds the numbers the loop
  records (its attributes or keys named by ``history``).

:func:`run_loop` iterates ``step`` up to ``n_iter`` iterations or until ``stop``
(e.g. :func:`tolerance`) says so, records the histories, shows a tqdm bar, and
with :class:`LoopOptions` writes checkpoints and resumes from them. A checkpoint
is the state itself, saved leaf by leaf under its pytree path
(:func:`pgm_drm.learning.io.save_checkpoint`) with the histories, and refused on
resume if it belongs to another fit (its ``meta``: data, settings, a fingerprint
of the initial state), holds another structure, shape or dtype, is not
internally consistent (its iteration count disagrees with its histories), or ran
past where this run stops (``n_iter`` and ``tol`` may change on resume: a
converged fit continues under a smaller ``tol``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from tqdm.auto import tqdm

from pgm_drm.learning.io import fingerprint, load_checkpoint, save_checkpoint

__all__ = [
    "Algorithm",
    "LoopOptions",
    "LoopResult",
    "check_n_iter",
    "run_loop",
    "tolerance",
]

#: ``stop(state, history) -> bool``: end the loop after this step.
Stop = Callable[[Any, Mapping[str, list[float]]], bool]


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How a fit runs its loop (the same for every fit).

    Attributes:
        progress: Show a tqdm bar with the recorded numbers in its postfix.
        checkpoint: Path of an ``.npz`` checkpoint, written atomically every
            ``every`` iterations and at the end; ``None``: no checkpoints.
        every: Iterations between checkpoint writes; ``None``: the fit's default
            (SVI also runs its steps in compiled chunks of this many).
        resume: Continue from ``checkpoint`` if the file exists (it must belong
            to the same fit: same data, settings and start, else ValueError);
            the result equals an uninterrupted fit's. ``n_iter`` and ``tol``
            may differ from the checkpoint's: a converged fit continues under a
            smaller ``tol`` or none; a checkpoint past where this run stops
            (beyond ``n_iter``, or beyond the step where its ``tol`` is met) is
            refused with ValueError and left as it is.

    Raises:
        ValueError: ``every < 1``, or ``resume`` without a ``checkpoint``.
    """

    progress: bool = True
    checkpoint: str | os.PathLike | None = None
    every: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        if self.every is not None and (int(self.every) != self.every or self.every < 1):
            raise ValueError(f"every must be an integer >= 1, got {self.every}")
        if self.resume and self.checkpoint is None:
            raise ValueError("resume=True needs a checkpoint path")

    def interval(self, default: int) -> int:
        """``every``, or the fit's ``default`` when it is ``None``."""
        return int(default if self.every is None else self.every)


class Algorithm(NamedTuple):
    """An iterative fit as an ``(init, step)`` pair (see the module docstring).

    Attributes:
        init: ``start -> state``; the state is a pytree with an integer
            ``iteration`` leaf (0 at the start).
        step: ``state -> (state, info)``; the new ``iteration`` is larger.
    """

    init: Callable[[Any], Any]
    step: Callable[[Any], tuple[Any, Any]]


class LoopResult(NamedTuple):
    """What :func:`run_loop` returns.

    Attributes:
        state: The last state.
        history: For each recorded name, one number per step (as the steps'
            infos give it: EM's are at the parameters *before* the step).
        converged: ``stop`` ended the loop (before ``n_iter``).
    """

    state: Any
    history: dict[str, list[float]]
    converged: bool


def check_n_iter(n_iter: int, name: str = "n_iter") -> int:
    """``n_iter`` as an int; raises ValueError unless it is an integer >= 0."""
    if int(n_iter) != n_iter or n_iter < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {n_iter}")
    return int(n_iter)


def tolerance(tol: float | None, name: str) -> Stop | None:
    """The ``stop`` of a fit that has converged when the history ``name``
    changed by less than ``tol`` in the last step (``None``: never stop).

    Raises:
        ValueError: ``tol`` is not a finite number >= 0 or ``None``.
    """
    if tol is None:
        return None
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0 or None, got {tol}")
    return _Tolerance(float(tol), name)


@dataclasses.dataclass(frozen=True)
class _Tolerance:
    """The stop of :func:`tolerance`. It reads the history alone, so a resumed
    loop re-evaluates it on the checkpoint's history (:func:`_resumed_stop`)."""

    tol: float
    name: str

    def __call__(self, state: Any, history: Mapping[str, list[float]]) -> bool:
        h = history[self.name]
        return len(h) > 1 and abs(h[-1] - h[-2]) < self.tol


def _value(info: Any, name: str) -> float:
    return float(info[name] if isinstance(info, Mapping) else getattr(info, name))


def _iteration(state: Any) -> int:
    return int(state.iteration)


def run_loop(
    algorithm: Algorithm,
    start: Any,
    n_iter: int,
    options: LoopOptions | None = None,
    *,
    history: tuple[str, ...],
    stop: Stop | None = None,
    meta: Mapping[str, Any] | None = None,
    desc: str = "fit",
    default_every: int = 10,
) -> LoopResult:
    """Run ``algorithm`` from ``start`` for ``n_iter`` iterations (or until ``stop``).

    Args:
        algorithm: The ``(init, step)`` pair.
        start: What ``algorithm.init`` builds the initial state from.
        n_iter: Iterations to reach (``state.iteration``; a resumed fit counts
            the checkpoint's).
        options: Progress bar and checkpoints (default :class:`LoopOptions`).
        history: Names of the numbers of each step's ``info`` to record; the
            bar shows their last values.
        stop: Called after each step with the state and the histories; ``True``
            ends the loop (``converged``).
        meta: The fit's configuration (JSON-able: data fingerprint, settings);
            a checkpoint whose configuration differs is refused. A fingerprint
            of the initial state is added.
        desc: The bar's label.
        default_every: Checkpoint interval when ``options.every`` is ``None``.

    Returns:
        A :class:`LoopResult`.

    Raises:
        ValueError: Bad ``n_iter``, or (resuming) a checkpoint of another fit,
            structure, shape or dtype, one that is not internally consistent,
            or one past where this run stops (beyond ``n_iter``, or beyond the
            step where a :func:`tolerance` ``stop`` is first met; a converged
            checkpoint continues under a ``tolerance`` it does not meet).

    Example:
        Gradient descent on ``(w - 3)^2`` as an algorithm:

        >>> import jax.numpy as jnp
        >>> class State(NamedTuple):
        ...     w: jnp.ndarray
        ...     iteration: jnp.ndarray
        >>> def step(s):
        ...     new = State(s.w - 0.25 * 2 * (s.w - 3.0), s.iteration + 1)
        ...     return new, {"loss": (s.w - 3.0) ** 2}
        >>> gd = Algorithm(init=lambda w: State(jnp.asarray(w), jnp.asarray(0)),
        ...                step=step)
        >>> out = run_loop(gd, 0.0, 50, LoopOptions(progress=False),
        ...                history=("loss",), stop=tolerance(1e-6, "loss"))
        >>> round(float(out.state.w), 3), out.converged, int(out.state.iteration)
        (3.0, True, 14)
    """
    n_iter = check_n_iter(n_iter)
    options = LoopOptions() if options is None else options
    every = options.interval(default_every)
    history = tuple(history)
    state0 = algorithm.init(start)
    it0 = _iteration(state0)
    meta = {
        **dict(meta or {}),
        "history": list(history),
        "start": fingerprint(*jax.tree.leaves(state0)),
    }
    path = options.checkpoint
    state, converged = state0, False
    hist: dict[str, list[float]] = {k: [] for k in history}
    iters: list[int] = []
    if options.resume and path is not None and os.path.exists(path):
        state, extra = load_checkpoint(path, state0, meta)
        hist, iters, converged = _restore(path, extra, history, it0, state)
        converged = _resumed_stop(path, stop, hist, iters, converged, n_iter)

    def write() -> None:
        extra = {
            f"history/{k}": np.asarray(v, dtype=np.float64) for k, v in hist.items()
        }
        extra["iterations"] = np.asarray(iters, dtype=np.int64)
        extra["converged"] = np.asarray(converged)
        save_checkpoint(path, state, meta, extra)

    it = _iteration(state)
    bar = tqdm(
        total=n_iter,
        initial=min(it, n_iter),
        disable=not options.progress,
        desc=desc,
        leave=False,
    )
    try:
        while it < n_iter and not converged:
            state, info = algorithm.step(state)
            new = _iteration(state)
            if new <= it:
                raise RuntimeError(
                    f"the step did not advance the iteration ({it} -> {new})"
                )
            for k in history:
                hist[k].append(_value(info, k))
            iters.append(new)
            if stop is not None:
                converged = bool(stop(state, hist))
            bar.update(min(new, n_iter) - min(it, n_iter))
            bar.set_postfix({k: f"{v[-1]:.4f}" for k, v in hist.items()}, refresh=False)
            if path is not None and new // every > it // every:
                write()
            it = new
    finally:
        bar.close()
    if path is not None:
        write()
    return LoopResult(state, hist, converged)


def _resumed_stop(
    path: Any,
    stop: Stop | None,
    hist: dict[str, list[float]],
    iters: list[int],
    converged: bool,
    n_iter: int,
) -> bool:
    """Whether a resumed loop has already stopped under *this* run's ``n_iter``
    and ``stop``, which may differ from those the checkpoint was written with.

    ``n_iter`` and a :func:`tolerance` (or no stop) are not part of a fit's
    ``meta``: the resumed loop continues where an uninterrupted run with its
    own settings continues. A larger ``n_iter``, or a ``tol`` under which the
    checkpoint's history has not converged (``None``, a smaller one), continue
    the fit; a ``tol`` met at the checkpoint's last step ends it there. A
    checkpoint past where this run stops (beyond ``n_iter``, or beyond the
    step where this ``tol`` is first met) cannot give the uninterrupted result
    (the earlier state is gone): refused, the file left as it is. Any other
    stop reads the state too; its settings belong in ``meta``, and the
    checkpoint's ``converged`` flag is kept.

    Raises:
        ValueError: The checkpoint ran past where this run stops.
    """
    last = iters[-1] if iters else None
    if last is not None and last > n_iter:
        raise ValueError(
            f"checkpoint {path} is at iteration {last}, past this fit's "
            f"n_iter={n_iter}: an uninterrupted fit stops at {n_iter} (resume with "
            f"n_iter >= {last}, or give another checkpoint path to start over)"
        )
    if stop is not None and not isinstance(stop, _Tolerance):
        return converged
    for k in range(1, len(iters) + 1):
        if stop is not None and stop(None, {n: h[:k] for n, h in hist.items()}):
            if k < len(iters):
                raise ValueError(
                    f"checkpoint {path} ran on to iteration {last}, but this "
                    f"fit's tol={stop.tol} stops it at iteration {iters[k - 1]} "
                    "(the checkpoint was written with another tol): resume with "
                    "that tol, or give another checkpoint path to start over"
                )
            return True
    return False


def _restore(
    path: Any, extra: dict[str, np.ndarray], history: tuple[str, ...], it0: int, state
) -> tuple[dict[str, list[float]], list[int], bool]:
    """The loop's records of a checkpoint, checked against each other and the state."""
    want = {f"history/{k}" for k in history} | {"iterations", "converged"}
    if set(extra) != want:
        raise ValueError(
            f"checkpoint {path} is damaged: it holds the loop records "
            f"{sorted(extra)}, expected {sorted(want)}"
        )
    iters = extra["iterations"]
    conv = extra["converged"]
    hists = {k: extra[f"history/{k}"] for k in history}
    it = _iteration(state)
    problems = []
    if iters.ndim != 1 or not np.issubdtype(iters.dtype, np.integer):
        problems.append(f"iterations is {iters.dtype.name}{list(iters.shape)}")
    if conv.shape != () or conv.dtype != np.bool_:
        problems.append(f"converged is {conv.dtype.name}{list(conv.shape)}")
    for k, h in hists.items():
        if h.shape != iters.shape or not np.issubdtype(h.dtype, np.floating):
            problems.append(
                f"history {k!r} is {h.dtype.name}{list(h.shape)}, "
                f"{iters.size} steps recorded"
            )
    if not problems:
        last = int(iters[-1]) if iters.size else it0
        if it != last:
            problems.append(f"the state is at iteration {it}, its steps record {last}")
        if np.any(np.diff(np.concatenate([[it0], iters])) <= 0):
            problems.append(f"the recorded iterations do not rise from {it0}")
    if problems:
        raise ValueError(
            f"checkpoint {path} is not consistent: "
            + "; ".join(problems)
            + " (delete it or resume=False to start over)"
        )
    return (
        {k: h.astype(float).tolist() for k, h in hists.items()},
        [int(i) for i in iters],
        bool(conv),
    )
