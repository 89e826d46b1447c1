"""pgm_drm: the Deep Rendering Model as NumPyro models, factor graphs and exact
max-sum / sum-product message passing in JAX (Patel, Nguyen, Baraniuk 2015)."""

from pgm_drm import graph, inference, models
from pgm_drm.graph import compile_model
from pgm_drm.inference import brute_force, enumerate_exact, infer
from pgm_drm.models import RenderingModel

__version__ = "0.1.0"

__all__ = [
    "RenderingModel",
    "__version__",
    "brute_force",
    "compile_model",
    "enumerate_exact",
    "graph",
    "infer",
    "inference",
    "models",
]
