"""Posteriors as ArviZ InferenceData, plots, activity maximization, layer probes.

The DCN-vs-exact and greedy-vs-exact studies are experiments:
:mod:`pgm_drm.experiments.studies`."""

from pgm_drm.diagnostics.activity import (
    ActivityMaximization,
    activity_maximization,
    naive_activity_maximization,
    plot_activity_maximization,
)
from pgm_drm.diagnostics.arviz import (
    SiteLayout,
    discrete_posterior_draws,
    draws_to_inference_data,
    from_rendering_model,
    plot_posterior_comparison_az,
    posterior_to_inference_data,
    site_layouts,
    to_inference_data,
)
from pgm_drm.diagnostics.plots import (
    draw_factor_graph,
    plot_factor_directions,
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
    "ProbeResult",
    "SiteLayout",
    "activity_maximization",
    "discrete_posterior_draws",
    "disentanglement_probe",
    "draw_factor_graph",
    "draws_to_inference_data",
    "from_rendering_model",
    "naive_activity_maximization",
    "plot_activity_maximization",
    "plot_disentanglement",
    "plot_posterior_comparison",
    "plot_posterior_comparison_az",
    "plot_reconstructions",
    "plot_factor_directions",
    "plot_samples",
    "posterior_to_inference_data",
    "probe_drm",
    "site_layouts",
    "to_inference_data",
]
