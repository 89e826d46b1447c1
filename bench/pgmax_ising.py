"""Run PGMax 0.6.1 loopy belief propagation on a 2D Ising grid (benchmark twin).

Standalone script: it runs with the python of the PGMax virtual environment
(see ``bench/pgmax_env.py``) and imports nothing from ``pgm_drm``.

    <venv>/bin/python bench/pgmax_ising.py --spec SPEC.npz --out OUT.json

Input (``SPEC.npz``)
--------------------
* ``unary``      (N, N, 2)        log-potentials (PGMax "evidence") of x[i, j].
* ``horizontal`` (N, N-1, 2, 2)   log-potential of the factor between x[i, j]
  and x[i, j+1]; axis order [state of x[i, j], state of x[i, j+1]].
* ``vertical``   (N-1, N, 2, 2)   log-potential of the factor between x[i, j]
  and x[i+1, j]; axis order [state of x[i, j], state of x[i+1, j]].
* scalars ``num_iters`` (int), ``damping`` (float), ``temperature`` (float:
  1.0 sum-product, 0.0 max-product) and ``repeats`` (int, timed steady runs).
All arrays are cast to float32 (JAX runs with x64 disabled).

PGMax conventions (0.6.1, read from ``pgmax/infer/bp.py``,
``pgmax/factor/enum.py``, ``pgmax/factor/update_utils.py``) -- our side must
match them to be comparable:

* State of BP: the factor-to-variable messages ``m_{f->v}(x_v)`` (log space),
  one vector per (factor, variable) edge, initialised to 0. All messages are
  updated in parallel (flooding schedule) at every iteration.
* Variable-to-factor: ``n_{v->f} = evidence_v + sum_{g in N(v)} m_{g->v}
  - m_{f->v}`` (the evidence, i.e. the unary log-potential, is not scaled).
* Factor-to-variable at temperature T (the log-potentials are NOT divided by
  T):  ``c_{f->v}(x_v) = T * log sum_{x_f \\ x_v} exp((theta_f(x_f)
  + sum_{u in f} n_{u->f}(x_u)) / T) - n_{v->f}(x_v)``; T == 0 uses ``max``
  instead (max-product). T == 1 is ordinary sum-product.
* Damping, in log space, with the *previous* (normalised) messages:
  ``new = damping * old + (1 - damping) * computed``, then normalised.
* Normalisation: after every iteration each message vector is shifted so that
  its maximum is 0 (``m - max_x m(x)``), then clipped from below at -1e32.
  Because the shift is a per-edge constant, it does not matter whether
  ``computed`` is normalised before damping. Log-potentials are clipped to
  [-1e6, 1e6] (irrelevant here).
* Convergence monitor: ``delta_k = max |m_k - m_{k-1}|`` over all normalised
  message entries (PGMax's ``run_with_diffs``).
* Beliefs: ``b_v = evidence_v + sum_{f in N(v)} m_{f->v}``.
  Marginals (``infer.get_marginals``): ``softmax(b_v)`` -- no temperature
  scaling. At T=1 these are the sum-product marginal estimates; at T=0 they
  are PGMax's "normalised max-marginals" ``exp(b_v) / sum exp(b_v)`` (the
  max-product beliefs pushed through a plain softmax). MAP decoding is
  ``argmax b_v`` (``infer.decode_map_states``).

Output JSON keys: see ``main()`` / README in ``bench/pgmax_env.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="input .npz")
    ap.add_argument("--out", required=True, help="output .json")
    ap.add_argument("--conv-tol", type=float, default=1e-6)
    args = ap.parse_args(argv)

    t_imp = time.perf_counter()
    import jax
    import jax.numpy as jnp
    import jaxlib
    import pgmax
    from pgmax import fgraph, fgroup, infer, vgroup

    import_s = time.perf_counter() - t_imp

    with np.load(args.spec) as z:
        unary = np.asarray(z["unary"], dtype=np.float32)
        horizontal = np.asarray(z["horizontal"], dtype=np.float32)
        vertical = np.asarray(z["vertical"], dtype=np.float32)
        num_iters = int(z["num_iters"])
        damping = float(z["damping"])
        temperature = float(z["temperature"])
        repeats = int(z["repeats"]) if "repeats" in z.files else 5
    n = unary.shape[0]
    assert unary.shape == (n, n, 2), unary.shape
    assert horizontal.shape == (n, n - 1, 2, 2), horizontal.shape
    assert vertical.shape == (n - 1, n, 2, 2), vertical.shape
    assert num_iters >= 1 and repeats >= 1

    # ---- first result: graph building + compile + run + marginals on host --
    t0 = time.perf_counter()
    variables = vgroup.NDVarArray(num_states=2, shape=(n, n))
    fg = fgraph.FactorGraph(variable_groups=variables)
    # Factor order: horizontal factors row-major over (i, j), then vertical.
    h_group = fgroup.PairwiseFactorGroup(
        variables_for_factors=[
            [variables[i, j], variables[i, j + 1]]
            for i in range(n)
            for j in range(n - 1)
        ],
        log_potential_matrix=horizontal.reshape(-1, 2, 2),
    )
    v_group = fgroup.PairwiseFactorGroup(
        variables_for_factors=[
            [variables[i, j], variables[i + 1, j]]
            for i in range(n - 1)
            for j in range(n)
        ],
        log_potential_matrix=vertical.reshape(-1, 2, 2),
    )
    fg.add_factors([h_group, v_group])
    bp = infer.build_inferer(fg.bp_state, backend="bp")
    bp_arrays = bp.init(evidence_updates={variables: unary})

    def infer_fn(arrays):
        arrays = bp.run(
            arrays, num_iters=num_iters, damping=damping, temperature=temperature
        )
        beliefs = bp.get_beliefs(arrays)[variables]
        marginals = infer.get_marginals({variables: beliefs})[variables]
        return marginals, beliefs

    infer_jit = jax.jit(infer_fn)
    marginals, beliefs = infer_jit(bp_arrays)
    marginals = np.asarray(jax.block_until_ready(marginals))
    beliefs = np.asarray(beliefs)
    first_result_s = time.perf_counter() - t0

    # ---- steady state: same jitted call on the same arrays -----------------
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = infer_jit(bp_arrays)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t)
    per_run_s = statistics.median(times)

    # BP only (no beliefs/marginals), for reference.
    run_only = jax.jit(
        lambda a: (
            bp.run(
                a, num_iters=num_iters, damping=damping, temperature=temperature
            ).ftov_msgs
        )
    )
    jax.block_until_ready(run_only(bp_arrays))
    times_bp = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(run_only(bp_arrays))
        times_bp.append(time.perf_counter() - t)

    # ---- convergence: one iteration at a time from the previous messages ---
    step = jax.jit(
        lambda a: bp.run_with_diffs(
            a, num_iters=1, damping=damping, temperature=temperature
        )
    )
    arrays = bp_arrays
    deltas = []
    iters_to_tol = None
    for k in range(1, num_iters + 1):
        arrays, d = step(arrays)
        dk = float(d[0])
        deltas.append(dk)
        if iters_to_tol is None and dk < args.conv_tol:
            iters_to_tol = k
    step_marg = np.asarray(
        infer.get_marginals({variables: bp.get_beliefs(arrays)[variables]})[variables]
    )
    step_vs_scan = float(np.max(np.abs(step_marg - marginals)))

    map_states = np.asarray(jnp.argmax(beliefs, axis=-1))

    result = {
        "tool": "pgmax",
        "n": n,
        "num_variables": n * n,
        "num_factors": 2 * n * (n - 1),
        "num_iters": num_iters,
        "damping": damping,
        "temperature": temperature,
        "repeats": repeats,
        "dtype": str(marginals.dtype),
        "import_s": import_s,
        "first_result_s": first_result_s,
        "per_run_s": per_run_s,
        "per_run_all_s": times,
        "per_run_bp_only_s": statistics.median(times_bp),
        "conv_tol": args.conv_tol,
        "iters_to_1e-6": iters_to_tol,
        "msg_deltas": deltas,
        "step_vs_scan_max_abs_diff": step_vs_scan,
        # Sum-product marginals (T=1) or PGMax's normalised max-marginals
        # softmax(beliefs) (T=0); see module docstring.
        "marginals": marginals.astype(np.float64).tolist(),
        "map": map_states.astype(int).tolist(),
        "versions": {
            "pgmax": pgmax.__version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.jax_enable_x64),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    with open(args.out, "w") as fh:
        json.dump(result, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
