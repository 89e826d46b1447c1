"""numpy generators seeded from JAX keys (for draws jax would compile slowly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import PRNGKey

__all__ = ["np_rng"]


def np_rng(key: PRNGKey) -> np.random.Generator:
    """A numpy generator seeded from a JAX key (raw ``uint32[2]`` or typed)."""
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.random.default_rng(np.asarray(key, dtype=np.uint32).ravel().tolist())
