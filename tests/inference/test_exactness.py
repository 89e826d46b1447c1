"""Exact schedules agree with brute force and with NumPyro's own enumeration.

Tolerance: 1e-6 on log Z and log-marginals in float64 (the issue's bound). The
three computations sum the same ~10-40 float64 log-terms in different orders, so
they agree to ~1e-12; 1e-6 leaves room for logsumexp's internal rescaling.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.inference import brute_force, enumerate_exact, infer
from pgm_drm.testing import (
    assert_posteriors_close,
    random_factor_model,
    random_plate_model,
    random_rendering_model,
)

ATOL = 1e-6


def _check(model, kwargs, semiring, schedule, references=("brute", "numpyro")):
    fg = compile_model(model, **kwargs)
    post = infer(fg, semiring, schedule=schedule)
    if "brute" in references:
        ref = brute_force(model, semiring=semiring, **kwargs)
        assert_posteriors_close(post, ref, ATOL, model, kwargs)
    if "numpyro" in references:
        ref = enumerate_exact(model, semiring=semiring, **kwargs)
        assert_posteriors_close(post, ref, ATOL, model, kwargs)
    return fg, post


@given(
    seed=st.integers(0, 100_000),
    kind=st.sampled_from(["chain", "tree"]),
    semiring=st.sampled_from(["sum", "max"]),
    hard=st.booleans(),
)
def test_tree_schedule_is_exact(seed, kind, semiring, hard):
    model, kwargs = random_factor_model(seed, n_vars=5, kind=kind, hard_zeros=hard)
    _check(model, kwargs, semiring, "tree")


@given(
    seed=st.integers(0, 100_000),
    semiring=st.sampled_from(["sum", "max"]),
    hard=st.booleans(),
)
def test_junction_tree_is_exact_on_loopy_graphs(seed, semiring, hard):
    model, kwargs = random_factor_model(seed, n_vars=5, kind="loopy", hard_zeros=hard)
    _check(model, kwargs, semiring, "exact")


@given(seed=st.integers(0, 100_000), semiring=st.sampled_from(["sum", "max"]))
def test_plate_models_are_exact(seed, semiring):
    model, kwargs = random_plate_model(seed, outer=2, inner=2)
    _check(model, kwargs, semiring, "auto")


@given(
    seed=st.integers(0, 100_000),
    semiring=st.sampled_from(["sum", "max"]),
    switch=st.booleans(),
)
def test_rendering_model_is_exact(seed, semiring, switch):
    rm, kwargs = random_rendering_model(seed, switch=switch)
    _check(rm.model, kwargs, semiring, "auto")


def test_map_is_joint_not_per_site_argmax():
    # x0, x1 in {0,1}: p(0,0)=.3, p(1,1)=.3, p(0,1)=.4*... constructed so that the
    # per-site max-marginal argmaxes disagree with the joint MAP under sum-product.
    import numpyro
    import numpyro.distributions as dist
    from numpyro.ops.indexing import Vindex

    joint = jnp.array([[0.0, 0.35], [0.33, 0.32]])  # p(x0, x1)
    p0 = joint.sum(1)
    cpt = joint / p0[:, None]

    def model():
        x0 = numpyro.sample("x0", dist.Categorical(p0))
        numpyro.sample("x1", dist.Categorical(Vindex(cpt)[x0]))

    post = infer(compile_model(model), "sum")
    # Sum-marginals: x0=1 (0.65) and x1=1 (0.67), but (1,1) has 0.32 < (0,1) 0.35.
    assert int(jnp.argmax(post.log_marginals["x0"])) == 1
    assert {k: int(v) for k, v in post.map.items()} == {"x0": 0, "x1": 1}
    ref = brute_force(model)
    assert {k: int(v) for k, v in ref.map.items()} == {"x0": 0, "x1": 1}


def test_discrete_uniform_support_values_are_exact():
    import numpyro
    import numpyro.distributions as dist

    def model(x=None):
        k = numpyro.sample("k", dist.DiscreteUniform(2, 5))
        numpyro.sample("x", dist.Normal(1.0 * k, 1.0), obs=x)

    kwargs = {"x": jnp.array(4.2)}
    fg = compile_model(model, **kwargs)
    for semiring in ("sum", "max"):
        post = infer(fg, semiring)
        for ref in (
            brute_force(model, semiring=semiring, **kwargs),
            enumerate_exact(model, semiring=semiring, **kwargs),
        ):
            assert_posteriors_close(post, ref, ATOL, model, kwargs)
        assert int(post.map["k"]) == 4


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_loopy_schedule_on_a_tree_equals_exact(kind):
    for seed in range(2):
        model, kwargs = random_factor_model(seed, n_vars=5, kind=kind)
        fg = compile_model(model, **kwargs)
        for semiring in ("sum", "max"):
            exact = infer(fg, semiring, schedule="tree")
            # Flooding on a tree converges after diameter sweeps; 30 is plenty.
            loopy = infer(
                fg, semiring, schedule=fg.schedule("loopy", damping=0.0, max_iters=30)
            )
            assert loopy.converged
            assert_posteriors_close(loopy, exact, ATOL, model, kwargs)
            for site in exact.map:
                assert int(loopy.map[site]) == int(exact.map[site])


def test_loopy_with_damping_on_a_tree_converges_to_exact():
    model, kwargs = random_factor_model(7, n_vars=5, kind="tree")
    fg = compile_model(model, **kwargs)
    exact = infer(fg, "sum")
    loopy = infer(fg, "sum", schedule=fg.schedule("loopy", damping=0.5, max_iters=120))
    # Damping 0.5 halves the error each sweep: 120 sweeps are far below 1e-6.
    assert_posteriors_close(loopy, exact, ATOL)
    deltas = np.asarray(loopy.deltas)
    assert deltas[-1] < 1e-8 <= deltas[0]


def test_loopy_on_a_loopy_graph_is_close_not_exact():
    model, kwargs = random_factor_model(11, n_vars=5, kind="loopy")
    fg = compile_model(model, **kwargs)
    exact = infer(fg, "sum", schedule="exact")
    loopy = infer(fg, "sum", schedule="loopy")
    # Loopy BP is an approximation: beliefs are probabilities, log Z is Bethe's.
    for site, lm in loopy.log_marginals.items():
        np.testing.assert_allclose(np.exp(lm).sum(-1), 1.0, atol=1e-9)
        assert lm.shape == exact.log_marginals[site].shape
    assert np.isfinite(float(loopy.log_z))


@given(seed=st.integers(0, 100_000))
def test_small_temperature_approaches_max_sum(seed):
    model, kwargs = random_factor_model(seed, n_vars=4, kind="loopy")
    fg = compile_model(model, **kwargs)
    hot = infer(fg, temperature=1e-3, schedule="exact")
    cold = infer(fg, "max", schedule="exact")
    # T*logsumexp(x/T) - max(x) lies in [0, T*log N]; N <= 3^4 states: <= 5e-3.
    np.testing.assert_allclose(float(hot.log_z), float(cold.log_z), atol=1e-2)
    for site in cold.log_marginals:
        a, b = np.asarray(hot.log_marginals[site]), np.asarray(cold.log_marginals[site])
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], atol=1e-2)


@given(seed=st.integers(0, 100_000), t=st.sampled_from([0.3, 2.0]))
def test_tempered_inference_matches_tempered_brute_force(seed, t):
    model, kwargs = random_factor_model(seed, n_vars=4, kind="loopy", hard_zeros=True)
    fg = compile_model(model, **kwargs)
    post = infer(fg, temperature=t)
    ref = brute_force(model, temperature=t, **kwargs)
    assert_posteriors_close(post, ref, ATOL, model, kwargs)
