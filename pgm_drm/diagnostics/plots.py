"""Matplotlib figures: factor graphs, sample grids, posterior comparisons."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import matplotlib.pyplot as plt
import networkx as nx
import numpy as np

if TYPE_CHECKING:
    from pgm_drm.graph.compile import FactorGraph
    from pgm_drm.graph.schedule import Schedule
    from pgm_drm.inference.api import Posterior

__all__ = [
    "draw_factor_graph",
    "plot_factor_directions",
    "plot_posterior_comparison",
    "plot_reconstructions",
    "plot_samples",
]


def draw_factor_graph(
    fg: FactorGraph,
    ax: plt.Axes | None = None,
    schedule: Schedule | None = None,
    max_labels: int = 60,
) -> plt.Axes:
    """Draw the bipartite factor graph: variables as circles, factors as squares.

    With a two-pass ``schedule`` of kind "tree", edges are annotated with the step
    of the upward message.
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 5))
    g = fg.graph
    variables = [n for n, d in g.nodes(data=True) if d["kind"] == "variable"]
    factors = [n for n, d in g.nodes(data=True) if d["kind"] == "factor"]
    try:
        pos = nx.kamada_kawai_layout(g) if g.number_of_nodes() > 1 else None
    except Exception:  # disconnected or degenerate graphs
        pos = None
    if pos is None:
        pos = nx.spring_layout(g, seed=0)
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.5)
    nx.draw_networkx_nodes(
        g, pos, nodelist=variables, node_color="#8ecae6", node_shape="o", ax=ax
    )
    nx.draw_networkx_nodes(
        g,
        pos,
        nodelist=factors,
        node_color="#fb8500",
        node_shape="s",
        node_size=120,
        ax=ax,
    )
    if g.number_of_nodes() <= max_labels:
        nx.draw_networkx_labels(
            g, pos, labels={v: v for v in variables}, ax=ax, font_size=8
        )
        nx.draw_networkx_labels(
            g,
            pos,
            labels={f: f for f in factors},
            ax=ax,
            font_size=6,
            verticalalignment="bottom",
        )
    if schedule is not None and schedule.kind == "tree":
        names = [v.name for v in fg.variables] + [f.name for f in fg.factors if f.scope]
        labels = {}
        for step, (i, j) in enumerate(schedule.messages[: schedule.n_upward]):
            labels[(names[i], names[j])] = str(step)
        nx.draw_networkx_edge_labels(g, pos, edge_labels=labels, ax=ax, font_size=6)
    ax.set_title(f"factor graph: {len(variables)} variables, {len(factors)} factors")
    ax.set_axis_off()
    return ax


def plot_samples(
    images: Any,
    latents: Mapping[str, Any] | None = None,
    ncols: int = 8,
    max_images: int = 32,
    titles: list[str] | None = None,
) -> plt.Figure:
    """A grid of 2-d images, titled with their latents (``c=1 g=3 a=1``) or with
    ``titles``."""
    images = np.asarray(images)[:max_images]
    n = images.shape[0]
    ncols = min(ncols, n)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(1.4 * ncols, 1.6 * nrows), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if k >= n:
            continue
        ax.imshow(images[k], cmap="gray")
        if titles is not None:
            ax.set_title(titles[k], fontsize=7)
        elif latents:
            ax.set_title(
                " ".join(
                    f"{s}={int(np.asarray(v)[k])}"
                    for s, v in latents.items()
                    if np.ndim(v) == 1
                ),
                fontsize=7,
            )
    fig.tight_layout()
    return fig


def plot_posterior_comparison(
    posteriors: Mapping[str, Posterior], site: str, ax: plt.Axes | None = None
) -> plt.Axes:
    """Bar chart of one site's (max-)marginals from several methods side by side."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    names = list(posteriors)
    width = 0.8 / max(len(names), 1)
    n_states = 1
    for k, name in enumerate(names):
        p = np.exp(np.asarray(posteriors[name].log_marginals[site]).reshape(-1))
        x = np.arange(p.shape[0])
        n_states = max(n_states, p.shape[0])
        # groups centred on the state index
        ax.bar(x + (k - (len(names) - 1) / 2) * width, p, width=width, label=name)
    ax.set_xticks(np.arange(n_states))
    ax.set_xlabel(f"{site} (flattened states)")
    ax.set_ylabel("probability")
    ax.set_title(f"posterior of {site}")
    ax.legend(fontsize=7)
    return ax


def plot_factor_directions(
    model: Any, n_dirs: int = 4, scale: float = 2.0
) -> plt.Figure:
    """A factor-analyser RM's templates and what its continuous nuisance does.

    One row per ``(c, g)``: the template ``mu_cg``, then ``mu_cg +/- scale * s_j
    u_j`` for its ``n_dirs`` main factor directions, with ``Lambda_cg = U S V^T``
    (the loadings are defined up to a rotation of ``z``; ``U S`` is not).

    Args:
        model: A :class:`~pgm_drm.models.FactorRenderingModel` with 2-d images.
        n_dirs: Directions shown per row (at most ``q``).
        scale: How many standard deviations of ``z`` to move.
    """
    n_dirs = min(int(n_dirs), model.n_factors)
    rows = []
    for c in range(model.n_classes):
        for g in range(model.n_nuisances):
            mu = np.asarray(model.templates[c, g]).ravel()
            u, s, _ = np.linalg.svd(
                np.asarray(model.loadings[c, g]), full_matrices=False
            )
            rows.append(mu)
            for v in (u * s)[:, :n_dirs].T:
                rows += [mu + scale * v, mu - scale * v]
    images = np.stack(rows).reshape((-1,) + model.image_shape)
    ncols = 1 + 2 * n_dirs
    titles = ["mu"] + [
        f"{sign}{scale:g} f{j + 1}" for j in range(n_dirs) for sign in "+-"
    ]
    titles += [""] * (len(images) - ncols)
    return plot_samples(images, ncols=ncols, max_images=len(images), titles=titles)


def plot_reconstructions(
    images: Any,
    reconstructions: Any,
    titles: list[str] | None = None,
    max_images: int = 8,
) -> plt.Figure:
    """Images (top row) above their top-down reconstructions (bottom row), e.g.
    ``drm.render(drm.infer(images).map)`` (§2.4 stage ii)."""
    images = np.asarray(images)[:max_images]
    recon = np.asarray(reconstructions)[:max_images]
    n = images.shape[0]
    fig, axes = plt.subplots(2, n, figsize=(1.5 * n, 3.3), squeeze=False)
    for k in range(n):
        for row, x in enumerate((images, recon)):
            ax = axes[row, k]
            ax.imshow(x[k], cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        if titles is not None:
            axes[0, k].set_title(titles[k], fontsize=7)
    axes[0, 0].set_ylabel("image", fontsize=8)
    axes[1, 0].set_ylabel("top-down MAP", fontsize=8)
    fig.tight_layout()
    return fig
