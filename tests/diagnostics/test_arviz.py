"""ArviZ export of discrete posteriors: exact marginals, draws, dims, SVI, plot."""

import warnings

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from pgm_drm.diagnostics.arviz import (
    discrete_posterior_draws,
    draws_to_inference_data,
    from_rendering_model,
    plot_posterior_comparison_az,
    posterior_to_inference_data,
    site_layouts,
    to_inference_data,
)
from pgm_drm.graph import compile_model
from pgm_drm.inference import brute_force, enumerate_exact, infer
from pgm_drm.learning import fit_svi
from pgm_drm.learning.loop import LoopOptions
from pgm_drm.models import RenderingModel, default_templates

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # arviz's refactor notice
    import arviz as az

X = jnp.array([1.2, 0.6, 1.0])  # ambiguous pixels: z leans on c
N_DRAWS = 4000


def plate_model(x=None):
    """``c`` couples the plate of ``z``: exact joint draws must keep that."""
    c = numpyro.sample("c", dist.Categorical(jnp.array([0.3, 0.7])))
    with numpyro.plate("pixels", 3):
        z = numpyro.sample("z", dist.Bernoulli(0.1 + 0.8 * c))
        numpyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)


def binomial_tol(p, n):
    """5 binomial standard deviations of a frequency of ``n`` iid draws, plus
    1e-12 for p in {0, 1}. For one comparison a 5-sigma miss has probability
    ~6e-7 (normal approximation; n p (1-p) >= 100 here), and the keys are fixed,
    so the tests are deterministic and not flaky."""
    p = np.asarray(p)
    return 5.0 * np.sqrt(p * (1 - p) / n) + 1e-12


@pytest.fixture(scope="module")
def fg():
    return compile_model(plate_model, x=X)


@pytest.fixture(scope="module")
def joint(fg):
    """A sum-product posterior and its export with exact joint draws."""
    post = infer(fg, "sum")
    idata = posterior_to_inference_data(
        post, fg, key=jax.random.PRNGKey(1), n_draws=N_DRAWS, n_chains=2
    )
    return post, idata


def test_site_layouts_from_graph_and_model(fg):
    a, b = site_layouts(fg), site_layouts(plate_model, x=X)
    assert sorted(a) == sorted(b) == ["c", "z"]
    for s in a:
        assert a[s].plates == b[s].plates
        assert a[s].plate_shape == b[s].plate_shape
        assert np.array_equal(a[s].support, b[s].support)
    assert a["z"].plates == ("pixels",) and a["c"].plates == ()


def test_marginals_are_the_posteriors_exactly(joint):
    post, idata = joint
    for s in ("c", "z"):
        # exact equality: the group stores exp(log_marginals), nothing else
        want = np.exp(np.asarray(post.log_marginals[s]))
        assert np.array_equal(idata.marginals[s].values, want)
        assert np.array_equal(idata.map_estimate[s].values, np.asarray(post.map[s]))
    assert float(idata.marginals["log_z"]) == float(post.log_z)
    assert idata.marginals["z"].dims == ("pixels", "z_state")
    assert idata.marginals["z"]["z_state"].values.tolist() == [0, 1]
    assert idata.posterior["z"].dims == ("chain", "draw", "pixels")
    assert idata.posterior["c"].dims == ("chain", "draw")
    assert idata.marginals.attrs["schedule"] == post.schedule
    assert idata.marginals.attrs["draws"] == "joint"


def test_joint_draws_match_marginals_and_keep_correlations(joint):
    post, idata = joint
    assert dict(idata.posterior.sizes) == {
        "chain": 2,
        "draw": N_DRAWS // 2,
        "pixels": 3,
    }
    for s in ("c", "z"):
        d = idata.posterior[s].values.reshape((N_DRAWS, -1))
        p1 = np.exp(np.asarray(post.log_marginals[s]))[..., 1].reshape(-1)
        assert np.all(np.abs(d.mean(0) - p1) <= binomial_tol(p1, N_DRAWS))
    # joint: P(c=1, z_0=1) = P(c=1) P(z_0=1 | c=1), the latter from the clamped model
    clamped = infer(compile_model(handlers.condition(plate_model, {"c": 1}), x=X))
    p_joint = float(post.marginals["c"][1] * clamped.marginals["z"][0, 1])
    c = idata.posterior["c"].values.reshape(-1)
    z0 = idata.posterior["z"].values[..., 0].reshape(-1)
    freq = np.mean((c == 1) & (z0 == 1))
    assert abs(freq - p_joint) <= binomial_tol(p_joint, N_DRAWS)
    # ...and the check has teeth: the product of marginals is far from it
    product = float(post.marginals["c"][1] * post.marginals["z"][0, 1])
    assert abs(product - p_joint) > 3 * binomial_tol(p_joint, N_DRAWS)


def test_marginal_draws_without_a_model(fg):
    post = infer(fg, "sum")
    idata = to_inference_data(post, key=jax.random.PRNGKey(2), n_draws=N_DRAWS)
    assert idata.posterior.attrs["draws"] == "marginal"
    assert idata.posterior["z"].dims == ("chain", "draw", "z_dim_0")
    assert idata.marginals["c"].dims == ("c_state",)
    d = idata.posterior["z"].values.reshape(N_DRAWS, 3)
    p1 = np.asarray(post.marginals["z"][:, 1])
    assert np.all(np.abs(d.mean(0) - p1) <= binomial_tol(p1, N_DRAWS))


def test_batched_posterior_gets_an_image_dim(fg):
    xs = jnp.stack([X, -X])
    post = infer(fg, "sum", x=xs)
    idata = posterior_to_inference_data(
        post, fg, evidence={"x": xs}, key=jax.random.PRNGKey(3), n_draws=N_DRAWS
    )
    assert idata.marginals["z"].dims == ("image", "pixels", "z_state")
    assert idata.marginals["log_z"].dims == ("image",)
    assert idata.posterior["z"].dims == ("chain", "draw", "image", "pixels")
    assert idata.map_estimate["z"].dims == ("image", "pixels")
    assert np.array_equal(
        idata.marginals["z"].values, np.exp(np.asarray(post.log_marginals["z"]))
    )
    d = idata.posterior["z"].values.reshape(N_DRAWS, 2, 3)
    p1 = np.asarray(post.marginals["z"][..., 1])
    assert np.all(np.abs(d.mean(0) - p1) <= binomial_tol(p1, N_DRAWS))
    with pytest.raises(ValueError, match="batched evidence"):
        posterior_to_inference_data(post, fg, n_draws=10)


@pytest.mark.parametrize("reference", [enumerate_exact, brute_force])
def test_reference_posteriors(reference):
    post = reference(plate_model, x=X)
    idata = posterior_to_inference_data(
        post, plate_model, model_kwargs={"x": X}, n_draws=20
    )
    assert idata.marginals.attrs["schedule"] == post.schedule
    assert np.array_equal(
        idata.marginals["z"].values, np.exp(np.asarray(post.log_marginals["z"]))
    )
    assert idata.posterior["z"].dims == ("chain", "draw", "pixels")


def test_max_sum_posterior_has_no_draws(fg):
    post = infer(fg, "max")
    idata = posterior_to_inference_data(post, fg)
    assert "posterior" not in idata.groups()
    # max-marginals: exp(max log p - max) peaks at exactly 1 per variable
    assert np.allclose(idata.marginals["z"].values.max(-1), 1.0, atol=0, rtol=0)
    with pytest.raises(ValueError, match="temperature 1"):
        posterior_to_inference_data(post, fg, n_draws=5)


def test_draws_to_inference_data_frequencies_and_plate_checks(fg):
    d = {"c": np.array([0, 1, 1, 1]), "z": np.zeros((4, 3), int)}
    idata = draws_to_inference_data(d, fg, n_chains=2)
    assert idata.marginals["c"].values.tolist() == [0.25, 0.75]
    assert idata.marginals["z"].values[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert dict(idata.posterior.sizes) == {"chain": 2, "draw": 2, "pixels": 3}
    with pytest.raises(ValueError, match="expected"):
        draws_to_inference_data({"z": np.zeros((4, 2), int)}, fg)
    with pytest.raises(ValueError, match="chains"):
        draws_to_inference_data(d, fg, n_chains=3)


def test_from_numpyro_fails_on_enumerated_sites_and_infer_discrete_works():
    """Reproduce arviz's failure, then draw the discrete site ourselves."""
    from numpyro.contrib.funsor import config_enumerate
    from numpyro.infer import MCMC, NUTS

    @config_enumerate
    def mix(x=None):
        loc = numpyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Categorical(jnp.ones(2) / 2))
            numpyro.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    x = jnp.array([-2.0, -1.5, 2.0, 2.5])
    mcmc = MCMC(NUTS(mix), num_warmup=5, num_samples=6, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), x=x)
    assert "z" not in mcmc.get_samples()  # enumerated out
    # az.from_numpyro's log_likelihood group re-runs the model, which samples
    # the enumerated `z` without a PRNG key (assert is_prng_key(key))
    with pytest.raises(AssertionError):
        az.from_numpyro(mcmc)
    draws = discrete_posterior_draws(
        mix, key=jax.random.PRNGKey(1), posterior_samples=mcmc.get_samples(), x=x
    )
    assert draws["z"].shape == (6, 4) and set(np.unique(draws["z"])) <= {0, 1}
    idata = draws_to_inference_data(draws, mix, model_kwargs={"x": x})
    assert idata.posterior["z"].dims == ("chain", "draw", "data")


def test_svi_rm_draws_match_enumeration():
    truth = RenderingModel(default_templates(4)[:2, :2], sigma=0.6)
    images, _ = truth.sample(jax.random.PRNGKey(0), 30)
    rm = fit_svi(images, 2, 2, n_steps=10, loop=LoopOptions(progress=False)).model
    idata = from_rendering_model(
        rm, images[:2], key=jax.random.PRNGKey(4), n_draws=N_DRAWS
    )
    assert idata.posterior["c"].dims == ("chain", "draw", "image")
    assert idata.marginals["g"].dims == ("image", "g_state")
    assert idata.marginals.attrs["marginals"] == "empirical"
    for b in range(2):
        exact = enumerate_exact(rm.model, image=images[b])
        for s in ("c", "g"):
            p = np.exp(np.asarray(exact.log_marginals[s]))
            got = idata.marginals[s].values[b]
            assert np.all(np.abs(got - p) <= binomial_tol(p, N_DRAWS))


def test_plot_compares_sources(fg, joint):
    post, _ = joint
    sources = {
        "message passing": posterior_to_inference_data(post, fg, n_draws=0),
        "enumeration": to_inference_data(
            enumerate_exact(plate_model, x=X), plate_model, model_kwargs={"x": X}
        ),
        "draws": draws_to_inference_data(
            {
                s: v.values.reshape((N_DRAWS,) + v.shape[2:])
                for s, v in joint[1].posterior.items()
            },
            fg,
        ),
    }
    fig = plot_posterior_comparison_az(sources, "z", sel={"pixels": 0})
    assert isinstance(fig, plt.Figure)
    assert len(fig.axes[0].patches) == 3 * 2  # three sources x two states
    with pytest.raises(ValueError, match="sel="):
        plot_posterior_comparison_az(sources, "z")
    plt.close("all")
