"""Natural-form log-prob tables (Eq. 8) equal the site's own ``log_prob``."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph.natural import natural_log_prob

# float64 (tests/conftest.py): each entry is a sum of at most a few hundred terms of
# size <= ~1e3 (e.g. ln(tiny) = -708 for a clamped Bernoulli probability of 0),
# whose rounding is ~1e3 * 300 * 2.2e-16 ~ 1e-10 at the very worst; typical
# differences are ~1e-13.
ATOL = 1e-10

FAMILIES = [
    "normal",
    "normal_scale_per_state",
    "bernoulli_probs",
    "bernoulli_logits",
    "categorical_probs",
    "categorical_logits",
    "poisson",
]
N_CATEGORIES = 3

# Enumeration puts latent states on leading dims, with size-1 gaps for the dims
# of other latent sites: 1-3 dims of sizes 1-4.
latent_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)
event_shapes = st.lists(st.integers(1, 4), min_size=0, max_size=2).map(tuple)
wrappings = st.sampled_from(["to_event", "nested", "expand_inner", "expand_outer"])


def _with_ones(rng, shape):
    """``shape`` with some dims set to 1 (parameters that broadcast over them)."""
    return tuple(1 if rng.random() < 0.3 else s for s in shape)


def _leaf(family, rng, shape):
    """A random distribution of ``family`` with batch shape ``shape``, with the
    support's edges: probabilities 0 and 1, rates 0, large logits."""
    if family.startswith("normal"):
        loc = 2.0 * rng.normal(size=shape)
        per_state = family == "normal_scale_per_state"
        scale_shape = shape if per_state else _with_ones(rng, (1,) * len(shape))
        return dist.Normal(loc, rng.uniform(0.2, 3.0, size=scale_shape))
    if family == "bernoulli_probs":
        probs = rng.choice([0.0, 1.0, 0.3, 0.9], size=shape)
        probs = np.where(rng.random(shape) < 0.5, rng.random(shape), probs)
        return dist.Bernoulli(probs=probs)
    if family == "bernoulli_logits":
        logits = 5.0 * rng.normal(size=shape)
        return dist.Bernoulli(logits=np.where(rng.random(shape) < 0.2, 40.0, logits))
    if family == "categorical_probs":
        probs = rng.dirichlet(np.ones(N_CATEGORIES), size=shape)
        probs[..., 0] *= rng.random(shape) < 0.7  # hard zeros
        return dist.Categorical(probs=probs / probs.sum(-1, keepdims=True))
    if family == "categorical_logits":
        logits = 3.0 * rng.normal(size=shape + (N_CATEGORIES,))
        # numpyro rejects -inf logits (hard zeros are tested through probs).
        logits[..., 1] = np.where(rng.random(shape) < 0.3, -50.0, logits[..., 1])
        return dist.Categorical(logits=logits)
    assert family == "poisson"
    rate = rng.gamma(2.0, size=shape) * (rng.random(shape) < 0.8)  # some rates 0
    return dist.Poisson(rate)


def _values(family, rng, shape):
    if family.startswith("normal"):
        return 3.0 * rng.normal(size=shape)
    if family.startswith("bernoulli"):
        return rng.integers(0, 2, size=shape).astype(float)
    if family.startswith("categorical"):
        return rng.integers(0, N_CATEGORIES, size=shape)
    return rng.integers(0, 4, size=shape)  # poisson: 0 is the edge


def _site(family, rng, latent, event, wrap):
    """An observed site's distribution as enumeration and plates build it.

    Parameters broadcast over event dims only through ``expand`` (otherwise
    numpyro's ``event_shape`` would shrink); the Normal's scale always may.
    """
    n = len(event)
    if wrap == "expand_inner":  # Normal(...).expand(batch + event).to_event(n)
        leaf = _leaf(family, rng, _with_ones(rng, latent + event))
        return leaf.expand(latent + event).to_event(n)
    leaf = _leaf(family, rng, latent + event)
    if wrap == "nested" and n == 2:
        return leaf.to_event(1).to_event(1)
    fn = leaf.to_event(n)
    if wrap == "expand_outer":  # a plate around an Independent site
        return fn.expand((2,) + latent)
    return fn


def _value_batch(rng, batch_shape):
    """A value batch shape that broadcasts against ``batch_shape`` (data in a plate:
    the value may be larger where the parameters have a size-1 dim)."""
    if rng.random() < 0.5:
        return ()
    tail = batch_shape[len(batch_shape) - rng.integers(1, len(batch_shape) + 1) :]
    return tuple(int(rng.integers(2, 4)) if s == 1 else s for s in tail)


@pytest.mark.parametrize("family", FAMILIES)
@given(
    latent=latent_shapes,
    event=event_shapes,
    wrap=wrappings,
    seed=st.integers(0, 10_000),
)
def test_equals_log_prob(family, latent, event, wrap, seed):
    rng = np.random.default_rng(seed)
    fn = _site(family, rng, latent, event, wrap)
    value = _values(family, rng, _value_batch(rng, fn.batch_shape) + event)
    # One compile per example (eager dispatch would compile every op): fn closed
    # over keeps its parameters concrete (the -inf mask is skipped where it can
    # be), fn as an argument traces them (the mask is always built).
    concrete, traced, expected = jax.jit(
        lambda f, v: (natural_log_prob(fn, v), natural_log_prob(f, v), f.log_prob(v))
    )(fn, value)
    assert concrete.shape == traced.shape == expected.shape
    np.testing.assert_allclose(concrete, expected, rtol=0, atol=ATOL)
    np.testing.assert_allclose(traced, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("fn", "value", "expected_inf"),
    [
        # Rate 0: ln p(0) = 0 and ln p(x > 0) = -inf (xlogy), through the matmul.
        (dist.Poisson(np.array([[0.0, 1.0], [0.0, 0.0]])).to_event(1), [0, 2], [0, 1]),
        (dist.Poisson(np.array([[0.0, 1.0], [0.0, 0.0]])).to_event(1), [0, 0], [0, 0]),
        # A zero probability hit gives -inf, a miss leaves a finite sum.
        (
            dist.Categorical(probs=np.array([[[0.0, 1.0], [0.5, 0.5]]])).to_event(1),
            [[0, 1], [1, 1]],
            [1, 0],
        ),
        # numpyro clamps probs 0 and 1 to [tiny, 1 - eps]: finite (ln tiny = -708).
        (
            dist.Bernoulli(probs=np.array([[0.0, 1.0], [1.0, 0.0]])).to_event(1),
            [1.0, 0.0],
            [0, 0],
        ),
    ],
    ids=["poisson_hit", "poisson_miss", "categorical", "bernoulli"],
)
def test_support_edges(fn, value, expected_inf):
    value = np.asarray(value)
    got = jax.jit(lambda v: natural_log_prob(fn, v))(value)
    np.testing.assert_array_equal(np.isneginf(got), np.asarray(expected_inf, bool))
    np.testing.assert_allclose(got, fn.log_prob(value), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family", FAMILIES)
@given(
    batch=st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple),
    event=st.lists(st.integers(1, 3), min_size=0, max_size=1).map(tuple),
    data=st.data(),
)
def test_sum_dims_equal_log_prob_summed_over_plates(family, batch, event, data):
    # Data plates (SiteInfo.summed) joined to the contraction, at any position
    # among the batch dims (the DRM's pixel plate is the leftmost): the result is
    # fn.log_prob summed over them, kept as size-1 dims. Same tolerance as above.
    dims = data.draw(
        st.lists(st.integers(-len(batch), -1), min_size=1, unique=True), label="dims"
    )
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000), label="seed"))
    fn = _leaf(family, rng, _with_ones(rng, batch + event))
    fn = fn.expand(batch + event).to_event(len(event))
    value = jnp.asarray(_values(family, rng, batch + event))
    got, expected = jax.jit(
        lambda v: (
            natural_log_prob(fn, v, tuple(dims)),
            jnp.sum(fn.log_prob(v), axis=tuple(dims), keepdims=True),
        )
    )(value)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def _equations(jaxpr):
    """Every equation of ``jaxpr``, nested jaxprs (jit, custom_jvp) included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.parametrize("family", FAMILIES)
def test_vmap_is_one_matmul(family):
    # Sizes chosen so that no legitimate intermediate reaches B * K * P: the data
    # (B * P * 3 categories), the natural parameters (2 * K * P * 3 with the -inf
    # mask) and the table (B * K) are all smaller than 8 * 6 * 12 = 576.
    rng = np.random.default_rng(1)
    latent, event, n_images = (2, 3, 1), (3, 4), 8
    fn = _leaf(family, rng, latent + event).to_event(2)
    values = jnp.asarray(_values(family, rng, (n_images,) + event))

    def table(x):
        return natural_log_prob(fn, x)

    got, expected = jax.jit(lambda v: (jax.vmap(table)(v), jax.vmap(fn.log_prob)(v)))(
        values
    )
    assert got.shape == expected.shape == (n_images,) + latent
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)

    eqns = list(_equations(jax.make_jaxpr(jax.vmap(table))(values).jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots, "the event contraction is not a dot_general"
    # The GEMM (B, P) x (P, K): its output holds the images and the states.
    assert any(math.prod(e.outvars[0].aval.shape) >= n_images * 6 for e in dots)
    # No elementwise (images x states x pixels) table anywhere, and nothing that
    # depends only on the parameters got batched over the images.
    too_big = n_images * math.prod(latent) * math.prod(event)
    for e in eqns:
        for v in e.outvars:
            assert math.prod(v.aval.shape) < too_big, e


@pytest.mark.parametrize(
    "fn",
    [
        dist.Gamma(2.0, np.ones(3)),
        dist.LogNormal(np.zeros(3), 1.0),
        dist.MixtureSameFamily(
            dist.Categorical(probs=np.ones(2) / 2), dist.Normal(np.zeros(2), 1.0)
        ),
        dist.Normal(np.zeros((2, 3)), 1.0).mask(np.array([True, False, True])),
        dist.Normal(np.zeros((2, 3)), 1.0).mask(False).to_event(1),
        dist.Bernoulli(probs=0.5 * np.ones(3)).mask(np.ones(3, bool)).expand((2, 3)),
    ],
    ids=["gamma", "lognormal", "mixture", "masked", "masked_to_event", "masked_plate"],
)
def test_unsupported_families_give_none(fn):
    value = np.ones(fn.batch_shape + fn.event_shape)
    assert natural_log_prob(fn, value) is None
