"""The RM log-joint table and responsibilities against NumPyro's own model."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro import handlers

from pgm_drm.inference import brute_force, enumerate_exact
from pgm_drm.learning import (
    log_joint_table,
    log_likelihood,
    naive_log_joint_table,
    responsibilities,
)
from pgm_drm.testing import examples, log_joint, random_rendering_model

# Float64 throughout: entries are sums of ~16 terms of size <= ~50, so rounding
# is ~1e-13; 1e-9 leaves room for funsor's different summation order.
ATOL = 1e-9


def _images(rm, seed, n=3):
    """Images near random templates (numpy: no per-model sampler to compile)."""
    rng = np.random.default_rng(seed)
    mu = np.asarray(rm.templates).reshape(-1, *rm.image_shape)
    pick = mu[rng.integers(0, len(mu), size=n)]
    return jnp.asarray(pick + rm.sigma * rng.normal(size=pick.shape))


@given(seed=st.integers(0, 10_000), switch=st.booleans())
def test_table_matches_naive_twin(seed, switch):
    rm, _ = random_rendering_model(seed, 2, 3, (3, 3), switch=switch)
    x = _images(rm, seed, 4)
    fast = log_joint_table(rm, x)
    assert fast.shape == (4, 2, 3) + ((2,) if switch else ())
    np.testing.assert_allclose(fast, naive_log_joint_table(rm, x), atol=ATOL)


@pytest.mark.parametrize("switch", [False, True])
def test_table_entries_are_numpyro_log_joints(switch):
    rm, kw = random_rendering_model(5, 2, 2, (3, 3), switch=switch)
    table = np.asarray(log_joint_table(rm, kw["image"]))[0]
    for idx in itertools.product(*(range(k) for k in table.shape)):
        assignment = dict(zip(["c", "g", "a"], idx, strict=False))
        expected = log_joint(rm.model, assignment, image=kw["image"])
        np.testing.assert_allclose(table[idx], expected, atol=ATOL)


@settings(max_examples=examples(2))  # funsor enumeration costs ~1 s per image
@given(seed=st.integers(0, 10_000), switch=st.booleans())
def test_soft_responsibilities_match_enumeration(seed, switch):
    rm, _ = random_rendering_model(seed, 2, 3, (3, 3), switch=switch)
    x = _images(rm, seed + 1, 1)
    resp = np.asarray(responsibilities(rm, x, "sum"))
    ll = np.asarray(log_likelihood(rm, x))
    for n in range(1):
        post = enumerate_exact(rm.model, image=x[n])
        np.testing.assert_allclose(ll[n], float(post.log_z), atol=ATOL)
        # Marginals of the joint responsibilities (Eq. 14) = funsor's marginals.
        axes = {"c": (1, 2), "g": (0, 2), "a": (0, 1)}
        r = resp[n] if switch else resp[n][..., None]
        for site, lm in post.log_marginals.items():
            np.testing.assert_allclose(
                r.sum(axes[site]), np.exp(lm), atol=ATOL, err_msg=site
            )


@settings(max_examples=examples(2))  # brute force compiles one log-density per model
@given(seed=st.integers(0, 10_000), switch=st.booleans())
def test_hard_responsibilities_are_the_joint_map(seed, switch):
    rm, _ = random_rendering_model(seed, 2, 3, (3, 3), switch=switch)
    x = _images(rm, seed + 2, 2)
    resp = np.asarray(responsibilities(rm, x, "max"))
    assert np.all(resp.reshape(2, -1).sum(-1) == 1.0)
    for n in range(2):
        ref = brute_force(rm.model, semiring="max", image=x[n])
        idx = np.unravel_index(np.argmax(resp[n]), resp[n].shape)
        ours = dict(zip(["c", "g", "a"], (int(i) for i in idx), strict=False))
        # Same MAP up to ties: compare the model's own log-joint at both.
        np.testing.assert_allclose(
            log_joint(rm.model, ours, image=x[n]),
            log_joint(rm.model, ref.map, image=x[n]),
            atol=ATOL,
        )


@pytest.mark.parametrize("switch", [False, True])
def test_labels_clamp_c(switch):
    rm, _ = random_rendering_model(11, 3, 2, (3, 3), switch=switch)
    x = _images(rm, 3, 2)
    labels = jnp.array([2, -1])
    resp = np.asarray(responsibilities(rm, x, "sum", labels=labels))
    free = np.asarray(responsibilities(rm, x, "sum"))
    np.testing.assert_allclose(resp[1], free[1], atol=ATOL)  # -1: untouched
    assert np.all(resp[0][:2] == 0.0)
    post = enumerate_exact(handlers.condition(rm.model, {"c": 2}), image=x[0])
    r = resp[0][2] if switch else resp[0][2][..., None]
    np.testing.assert_allclose(r.sum(1), np.exp(post.log_marginals["g"]), atol=ATOL)
