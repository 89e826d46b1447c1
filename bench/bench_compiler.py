"""compile_model + infer on models written as users write them, side by side.

One run compares, on the same inputs, and prints ratios:

1. RM (10 classes, 16 nuisances, 8x8, switch, float64): ``infer`` on a batch of
   images vs NumPyro's vmapped, jitted funsor ``log_density`` (log Z), vs
   ``rm.class_log_scores`` and vs one numpy template matmul (the floor).
2. A chain written as a Python loop (``chain_loop_model``, k=4, float64, tree
   schedule) vs a numpy forward-backward twin.
3. An Ising grid written as a double loop (``ising_loop_model``, float32), loopy
   100 iterations, damping 0.5, sum- and max-product, vs PGMax 0.6.1 (its own
   venv, ``bench/pgmax_env.py``).
4. A 3-level DRM (float32, batch 64): ``compile_model`` + ``infer(fg, "max")`` vs
   the hand-written DCN-form pass ``drm.infer``.

Every case runs in its own subprocess (peak RSS per case; a slow case is killed
after its timeout and reported as "did not finish", with what it had finished).
Times are wall clock after ``block_until_ready``; "first result" runs from just
before ``compile_model`` to the first result on the host (all tracing and XLA
compilation included, imports excluded); "steady" is the min of >= 3 repeats after
a warm-up. Writes ``bench/out/compiler.json`` and ``bench/out/compiler_scaling.png``.

    python bench/bench_compiler.py [--quick] [--only rm,chain,hmm,ising,drm]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

BENCH_DIR = Path(__file__).resolve().parent
# BENCH_OUT_DIR: where the raw JSON, logs and plots go (gpu.sh keeps its own).
OUT_DIR = Path(os.environ.get("BENCH_OUT_DIR") or BENCH_DIR / "out")

# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #

QUICK = {
    "rm_images": 500,
    "enum_images": 2,
    "chain_n": (100,),
    "hmm_n": (100,),
    "ising_n": (10,),
    "drm_sizes": (8,),
    "drm_processes": 1,
    "repeats": 3,
    "timeouts": {
        "info": 60,
        "rm": 120,
        "chain": 150,
        "hmm": 150,
        "ising": 180,
        "pgmax": 120,
        "drm": 150,
    },
}
FULL = {
    "rm_images": 10_000,
    "enum_images": 50,
    "chain_n": (1000, 10_000),
    "hmm_n": (1000, 4000),
    "ising_n": (10, 30, 100),
    "drm_sizes": (8, 16, 32, 64),
    "drm_processes": 3,
    "repeats": 5,
    "timeouts": {
        "info": 60,
        "rm": 600,
        "chain": 600,
        "hmm": 600,
        "ising": 900,
        "pgmax": 600,
        "drm": 600,
    },
}
NUM_ITERS, DAMPING, CONV_TOL = 100, 0.5, 1e-6
DRM_BATCH = 64


# --------------------------------------------------------------------------- #
# Child side: one case per process
# --------------------------------------------------------------------------- #


def _peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux: KiB


class Recorder:
    """A dict that rewrites its JSON file on every update (partial results survive
    a timeout kill)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {}

    def __setitem__(self, key, value) -> None:
        self.data[key] = value
        self.flush()

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def flush(self) -> None:
        self.data["peak_rss_mib"] = _peak_rss_mib()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def _steady(fn, repeats: int) -> float:
    """Min wall time of ``repeats`` calls after one warm-up call (``fn`` blocks)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _numpyro_run_s(model, **kwargs) -> float:
    """Wall time of one plain NumPyro execution of ``model`` (seeded trace, eager,
    validation off as in ``compile_model``; the faster of two): the floor for
    anything that must run a loop-written model at least once."""
    import numpyro
    from numpyro import handlers

    best = math.inf
    for _ in range(2):  # the second run: eager ops already compiled (the strict floor)
        t0 = time.perf_counter()
        with numpyro.validation_enabled(False):
            handlers.trace(handlers.seed(model, 0)).get_trace(**kwargs)
        best = min(best, time.perf_counter() - t0)
    return best


def _interleaved_blocked(fns: dict, rounds: int) -> dict:
    """``bench/common.interleaved`` (round-robin min wall times) of functions
    whose JAX results it blocks on."""
    import jax

    sys.path.insert(0, str(BENCH_DIR))
    from common import interleaved

    return interleaved(
        {k: (lambda fn=fn: jax.block_until_ready(fn())) for k, fn in fns.items()},
        rounds,
    )


def _floor_row(label: str, first_s, numpyro_s) -> tuple[str, float | None, str]:
    """A ratio row: a loop-written model's first result over one NumPyro run."""
    return (
        f"{label}: first result / one NumPyro run of the model",
        _ratio(first_s, numpyro_s),
        f"first {_fmt_s(first_s)}, NumPyro run {_fmt_s(numpyro_s)}",
    )


def _graph_stats(fg) -> dict:
    return {
        "n_variables": int(fg.n_variables),
        "n_factors": int(fg.n_factors),
        "n_factor_groups": len(fg.factor_groups),
        "graph_size": int(fg.n_variables) + int(fg.n_factors),
    }


def case_info(p: dict, rec: Recorder) -> None:
    import importlib.metadata as md

    import jax

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    dev = jax.devices()[0]
    rec.update(
        device_kind=dev.device_kind,
        platform=dev.platform,
        n_devices=len(jax.devices()),
        versions={
            k: version(k)
            for k in ("jax", "jaxlib", "numpyro", "funsor", "numpy", "pgm_drm")
        }
        | {"python": platform.python_version()},
    )


def case_rm(p: dict, rec: Recorder) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from numpyro.contrib.funsor import config_enumerate, enum, log_density

    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer
    from pgm_drm.models import RenderingModel

    reps = max(p["repeats"], 10)  # each call takes milliseconds
    templates = np.random.default_rng(0).normal(size=(10, 16, 8, 8))
    rm = RenderingModel(templates, sigma=0.5, switch_prior=0.9)
    images, _ = rm.sample(jax.random.PRNGKey(0), p["images"])
    images = jax.block_until_ready(images)
    n = int(images.shape[0])
    rec.update(n_images=n, dtype=str(images.dtype))

    t0 = time.perf_counter()
    fg = compile_model(rm.model, image=images[0])
    t_compile = time.perf_counter() - t0
    log_z = np.asarray(infer(fg, "sum", map=False, image=images).log_z)
    t_first = time.perf_counter() - t0
    rec.update(compile_s=t_compile, first_result_s=t_first, **_graph_stats(fg))

    us = {}
    for sem, want_map in (("sum", False), ("sum", True), ("max", False), ("max", True)):
        key = f"ours_{sem}{'' if want_map else '_nomap'}"
        us[key] = (
            1e6
            / n
            * _steady(
                lambda s=sem, m=want_map: jax.block_until_ready(
                    infer(fg, s, map=m, image=images)
                ),
                reps,
            )
        )
        rec["us_per_image"] = us
    # The same work as NumPyro's log_density: log Z only (no marginals, no MAP).
    us["ours_sum_logz_only"] = (
        1e6
        / n
        * _steady(
            lambda: jax.block_until_ready(
                infer(fg, "sum", map=False, marginals=False, image=images).log_z
            ),
            reps,
        )
    )

    model = enum(config_enumerate(rm.model), first_available_dim=-1)
    f = jax.jit(jax.vmap(lambda img: log_density(model, (), {"image": img}, {})[0]))
    t0 = time.perf_counter()
    log_z_np = np.asarray(f(images))
    rec["numpyro_first_result_s"] = time.perf_counter() - t0
    us["numpyro_log_density"] = (
        1e6 / n * _steady(lambda: jax.block_until_ready(f(images)), reps)
    )
    for sem in ("max", "sum"):
        us[f"class_log_scores_{sem}"] = (
            1e6
            / n
            * _steady(
                lambda s=sem: jax.block_until_ready(rm.class_log_scores(images, s)),
                reps,
            )
        )
    x = np.asarray(images).reshape(n, -1)
    w = np.asarray(templates).reshape(10 * 16, -1).T.copy()
    us["numpy_matmul"] = 1e6 / n * _steady(lambda: x @ w, max(reps, 5))
    rec.update(
        us_per_image=us, max_abs_log_z_diff=float(np.max(np.abs(log_z - log_z_np)))
    )

    # MAP: ours (max-sum, MAP only) vs NumPyro's infer_discrete(temperature=0),
    # jitted and vmapped over the same images.
    from numpyro import handlers
    from numpyro.contrib.funsor import infer_discrete

    ours_map = infer(fg, "max", marginals=False, image=images).map
    sites = sorted(ours_map)
    us["ours_max_map_only"] = (
        1e6
        / n
        * _steady(
            lambda: jax.block_until_ready(
                infer(fg, "max", marginals=False, image=images).map
            ),
            reps,
        )
    )
    rec["us_per_image"] = us
    discrete = infer_discrete(
        config_enumerate(rm.model),
        first_available_dim=-1,
        temperature=0,
        rng_key=jax.random.PRNGKey(0),
    )

    def map_one(img):
        tr = handlers.trace(discrete).get_trace(image=img)
        return {s: tr[s]["value"] for s in sites}

    g = jax.jit(jax.vmap(map_one))
    t0 = time.perf_counter()
    np_map = jax.device_get(g(images))
    rec["numpyro_map_first_result_s"] = time.perf_counter() - t0
    us["numpyro_infer_discrete"] = (
        1e6 / n * _steady(lambda: jax.block_until_ready(g(images)), reps)
    )
    same = np.ones(n, bool)
    for s in sites:
        same &= np.all(
            np.asarray(ours_map[s]).reshape(n, -1)
            == np.asarray(np_map[s]).reshape(n, -1),
            axis=1,
        )
    rec.update(us_per_image=us, map_agreement_numpyro=float(same.mean()))
    # The headline ratios again, round-robin: each figure above was timed on its
    # own, at a different moment of the machine's load (ratios moved by 20%).
    best = _interleaved_blocked(
        {
            "ours_sum_logz_only": lambda: (
                infer(fg, "sum", map=False, marginals=False, image=images).log_z
            ),
            "numpyro_log_density": lambda: f(images),
            "ours_max_map_only": lambda: (
                infer(fg, "max", marginals=False, image=images).map
            ),
            "numpyro_infer_discrete": lambda: g(images),
        },
        reps,
    )
    us.update({k: 1e6 / n * v for k, v in best.items()})
    rec["us_per_image"] = us

    # Second column: enumerate_exact image by image (a few images: it is slow).
    from pgm_drm.inference import enumerate_exact

    m = min(n, p.get("enum_images", 20))
    for sem in ("sum", "max"):
        enumerate_exact(rm.model, image=images[0], semiring=sem)  # compile
        t0 = time.perf_counter()
        ez = [
            float(enumerate_exact(rm.model, image=im, semiring=sem).log_z)
            for im in images[:m]
        ]
        us[f"enumerate_exact_{sem}"] = 1e6 * (time.perf_counter() - t0) / m
        ref = (
            log_z
            if sem == "sum"
            else np.asarray(infer(fg, "max", marginals=False, image=images[:m]).log_z)
        )
        rec[f"enumerate_exact_{sem}_max_abs_log_z_diff"] = float(
            np.max(np.abs(np.asarray(ez) - ref[:m]))
        )
        rec["us_per_image"] = us

    # float32 vs float64 (x64 stays on: the float32 run is the dtype given).
    rm32 = RenderingModel(templates.astype(np.float32), sigma=0.5, switch_prior=0.9)
    im32 = jax.numpy.asarray(images, "float32")  # on the device, like `images`
    fg32 = compile_model(rm32.model, image=im32[0])
    post32 = infer(fg32, "sum", map=False, image=im32)
    post32_max = infer(fg32, "max", marginals=False, image=im32)
    us["ours_sum_nomap_f32"] = (
        1e6
        / n
        * _steady(
            lambda: jax.block_until_ready(infer(fg32, "sum", map=False, image=im32)),
            reps,
        )
    )
    same = np.ones(n, bool)
    for s in sites:
        same &= np.all(
            np.asarray(post32_max.map[s]).reshape(n, -1)
            == np.asarray(ours_map[s]).reshape(n, -1),
            axis=1,
        )
    rec.update(
        us_per_image=us,
        f32_result_dtype=str(np.asarray(post32.log_z).dtype),
        f32_max_abs_log_z_diff=float(np.max(np.abs(np.asarray(post32.log_z) - log_z))),
        f32_max_rel_log_z_diff=float(
            np.max(np.abs(np.asarray(post32.log_z) - log_z) / np.abs(log_z))
        ),
        f32_map_agreement=float(same.mean()),
    )


def _forward_backward(prior, trans, evidence):
    """Normalised forward-backward in float64: marginals (n, k) and log Z."""
    import numpy as np

    n, k = evidence.shape
    like = np.exp(evidence - evidence.max(axis=1, keepdims=True))
    shift = evidence.max(axis=1).sum()
    alpha = np.empty((n, k))
    log_z = shift
    a = prior * like[0]
    for i in range(n):
        if i:
            a = (alpha[i - 1] @ trans[i - 1]) * like[i]
        s = a.sum()
        log_z += np.log(s)
        alpha[i] = a / s
    beta = np.empty((n, k))
    beta[-1] = 1.0
    for i in range(n - 2, -1, -1):
        b = trans[i] @ (like[i + 1] * beta[i + 1])
        beta[i] = b / b.sum()
    m = alpha * beta
    return m / m.sum(axis=1, keepdims=True), float(log_z)


def case_chain(p: dict, rec: Recorder) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np

    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer
    from pgm_drm.testing import chain_loop_model

    n, k = p["n"], 4
    model, params = chain_loop_model(n, k, seed=0)
    t0 = time.perf_counter()
    fg = compile_model(model)
    t_compile = time.perf_counter() - t0
    rec.update(compile_s=t_compile, **_graph_stats(fg))
    t1 = time.perf_counter()
    post = infer(fg, "sum", schedule="tree", map=False)
    lm = jax.device_get(post.log_marginals)
    log_z = float(post.log_z)
    t_end = time.perf_counter()
    rec.update(first_infer_s=t_end - t1, first_result_s=t_end - t0)
    steady = _steady(
        lambda: jax.block_until_ready(infer(fg, "sum", schedule="tree", map=False)),
        p["repeats"],
    )
    ours = np.exp(np.stack([np.asarray(lm[f"x_{i}"]) for i in range(n)]))
    twin, twin_log_z = _forward_backward(
        params["prior"], params["trans"], params["evidence"]
    )
    rec.update(
        numpyro_run_s=_numpyro_run_s(model),
        steady_s=steady,
        max_abs_marginal_diff=float(np.max(np.abs(ours - twin))),
        abs_log_z_diff=abs(log_z - twin_log_z),
    )


def hmm_loop_model(n: int, k: int = 4, m: int = 5, seed: int = 0):
    """An HMM written as a loop: ``x_i ~ Cat(trans[i][x_{i-1}])`` and an observed
    ``y_i ~ Cat(emit[i][x_i])`` per step (the observations are the evidence).

    Returns the model, its parameters and the observations ``y`` ``(n,)``."""
    import jax.numpy as jnp
    import numpy as np
    import numpyro
    import numpyro.distributions as dist

    rng = np.random.default_rng(seed)
    params = {
        "prior": rng.dirichlet(np.ones(k)),
        "trans": rng.dirichlet(np.ones(k), size=(n - 1, k)),
        "emit": rng.dirichlet(np.ones(m), size=(n, k)),
    }
    y = rng.integers(0, m, size=n)
    prior, trans = jnp.asarray(params["prior"]), jnp.asarray(params["trans"])
    emit = jnp.asarray(params["emit"])

    def model(y=None):
        x = numpyro.sample("x_0", dist.Categorical(prior))
        numpyro.sample("y_0", dist.Categorical(emit[0][x]), obs=y[0])
        for i in range(1, n):
            x = numpyro.sample(f"x_{i}", dist.Categorical(trans[i - 1][x]))
            numpyro.sample(f"y_{i}", dist.Categorical(emit[i][x]), obs=y[i])

    return model, params, y


def case_hmm(p: dict, rec: Recorder) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import numpy as np

    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer

    n = p["n"]
    model, params, y = hmm_loop_model(n, seed=0)
    y = jnp.asarray(y)
    t0 = time.perf_counter()
    fg = compile_model(model, y=y)
    t_compile = time.perf_counter() - t0
    rec.update(compile_s=t_compile, **_graph_stats(fg))
    t1 = time.perf_counter()
    post = infer(fg, "sum", schedule="tree", map=False, y=y)
    lm = jax.device_get(post.log_marginals)
    log_z = float(post.log_z)
    t_end = time.perf_counter()
    rec.update(first_infer_s=t_end - t1, first_result_s=t_end - t0)
    steady = _steady(
        lambda: jax.block_until_ready(
            infer(fg, "sum", schedule="tree", map=False, y=y)
        ),
        p["repeats"],
    )
    ours = np.exp(np.stack([np.asarray(lm[f"x_{i}"]) for i in range(n)]))
    evidence = np.log(params["emit"][np.arange(n), :, np.asarray(y)])
    twin, twin_log_z = _forward_backward(params["prior"], params["trans"], evidence)
    rec.update(
        numpyro_run_s=_numpyro_run_s(model, y=y),
        steady_s=steady,
        max_abs_marginal_diff=float(np.max(np.abs(ours - twin))),
        abs_log_z_diff=abs(log_z - twin_log_z),
    )


def case_ising(p: dict, rec: Recorder) -> None:
    import jax

    jax.config.update("jax_enable_x64", False)
    import numpy as np

    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer
    from pgm_drm.testing import ising_grid, ising_loop_model

    sys.path.insert(0, str(BENCH_DIR))
    from pgmax_env import write_spec

    n, work = p["n"], Path(p["work"])
    pot = ising_grid(n, seed=0)
    for temp in (1.0, 0.0):
        write_spec(
            work / f"ising{n}_T{temp:.0f}.npz",
            **pot,
            num_iters=NUM_ITERS,
            damping=DAMPING,
            temperature=temp,
            repeats=max(p["repeats"], 5),
        )
    model = ising_loop_model(pot)
    t0 = time.perf_counter()
    fg = compile_model(model)
    t_compile = time.perf_counter() - t0
    rec.update(compile_s=t_compile, **_graph_stats(fg))
    t1 = time.perf_counter()
    plan = fg.plan("loopy", damping=DAMPING, max_iters=NUM_ITERS)
    t_plan = time.perf_counter() - t1
    rec["plan_s"] = t_plan
    names = [f"x_{i}_{j}" for i in range(n) for j in range(n)]
    for sem in ("sum", "max"):
        t1 = time.perf_counter()
        post = infer(fg, sem, schedule=plan, map=False)
        lm = jax.device_get(post.log_marginals)
        deltas = np.asarray(post.deltas)
        t_infer = time.perf_counter() - t1
        logm = np.stack([np.asarray(lm[s]) for s in names]).reshape(n, n, 2)
        # softmax of the log (max-)marginals: the beliefs up to a constant per
        # variable, so this is PGMax's get_marginals convention at T=1 and T=0.
        marg = np.exp(logm - logm.max(-1, keepdims=True))
        marg /= marg.sum(-1, keepdims=True)
        np.savez(work / f"ours_ising{n}_{sem}.npz", marginals=marg, map=logm.argmax(-1))
        below = np.nonzero(deltas < CONV_TOL)[0]
        rec[sem] = {
            "first_infer_s": t_infer,
            "first_result_s": t_compile + t_plan + t_infer,
            "iters_to_1e-6": int(below[0]) + 1 if below.size else None,
            "final_delta": float(deltas[-1]),
        }
        steady = _steady(
            lambda s=sem: jax.block_until_ready(infer(fg, s, schedule=plan, map=False)),
            p["repeats"],
        )
        rec[sem] = rec.data[sem] | {"per_run_s": steady}
    rec["numpyro_run_s"] = _numpyro_run_s(model)


def case_pgmax(p: dict, rec: Recorder) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from pgmax_env import run_pgmax

    res = run_pgmax(
        p["spec"],
        p["out"],
        timeout=p["timeout"],
        conv_tol=CONV_TOL,
        extra_env={"JAX_PLATFORMS": "cpu"},  # its venv has the CPU jaxlib only
    )
    rec.update(
        first_result_s=res["first_result_s"],
        per_run_s=min(res["per_run_all_s"]),
        per_run_median_s=res["per_run_s"],
        import_s=res["import_s"],
        **{"iters_to_1e-6": res["iters_to_1e-6"]},
        final_delta=res["msg_deltas"][-1],
        versions=res["versions"],
        backend=res["backend"],
        pgmax_peak_rss_mib=_peak_rss_mib(resource.RUSAGE_CHILDREN),
    )


def case_drm(p: dict, rec: Recorder) -> None:
    import jax

    jax.config.update("jax_enable_x64", False)
    import numpy as np

    from pgm_drm.graph import compile_model
    from pgm_drm.inference import infer
    from pgm_drm.models import DeepRenderingModel

    s, reps = p["size"], p["repeats"]
    drm = DeepRenderingModel.random(jax.random.PRNGKey(0), image_shape=(s, s), levels=3)
    images, _ = drm.sample(jax.random.PRNGKey(1), p["batch"])
    images = jax.block_until_ready(images)
    rec.update(
        windows=list(drm.windows),
        n_states=list(drm.n_states),
        n_nuisances=list(drm.n_nuisances),
        batch=int(images.shape[0]),
    )
    t0 = time.perf_counter()
    fg = compile_model(drm.model, image=images[0])
    t_compile = time.perf_counter() - t0
    rec.update(compile_s=t_compile, **_graph_stats(fg))
    t1 = time.perf_counter()
    post = infer(fg, "max", image=images)
    log_z = np.asarray(post.log_z)
    our_c = np.asarray(post.map["c"])
    t_end = time.perf_counter()
    rec.update(
        first_infer_s=t_end - t1,
        first_result_s=t_end - t0,
        schedule=post.schedule,  # "auto": tree if the graph is a forest, else exact
        is_tree=bool(fg.is_tree()),
        largest_table=list(max((t.shape for t in fg.group_tables()), key=np.prod)),
    )
    t1 = time.perf_counter()
    out = drm.infer(images)
    ref = np.asarray(out.log_z)
    rec["dcn_first_result_s"] = time.perf_counter() - t1
    # Round-robin, so that every ratio to drm.infer (half a millisecond at batch
    # 64) shares the machine's load of the same moments.
    best = _interleaved_blocked(
        {
            "steady_s": lambda: infer(fg, "max", image=images),
            "steady_nomap_s": lambda: infer(fg, "max", map=False, image=images),
            # The job drm.infer does: MAP, log Z and the class's max-marginal
            # (the class sits in the root cluster: no downward pass). drm.infer
            # also returns its per-level messages, which this does not.
            "steady_same_job_s": lambda: infer(fg, "max", marginals="c", image=images),
            "dcn_steady_s": lambda: drm.infer(images),
        },
        4 * max(reps, 10),
    )
    rec.update(**best)
    diff = np.abs(log_z - ref)
    rec.update(
        max_abs_log_score_diff=float(diff.max()),
        max_rel_log_score_diff=float(np.max(diff / np.maximum(1.0, np.abs(ref)))),
        max_abs_log_score=float(np.max(np.abs(ref))),
        map_class_agreement=float(np.mean(our_c == np.asarray(out.map["c"]))),
    )


CASES = {
    "info": case_info,
    "rm": case_rm,
    "chain": case_chain,
    "hmm": case_hmm,
    "ising": case_ising,
    "pgmax": case_pgmax,
    "drm": case_drm,
}


def child_main(kind: str, params: str, result: str) -> int:
    rec = Recorder(Path(result))
    rec["status"] = "running"
    try:
        CASES[kind](json.loads(params), rec)
    except Exception as exc:  # report, don't crash the bench
        rec.update(status="error", error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
        return 1
    rec["status"] = "ok"
    return 0


# --------------------------------------------------------------------------- #
# Parent side
# --------------------------------------------------------------------------- #


def _busy_cpu_s() -> float | None:
    """CPU seconds all processes have used (``/proc/stat``: all but idle/iowait)."""
    try:
        f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f[:8])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _other_cores(seconds: float = 1.0) -> float | None:
    """Cores kept busy by other processes over the next ``seconds``."""
    b0 = _busy_cpu_s()
    time.sleep(seconds)
    b1 = _busy_cpu_s()
    return None if b0 is None or b1 is None else (b1 - b0) / seconds


def _vm_hwm_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return None


#: Parent-side run state: an optional total deadline (``--deadline-s``) and a stop
#: flag set by Ctrl-C / SIGTERM (the cases left are skipped, the report is written).
_RUN: dict = {"deadline": None, "stop": False}


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def run_case(kind: str, params: dict, timeout: float, work: Path, tag: str) -> dict:
    """Run one case in a fresh interpreter; never raises (Ctrl-C stops the bench)."""
    if _RUN["stop"]:
        return {"status": "skipped", "error": "not run: the bench was interrupted"}
    cut = ""
    if _RUN["deadline"] is not None:
        left = _RUN["deadline"] - time.monotonic()
        if left < 5:
            return {"status": "skipped", "error": "not run: --deadline-s reached"}
        if left < timeout:
            timeout, cut = left, " (cut by --deadline-s)"
    result = work / f"{tag}.json"
    log = work / f"{tag}.log"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--case",
        kind,
        "--params",
        json.dumps(params),
        "--result",
        str(result),
    ]
    busy0, kids0 = _busy_cpu_s(), _children_cpu_s()
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        timed_out = interrupted = False
        hwm = None
        try:
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            timed_out = isinstance(exc, subprocess.TimeoutExpired)
            interrupted = not timed_out
            hwm = _vm_hwm_mib(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.perf_counter() - t0
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError):
        data = {}
    data["wall_s"] = wall
    busy1 = _busy_cpu_s()
    if busy0 is not None and busy1 is not None and wall > 0:
        # CPU used meanwhile by processes other than this case (contention).
        others = (busy1 - busy0) - (_children_cpu_s() - kids0)
        data["other_processes_cores"] = max(0.0, others / wall)
    if timed_out or interrupted:
        data["status"] = "timeout" if timed_out else "interrupted"
        data["error"] = (
            f"did not finish within {timeout:.0f} s{cut}"
            if timed_out
            else f"interrupted after {wall:.0f} s"
        )
        if interrupted:
            _RUN["stop"] = True
        if hwm is not None:
            data["peak_rss_mib"] = max(hwm, data.get("peak_rss_mib", 0.0))
    elif proc.returncode != 0 or data.get("status") != "ok":
        data["status"] = "error"
        tail = log.read_text()[-1500:] if log.exists() else ""
        data.setdefault("error", f"exit code {proc.returncode}")
        data["log_tail"] = tail
    return data


def _git_state() -> str | None:
    """``<short commit>`` of the checkout, ``+dirty`` when pgm_drm/ has edits."""
    root = BENCH_DIR.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "pgm_drm"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def say(*a) -> None:
    print(*a, flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_s(x) -> str:
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:.0f} s"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.2f} ms"
    return f"{x * 1e6:.1f} us"


def _fmt_x(x) -> str:
    return "-" if x is None else f"{x:.3g}x"


def _fmt_e(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def _status_line(d: dict) -> str:
    extra = ""
    if d.get("status") != "ok":
        extra = f"  ** {d.get('status')}: {d.get('error')}"
        if d.get("log_tail"):
            extra += "\n    " + d["log_tail"].strip().replace("\n", "\n    ")
    rss = d.get("peak_rss_mib", 0.0)
    other = d.get("other_processes_cores")
    other = "" if other is None else f", other processes {other:.2f} cores"
    return f"[{_fmt_s(d.get('wall_s'))} wall, peak RSS {rss:.0f} MiB{other}]{extra}"


def _size_str(d: dict) -> str:
    if "n_variables" not in d:
        return "graph not built"
    return (
        f"{d['n_variables']} vars, {d['n_factors']} factors, "
        f"{d['n_factor_groups']} groups"
    )


def _family_rm(ctx: dict, cases: dict) -> None:
    cfg, reps, timeouts, work = ctx["cfg"], ctx["reps"], ctx["timeouts"], ctx["work"]
    say(
        f"\n-- 1. RM: 10 classes x 16 nuisances, 8x8, switch 0.9, sigma 0.5, "
        f"float64, {cfg['rm_images']} images"
    )
    d = run_case(
        "rm",
        {
            "images": cfg["rm_images"],
            "enum_images": cfg["enum_images"],
            "repeats": reps,
        },
        timeouts["rm"],
        work,
        "rm",
    )
    cases["rm"] = d
    say(f"   {_size_str(d)} {_status_line(d)}")
    say(
        f"   compile_model {_fmt_s(d.get('compile_s'))}, first result "
        f"(compile + infer sum, map=False, whole batch) "
        f"{_fmt_s(d.get('first_result_s'))}; NumPyro first call "
        f"{_fmt_s(d.get('numpyro_first_result_s'))}"
    )
    for key, us in d.get("us_per_image", {}).items():
        say(f"   {key:28s} {us:9.3f} us/image")
    if "max_abs_log_z_diff" in d:
        err = d["max_abs_log_z_diff"]
        say(f"   max |log Z(ours) - log Z(NumPyro)| = {err:.2e}")
    if "map_agreement_numpyro" in d:
        say(f"   MAP equal to infer_discrete's: {d['map_agreement_numpyro']:.4f}")
    if "f32_max_abs_log_z_diff" in d:
        say(
            f"   float32 run (result {d['f32_result_dtype']}): max |log Z f32 - f64| "
            f"{d['f32_max_abs_log_z_diff']:.2e} (relative "
            f"{d['f32_max_rel_log_z_diff']:.1e}), MAP equal "
            f"{d['f32_map_agreement']:.4f}"
        )


def _family_chain(ctx: dict, cases: dict) -> None:
    cfg, reps, timeouts, work = ctx["cfg"], ctx["reps"], ctx["timeouts"], ctx["work"]
    say("\n-- 2. chain as a Python loop: k=4, float64, tree schedule, sum, map=False")
    for n in cfg["chain_n"]:
        d = run_case(
            "chain",
            {"n": n, "repeats": reps},
            timeouts["chain"],
            work,
            f"chain{n}",
        )
        d["graph_size_expected"] = 3 * n  # n sites + n factors + n evidence
        cases[f"chain{n}"] = d
        say(f"   n={n}: {_size_str(d)} {_status_line(d)}")
        say(
            f"     compile_model {_fmt_s(d.get('compile_s'))} + first infer "
            f"{_fmt_s(d.get('first_infer_s'))} = first result "
            f"{_fmt_s(d.get('first_result_s'))}; steady "
            f"{_fmt_s(d.get('steady_s'))}; max |marginal - forward-backward| "
            f"{_fmt_e(d.get('max_abs_marginal_diff'))}, |dlogZ| "
            f"{_fmt_e(d.get('abs_log_z_diff'))}"
        )
        say(
            f"     one plain NumPyro run of the same model (eager trace) "
            f"{_fmt_s(d.get('numpyro_run_s'))}"
        )


def _family_hmm(ctx: dict, cases: dict) -> None:
    cfg, reps, timeouts, work = ctx["cfg"], ctx["reps"], ctx["timeouts"], ctx["work"]
    say(
        "\n-- 2b. HMM as a Python loop, observed Categorical emissions: k=4, m=5, "
        "float64, tree schedule, sum, map=False"
    )
    for n in cfg["hmm_n"]:
        d = run_case("hmm", {"n": n, "repeats": reps}, timeouts["hmm"], work, f"hmm{n}")
        cases[f"hmm{n}"] = d
        say(f"   n={n}: {_size_str(d)} {_status_line(d)}")
        say(
            f"     compile_model {_fmt_s(d.get('compile_s'))} + first infer "
            f"{_fmt_s(d.get('first_infer_s'))} = first result "
            f"{_fmt_s(d.get('first_result_s'))}; steady "
            f"{_fmt_s(d.get('steady_s'))}; max |marginal - forward-backward| "
            f"{_fmt_e(d.get('max_abs_marginal_diff'))}"
        )
        say(
            f"     one plain NumPyro run of the same model (eager trace) "
            f"{_fmt_s(d.get('numpyro_run_s'))}"
        )


def _family_ising(ctx: dict, cases: dict) -> None:
    cfg, reps, timeouts, work = ctx["cfg"], ctx["reps"], ctx["timeouts"], ctx["work"]
    say(
        f"\n-- 3. Ising grid as a double loop: float32, loopy {NUM_ITERS} iters, "
        f"damping {DAMPING}; vs PGMax"
    )
    pgmax_ok, pgmax_err = True, None
    t0 = time.perf_counter()
    try:
        sys.path.insert(0, str(BENCH_DIR))
        from pgmax_env import DEFAULT_VENV, ensure_pgmax_venv

        if os.environ.get("BENCH_SKIP_PGMAX") == "1":
            raise RuntimeError("skipped (BENCH_SKIP_PGMAX=1)")
        built = (DEFAULT_VENV / ".pgmax-stamp.json").exists()
        if not built and os.environ.get("BENCH_BUILD_VENVS") == "0":
            raise RuntimeError(
                "venv not built and BENCH_BUILD_VENVS=0 (a quick run): run "
                "`make bench` or `python bench/pgmax_env.py` once"
            )
        ensure_pgmax_venv()
        say(f"   PGMax venv ready in {time.perf_counter() - t0:.1f} s")
    except Exception as exc:  # report and skip PGMax
        pgmax_ok, pgmax_err = False, f"{type(exc).__name__}: {exc}"[:2000]
        say(f"   PGMax venv could not be built, PGMax skipped: {pgmax_err}")
    cases["pgmax_env"] = {"ok": pgmax_ok, "error": pgmax_err}
    for n in cfg["ising_n"]:
        d = run_case(
            "ising",
            {"n": n, "repeats": reps, "work": str(work)},
            timeouts["ising"],
            work,
            f"ising{n}",
        )
        d["graph_size_expected"] = 2 * n * n + 2 * n * (n - 1)
        cases[f"ising{n}"] = d
        say(f"   N={n}: {_size_str(d)} {_status_line(d)}")
        say(
            f"     compile_model {_fmt_s(d.get('compile_s'))}, plan "
            f"{_fmt_s(d.get('plan_s'))}; one plain NumPyro run of the same model "
            f"(eager trace) {_fmt_s(d.get('numpyro_run_s'))}"
        )
        for sem, temp in (("sum", 1.0), ("max", 0.0)):
            ours = d.get(sem, {})
            spec = work / f"ising{n}_T{temp:.0f}.npz"
            pg: dict = {"status": "skipped"}
            if pgmax_ok and spec.exists():
                pg = run_case(
                    "pgmax",
                    {
                        "spec": str(spec),
                        "out": str(work / f"pgmax{n}_{sem}.out.json"),
                        "timeout": timeouts["pgmax"],
                    },
                    timeouts["pgmax"] + 30,
                    work,
                    f"pgmax{n}_{sem}",
                )
            cmp_ = _compare_ising(work, n, sem, pg)
            d[f"pgmax_{sem}"] = pg
            d[f"compare_{sem}"] = cmp_
            first = ours.get("first_result_s")
            say(
                f"     {sem}-product: ours first {_fmt_s(first)}"
                f" (infer {_fmt_s(ours.get('first_infer_s'))}), per run "
                f"{_fmt_s(ours.get('per_run_s'))}, iters to 1e-6 "
                f"{ours.get('iters_to_1e-6')} | PGMax first "
                f"{_fmt_s(pg.get('first_result_s'))}, per run "
                f"{_fmt_s(pg.get('per_run_s'))}, iters "
                f"{pg.get('iters_to_1e-6')}"
            )
            if pg.get("status") not in ("ok", None):
                say(f"       PGMax: {_status_line(pg)}")
            if cmp_:
                say(
                    f"       max |marginal ours - PGMax| "
                    f"{_fmt_e(cmp_.get('max_abs_marginal_diff'))}, MAP agreement "
                    f"{cmp_.get('map_agreement', float('nan')):.4f}; ratio "
                    f"ours/PGMax per run "
                    f"{_fmt_x(_ratio(ours.get('per_run_s'), pg.get('per_run_s')))}"
                    f", first result "
                    f"{_fmt_x(_ratio(first, pg.get('first_result_s')))}"
                )


def _median_drm_run(runs: list[dict]) -> dict:
    """The run (one fresh process each) whose every-marginal ratio to
    ``drm.infer`` is the median, with every run's ratio under ``ratio_runs``.
    Each run times both side by side, but between processes the same code
    moved far more on the 2-core dev machine (2026-12-05, 32x32: 1.63x and
    1.66x alone, 1.82x in a full bench): one process does not decide the row,
    and every figure in it still comes from one process."""
    ok = [
        r
        for r in runs
        if r.get("status") == "ok" and r.get("steady_s") and r.get("dcn_steady_s")
    ]
    if not ok:
        return runs[0]
    ok.sort(key=lambda r: r["steady_s"] / r["dcn_steady_s"])
    d = dict(ok[(len(ok) - 1) // 2])
    d["ratio_runs"] = [r["steady_s"] / r["dcn_steady_s"] for r in ok]
    d["n_processes"] = len(runs)
    return d


def _family_drm(ctx: dict, cases: dict) -> None:
    cfg, reps, timeouts, work = ctx["cfg"], ctx["reps"], ctx["timeouts"], ctx["work"]
    say(
        f"\n-- 4. DRM, 3 levels, float32, batch {DRM_BATCH}: compile_model + "
        f"infer(fg, 'max') vs drm.infer (DCN form)"
    )
    for s in cfg["drm_sizes"]:
        runs = [
            run_case(
                "drm",
                {"size": s, "batch": DRM_BATCH, "repeats": reps},
                timeouts["drm"],
                work,
                f"drm{s}" + (f"_{i}" if i else ""),
            )
            for i in range(cfg["drm_processes"])
        ]
        d = _median_drm_run(runs)
        cases[f"drm{s}"] = d
        say(
            f"   {s}x{s} (windows {d.get('windows')}, states {d.get('n_states')}, "
            f"G {d.get('n_nuisances')}): {_size_str(d)} {_status_line(d)}"
        )
        if "schedule" in d:
            say(
                f"     schedule 'auto' -> {d['schedule']!r} (is_tree {d['is_tree']}); "
                f"largest group table {tuple(d['largest_table'])}"
            )
        say(
            f"     compile_model {_fmt_s(d.get('compile_s'))} + first infer "
            f"{_fmt_s(d.get('first_infer_s'))} = first result "
            f"{_fmt_s(d.get('first_result_s'))}; steady "
            f"{_fmt_s(d.get('steady_s'))} (map=False "
            f"{_fmt_s(d.get('steady_nomap_s'))}, MAP + log Z + class posterior "
            f"{_fmt_s(d.get('steady_same_job_s'))}) | drm.infer first "
            f"{_fmt_s(d.get('dcn_first_result_s'))}, steady "
            f"{_fmt_s(d.get('dcn_steady_s'))}"
        )
        if "max_abs_log_score_diff" in d:
            say(
                f"     max |max log score ours - drm.infer| "
                f"{d['max_abs_log_score_diff']:.1e} (relative "
                f"{d['max_rel_log_score_diff']:.1e}, |score| up to "
                f"{d['max_abs_log_score']:.0f}); MAP class agreement "
                f"{d['map_class_agreement']:.3f}"
            )


#: Run order: the cheap families first, so that a --deadline-s cuts the largest cases.
FAMILIES = {
    "rm": _family_rm,
    "drm": _family_drm,
    "chain": _family_chain,
    "hmm": _family_hmm,
    "ising": _family_ising,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (< 3 min)")
    ap.add_argument(
        "--only", default="rm,chain,hmm,ising,drm", help="comma-separated families"
    )
    ap.add_argument(
        "--max-case-s", type=float, default=None, help="cap every case's timeout"
    )
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="total time budget: later cases get what is left, then are skipped",
    )
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        return child_main(args.case, args.params, args.result)

    cfg = QUICK if args.quick else FULL
    only = set(args.only.split(","))
    timeouts = dict(cfg["timeouts"])
    if args.max_case_s:
        timeouts = {k: min(v, args.max_case_s) for k, v in timeouts.items()}
    reps = cfg["repeats"]
    if args.deadline_s:
        _RUN["deadline"] = time.monotonic() + args.deadline_s
    signal.signal(signal.SIGTERM, _on_sigterm)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_compiler_"))

    idle_check = _other_cores(1.0)  # before our own probe adds to it
    info = run_case("info", {}, timeouts["info"], work, "info")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    machine = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "jax_platforms": os.environ.get("JAX_PLATFORMS"),
        "device_kind": info.get("device_kind"),
        "platform": info.get("platform"),
        "n_devices": info.get("n_devices"),
    }
    versions = info.get("versions", {})
    versions["pgm_drm_git"] = _git_state()
    say(f"== bench_compiler ({'quick' if args.quick else 'full'}) ==")
    say(
        f"machine: {machine['cpu']}, {machine['cpu_count']} cores "
        f"({affinity} usable); JAX device: {machine['platform']} "
        f"{machine['device_kind']} x{machine['n_devices']} "
        f"(JAX_PLATFORMS={machine['jax_platforms']})"
    )
    say(
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    )
    machine["other_processes_cores_at_start"] = idle_check
    if idle_check is not None:
        busy = " (machine not idle: times are inflated)" if idle_check > 0.3 else ""
        say(f"cores busy with other processes at start: {idle_check:.2f}{busy}")
    if info.get("status") != "ok":
        say("info probe failed:", _status_line(info))
    say(f"(case logs and partial results in {work})")

    cases: dict[str, dict] = {}
    ctx = {"cfg": cfg, "reps": reps, "timeouts": timeouts, "work": work}
    try:
        for name, family in FAMILIES.items():
            if name in only:
                family(ctx, cases)
    except KeyboardInterrupt:
        _RUN["stop"] = True
        say("\n** interrupted: reporting what finished **")

    ratios = [
        r for r in _ratios(cases, cfg) if r[0].split()[0].rstrip(":").lower() in only
    ]
    targets = _targets(cases, cfg, args.quick)
    say("\n== ratios ==")
    for name, val, note in ratios:
        say(f"   {name:58s} {_fmt_x(val):>10s}  {note}")
    say("\n== targets ==")
    for name, status, detail in targets:
        say(f"   [{status:^12s}] {name}: {detail}")

    total = time.perf_counter() - t_start
    payload = {
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "versions": versions,
        "config": {k: v for k, v in cfg.items()},
        "settings": {
            "num_iters": NUM_ITERS,
            "damping": DAMPING,
            "conv_tol": CONV_TOL,
            "drm_batch": DRM_BATCH,
        },
        "cases": cases,
        "ratios": [{"name": n, "value": v, "note": t} for n, v, t in ratios],
        "targets": [{"name": n, "status": s, "detail": t} for n, s, t in targets],
        "total_wall_s": total,
    }
    (OUT_DIR / "compiler.json").write_text(json.dumps(payload, indent=1, default=str))
    plot = _plot(cases, OUT_DIR / "compiler_scaling.png")
    say(
        f"\nwrote {OUT_DIR / 'compiler.json'}"
        + (f" and {plot}" if plot else " (no plot: matplotlib missing)")
        + f"; total {total:.0f} s"
    )
    return 0


def _compare_ising(work: Path, n: int, sem: str, pg: dict) -> dict:
    import numpy as np

    ours_f = work / f"ours_ising{n}_{sem}.npz"
    pg_f = work / f"pgmax{n}_{sem}.out.json"
    if pg.get("status") != "ok" or not ours_f.exists() or not pg_f.exists():
        return {}
    with np.load(ours_f) as z:
        m_ours, map_ours = z["marginals"], z["map"]
    res = json.loads(pg_f.read_text())
    m_pg, map_pg = np.asarray(res["marginals"]), np.asarray(res["map"])
    return {
        "max_abs_marginal_diff": float(np.max(np.abs(m_ours - m_pg))),
        "map_agreement": float(np.mean(map_ours == map_pg)),
    }


def _ratios(cases: dict, cfg: dict) -> list[tuple[str, float | None, str]]:
    out = []
    rm = cases.get("rm", {}).get("us_per_image", {})
    ours = rm.get("ours_sum_nomap")
    out.append(
        (
            "RM: NumPyro log_density / ours(sum, map=False)",
            _ratio(rm.get("numpyro_log_density"), ours),
            "target >= 5",
        )
    )
    out.append(
        (
            "RM: NumPyro log_density / ours(log Z only, same work)",
            _ratio(rm.get("numpyro_log_density"), rm.get("ours_sum_logz_only")),
            "",
        )
    )
    out.append(
        (
            "RM: NumPyro infer_discrete (vmapped) / ours(max, MAP only)",
            _ratio(rm.get("numpyro_infer_discrete"), rm.get("ours_max_map_only")),
            "",
        )
    )
    for sem in ("sum", "max"):
        out.append(
            (
                f"RM: enumerate_exact per image / ours({sem})",
                _ratio(rm.get(f"enumerate_exact_{sem}"), rm.get(f"ours_{sem}")),
                "",
            )
        )
    out.append(
        (
            "RM: ours(sum, map=False) float64 / float32",
            _ratio(ours, rm.get("ours_sum_nomap_f32")),
            "",
        )
    )
    out.append(
        (
            "RM: ours(sum, map=False) / numpy matmul",
            _ratio(ours, rm.get("numpy_matmul")),
            "target <= 3",
        )
    )
    out.append(
        (
            "RM: ours(sum, map=False) / rm.class_log_scores(sum)",
            _ratio(ours, rm.get("class_log_scores_sum")),
            "",
        )
    )
    for n in cfg["chain_n"]:
        d = cases.get(f"chain{n}", {})
        out.append(
            (
                f"chain n={n}: first result / steady infer",
                _ratio(d.get("first_result_s"), d.get("steady_s")),
                f"first {_fmt_s(d.get('first_result_s'))}",
            )
        )
        out.append(
            _floor_row(f"chain n={n}", d.get("first_result_s"), d.get("numpyro_run_s"))
        )
    for n in cfg["ising_n"]:
        d = cases.get(f"ising{n}", {})
        for sem in ("sum", "max"):
            o, pg = d.get(sem, {}), d.get(f"pgmax_{sem}", {})
            out.append(
                (
                    f"Ising N={n} {sem}: ours / PGMax per run",
                    _ratio(o.get("per_run_s"), pg.get("per_run_s")),
                    "target <= 1 (N=100)",
                )
            )
            out.append(
                (
                    f"Ising N={n} {sem}: ours / PGMax first result",
                    _ratio(o.get("first_result_s"), pg.get("first_result_s")),
                    "",
                )
            )
        out.append(
            _floor_row(
                f"Ising N={n} sum",
                d.get("sum", {}).get("first_result_s"),
                d.get("numpyro_run_s"),
            )
        )
    for n in cfg["hmm_n"]:
        d = cases.get(f"hmm{n}", {})
        out.append(
            _floor_row(f"HMM n={n}", d.get("first_result_s"), d.get("numpyro_run_s"))
        )
    for s in cfg["drm_sizes"]:
        d = cases.get(f"drm{s}", {})
        out.append(
            (
                f"DRM {s}x{s}: ours infer(max) / drm.infer steady",
                _ratio(d.get("steady_s"), d.get("dcn_steady_s")),
                "target <= 2 (32x32)",
            )
        )
        out.append(
            (
                f"DRM {s}x{s}: ours infer(max, map=False) / drm.infer steady",
                _ratio(d.get("steady_nomap_s"), d.get("dcn_steady_s")),
                "",
            )
        )
        out.append(
            (
                f"DRM {s}x{s}: ours infer(max, marginals='c') / drm.infer steady",
                _ratio(d.get("steady_same_job_s"), d.get("dcn_steady_s")),
                "",
            )
        )
        out.append(
            (
                f"DRM {s}x{s}: ours / drm.infer first result",
                _ratio(d.get("first_result_s"), d.get("dcn_first_result_s")),
                "",
            )
        )
    return out


def _targets(cases: dict, cfg: dict, quick: bool) -> list[tuple[str, str, str]]:
    def verdict(ok):
        return "met" if ok else "NOT met"

    def missing(key, what):
        if key not in cases:
            return f"not measured ({'quick run' if quick else 'not selected'})"
        d = cases[key]
        if d.get("status") != "ok":
            return f"{d.get('status')}: {d.get('error')}"
        return f"{what} missing"

    out = []
    rm = cases.get("rm", {}).get("us_per_image", {})
    # NumPyro's log_density computes log Z only: the same job is ours with
    # marginals=False. With every marginal (more work) it is reported beside.
    r1 = _ratio(rm.get("numpyro_log_density"), rm.get("ours_sum_logz_only"))
    r1m = _ratio(rm.get("numpyro_log_density"), rm.get("ours_sum_nomap"))
    r2 = _ratio(rm.get("ours_sum_logz_only"), rm.get("numpy_matmul"))
    if r1 is None or r2 is None:
        out.append(("RM infer sum", "n/a", missing("rm", "times")))
    else:
        out.append(
            (
                "RM log Z (infer sum, marginals=False) >= 5x faster than NumPyro",
                verdict(r1 >= 5),
                f"{r1:.2f}x (with every marginal, more work than NumPyro's "
                f"log Z: {r1m:.2f}x)",
            )
        )
        out.append(
            (
                "RM log Z <= 3x the numpy template-match matmul",
                verdict(r2 <= 3),
                f"{r2:.2f}x",
            )
        )
    d = cases.get("drm32", {})
    r = _ratio(d.get("steady_same_job_s"), d.get("dcn_steady_s"))
    r_all = _ratio(d.get("steady_s"), d.get("dcn_steady_s"))
    if r is None or r_all is None or d.get("first_result_s") is None:
        out.append(("DRM 32x32", "n/a", missing("drm32", "times")))
    else:
        out.append(
            (
                "DRM 32x32 first result <= 10 s and steady <= 2x drm.infer",
                verdict(d["first_result_s"] <= 10 and r <= 2),
                f"first {_fmt_s(d['first_result_s'])}, steady {r:.2f}x drm.infer "
                f"for its job (MAP, log Z, class posterior); {r_all:.2f}x with "
                "every max-marginal",
            )
        )
    d = cases.get("ising100", {})
    s_, pgs = d.get("sum", {}), d.get("pgmax_sum", {})
    m_, pgm = d.get("max", {}), d.get("pgmax_max", {})
    if s_.get("first_result_s") is None or s_.get("per_run_s") is None:
        out.append(("Ising N=100", "n/a", missing("ising100", "times")))
    elif pgs.get("per_run_s") is None:
        out.append(("Ising N=100", "n/a", "PGMax result missing"))
    else:
        ok = s_["first_result_s"] <= 10 and s_["per_run_s"] <= pgs["per_run_s"]
        det = (
            f"first {_fmt_s(s_['first_result_s'])}; per run sum "
            f"{_fmt_s(s_['per_run_s'])} vs PGMax {_fmt_s(pgs['per_run_s'])}"
        )
        if m_.get("per_run_s") is not None and pgm.get("per_run_s") is not None:
            ok = ok and m_["per_run_s"] <= pgm["per_run_s"]
            det += f"; max {_fmt_s(m_['per_run_s'])} vs {_fmt_s(pgm['per_run_s'])}"
        out.append(
            ("Ising N=100 first result <= 10 s and per run <= PGMax", verdict(ok), det)
        )
    d = cases.get("chain10000", {})
    if d.get("first_result_s") is None:
        out.append(("chain n=10,000", "n/a", missing("chain10000", "times")))
    else:
        out.append(
            (
                "chain 10,000 first result <= 5 s",
                verdict(d["first_result_s"] <= 5),
                f"{_fmt_s(d['first_result_s'])} (compile_model "
                f"{_fmt_s(d.get('compile_s'))} + infer "
                f"{_fmt_s(d.get('first_infer_s'))})",
            )
        )
    errs = []
    for n in cfg["ising_n"]:
        e = cases.get(f"ising{n}", {}).get("compare_sum", {})
        if "max_abs_marginal_diff" in e:
            errs.append((f"N={n}", e["max_abs_marginal_diff"]))
    out.append(
        (
            "Ising marginals vs PGMax (sum-product) <= 1e-4",
            verdict(all(e <= 1e-4 for _, e in errs)) if errs else "n/a",
            ", ".join(f"{k}: {e:.1e}" for k, e in errs) or "no comparison",
        )
    )
    errs = []
    for n in cfg["chain_n"]:
        e = cases.get(f"chain{n}", {}).get("max_abs_marginal_diff")
        if e is not None:
            errs.append((f"n={n}", e))
    out.append(
        (
            "chain marginals vs forward-backward <= 1e-8",
            verdict(all(e <= 1e-8 for _, e in errs)) if errs else "n/a",
            ", ".join(f"{k}: {e:.1e}" for k, e in errs) or "no comparison",
        )
    )
    return out


def _plot(cases: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def pts(prefix, first, steady, per=1):
        xs, f, s = [], [], []
        for key, d in cases.items():
            if not key.startswith(prefix) or key == "pgmax_env":
                continue
            size = d.get("graph_size", d.get("graph_size_expected"))
            if size is None:
                continue
            xs.append(size)
            f.append(first(d))
            st = steady(d)
            s.append(None if st is None else st / per)
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        return [xs[i] for i in order], [f[i] for i in order], [s[i] for i in order]

    def get(*keys):
        def fn(d):
            for k in keys:
                d = d.get(k, {}) if isinstance(d, dict) else {}
            return d if isinstance(d, (int, float)) else None

        return fn

    rm = cases.get("rm", {})
    series = [
        (
            "chain (tree, sum)",
            "o-",
            pts("chain", get("first_result_s"), get("steady_s")),
        ),
        (
            "Ising ours (loopy sum)",
            "s-",
            pts("ising", get("sum", "first_result_s"), get("sum", "per_run_s")),
        ),
        (
            "Ising PGMax (loopy sum)",
            "s--",
            pts(
                "ising",
                get("pgmax_sum", "first_result_s"),
                get("pgmax_sum", "per_run_s"),
            ),
        ),
        (
            "DRM ours (max, per image)",
            "^-",
            pts("drm", get("first_result_s"), get("steady_s"), DRM_BATCH),
        ),
        (
            "DRM drm.infer (per image)",
            "^--",
            pts("drm", get("dcn_first_result_s"), get("dcn_steady_s"), DRM_BATCH),
        ),
    ]
    if "graph_size" in rm and "us_per_image" in rm:
        series.append(
            (
                "RM ours (sum, per image)",
                "D",
                (
                    [rm["graph_size"]],
                    [rm.get("first_result_s")],
                    [rm["us_per_image"].get("ours_sum_nomap", math.nan) * 1e-6],
                ),
            )
        )
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, style, (xs, f, s) in series:
        for ax, ys in zip(axes, (f, s), strict=True):
            pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pairs:
                ax.plot(*zip(*pairs, strict=True), style, label=label)
    axes[0].set_title("first result: compile_model + first infer (whole batch)")
    axes[1].set_title("steady state per evidence instance (call time / batch)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("graph size (variables + factors)")
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
