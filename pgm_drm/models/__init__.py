"""NumPyro generative models: RM, tree and convolutional DRM, E-DRM."""

from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.drm import DeepRenderingModel, grid_to_plates, plates_to_grid
from pgm_drm.models.edrm import (
    EvolutionaryDRM,
    GreedyStudyRow,
    coarse_to_fine_margin,
    exact_map_path,
    greedy_path,
    greedy_path_naive,
    greedy_vs_exact_study,
    leaf_log_joint,
    path_log_joint,
    path_posterior,
    plot_greedy_vs_exact,
)
from pgm_drm.models.rendering import RenderingModel, default_templates
from pgm_drm.models.validation import check_images, check_prior, check_probability

__all__ = [
    "ConvRenderingModel",
    "DeepRenderingModel",
    "EvolutionaryDRM",
    "GreedyStudyRow",
    "RenderingModel",
    "check_images",
    "check_prior",
    "check_probability",
    "coarse_to_fine_margin",
    "default_templates",
    "exact_map_path",
    "greedy_path",
    "greedy_path_naive",
    "greedy_vs_exact_study",
    "grid_to_plates",
    "leaf_log_joint",
    "path_log_joint",
    "path_posterior",
    "plates_to_grid",
    "plot_greedy_vs_exact",
]
