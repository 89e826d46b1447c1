"""Fuzzing as a habit (issue 15): random model families fed to hypothesis.

Exact inference (``compile_model`` + ``infer``) against the two independent
references (``brute_force``, ``enumerate_exact``) on models the other exactness
tests do not draw: nested plates on any dims, exponential-family evidence, ties,
huge evidence, ``-inf`` factors; refusals of models exact inference cannot
handle (subsampled plates, undeclared batch dims, NaN/+inf factors, continuous
latents); and evidence in every float dtype. The generators are in
:mod:`pgm_drm.testing`. Each property draws ``examples(n)`` models in CI;
``PGM_DRM_EXAMPLES=200`` makes this the fuzzing run. In ``make test`` the exact
properties draw one model each (~5 s of compiling per model; a smoke test of
every generator), the refusals three.

Tolerance (float64): 1e-6 on log Z, log-marginals and the MAP's log joint, the
issue's bound (as in ``test_exactness.py``): the kernel and the references sum
the same ~10-40 float64 log-terms in other orders and agree to ~1e-12 at
|log p| ~ 10; at the huge-evidence scale |log p| ~ 1e8 one float64 rounding is
~1e-8 and the sums agree to ~3e-8 (measured), still inside 1e-6.
"""

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgm_drm.graph import CompileError, compile_model
from pgm_drm.inference import brute_force, enumerate_exact, infer
from pgm_drm.testing import (
    assert_posteriors_close,
    examples,
    log_joint,
    random_continuous_latent_model,
    random_factor_model,
    random_huge_evidence_model,
    random_nested_plate_model,
    random_nonfinite_factor_model,
    random_observed_family_model,
    random_subsampled_model,
    random_tied_model,
    random_undeclared_batch_model,
)

ATOL = 1e-6  # see the module docstring

seeds = st.integers(0, 100_000)
semirings = st.sampled_from(["sum", "max"])


def _check_exact(
    post, model, kwargs, semiring, references=(brute_force, enumerate_exact)
):
    """``post`` equals the references: log Z, log-marginals, the MAP's log joint."""
    for reference in references:
        ref = reference(model, semiring=semiring, **kwargs)
        assert_posteriors_close(post, ref, ATOL, model, kwargs)


def _assert_refused(model, kwargs, match):
    """The compiler and both references refuse the model with ``match``."""
    for run in (compile_model, brute_force, enumerate_exact):
        with pytest.raises(CompileError, match=match):
            run(model, **kwargs)


# --------------------------------------------------------------------------- #
# Models that must be exact
# --------------------------------------------------------------------------- #


@settings(max_examples=examples(1))
@given(
    seed=seeds,
    # hypothesis starts with the first: a layout the other tests do not draw.
    layout=st.sampled_from(["swapped", "gap", "default"]),
    semiring=semirings,
)
def test_nested_plates_are_exact(seed, layout, semiring):
    model, kwargs = random_nested_plate_model(seed, layout)
    post = infer(compile_model(model, **kwargs), semiring, **kwargs)
    _check_exact(post, model, kwargs, semiring)


def _plate_at_dim_minus_2(u=None):
    """Two instances of ``z ~ Bernoulli(0.3)``, ``u ~ N(z, 1)`` in a plate at
    dim -2: the sites' batch shape is ``(2, 1)``."""
    with numpyro.plate("outer", 2, dim=-2):
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        numpyro.sample("u", dist.Normal(z, 1.0), obs=u)


_PLATE_AT_DIM_MINUS_2_EVIDENCE = {"u": jnp.asarray([[0.5], [1.5]])}


def _plate_at_dim_minus_2_log_z() -> float:
    """Closed form: independent instances of the mixture 0.7 N(0, 1) + 0.3 N(1, 1)."""
    u = np.asarray(_PLATE_AT_DIM_MINUS_2_EVIDENCE["u"])
    pdf = np.exp(-0.5 * np.square(u - np.array([0.0, 1.0]))) / np.sqrt(2 * np.pi)
    return float(np.sum(np.log(pdf @ np.array([0.7, 0.3]))))


def test_references_handle_plates_off_the_rightmost_dims():
    # Values are substituted in the site's batch shape (2, 1), not its plate
    # sizes (2,) (which broadcast into a wrong log joint: log Z -6.79, not -2.67).
    kwargs, exact = _PLATE_AT_DIM_MINUS_2_EVIDENCE, _plate_at_dim_minus_2_log_z()
    for reference in (brute_force, enumerate_exact):
        ref = reference(_plate_at_dim_minus_2, **kwargs)
        np.testing.assert_allclose(float(ref.log_z), exact, atol=ATOL)
        # Laid out as infer lays it out: the plate sizes, then the states.
        assert ref.log_marginals["z"].shape == (2, 2)
        assert ref.map["z"].shape == (2,)


def test_infer_handles_plates_off_the_rightmost_dims():
    kwargs = _PLATE_AT_DIM_MINUS_2_EVIDENCE
    post = infer(compile_model(_plate_at_dim_minus_2, **kwargs), **kwargs)
    # float64 sums of 4 terms: round-off only.
    np.testing.assert_allclose(
        float(post.log_z), _plate_at_dim_minus_2_log_z(), atol=1e-12
    )


@settings(max_examples=examples(1))
@given(seed=seeds, semiring=semirings)
def test_observed_families_are_exact(seed, semiring):
    # Compiled on one draw of the evidence, inferred on another: the evidence
    # tables are recomputed from the model's jaxpr at the new values.
    model, compile_kwargs = random_observed_family_model(seed, draw=0)
    _, kwargs = random_observed_family_model(seed, draw=1)
    post = infer(compile_model(model, **compile_kwargs), semiring, **kwargs)
    _check_exact(post, model, kwargs, semiring)


@settings(max_examples=examples(1))
@given(seed=seeds, semiring=semirings)
def test_tied_map_attains_the_max_log_joint(seed, semiring):
    model, kwargs = random_tied_model(seed)
    post = infer(compile_model(model, **kwargs), semiring, **kwargs)
    # Marginals exact; the MAP's log joint equals brute force's (its first
    # maximiser): under ties only the value is unique.
    _check_exact(post, model, kwargs, semiring, (brute_force,))
    if semiring == "max":
        # The decoded MAP reaches max-sum's log Z, and every site's MAP value
        # has max-marginal 0 (a value of a maximiser attains the max). The
        # tied models' latents are Categorical: values are state indices.
        np.testing.assert_allclose(
            log_joint(model, post.map, **kwargs), float(post.log_z), atol=ATOL
        )
        for site, lm in post.log_marginals.items():
            at_map = np.take_along_axis(
                np.asarray(lm), np.asarray(post.map[site])[..., None], axis=-1
            )
            np.testing.assert_allclose(at_map, 0.0, atol=ATOL, err_msg=site)


@settings(max_examples=examples(1))
@given(
    seed=seeds,
    mode=st.sampled_from(["shift", "scale"]),
    kind=st.sampled_from(["tree", "loopy"]),
    hard=st.booleans(),
)
def test_huge_evidence_is_normalised_and_exact(seed, mode, kind, hard):
    model, kwargs = random_huge_evidence_model(
        seed, 1e4, mode, kind=kind, hard_zeros=hard
    )
    assert np.max(np.abs(np.asarray(kwargs["y"]))) > 5e3
    post = infer(compile_model(model, **kwargs), "sum", **kwargs)
    for site, m in post.marginals.items():
        # Normalised log-beliefs are O(1) in float64: sums to 1 up to ~1e-15.
        np.testing.assert_allclose(np.sum(m, axis=-1), 1.0, atol=1e-6, err_msg=site)
    # Both references stay in log space: log-marginals agree down to ~-1e8
    # ("scale" mode), far below exp's underflow at ~-745.
    for reference in (brute_force, enumerate_exact):
        assert_posteriors_close(post, reference(model, **kwargs), ATOL, model, kwargs)


def _bernoulli_far_apart(y=None):
    """``z ~ Bernoulli(1/2)``, ``y ~ N(40 z, 1)``: at ``y = 0`` the exact
    ``log p(z = 1 | y) = -800 - log(1 + e^-800) = -800`` in float64."""
    z = numpyro.sample("z", dist.Bernoulli(0.5))
    numpyro.sample("y", dist.Normal(40.0 * z, 1.0), obs=y)


def test_log_marginals_far_below_exp_underflow_are_exact():
    y = jnp.asarray(0.0)
    for post in (
        infer(compile_model(_bernoulli_far_apart, y=y), y=y),
        brute_force(_bernoulli_far_apart, y=y),
    ):
        # -800 and 0 are exact in float64; the sums round to ~1e-13.
        np.testing.assert_allclose(post.log_marginals["z"], [0.0, -800.0], atol=ATOL)


def test_enumerate_exact_log_marginals_far_below_exp_underflow():
    # funsor's log einsum (exp of each factor shifted by its own max) gave -inf
    # here; enumerate_exact contracts every pair in log space.
    ref = enumerate_exact(_bernoulli_far_apart, y=jnp.asarray(0.0))
    # -800 and 0 are exact in float64; the sums round to ~1e-13.
    np.testing.assert_allclose(ref.log_marginals["z"], [0.0, -800.0], atol=ATOL)


@settings(max_examples=examples(1))
@given(seed=seeds, when=st.sampled_from(["compile", "infer"]), semiring=semirings)
def test_neginf_factors_are_exact(seed, when, semiring):
    # -inf is a hard zero, legal in any factor: in the compile-time tables or
    # only in the evidence given to infer (gate 0 at compile time).
    model, kwargs, match = random_nonfinite_factor_model(seed, -np.inf)
    assert match is None
    compiled = kwargs if when == "compile" else {**kwargs, "gate": jnp.asarray(0.0)}
    post = infer(compile_model(model, **compiled), semiring, **kwargs)
    _check_exact(post, model, kwargs, semiring, (brute_force,))


# --------------------------------------------------------------------------- #
# Models that must be refused, with an error naming the problem
# --------------------------------------------------------------------------- #


@settings(max_examples=examples(3))
@given(
    seed=seeds,
    value=st.sampled_from([np.nan, np.inf]),
    when=st.sampled_from(["compile", "infer"]),
    semiring=semirings,
)
def test_nan_and_posinf_factors_are_refused(seed, value, when, semiring):
    model, kwargs, match = random_nonfinite_factor_model(seed, value)
    if when == "compile":
        with pytest.raises(CompileError, match=match):
            compile_model(model, **kwargs)
        return
    # Finite at compile time (gate 0), non-finite in the evidence given to infer.
    fg = compile_model(model, **{**kwargs, "gate": jnp.asarray(0.0)})
    with pytest.raises(ValueError, match=r"log Z is (NaN|\+inf)"):
        infer(fg, semiring, **kwargs)


@settings(max_examples=examples(3))
@given(seed=seeds)
def test_subsampled_plates_are_refused(seed):
    _assert_refused(*random_subsampled_model(seed))


@settings(max_examples=examples(3))
@given(seed=seeds)
def test_undeclared_batch_dims_are_refused(seed):
    _assert_refused(*random_undeclared_batch_model(seed))


@settings(max_examples=examples(3))
@given(seed=seeds, in_plate=st.booleans())
def test_continuous_latents_are_refused(seed, in_plate):
    model, kwargs, match = random_continuous_latent_model(seed, in_plate)
    _assert_refused(model, kwargs, match)


def test_a_continuous_latent_in_a_plate_is_refused_naming_its_family():
    # The plate wraps the site's distribution in an ExpandedDistribution: the
    # refusal names the family inside it.
    model, kwargs, match = random_continuous_latent_model(0, in_plate=True)
    with pytest.raises(CompileError, match=match):
        compile_model(model, **kwargs)


# --------------------------------------------------------------------------- #
# Evidence in every float dtype
# --------------------------------------------------------------------------- #

#: Largest difference of a marginal probability from float64 inference on the
#: same (rounded) evidence. The kernel computes in the evidence's dtype: each
#: O(10) log-term is rounded to the dtype's epsilon (float32 6e-8, float16 5e-4,
#: bfloat16 4e-3 relative), a few terms per log-marginal; probabilities move by
#: about the log error. float32's bound is the issue's 1e-4 (measured: 2e-7);
#: float16's and bfloat16's are ~6x the largest errors measured over 40 models
#: (1.6e-3 and 6.9e-3).
DTYPE_ATOL = {
    jnp.float16: 1e-2,
    jnp.bfloat16: 5e-2,
    jnp.float32: 1e-4,
}


@settings(max_examples=examples(1))
@given(seed=seeds, kind=st.sampled_from(["tree", "loopy"]))
def test_evidence_in_every_float_dtype(seed, kind):
    model, kwargs = random_factor_model(seed, n_vars=3, kind=kind)
    y = kwargs["y"]
    fg64 = compile_model(model, **kwargs)
    for dtype, atol in DTYPE_ATOL.items():
        low = y.astype(dtype)
        # Compiled with evidence of the dtype (a float64 graph given narrower
        # evidence: the test below).
        post = infer(compile_model(model, y=low), "sum", y=low)
        # The promise (api._evidence_dtype): results in the evidence's dtype.
        assert post.log_z.dtype == dtype
        assert all(m.dtype == dtype for m in post.log_marginals.values())
        assert np.isfinite(np.asarray(post.log_z, np.float64))
        # The reference: float64 inference on the same rounded evidence.
        ref = infer(fg64, "sum", y=low.astype(jnp.float64))
        assert ref.log_z.dtype == jnp.float64 and np.isfinite(float(ref.log_z))
        for site, m in post.marginals.items():
            m = np.asarray(m, np.float64)
            assert np.all(np.isfinite(m)), (dtype, site)
            np.testing.assert_allclose(
                m, ref.marginals[site], atol=atol, err_msg=f"{dtype} {site}"
            )


def test_float32_evidence_on_a_graph_compiled_with_float64():
    """The tables are a jaxpr specialised to the compile-time dtype: narrower
    evidence is widened for them (the kernel still computes in float32); wider
    evidence, which the compiled dtype would round, is refused by name."""
    model, kwargs = random_factor_model(0, n_vars=3, kind="chain")
    fg = compile_model(model, **kwargs)
    y32 = kwargs["y"].astype(jnp.float32)
    post = infer(fg, "sum", y=y32)
    assert post.log_z.dtype == jnp.float32
    want = infer(fg, "sum", y=y32.astype(jnp.float64))
    # float32 rounding of O(10) log-terms: ~1e-6
    np.testing.assert_allclose(float(post.log_z), float(want.log_z), atol=1e-4)
    fg32 = compile_model(model, y=y32)
    with pytest.raises(ValueError, match="'y' is float64.*compiled with float32"):
        infer(fg32, "sum", y=kwargs["y"])
