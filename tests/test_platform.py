"""The installed JAX compiles what we rely on correctly.

jax/jaxlib 0.10.2 miscompiles some dot + reduction fusions on the CPU
(https://github.com/jax-ml/jax/issues/39103): the jitted function silently
returns numbers far from the eager ones. We found it while scoring Gaussian
templates (``<x, 1> + sum(mu)`` under ``jit`` came back as ~1e20). The
project excludes that release in ``pyproject.toml``; this test fails loudly if
an environment still carries a bad build.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import pgm_drm


def _squared_distances(mu, x):
    """``||x_n - mu_cg||^2`` written as the einsum the E-step uses."""
    ones = jnp.ones_like(mu)
    return (
        jnp.einsum("nd,cgd->ncg", x**2, ones)
        - 2 * jnp.einsum("nd,cgd->ncg", x, mu)
        + jnp.sum(mu**2, -1)[None]
    )


def test_jit_equals_eager_on_template_distances():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((450, 64), dtype=np.float32))
    mu = jnp.asarray(rng.random((10, 10, 64), dtype=np.float32))
    eager = np.asarray(_squared_distances(mu, x))
    jitted = np.asarray(jax.jit(_squared_distances)(mu, x))
    brute = ((np.asarray(x)[:, None, None] - np.asarray(mu)[None]) ** 2).sum(-1)
    # float32 sums of 64 terms of size <= 1: rounding stays below 1e-4.
    np.testing.assert_allclose(eager, brute, atol=1e-4)
    np.testing.assert_allclose(jitted, brute, atol=1e-4)


def test_known_bad_jax_is_not_installed():
    assert jax.__version__ not in pgm_drm.BAD_JAX_VERSIONS, (
        f"jax {jax.__version__} is known to miscompile on the CPU: "
        f"{pgm_drm.BAD_JAX_VERSIONS[jax.__version__]}"
    )
