"""compile_model traces a model once; the older two-trace path is its twin.

The one trace gives latent sites marker values (lifted to jaxpr inputs); the two
traces run the model plainly (latents at their first support value), then
abstractly. Both must give the same graph: sites, scopes, supports, plates and
tables. Anything the one trace cannot judge falls back to the two traces, which
report a malformed model's error.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import CompileError, compile_model
from pgm_drm.graph import compile as compile_mod
from pgm_drm.inference import brute_force, infer
from pgm_drm.testing import (
    chain_loop_model,
    random_factor_model,
    random_nested_plate_model,
    random_observed_family_model,
    random_plate_model,
    random_rendering_model,
    random_tied_model,
)


def _two_traces(model, **kwargs):
    old = compile_mod.ONE_TRACE
    compile_mod.ONE_TRACE = False
    try:
        return compile_model(model, **kwargs)
    finally:
        compile_mod.ONE_TRACE = old


def _one_trace_only(monkeypatch, model, **kwargs):
    """compile_model with the fallback removed: the one trace must succeed."""

    def no_fallback(*a, **k):
        raise AssertionError("compile_model fell back to the two-trace path")

    monkeypatch.setattr(compile_mod, "_front_two_traces", no_fallback)
    try:
        return compile_model(model, **kwargs)
    finally:
        monkeypatch.undo()


def _assert_same_graph(one, two):
    assert one.sites == two.sites  # plates, supports, scopes, evidence, summed
    assert [
        (g.site, g.plate_shape, g.support, g.offset) for g in one.variable_groups
    ] == [(g.site, g.plate_shape, g.support, g.offset) for g in two.variable_groups]
    assert len(one.factor_groups) == len(two.factor_groups)
    for a, b in zip(one.factor_groups, two.factor_groups, strict=True):
        assert (a.site, a.scope_sites, a.cards, a.plate_shape, a.evidence) == (
            b.site,
            b.scope_sites,
            b.cards,
            b.plate_shape,
            b.evidence,
        )
        np.testing.assert_array_equal(a.scope, b.scope)
    # The same jnp operations on the same values, traced into differently built
    # jaxprs: equal up to float64 round-off in the order XLA fuses them.
    for a, b in zip(one.tables(), two.tables(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


def _models(kind: str, seed: int):
    if kind == "factor":
        return random_factor_model(seed, n_vars=4, kind="loopy", hard_zeros=True)
    if kind == "plate":
        return random_plate_model(seed, outer=2, inner=2)
    if kind == "nested":
        return random_nested_plate_model(seed)
    if kind == "family":
        return random_observed_family_model(seed)
    if kind == "tied":
        return random_tied_model(seed)
    rm, kw = random_rendering_model(seed, image_shape=(3, 3))
    return rm.model, kw


@given(
    kind=st.sampled_from(["factor", "plate", "nested", "family", "tied", "rendering"]),
    seed=st.integers(0, 10_000),
)
def test_one_trace_equals_two_traces(kind, seed):
    model, kwargs = _models(kind, seed)
    mp = pytest.MonkeyPatch()
    one = _one_trace_only(mp, model, **kwargs)
    two = _two_traces(model, **kwargs)
    _assert_same_graph(one, two)
    # And exact: log Z equals listing every configuration (float64 sums of a few
    # dozen terms, 1e-9 is round-off).
    if kind != "rendering":
        ref = brute_force(model, **kwargs)
        np.testing.assert_allclose(infer(one, "sum").log_z, ref.log_z, atol=1e-9)


def test_a_loop_written_model_runs_once():
    model, _ = chain_loop_model(30)
    calls = []

    def counted():
        calls.append(1)
        model()

    mp = pytest.MonkeyPatch()
    one = _one_trace_only(mp, counted)
    assert len(calls) == 1
    _assert_same_graph(one, _two_traces(model))


def test_python_control_flow_falls_back_and_is_explained():
    def model():
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        if z:  # Python control flow on a latent value
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=0.5)

    with pytest.raises(CompileError, match="Python control flow"):
        compile_model(model)


def test_probs_not_summing_to_one_are_refused_at_every_parent_state():
    # The first parent state is valid; the second is not. NumPyro's own check
    # sees one concrete value at most, so only the table check finds this.
    cpt = jnp.array([[0.5, 0.5], [0.2, 0.9]])

    def model():
        z = numpyro.sample("z", dist.Categorical(jnp.array([0.5, 0.5])))
        w = numpyro.sample("w", dist.Categorical(cpt[z]))
        numpyro.sample("y", dist.Normal(1.0 * z + w, 1.0), obs=0.3)

    with pytest.raises(CompileError, match=r"'w'.*summing to 1\.1.*\{'z': 1\}"):
        compile_model(model)
    with pytest.raises(CompileError, match=r"'w'.*summing to 1\.1"):
        _two_traces(model)


def test_scaled_latent_sites_are_not_held_to_sum_to_one():
    def model():
        with numpyro.handlers.scale(scale=2.0):
            z = numpyro.sample("z", dist.Bernoulli(0.3))
        numpyro.sample("y", dist.Normal(1.0 * z, 1.0), obs=0.4)

    fg = compile_model(model)
    ref = brute_force(model)
    # float64 sums of two terms: 1e-12 is round-off.
    np.testing.assert_allclose(infer(fg, "sum").log_z, ref.log_z, atol=1e-12)


@given(
    family=st.sampled_from(["bern_p", "bern_l", "cat_p", "cat_l", "ordered"]),
    k=st.integers(2, 6),
    plate=st.sampled_from([(), (3,), (2, 3)]),
    x64=st.booleans(),
)
def test_arange_supports_equal_enumerate_support(family, k, plate, x64):
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        probs = jnp.full((k,), 1.0 / k)
        fn = {
            "bern_p": lambda: dist.BernoulliProbs(0.3),
            "bern_l": lambda: dist.BernoulliLogits(0.3),
            "cat_p": lambda: dist.CategoricalProbs(probs),
            "cat_l": lambda: dist.CategoricalLogits(jnp.zeros(k)),
            "ordered": lambda: dist.OrderedLogistic(0.0, jnp.arange(k - 1.0)),
        }[family]()
        if plate:
            fn = fn.expand(plate)
        assert compile_mod._arange_support(fn) is not None
        fast = compile_mod.support_values(fn)
        slow = np.asarray(fn.enumerate_support(expand=False)).reshape(len(fast), -1)
        assert fast.dtype == slow.dtype
        np.testing.assert_array_equal(fast, slow[:, 0])
    finally:
        jax.config.update("jax_enable_x64", old)


@pytest.mark.parametrize("x64", [False, True])
def test_valid_latents_pass_the_normalisation_check_in_float32(x64):
    """Rounding in a log-prob grows with its terms (a float32 Binomial(100) sums
    to 1 +- 3e-5): valid models must not be refused, in either precision."""
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", x64)
    try:
        logits = jnp.asarray([0.0, 100.0, -40.0, 3.0])

        def model():
            n = numpyro.sample("n", dist.Binomial(100, 0.3))
            c = numpyro.sample("c", dist.Categorical(logits=logits))
            numpyro.sample("y", dist.Normal(0.01 * n + c, 1.0), obs=0.3)

        fg = compile_model(model)
        assert np.isfinite(float(infer(fg, "sum", map=False).log_z))
    finally:
        jax.config.update("jax_enable_x64", old)


def test_an_impossible_row_at_an_unreachable_parent_state_is_allowed():
    # Row 1 of the table is all zero, but z is never 1: a hard zero, exact.
    cpt = jnp.array([[0.3, 0.7], [0.0, 0.0]])

    def model():
        z = numpyro.sample("z", dist.Categorical(jnp.array([1.0, 0.0])))
        w = numpyro.sample("w", dist.Categorical(cpt[z]))
        numpyro.sample("y", dist.Normal(1.0 * w, 1.0), obs=0.3)

    fg = compile_model(model)
    ref = brute_force(model)
    # float64 sums of a few terms: 1e-12 is round-off.
    np.testing.assert_allclose(infer(fg, "sum").log_z, ref.log_z, atol=1e-12)
