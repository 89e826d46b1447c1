"""Exact schedules agree with brute force and with NumPyro's own enumeration.

Tolerance: 1e-6 on log Z and log-marginals in float64 (the issue's bound). The
three computations sum the same ~10-40 float64 log-terms in different orders, so
they agree to ~1e-12; 1e-6 leaves room for logsumexp's internal rescaling.

The kernel's own tests (loopy schedules, the temperature limit, the kernel
called directly) are in ``test_kernel.py``; the references themselves are
checked by hand in ``test_reference.py``.
"""

import jax.numpy as jnp
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


@given(seed=st.integers(0, 100_000), t=st.sampled_from([0.3, 2.0]))
def test_tempered_inference_matches_tempered_brute_force(seed, t):
    model, kwargs = random_factor_model(seed, n_vars=4, kind="loopy", hard_zeros=True)
    fg = compile_model(model, **kwargs)
    post = infer(fg, temperature=t)
    ref = brute_force(model, temperature=t, **kwargs)
    assert_posteriors_close(post, ref, ATOL, model, kwargs)
