"""EM vs SVI (TraceEnum_ELBO) on the same RM data: wall time and held-out log-lik.

Usage: python bench/bench_em_svi.py [--quick] [--json PATH] [--n 500] [--size 6]

Both fits start from the same k-means++ initialisation (same key). Each fit is
run twice and the second (compiled) run is timed; the first run's time, which
includes JIT compilation, is printed too.
"""

from __future__ import annotations

import time

from common import Report, faster, fmt_s, fmt_x, parser, platforms_default

platforms_default()

import jax  # noqa: E402

from pgm_drm.learning import fit_em, fit_svi, log_likelihood  # noqa: E402
from pgm_drm.learning.loop import LoopOptions  # noqa: E402
from pgm_drm.models import RenderingModel, default_templates  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out.model.templates)
    return out, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--n", type=int, default=500, help="training images")
    ap.add_argument("--size", type=int, default=6, help="image side")
    ap.add_argument("--svi-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--float32", action="store_true", help="run in float32")
    args = ap.parse_args(argv)
    if args.svi_steps is None:
        args.svi_steps = 300 if args.quick else 1000
    rep = Report("em_svi", args)
    jax.config.update("jax_enable_x64", not args.float32)
    truth = RenderingModel(default_templates(args.size), sigma=0.3, switch_prior=0.8)
    x = truth.sample(jax.random.PRNGKey(0), args.n)[0]
    test = truth.sample(jax.random.PRNGKey(1), 1000)[0]
    c, g = truth.n_classes, truth.n_nuisances
    quiet = LoopOptions(progress=False)

    def em():
        return fit_em(x, c, g, switch=True, n_iter=500, loop=quiet)

    def svi():
        return fit_svi(
            x,
            c,
            g,
            switch=True,
            n_steps=args.svi_steps,
            learning_rate=args.lr,
            loop=quiet,
        )

    print(
        f"device {jax.devices()[0]}, N={args.n}, image {args.size}x{args.size}, "
        f"C={c}, G={g}, switch on"
    )
    rows, failed = [], {}
    for name, fn in (("EM (soft)", em), ("SVI (Adam)", svi)):
        try:
            _, first = _timed(fn)
            fit, t = _timed(fn)
        except Exception as err:  # e.g. NumPyro 0.21 + JAX 0.11: provenance assertion
            if not rows:  # EM itself failed: nothing to compare against
                raise
            first_line = (str(err).splitlines() or [""])[0]
            msg = f"{type(err).__name__}: {first_line}"
            failed[name] = msg
            print(f"{name:11s} FAILED ({msg})")
            continue
        ll = float(log_likelihood(fit.model, test).mean())
        rows.append((name, t, first, fit.n_iter, ll))
        print(
            f"{name:11s} wall {t:7.3f} s (first run, with compile: {first:7.3f} s), "
            f"{fit.n_iter} iterations, held-out log-lik/image {ll:.4f}"
        )
    truth_ll = float(log_likelihood(truth, test).mean())
    print(f"truth       held-out log-lik/image {truth_ll:.4f}")
    ok = len(rows) == 2
    if ok:
        print(
            f"SVI / EM wall-time ratio: {rows[1][1] / rows[0][1]:.1f}x "
            f"(with compile: {rows[1][2] / rows[0][2]:.1f}x); "
            f"held-out gap {rows[0][4] - rows[1][4]:+.4f} nats/image"
        )
    rep.data["raw"] = {"rows": rows, "failed": failed}
    rep.table(
        f"EM vs SVI (TraceEnum_ELBO, Adam lr {args.lr}) on one RM: {args.n} "
        f"{args.size}x{args.size} images, C={c}, G={g}, switch, "
        f"{'float32' if args.float32 else 'float64'}",
        [
            "fit",
            "wall (compiled)",
            "first run (with compile)",
            "iterations",
            "held-out log-lik / image",
        ],
        [[n, fmt_s(t), fmt_s(f), str(k), f"{ll:.4f}"] for n, t, f, k, ll in rows]
        + [[n, f"failed: {m}", "", "", ""] for n, m in failed.items()]
        + [["truth", "", "", "", f"{truth_ll:.4f}"]],
        f"SVI / EM wall time {fmt_x(rows[1][1] / rows[0][1])}"
        if ok
        else "no ratio: SVI failed on this machine's NumPyro/JAX (see the row)",
    )
    if ok:
        rep.headline(
            "svi_vs_em",
            rows[1][1] / rows[0][1],
            f"EM fits an RM {faster(rows[1][1] / rows[0][1])} than SVI "
            f"(held-out log-lik {rows[0][4]:.3f} vs {rows[1][4]:.3f})",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
