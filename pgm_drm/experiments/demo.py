"""The demo: the Rendering Model against NumPyro's enumeration, and the DRM.

:func:`run_demo` samples from a default RM, runs max-sum and sum-product with the
compiled kernel, compares every marginal, MAP and ``log Z`` with NumPyro's
enumeration and times both; :func:`run_drm_demo` samples the default DRM, runs the
DCN-form max-sum pass (Eqs. 12-13), reconstructs top-down, activity-maximizes
(Eqs. 26-27) and probes the layers (§3.3). :func:`format_demo_report` is the
printed summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from pgm_drm.diagnostics import (
    activity_maximization,
    disentanglement_probe,
    draw_factor_graph,
    plot_activity_maximization,
    plot_disentanglement,
    plot_posterior_comparison,
    plot_reconstructions,
    plot_samples,
    probe_drm,
)
from pgm_drm.graph import compile_model
from pgm_drm.inference import enumerate_exact, infer
from pgm_drm.models import DeepRenderingModel, RenderingModel, default_templates

__all__ = ["format_demo_report", "run_demo", "run_drm_demo"]


def run_demo(
    out: Path,
    n_images: int = 200,
    n_reference: int = 25,
    seed: int = 0,
    quiet: bool = False,
    drm: bool = False,
) -> dict[str, Any]:
    """Sample from a default RM, run max-sum and sum-product, compare with NumPyro.

    Writes ``report.json``, ``samples.png``, ``factor_graph.png`` and
    ``posterior_comparison.png`` under ``out`` and returns the report. With
    ``drm``, also runs :func:`run_drm_demo` (its figures under ``out``, its
    report under the key ``"drm"``): the ``pgm-drm demo`` command.
    """
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
    if drm:
        report["drm"] = run_drm_demo(out, seed=seed)
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


def format_demo_report(report: dict[str, Any], out: Path) -> str:
    """The report of :func:`run_demo` as the lines ``pgm-drm demo`` prints."""
    lines: list[str] = []
    lines.append(
        f"Rendering model {report['model']}, {report['n_images']} images, "
        f"schedule '{report['schedule']}', compared on {report['n_reference_images']}"
    )
    head = (
        f"{'semiring':<8} {'site':<5} {'max|dlogm|':>11} {'MAP=NumPyro':>12} "
        f"{'MAP=truth':>10} {'kernel s/img':>13} {'enum s/img':>11} {'speedup':>8}"
    )
    lines.append(head)
    lines.append("-" * len(head))
    for semiring, r in report["semirings"].items():
        for site, s in r["sites"].items():
            lines.append(
                f"{semiring:<8} {site:<5} {s['max_abs_delta_log_marginal']:>11.2e} "
                f"{s['map_agreement_with_numpyro']:>12.0%} "
                f"{s['map_equals_true_latent']:>10.0%} "
                f"{r['seconds_per_image_kernel']:>13.2e} "
                f"{r['seconds_per_image_enumerate_exact']:>11.2e} "
                f"{r['speedup']:>7.0f}x"
            )
        lines.append(f"{semiring:<8} {'logZ':<5} {r['max_abs_delta_log_z']:>11.2e}")
    lines.append(
        f"MS-RMC (Eq. 6) accuracy on the true class: {report['ms_rmc_accuracy']:.1%}"
    )
    if "drm" in report:
        d = report["drm"]
        lines.append(
            f"DRM {d['image_shape'][0]}x{d['image_shape'][1]}, {d['levels']} levels: "
            f"DCN-form max-sum pass {d['images_per_second']:.0f} images/s, MAP class "
            f"accuracy {d['map_class_accuracy']:.1%}; activity-maximizing images "
            f"classified as their class: {d['activity_images_own_class']}"
        )
        lines.append(
            "layer probes (pixels .. class scores): "
            + "; ".join(
                f"{t} " + " ".join(f"{a:.2f}" for a in acc)
                for t, acc in d["probe_accuracy"].items()
            )
        )
    drm = ", drm_*.png" if "drm" in report else ""
    lines.append(
        f"wrote {out}/report.json, samples.png, factor_graph.png, "
        f"posterior_comparison.png{drm}"
    )
    return "\n".join(lines)
