"""Plots and comparisons of posteriors."""

from pgm_drm.diagnostics.plots import (
    draw_factor_graph,
    plot_posterior_comparison,
    plot_samples,
)

__all__ = ["draw_factor_graph", "plot_posterior_comparison", "plot_samples"]
