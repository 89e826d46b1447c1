"""Plain-numpy reference twin of PGMax's loopy BP on a 2D grid of binary variables.

Independent of PGMax and of ``pgm_drm``: written from the conventions stated
in ``bench/pgmax_ising.py`` (flooding schedule, factor-to-variable messages as
the state, log-space damping ``new = damping*old + (1-damping)*computed``,
per-message max-normalisation to 0, temperature-T soft-max message updates
with un-scaled potentials, marginals = softmax(beliefs)).

Same input layout as ``pgmax_ising.py``: ``unary`` (N, N, 2), ``horizontal``
(N, N-1, 2, 2) with axes [x[i,j], x[i,j+1]], ``vertical`` (N-1, N, 2, 2) with
axes [x[i,j], x[i+1,j]]. Slow is fine; it is only a correctness reference.
"""

from __future__ import annotations

import numpy as np


def _reduce(a: np.ndarray, axis: int, temperature: float) -> np.ndarray:
    """T * log sum exp(a / T) over ``axis`` (max when T == 0)."""
    mx = np.max(a, axis=axis, keepdims=True)
    if temperature == 0.0:
        return np.squeeze(mx, axis=axis)
    s = np.sum(np.exp((a - mx) / temperature), axis=axis, keepdims=True)
    return np.squeeze(mx + temperature * np.log(s), axis=axis)


def _normalise(m: np.ndarray) -> np.ndarray:
    return m - np.max(m, axis=-1, keepdims=True)


def loopy_bp(
    unary: np.ndarray,
    horizontal: np.ndarray,
    vertical: np.ndarray,
    num_iters: int,
    damping: float = 0.5,
    temperature: float = 1.0,
    dtype=np.float64,
    conv_tol: float = 1e-6,
) -> dict:
    """Run flooding loopy BP; return marginals, beliefs, map, deltas, messages.

    Messages (factor -> variable), each (..., 2), normalised (max 0):
      hl[i, j]: horizontal factor (i,j)-(i,j+1) -> x[i, j]   (left end)
      hr[i, j]: horizontal factor (i,j)-(i,j+1) -> x[i, j+1] (right end)
      vu[i, j]: vertical factor (i,j)-(i+1,j)   -> x[i, j]   (upper end)
      vd[i, j]: vertical factor (i,j)-(i+1,j)   -> x[i+1, j] (lower end)
    """
    u = np.asarray(unary, dtype=dtype)
    H = np.asarray(horizontal, dtype=dtype)
    V = np.asarray(vertical, dtype=dtype)
    n = u.shape[0]
    hl = np.zeros((n, n - 1, 2), dtype)
    hr = np.zeros((n, n - 1, 2), dtype)
    vu = np.zeros((n - 1, n, 2), dtype)
    vd = np.zeros((n - 1, n, 2), dtype)

    def beliefs_of(hl, hr, vu, vd):
        b = u.copy()
        b[:, :-1] += hl
        b[:, 1:] += hr
        b[:-1, :] += vu
        b[1:, :] += vd
        return b

    deltas = []
    iters_to_tol = None
    for k in range(1, num_iters + 1):
        b = beliefs_of(hl, hr, vu, vd)
        # variable -> factor messages (belief minus the factor's own message)
        n_hl = b[:, :-1] - hl  # x[i,j]   -> horizontal factor (i,j)
        n_hr = b[:, 1:] - hr  # x[i,j+1] -> horizontal factor (i,j)
        n_vu = b[:-1, :] - vu  # x[i,j]   -> vertical factor (i,j)
        n_vd = b[1:, :] - vd  # x[i+1,j] -> vertical factor (i,j)
        # factor summaries over (a, b) configurations, then marginalise
        sh = H + n_hl[..., :, None] + n_hr[..., None, :]
        sv = V + n_vu[..., :, None] + n_vd[..., None, :]
        c_hl = _reduce(sh, -1, temperature) - n_hl
        c_hr = _reduce(sh, -2, temperature) - n_hr
        c_vu = _reduce(sv, -1, temperature) - n_vu
        c_vd = _reduce(sv, -2, temperature) - n_vd
        new = [
            _normalise(damping * old + (1.0 - damping) * c)
            for old, c in ((hl, c_hl), (hr, c_hr), (vu, c_vu), (vd, c_vd))
        ]
        delta = max(
            float(np.max(np.abs(a - b_)))
            for a, b_ in zip(new, (hl, hr, vu, vd), strict=True)
        )
        deltas.append(delta)
        if iters_to_tol is None and delta < conv_tol:
            iters_to_tol = k
        hl, hr, vu, vd = new

    b = beliefs_of(hl, hr, vu, vd)
    e = np.exp(b - np.max(b, axis=-1, keepdims=True))
    marginals = e / np.sum(e, axis=-1, keepdims=True)
    return {
        "marginals": marginals,
        "beliefs": b,
        "map": np.argmax(b, axis=-1),
        "msg_deltas": deltas,
        "iters_to_tol": iters_to_tol,
        "messages": {"hl": hl, "hr": hr, "vu": vu, "vd": vd},
    }


def random_ising_spec(
    n: int, seed: int = 0, coupling_std: float = 0.5, unary_std: float = 1.0
) -> dict:
    """unary ~ N(0, unary_std), J ~ N(0, coupling_std) (std), pairwise
    log-potential [[J, -J], [-J, J]]; float32 arrays."""
    rng = np.random.default_rng(seed)
    unary = rng.normal(0.0, unary_std, size=(n, n, 2)).astype(np.float32)
    jh = rng.normal(0.0, coupling_std, size=(n, n - 1)).astype(np.float32)
    jv = rng.normal(0.0, coupling_std, size=(n - 1, n)).astype(np.float32)
    sign = np.array([[1.0, -1.0], [-1.0, 1.0]], dtype=np.float32)
    return {
        "unary": unary,
        "horizontal": jh[..., None, None] * sign,
        "vertical": jv[..., None, None] * sign,
    }
