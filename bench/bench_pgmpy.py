"""Exact inference vs pgmpy on the same tree and junction-tree graphs.

One run, side by side, on two pairwise MRFs with ``k`` states,
``p(x) ∝ exp(sum_i unary[i, x_i] + sum_(a,b) pair_ab[x_a, x_b])`` (float64):

* a random tree (each node's parent drawn among the earlier nodes): ours
  ``infer(fg, schedule="tree")`` (the flat kernel);
* an ``n x n`` grid (loops): ours ``infer(fg, schedule="exact")`` (junction tree).

The model is written as a user writes it (a loop of ``Categorical(logits=unary[i])``
sites and one ``numpyro.factor`` per edge, ``unary`` passed as evidence) and
compiled once by ``compile_model``. One *query* is every variable's marginal
(sum) or the joint MAP (max) of one evidence instance. pgmpy 1.1.2 runs in its own
venv (``bench/pgmpy_env.py``; ``bench/pgmpy_runner.py``): ``BeliefPropagation``
(construction + calibrate + query) and ``VariableElimination`` (greedy order).
Agreement: max |marginal difference| and the fraction of MAP sites equal.
Ours is also timed on a batch of queries in one vmapped call (per query).

    python bench/bench_pgmpy.py [--quick] [--json PATH]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from common import (
    Report,
    faster,
    fmt_e,
    fmt_s,
    parser,
    platforms_default,
    ratio,
    steady,
)

platforms_default()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402

SIZES = {
    True: {"tree_n": 15, "grid_n": 3, "k": 3, "batch": 64, "repeats": 3},
    False: {"tree_n": 200, "grid_n": 5, "k": 3, "batch": 1000, "repeats": 5},
}


def random_tree(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    edges = np.array([(int(rng.integers(0, i)), i) for i in range(1, n)])
    return rng.normal(size=(n, k)), edges, rng.normal(size=(len(edges), k, k))


def grid(n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    idx = np.arange(n * n).reshape(n, n)
    edges = [(idx[i, j], idx[i, j + 1]) for i in range(n) for j in range(n - 1)]
    edges += [(idx[i, j], idx[i + 1, j]) for i in range(n - 1) for j in range(n)]
    edges = np.array(edges)
    return rng.normal(size=(n * n, k)), edges, rng.normal(size=(len(edges), k, k))


def mrf_model(n: int, edges: np.ndarray, pair: np.ndarray):
    pair_j = jnp.asarray(pair)

    def model(unary):
        x = [
            numpyro.sample(f"x{i}", dist.Categorical(logits=unary[i])) for i in range(n)
        ]
        for e, (a, b) in enumerate(edges):
            numpyro.factor(f"f{e}", pair_j[e][x[a], x[b]])

    return model


def run_graph(name, schedule, unary, edges, pair, cfg, work: Path) -> dict:
    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from pgmpy_env import DEFAULT_VENV, run_pgmpy, write_spec

    n = unary.shape[0]
    reps = cfg["repeats"]
    model = mrf_model(n, edges, pair)
    names = [f"x{i}" for i in range(n)]

    t0 = time.perf_counter()
    fg = compile_model(model, unary=jnp.asarray(unary))
    post = infer(fg, "sum", schedule=schedule, map=False, unary=unary)
    ours_marg = np.exp(np.stack([np.asarray(post.log_marginals[v]) for v in names]))
    first_s = time.perf_counter() - t0
    mp = infer(fg, "max", schedule=schedule, unary=unary)
    ours_map = np.array([int(mp.map[v]) for v in names])
    sum_s = steady(
        lambda: jax.block_until_ready(
            infer(fg, "sum", schedule=schedule, map=False, unary=unary)
        ),
        reps,
    )
    max_s = steady(
        lambda: jax.block_until_ready(infer(fg, "max", schedule=schedule, unary=unary)),
        reps,
    )
    batch = unary[None] + np.random.default_rng(1).normal(
        size=(cfg["batch"], *unary.shape)
    )
    sum_b = (
        steady(
            lambda: jax.block_until_ready(
                infer(fg, "sum", schedule=schedule, map=False, unary=batch)
            ),
            reps,
        )
        / cfg["batch"]
    )
    res = {
        "graph": name,
        "schedule": schedule,
        "n": n,
        "k": unary.shape[1],
        "edges": len(edges),
        "ours_first_s": first_s,
        "ours_sum_s": sum_s,
        "ours_max_s": max_s,
        "ours_sum_batched_s": sum_b,
    }
    try:
        if os.environ.get("BENCH_SKIP_PGMPY") == "1":
            raise RuntimeError("skipped (BENCH_SKIP_PGMPY=1)")
        stamp = DEFAULT_VENV / ".pgmpy-stamp.json"
        if not stamp.exists() and os.environ.get("BENCH_BUILD_VENVS") == "0":
            raise RuntimeError(
                "venv not built and BENCH_BUILD_VENVS=0 (a quick run): run "
                "`make bench` or `python bench/pgmpy_env.py` once"
            )
        spec = write_spec(work / f"{name}.npz", unary, edges, pair, repeats=reps)
        pg = run_pgmpy(spec, work / f"{name}.json")
    except Exception as exc:  # no network for the venv, pgmpy failure: report
        res["pgmpy_error"] = f"{type(exc).__name__}: {exc}"[-600:]
        return res
    res["pgmpy_versions"] = pg["versions"]
    for key in ("bp_marginals", "ve_marginals", "bp_map", "ve_map"):
        res[f"pgmpy_{key}_s"] = pg.get(f"{key}_s")
    res["pgmpy_map_skipped"] = pg.get("map_skipped")
    res["max_marg_diff_bp"] = float(np.max(np.abs(ours_marg - pg["bp_marginals"])))
    res["max_marg_diff_ve"] = float(np.max(np.abs(ours_marg - pg["ve_marginals"])))
    for peer in ("bp", "ve"):
        if f"{peer}_map" in pg:
            same = ours_map == np.array(pg[f"{peer}_map"])
            res[f"map_agree_{peer}"] = float(np.mean(same))
    return res


def _agree(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    cfg = SIZES[args.quick]
    rep = Report("pgmpy", args)
    work = Path(tempfile.mkdtemp(prefix="bench_pgmpy_"))
    k = cfg["k"]
    graphs = [
        (f"tree{cfg['tree_n']}", "tree", *random_tree(cfg["tree_n"], k, 0)),
        (f"grid{cfg['grid_n']}", "exact", *grid(cfg["grid_n"], k, 1)),
    ]
    if cfg["grid_n"] > 3:  # a grid small enough for pgmpy's map_query
        graphs.append(("grid3", "exact", *grid(3, k, 1)))
    results = []
    for name, sched, unary, edges, pair in graphs:
        results.append(run_graph(name, sched, unary, edges, pair, cfg, work))
        rep.data["raw"][name] = results[-1]
        rep.write()
    rows, agree = [], []
    for r in results:
        desc = f"{r['graph']} ({r['n']} vars, k={r['k']}, {r['schedule']})"
        if "pgmpy_error" in r:
            rows.append(
                [
                    desc,
                    fmt_s(r["ours_sum_s"]),
                    "-",
                    "-",
                    fmt_s(r["ours_max_s"]),
                    "-",
                    "-",
                ]
            )
            agree.append([desc, "pgmpy failed: " + r["pgmpy_error"][:200], "", ""])
            continue
        rows.append(
            [
                desc,
                f"{fmt_s(r['ours_sum_s'])} ({fmt_s(r['ours_sum_batched_s'])} batched)",
                fmt_s(r["pgmpy_bp_marginals_s"]),
                fmt_s(r["pgmpy_ve_marginals_s"]),
                fmt_s(r["ours_max_s"]),
                fmt_s(r["pgmpy_bp_map_s"]) if r["pgmpy_bp_map_s"] else "not run*",
                fmt_s(r["pgmpy_ve_map_s"]) if r["pgmpy_ve_map_s"] else "not run*",
            ]
        )
        agree.append(
            [
                desc,
                f"{fmt_e(r['max_marg_diff_bp'])} / {fmt_e(r['max_marg_diff_ve'])}",
                f"{_agree(r.get('map_agree_bp'))} / {_agree(r.get('map_agree_ve'))}",
                fmt_s(r["ours_first_s"]),
            ]
        )
        best = min(("bp", "ve"), key=lambda p: r[f"pgmpy_{p}_marginals_s"])
        t_best = r[f"pgmpy_{best}_marginals_s"]
        rep.headline(
            f"pgmpy_{r['graph']}",
            ratio(t_best, r["ours_sum_s"]),
            f"all marginals of {desc}: {faster(ratio(t_best, r['ours_sum_s']))} "
            f"than pgmpy's best ("
            f"{'BeliefPropagation' if best == 'bp' else 'VariableElimination'}, "
            f"{fmt_s(t_best)} vs {fmt_s(r['ours_sum_s'])}); "
            f"{faster(ratio(t_best, r['ours_sum_batched_s']))} per query in a batch",
        )
    versions = next((r["pgmpy_versions"] for r in results if "pgmpy_versions" in r), {})
    rep.table(
        "Exact inference vs pgmpy: time per query (one evidence instance)",
        [
            "graph",
            "ours: all marginals",
            "pgmpy BP",
            "pgmpy VE",
            "ours: MAP",
            "pgmpy BP map_query",
            "pgmpy VE map_query",
        ],
        rows,
        f"pgmpy {versions.get('pgmpy', '?')} (plain wheel, no torch) in "
        "bench/.pgmpy-venv, numpy "
        f"{versions.get('numpy', '?')}; float64 both; min of repeats after a "
        "first call; 'batched': per query in one vmapped call of the batch. pgmpy "
        "BP: calibrate, then each marginal from a clique belief; VE: query([v]) "
        "per variable. *pgmpy's map_query builds the joint table of all the "
        "variables (k^n entries): not run beyond 2e6 entries",
    )
    rep.table(
        "Exact inference vs pgmpy: agreement",
        [
            "graph",
            "max |marginal diff| vs BP / VE",
            "MAP sites equal, BP / VE",
            "ours first result (compile + infer)",
        ],
        agree,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
