"""infer: batching without recompiling, semiring arguments, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.graph import compile_model
from pgm_drm.inference import enumerate_exact, infer
from pgm_drm.models import RenderingModel, default_templates


@pytest.fixture(scope="module")
def rm_and_images():
    rm = RenderingModel(default_templates(), sigma=0.6, switch_prior=0.9)
    images, latents = rm.sample(jax.random.PRNGKey(1), 1000)
    return rm, images, latents


def test_batch_of_1000_traces_once_and_matches_single(rm_and_images):
    rm, images, _ = rm_and_images
    fg = compile_model(rm.model, image=images[0])
    before = fg.n_traces
    batch = infer(fg, "sum", image=images)
    assert fg.n_traces == before + 1
    again = infer(fg, "sum", image=images[::-1])
    assert fg.n_traces == before + 1  # same shapes: the jitted kernel is reused
    assert batch.log_z.shape == (1000,)
    assert batch.log_marginals["c"].shape == (1000, 3)
    assert batch.map["g"].shape == (1000,)
    np.testing.assert_allclose(again.log_z[::-1], batch.log_z)
    for i in (0, 17, 999):
        ref = enumerate_exact(rm.model, image=images[i])
        # float64: identical sums in another order; 1e-6 is the bound.
        np.testing.assert_allclose(batch.log_z[i], ref.log_z, atol=1e-6)
        np.testing.assert_allclose(
            batch.log_marginals["c"][i], ref.log_marginals["c"], atol=1e-6
        )


def test_semiring_and_temperature_arguments(rm_and_images):
    rm, images, _ = rm_and_images
    fg = compile_model(rm.model, image=images[0])
    assert infer(fg, "max").temperature == 0.0
    assert infer(fg, "sum").temperature == 1.0
    assert infer(fg, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="semiring"):
        infer(fg, "product")
    with pytest.raises(ValueError, match="temperature"):
        infer(fg, temperature=-1.0)


def test_zero_probability_evidence_is_an_error():
    import numpyro
    import numpyro.distributions as dist

    def model(x=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, 1.0, 0.0)), obs=x)

    fg = compile_model(model, x=jnp.array(1.0))
    assert int(infer(fg, "max").map["z"]) == 1
    with pytest.raises(ValueError, match="probability zero"):
        infer(fg, x=jnp.array(0.5))
