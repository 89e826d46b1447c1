"""Private virtual environment for pgmpy, and a runner for its side of the bench.

pgmpy is not a dependency of ``pgm_drm``: ``ensure_pgmpy_venv()`` builds
``bench/.pgmpy-venv`` (git-ignored) on first use and returns its python; a stamp
file makes later calls instant. It installs the plain ``pgmpy`` wheel (pinned
below) with its declared dependencies: since pgmpy 1.0, torch and pyro are only
the optional ``[torch]`` extra, which the exact inference used here
(``BeliefPropagation``, ``VariableElimination``) does not import, so no
``pgmpy-no-torch`` repackaging is needed. Same machinery as ``pgmax_env.py``
(its helpers are reused).

``run_pgmpy()`` runs ``bench/pgmpy_runner.py`` in that venv on a spec written
by ``write_spec`` and returns its JSON.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

from pgmax_env import _child_env, _python_of, _run

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_VENV = BENCH_DIR / ".pgmpy-venv"
RUNNER = BENCH_DIR / "pgmpy_runner.py"
PINNED = ("pgmpy==1.1.2",)
_STAMP_NAME = ".pgmpy-stamp.json"


def _stamp_key() -> str:
    base = sys.base_prefix + "|" + ".".join(map(str, sys.version_info[:3]))
    return hashlib.sha256("\n".join(PINNED + (base,)).encode()).hexdigest()


def ensure_pgmpy_venv(path: Path = DEFAULT_VENV, *, verbose: bool = False) -> Path:
    """Create (once) the pgmpy venv at ``path`` and return its python.

    Raises RuntimeError with pip's output tail if the install fails (no network).
    """
    venv = Path(path).resolve()
    py, stamp, key = _python_of(venv), venv / _STAMP_NAME, _stamp_key()
    try:
        if py.exists() and json.loads(stamp.read_text())["key"] == key:
            return py
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.perf_counter()
    env = _child_env()
    if not py.exists():
        _run([sys.executable, "-m", "venv", str(venv)], env=env)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    _run(pip + list(PINNED), env=env)
    smoke = _run(
        [str(py), "-c", "import pgmpy, numpy; print(pgmpy.__version__)"],
        env=env,
        cwd=tempfile.gettempdir(),
    ).stdout.strip()
    freeze = _run(
        [str(py), "-m", "pip", "freeze", "--disable-pip-version-check"], env=env
    ).stdout.split()
    stamp.write_text(
        json.dumps(
            {
                "key": key,
                "pinned": list(PINNED),
                "freeze": freeze,
                "smoke": smoke,
                "install_s": time.perf_counter() - t0,
            },
            indent=1,
        )
    )
    if verbose:
        print(f"[pgmpy_env] built {venv}: pgmpy {smoke}", file=sys.stderr)
    return py


def write_spec(path: Path, unary, edges, pair, *, repeats: int = 5) -> Path:
    """The runner's input: a pairwise MRF, ``p(x) ∝ exp(sum_i unary[i, x_i] +
    sum_e pair[e, x_a, x_b])`` with ``edges[e] = (a, b)`` (float64 arrays)."""
    import numpy as np

    np.savez(
        path,
        unary=np.asarray(unary, np.float64),
        edges=np.asarray(edges, np.int64),
        pair=np.asarray(pair, np.float64),
        repeats=np.int64(repeats),
    )
    return Path(path)


def run_pgmpy(spec: Path, out: Path, *, timeout: float = 600) -> dict:
    """Run ``pgmpy_runner.py`` on ``spec`` in the pgmpy venv; return its JSON."""
    py = ensure_pgmpy_venv()
    _run(
        [str(py), str(RUNNER), "--spec", str(spec), "--out", str(out)],
        env=_child_env(),
        cwd=tempfile.gettempdir(),
        timeout=timeout,
    )
    return json.loads(Path(out).read_text())


if __name__ == "__main__":
    print(ensure_pgmpy_venv(verbose=True))
