"""compile_model traces a model once; the older two-trace path is its twin.

The one trace gives latent sites marker values (lifted to jaxpr inputs); the two
traces run the model plainly (latents at their first support value), then
abstractly. Both must give the same graph: sites, scopes, supports, plates and
tables. Anything the one trace cannot judge falls back to the two traces, which
report a malformed model's error.
"""

from __future__ import annotations

import jax
import jax.extend
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
    lifted = []

    def spy(closed, latent):
        lifted.append(real_lift(closed, latent))
        return lifted[-1]

    real_lift = compile_mod._lift_latents
    mp.setattr(compile_mod, "_lift_latents", spy)
    one = _one_trace_only(mp, model, **kwargs)
    # The trace's own one-equation stand-ins (an indexing, a Categorical
    # scorer) are all expanded: the jaxpr holds standard, well-typed equations.
    (closed,) = lifted
    jax.extend.core.check_jaxpr(closed.jaxpr)
    assert not any(e.primitive.name.startswith("pgm_drm") for e in closed.jaxpr.eqns)
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
    expanded = {"_expand_take": 0, "_expand_score": 0}

    def spied(name, real):
        def spy(e):
            expanded[name] += 1
            return real(e)

        return spy

    for name in expanded:
        mp.setattr(compile_mod, name, spied(name, getattr(compile_mod, name)))
    one = _one_trace_only(mp, counted)
    assert len(calls) == 1
    # Each site's `trans[i][x]` / `evidence[i][x]` and Categorical scorer was
    # staged as one stand-in equation, expanded after the trace.
    assert expanded == {"_expand_take": 2 * 30 - 1, "_expand_score": 30}
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


_BAD_EMISSION = jnp.array([[0.5, 0.5], [0.2, 0.9]])  # row 1 sums to 1.1


def _hmm_with_observed_categorical(n: int, emission):
    """A chain with an observed Categorical per step, written as a loop."""

    def model(y=None):
        x = numpyro.sample("x_0", dist.Bernoulli(0.4))
        numpyro.sample("y_0", dist.Categorical(emission[x]), obs=y[0])
        for i in range(1, n):
            x = numpyro.sample(f"x_{i}", dist.Bernoulli(0.2 + 0.5 * x))
            numpyro.sample(f"y_{i}", dist.Categorical(emission[x]), obs=y[i])

    return model


@pytest.mark.parametrize("one_trace", [True, False])
def test_observed_probs_not_summing_to_one_are_refused_at_every_parent_state(
    one_trace,
):
    # The first parent state (x = 0) is valid, so NumPyro's own check on the
    # plain trace's concrete values would pass; the compiler checks every state.
    model = _hmm_with_observed_categorical(3, _BAD_EMISSION)
    y = jnp.array([0, 1, 1])
    msg = r"site 'y_0': parameter 'probs'.*Simplex"
    with pytest.raises(CompileError, match=msg):
        compile_model(model, y=y) if one_trace else _two_traces(model, y=y)


@pytest.mark.parametrize("one_trace", [True, False])
@pytest.mark.parametrize(
    "case",
    [
        ("bernoulli", 1.5, r"site 'b': parameter 'probs'.*UnitInterval"),
        ("bernoulli", -0.5, r"site 'b': parameter 'probs'.*UnitInterval"),
        ("categorical", -0.1, r"site 'z' has NaN"),
    ],
)
def test_latent_parameters_outside_their_constraint_are_refused(one_trace, case):
    # Found by a review: NumPyro clamps Bernoulli(1.5) to probability 1 and
    # scores a negative Categorical prob -inf, so those tables summed to one and
    # compiled. A latent Bernoulli's probs are checked with NumPyro's own
    # constraint; a latent Categorical's negative prob scores NaN, refused.
    family, bad, msg = case

    def model(x=None):
        pz = jnp.array([bad, 0.6, 0.4]) if family == "categorical" else jnp.ones(3) / 3
        z = numpyro.sample("z", dist.Categorical(pz))
        pb = bad if family == "bernoulli" else 0.3
        b = numpyro.sample("b", dist.Bernoulli(pb))
        numpyro.sample("x", dist.Normal(z - b, 1.0), obs=x)

    x = jnp.array(0.5)
    if one_trace:
        with pytest.raises(CompileError, match=msg):
            compile_model(model, x=x)
    else:  # the plain trace runs NumPyro's own check on the concrete value
        with pytest.raises(ValueError, match="got invalid probs parameter"):
            _two_traces(model, x=x)


def test_observed_parameter_checks_on_the_grouped_path(monkeypatch):
    # The grouped (slice by slice) evaluation used for big models checks too.
    monkeypatch.setattr(compile_mod, "GROUP_EQNS", 10)
    y = jnp.array([0, 1, 1, 0, 1])
    bad = _BAD_EMISSION.at[0, 0].set(0.4)  # now row 0 is wrong as well
    with pytest.raises(CompileError, match=r"site 'y_\d'.*'probs'"):
        compile_model(_hmm_with_observed_categorical(5, bad), y=y)
    good = jnp.array([[0.5, 0.5], [0.1, 0.9]])
    model = _hmm_with_observed_categorical(5, good)
    fg = compile_model(model, y=y)
    ref = brute_force(model, y=y)
    # float32 sums over 32 joint states: 1e-5 is round-off.
    np.testing.assert_allclose(infer(fg, "sum").log_z, ref.log_z, atol=1e-5)


@given(seed=st.integers(0, 2**16), k=st.integers(2, 6), plate=st.booleans())
def test_valid_observed_parameters_pass_the_check(seed, k, plate):
    # Random valid emission tables (float32 rows from a Dirichlet) compile, in
    # and out of a plate, with the observed-site check on every parent state.
    rng = np.random.default_rng(seed)
    emission = jnp.asarray(rng.dirichlet(np.ones(k), size=3), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, size=4 if plate else ()))

    def model(y=None):
        z = numpyro.sample("z", dist.Categorical(jnp.ones(3) / 3))
        if plate:
            with numpyro.plate("n", 4):
                numpyro.sample("y", dist.Categorical(emission[z]), obs=y)
        else:
            numpyro.sample("y", dist.Categorical(emission[z]), obs=y)

    fg = compile_model(model, y=y)
    ref = brute_force(model, y=y)
    # float32 log-probs of at most 5 terms: 1e-5 is round-off.
    np.testing.assert_allclose(infer(fg, "sum").log_z, ref.log_z, atol=1e-5)


@given(seed=st.integers(0, 2**16))
def test_big_models_split_by_evidence_equal_partial_eval(seed):
    # Above GROUP_EQNS the evidence-free part is split off equation by equation
    # (_split_by_evidence) and its residuals evaluated slice by slice; below, by
    # JAX's partial_eval and the colour vmap. Same log Z and the same gradient
    # with respect to the evidence (custom derivative rules kept), on new data.

    from pgm_drm.inference import log_partition

    rng = np.random.default_rng(seed)
    n = 4
    means = jnp.asarray(rng.normal(size=(n, 3)))
    trans = jnp.asarray(rng.dirichlet(np.ones(3), size=3))

    def model(y=None):
        x = 0
        for i in range(n):
            x = numpyro.sample(f"x_{i}", dist.Categorical(trans[x]))
            numpyro.sample(f"y_{i}", dist.Normal(means[i][x], 0.7), obs=y[i])
            numpyro.sample(f"b_{i}", dist.Bernoulli(logits=means[i][x]), obs=1.0)

    y0 = jnp.asarray(rng.normal(size=n))
    new = jnp.asarray(rng.normal(size=(5, n)))
    small = compile_model(model, y=y0)
    old = compile_mod.GROUP_EQNS
    compile_mod.GROUP_EQNS = 10
    try:
        big = compile_model(model, y=y0)
        big_z = jax.vmap(lambda y: log_partition(big)({"y": y}))(new)
        big_g = jax.grad(lambda y: log_partition(big)({"y": y}))(new[0])
    finally:
        compile_mod.GROUP_EQNS = old
    assert big._evaluator._staged() is not None
    small_z = jax.vmap(lambda y: log_partition(small)({"y": y}))(new)
    small_g = jax.grad(lambda y: log_partition(small)({"y": y}))(new[0])
    # float64, a dozen terms per table: 1e-10 is round-off.
    np.testing.assert_allclose(big_z, small_z, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(big_g, small_g, rtol=1e-10, atol=1e-10)


@given(
    seed=st.integers(0, 2**16),
    k=st.integers(1, 5),
    batch=st.sampled_from([(), (3,), (2, 3)]),
    value_batch=st.sampled_from(["same", "scalar", "lead"]),
    logits=st.booleans(),
    zeros=st.booleans(),
    observed=st.booleans(),
)
def test_categorical_scoring_equals_numpyro_log_prob(
    seed, k, batch, value_batch, logits, zeros, observed
):
    # Categorical sites are scored without NumPyro's take_along_axis
    # (_take_last): the same numbers, bit for bit, with NumPyro's broadcasting
    # of the value against the batch shape, and the same gradient (to
    # round-off) with respect to the parameters (zero probs, i.e. -inf entries,
    # included). Observed values outside the support score -inf, as NumPyro's
    # validated log_prob.
    import warnings

    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k), size=batch)
    if zeros and k > 1:
        p[..., 0] = 0.0
        p = p / p.sum(-1, keepdims=True)
    vshape = {"same": batch, "scalar": (), "lead": (4,) + batch}[value_batch]
    value = rng.integers(1 if zeros and k > 1 else 0, k, size=vshape)
    if observed:  # some values outside the support
        value = np.where(rng.random(vshape) < 0.3, rng.choice([-1, k, k + 2]), value)
    value = jnp.asarray(value)

    def make(x):
        return dist.Categorical(logits=x) if logits else dist.Categorical(probs=x)

    # NumPyro refuses -inf logits: a zero prob is a very negative logit there.
    x0 = jnp.maximum(jnp.log(jnp.asarray(p)), -1e30) if logits else jnp.asarray(p)

    def ours(x):
        site = {"value": value, "fn": make(x), "is_observed": observed}
        return compile_mod._site_log_prob(site)

    def theirs(x):
        with numpyro.validation_enabled(observed), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # NumPyro warns on out-of-support
            return make(x).log_prob(value)

    np.testing.assert_array_equal(ours(x0), theirs(x0))
    g_ours = jax.grad(lambda x: jnp.sum(ours(x)))(x0)
    g_theirs = jax.grad(lambda x: jnp.sum(theirs(x)))(x0)
    # The scorer is one jitted program (_categorical_score): XLA may fuse and
    # order the gradient's softmax and its sum over the value's lead rows apart
    # from NumPyro's op-by-op run. Each component sums at most 4 terms of size
    # <= 1 (|d log p / d logit| <= 1), float64: a reordering moves it by a few
    # 1e-16 (seen: 4 ulp near a cancellation); 1e-14 absolute, no more.
    np.testing.assert_allclose(g_ours, g_theirs, rtol=0, atol=1e-14)


def _indexing_model(seed: int):
    """Every way a latent indexes a table: rows of 1-d to 3-d tables, two latents
    at once, ints and full slices beside a latent, a derived (possibly negative)
    index, and a latent whose support has negative values."""
    rng = np.random.default_rng(seed)
    k1, k2 = (int(v) for v in rng.integers(2, 4, size=2))

    def t(*shape):
        return jnp.asarray(rng.normal(size=shape))

    prior = jnp.asarray(rng.dirichlet(np.ones(k1)))
    trans = jnp.asarray(rng.dirichlet(np.ones(k2), size=k1))
    f1, f2, f3, f4, f5, f6 = t(k1), t(k1, k2), t(k2, k1, 3), t(4, k2), t(k1), t(3)

    def model():
        z1 = numpyro.sample("z1", dist.Categorical(prior))
        z2 = numpyro.sample("z2", dist.Categorical(trans[z1]))  # a row of a 2-d table
        w = numpyro.sample("w", dist.DiscreteUniform(-1, 1))  # negative support
        numpyro.factor("a", f1[z1])
        numpyro.factor("b", f2[z1, z2])
        numpyro.factor("c", f3[z2][z1].sum() + f3[:, z1][z2, 1])
        numpyro.factor("d", f4[2, z2] + f4[-1][z2])
        numpyro.factor("e", f5[z1 - 1])  # derived: -1 wraps to the last entry
        numpyro.factor("f", f6[w] + f6[(w,)])  # negative: JAX's own indexing
        # Static indices of closed-over arrays (read on the host), then a latent.
        numpyro.factor("g", f2[-1, 1:][0] + f3[1:, ::-1][0, z1, 0] + f6[::2][-1])
        # None (a new axis) beside a latent: JAX's own indexing, no fallback.
        numpyro.factor("h", f2[None, z1].sum() + f2[:, None][z1, 0, z2])

    return model


@given(seed=st.integers(0, 10_000))
def test_latent_indexing_fast_path_equals_the_concrete_trace(seed):
    """``table[z]`` for a latent ``z`` of support 0..k-1 is traced as one
    ``dynamic_slice``, and ``table[i]`` of a closed-over table is read on the host
    (``compile._fast_indexing``): the tables equal the two-trace path's
    (which runs JAX's own indexing, by concrete values) and brute force."""
    model = _indexing_model(seed)
    taken = {"_marked_take": [], "_static_take": []}
    mp = pytest.MonkeyPatch()

    def spied(real, seen):
        def spy(*a):
            out = real(*a)
            seen.append(out is not None)
            return out

        return spy

    for name, seen in taken.items():
        mp.setattr(compile_mod, name, spied(getattr(compile_mod, name), seen))
    one = _one_trace_only(mp, model)
    # Each fast path fired and declined: the latent one for z1/z2 (rows, pairs,
    # ints and slices beside them) but not the derived z1 - 1 or the possibly
    # negative w; the static one for the closed-over tables but not for latents.
    for seen in taken.values():
        assert any(seen) and not all(seen)
    _assert_same_graph(one, _two_traces(model))
    ref = brute_force(model)
    # float64 sums of a few dozen terms: 1e-9 is round-off.
    np.testing.assert_allclose(infer(one, "sum").log_z, ref.log_z, atol=1e-9)


def test_trace_hooks_are_removed_after_the_trace():
    from jax._src.numpy import indexing
    from numpyro.distributions.distribution import Unit

    before, unit_sample = indexing.rewriting_take, Unit.sample

    def model():
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        numpyro.factor("f", jnp.zeros(2)[z])
        raise RuntimeError("the model fails")

    with pytest.raises(RuntimeError, match="the model fails"):
        compile_model(model)
    assert indexing.rewriting_take is before
    assert Unit.sample is unit_sample
    assert compile_mod._NONNEG_INDICES.marks is None


@pytest.mark.parametrize("bad", ["probs", "nan", "posinf"])
def test_a_bad_table_among_many_alike_is_named(bad):
    """Tables of one shape are checked stacked (``compile._check_tables``); the
    one bad site among a loop's many is still found and named."""
    n, k = 12, 3
    rng = np.random.default_rng(0)
    trans = rng.dirichlet(np.ones(k), size=(n, k))
    evidence = rng.normal(size=(n, k))
    if bad == "probs":
        trans[7, 2] *= 1.1  # row 2 of step 7 sums to 1.1
    else:
        evidence[7, 1] = np.nan if bad == "nan" else np.inf
    trans, evidence = jnp.asarray(trans), jnp.asarray(evidence)

    def model():
        x = numpyro.sample("x_0", dist.Categorical(jnp.ones(k) / k))
        for i in range(1, n):
            x = numpyro.sample(f"x_{i}", dist.Categorical(trans[i][x]))
            numpyro.factor(f"e_{i}", evidence[i][x])

    want = {
        "probs": r"'x_7'.*summing to 1\.1.*\{'x_6': 2\}",
        "nan": r"'e_7' has NaN",
        "posinf": r"'e_7' has \+inf",
    }[bad]
    with pytest.raises(CompileError, match=want):
        compile_model(model)


def test_latent_indexing_with_a_narrow_int_latent_beside_a_wide_int():
    """An int start beside an int8 latent is not cast into int8 (150 would wrap
    to -106 and clamp to 0): the fast path declines, JAX's own code runs."""

    class Cat8(dist.CategoricalProbs):
        def enumerate_support(self, expand=True):
            return super().enumerate_support(expand).astype(jnp.int8)

    table = jnp.asarray(np.random.default_rng(0).normal(size=(3, 400)))

    def model():
        z = numpyro.sample("z", Cat8(jnp.ones(3) / 3))
        numpyro.factor("f", table[z, np.int64(150)])
        for i in np.arange(120, 124):
            numpyro.factor(f"g{i}", table[z, i])

    one = _one_trace_only(pytest.MonkeyPatch(), model)
    # float64 sums of a few terms: 1e-9 is round-off.
    np.testing.assert_allclose(
        infer(one, "sum").log_z, brute_force(model).log_z, atol=1e-9
    )


def test_trace_hooks_survive_overlapping_threads():
    """Two threads inside the hook context, the first leaving first: JAX's and
    NumPyro's own functions are back once both have left."""
    import threading

    from jax._src.numpy import indexing
    from numpyro.distributions.distribution import Unit

    before, unit_sample = indexing.rewriting_take, Unit.sample
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with compile_mod._fast_indexing():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with compile_mod._fast_indexing():
            b_in.set()
            a_out.wait(10)
            seen["installed"] = indexing.rewriting_take is not before

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["installed"]  # still on for the second thread after the first left
    assert indexing.rewriting_take is before
    assert Unit.sample is unit_sample


def test_support_grids_keep_the_sign_of_zero():
    """Cached grids are keyed by the support's bytes: 0.0 and -0.0 compare equal
    but are different support values (a sign-sensitive log-prob tells them apart)."""
    value = np.zeros((), np.float64)
    pos = compile_mod._support_grid((0.0, -1.0), value, 2)
    neg = compile_mod._support_grid((-0.0, -1.0), value, 2)
    assert not np.signbit(pos[0]) and np.signbit(neg[0])


def test_latent_indexing_inside_a_nested_trace_is_left_to_jax():
    """A latent indexing a table inside a nested trace (a jitted function
    closing over it, or given it) goes through JAX's own indexing: the one
    equation the fast path stages is expanded only in the model's own jaxpr."""

    table = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2)))

    def model():
        z = numpyro.sample("z", dist.Categorical(jnp.ones(3) / 3))
        y = numpyro.sample("y", dist.Bernoulli(0.4))
        numpyro.factor("f", jax.jit(lambda t: t[z, y])(table))  # closed over
        numpyro.factor("g", jax.jit(lambda t, i: t[i].sum())(table, z))  # an input
        numpyro.factor("h", table[z, y])  # the model's own trace: the fast path

    one = _one_trace_only(pytest.MonkeyPatch(), model)
    # float64 sums of a few terms: 1e-9 is round-off.
    np.testing.assert_allclose(
        infer(one, "sum").log_z, brute_force(model).log_z, atol=1e-9
    )


@pytest.mark.parametrize("first_x64", [False, True])
def test_scorer_stand_in_follows_the_dtype_mode(first_x64):
    """The scorer stand-in is the jit equation a call stages in the current
    dtype mode: compiling one model with x64 off, then on (or the reverse), gives
    the two-trace path's table dtypes both times (int32 probs score as float32
    without x64 and as float64 with it)."""
    onehot = np.eye(3, dtype=np.int32)

    def model(y=None):
        prior = jnp.asarray([0.3, 0.3, 0.4], jnp.float32)
        z = numpyro.sample("z", dist.Categorical(prior))
        numpyro.sample("y", dist.Categorical(probs=jnp.asarray(onehot)[z]), obs=y)

    before = jax.config.jax_enable_x64
    try:
        for x64 in (first_x64, not first_x64):
            jax.config.update("jax_enable_x64", x64)
            y = jnp.asarray(2, jnp.int32)
            one = _one_trace_only(pytest.MonkeyPatch(), model, y=y)
            two = _two_traces(model, y=y)
            assert [np.asarray(t).dtype for t in one.tables()] == [
                np.asarray(t).dtype for t in two.tables()
            ]
    finally:
        jax.config.update("jax_enable_x64", before)


def test_a_site_sampled_inside_a_jitted_helper_is_refused_cleanly():
    """A ``numpyro.sample`` inside a ``jax.jit`` helper runs only when JAX traces
    the helper. ``compile_model`` refuses it by name, and leaves no marker in
    the helper's cached program (its later calls, outside the compiler, run)."""
    probs = jnp.asarray([0.2, 0.3, 0.5])
    table = jnp.asarray(np.random.default_rng(2).normal(size=(3, 3)))

    @jax.jit
    def helper(t):
        z = numpyro.sample("zj", dist.Categorical(probs))
        return t[z].sum()

    def model():
        z = numpyro.sample("z", dist.Categorical(probs))
        numpyro.factor("f", helper(table) + table[z, 1])

    with pytest.raises(CompileError, match="'zj' was sampled when the model"):
        compile_model(model)
    # (JAX has now cached the helper: the site would not run again, for the
    # compiler as for NumPyro itself.)
    with numpyro.handlers.seed(rng_seed=0):
        assert np.isfinite(float(helper(table)))


def test_compile_model_from_several_threads_equals_one_at_a_time():
    """NumPyro's handler stack is one list per process: compile_model calls from
    several threads run one at a time, and each gets its own model's graph."""
    import threading

    models = [chain_loop_model(40, k, seed=s)[0] for k, s in ((3, 1), (4, 2), (2, 3))]
    want = [float(infer(compile_model(m), "sum").log_z) for m in models]
    got, errors = [None] * len(models), []

    def run(i):
        try:
            got[i] = float(infer(compile_model(models[i]), "sum").log_z)
        except Exception as err:  # reported below, with the thread's model
            errors.append((i, repr(err)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # The same float64 programs on the same tables: equal to round-off.
    np.testing.assert_allclose(got, want, atol=1e-9)
