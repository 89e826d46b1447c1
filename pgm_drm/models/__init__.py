"""Generative models as NumPyro model functions: RM and the tree DRM (E-DRM next)."""

from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.drm import DeepRenderingModel, grid_to_plates, plates_to_grid
from pgm_drm.models.rendering import RenderingModel, default_templates
from pgm_drm.models.validation import check_images, check_prior, check_probability

__all__ = [
    "ConvRenderingModel",
    "DeepRenderingModel",
    "RenderingModel",
    "check_images",
    "check_prior",
    "check_probability",
    "default_templates",
    "grid_to_plates",
    "plates_to_grid",
]
