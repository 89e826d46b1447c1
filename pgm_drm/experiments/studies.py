"""Studies: when is a DCN exact inference, and when is the greedy E-DRM path the MAP?

The DCN pass vs exact inference under overlap (:func:`dcn_exactness_study`). On
:class:`pgm_drm.models.ConvRenderingModel` (windows that overlap by
``t - stride`` pixels) we sample images, run

* the DCN-form pass (:func:`pgm_drm.inference.conv_dcn_infer`): max-sum for the
  MAP, sum-product for the class posterior;
* loopy max-sum / sum-product on the model's true factor graph
  (:func:`pgm_drm.inference.infer` with ``schedule="loopy"``);
* exact inference: the compiled junction tree (``schedule="exact"``), itself
  tested against NumPyro enumeration and brute force;

and report, per (overlap, noise), how often each approximation's joint MAP is the
exact MAP and how far its class posterior is (total variation).

The same question for the E-DRM (§4): :func:`greedy_vs_exact_study` measures how
often the greedy decision tree (Eq. 31) finds the exact MAP path (Eq. 30).

:func:`run_study` runs either study and writes its table, rows and figure (the
``pgm-drm compare dcn|greedy`` command).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from pgm_drm._random import np_rng
from pgm_drm._typing import Array, PRNGKey
from pgm_drm.graph import compile_model
from pgm_drm.inference.api import Posterior, infer
from pgm_drm.inference.conv_dcn import conv_dcn_infer
from pgm_drm.inference.edrm import exact_map_path, greedy_path, path_log_joint
from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.edrm import EvolutionaryDRM, RootRule

__all__ = [
    "DCNExactnessStudy",
    "GreedyStudyRow",
    "StudyReport",
    "dcn_exactness_study",
    "greedy_vs_exact_study",
    "plot_dcn_exactness",
    "greedy_table",
    "plot_greedy_vs_exact",
    "run_study",
]

#: Columns of :attr:`DCNExactnessStudy.rows`.
COLUMNS = (
    "overlap",
    "sigma",
    "n_images",
    "dcn_map_exact",
    "loopy_map_exact",
    "dcn_class_agree",
    "dcn_class_tv",
    "loopy_class_tv",
    "exact_accuracy",
    "dcn_accuracy",
    "loopy_converged",
)


class DCNExactnessStudy(NamedTuple):
    """Result of :func:`dcn_exactness_study`.

    Attributes:
        rows: One dict per (overlap, sigma) with the keys of ``COLUMNS``:
            ``dcn_map_exact`` / ``loopy_map_exact`` fraction of images whose joint
            MAP ``(c, g, every switch)`` equals the exact one; ``dcn_class_agree``
            fraction whose max-sum class equals the exact MAP class;
            ``*_class_tv`` mean total-variation distance of the sum-product class
            posterior from the exact one; ``*_accuracy`` fraction of true classes
            recovered; ``loopy_converged`` fraction of loopy runs that converged.
        models: ``(overlap, r) -> model`` for the ``r``-th random parameter set
            (same templates and priors across overlaps, other strides).
    """

    rows: list[dict[str, float]]
    models: dict[tuple[int, int], ConvRenderingModel]

    def table(self) -> str:
        """The rows as a Markdown table."""
        head = "| " + " | ".join(COLUMNS) + " |"
        sep = "|" + "---|" * len(COLUMNS)
        lines = [head, sep]
        for r in self.rows:
            cells = [
                f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in COLUMNS
            ]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _switches(model: ConvRenderingModel, post: Posterior) -> Array:
    n = model.grid
    a = jnp.stack([post.map[f"a_{u // n}_{u % n}"] for u in range(n * n)], axis=-1)
    return jnp.reshape(a, a.shape[:-1] + (n, n))


def _map_equal(model, post: Posterior, c: Array, g: Array, a: Array) -> Array:
    return (
        (post.map["c"] == c)
        & (post.map["g"] == g)
        & jnp.all(_switches(model, post) == a, axis=(-2, -1))
    )


def _tv(log_p: Array, log_q: Array) -> Array:
    return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def _cell(fg, model, images, latents, loopy):
    """Per-image indicators / distances for one model and noise level."""
    ev = {"image": images, "sigma": jnp.asarray(model.sigma)}
    exact_max = infer(fg, "max", schedule="exact", **ev)
    exact_sum = infer(fg, "sum", schedule="exact", **ev)
    dcn_max = conv_dcn_infer(model, images, "max")
    dcn_sum = conv_dcn_infer(model, images, "sum")
    c, g, a = exact_max.map["c"], exact_max.map["g"], _switches(model, exact_max)
    out = {
        "dcn_map_exact": (dcn_max.map["c"] == c)
        & (dcn_max.map["g"] == g)
        & jnp.all(dcn_max.map["a"] == a, axis=(-2, -1)),
        "dcn_class_agree": dcn_max.map["c"] == c,
        "dcn_class_tv": _tv(dcn_sum.class_log_posterior, exact_sum.log_marginals["c"]),
        "exact_accuracy": c == latents["c"],
        "dcn_accuracy": dcn_max.map["c"] == latents["c"],
    }
    nan = jnp.full(images.shape[0], jnp.nan)
    out.update(loopy_map_exact=nan, loopy_class_tv=nan, loopy_converged=nan)
    if loopy:
        loopy_max = infer(fg, "max", schedule="loopy", **ev)
        loopy_sum = infer(fg, "sum", schedule="loopy", **ev)
        out["loopy_map_exact"] = _map_equal(model, loopy_max, c, g, a)
        out["loopy_class_tv"] = _tv(
            loopy_sum.log_marginals["c"], exact_sum.log_marginals["c"]
        )
        out["loopy_converged"] = (np.asarray(loopy_max.deltas)[:, -1] < 1e-6) & (
            np.asarray(loopy_sum.deltas)[:, -1] < 1e-6
        )
    return [(k, np.asarray(v, dtype=float)) for k, v in out.items()]


def dcn_exactness_study(
    key: PRNGKey,
    overlaps: tuple[int, ...] = (0, 1, 2),
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0, 1.5),
    n_images: int = 30,
    n_models: int = 3,
    patch: int = 3,
    grid: int = 3,
    n_states: int = 3,
    n_classes: int = 3,
    class_size: int = 2,
    switch_prior: float = 0.8,
    loopy: bool = True,
    progress: bool = True,
) -> DCNExactnessStudy:
    """Measure the DCN pass (and loopy BP) against exact inference under overlap.

    ``n_models`` random parameter sets (pixel templates, class templates,
    priors) are shared by every cell; only the stride (``patch - overlap``) and the
    noise change. Images are sampled from the model of each cell, so the question is
    the paper's: is the DCN's max-sum pass the exact MAP of the generative model
    that produced the data (§2.4, Eqs. 12-13)? The answer is yes for overlap 0
    (checked here to 1e-6 in the tests) and increasingly no as overlap and noise
    grow.

    Args:
        key: PRNG key (parameters and images).
        overlaps: Pixels shared by neighbouring patches, each in ``0..patch-1``.
        sigmas: Pixel noise levels.
        n_images: Images per model and cell.
        n_models: Random parameter sets; each cell pools ``n_models * n_images``
            images (one model's template geometry can make overlap harmless or
            harmful, so the study averages over several).
        patch, grid, n_states, n_classes, class_size, switch_prior: Model shape,
            see :meth:`ConvRenderingModel.random`.
        loopy: Also run loopy max-sum / sum-product on the true graph.
        progress: Show a tqdm bar.

    Returns:
        :class:`DCNExactnessStudy`; ``.table()`` is Markdown,
        :func:`plot_dcn_exactness` plots it.
    """
    if n_images < 1 or n_models < 1:
        raise ValueError(
            f"n_images and n_models must be >= 1, got {n_images}, {n_models}"
        )
    if not sigmas or any(not np.isfinite(s) or s <= 0 for s in sigmas):
        raise ValueError(f"sigmas must be finite numbers > 0, got {sigmas}")
    for o in overlaps:
        if not 0 <= o < patch:
            raise ValueError(f"overlap must be in 0..{patch - 1}, got {o}")
    rows, models = [], {}
    model_keys = jax.random.split(jax.random.fold_in(key, 0), n_models)
    data_key = jax.random.fold_in(key, 1)
    cells = [(o, s) for o in overlaps for s in sigmas]
    bar = tqdm(cells, desc="DCN vs exact", disable=not progress)
    graphs = {}
    for overlap, sigma in bar:
        bar.set_postfix(overlap=overlap, sigma=sigma)
        stats: dict[str, list] = {}
        for r, key_model in enumerate(model_keys):
            base = ConvRenderingModel.random(
                key_model,
                stride=patch - overlap,
                patch=patch,
                grid=grid,
                n_states=n_states,
                n_classes=n_classes,
                class_size=class_size,
                switch_prior=switch_prior,
            )
            models[(overlap, r)] = base
            model = ConvRenderingModel(**{**base.__dict__, "sigma": float(sigma)})
            sub = jax.random.fold_in(data_key, len(rows) * n_models + r)
            images, latents = model.sample(sub, n_images)
            if (overlap, r) not in graphs:  # one graph per model: sigma is evidence
                graphs[(overlap, r)] = compile_model(
                    base.model, image=images[0], sigma=jnp.asarray(float(sigma))
                )
            for k, v in _cell(graphs[(overlap, r)], model, images, latents, loopy):
                stats.setdefault(k, []).append(v)
        row = {
            "overlap": int(overlap),
            "sigma": float(sigma),
            "n_images": n_images * n_models,
        }
        row.update({k: float(np.mean(np.concatenate(v))) for k, v in stats.items()})
        rows.append(row)
    return DCNExactnessStudy(rows, models)


def plot_dcn_exactness(study: DCNExactnessStudy) -> plt.Figure:
    """Two panels vs noise, one line per overlap: fraction of exact joint MAPs
    (DCN solid, loopy BP dashed) and class-posterior total variation."""
    fig, (ax_map, ax_tv) = plt.subplots(1, 2, figsize=(10, 3.8))
    overlaps = sorted({r["overlap"] for r in study.rows})
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(overlaps), 1)))
    for col, o in zip(colors, overlaps, strict=True):
        rs = [r for r in study.rows if r["overlap"] == o]
        s = [r["sigma"] for r in rs]
        ax_map.plot(
            s,
            [r["dcn_map_exact"] for r in rs],
            "o-",
            color=col,
            label=f"DCN, overlap {o}",
        )
        ax_tv.plot(
            s,
            [r["dcn_class_tv"] for r in rs],
            "o-",
            color=col,
            label=f"DCN, overlap {o}",
        )
        if not np.isnan(rs[0]["loopy_map_exact"]):
            ax_map.plot(
                s,
                [r["loopy_map_exact"] for r in rs],
                "s--",
                color=col,
                alpha=0.7,
                label=f"loopy BP, overlap {o}",
            )
            ax_tv.plot(
                s,
                [r["loopy_class_tv"] for r in rs],
                "s--",
                color=col,
                alpha=0.7,
                label=f"loopy BP, overlap {o}",
            )
    ax_map.set(
        xlabel="pixel noise sigma",
        ylabel="fraction MAP == exact MAP",
        ylim=(-0.05, 1.05),
        title="joint MAP (c, g, switches)",
    )
    ax_tv.set(
        xlabel="pixel noise sigma",
        ylabel="mean TV(class posterior, exact)",
        title="class posterior (sum-product)",
    )
    ax_tv.set_ylim(bottom=0.0)
    ax_map.legend(fontsize=7)
    fig.suptitle("When is a DCN exact inference? (convolutional rendering)")
    fig.tight_layout()
    return fig


# ---- E-DRM: the greedy decision tree (Eq. 31) against the exact MAP (Eq. 30) ----
class GreedyStudyRow(NamedTuple):
    """Agreement of the greedy decision tree (Eq. 31) with the exact MAP (Eq. 30).

    Attributes:
        sigma: Pixel noise standard deviation.
        path_agreement: Fraction of images whose greedy path equals the MAP path.
        class_agreement: Fraction with the same root class ``c_L``.
        truth_map: Fraction whose MAP path is the path that generated the image.
        truth_greedy: Same for the greedy path.
        mean_gap: Mean ``log p(MAP path, I) - log p(greedy path, I)`` (>= 0).
        n_images: Images per row (pooled over models).
    """

    sigma: float
    path_agreement: float
    class_agreement: float
    truth_map: float
    truth_greedy: float
    mean_gap: float
    n_images: int


def greedy_vs_exact_study(
    key: PRNGKey,
    sigmas: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0),
    models: Sequence[EvolutionaryDRM] | None = None,
    n_models: int = 4,
    n_images: int = 500,
    root: RootRule = "compare",
) -> list[GreedyStudyRow]:
    """How often the greedy path (Eq. 31) equals the exact MAP path (Eq. 30).

    For each model: sample ``n_images`` paths, render them with pixel noise of
    every ``sigma`` (the same noise draw scaled), decode by :func:`greedy_path`
    and :func:`exact_map_path`, pool the counts over models.

    Args:
        key: PRNG key for the models and the images.
        sigmas: Noise levels.
        models: E-DRMs to study (their ``sigma`` is replaced); default:
            :meth:`EvolutionaryDRM.default` plus ``n_models - 1`` random 8x8
            models with 2 roots, branching (3, 2), mutation decay 0.5.
        n_models: See ``models``.
        n_images: Images per model and noise level.
        root: Root rule of :func:`greedy_path`.

    Returns:
        One :class:`GreedyStudyRow` per ``sigma``.

    Example:
        >>> rows = greedy_vs_exact_study(jax.random.PRNGKey(0), (0.01,), n_models=1,
        ...                              n_images=20)
        >>> float(rows[0].path_agreement)
        1.0
    """
    key, sub = jax.random.split(key)
    if models is None:
        ks = jax.random.split(sub, max(int(n_models) - 1, 1))
        models = [EvolutionaryDRM.default()] + [
            EvolutionaryDRM.random(k, 2, (3, 2), (8, 8), scale=0.6, decay=0.5)
            for k in ks[: int(n_models) - 1]
        ]
    sigmas = [float(s) for s in sigmas]
    counts = np.zeros((len(sigmas), 6))
    for m in models:
        # Draw the paths once, then render them at every noise level (the same
        # distribution as m.replace(sigma=s).sample at each s).
        key, sub = jax.random.split(key)
        _, truth = m.sample_fast(sub, int(n_images))
        clean = m.render(truth)
        key, sub = jax.random.split(key)
        noise = jnp.asarray(np_rng(sub).normal(size=clean.shape))
        for i, s in enumerate(sigmas):
            ms = m.replace(sigma=s)
            images = clean + s * noise
            g = greedy_path(ms, images, root)
            e = exact_map_path(ms, images)
            gap = path_log_joint(ms, images, e) - path_log_joint(ms, images, g)
            counts[i] += [
                float(jnp.sum(jnp.all(g == e, axis=1))),
                float(jnp.sum(g[:, 0] == e[:, 0])),
                float(jnp.sum(jnp.all(e == truth, axis=1))),
                float(jnp.sum(jnp.all(g == truth, axis=1))),
                float(jnp.sum(gap)),
                images.shape[0],
            ]
    rows = []
    for s, c in zip(sigmas, counts, strict=True):
        rows.append(GreedyStudyRow(s, *(c[:5] / c[5]), int(c[5])))
    return rows


def plot_greedy_vs_exact(rows: Sequence[GreedyStudyRow], ax: Any = None) -> Any:
    """Agreement curves of :func:`greedy_vs_exact_study` against ``sigma``.

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    s = [r.sigma for r in rows]
    ax.plot(s, [r.path_agreement for r in rows], "o-", label="greedy = MAP (path)")
    ax.plot(s, [r.class_agreement for r in rows], "s--", label="greedy = MAP (c_L)")
    ax.plot(s, [r.truth_map for r in rows], "^:", label="MAP = true path")
    ax.plot(s, [r.truth_greedy for r in rows], "v:", label="greedy = true path")
    ax.set_xscale("log")
    ax.set_xlabel("pixel noise sigma")
    ax.set_ylabel("fraction of images")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("E-DRM: greedy decision tree (Eq. 31) vs exact MAP (Eq. 30)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def greedy_table(rows: Sequence[GreedyStudyRow]) -> str:
    """The rows of :func:`greedy_vs_exact_study` as a Markdown table."""
    dicts = [r._asdict() for r in rows]
    cols = list(dicts[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in dicts:
        cells = [f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


class StudyReport(NamedTuple):
    """What :func:`run_study` wrote.

    Attributes:
        rows: One dict per row (``rows.json``).
        table: The rows as Markdown (``table.md``).
    """

    rows: list[dict[str, Any]]
    table: str


def run_study(
    study: Literal["dcn", "greedy"], out: Path, quick: bool = False, seed: int = 0
) -> StudyReport:
    """Run a study and write ``table.md``, ``rows.json`` and ``<study>_study.png``.

    Args:
        study: ``"dcn"``: the DCN pass vs exact inference under overlapping
            rendering (:func:`dcn_exactness_study`); ``"greedy"``: the E-DRM's
            greedy path (Eq. 31) vs the exact MAP path (Eq. 30,
            :func:`greedy_vs_exact_study`).
        out: Output folder (created).
        quick: A small, fast version (one model, two noise levels, few images).
        seed: PRNG seed.

    Returns:
        :class:`StudyReport`.
    """
    out.mkdir(parents=True, exist_ok=True)
    key = jax.random.PRNGKey(seed)
    if study == "dcn":
        kw = {"n_images": 5, "n_models": 1, "sigmas": (0.5, 1.0)} if quick else {}
        res = dcn_exactness_study(key, **kw)
        rows, table, fig = res.rows, res.table(), plot_dcn_exactness(res)
    elif study == "greedy":
        kw = {"n_images": 50, "n_models": 1, "sigmas": (0.1, 1.0)} if quick else {}
        res = greedy_vs_exact_study(key, **kw)
        rows = [r._asdict() for r in res]
        table, fig = greedy_table(res), plot_greedy_vs_exact(res)
    else:
        raise ValueError(f"unknown study {study!r}; choose 'dcn' or 'greedy'")
    (out / "table.md").write_text(table + "\n")
    (out / "rows.json").write_text(json.dumps(rows, indent=2, default=float))
    fig.savefig(out / f"{study}_study.png", dpi=110)
    plt.close(fig)
    return StudyReport(rows, table)
