"""Generative models as NumPyro model functions: RM (and later DRM, E-DRM)."""

from pgm_drm.models.rendering import RenderingModel, default_templates
from pgm_drm.models.validation import check_images, check_prior, check_probability

__all__ = [
    "RenderingModel",
    "check_images",
    "check_prior",
    "check_probability",
    "default_templates",
]
