"""The one training loop (pgm_drm/learning/loop.py) on a toy algorithm: steps,
histories, stopping, checkpoints written every ``every`` iterations and at the
end, resume bit for bit, and refusal of checkpoints of another fit or tampered
ones. The fits' own resume tests live with each fit (test_em.py, ...)."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pgm_drm.learning.loop as loop_module
from pgm_drm.learning.io import load_checkpoint
from pgm_drm.learning.loop import (
    Algorithm,
    LoopOptions,
    run_loop,
    tolerance,
)

QUIET = LoopOptions(progress=False)
META = {"kind": "toy", "rate": 0.9}


class Toy(NamedTuple):
    w: jax.Array
    key: jax.Array
    iteration: jax.Array


def _init(w0):
    return Toy(jnp.asarray(w0, dtype=jnp.float64), jax.random.PRNGKey(3), jnp.int32(0))


def _step(st: Toy, stride: int = 1):
    """A noisy contraction: its result depends on the key, so a resume that lost
    the key (or the iteration) would not end where a straight run ends."""
    key, sub = jax.random.split(st.key)
    w = 0.9 * st.w + 0.1 * jax.random.normal(sub, st.w.shape, st.w.dtype)
    return Toy(w, key, st.iteration + stride), {"loss": jnp.sum(st.w**2), "n": stride}


TOY = Algorithm(init=_init, step=_step)


def _run(n_iter, options=QUIET, algorithm=TOY, **kw):
    kw.setdefault("history", ("loss",))
    kw.setdefault("meta", META)
    return run_loop(algorithm, [1.0, -2.0, 0.5], n_iter, options, **kw)


def _same(a, b):
    assert a.history == b.history and a.converged == b.converged
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)


def test_runs_n_iter_steps_and_records_the_history():
    out = _run(7, history=("loss", "n"))
    assert int(out.state.iteration) == 7 and not out.converged
    assert len(out.history["loss"]) == 7 and out.history["n"] == [1.0] * 7
    # loss[t] is the step's info: at the state before step t
    assert out.history["loss"][0] == pytest.approx(1.0 + 4.0 + 0.25)
    assert _run(0).history == {"loss": []}


class Decay(NamedTuple):
    w: jax.Array
    iteration: jax.Array


#: Losses 1, 1/2, 1/4, ...: tol=0.1 is first met at step 5 (change 1/16).
HALVE = Algorithm(
    init=lambda w: Decay(jnp.asarray(w), jnp.asarray(0)),
    step=lambda s: (Decay(s.w / 2, s.iteration + 1), {"loss": float(s.w)}),
)


def _halve(n_iter, tol, options=QUIET):
    stop = tolerance(tol, "loss")
    return run_loop(HALVE, 1.0, n_iter, options, history=("loss",), stop=stop)


def test_tolerance_stops_the_loop_and_reports_convergence():
    out = _halve(100, 0.1)
    # losses 1, 1/2, 1/4, 1/8, 1/16: the change 1/16 is the first below 0.1
    assert out.converged and out.history["loss"] == [1, 0.5, 0.25, 0.125, 0.0625]
    assert tolerance(None, "loss") is None
    with pytest.raises(ValueError, match="tol"):
        tolerance(-1.0, "loss")


def test_resume_after_a_crash_is_bit_for_bit(tmp_path, monkeypatch):
    straight = _run(10)
    path = tmp_path / "toy.npz"
    options = LoopOptions(progress=False, checkpoint=path, every=3, resume=True)
    calls = []

    def crashing(st):
        calls.append(1)
        if len(calls) == 8:  # dies in step 8; the last checkpoint is at 6
            raise KeyboardInterrupt
        return _step(st)

    with pytest.raises(KeyboardInterrupt):
        _run(10, options, Algorithm(_init, crashing))
    state, extra = load_checkpoint(path, _init([1.0, -2.0, 0.5]), _meta())
    assert int(state.iteration) == 6 and extra["iterations"].tolist() == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]
    resumed = _run(10, options)
    _same(resumed, straight)
    # A finished fit resumes to itself (no step), and a longer one continues.
    _same(_run(10, options), straight)
    _same(_run(12, options), _run(12))


def test_a_bfloat16_state_resumes_bit_for_bit(tmp_path):
    """Checkpoints keep ml_dtypes' types (written as raw bits, their dtype in the
    header): a bfloat16 fit resumes where a straight run goes."""
    half = Algorithm(lambda w: _init(w)._replace(w=jnp.asarray(w, jnp.bfloat16)), _step)
    straight = _run(4, algorithm=half)
    options = LoopOptions(progress=False, checkpoint=tmp_path / "bf16.npz")
    _run(2, options, half)
    resumed = _run(4, dataclasses.replace(options, resume=True), half)
    assert resumed.state.w.dtype == jnp.bfloat16
    _same(resumed, straight)


def _meta(history=("loss",)):
    """The configuration run_loop records for _run's fits."""
    start = _init([1.0, -2.0, 0.5])
    return {
        **META,
        "history": list(history),
        "start": loop_module.fingerprint(*jax.tree.leaves(start)),
    }


def test_checkpoints_are_written_every_few_iterations_and_at_the_end(
    tmp_path, monkeypatch
):
    written = []
    real = loop_module.save_checkpoint

    def spy(path, state, meta, extra):
        written.append(int(state.iteration))
        return real(path, state, meta, extra)

    monkeypatch.setattr(loop_module, "save_checkpoint", spy)
    _run(7, LoopOptions(progress=False, checkpoint=tmp_path / "a.npz", every=3))
    assert written == [3, 6, 7]
    # Steps of several iterations (SVI's chunks): a write when a multiple is passed.
    written.clear()
    chunks = Algorithm(_init, lambda st: _step(st, stride=2))
    _run(7, LoopOptions(progress=False, checkpoint=tmp_path / "b.npz", every=3), chunks)
    assert written == [4, 6, 8]  # 6 -> 8 passes no multiple of 3; 8: the end
    # Default interval from the fit; no checkpoint, no writes.
    written.clear()
    _run(4, LoopOptions(progress=False, checkpoint=tmp_path / "c.npz"), default_every=2)
    assert written == [2, 4, 4]
    written.clear()
    _run(4)
    assert written == []


def test_a_checkpoint_of_another_fit_is_refused(tmp_path):
    path = tmp_path / "toy.npz"
    _run(3, LoopOptions(progress=False, checkpoint=path))
    resume = LoopOptions(progress=False, checkpoint=path, resume=True)
    with pytest.raises(ValueError, match=r"different fit; rate: checkpoint has 0\.9"):
        _run(5, resume, meta={"kind": "toy", "rate": 0.5})
    with pytest.raises(ValueError, match="different fit; start"):
        run_loop(TOY, [1.0, 2.0, 3.0], 5, resume, history=("loss",), meta=META)
    with pytest.raises(ValueError, match="different fit; history"):
        _run(5, resume, history=("loss", "n"))
    # resume=False starts over and overwrites it.
    assert (
        int(_run(2, LoopOptions(progress=False, checkpoint=path)).state.iteration) == 2
    )


def test_a_resume_follows_its_own_n_iter_and_tol_or_is_refused(tmp_path):
    path = tmp_path / "halve.npz"
    write = LoopOptions(progress=False, checkpoint=path)
    resume = dataclasses.replace(write, resume=True)
    first = _halve(50, 0.1, write)
    assert first.converged and int(first.state.iteration) == 5
    # The same tol: converged where it was, no step.
    _same(_halve(50, 0.1, resume), first)
    # No tol, or a smaller one the history does not meet: the fit continues to
    # where an uninterrupted run with those settings ends.
    _same(_halve(8, None, resume), _halve(8, None))
    # Now 8 iterations in: n_iter=6 or a tol met at step 5 (or 3) stopped an
    # uninterrupted run earlier; that state is gone, so the resume is refused
    # and the checkpoint kept.
    with pytest.raises(ValueError, match="at iteration 8, past this fit's n_iter=6"):
        _halve(6, None, resume)
    for tol, at in ((0.1, 5), (0.3, 3)):
        with pytest.raises(ValueError, match=f"tol={tol} stops it at iteration {at}"):
            _halve(50, tol, resume)
    _same(_halve(12, 1e-3, resume), _halve(12, 1e-3))


def _tamper(path, **changes):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        del arrays[k]
    np.savez(path, **arrays)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"state.iteration": np.int32(10**6)}, "state is at iteration 1000000"),
        ({"state.iteration": np.int32(-5)}, "state is at iteration -5"),
        ({"extra/history/loss": np.zeros(2)}, "history 'loss'"),
        ({"extra/iterations": np.array([1, 1, 3])}, "do not rise"),
        ({"extra/converged": np.zeros(2, bool)}, "converged is"),
        ({"extra/converged": None}, "damaged"),
        ({"state.iteration": np.int64(3)}, "int64"),
        ({"state.w": np.zeros(4)}, r"state\.w: checkpoint has float64\[4\]"),
        ({"state.key": None}, r"state\.key: missing"),
        ({"state.extra": np.zeros(1)}, "not in this fit's state"),
    ],
)
def test_a_tampered_checkpoint_is_refused(tmp_path, changes, match):
    path = tmp_path / "toy.npz"
    _run(3, LoopOptions(progress=False, checkpoint=path))
    _tamper(path, **changes)
    with pytest.raises(ValueError, match=match):
        _run(5, LoopOptions(progress=False, checkpoint=path, resume=True))


def test_options_and_steps_are_checked():
    with pytest.raises(ValueError, match="every"):
        LoopOptions(every=0)
    with pytest.raises(ValueError, match="checkpoint path"):
        LoopOptions(resume=True)
    with pytest.raises(ValueError, match="n_iter"):
        _run(-1)
    stuck = Algorithm(_init, lambda st: (st, {"loss": 0.0}))
    with pytest.raises(RuntimeError, match="did not advance"):
        _run(3, algorithm=stuck)
    assert LoopOptions().interval(7) == 7 and LoopOptions(every=2).interval(7) == 2


def test_progress_bar_shows_the_history(capsys):
    _run(2, LoopOptions(progress=True), desc="toy fit")
    err = capsys.readouterr().err
    assert "toy fit" in err
