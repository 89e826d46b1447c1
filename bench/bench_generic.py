"""Generic fit (EM, Adam) vs NumPyro SVI (TraceEnum_ELBO): time to the same
log-likelihood, on a model SVI handles and on one it does not.

Usage: python bench/bench_generic.py [--quick] [--json PATH] [--n N] [--starts S]
       [--em-iters I] [--steps S] [--lrs 0.01,0.03,0.1] [--long-t T] [--long-n N]
       [--long-ours] [--forms loop,markov,scan] [--budget-s S] [--parts 1,2]

``pgm_drm.learning.fit(model, data, "em" | "adam")`` fits the ``numpyro.param``
sites of a NumPyro model written for one example, by the exact log-likelihood of
its compiled factor graph. NumPyro's own way to fit the same model by maximum
likelihood is SVI with ``TraceEnum_ELBO`` and an empty guide: every latent is
enumerated, so the ELBO *is* the log-likelihood and ``-loss`` is comparable
number for number (the report prints the difference at the same parameters).

1. A model SVI handles: the row HMM of ``notebooks/06_your_own_model.ipynb``
   (4 hidden states, one per row of a digit image; ``--quick``: the mixture of
   row templates, no chain). The batched SVI model is the same model under a
   ``plate``. Start 0 is reported in detail; ``--starts`` k-means starts (seeds
   0, 1, ...) show how often each fit reaches the best optimum of the three.
2. A long HMM (``--long-t`` steps, scalar Gaussian emissions) written, as a
   generic-fit user writes it, with a Python loop. SVI gets three forms of it, in
   a subprocess under a wall-clock budget: the same Python loop under a plate
   (NumPyro gives every enumerated site its own tensor dimension and runs out of
   them at the 25th site), the loop under ``numpyro.contrib.funsor.markov`` (the
   peer's rewrite that recycles dimensions), and the same chain through
   ``numpyro.contrib.control_flow.scan`` (its ``-ELBO`` is compared with the exact
   log-likelihood from NumPyro's own ``contrib.funsor.log_density``).
   ``--quick`` runs the Python-loop form only, and not ours (compiling our fit
   of a 25-step chain takes ~30-60 s on 2 cores); ``--forms`` and
   ``--long-ours`` add them.

Every fit of a part starts from the same parameters. Times exclude
compilation, which is reported separately. SVI runs as its fastest form:
``svi.update`` in a jitted ``lax.scan`` (what ``svi.run(progress_bar=False)``
runs, compiled once), and its Adam learning rate is the best of ``--lrs`` on
start 0 (our Adam uses the same rate: on this objective both take the same
steps, which the report checks). The curves: the log-likelihood after k
iterations; the time to reach it is ``overhead + k x (time per iteration)``, both
measured on compiled runs (our overhead is a ``fit(n_iter=0)``: graph lookup,
padding, final evaluation; SVI's k-th value is computed by its update k + 1).
The target is the best final log-likelihood of any fit minus ``tol`` per example.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import OUT_DIR, Report, faster, fmt_s, fmt_x, parser, platforms_default

platforms_default()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
import numpyro.distributions as dist  # noqa: E402
import optax  # noqa: E402
from numpyro.contrib.funsor import config_enumerate, markov  # noqa: E402
from numpyro.distributions.transforms import biject_to  # noqa: E402
from numpyro.infer import SVI, TraceEnum_ELBO  # noqa: E402
from numpyro.infer.svi import SVIState  # noqa: E402

simplex = dist.constraints.simplex
positive = dist.constraints.positive

#: The constraint of every parameter of the models below.
CONSTRAINTS = {
    "pi": simplex,
    "trans": simplex,
    "templates": dist.constraints.real,
    "sigma": positive,
    "mu": dist.constraints.real,
    "s": positive,
}

#: Tolerances (nats per example) of the targets; the first is the headline's.
TOLS = (1e-3, 1e-2, 1e-1)


# --------------------------------------------------------------------------- #
# Models: one example (ours) and batched under a plate (SVI), same parameters.
# --------------------------------------------------------------------------- #


def row_models(init: dict, chain: bool):
    """The row HMM of notebook 06 (``chain``) or the mixture of row templates:
    ``(per_image, batched)``; the batched one starts at ``init``."""
    k = init["templates"].shape[0]

    def params(start):
        p = {
            "pi": numpyro.param("pi", start["pi"], constraint=simplex),
            "templates": numpyro.param("templates", start["templates"]),
            "sigma": numpyro.param("sigma", start["sigma"], constraint=positive),
        }
        if chain:
            p["trans"] = numpyro.param("trans", start["trans"], constraint=simplex)
        return p

    default = {
        "pi": jnp.ones(k) / k,
        "trans": jnp.full((k, k), 1.0 / k),
        "templates": jnp.zeros_like(init["templates"]),
        "sigma": jnp.array(0.3),
    }

    def rows(p, n_rows, row):
        """The hidden state and the observed row ``row(t)`` of each step."""
        h = None
        for t in range(n_rows):
            probs = p["pi"] if (h is None or not chain) else p["trans"][h]
            h = numpyro.sample(f"h{t}", dist.Categorical(probs))
            numpyro.sample(
                f"row{t}",
                dist.Normal(p["templates"][h], p["sigma"]).to_event(1),
                obs=row(t),
            )

    def one(image=None):
        rows(params(default), image.shape[0], lambda t: image[t])

    @config_enumerate
    def batched(images):
        p = params(init)
        with numpyro.plate("images", images.shape[0]):
            rows(p, images.shape[1], lambda t: images[:, t])

    return one, batched


def chain_params(start: dict) -> dict:
    return {
        "pi": numpyro.param("pi", start["pi"], constraint=simplex),
        "trans": numpyro.param("trans", start["trans"], constraint=simplex),
        "mu": numpyro.param("mu", start["mu"]),
        "s": numpyro.param("s", start["s"], constraint=positive),
    }


def chain_one(k: int):
    """The long HMM for one sequence, as a generic-fit user writes it."""
    default = {
        "pi": jnp.ones(k) / k,
        "trans": jnp.full((k, k), 1.0 / k),
        "mu": jnp.linspace(-1.0, 1.0, k),
        "s": jnp.array(1.0),
    }

    def hmm(x=None):
        p = chain_params(default)
        h = None
        for t in range(x.shape[0]):
            h = numpyro.sample(
                f"h{t}", dist.Categorical(p["pi"] if h is None else p["trans"][h])
            )
            numpyro.sample(f"x{t}", dist.Normal(p["mu"][h], p["s"]), obs=x[t])

    return hmm


def chain_batched(init: dict, form: str):
    """The long HMM over a plate of sequences: ``form`` "loop" (the same Python
    loop), "markov" (the loop under contrib.funsor.markov) or "scan"."""
    k = init["pi"].shape[0]

    if form == "scan":
        from numpyro.contrib.control_flow import scan

        def scanned(x):
            p = chain_params(init)
            # Row k of the table is the start distribution: every step is alike.
            table = jnp.concatenate([p["trans"], p["pi"][None]])

            def step(h, xt):
                with numpyro.plate("seqs", x.shape[0]):
                    h = numpyro.sample(
                        "h",
                        dist.Categorical(table[h]),
                        infer={"enumerate": "parallel"},
                    )
                    numpyro.sample("x", dist.Normal(p["mu"][h], p["s"]), obs=xt)
                return h, None

            scan(step, jnp.full(x.shape[0], k), x.T)

        return scanned

    @config_enumerate
    def looped(x):
        p = chain_params(init)
        steps = range(x.shape[1])
        with numpyro.plate("seqs", x.shape[0]):
            h = None
            for t in markov(steps) if form == "markov" else steps:
                probs = p["pi"] if h is None else p["trans"][h]
                h = numpyro.sample(f"h{t}", dist.Categorical(probs))
                numpyro.sample(f"x{t}", dist.Normal(p["mu"][h], p["s"]), obs=x[:, t])

    return looped


def empty_guide(*args, **kwargs) -> None:
    """No latent left to guess: TraceEnum_ELBO enumerates them all."""


# --------------------------------------------------------------------------- #
# Data and the common start.
# --------------------------------------------------------------------------- #


def row_data(n: int, chain: bool) -> np.ndarray:
    """``n`` digit images (chain) or rows (mixture, as ``(n, 1, 8)``)."""
    from pgm_drm.data import load_digits_split

    x = np.asarray(load_digits_split().x_train, dtype=np.float64)
    return x[:n] if chain else x.reshape(-1, 1, 8)[:n]


def row_start(x: np.ndarray, k: int, chain: bool, seed: int) -> dict:
    """A start: the k-means centres of the rows (one k-means run, ``seed``) as
    templates, as notebook 06 starts."""
    from sklearn.cluster import KMeans

    km = KMeans(k, n_init=1, random_state=seed).fit(x.reshape(-1, 8))
    init = {
        "pi": jnp.ones(k) / k,
        "templates": jnp.asarray(km.cluster_centers_),
        "sigma": jnp.asarray(0.3),
    }
    if chain:
        init["trans"] = jnp.full((k, k), 0.5 / k) + 0.5 * jnp.eye(k)
    return init


def chain_data(n: int, t: int, k: int) -> tuple[np.ndarray, dict]:
    """``n`` sequences of length ``t`` from a sticky k-state HMM, and a start
    (means at data quantiles, the data's scale, sticky-ish transitions)."""
    rng = np.random.default_rng(1)
    trans = np.full((k, k), 0.1 / (k - 1)) + np.eye(k) * (0.9 - 0.1 / (k - 1))
    mu = np.linspace(-2.0, 2.0, k)
    h = np.empty((n, t), int)
    h[:, 0] = rng.integers(0, k, n)
    for i in range(1, t):
        u = rng.random(n)[:, None]
        h[:, i] = (u > np.cumsum(trans[h[:, i - 1]], -1)).sum(-1)
    x = mu[h] + 0.8 * rng.standard_normal((n, t))
    init = {
        "pi": jnp.ones(k) / k,
        "trans": jnp.full((k, k), 0.5 / k) + 0.5 * jnp.eye(k),
        "mu": jnp.asarray(np.quantile(x, (np.arange(k) + 0.5) / k)),
        "s": jnp.asarray(float(x.std())),
    }
    return x, init


# --------------------------------------------------------------------------- #
# Running the fits.
# --------------------------------------------------------------------------- #


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def ours(
    model, data: dict, init: dict, method: str, n_iter: int, lr: float, warm=False
) -> dict:
    """Our fit: first call (compiles the steps; skipped when ``warm``), overhead
    (``n_iter=0``), then ``n_iter`` iterations; the curve and the time model of
    the docstring."""
    from pgm_drm.learning import fit
    from pgm_drm.learning.loop import LoopOptions

    kw = {"init": init, "loop": LoopOptions(progress=False)}
    if method == "adam":
        kw["learning_rate"] = lr
    first = None
    if not warm:
        first = _timed(lambda: fit(model, data, method, n_iter=1, **kw))[1]
    over = min(
        _timed(lambda: fit(model, data, method, n_iter=0, **kw))[1] for _ in "12"
    )
    res, wall = _timed(lambda: fit(model, data, method, n_iter=n_iter, **kw))
    per = max(wall - over, 0.0) / n_iter
    curve = np.asarray(res.log_likelihood, dtype=float)
    return {
        "status": "ok",
        "compile_s": None if first is None else max(first - over - per, 0.0),
        "overhead_s": over,
        "per_iter_s": per,
        "wall_s": wall,
        "curve": curve,
        "times": over + per * np.arange(len(curve)),
        "params": res.params,
        "closed_form": list(res.closed_form),
    }


def _strong(tree):
    """Every leaf with a strong dtype (a weakly typed step counter would make
    the jitted run trace again for a state built another way)."""
    return jax.tree.map(lambda v: jnp.asarray(v, dtype=jnp.result_type(v)), tree)


def _set_lr(state, lr: float):
    """The SVI state with its (injected) Adam learning rate replaced."""

    def put(path, leaf):
        hit = any(getattr(p, "key", None) == "learning_rate" for p in path)
        return jnp.asarray(lr, jnp.result_type(leaf)) if hit else leaf

    return jax.tree_util.tree_map_with_path(put, state)


def svi_fit(batched, x: np.ndarray, lrs: tuple[float, ...], n_steps: int, tol: float):
    """SVI, Adam in a jitted scan of ``n_steps + 1`` updates (the last loss is
    the log-likelihood after ``n_steps``), one compile for every rate of
    ``lrs``; keeps the rate that first gets within ``tol`` (total nats) of the
    best final value of them all."""
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=lrs[0])
    svi = SVI(batched, empty_guide, opt, TraceEnum_ELBO(max_plate_nesting=1))
    xj = jnp.asarray(x)
    state, init_s = _timed(lambda: _strong(svi.init(jax.random.PRNGKey(0), xj)))

    @jax.jit
    def run(s, data):
        return jax.lax.scan(lambda c, _: svi.update(c, data), s, None, n_steps + 1)

    _, first = _timed(lambda: run(state, xj))
    runs = {}
    for lr in lrs:
        (end, losses), wall = _timed(lambda lr=lr: run(_set_lr(state, lr), xj))
        curve = -np.asarray(losses, dtype=float)
        runs[lr] = (np.where(np.isfinite(curve), curve, -np.inf), wall, end)
    best = max(c[-1] for c, _, _ in runs.values())

    def when(r):
        k = _first_hit(runs[r][0], best - tol)
        return math.inf if k is None else k

    lr = min(runs, key=when)

    def result(curve, wall, end) -> dict:
        per = wall / (n_steps + 1)
        return {
            "status": "ok",
            "per_iter_s": per,
            "wall_s": wall,
            "curve": curve,
            "times": per * (np.arange(len(curve)) + 1),
            "params": svi.get_params(end),
        }

    def again(start: dict) -> dict:
        """The same fit (compiled, rate ``lr``) from other parameters."""
        u = {k: biject_to(CONSTRAINTS[k]).inv(jnp.asarray(v)) for k, v in start.items()}
        s0 = SVIState(svi.optim.init(u), state.mutable_state, state.rng_key)
        s0 = _set_lr(_strong(s0), lr)
        (end, losses), wall = _timed(lambda: run(s0, xj))
        return result(-np.asarray(losses, dtype=float), wall, end)

    out = result(*runs[lr])
    out.update(
        lr=lr,
        finals={str(r): float(c[-1]) for r, (c, _, _) in runs.items()},
        init_s=init_s,
        compile_s=max(first - runs[lr][1], 0.0),
        again=again,
    )
    return out


def _first_hit(curve: np.ndarray, target: float) -> int | None:
    hit = np.flatnonzero(curve >= target)
    return int(hit[0]) if hit.size else None


def reach(run: dict, target: float) -> tuple[int | None, float | None]:
    """(iterations, seconds) for ``run`` to first reach ``target``."""
    if run.get("status") != "ok":
        return None, None
    k = _first_hit(np.asarray(run["curve"]), target)
    return (None, None) if k is None else (k, float(run["times"][k]))


# --------------------------------------------------------------------------- #
# Part 2's SVI side, in a subprocess (a wall-clock budget, its memory apart).
# --------------------------------------------------------------------------- #


def svi_worker(spec_path: str) -> int:
    """Run the SVI forms of the long HMM named in the spec; one JSON line each
    (and a "started" line before each, so a killed run says where it was)."""
    spec = json.loads(Path(spec_path).read_text())
    x = np.load(spec["data"])["x"]
    init = {k: jnp.asarray(v) for k, v in spec["init"].items()}
    lrs, n_steps, tol = tuple(spec["lrs"]), spec["n_steps"], spec["tol"]

    def say(**d):
        print(json.dumps(d, default=float), flush=True)

    for form in spec["forms"]:
        say(form=form, status="started")
        t0 = time.perf_counter()
        try:
            model = chain_batched(init, form)
            if form == "scan":
                say(
                    form=form, **_scan_check(model, x), after_s=time.perf_counter() - t0
                )
                continue
            out = svi_fit(model, x, lrs, n_steps, tol)
            out = {k: v for k, v in out.items() if k not in ("params", "again")}
            say(form=form, **{k: _plain(v) for k, v in out.items()})
        except Exception as err:  # the failure is the result
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            say(
                form=form,
                status="error",
                error=f"{type(err).__name__}: {msg}"[:300],
                after_s=time.perf_counter() - t0,
            )
    return 0


def _scan_check(model, x: np.ndarray) -> dict:
    """-ELBO of the scan form at the start, and NumPyro's exact enumerated
    log-density of the same model (contrib.funsor.log_density, MCMC's)."""
    from numpyro.contrib.funsor import enum, log_density

    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    xj = jnp.asarray(x)
    neg, t = _timed(
        lambda: jax.jit(
            lambda d: -elbo.loss(jax.random.PRNGKey(0), {}, model, empty_guide, d)
        )(xj)
    )
    exact = jax.jit(
        lambda d: log_density(enum(config_enumerate(model), -2), (d,), {}, {})[0]
    )(xj)
    return {
        "status": "ok",
        "minus_elbo": float(neg),
        "log_density": float(exact),
        "elbo_s": t,
    }


def _plain(v):
    return v.tolist() if isinstance(v, np.ndarray) else v


def run_svi_worker(x, init, forms, lrs, n_steps, tol, budget_s) -> dict:
    """The worker in a subprocess killed after ``budget_s``; per form its result,
    or "did not finish" for the form it was in."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "x.npz"
        np.savez(data, x=x)
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "data": str(data),
                    "init": {k: np.asarray(v).tolist() for k, v in init.items()},
                    "forms": forms,
                    "lrs": lrs,
                    "n_steps": n_steps,
                    "tol": tol,
                }
            )
        )
        cmd = [sys.executable, str(Path(__file__).resolve()), "--svi-worker", str(spec)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            out, err = proc.communicate(timeout=budget_s)
            killed = False
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            killed = True
        elapsed = time.perf_counter() - t0
    results, current = {}, None
    for line in out.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if d["status"] == "started":
            current = d["form"]
            continue
        results[d["form"]] = d
        current = None
    for form in forms:
        if form in results:
            r = results[form]
            if r.get("status") == "ok" and "curve" in r:
                r["curve"], r["times"] = np.asarray(r["curve"]), np.asarray(r["times"])
            continue
        if killed and form == current:
            why = f"did not finish within the {budget_s:.0f} s budget (killed)"
        elif killed:
            why = "not started (budget spent)"
        else:
            tail = (err or "").strip().splitlines()[-1:] or ["no output"]
            why = f"worker exited {proc.returncode}: {tail[0][:200]}"
        results[form] = {"form": form, "status": "error", "error": why}
    results["_elapsed_s"] = elapsed
    return results


# --------------------------------------------------------------------------- #
# Report.
# --------------------------------------------------------------------------- #


def target_rows(runs: dict, n: int, ref: str) -> tuple[list, dict]:
    """Time-to-target rows (one per tolerance) and, per tolerance, the
    ``(iterations, seconds)`` of every run."""
    ok = {k: r for k, r in runs.items() if r.get("status") == "ok"}
    best = max(float(r["curve"][-1]) for r in ok.values())
    rows, hits = [], {}
    for tol in TOLS:
        target = best - tol * n
        hits[tol] = {k: reach(r, target) for k, r in runs.items()}
        row = [f"{tol:g}"]
        for k, r in runs.items():
            it, s = hits[tol][k]
            if r.get("status") != "ok":
                row.append("failed")
            else:
                row.append("not reached" if s is None else f"{fmt_s(s)} ({it} it)")
        t_ref = hits[tol][ref][1]
        for k in runs:
            if k != ref:
                t = hits[tol][k][1]
                row.append(fmt_x(t / t_ref) if t and t_ref else "-")
        rows.append(row)
    return rows, hits


def run_rows(runs: dict, n: int) -> list:
    rows = []
    for name, r in runs.items():
        if r.get("status") != "ok":
            rows.append([name, "-", "-", "-", "-", "-", r.get("error", "-")])
            continue
        setup = r["compile_s"] + r.get("init_s", 0.0) + r.get("graph_s", 0.0)
        it, t = reach(r, float(r["curve"][-1]) - TOLS[0] * n)
        rows.append(
            [
                name,
                fmt_s(setup),
                fmt_s(r["per_iter_s"]),
                str(len(r["curve"]) - 1),
                f"{r['curve'][-1] / n:.5f}",
                f"{fmt_s(t)} ({it} it)",
                r.get("note", ""),
            ]
        )
    return rows


def plot(parts: list[tuple[str, dict, int]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(5 * len(parts), 3.8))
    axes = np.atleast_1d(axes)
    for ax, (title, runs, n) in zip(axes, parts, strict=True):
        ok = {k: r for k, r in runs.items() if r.get("status") == "ok"}
        if not ok:
            continue
        best = max(float(r["curve"][-1]) for r in ok.values())
        for name, r in ok.items():
            gap = np.maximum((best - r["curve"]) / n, 1e-7)
            ax.plot(r["times"], gap, label=name)
        ax.axhline(TOLS[0], color="k", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("seconds (compiled)")
        ax.set_ylabel("best log-lik - log-lik, nats / example")
        ax.set_title(textwrap.fill(title, 60), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _lrs(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        out = ()
    if not out or not all(v > 0 for v in out):
        raise SystemExit(f"--lrs must be positive numbers, comma-separated: {text!r}")
    return out


def part1(rep: Report, a) -> tuple[dict, str, int]:
    """A model SVI handles, from ``a.starts`` starts (start 0 in detail)."""
    from pgm_drm.learning import model_log_likelihood

    x = row_data(a.n, a.chain)
    starts = [row_start(x, a.k, a.chain, seed) for seed in range(a.starts)]
    init = starts[0]
    one, batched = row_models(init, a.chain)
    data = {"image": jnp.asarray(x)}
    n = len(x)
    what = (
        f"row HMM of notebook 06 ({a.k} states, 8 rows of 8 pixels), {n} digits"
        if a.chain
        else f"mixture of {a.k} row templates (8 pixels), {n} digit rows"
    )
    print(f"part 1: {what}; EM {a.em_iters} iterations, Adam/SVI {a.steps} steps")
    ll0, graph_s = _timed(lambda: model_log_likelihood(one, init, data))
    svi = svi_fit(batched, x, a.lrs, a.steps, TOLS[0] * n)
    lr = svi["lr"]
    runs = {
        "EM (ours)": ours(one, data, init, "em", a.em_iters, lr),
        "Adam (ours)": ours(one, data, init, "adam", a.steps, lr),
        "SVI (NumPyro)": svi,
    }
    runs["EM (ours)"]["graph_s"] = graph_s
    runs["EM (ours)"]["note"] = "closed forms: " + ", ".join(
        runs["EM (ours)"]["closed_form"]
    )
    runs["Adam (ours)"]["note"] = f"lr {lr:g} (SVI's best)"
    runs["SVI (NumPyro)"]["note"] = (
        f"lr {lr:g}, best of {', '.join(f'{v:g}' for v in a.lrs)}; "
        "TraceEnum_ELBO, empty guide, jitted scan"
    )
    # Correctness: our log-likelihood is -loss at the same parameters.
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss
    elbo = jax.jit(
        lambda p, d: -loss(jax.random.PRNGKey(0), p, batched, empty_guide, d)
    )
    diffs = [
        abs(float(model_log_likelihood(one, p, data)) - float(elbo(p, data["image"])))
        for p in (init, runs["EM (ours)"]["params"], svi["params"])
    ]
    adam_gap = np.max(np.abs(runs["Adam (ours)"]["curve"] - svi["curve"])) / n
    rep.data["raw"]["part1"] = _raw(runs, n, diffs, float(adam_gap), float(ll0))
    rows, _ = target_rows(runs, n, "EM (ours)")
    rep.table(
        f"Part 1, a model SVI handles: {what} (float64), start 0: the fits",
        FIT_COLUMNS + ["note"],
        run_rows(runs, n),
        "compile / setup: ours = model graph (once, shared by EM and Adam; on the "
        "EM row) + the fit's steps; SVI = svi.init + the scan's compile. "
        "|ours - (-ELBO)| at the same parameters (start, EM's end, SVI's end): "
        + ", ".join(f"{d:.1e}" for d in diffs)
        + f" nats in total; our Adam vs SVI's curve, max |diff| {adam_gap:.1e} "
        "nats / example (the same steps)",
    )
    rep.table(
        "Part 1, start 0: wall time to the best final log-likelihood minus tol "
        "(compiled)",
        ["tol (nats / ex)", *runs, "Adam / EM time", "SVI / EM time"],
        rows,
        "time = overhead + iterations x time per iteration (see the script's "
        "docstring); 'it' = iterations to the target",
    )
    # The other starts: the same compiled fits, the same rate.
    every = [runs]
    for start in starts[1:]:
        every.append(
            {
                "EM (ours)": ours(one, data, start, "em", a.em_iters, lr, warm=True),
                "Adam (ours)": ours(one, data, start, "adam", a.steps, lr, warm=True),
                "SVI (NumPyro)": svi["again"](start),
            }
        )
    rows, summary = starts_rows(every, n)
    rep.data["raw"]["part1_starts"] = summary
    rep.table(
        f"Part 1 over {a.starts} starts (k-means seeds 0..{a.starts - 1}): "
        "local optima and wall times (compiled)",
        [
            "fit",
            f"reached the start's best - {TOLS[0]:g} / ex",
            "median time to it",
            f"median time to own final - {TOLS[0]:g} / ex",
            "median (max) final gap to the best, nats / ex",
        ],
        rows,
        "the best = the highest final log-likelihood of the three fits from that start",
    )
    em, sv = summary["EM (ours)"], summary["SVI (NumPyro)"]
    r = ratio_or_none(sv["own_s"], em["own_s"])
    rep.headline(
        "generic_svi_vs_em",
        r,
        f"Generic fit, {what}, {a.starts} starts: EM converges (to its own final, "
        f"-{TOLS[0]:g} nats/example) {faster(r, 'sooner', 'later')} than NumPyro "
        f"SVI (median {fmt_s(em['own_s'])} vs {fmt_s(sv['own_s'])}, compiled); "
        f"it reached the best log-likelihood of the fits in {em['reached']}/"
        f"{a.starts} starts, SVI in {sv['reached']}/{a.starts}",
    )
    return runs, what, n


def starts_rows(every: list[dict], n: int) -> tuple[list, dict]:
    """Per fit, over the starts: how often it reached the start's best, the
    median times to it and to its own final value, the gaps to the best."""
    out, rows = {}, []
    for name in every[0]:
        best_t, own_t, gaps = [], [], []
        for runs in every:
            best = max(float(r["curve"][-1]) for r in runs.values())
            r = runs[name]
            final = float(r["curve"][-1])
            t = reach(r, best - TOLS[0] * n)[1]
            if t is not None:
                best_t.append(t)
            own_t.append(reach(r, final - TOLS[0] * n)[1])
            gaps.append((best - final) / n)
        med = float(np.median(best_t)) if best_t else None
        out[name] = {
            "reached": len(best_t),
            "best_s": med,
            "own_s": float(np.median(own_t)),
            "gaps": gaps,
        }
        rows.append(
            [
                name,
                f"{len(best_t)}/{len(every)}",
                fmt_s(med),
                fmt_s(out[name]["own_s"]),
                f"{np.median(gaps):.4f} ({max(gaps):.4f})",
            ]
        )
    return rows, out


def ratio_or_none(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def part2(rep: Report, a) -> tuple[dict, str, int]:
    """A long chain written as a Python loop: SVI's three forms in a worker
    under a budget, ours (unless ``--quick``) in this process."""
    from pgm_drm.learning import model_log_likelihood

    k2 = 3
    x2, init2 = chain_data(a.long_n, a.long_t, k2)
    hmm = chain_one(k2)
    data2 = {"x": jnp.asarray(x2)}
    n = a.long_n
    what = f"HMM, {k2} states, T={a.long_t}, {n} sequences (synthetic)"
    print(f"part 2: {what}; SVI budget {a.budget:.0f} s")
    svi2 = run_svi_worker(
        x2, init2, a.forms, list(a.lrs), a.steps, TOLS[0] * n, a.budget
    )
    for form in ("loop", "markov", "scan"):
        why = "not run" + (" in --quick" if a.quick else "") + " (--forms)"
        svi2.setdefault(form, {"status": "error", "error": why})
    m = svi2["markov"]
    lr2 = m["lr"] if m["status"] == "ok" else a.lrs[0]
    runs2 = {}
    if a.long_ours:
        ll2, graph2 = _timed(lambda: model_log_likelihood(hmm, init2, data2))
        runs2["EM (ours)"] = ours(hmm, data2, init2, "em", a.em_iters, lr2)
        runs2["EM (ours)"]["graph_s"] = graph2
        runs2["EM (ours)"]["note"] = f"{2 * a.long_t} factor groups (one per site)"
        runs2["Adam (ours)"] = ours(hmm, data2, init2, "adam", a.steps, lr2)
        runs2["Adam (ours)"]["note"] = f"lr {lr2:g}"
    for form, label in (
        ("loop", "SVI, same Python loop"),
        ("markov", "SVI, loop under markov"),
    ):
        r = svi2[form]
        runs2[label] = r
        if r["status"] == "ok":
            r["note"] = f"lr {r['lr']:g}; init {fmt_s(r['init_s'])}"
    scan = svi2["scan"]
    notes = [
        f"SVI ran in a subprocess with a {a.budget:.0f} s budget "
        f"({svi2['_elapsed_s']:.0f} s used)",
        (
            f"scan form: -ELBO at the start {scan['minus_elbo']:.3f}, but the "
            f"exact log p there is {scan['log_density']:.3f} (NumPyro's own "
            "contrib.funsor.log_density of the same scan model): TraceEnum_ELBO "
            "does not compute this model's likelihood, so no scan fit is timed"
            if scan["status"] == "ok"
            else f"scan form: {scan['error']}"
        ),
    ]
    if a.long_ours:
        notes.append(f"ours at the start {float(ll2):.6f}")
        if m["status"] == "ok":
            gap = float(np.max(np.abs(runs2["Adam (ours)"]["curve"] - m["curve"])))
            notes.append(
                f"markov -ELBO at the start {m['curve'][0]:.6f} (|diff| "
                f"{abs(m['curve'][0] - float(ll2)):.1e}); our Adam vs markov SVI "
                f"curves max |diff| {gap / n:.1e} / sequence"
            )
    else:
        notes.append("ours not run (--quick; --long-ours runs it)")
    rep.data["raw"]["part2"] = {
        **_raw(runs2, n, [], None, None),
        "scan": scan,
        "svi_elapsed_s": svi2["_elapsed_s"],
    }
    rep.table(
        f"Part 2, a long chain: {what}, float64: the fits",
        FIT_COLUMNS + ["note / failure"],
        run_rows(runs2, n),
        "; ".join(notes),
    )
    if a.long_ours and any(r.get("status") == "ok" for r in runs2.values()):
        rows2, hits2 = target_rows(runs2, n, "EM (ours)")
        rep.table(
            "Part 2: wall time to the best final log-likelihood minus tol (compiled)",
            [
                "tol (nats / ex)",
                *runs2,
                *[f"{k} / EM time" for k in runs2 if "EM" not in k],
            ],
            rows2,
            "a form that failed never reaches a target",
        )
        t_em = hits2[TOLS[0]]["EM (ours)"][1]
        t_svi = hits2[TOLS[0]]["SVI, loop under markov"][1]
        r = ratio_or_none(t_svi, t_em)
        rep.headline(
            "generic_long_svi_vs_em",
            r,
            f"Generic fit, {what}: EM reaches the best log-likelihood "
            f"(-{TOLS[0]:g} nats/example) {faster(r, 'sooner', 'later')} than "
            f"NumPyro SVI with the chain rewritten under markov "
            f"({fmt_s(t_em)} vs {fmt_s(t_svi)}, compiled)",
        )
    loop = svi2["loop"]
    if loop["status"] != "ok":
        rep.headline(
            "generic_svi_loop_fails",
            float(a.long_t),
            f"SVI (TraceEnum_ELBO) on the {a.long_t}-step HMM written as a Python "
            f"loop: {loop['error']}; generic fit takes the model as written",
        )
    return runs2, what, n


#: The columns of a fits table.
FIT_COLUMNS = [
    "fit",
    "compile / setup",
    "per iteration",
    "iterations",
    "final log-lik / ex",
    f"to own final - {TOLS[0]:g} / ex",
]


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=None, help="part 1 examples")
    ap.add_argument("--k", type=int, default=4, help="part 1 hidden states")
    ap.add_argument("--starts", type=int, default=None, help="part 1 starts")
    ap.add_argument("--em-iters", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="Adam / SVI steps")
    ap.add_argument("--lrs", default=None, help="SVI's Adam rates tried")
    ap.add_argument("--long-t", type=int, default=None, help="part 2 length")
    ap.add_argument("--long-n", type=int, default=None, help="part 2 sequences")
    ap.add_argument("--long-ours", action="store_true", help="ours in part 2")
    ap.add_argument("--budget-s", type=float, default=None, help="SVI, part 2")
    ap.add_argument("--forms", default=None, help="SVI forms, part 2")
    ap.add_argument("--parts", default="1,2", help="which parts to run")
    ap.add_argument("--svi-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.svi_worker:
        return svi_worker(a.svi_worker)
    q = a.quick
    a.chain = not q
    a.n = a.n or (400 if q else 300)
    a.starts = a.starts or (3 if q else 5)
    a.em_iters = a.em_iters or (60 if q else 300)
    a.steps = a.steps or (300 if q else 1000)
    a.lrs = _lrs(a.lrs or ("0.02,0.05,0.2" if q else "0.01,0.03,0.1,0.3"))
    a.long_t = a.long_t or (25 if q else 64)
    a.long_n = a.long_n or (50 if q else 100)
    a.long_ours = a.long_ours or not q
    a.budget = a.budget_s or (20.0 if q else 150.0)
    a.forms = [f for f in (a.forms or ("loop" if q else "loop,markov,scan")).split(",")]
    parts = set(a.parts.split(","))
    rep = Report("generic", a)
    panels = []
    if "1" in parts:
        runs, what, n = part1(rep, a)
        panels.append((f"part 1 (start 0): {what}", runs, n))
    if "2" in parts:
        runs2, what2, n2 = part2(rep, a)
        if a.long_ours:
            panels.append((f"part 2: {what2}", runs2, n2))
    fig = plot(panels, OUT_DIR / "generic_curves.png") if panels else None
    if fig:
        rep.figure(fig)
    return 0


def _raw(runs, n, diffs, same_steps, ll0) -> dict:
    out = {"n": n, "elbo_diffs": diffs, "adam_vs_svi": same_steps, "ll0": ll0}
    for k, r in runs.items():
        out[k] = {kk: _plain(v) for kk, v in r.items() if kk not in ("params", "again")}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
