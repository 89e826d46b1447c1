"""pgmpy's side of the exact-inference bench (runs in ``bench/.pgmpy-venv``).

Standalone: imports nothing from ``pgm_drm``. Reads a pairwise MRF written by
``pgmpy_env.write_spec`` (``unary`` (n, k), ``edges`` (m, 2), ``pair`` (m, k, k)
log-potentials), builds a ``DiscreteMarkovNetwork`` with one ``DiscreteFactor``
per node and per edge (``exp`` of the log-potentials) and times, each the best of
``repeats`` calls after a first one:

* ``BeliefPropagation``: construction + ``calibrate()``, then every variable's
  marginal read off a calibrated clique belief (``get_clique_beliefs``,
  ``marginalize``, ``normalize``) -- pgmpy's cheapest way to all marginals
  (``query(variables=all, joint=False)`` contracts the joint table of all the
  variables first: 26 GiB on a 30-node tree with k=3);
* ``VariableElimination``: ``query([v])`` for every variable (greedy order);
* both ``map_query()`` (joint MAP of all variables). Both build the joint table
  of the queried variables, so they run only when ``k ** n <= MAP_MAX_TABLE``.

    <venv>/bin/python bench/pgmpy_runner.py --spec SPEC.npz --out OUT.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings

import numpy as np

MAP_MAX_TABLE = 2_000_000


def _best(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    t0 = time.perf_counter()
    import pgmpy
    from pgmpy.factors.discrete import DiscreteFactor
    from pgmpy.inference import BeliefPropagation, VariableElimination
    from pgmpy.models import DiscreteMarkovNetwork

    import_s = time.perf_counter() - t0
    with np.load(args.spec) as z:
        unary, edges, pair = z["unary"], z["edges"], z["pair"]
        repeats = int(z["repeats"])
    n, k = unary.shape
    names = [f"x{i}" for i in range(n)]

    def build():
        mn = DiscreteMarkovNetwork()
        mn.add_nodes_from(names)
        mn.add_edges_from([(names[a], names[b]) for a, b in edges])
        mn.add_factors(
            *[DiscreteFactor([names[i]], [k], np.exp(unary[i])) for i in range(n)],
            *[
                DiscreteFactor([names[a], names[b]], [k, k], np.exp(p))
                for (a, b), p in zip(edges, pair, strict=True)
            ],
        )
        return mn

    mn = build()

    def bp_marginals():
        bp = BeliefPropagation(mn)
        bp.calibrate()
        beliefs = bp.get_clique_beliefs()
        home = {}
        for clique in beliefs:
            for v in clique:
                home.setdefault(v, clique)
        out = {}
        for v in names:
            phi = beliefs[home[v]]
            keep = [u for u in phi.variables if u != v]
            out[v] = phi.marginalize(keep, inplace=False).normalize(inplace=False)
        return out

    def bp_map():
        return BeliefPropagation(mn).map_query(show_progress=False)

    ve = VariableElimination(mn)

    def ve_marginals():
        return {v: ve.query([v], show_progress=False) for v in names}

    def ve_map():
        return ve.map_query(show_progress=False)

    out = {"n": int(n), "k": int(k), "n_edges": int(len(edges))}
    out["versions"] = {"pgmpy": pgmpy.__version__, "numpy": np.__version__}
    out["import_s"] = import_s
    map_ok = k**n <= MAP_MAX_TABLE
    out["map_skipped"] = (
        None
        if map_ok
        else (
            f"map_query builds the joint table of all {n} variables ({k}^{n} entries)"
        )
    )
    for name, fn in (
        ("bp_marginals", bp_marginals),
        ("bp_map", bp_map),
        ("ve_marginals", ve_marginals),
        ("ve_map", ve_map),
    ):
        if name.endswith("map") and not map_ok:
            continue
        res, first, best = _best(fn, repeats)
        out[f"{name}_first_s"], out[f"{name}_s"] = first, best
        if name.endswith("marginals"):
            out[name] = [
                np.asarray(res[v].normalize(inplace=False).values).tolist()
                for v in names
            ]
        else:
            out[name] = [int(res[v]) for v in names]
    with open(args.out, "w") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main()
