"""The factor-analyser RM (Eq. 34): Woodbury log-density against the dense
covariance, NumPyro's enumeration and the uncollapsed model's own log-joint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpyro.infer.util import log_density
from scipy.stats import multivariate_normal

from pgm_drm.inference.reference import brute_force, enumerate_exact
from pgm_drm.models import FactorRenderingModel
from pgm_drm.models.factor import fa_log_joint, naive_fa_log_joint


def random_frm(seed, c=2, g=2, shape=(2, 3), q=2):
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    return FactorRenderingModel(
        rng.normal(size=(c, g) + shape),
        0.7 * rng.normal(size=(c, g, d, q)),
        rng.uniform(0.05, 0.5, size=(c, g) + shape),
        class_prior=rng.dirichlet(np.ones(c)),
        nuisance_prior=rng.dirichlet(np.ones(g)),
    )


@given(seed=st.integers(0, 10_000), q=st.integers(1, 4), g=st.integers(1, 3))
def test_log_joint_matches_dense_covariance(seed, q, g):
    frm = random_frm(seed, 2, g, (2, 3), q)
    x, _ = frm.sample(jax.random.PRNGKey(seed), 7)
    # float64 Woodbury vs scipy's dense Cholesky: both exact to ~1e-13 on 6x6
    # covariances with eigenvalues >= 0.05; 1e-9 is slack.
    np.testing.assert_allclose(
        frm.log_joint(x), naive_fa_log_joint(frm, x), rtol=0, atol=1e-9
    )
    np.testing.assert_allclose(
        frm.log_likelihood(x),
        jax.nn.logsumexp(naive_fa_log_joint(frm, x).reshape(7, -1), -1),
        atol=1e-9,
    )


@pytest.mark.parametrize("semiring", ["sum", "max"])
def test_class_scores_match_numpyro_enumeration(semiring):
    frm = random_frm(3, c=3, g=2, shape=(2, 2), q=1)
    x, _ = frm.sample(jax.random.PRNGKey(1), 3)
    for img in x:
        # NumPyro/funsor enumerates (c, g) of the collapsed model, no Woodbury.
        ref = enumerate_exact(frm.model, img, collapsed=True, semiring=semiring)
        bf = brute_force(frm.model, img, collapsed=True, semiring=semiring)
        scores = frm.class_log_scores(img, semiring)
        # float64 throughout: differences are rounding (~1e-14); 1e-9 is slack.
        np.testing.assert_allclose(
            scores - ref.log_z, ref.log_marginals["c"], atol=1e-9
        )
        np.testing.assert_allclose(ref.log_z, bf.log_z, atol=1e-9)
        if semiring == "max":
            assert int(frm.classify(img, "max")) == int(ref.map["c"])


@given(seed=st.integers(0, 10_000))
def test_collapsed_density_is_the_uncollapsed_model_with_z_integrated(seed):
    """``log p(c, g, I) = log p(c, g, z, I) - log p(z | c, g, I)`` for every z:
    the NumPyro model with ``z`` sampled against the analytic z-posterior."""
    frm = random_frm(seed, c=2, g=2, shape=(3, 2), q=2)
    rng = np.random.default_rng(seed)
    x, lat = frm.sample(jax.random.PRNGKey(seed), 2)
    table = frm.log_joint(x)
    mean, cov = frm.factor_posterior(x)
    for n in range(2):
        for c in range(2):
            for g in range(2):
                z = rng.normal(size=2)
                joint, _ = log_density(
                    frm.model,
                    (x[n],),
                    {},
                    {"c": jnp.asarray(c), "g": jnp.asarray(g), "z": jnp.asarray(z)},
                )
                post = multivariate_normal(mean[n, c, g], cov[c, g]).logpdf(z)
                # float64 Gaussian identities: agreement to ~1e-13; 1e-9 slack.
                np.testing.assert_allclose(joint - post, table[n, c, g], atol=1e-9)


def test_sample_shapes_and_latent_moments():
    frm = random_frm(0, c=2, g=1, shape=(2, 2), q=2)
    x, lat = frm.sample(jax.random.PRNGKey(0), 4000)
    assert x.shape == (4000, 2, 2) and lat["z"].shape == (4000, 2)
    # Images of class 0 have covariance Lambda Lambda^T + Psi: 4000 draws of a
    # 4x4 covariance with entries O(1): standard error ~0.05; 0.25 is 5 se.
    sel = np.asarray(lat["c"]) == 0
    emp = np.cov(np.asarray(x[sel]).reshape(-1, 4).T)
    lam = np.asarray(frm.loadings[0, 0])
    np.testing.assert_allclose(
        emp, lam @ lam.T + np.diag(np.asarray(frm.noise[0, 0]).ravel()), atol=0.25
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loadings=np.zeros((2, 1, 4, 4))), "1 <= q < 4"),
        (dict(loadings=np.zeros((2, 1, 3, 1))), "loadings must have shape"),
        (dict(noise=np.zeros((2, 1, 2, 2))), "variances > 0"),
        (dict(noise=np.ones((2, 1, 4))), "noise"),
        (dict(templates=np.full((2, 1, 2, 2), np.nan)), "NaN"),
        (dict(class_prior=[0.5, 0.6]), "sum to 1"),
    ],
)
def test_bad_parameters_raise(kwargs, match):
    base = dict(
        templates=np.zeros((2, 1, 2, 2)),
        loadings=np.ones((2, 1, 4, 1)),
        noise=np.ones((2, 1, 2, 2)),
    )
    with pytest.raises(ValueError, match=match):
        FactorRenderingModel(**{**base, **kwargs})


def test_integer_templates_do_not_truncate_the_other_parameters():
    frm = FactorRenderingModel(
        np.zeros((2, 1, 2, 2), dtype=int),
        0.3 * np.ones((2, 1, 4, 1)),
        1.5 * np.ones((2, 1, 2, 2)),
    )
    assert jnp.issubdtype(frm.templates.dtype, jnp.floating)
    np.testing.assert_allclose(frm.loadings, 0.3)
    np.testing.assert_allclose(frm.noise, 1.5)


def test_wrong_image_shape_raises():
    frm = random_frm(0)
    with pytest.raises(ValueError, match="image has shape"):
        frm.log_joint(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="NaN"):
        frm.classify(np.full((2, 3), np.inf))
    with pytest.raises(ValueError, match="one image of shape"):
        frm.model(np.zeros((4, 2, 3)))


def test_model_is_a_pytree_of_its_parameters(key):
    a, b = random_frm(0), random_frm(1)
    x, _ = a.sample(key, 3)
    flat = x.reshape(3, -1)
    assert len(jax.tree.leaves(a)) == 5  # mu, Lambda, Psi, pi_c, pi_g

    traces = []

    @jax.jit
    def log_joint(m):  # the model is a traced argument
        traces.append(1)  # runs once per trace, not per call
        mu, psi = m.flat_parameters()
        return fa_log_joint(flat, mu, m.loadings, psi, m.class_prior, m.nuisance_prior)

    for m in (a, b):
        # The same float64 operations jitted and not: ~1e-15; 1e-12 is slack.
        np.testing.assert_allclose(log_joint(m), m.log_joint(x), rtol=0, atol=1e-12)
    # New parameter values: no new trace. (Counted by a Python side effect: jit's
    # C++ cache size read 0 in some full-suite runs, cause not found, so it was a
    # flaky proxy.)
    assert len(traces) == 1
