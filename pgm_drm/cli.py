"""The ``pgm-drm`` command line."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = [
    "main",
    "run_compare_study",
    "run_demo",
    "run_drm_demo",
    "run_fit_digits",
    "run_infer",
    "run_sample",
]


def _setup_jax() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    # Exactness comparisons are made in float64 (1e-6 tolerances).
    jax.config.update("jax_enable_x64", True)


def run_demo(
    out: Path,
    n_images: int = 200,
    n_reference: int = 25,
    seed: int = 0,
    quiet: bool = False,
) -> dict[str, Any]:
    """Sample from a default RM, run max-sum and sum-product, compare with NumPyro.

    Writes ``report.json``, ``samples.png``, ``factor_graph.png`` and
    ``posterior_comparison.png`` under ``out`` and returns the report.
    """
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from tqdm.auto import tqdm

    from pgm_drm.diagnostics import (
        draw_factor_graph,
        plot_posterior_comparison,
        plot_samples,
    )
    from pgm_drm.graph import compile_model
    from pgm_drm.inference import enumerate_exact, infer
    from pgm_drm.models import RenderingModel, default_templates

    out.mkdir(parents=True, exist_ok=True)
    rm = RenderingModel(default_templates(8), sigma=0.35, switch_prior=0.9)
    images, latents = rm.sample(jax.random.PRNGKey(seed), n_images)
    n_ref = min(n_reference, n_images)
    fg = compile_model(rm.model, image=images[0])

    report: dict[str, Any] = {
        "model": {
            "classes": rm.n_classes,
            "nuisances": rm.n_nuisances,
            "image_shape": list(rm.image_shape),
            "sigma": rm.sigma,
            "switch_prior": rm.switch_prior,
        },
        "n_images": n_images,
        "n_reference_images": n_ref,
        "schedule": fg.schedule().kind,
        "semirings": {},
    }
    posts = {}
    for semiring in ("sum", "max"):
        infer(fg, semiring, image=images).log_z.block_until_ready()  # compile
        t0 = time.perf_counter()
        post = infer(fg, semiring, image=images)
        post.log_z.block_until_ready()
        t_kernel = (time.perf_counter() - t0) / n_images
        refs = []
        enumerate_exact(rm.model, image=images[0], semiring=semiring)  # compile
        t0 = time.perf_counter()
        for i in tqdm(
            range(n_ref), desc=f"enumerate_exact ({semiring})", disable=quiet
        ):
            refs.append(enumerate_exact(rm.model, image=images[i], semiring=semiring))
        t_enum = (time.perf_counter() - t0) / n_ref
        sites = {}
        for site in fg.latent_sites:
            delta = max(
                float(
                    np.max(
                        np.abs(
                            np.asarray(post.log_marginals[site][i])
                            - np.asarray(r.log_marginals[site])
                        )
                    )
                )
                for i, r in enumerate(refs)
            )
            agree = np.mean(
                [int(post.map[site][i]) == int(r.map[site]) for i, r in enumerate(refs)]
            )
            truth = float(
                np.mean(np.asarray(post.map[site]) == np.asarray(latents[site]))
            )
            sites[site] = {
                "max_abs_delta_log_marginal": delta,
                "map_agreement_with_numpyro": float(agree),
                "map_equals_true_latent": truth,
            }
        log_z_delta = max(
            abs(float(post.log_z[i]) - float(r.log_z)) for i, r in enumerate(refs)
        )
        report["semirings"][semiring] = {
            "sites": sites,
            "max_abs_delta_log_z": log_z_delta,
            "seconds_per_image_kernel": t_kernel,
            "seconds_per_image_enumerate_exact": t_enum,
            "speedup": t_enum / t_kernel,
        }
        posts[semiring] = (post, refs[0])

    t0 = time.perf_counter()
    predicted = np.asarray(rm.classify(images, "max"))
    t_cls = (time.perf_counter() - t0) / n_images
    report["ms_rmc_accuracy"] = float(np.mean(predicted == np.asarray(latents["c"])))
    report["seconds_per_image_classify"] = t_cls

    fig = plot_samples(images[:24], {k: v[:24] for k, v in latents.items()})
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    draw_factor_graph(fg, ax=ax, schedule=fg.schedule())
    fig.savefig(out / "factor_graph.png", dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, semiring in zip(axes, ("sum", "max"), strict=True):
        post, ref = posts[semiring]
        first = post._replace(
            log_marginals={k: v[0] for k, v in post.log_marginals.items()}
        )
        plot_posterior_comparison(
            {f"message passing ({semiring})": first, "NumPyro enumeration": ref},
            "g",
            ax=ax,
        )
        ax.set_title(f"image 0: posterior of g ({semiring}-product)")
    fig.tight_layout()
    fig.savefig(out / "posterior_comparison.png", dpi=110)
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def run_drm_demo(
    out: Path, n_images: int = 500, seed: int = 0, n_probe: int = 300
) -> dict[str, Any]:
    """The DRM part of the demo: sample the default 24x24 DRM, run the DCN-form
    max-sum pass, reconstruct top-down, activity-maximize (Eqs. 26-27), probe the
    layers (§3.3).

    Writes ``drm_samples.png``, ``drm_reconstructions.png``, ``drm_activity.png``
    and ``drm_probes.png`` under ``out`` and returns the report section.
    """
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pgm_drm.diagnostics import (
        activity_maximization,
        disentanglement_probe,
        plot_activity_maximization,
        plot_disentanglement,
        plot_reconstructions,
        plot_samples,
        probe_drm,
    )
    from pgm_drm.models import DeepRenderingModel

    out.mkdir(parents=True, exist_ok=True)
    drm = DeepRenderingModel.default()
    images, latents = drm.sample(jax.random.PRNGKey(seed), n_images)
    drm.infer(images).log_z.block_until_ready()  # compile for this batch shape
    t0 = time.perf_counter()
    res = drm.infer(images)
    res.log_z.block_until_ready()
    t_pass = time.perf_counter() - t0
    recon = drm.render(res.map)
    truth = drm.render(latents)
    report = {
        "image_shape": list(drm.image_shape),
        "levels": drm.levels,
        "n_images": n_images,
        "map_class_accuracy": float(np.mean(res.map["c"] == latents["c"])),
        "map_log_joint_minus_truth_mean": float(
            np.mean(
                (
                    np.sum((images - truth) ** 2, (1, 2))
                    - np.sum((images - recon) ** 2, (1, 2))
                )
                / (2 * drm.sigma**2)
            )
        ),
        "images_per_second": n_images / t_pass,
    }
    top = {"c": latents["c"][:24]}
    fig = plot_samples(images[:24], top)
    fig.savefig(out / "drm_samples.png", dpi=110)
    plt.close(fig)
    titles = [
        f"c={int(a)} MAP c={int(b)}"
        for a, b in zip(latents["c"][:8], res.map["c"][:8], strict=True)
    ]
    fig = plot_reconstructions(images[:8], recon[:8], titles)
    fig.savefig(out / "drm_reconstructions.png", dpi=110)
    plt.close(fig)
    act = activity_maximization(drm, level=1, normalize=False)
    fig = plot_activity_maximization(drm, act)
    fig.savefig(out / "drm_activity.png", dpi=110)
    plt.close(fig)
    act_class = np.asarray(drm.infer(act.images).map["c"])
    report["activity_images_own_class"] = bool(
        np.all(act_class == np.arange(drm.n_classes))
    )
    probe = disentanglement_probe(
        probe_drm(), jax.random.PRNGKey(seed), n_probe, n_probe
    )
    fig = plot_disentanglement(probe)
    fig.savefig(out / "drm_probes.png", dpi=110)
    plt.close(fig)
    report["probe_accuracy"] = {
        t: [float(a) for a in probe.accuracy[:, k]] for k, t in enumerate(probe.targets)
    }
    return report


def _print_demo(report: dict[str, Any], out: Path) -> None:
    print(
        f"Rendering model {report['model']}, {report['n_images']} images, "
        f"schedule '{report['schedule']}', compared on {report['n_reference_images']}"
    )
    head = (
        f"{'semiring':<8} {'site':<5} {'max|dlogm|':>11} {'MAP=NumPyro':>12} "
        f"{'MAP=truth':>10} {'kernel s/img':>13} {'enum s/img':>11} {'speedup':>8}"
    )
    print(head)
    print("-" * len(head))
    for semiring, r in report["semirings"].items():
        for site, s in r["sites"].items():
            print(
                f"{semiring:<8} {site:<5} {s['max_abs_delta_log_marginal']:>11.2e} "
                f"{s['map_agreement_with_numpyro']:>12.0%} "
                f"{s['map_equals_true_latent']:>10.0%} "
                f"{r['seconds_per_image_kernel']:>13.2e} "
                f"{r['seconds_per_image_enumerate_exact']:>11.2e} "
                f"{r['speedup']:>7.0f}x"
            )
        print(f"{semiring:<8} {'logZ':<5} {r['max_abs_delta_log_z']:>11.2e}")
    print(f"MS-RMC (Eq. 6) accuracy on the true class: {report['ms_rmc_accuracy']:.1%}")
    if "drm" in report:
        d = report["drm"]
        print(
            f"DRM {d['image_shape'][0]}x{d['image_shape'][1]}, {d['levels']} levels: "
            f"DCN-form max-sum pass {d['images_per_second']:.0f} images/s, MAP class "
            f"accuracy {d['map_class_accuracy']:.1%}; activity-maximizing images "
            f"classified as their class: {d['activity_images_own_class']}"
        )
        print(
            "layer probes (pixels .. class scores): "
            + "; ".join(
                f"{t} " + " ".join(f"{a:.2f}" for a in acc)
                for t, acc in d["probe_accuracy"].items()
            )
        )
    print(
        f"wrote {out}/report.json, samples.png, factor_graph.png, "
        "posterior_comparison.png, drm_*.png"
    )


# ---- fit digits ------------------------------------------------------------------
def run_fit_digits(
    model: str,
    out: Path,
    labels: int | None = None,
    seed: int = 0,
    quiet: bool = False,
    em: str | None = None,
    unlabelled_weight: float = 1.0,
    translations: bool = True,
) -> dict[str, Any]:
    """Fit a classifier on scikit-learn's digits (the project's fixed split).

    ``model``: ``rm`` (supervised hard EM of a per-class RM with 10 templates
    per class, Eqs. 16-17, or soft EM with ``em="soft"``; with ``labels`` = N,
    semi-supervised EM on N labels, §6.3.3, each unlabelled image weighted by
    ``unlabelled_weight``), ``mfa`` (the RM with factor-analyser noise, Eq. 34:
    one factor analyser with 15 factors per class, soft EM by default; with
    ``labels``, semi-supervised, the labelled images also re-rendered under
    one-pixel translations unless ``translations`` is off), ``drm`` (per class,
    a mixture of 4 generative DRMs, each fitted by hard EM from its own start),
    ``dcn`` (the discriminative relaxation, Eq. 25, trained with optax on the
    training images and, with ``translations``, their one-pixel translations,
    the rendering model's translational nuisance of Lemma A.2) or
    ``edrm-forest`` (bagged InfoMax E-DRM trees, Eq. 32). Writes
    ``report.json``, the learned templates/filters as ``templates.png`` and the
    model file where there is one.
    """
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pgm_drm.data import load_digits_split
    from pgm_drm.diagnostics import plot_samples
    from pgm_drm.learning import save_model

    out.mkdir(parents=True, exist_ok=True)
    d = load_digits_split()
    key = jax.random.PRNGKey(seed)
    report: dict[str, Any] = {"model": model, "n_train": len(d.y_train)}
    if model not in ("rm", "mfa") and (em is not None or labels is not None):
        raise ValueError("--labels and --em are for --model rm or mfa")
    if model != "rm" and unlabelled_weight != 1.0:
        raise ValueError("--unlabelled-weight is for --model rm")
    if unlabelled_weight != 1.0 and labels is None:
        raise ValueError("--unlabelled-weight needs --labels (every image is labelled)")
    if model not in ("dcn", "mfa") and not translations:
        raise ValueError("--no-translations is for --model dcn or mfa")
    most = 10 * int(np.bincount(d.y_train).min())  # as many of every class
    if labels is not None and not (10 <= labels <= most and labels % 10 == 0):
        raise ValueError(
            f"--labels must be a multiple of 10 (as many per class) in 10..{most}, "
            f"got {labels}"
        )
    if model == "mfa" and labels is None and not translations:
        raise ValueError("--no-translations with --model mfa needs --labels")
    em = em or ("soft" if model == "mfa" else "hard")
    y = np.asarray(d.y_train)
    if labels is not None:
        rng = np.random.default_rng(seed)
        keep = np.concatenate(
            [rng.permutation(np.flatnonzero(y == c))[: labels // 10] for c in range(10)]
        )
        y = np.full_like(y, -1)
        y[keep] = d.y_train[keep]
        report["labels"] = int(len(keep))
        if model == "rm":
            report["unlabelled_weight"] = float(unlabelled_weight)
    t0 = time.perf_counter()
    if model == "rm":
        from pgm_drm.learning import fit_em

        report["em"] = em
        fit = fit_em(
            d.x_train,
            10,
            10,
            mode=em,
            labels=y,
            n_iter=50,
            key=key,
            min_sigma=0.05,
            unlabelled_weight=unlabelled_weight,
            progress=not quiet,
        )
        pred = np.asarray(fit.model.classify(d.x_test, "max"))
        save_model(out / "model.npz", fit.model)
        templates = np.asarray(fit.model.templates).reshape(-1, 8, 8)
        fig = plot_samples(templates, ncols=10, max_images=len(templates))
    elif model == "mfa":
        from pgm_drm.data import with_translated_labels
        from pgm_drm.learning import fit_fa_em

        report["em"] = em
        x_fit, y_fit = d.x_train, y
        if labels is not None and translations:
            x_fit, y_fit = with_translated_labels(x_fit, y_fit)
            report["translated_labelled_images"] = int(len(y_fit) - len(y))
        fit = fit_fa_em(
            x_fit,
            10,
            1,
            15,
            mode=em,
            labels=y_fit,
            n_iter=100,
            key=key,
            min_sigma=0.1,
            progress=not quiet,
        )
        pred = np.asarray(fit.model.classify(d.x_test, "sum"))
        save_model(out / "model.npz", fit.model)
        from pgm_drm.diagnostics import plot_factor_directions

        fig = plot_factor_directions(fit.model)
    elif model == "drm":
        from pgm_drm.learning import fit_drm_classifier

        clf = fit_drm_classifier(
            d.x_train,
            d.y_train,
            windows=(4, 2),
            n_states=(16, 20),
            template_sizes=(4, 2),
            n_iter=30,
            members=4,
            key=key,
            progress=not quiet,
        )
        report["members"] = clf.n_members
        pred = clf.predict(d.x_test)
        for k, m in enumerate(clf.models):
            c, r = divmod(k, clf.n_members)
            save_model(out / f"drm_class{c}_member{r}.npz", m)
        firsts = clf.models[:: clf.n_members]
        pix = np.concatenate([np.asarray(m.pixel_templates) for m in firsts])
        fig = plot_samples(pix, ncols=16, max_images=len(pix))
        fig.suptitle(
            "level-1 templates, one row per digit's first DRM member", fontsize=8
        )
    elif model == "dcn":
        from pgm_drm.learning import fit_discriminative, init_random, predict

        net = init_random(
            key,
            (8, 8),
            10,
            windows=(4, 3),
            strides=(2, 1),
            states=(64,),
            template_sizes=(3, None),
        )
        from pgm_drm.data import UNIT_SHIFTS, translate_images

        shifts = UNIT_SHIFTS if translations else ((0, 0),)
        # 5x the images and 1/5 the epochs: the same number of Adam steps
        x_fit, y_fit = translate_images(d.x_train, d.y_train, shifts)
        report["translations"] = [list(s) for s in shifts]
        fit = fit_discriminative(
            net,
            x_fit,
            y_fit,
            epochs=20 if translations else 100,
            batch_size=32,
            lr=2e-3,
            weight_decay=0.3,
            key=jax.random.fold_in(key, 1),
            progress=not quiet,
        )
        pred = np.asarray(predict(fit.net, d.x_test))
        w = np.asarray(fit.net.params.layers[0].w)  # (K, G, w*w, 1)
        filters = w[:, 0, :, 0].reshape(-1, 4, 4)
        fig = plot_samples(filters, ncols=16, max_images=len(filters))
        fig.suptitle("first-layer filters (translation 0)", fontsize=8)
    elif model == "edrm-forest":
        from pgm_drm.learning import EDRMForestClassifier

        forest = EDRMForestClassifier(
            n_estimators=100, relax_steps=0, random_state=seed
        )
        forest.fit(d.x_train, d.y_train)
        pred = np.asarray(forest.predict(d.x_test))
        fig = plot_samples(
            d.x_test[:20], ncols=10, titles=[f"pred {int(p)}" for p in pred[:20]]
        )
    else:
        raise ValueError(f"unknown model {model!r}")
    report["fit_seconds"] = time.perf_counter() - t0
    report["test_accuracy"] = float(np.mean(pred == np.asarray(d.y_test)))
    fig.savefig(out / "templates.png", dpi=110)
    plt.close(fig)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


# ---- sample / infer / compare ----------------------------------------------------
MODELS = ("rm", "drm", "conv-drm", "edrm")


def _default_model(name: str, path: Path | None = None):
    import jax

    from pgm_drm.learning import load_model
    from pgm_drm.models import (
        ConvRenderingModel,
        DeepRenderingModel,
        EvolutionaryDRM,
        RenderingModel,
        default_templates,
    )

    if path is not None:
        return load_model(path)
    if name == "rm":
        return RenderingModel(default_templates(8), sigma=0.35, switch_prior=0.9)
    if name == "drm":
        return DeepRenderingModel.default()
    if name == "conv-drm":
        return ConvRenderingModel.random(jax.random.PRNGKey(0), stride=2, sigma=0.5)
    if name == "edrm":
        return EvolutionaryDRM.default()
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def run_sample(model_name: str, n: int, out: Path, seed: int = 0, model_file=None):
    """Sample ``n`` images and their latents; write ``samples.npz`` and a PNG grid."""
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pgm_drm.diagnostics import plot_samples

    model = _default_model(model_name, model_file)
    images, latents = model.sample(jax.random.PRNGKey(seed), n)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {f"latent_{k}": np.asarray(v) for k, v in latents.items()}
    np.savez(out / "samples.npz", images=np.asarray(images), **arrays)
    top = {k: v for k, v in latents.items() if np.ndim(v) == 1}
    fig = plot_samples(images, top)
    fig.savefig(out / "samples.png", dpi=110)
    plt.close(fig)
    return {"model": model_name, "n": n, "image_shape": list(images.shape[1:])}


def run_infer(
    model_name: str,
    images_path: Path,
    out: Path,
    semiring: str = "max",
    temperature: float | None = None,
    model_file=None,
) -> dict[str, Any]:
    """Max-sum / sum-product on every image of ``images_path`` (npz with
    ``images``): the DRM's DCN-form pass, the compiled exact schedule otherwise.
    Writes ``posterior.npz`` (log-marginals, MAP, log Z) and ``summary.json``."""
    import numpy as np

    model = _default_model(model_name, model_file)
    with np.load(images_path) as f:
        if "images" not in f:
            raise ValueError(f"{images_path} has no array named 'images'")
        images = f["images"]
    if images.ndim == len(model.image_shape):
        images = images[None]
    arrays: dict[str, Any] = {}
    if model_name == "drm":
        res = model.infer(images, semiring, temperature)
        arrays["log_marginal_c"] = np.asarray(res.class_log_posterior)
        arrays["log_z"] = np.asarray(res.log_z)
        arrays.update({f"map_{k}": np.asarray(v) for k, v in res.map.items()})
        kind = "dcn"
    else:
        from pgm_drm.graph import compile_model
        from pgm_drm.inference import infer
        from pgm_drm.models import check_images

        check_images(images, model.image_shape)
        fg = compile_model(model.model, image=np.asarray(images[0]))
        post = infer(fg, semiring, temperature=temperature, image=np.asarray(images))
        arrays["log_z"] = np.asarray(post.log_z)
        arrays.update(
            {f"log_marginal_{k}": np.asarray(v) for k, v in post.log_marginals.items()}
        )
        arrays.update({f"map_{k}": np.asarray(v) for k, v in post.map.items()})
        kind = post.schedule
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "posterior.npz", **arrays)
    summary = {
        "model": model_name,
        "n_images": int(images.shape[0]),
        "semiring": semiring,
        "temperature": temperature,
        "schedule": kind,
        "map_c": [int(c) for c in arrays.get("map_c", [])][:20],
        "log_z": [float(z) for z in arrays["log_z"]][:20],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_compare_study(study: str, out: Path, quick: bool = False, seed: int = 0):
    """``dcn``: the DCN pass vs exact inference under overlapping rendering;
    ``greedy``: the E-DRM's greedy path (Eq. 31) vs the exact MAP path. Writes
    ``table.md``, ``rows.json`` and a PNG."""
    import dataclasses

    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.PRNGKey(seed)
    if study == "dcn":
        from pgm_drm.diagnostics import dcn_exactness_study, plot_dcn_exactness

        kw = {"n_images": 5, "n_models": 1, "sigmas": (0.5, 1.0)} if quick else {}
        res = dcn_exactness_study(key, **kw)
        rows, table, fig = res.rows, res.table(), plot_dcn_exactness(res)
    elif study == "greedy":
        from pgm_drm.diagnostics import greedy_vs_exact_study, plot_greedy_vs_exact

        kw = {"n_images": 50, "n_models": 1, "sigmas": (0.1, 1.0)} if quick else {}
        res = greedy_vs_exact_study(key, **kw)
        rows = [
            dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r._asdict()
            for r in res
        ]
        cols = list(rows[0])
        table = "\n".join(
            ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + [
                "| "
                + " | ".join(
                    f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c])
                    for c in cols
                )
                + " |"
                for r in rows
            ]
        )
        fig = plot_greedy_vs_exact(res)
    else:
        raise ValueError(f"unknown study {study!r}; choose 'dcn' or 'greedy'")
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2, default=float))
    fig.savefig(out / f"{study}_study.png", dpi=110)
    plt.close(fig)
    print(table)
    return rows


BENCHES = ("rm", "drm", "em_svi", "edrm_forest", "learning")


def run_bench(name: str, extra: list[str]) -> int:
    """Run ``bench/bench_<name>.py`` of a source checkout (benchmarks are scripts
    that print ratios measured side by side; they are not installed)."""
    import runpy
    import sys

    root = Path(__file__).resolve().parents[1] / "bench"
    script = root / f"bench_{name}.py"
    if not script.exists():
        raise SystemExit(
            f"no benchmark script {script}; benchmarks run from a source checkout"
        )
    sys.argv = [str(script), *extra]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``pgm-drm`` entry point: ``demo``, ``sample``, ``infer``, ``compare``,
    ``fit`` and ``bench`` (each with ``--help``). Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="pgm-drm", description="Deep Rendering Model toolkit."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="sample from a Rendering Model, run max-sum and sum-product, "
        "compare with NumPyro enumeration; DRM sampling, DCN pass, activity "
        "maximization and layer probes; write a report and figures",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument("--images", type=int, default=200)
    demo.add_argument(
        "--reference",
        type=int,
        default=25,
        help="images also solved by NumPyro enumeration",
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-drm", action="store_true", help="skip the DRM section")

    sample = sub.add_parser("sample", help="sample images and latents from a model")
    sample.add_argument("--model", choices=MODELS, default="rm")
    sample.add_argument("--model-file", type=Path, help="a model saved by fit")
    sample.add_argument("-n", "--n", type=int, default=32)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--out", type=Path, default=Path("out/sample"))

    inf = sub.add_parser(
        "infer", help="max-sum / sum-product inference on images from an npz file"
    )
    inf.add_argument("images", type=Path, help="npz with an 'images' array")
    inf.add_argument("--model", choices=MODELS, default="rm")
    inf.add_argument("--model-file", type=Path)
    inf.add_argument("--semiring", choices=("max", "sum"), default="max")
    inf.add_argument("--temperature", type=float, default=None)
    inf.add_argument("--out", type=Path, default=Path("out/infer"))

    cmp_ = sub.add_parser(
        "compare",
        help="compare message passing with NumPyro enumeration (default), or run "
        "a study: --study dcn (DCN pass vs exact under overlap), --study greedy "
        "(E-DRM greedy path vs exact MAP)",
    )
    cmp_.add_argument(
        "--study", choices=("enumeration", "dcn", "greedy"), default="enumeration"
    )
    cmp_.add_argument("--quick", action="store_true", help="a small, fast version")
    cmp_.add_argument("--images", type=int, default=200)
    cmp_.add_argument("--reference", type=int, default=25)
    cmp_.add_argument("--seed", type=int, default=0)
    cmp_.add_argument("--out", type=Path, default=Path("out/compare"))

    fit = sub.add_parser("fit", help="fit a classifier on a dataset")
    fit.add_argument("dataset", choices=("digits",))
    fit.add_argument(
        "--model", choices=("rm", "mfa", "drm", "dcn", "edrm-forest"), default="rm"
    )
    fit.add_argument(
        "--labels",
        type=int,
        default=None,
        help="rm and mfa: semi-supervised EM with this many labels (10 per class "
        "for 100, drawn by --seed)",
    )
    fit.add_argument(
        "--em",
        choices=("hard", "soft"),
        default=None,
        help="rm and mfa: EM kind (default: hard for rm, soft for mfa)",
    )
    fit.add_argument(
        "--unlabelled-weight",
        type=float,
        default=1.0,
        help="rm with --labels: weight of each unlabelled image, in (0, 1] "
        "(EM-lambda; 1 = plain EM)",
    )
    fit.add_argument(
        "--no-translations",
        action="store_true",
        help="dcn and mfa --labels: do not add the one-pixel translations of the "
        "labelled training images",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", type=Path, default=Path("out/fit"))

    bench = sub.add_parser("bench", help="run a benchmark script from bench/")
    bench.add_argument("name", choices=BENCHES)
    bench.add_argument(
        "extra", nargs=argparse.REMAINDER, help="arguments passed to the script"
    )

    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args.name, args.extra)
    _setup_jax()
    if args.command == "demo":
        if args.images < 1 or args.reference < 1:
            parser.error("--images and --reference must be >= 1")
        report = run_demo(args.out, args.images, args.reference, args.seed)
        if not args.no_drm:
            report["drm"] = run_drm_demo(args.out, seed=args.seed)
        (args.out / "report.json").write_text(json.dumps(report, indent=2))
        _print_demo(report, args.out)
    elif args.command == "sample":
        if args.n < 1:
            parser.error("-n must be >= 1")
        info = run_sample(args.model, args.n, args.out, args.seed, args.model_file)
        print(f"{info}: wrote {args.out}/samples.npz, samples.png")
    elif args.command == "infer":
        summary = run_infer(
            args.model,
            args.images,
            args.out,
            args.semiring,
            args.temperature,
            args.model_file,
        )
        print(json.dumps(summary))
        print(f"wrote {args.out}/posterior.npz, summary.json")
    elif args.command == "compare":
        if args.study == "enumeration":
            n_img = 20 if args.quick else args.images
            n_ref = 3 if args.quick else args.reference
            report = run_demo(args.out, n_img, min(n_ref, n_img), args.seed)
            _print_demo(report, args.out)
        else:
            run_compare_study(args.study, args.out, args.quick, args.seed)
            print(f"wrote {args.out}/table.md, rows.json, {args.study}_study.png")
    elif args.command == "fit":
        try:
            report = run_fit_digits(
                args.model,
                args.out,
                args.labels,
                args.seed,
                em=args.em,
                unlabelled_weight=args.unlabelled_weight,
                translations=not args.no_translations,
            )
        except ValueError as e:
            parser.error(str(e))
        print(
            f"digits, {args.model}: test accuracy {report['test_accuracy']:.4f} "
            f"(fit {report['fit_seconds']:.1f} s); wrote {args.out}/report.json, "
            "templates.png"
        )
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
