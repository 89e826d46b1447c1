"""numpy generators seeded from JAX keys (for draws jax would compile slowly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pgm_drm._typing import PRNGKey

__all__ = ["key_data", "np_rng"]


def key_data(key: PRNGKey | None) -> np.ndarray:
    """Raw ``uint32`` words of a JAX key (raw or typed; ``None``: ``PRNGKey(0)``)."""
    k = jax.random.PRNGKey(0) if key is None else key
    if jnp.issubdtype(jnp.asarray(k).dtype, jax.dtypes.prng_key):
        k = jax.random.key_data(k)
    return np.asarray(k)


def np_rng(key: PRNGKey) -> np.random.Generator:
    """A numpy generator seeded from a JAX key (raw ``uint32[2]`` or typed)."""
    return np.random.default_rng(key_data(key).astype(np.uint32).ravel().tolist())
