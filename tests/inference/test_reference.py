"""The exact references themselves, against a posterior computed by hand in numpy.

Every other exactness test trusts :func:`brute_force` and :func:`enumerate_exact`;
here both are checked against a joint table written out with numpy (three
latent values of a global site, two plated binary sites: 12 configurations).
Tolerance: the same ~12 float64 log-terms summed in other orders agree to
~1e-13; 1e-9 leaves room for logsumexp's max-shift.
"""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.ops.indexing import Vindex
from scipy.special import logsumexp
from scipy.stats import norm

from pgm_drm.inference import (
    MAX_BRUTE_FORCE_CONFIGS,
    brute_force,
    enumerate_exact,
    latent_layout,
)

ATOL = 1e-9

PRIOR = np.array([0.5, 0.3, 0.2])  # c takes the values 2, 3, 4 (not 0..2)
CPT = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])  # p(z_i | c)
MEANS = np.array([-1.0, 1.5])  # x_i ~ N(MEANS[z_i], 1)
X = np.array([0.3, 1.1])


def model(x=None):
    c = numpyro.sample("c", dist.DiscreteUniform(2, 4))  # log(1/3), reweighted:
    numpyro.factor("prior_c", jnp.log(jnp.asarray(PRIOR))[c - 2])
    with numpyro.plate("pixels", 2):
        z = numpyro.sample("z", dist.Categorical(Vindex(jnp.asarray(CPT))[c - 2]))
        numpyro.sample("x", dist.Normal(jnp.asarray(MEANS)[z], 1.0), obs=x)


def joint_table() -> np.ndarray:
    """``log p(c, z_0, z_1, x)``, shape ``(3, 2, 2)``, written out by hand."""
    lik = norm.logpdf(X[:, None], MEANS[None, :], 1.0)  # (pixel, z)
    t = np.log(PRIOR / 3)[:, None, None]
    t = t + np.log(CPT)[:, :, None] + lik[0][None, :, None]
    return t + np.log(CPT)[:, None, :] + lik[1][None, None, :]


def reduce_t(a: np.ndarray, axis, t: float) -> np.ndarray:
    return np.max(a, axis=axis) if t == 0.0 else t * logsumexp(a / t, axis=axis)


def test_latent_layout_lists_plates_and_support_values():
    layout = latent_layout(model, x=jnp.asarray(X))
    assert list(layout) == ["c", "z"]
    assert layout["c"][0] == () and np.array_equal(layout["c"][1], [2, 3, 4])
    assert layout["z"][0] == (2,) and np.array_equal(layout["z"][1], [0, 1])
    assert layout["c"].batch_shape == () and layout["z"].batch_shape == (2,)


def test_latent_layout_gives_the_batch_shape_of_plates_off_the_rightmost_dims():
    """Plates at dims -1 and -3 (an unused dim between them): the Posterior's
    layout is the plate sizes, the model's values have the batch shape."""

    def gap():
        with numpyro.plate("a", 3, dim=-1):
            numpyro.sample("x", dist.Bernoulli(0.5))
            with numpyro.plate("b", 2, dim=-3):
                numpyro.sample("y", dist.Bernoulli(0.5))

    layout = latent_layout(gap)
    assert (layout["x"].plate_shape, layout["x"].batch_shape) == ((3,), (3,))
    assert (layout["y"].plate_shape, layout["y"].batch_shape) == ((2, 3), (2, 1, 3))


@pytest.mark.parametrize(
    "reference, t",
    [
        (brute_force, 1.0),
        (brute_force, 0.0),
        (brute_force, 0.4),
        (enumerate_exact, 1.0),
        (enumerate_exact, 0.0),
    ],
)
def test_references_equal_the_hand_computed_posterior(reference, t):
    post = reference(model, temperature=t, x=jnp.asarray(X))
    joint = joint_table()
    log_z = reduce_t(joint, (0, 1, 2), t)
    np.testing.assert_allclose(float(post.log_z), log_z, atol=ATOL)
    want = {
        "c": reduce_t(joint, (1, 2), t) - log_z,
        "z": np.stack([reduce_t(joint, (0, 2), t), reduce_t(joint, (0, 1), t)]) - log_z,
    }
    for site, m in want.items():
        np.testing.assert_allclose(np.asarray(post.log_marginals[site]), m, atol=ATOL)
    c, z0, z1 = np.unravel_index(np.argmax(joint), joint.shape)
    assert int(post.map["c"]) == [2, 3, 4][c]  # support values, not indices
    assert np.asarray(post.map["z"]).tolist() == [z0, z1]


def test_references_refuse_zero_probability_evidence():
    """As ``infer`` does: no configuration explains the evidence -> an error,
    not a posterior of NaNs."""

    def model2(a=None, b=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.factor("z_is_a", jnp.where(z == a, 0.0, -jnp.inf))
        numpyro.factor("z_is_b", jnp.where(z == b, 0.0, -jnp.inf))

    one, zero = jnp.array(1), jnp.array(0)
    for reference in (brute_force, enumerate_exact):
        post = reference(model2, semiring="max", a=one, b=one)
        assert int(post.map["z"]) == 1
        np.testing.assert_allclose(float(post.log_z), np.log(0.5), atol=ATOL)
        with pytest.raises(ValueError, match="probability zero"):
            reference(model2, a=one, b=zero)


def test_enumerate_exact_has_only_funsors_two_semirings():
    with pytest.raises(ValueError, match="temperature 0"):
        enumerate_exact(model, temperature=0.5, x=jnp.asarray(X))


def test_brute_force_refuses_more_configurations_than_its_cap():
    n = int(np.log2(MAX_BRUTE_FORCE_CONFIGS)) + 1

    def wide():
        with numpyro.plate("bits", n):
            numpyro.sample("b", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="configurations"):
        brute_force(wide)


# ---- hardening (issue 15): the references refuse and normalise as infer does ----


def test_enumerate_exact_sees_a_changed_global():
    """The compiled reference is cached on what it computes (jaxpr + constants),
    not on the model object: a global the model reads, changed, is seen."""
    import pgm_drm.inference.reference as reference

    state = {"p": 0.1}

    def model():
        z = numpyro.sample("z", dist.Bernoulli(state["p"]))
        numpyro.sample("y", dist.Normal(z, 1.0), obs=jnp.array(1.5))

    def exact(p):  # P(z=1 | y=1.5) by Bayes' rule, N(1.5; z, 1) likelihoods
        on, off = p * np.exp(-0.125), (1 - p) * np.exp(-1.125)
        return on / (on + off)

    for p in (0.1, 0.9, 0.1):
        state["p"] = p
        got = np.exp(np.asarray(enumerate_exact(model).log_marginals["z"]))
        # float64 Bayes' rule against funsor's enumeration: round-off only.
        np.testing.assert_allclose(got[1], exact(p), atol=1e-9)
    assert len(reference._CACHE) <= reference.CACHE_SIZE


@pytest.mark.parametrize("reference", [brute_force, enumerate_exact])
@pytest.mark.parametrize(
    ("value", "match"),
    [
        (jnp.full((2, 3), jnp.nan), "NaN or inf"),
        (jnp.full((2, 3), -jnp.inf), "NaN or inf"),
        (np.ones((2, 3), np.complex64), "complex"),
    ],
)
def test_references_refuse_what_infer_refuses(reference, value, match):
    def model(image=None):
        c = numpyro.sample("c", dist.Categorical(jnp.array([0.3, 0.7])))
        mean = jnp.where(c == 1, 1.0, -1.0) * jnp.ones((2, 3))
        numpyro.sample("image", dist.Normal(mean, 1.0).to_event(2), obs=image)

    with pytest.raises(ValueError, match=f"evidence 'image'.*{match}"):
        reference(model, image=value)


@pytest.mark.parametrize("reference", [brute_force, enumerate_exact])
def test_references_on_a_model_without_latents(reference):
    def model(x=None):
        numpyro.sample("x", dist.Normal(0.0, 1.0), obs=x)

    got = reference(model, x=jnp.array(0.5))
    assert got.log_marginals == {} and got.map == {}
    # float64 log N(0.5; 0, 1) by hand: round-off only.
    np.testing.assert_allclose(got.log_z, -0.125 - 0.5 * np.log(2 * np.pi), atol=1e-12)


@pytest.mark.parametrize("reference", [brute_force, enumerate_exact])
def test_references_take_a_positional_plate_size(reference):
    def model(n, x=None):
        with numpyro.plate("p", n):
            z = numpyro.sample("z", dist.Bernoulli(0.3))
            numpyro.sample("x", dist.Normal(z, 1.0), obs=x)

    got = reference(model, 3, x=jnp.zeros(3))
    # Independent instances: log Z = 3 log(0.7 N(0; 0, 1) + 0.3 N(0; 1, 1)).
    one = np.log(0.7 + 0.3 * np.exp(-0.5)) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(got.log_z, 3 * one, atol=1e-10)
