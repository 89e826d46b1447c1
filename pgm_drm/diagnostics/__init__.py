"""Plots and comparisons of posteriors; activity maximization and layer probes."""

from pgm_drm.diagnostics.activity import (
    ActivityMaximization,
    activity_maximization,
    naive_activity_maximization,
    plot_activity_maximization,
)
from pgm_drm.diagnostics.plots import (
    draw_factor_graph,
    plot_posterior_comparison,
    plot_samples,
)
from pgm_drm.diagnostics.probes import (
    ProbeResult,
    disentanglement_probe,
    plot_disentanglement,
    probe_drm,
)

__all__ = [
    "ActivityMaximization",
    "ProbeResult",
    "activity_maximization",
    "disentanglement_probe",
    "draw_factor_graph",
    "naive_activity_maximization",
    "plot_activity_maximization",
    "plot_disentanglement",
    "plot_posterior_comparison",
    "plot_samples",
    "probe_drm",
]
