"""Private virtual environment for PGMax 0.6.1, and a runner for the Ising twin.

PGMax needs an old JAX, so it never shares an environment with ``pgm_drm``.
``ensure_pgmax_venv()`` builds ``bench/.pgmax-venv`` (git-ignored) on first use
and returns its python; a stamp file makes later calls instant.
``run_pgmax()`` runs ``bench/pgmax_ising.py`` in it and returns the JSON.

Why ``pip install --no-deps pgmax==0.6.1``: the 0.6.1 wheel declares its whole
development requirements file as dependencies (tensorflow, tensorflow-datasets,
jupyter, sphinx, cvxpy, pytest, ...). The BP code path only imports jax,
jaxlib, numpy, scipy (via jax), numba and typing_extensions (cvxpy/absl are
only used by ``pgmax.utils.primal_lp``, which nothing imports by default), so
those are installed, pinned, and pgmax itself without its declared deps.
(Its setup.py's ``requires_python='<3.11'`` is a misspelt keyword, so the
wheel carries no Requires-Python and installs on 3.11.)

After installing, a 3x3 smoke run verifies the environment and fills numba's
on-disk cache (pgmax's ``@nb.jit(cache=True)`` wiring helpers), so that
``first_result_s`` measured later does not include that one-off compile.

Usage::

    from bench.pgmax_env import ensure_pgmax_venv, run_pgmax, write_spec
    write_spec("spec.npz", unary, horizontal, vertical,
               num_iters=100, damping=0.5, temperature=1.0, repeats=5)
    res = run_pgmax("spec.npz", "out.json")   # dict, see pgmax_ising.py

End-to-end check against the numpy reference twin::

    python bench/pgmax_env.py --verify [--sizes 10 100]
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".pgmax-venv"
RUNNER = BENCH_DIR / "pgmax_ising.py"

# Versions verified together on CPython 3.11 / linux x86_64 (CPU jaxlib).
PINNED_DEPS = (
    "jax==0.4.30",
    "jaxlib==0.4.30",
    "numpy==1.26.4",
    "scipy==1.13.1",
    "ml_dtypes==0.4.0",
    "opt_einsum==3.3.0",
    "numba==0.60.0",
    "llvmlite==0.43.0",
    "typing_extensions==4.12.2",
)
PINNED_NODEPS = ("pgmax==0.6.1",)

_STAMP_NAME = ".pgmax-stamp.json"

_SMOKE = r"""
import numpy as np, jax, pgmax
from pgmax import fgraph, fgroup, infer, vgroup
assert pgmax.__version__ == "0.6.1", pgmax.__version__
v = vgroup.NDVarArray(num_states=2, shape=(3, 3))
fg = fgraph.FactorGraph(variable_groups=v)
fg.add_factors(fgroup.PairwiseFactorGroup(
    variables_for_factors=[
        [v[i, j], v[i, j + 1]] for i in range(3) for j in range(2)],
    log_potential_matrix=np.array([[0.5, -0.5], [-0.5, 0.5]], np.float32)))
bp = infer.build_inferer(fg.bp_state, backend="bp")
a = bp.init(evidence_updates={v: np.zeros((3, 3, 2), np.float32)})
for t in (1.0, 0.0):
    out = bp.run(a, num_iters=3, damping=0.5, temperature=t)
    m = infer.get_marginals(bp.get_beliefs(out))[v]
    assert np.allclose(np.asarray(m), 0.5), m
print("ok", pgmax.__version__, jax.__version__)
"""


def _python_of(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _stamp_payload(base_python: str) -> dict:
    key = "\n".join(PINNED_DEPS + ("--no-deps",) + PINNED_NODEPS + (base_python,))
    return {
        "key": hashlib.sha256(key.encode()).hexdigest(),
        "deps": list(PINNED_DEPS),
        "nodeps": list(PINNED_NODEPS),
        "base_python": base_python,
    }


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    # Nothing from the caller's environment may leak into the PGMax venv.
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
        env.pop(k, None)
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["JAX_ENABLE_X64"] = "0"  # float32 everywhere
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def ensure_pgmax_venv(
    path: os.PathLike | str = DEFAULT_VENV, *, verbose: bool = False
) -> Path:
    """Create (once) the PGMax venv at ``path`` and return its python.

    Idempotent and concurrency-safe (a file lock inside the venv directory).
    When the stamp matches the pins, returns immediately without running
    anything. Raises RuntimeError with pip's output tail if an install fails.
    """
    venv = Path(path).resolve()
    py = _python_of(venv)
    stamp = venv / _STAMP_NAME
    want = _stamp_payload(
        sys.base_prefix + "|" + ".".join(map(str, sys.version_info[:3]))
    )

    def fresh() -> bool:
        try:
            return py.exists() and json.loads(stamp.read_text())["key"] == want["key"]
        except (OSError, ValueError, KeyError):
            return False

    if fresh():
        return py

    venv.mkdir(parents=True, exist_ok=True)
    lock_fh = open(venv / ".lock", "w")
    try:
        try:
            import fcntl

            fcntl.flock(lock_fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        if fresh():  # someone else finished while we waited
            return py
        t0 = time.perf_counter()
        if stamp.exists():
            stamp.unlink()
        env = _child_env()
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(venv)], env=env)
        pip = [
            str(py),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ]
        _run(pip + list(PINNED_DEPS), env=env)
        _run(pip + ["--no-deps"] + list(PINNED_NODEPS), env=env)
        # Verify, and warm numba's on-disk cache.
        out = _run([str(py), "-c", _SMOKE], env=env, cwd=tempfile.gettempdir())
        freeze = _run(
            [str(py), "-m", "pip", "freeze", "--disable-pip-version-check"], env=env
        ).stdout
        payload = dict(
            want,
            freeze=freeze.split(),
            smoke=out.stdout.strip(),
            install_s=time.perf_counter() - t0,
        )
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(stamp)
        if verbose:
            print(
                f"[pgmax_env] built {venv} in {payload['install_s']:.1f}s: "
                f"{payload['smoke']}",
                file=sys.stderr,
            )
        return py
    finally:
        lock_fh.close()


def write_spec(
    path: os.PathLike | str,
    unary,
    horizontal,
    vertical,
    *,
    num_iters: int = 100,
    damping: float = 0.5,
    temperature: float = 1.0,
    repeats: int = 5,
) -> Path:
    """Write the .npz input of ``pgmax_ising.py`` (arrays cast to float32)."""
    import numpy as np

    path = Path(path)
    np.savez(
        path,
        unary=np.asarray(unary, np.float32),
        horizontal=np.asarray(horizontal, np.float32),
        vertical=np.asarray(vertical, np.float32),
        num_iters=np.int64(num_iters),
        damping=np.float64(damping),
        temperature=np.float64(temperature),
        repeats=np.int64(repeats),
    )
    return path


def run_pgmax(
    spec_npz: os.PathLike | str,
    out_json: os.PathLike | str,
    *,
    venv: os.PathLike | str = DEFAULT_VENV,
    timeout: float | None = 1800,
    conv_tol: float = 1e-6,
    extra_env: dict | None = None,
) -> dict:
    """Run ``pgmax_ising.py`` on ``spec_npz`` in the PGMax venv; return its JSON.

    The JSON is also left at ``out_json``. ``extra_env`` is added to the child's
    environment (e.g. ``{"XLA_FLAGS": "..."}``); JAX is forced to CPU (unless
    JAX_PLATFORMS is already set) and float32.
    """
    py = ensure_pgmax_venv(venv)
    spec_npz, out_json = Path(spec_npz).resolve(), Path(out_json).resolve()
    out_json.parent.mkdir(parents=True, exist_ok=True)
    _run(
        [
            str(py),
            str(RUNNER),
            "--spec",
            str(spec_npz),
            "--out",
            str(out_json),
            "--conv-tol",
            repr(conv_tol),
        ],
        env=_child_env(extra_env),
        cwd=tempfile.gettempdir(),
        timeout=timeout,
    )
    return json.loads(out_json.read_text())


def _verify(
    sizes: list[int], num_iters: int, damping: float, seed: int, tol: float
) -> int:
    """End-to-end: PGMax vs the plain-numpy twin (float64) on random grids.

    The twin is ``pgm_drm.testing.numpy_loopy_ising`` (written to PGMax's
    conventions; the flat kernel's tests use it too).
    """
    import numpy as np

    from pgm_drm.testing import ising_grid, numpy_loopy_ising

    t = time.perf_counter()
    py = ensure_pgmax_venv(verbose=True)
    print(f"venv ready in {time.perf_counter() - t:.2f}s: {py}")
    ok = True
    with tempfile.TemporaryDirectory() as td:
        for n in sizes:
            arrays = ising_grid(n, seed=seed + n)
            for temp in (1.0, 0.0):
                sp = write_spec(
                    Path(td) / f"s{n}_{temp}.npz",
                    **arrays,
                    num_iters=num_iters,
                    damping=damping,
                    temperature=temp,
                    repeats=5,
                )
                res = run_pgmax(sp, Path(td) / f"o{n}_{temp}.json")
                # The twin runs in float64 on the float32 potentials PGMax gets.
                r = numpy_loopy_ising(
                    {k: np.float32(v) for k, v in arrays.items()},
                    num_iters,
                    damping,
                    temp,
                )
                # PGMax's marginals are softmax(beliefs) at every temperature.
                marg = r["marginals"] / r["marginals"].sum(-1, keepdims=True)
                diff = float(np.max(np.abs(np.asarray(res["marginals"]) - marg)))
                map_mis = int(np.sum(np.asarray(res["map"]) != marg.argmax(-1)))
                below = np.nonzero(r["deltas"] < 1e-6)[0]
                iters = int(below[0]) + 1 if below.size else None
                good = diff < tol
                ok &= good
                print(
                    f"N={n:4d} T={temp:.0f}  "
                    f"first_result_s={res['first_result_s']:.3f} "
                    f"per_run_s={res['per_run_s']:.5f} "
                    f"(bp only {res['per_run_bp_only_s']:.5f}) "
                    f"iters_to_1e-6={res['iters_to_1e-6']} "
                    f"(numpy64 {iters}) "
                    f"final_delta={res['msg_deltas'][-1]:.1e} |marg-ref|max={diff:.2e} "
                    f"map_mismatch={map_mis} {'OK' if good else 'FAIL'}"
                )
        print("versions:", res["versions"], "| cpu:", res["cpu"], "x", res["cpu_count"])
    return 0 if ok else 1


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="Build the PGMax venv / verify the Ising twin."
    )
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--num-iters", type=int, default=100)
    ap.add_argument("--damping", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    if a.verify:
        raise SystemExit(_verify(a.sizes, a.num_iters, a.damping, a.seed, a.tol))
    print(ensure_pgmax_venv(verbose=True))
