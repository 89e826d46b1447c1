"""Plots and comparisons of posteriors; activity maximization and layer probes."""

from pgm_drm.diagnostics.activity import (
    ActivityMaximization,
    activity_maximization,
    naive_activity_maximization,
    plot_activity_maximization,
)
from pgm_drm.diagnostics.exactness import (
    DCNExactnessStudy,
    dcn_exactness_study,
    plot_dcn_exactness,
)
from pgm_drm.diagnostics.plots import (
    draw_factor_graph,
    plot_posterior_comparison,
    plot_reconstructions,
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
    "DCNExactnessStudy",
    "ProbeResult",
    "activity_maximization",
    "dcn_exactness_study",
    "disentanglement_probe",
    "draw_factor_graph",
    "naive_activity_maximization",
    "plot_activity_maximization",
    "plot_dcn_exactness",
    "plot_disentanglement",
    "plot_posterior_comparison",
    "plot_reconstructions",
    "plot_samples",
    "probe_drm",
]
