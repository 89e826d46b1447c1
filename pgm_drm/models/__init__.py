"""NumPyro generative models: RM, tree and convolutional DRM, E-DRM, and the RM
with factor-analyser noise (Eq. 34)."""

from pgm_drm.models.conv_drm import ConvRenderingModel
from pgm_drm.models.drm import DeepRenderingModel, grid_to_plates, plates_to_grid
from pgm_drm.models.edrm import EvolutionaryDRM
from pgm_drm.models.factor import FactorRenderingModel
from pgm_drm.models.rendering import RenderingModel, default_templates
from pgm_drm.models.validation import check_images, check_prior, check_probability

__all__ = [
    "ConvRenderingModel",
    "DeepRenderingModel",
    "EvolutionaryDRM",
    "FactorRenderingModel",
    "RenderingModel",
    "check_images",
    "check_prior",
    "check_probability",
    "default_templates",
    "grid_to_plates",
    "plates_to_grid",
]
