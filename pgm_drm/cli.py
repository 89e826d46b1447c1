"""The ``pgm-drm`` command line: parses arguments and calls the recipes of
:mod:`pgm_drm.experiments`.

Every command has its own subparser and every model or study of ``fit`` and
``compare`` its own sub-subparser, so a flag that does not belong to it is an
argparse error (``pgm-drm fit digits dcn --labels 50``: unrecognized arguments).

Errors exit 2: usage errors through argparse; a command failing on its input or
at run time (``experiments.checks.USER_ERRORS``: a missing or damaged file, images
of the wrong shape, fit options that do not go together, an unwritable ``--out``)
prints one line, ``pgm-drm <command>: error: <message>``, on stderr. Others
(``AssertionError``, ``RuntimeError`` from JAX, ``AttributeError``) are bugs and
keep their traceback, as does every error under ``PGM_DRM_TRACEBACK=1``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["BENCHES", "build_parser", "main", "run_bench"]

BENCHES = ("rm", "compiler", "drm", "em_svi", "edrm_forest", "learning", "generic")
_BENCH_ALIASES = {"rm": ("compiler", ["--only", "rm"])}  # the RM: a compiler case
#: ``sample`` / ``infer`` models (``experiments.MODELS``; not imported: --help is fast)
MODELS = ("rm", "drm", "conv-drm", "edrm")


def _setup() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import matplotlib

    matplotlib.use("Agg")
    # Exactness comparisons are made in float64 (1e-6 tolerances).
    jax.config.update("jax_enable_x64", True)


def run_bench(name: str, extra: list[str]) -> int:
    """Run ``bench/bench_<name>.py`` of a source checkout (benchmarks are scripts
    that print ratios measured side by side; they are not installed)."""
    import runpy

    root = Path(__file__).resolve().parents[1] / "bench"
    name, first = _BENCH_ALIASES.get(name, (name, []))
    extra = [*first, *extra]
    script = root / f"bench_{name}.py"
    if not script.exists():
        raise SystemExit(
            f"no benchmark script {script}; benchmarks run from a source checkout"
        )
    sys.argv = [str(script), *extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _int_in(lo: int, hi: int | None = None, step: int = 1) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``lo..hi``, a multiple of ``step``."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < lo or n % step:
            multiple = f"a multiple of {step} " if step > 1 else ""
            raise argparse.ArgumentTypeError(f"must be {multiple}>= {lo}, got {n}")
        if hi is not None and n > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {n}")
        return n

    return parse


def _weight(text: str) -> float:
    w = float(text)
    if not 0.0 < w <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {w}")
    return w


def build_parser() -> argparse.ArgumentParser:
    """The ``pgm-drm`` parser: one subparser per command (and per model of
    ``fit digits``, per study of ``compare``)."""
    parser = argparse.ArgumentParser(
        prog="pgm-drm", description="Deep Rendering Model toolkit."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    seed = argparse.ArgumentParser(add_help=False)
    seed.add_argument("--seed", type=_int_in(0, 2**32 - 1), default=0)

    def images(p: argparse.ArgumentParser) -> None:
        n = "images solved (default 200; compare --quick: 20)"
        p.add_argument("--images", type=_int_in(1), help=n)
        ref = "of them, also by NumPyro enumeration (default 25; --quick: 3)"
        p.add_argument("--reference", type=_int_in(1), help=ref)

    demo = sub.add_parser(
        "demo",
        parents=[seed],
        help="sample from a Rendering Model, run max-sum and sum-product, "
        "compare with NumPyro enumeration; DRM sampling, DCN pass, activity "
        "maximization and layer probes; write a report and figures",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    images(demo)
    demo.add_argument("--no-drm", action="store_true", help="skip the DRM section")

    sample = sub.add_parser(
        "sample", parents=[seed], help="sample images and latents from a model"
    )
    model = "default: rm, or the model in --model-file"
    sample.add_argument("--model", choices=MODELS, help=model)
    sample.add_argument("--model-file", type=Path, help="a model saved by fit")
    sample.add_argument("-n", "--n", type=_int_in(1, 100_000), default=32)
    sample.add_argument("--out", type=Path, default=Path("out/sample"))

    inf = sub.add_parser(
        "infer", help="max-sum / sum-product inference on images from an npz file"
    )
    inf.add_argument("images", type=Path, help="npz with an 'images' array")
    inf.add_argument("--model", choices=MODELS, help=model)
    inf.add_argument("--model-file", type=Path)
    inf.add_argument("--semiring", choices=("max", "sum"), default="max")
    temp = "overrides --semiring: T * logsumexp(x / T), 0 max-sum, 1 sum-product"
    inf.add_argument("--temperature", type=float, default=None, help=temp)
    inf.add_argument("--out", type=Path, default=Path("out/infer"))

    cmp_ = sub.add_parser(
        "compare",
        help="compare message passing with NumPyro enumeration, or run a study: "
        "dcn (DCN pass vs exact under overlap), greedy (E-DRM greedy path vs "
        "exact MAP)",
    )
    studies = cmp_.add_subparsers(dest="study", required=True)
    for name, text in (
        ("enumeration", "message passing vs NumPyro enumeration on the RM"),
        ("dcn", "the DCN pass vs exact inference under overlapping rendering"),
        ("greedy", "the E-DRM greedy path (Eq. 31) vs the exact MAP (Eq. 30)"),
    ):
        p = studies.add_parser(name, parents=[seed], help=text)
        p.add_argument("--quick", action="store_true", help="a small, fast version")
        p.add_argument("--out", type=Path, default=Path("out/compare"))
        if name == "enumeration":
            images(p)

    fit = sub.add_parser("fit", help="fit a classifier on a dataset")
    evaluate = argparse.ArgumentParser(add_help=False)
    many = "mean ± sd over K stratified splits (10 without K), baselines beside"
    evaluate.add_argument("--splits", type=_int_in(1), nargs="?", const=10, help=many)
    evaluate.add_argument("--seeds", type=_int_in(1), help="... and over S seeds")
    sel = "choose hyperparameters by 3-fold CV inside each training split"
    evaluate.add_argument("--select", action="store_true", help=sel)
    evaluate.add_argument("--no-baselines", action="store_true")
    fit.add_argument("dataset", choices=("digits",))
    models = fit.add_subparsers(dest="model", required=True)
    for name, text in (
        ("rm", "per-class RM, 10 templates per class, hard or soft EM"),
        ("mfa", "RM with factor-analyser noise (Eq. 34), soft or hard EM"),
        ("drm", "per class, a mixture of 4 generative DRMs (hard EM)"),
        ("dcn", "the discriminative relaxation (Eq. 25), optax"),
        ("edrm-forest", "bagged InfoMax E-DRM trees (Eq. 32)"),
        ("all", "every model above (with --splits/--seeds/--select)"),
    ):
        p = models.add_parser(name, parents=[seed, evaluate], help=text)
        p.add_argument("--out", type=Path, default=Path("out/fit"))
        if name in ("rm", "mfa"):
            labels = "semi-supervised EM, N labels (N/10 per class) drawn per fit seed"
            p.add_argument("--labels", type=_int_in(10, step=10), help=labels)
            em = "hard" if name == "rm" else "soft"
            p.add_argument("--em", choices=("hard", "soft"), default=em)
        if name == "rm":
            weight = "with --labels: each unlabelled image's weight (EM-lambda)"
            p.add_argument(
                "--unlabelled-weight", type=_weight, default=1.0, help=weight
            )
        if name in ("dcn", "mfa"):
            shifts = "no one-pixel translations of the labelled training images"
            p.add_argument("--no-translations", action="store_true", help=shifts)

    bench = sub.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument(
        "extra", nargs=argparse.REMAINDER, help="arguments passed to the script"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``pgm-drm`` entry point (``demo``, ``sample``, ``infer``, ``compare``,
    ``fit``, ``bench``): the exit status, 2 after a one-line error (see above)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.command == "bench":
        return run_bench(a.name, a.extra)
    _setup()
    from pgm_drm.experiments import checks

    try:
        _run(a)
    except checks.USER_ERRORS as e:
        if os.environ.get("PGM_DRM_TRACEBACK") == "1":
            raise
        print(checks.error_line(f"pgm-drm {a.command}", e), file=sys.stderr)
        return 2
    return 0


def _run(a: argparse.Namespace) -> None:
    """Run the command ``a`` names; first what argparse cannot see (fit options
    together and against the data, the output folder)."""
    from pgm_drm import experiments as ex
    from pgm_drm.experiments import checks

    opts = checks.fit_options(vars(a)) if a.command == "fit" else {}
    checks.check_out(a.out)
    if a.command == "demo" or getattr(a, "study", None) == "enumeration":
        n_img = a.images or (20 if getattr(a, "quick", False) else 200)
        n_ref = min(a.reference or (3 if getattr(a, "quick", False) else 25), n_img)
        drm = a.command == "demo" and not a.no_drm
        report = ex.run_demo(a.out, n_img, n_ref, a.seed, drm=drm)
        print(ex.format_demo_report(report, a.out))
    elif a.command == "compare":
        print(ex.run_study(a.study, a.out, a.quick, a.seed).table)
        print(f"wrote {a.out}/table.md, rows.json, {a.study}_study.png")
    elif a.command == "sample":
        info = ex.run_sample(a.model, a.n, a.out, a.seed, a.model_file)
        print(f"{info}: wrote {a.out}/samples.npz, samples.png")
    elif a.command == "infer":
        args = (a.images, a.out, a.semiring, a.temperature, a.model_file)
        print(json.dumps(ex.run_infer(a.model, *args)))
        print(f"wrote {a.out}/posterior.npz, summary.json")
    elif a.command == "fit" and (a.splits or a.seeds or a.select or a.model == "all"):
        ev = (a.splits, a.seeds, a.select, not a.no_baselines)
        print(ex.run_evaluation(a.model, a.out, *ev, seed=a.seed, **opts))
    elif a.command == "fit":
        report = ex.run_fit_digits(a.model, a.out, seed=a.seed, **opts)
        print(
            f"digits, {a.model}: test accuracy {report['test_accuracy']:.4f} "
            f"(fit {report['fit_seconds']:.1f} s); wrote {a.out}/report.json, "
            "templates.png"
        )


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
