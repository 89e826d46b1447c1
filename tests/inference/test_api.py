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


def test_zero_probability_names_the_batch_index():
    import numpyro
    import numpyro.distributions as dist

    def model(x=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, 1.0, 0.0)), obs=x)

    fg = compile_model(model, x=jnp.array(1.0))
    with pytest.raises(ValueError, match=r"probability zero.*batch index \(2,\)"):
        infer(fg, x=jnp.array([1.0, 1.0, 0.5, 1.0]))


# Not 1e4: there |log p| ~ 1e12 and float32 cannot tell the classes apart in the
# table entries themselves (their spacing is ~1e5), whatever the kernel does.
@pytest.mark.parametrize("fill", [10.0, 100.0])
def test_float32_marginals_stay_normalised_at_huge_log_joints(fill):
    """Issue 15: a 64x64 image filled with 100 (|log p| ~ 1e6) gave float32
    marginals [0, 1, 1] on the junction-tree schedule, and brute force agreed. No
    belief may hold the absolute log joint: in float32 the marginals sum to one
    and equal a float64 brute-force reference."""
    from pgm_drm.inference import brute_force

    rng = np.random.default_rng(3)
    tpl = rng.normal(size=(3, 2, 64, 64))
    tpl[2] = tpl[1]  # two tied classes
    ref = brute_force(
        RenderingModel(tpl, sigma=0.5).model, image=jnp.full((64, 64), fill)
    )
    with jax.enable_x64(False):
        rm = RenderingModel(tpl.astype(np.float32), sigma=0.5)
        image = jnp.full((64, 64), fill, jnp.float32)
        fg = compile_model(rm.model, image=image)
        runs = [infer(fg, "sum", schedule=s) for s in ("tree", "exact")]
        runs.append(brute_force(rm.model, image=image))
    for got in runs:
        for site in ("c", "g"):
            p = np.exp(np.asarray(got.log_marginals[site], np.float64))
            want = np.exp(np.asarray(ref.log_marginals[site]))
            # float32 rounding of O(1) normalised log-beliefs: the 1e-4.
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-4)
            np.testing.assert_allclose(p, want, atol=1e-4)
