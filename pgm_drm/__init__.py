"""pgm_drm: the Deep Rendering Model as NumPyro models, factor graphs and exact
max-sum / sum-product message passing in JAX (Patel, Nguyen, Baraniuk 2015)."""

import warnings as _warnings

import jax as _jax

#: jax/jaxlib releases known to return wrong numbers from jitted code on the CPU.
BAD_JAX_VERSIONS = {"0.10.2": "https://github.com/jax-ml/jax/issues/39103"}

if _jax.__version__ in BAD_JAX_VERSIONS:  # pragma: no cover - depends on the install
    _warnings.warn(
        f"jax {_jax.__version__} miscompiles some jitted CPU code and silently "
        f"returns wrong numbers ({BAD_JAX_VERSIONS[_jax.__version__]}); "
        "pgm_drm's results cannot be trusted with it. Install another version, "
        "e.g. pip install 'jax!=0.10.2' 'jaxlib!=0.10.2'.",
        RuntimeWarning,
        stacklevel=2,
    )

from pgm_drm import graph, inference, models  # noqa: E402
from pgm_drm.graph import compile_model  # noqa: E402
from pgm_drm.inference import brute_force, enumerate_exact, infer  # noqa: E402
from pgm_drm.models import RenderingModel  # noqa: E402

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
