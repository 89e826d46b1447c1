"""infer: batching without recompiling, semiring arguments, bad input;
log_partition: log Z as a pure, differentiable function of the evidence."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import Schedule, compile_model
from pgm_drm.inference import (
    brute_force,
    enumerate_exact,
    infer,
    log_partition,
    log_partition_tables,
)
from pgm_drm.models import RenderingModel, default_templates


@pytest.fixture(scope="module")
def rm_and_images():
    rm = RenderingModel(default_templates(), sigma=0.6, switch_prior=0.9)
    images, latents = rm.sample(jax.random.PRNGKey(1), 1000)
    return rm, images, latents


def test_batch_of_1000_traces_once_and_matches_single(rm_and_images):
    rm, images, _ = rm_and_images
    fg = compile_model(rm.model, image=images[0])
    before = fg.n_traces
    batch = infer(fg, "sum", image=images)
    assert fg.n_traces == before + 1
    again = infer(fg, "sum", image=images[::-1])
    assert fg.n_traces == before + 1  # same shapes: the jitted kernel is reused
    assert batch.log_z.shape == (1000,)
    assert batch.log_marginals["c"].shape == (1000, 3)
    assert batch.map["g"].shape == (1000,)
    np.testing.assert_allclose(again.log_z[::-1], batch.log_z)
    for i in (0, 17, 999):
        ref = enumerate_exact(rm.model, image=images[i])
        # float64: identical sums in another order; 1e-6 is the bound.
        np.testing.assert_allclose(batch.log_z[i], ref.log_z, atol=1e-6)
        np.testing.assert_allclose(
            batch.log_marginals["c"][i], ref.log_marginals["c"], atol=1e-6
        )


def test_semiring_and_temperature_arguments(rm_and_images):
    rm, images, _ = rm_and_images
    fg = compile_model(rm.model, image=images[0])
    assert infer(fg, "max").temperature == 0.0
    assert infer(fg, "sum").temperature == 1.0
    assert infer(fg, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="semiring"):
        infer(fg, "product")
    with pytest.raises(ValueError, match="temperature"):
        infer(fg, temperature=-1.0)


def test_zero_probability_evidence_is_an_error():
    import numpyro
    import numpyro.distributions as dist

    def model(x=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, 1.0, 0.0)), obs=x)

    fg = compile_model(model, x=jnp.array(1.0))
    assert int(infer(fg, "max").map["z"]) == 1
    with pytest.raises(ValueError, match="probability zero"):
        infer(fg, x=jnp.array(0.5))


def test_zero_probability_names_the_batch_index():
    import numpyro
    import numpyro.distributions as dist

    def model(x=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, 1.0, 0.0)), obs=x)

    fg = compile_model(model, x=jnp.array(1.0))
    with pytest.raises(ValueError, match=r"probability zero.*batch index \(2,\)"):
        infer(fg, x=jnp.array([1.0, 1.0, 0.5, 1.0]))


# At 1e4, |log p| ~ 1e12: a float32 table entry is only good to ~1e5 there, so
# the states keep their order and ties only because the Normal's natural form
# adds the state-free x^2 part last (graph/natural.py, _normal).
@pytest.mark.parametrize("fill", [10.0, 100.0, 1e4])
def test_float32_marginals_stay_normalised_at_huge_log_joints(fill):
    """Issue 15: a 64x64 image filled with 100 (|log p| ~ 1e6) gave float32
    marginals [0, 1, 1] on the junction-tree schedule, and brute force agreed. No
    belief may hold the absolute log joint: in float32 the marginals sum to one
    and equal a float64 brute-force reference."""
    from pgm_drm.inference import brute_force

    rng = np.random.default_rng(3)
    tpl = rng.normal(size=(3, 2, 64, 64))
    tpl[2] = tpl[1]  # two tied classes
    ref = brute_force(
        RenderingModel(tpl, sigma=0.5).model, image=jnp.full((64, 64), fill)
    )
    with jax.enable_x64(False):
        rm = RenderingModel(tpl.astype(np.float32), sigma=0.5)
        image = jnp.full((64, 64), fill, jnp.float32)
        fg = compile_model(rm.model, image=image)
        runs = [infer(fg, "sum", schedule=s) for s in ("tree", "exact")]
        # Past |log p| * eps = 1 nat (fill 100: 8e7 * 1.2e-7 = 10) the listed
        # posterior cannot be trusted, and brute_force says so; here the
        # differences between states (~1e5 nats) still dwarf the rounding.
        if fill >= 100:
            with pytest.warns(RuntimeWarning, match="rounded by up to"):
                runs.append(brute_force(rm.model, image=image))
        else:
            runs.append(brute_force(rm.model, image=image))
    for got in runs:
        for site in ("c", "g"):
            p = np.exp(np.asarray(got.log_marginals[site], np.float64))
            want = np.exp(np.asarray(ref.log_marginals[site]))
            # float32 rounding of O(1) normalised log-beliefs: the 1e-4.
            np.testing.assert_allclose(p.sum(), 1.0, atol=1e-4)
            np.testing.assert_allclose(p, want, atol=1e-4)


@pytest.mark.parametrize("fill", [1e30, 1e100])
def test_float64_marginals_stay_exact_at_any_magnitude(fill):
    """Issue 15: a float64 image filled with 1e30 gave normalised but uniform
    marginals: table entries of ~-8e63 are spaced ~1e48 apart, which swallowed
    the states' differences (~1e32). The Normal's state-free scale part now goes
    to log Z apart from the tables (FactorGraph.evidence_parts)."""
    from scipy.special import logsumexp

    from pgm_drm.inference import brute_force

    rng = np.random.default_rng(3)
    tpl = rng.normal(size=(3, 2, 16, 16))
    tpl[2] = tpl[1]  # two tied classes
    rm = RenderingModel(tpl, sigma=0.5)
    image = jnp.full((16, 16), fill)
    # Reference: Eq. 8's <w_cg | I> + b_cg (the ||I||^2 term is common to all
    # states), shifted by its max before normalising, in float64 numpy.
    w = tpl.reshape(3, 2, -1) / 0.25
    score = (
        np.log(np.asarray(rm.class_prior))[:, None]
        + np.log(np.asarray(rm.nuisance_prior))[None, :]
        + w @ np.asarray(image).ravel()
        - (tpl.reshape(3, 2, -1) ** 2).sum(-1) / 0.5
    )
    score -= score.max()
    want_c = np.exp(logsumexp(score, axis=1) - logsumexp(score))
    want_g = np.exp(logsumexp(score, axis=0) - logsumexp(score))
    fg = compile_model(rm.model, image=image)
    for schedule in ("tree", "exact"):
        for batch in (False, True):
            ev = {"image": jnp.stack([image, image])} if batch else {}
            got = infer(fg, "sum", schedule=schedule, **ev)
            c = np.asarray(got.marginals["c"]).reshape(-1, 3)
            g = np.asarray(got.marginals["g"]).reshape(-1, 2)
            # Normalised O(1) float64 probabilities: round-off only.
            np.testing.assert_allclose(c, np.broadcast_to(want_c, c.shape), atol=1e-9)
            np.testing.assert_allclose(g, np.broadcast_to(want_g, g.shape), atol=1e-9)
            # The joint MAP is one of the (tied) maximisers of the reference.
            for c_map, g_map in zip(
                np.reshape(got.map["c"], -1), np.reshape(got.map["g"], -1), strict=True
            ):
                assert score[int(c_map), int(g_map)] == 0.0
    if fill > 1e20:  # numpyro's own log_prob cannot resolve the states there
        with pytest.warns(RuntimeWarning, match="rounded by up to"):
            brute_force(rm.model, image=image)


# --------------------------------------------------------------------------- #
# log_partition: the gradient of log Z is the expected sufficient statistic.
# --------------------------------------------------------------------------- #


def chain(mu=None, x=None):
    """A 3-step chain (a tree): means ``mu`` as evidence, observations ``x``."""
    trans = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    z = numpyro.sample("z0", dist.Categorical(jnp.array([0.5, 0.3, 0.2])))
    numpyro.sample("x0", dist.Normal(mu[z], 1.0), obs=x[0])
    for t in (1, 2):
        z = numpyro.sample(f"z{t}", dist.Categorical(trans[z]))
        numpyro.sample(f"x{t}", dist.Normal(mu[z], 1.0), obs=x[t])


def loop(mu=None, x=None):
    """Three binary latents in a cycle (needs the junction tree), hard zeros:
    ``z0 = z1 = 1`` is impossible."""
    z0 = numpyro.sample("z0", dist.Bernoulli(0.6))
    z1 = numpyro.sample("z1", dist.Bernoulli(jnp.where(z0 == 1, 0.3, 0.8)))
    z2 = numpyro.sample("z2", dist.Bernoulli(jnp.where(z1 == 1, 0.9, 0.2)))
    numpyro.factor("link", jnp.where(z0 == z2, 0.5, -0.5))
    numpyro.factor("hard", jnp.where((z0 == 1) & (z1 == 1), -jnp.inf, 0.0))
    for t, z in enumerate((z0, z1, z2)):
        numpyro.sample(f"x{t}", dist.Normal(mu[z], 1.0), obs=x[t])


def hard_tree(mu=None, x=None):
    """A tree with hard zeros (``-inf`` factors) on some states and transitions."""
    trans = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    banned = jnp.array([[False, True, False], [True, False, False], [False] * 3])
    z = numpyro.sample("z0", dist.Categorical(jnp.array([0.5, 0.3, 0.2])))
    numpyro.factor("no2", jnp.where(z == 2, -jnp.inf, 0.0))
    numpyro.sample("x0", dist.Normal(mu[z], 1.0), obs=x[0])
    for t in (1, 2):
        prev, z = z, numpyro.sample(f"z{t}", dist.Categorical(trans[z]))
        # 0 * mu: a table that is differentiated and holds -inf entries.
        numpyro.factor(f"ban{t}", jnp.where(banned[prev, z], -jnp.inf, 0.0 * mu[z]))
        numpyro.sample(f"x{t}", dist.Normal(mu[z], 1.0), obs=x[t])


def _brute_grad_mu(post, mu, x):
    """``d log p(x) / d mu_k = sum_t P(z_t = k | x) (x_t - mu_k)`` (unit
    variance), from brute-force marginals."""
    g = np.zeros(len(mu))
    for t in range(len(x)):
        m = np.asarray(post.marginals[f"z{t}"])
        for k in range(len(m)):
            g[k] += m[k] * (float(x[t]) - float(mu[k]))
    return g, float(post.log_z)


@pytest.mark.parametrize(
    "model, k", [(chain, 3), (loop, 2), (hard_tree, 3)], ids=["tree", "loop", "hard"]
)
def test_grad_of_log_z_is_the_expected_statistic(model, k):
    mu = jnp.linspace(-1.0, 1.5, k)
    x = jnp.array([0.3, -1.2, 1.7])
    fg = compile_model(model, mu=mu, x=x)
    f = jax.jit(log_partition(fg))
    lz, g = jax.jit(jax.value_and_grad(lambda m: f({"mu": m, "x": x})))(mu)
    post = brute_force(model, mu=mu, x=x)
    want_g, want_lz = _brute_grad_mu(post, mu, x)
    np.testing.assert_allclose(float(lz), want_lz, rtol=0, atol=1e-10)
    assert np.all(np.isfinite(np.asarray(g)))  # -inf entries give no NaN
    np.testing.assert_allclose(np.asarray(g), want_g, rtol=0, atol=1e-10)
    # Central finite differences agree too (log Z is smooth in mu).
    eps = 1e-6
    fd = [
        (
            float(f({"mu": mu.at[i].add(eps), "x": x}))
            - float(f({"mu": mu.at[i].add(-eps), "x": x}))
        )
        / (2 * eps)
        for i in range(k)
    ]
    np.testing.assert_allclose(np.asarray(g), fd, rtol=0, atol=1e-6)
    # With respect to the tables, the gradient is each factor's marginal.
    b = jax.jit(jax.grad(log_partition_tables(fg)))(fg.evidence_tables(mu=mu, x=x))
    for gi, grp in enumerate(fg.factor_groups):
        if gi not in b:
            continue
        marg = np.asarray(b[gi])
        assert np.all(np.isfinite(marg))
        np.testing.assert_allclose(marg.reshape(marg.shape[0], -1).sum(1), 1.0)
        if grp.site.startswith("x"):  # p(x_t | z_t): the marginal of z_t
            z = "z" + grp.site[1:]
            np.testing.assert_allclose(marg[0], post.marginals[z], atol=1e-10)


@given(seed=st.integers(0, 10_000))
def test_grad_of_log_z_with_hard_zeros_is_each_factors_marginal(seed):
    """Random loopy models (junction tree) with hard zeros: the gradient of log
    Z with respect to each table is that factor's marginal, finite where the
    table is, 0 where it is -inf, summing to 1 per instance. An impossible
    separator state sends an all -inf message, whose log-sum-exp had an
    infinite derivative (``0 * inf = NaN``) before ``semiring.safe_log``."""
    from pgm_drm.testing import random_factor_model

    model, kw = random_factor_model(
        seed, n_vars=6, max_card=4, kind="loopy", hard_zeros=True
    )
    fg = compile_model(model, **kw)
    tables = fg.evidence_tables(**kw)
    grads = jax.jit(jax.grad(log_partition_tables(fg, "exact")))(tables)
    for k, g in grads.items():
        g, t = np.asarray(g), np.asarray(tables[k])
        assert np.all(np.isfinite(g)), (k, g)
        assert np.all(g[np.isneginf(t)] == 0.0), k
        np.testing.assert_allclose(g.reshape(g.shape[0], -1).sum(1), 1.0, atol=1e-8)


def test_log_partition_refuses_loopy_schedules():
    fg = compile_model(loop, mu=jnp.zeros(2), x=jnp.zeros(3))
    with pytest.raises(ValueError, match="exact schedule"):
        log_partition(fg, "loopy")


@pytest.mark.parametrize("schedule", ["tree", "exact"])
def test_infer_keeps_the_dtype_of_its_evidence(rm_and_images, schedule):
    """float32 images give float32 results (the model's float64 priors do not
    promote them), float64 images float64; the two agree to float32 rounding."""
    rm, images, _ = rm_and_images
    fg = compile_model(rm.model, image=images[0])
    lo = infer(fg, "sum", schedule=schedule, image=images[:8].astype(jnp.float32))
    hi = infer(fg, "sum", schedule=schedule, image=images[:8].astype(jnp.float64))
    assert lo.log_z.dtype == jnp.float32 and hi.log_z.dtype == jnp.float64
    assert lo.log_marginals["c"].dtype == jnp.float32
    # |log Z| ~ 30: float32 keeps ~7 digits of it.
    np.testing.assert_allclose(lo.log_z, hi.log_z, rtol=1e-5)
    np.testing.assert_allclose(
        np.exp(lo.log_marginals["c"]), np.exp(hi.log_marginals["c"]), atol=1e-4
    )


def _gated_factor(gate=None, kind=None):
    """``f`` is finite at gate 0 (compile time) and NaN (kind 0) or +inf (kind 1)
    at gate 1: ``log(gate - 1)`` is -inf there, ``0 * -inf`` is NaN."""
    z = numpyro.sample("z", dist.Bernoulli(0.4))
    numpyro.factor("fine", jnp.where(z == 1, 0.5, 0.0))
    bad = jnp.where(kind > 0, -jnp.log1p(-gate), jnp.log1p(-gate) * 0.0)
    numpyro.factor("f", jnp.where(z == 1, jnp.where(gate > 0, bad, 0.0), 0.0))


@pytest.mark.parametrize(
    ("bad", "message"), [(0.0, r"log Z is NaN"), (1.0, r"log Z is \+inf")]
)
@pytest.mark.parametrize("schedule", ["tree", "exact"])
def test_non_finite_tables_at_infer_time_name_the_site(bad, message, schedule):
    fg = compile_model(_gated_factor, gate=jnp.asarray(0.0), kind=jnp.asarray(bad))
    # Batched: the message names the first bad batch index and the site there.
    gates = jnp.asarray([0.0, 1.0, 0.0])
    with pytest.raises(
        ValueError, match=message + r" at batch index \(1,\).*\(site\(s\) \['f'\]\)"
    ):
        infer(fg, schedule=schedule, gate=gates, kind=jnp.asarray(bad))
    with pytest.raises(ValueError, match=message + r".*\(site\(s\) \['f'\]\)"):
        infer(fg, schedule=schedule, gate=jnp.asarray(1.0), kind=jnp.asarray(bad))


def _thresholded(x=None):
    """The evidence enters only through ``x > 0``: a NaN ``x`` leaves every table
    (and log Z) finite, so only a check of the values themselves can catch it."""
    z = numpyro.sample("z", dist.Bernoulli(0.3))
    numpyro.factor("f", jnp.where(x > 0, 1.0, -1.0) * z)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("schedule", ["tree", "exact", "loopy", "naive"])
def test_non_finite_evidence_is_refused_on_every_path(bad, schedule):
    fg = compile_model(_thresholded, x=jnp.asarray(1.0))
    sched = fg.schedule("tree") if schedule == "naive" else schedule
    good = jnp.asarray([1.0, -2.0, 3.0])
    assert np.all(np.isfinite(infer(fg, schedule=sched, x=good).log_z))
    for x in (good.at[1].set(bad), jnp.asarray(bad)):  # batched and single
        with pytest.raises(ValueError, match=r"evidence 'x' contains NaN or inf"):
            infer(fg, schedule=sched, x=x)
    with pytest.raises(ValueError, match="evidence 'x' is complex"):
        infer(fg, schedule=sched, x=good.astype(jnp.complex64))


def test_host_split_by_runs_equals_a_split_site_by_site():
    """Past HOST_SPLIT_SITES sites the per-site arrays are cut on the host a run
    of alike sites at a time: the same arrays (type, dtype, shape, values) as
    cutting each site from the flat results by its own offset, batched or not,
    with Bernoulli (float support), Categorical and plated sites."""
    import numpyro
    import numpyro.distributions as dist

    from pgm_drm.inference import api

    def model():
        xs = [
            numpyro.sample(f"b{i}", dist.Bernoulli(0.3 + 0.005 * i)) for i in range(40)
        ]
        ys = [
            numpyro.sample(f"c{i}", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))
            for i in range(30)
        ]
        for i in range(39):
            numpyro.factor(f"f{i}", jnp.where(xs[i] == xs[i + 1], 0.5, -0.2))
        numpyro.factor("g", jnp.where(ys[0] == xs[0], 0.3, 0.0))
        with numpyro.plate("p", 3):
            numpyro.sample("z", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))

    fg = compile_model(model)
    assert len(fg.variable_groups) > api.HOST_SPLIT_SITES
    rng = np.random.default_rng(0)
    n, kmax = sum(g.size for g in fg.variable_groups), 3
    for lead in [(), (2,)]:
        margs = rng.normal(size=lead + (n, kmax))
        idx = rng.integers(0, 2, size=lead + (n,)).astype(np.int32)
        got_m, got_map = api._host_posterior(fg, margs, idx, lead, True)
        b = (slice(None),) * len(lead)
        for g in fg.variable_groups:
            sl = slice(g.offset, g.offset + g.size)
            want_m = margs[(*b, sl, slice(0, g.cardinality))].reshape(
                lead + g.plate_shape + (g.cardinality,)
            )
            sup = np.asarray(g.support)
            want_map = sup[idx[(*b, sl)]].reshape(lead + g.plate_shape)
            for got, want in [(got_m[g.site], want_m), (got_map[g.site], want_map)]:
                assert type(got) is np.ndarray and got.dtype == want.dtype
                assert got.shape == want.shape
                np.testing.assert_array_equal(got, want)


def test_site_layout_shares_a_support_only_between_equal_values_of_equal_types():
    """Sites with the same support share one array; supports that are equal as
    tuples but not in type ((0, 1), (0.0, 1.0), (False, True)) keep their own
    dtype, and a support that does not hash is read on its own."""
    from types import SimpleNamespace

    from pgm_drm.graph import VariableGroup
    from pgm_drm.inference import api

    supports = [(0, 1), (0.0, 1.0), (False, True), (0, 1), (0.0, 1.0), (0, 1, 2)]
    groups = [VariableGroup(f"s{i}", (), s, i) for i, s in enumerate(supports)]
    groups.append(VariableGroup("u", (), ([0], [1]), len(groups)))  # unhashable
    fg = SimpleNamespace(_cache={}, variable_groups=tuple(groups))
    layout = api._site_layout(fg)
    for g, (site, off, size, card, shape, sup, ident) in zip(
        groups, layout, strict=True
    ):
        want = np.asarray(g.support)
        assert (site, off, size, card, shape) == (g.site, g.offset, 1, len(want), ())
        assert sup.dtype == want.dtype
        np.testing.assert_array_equal(sup, want)
        assert ident == (
            want.dtype.kind in "iu" and want.tolist() == list(range(len(want)))
        )
    assert layout[0][5] is layout[3][5] and layout[1][5] is layout[4][5]
    assert layout[0][5] is not layout[1][5]


# --------------------------------------------------------------------------- #
# New evidence is checked as compile_model checked the compile-time values
# (each case returned finite, wrong answers before; found by a review).
# --------------------------------------------------------------------------- #


def _support_model(h=None, x=None):
    z = numpyro.sample("z", dist.DiscreteUniform(0, h))
    numpyro.sample("x", dist.Normal(z * 1.0, 1.0), obs=x)


def test_evidence_that_sets_a_support_cannot_change_it():
    fg = compile_model(_support_model, h=jnp.array(2), x=jnp.array(3.0))
    # The same value (alone or as a batch) is fine, and exact.
    for h, x in [(jnp.array(2), jnp.array(0.5)), (jnp.array([2, 2]), jnp.array(0.5))]:
        post = infer(fg, "sum", h=h, x=x)
        ref = brute_force(_support_model, h=jnp.array(2), x=x)
        # float64, three states: round-off.
        np.testing.assert_allclose(post.log_z, ref.log_z, rtol=1e-12)
    for h in (jnp.array(4), jnp.array(1), jnp.array([2, 4])):
        with pytest.raises(ValueError, match="'h' sets the support of latent site"):
            infer(fg, "sum", h=h)


def _param_model(pz=None, pk=None, x=None, c=None):
    z = numpyro.sample("z", dist.Categorical(pz))
    numpyro.sample("x", dist.Normal(z * 1.0, 1.0), obs=x)
    numpyro.sample("c", dist.Categorical(pk[z]), obs=c)


_GOOD = {
    "pz": jnp.array([0.2, 0.3, 0.5]),
    "pk": jnp.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]),
    "x": jnp.array(0.5),
    "c": jnp.array(1),
}


@pytest.mark.parametrize("schedule", ["tree", "exact", Schedule])
def test_parameters_given_as_evidence_are_checked_at_infer(schedule):
    fg = compile_model(_param_model, **_GOOD)
    sched = fg.schedule("auto") if schedule is Schedule else schedule
    # The compile-time values passed the checks there: nothing to run again.
    infer(fg, "sum", schedule=sched, pz=_GOOD["pz"], x=jnp.array(0.1))
    assert not any(k[0] == "evidence_checks" for k in fg._cache if isinstance(k, tuple))
    new = {"pz": jnp.array([0.5, 0.25, 0.25]), "pk": jnp.array([[0.5, 0.5]] * 3)}
    post = infer(fg, "sum", schedule=sched, **new)
    ref = brute_force(_param_model, **{**_GOOD, **new})
    np.testing.assert_allclose(post.log_z, ref.log_z, rtol=1e-12)  # float64
    with pytest.raises(ValueError, match="'z'.*summing to 1.8.*evidence given"):
        infer(fg, "sum", schedule=sched, pz=jnp.array([0.5, 0.6, 0.7]))
    batch = jnp.stack([_GOOD["pz"], jnp.array([0.2, 0.3, 0.4])])  # row 1: 0.9
    with pytest.raises(ValueError, match="'z'.*summing to 0.9"):
        infer(fg, "sum", schedule=sched, pz=batch)
    bad_pk = jnp.array([[0.2, 0.3], [0.6, 0.4], [0.5, 0.5]])  # row 0: 0.5
    with pytest.raises(ValueError, match=r"'c': parameter 'probs'.*\(pk\)"):
        infer(fg, "sum", schedule=sched, pk=bad_pk)


def test_integer_evidence_in_another_dtype_is_converted_or_refused_by_name():
    # Found by a review: an int64, uint8 or float index for a graph compiled
    # with int32 evidence failed inside JAX ("lax.eq requires the same dtypes").
    def model(k=None):
        z = numpyro.sample("z", dist.Categorical(jnp.array([0.25, 0.25, 0.5])))
        probs = jnp.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])[z]
        numpyro.sample("k", dist.Categorical(probs), obs=k)

    fg = compile_model(model, k=jnp.array(1, jnp.int32))
    want = infer(fg, "sum", k=jnp.array(0, jnp.int32))
    for k in (np.array(0, np.int64), np.array(0, np.uint8), jnp.array(0.0)):
        for schedule in ("auto", fg.schedule("auto")):
            got = infer(fg, "sum", schedule=schedule, k=k)
            np.testing.assert_allclose(got.log_z, want.log_z, rtol=1e-12)  # float64
    for k in (jnp.array(0.5), np.array(2**40, np.int64)):
        with pytest.raises(ValueError, match="'k' is .*cannot hold its values"):
            infer(fg, "sum", k=k)


@pytest.mark.parametrize("grouped", [False, True])
def test_a_loops_transition_tables_given_as_evidence_are_checked(grouped, monkeypatch):
    # A chain written as a loop, its transitions a keyword array: new ones are
    # checked site by site (stacked, when the data part runs group by group).
    import pgm_drm.graph.compile as compile_mod

    if grouped:
        monkeypatch.setattr(compile_mod, "GROUP_EQNS", 0)
    n, k = 10, 2
    rng = np.random.default_rng(0)

    def model(trans=None):
        x = numpyro.sample("x_0", dist.Categorical(jnp.ones(k) / k))
        for i in range(1, n):
            x = numpyro.sample(f"x_{i}", dist.Categorical(trans[i - 1][x]))

    fg = compile_model(model, trans=jnp.asarray(rng.dirichlet(np.ones(k), (n - 1, k))))
    new = jnp.asarray(rng.dirichlet(np.ones(k), (n - 1, k)))
    got = infer(fg, "max", trans=new)
    ref = brute_force(model, semiring="max", trans=new)
    np.testing.assert_allclose(got.log_z, ref.log_z, rtol=1e-12)  # float64
    bad = new.at[6, 1].multiply(1.01)  # site x_7's row for x_6 = 1
    with pytest.raises(ValueError, match=r"'x_7'.*\{'x_6': 1\}.*evidence given"):
        infer(fg, "max", trans=bad)
    with pytest.raises(ValueError, match=r"'x_7'.*evidence given"):
        infer(fg, "max", trans=jnp.stack([new, bad]))


def test_infer_under_grad_gives_the_gradient_and_refuses_bad_evidence():
    """``jax.grad`` through ``infer``: the gradient of log Z equals the closed
    form's, and NaN or probability-zero evidence is still refused, by a
    ``ValueError`` that says which of the two (the entries and sites can only be
    named outside the transform)."""
    prior = jnp.asarray([0.4, 0.6])

    def model(x=None):
        z = numpyro.sample("z", dist.Categorical(prior))
        numpyro.sample("x", dist.Normal(1.0 * z, 1.0), obs=x)
        numpyro.factor("f", jnp.where(x > 1.5, -jnp.inf, 0.0))

    fg = compile_model(model, x=jnp.asarray(0.3))
    grad = jax.grad(lambda x: infer(fg, "sum", x=x).log_z)

    def closed(x):  # log sum_z p(z) N(x; z, 1)
        return jax.scipy.special.logsumexp(
            jnp.log(prior) + dist.Normal(jnp.arange(2.0), 1.0).log_prob(x)
        )

    # float32 (the test's default): a few ulps of a derivative of size ~0.5.
    np.testing.assert_allclose(grad(jnp.asarray(0.3)), jax.grad(closed)(0.3), atol=1e-5)
    with pytest.raises(ValueError, match="NaN or inf"):
        grad(jnp.asarray(jnp.nan))
    with pytest.raises(ValueError, match="probability zero"):
        grad(jnp.asarray(5.0))


def test_infer_under_grad_refuses_nan_evidence_that_log_z_ignores():
    """A site whose log-prob does not read its value (``Uniform``: a constant
    density) leaves log Z free of the evidence, so under ``jax.grad`` log Z is
    not a tracer; NaN evidence is still refused by name, not by a JAX error."""

    def model(x=None):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray([0.4, 0.6])))
        numpyro.sample("x", dist.Uniform(0.0 + z, 2.0 + z), obs=x)

    fg = compile_model(model, x=jnp.asarray(1.5))
    grad = jax.grad(lambda x: infer(fg, "sum", x=x).log_z)
    with pytest.raises(ValueError, match="NaN or inf"):
        grad(jnp.asarray(jnp.nan))


def _support_brute_force(prior, make, x) -> float:
    """log sum_z p(z) p(x | z), with p(x | z) = 0 outside the support of
    ``make(z)``: the model's density, which NumPyro's log_prob does not check."""
    terms = []
    for (z,) in itertools.product(range(len(prior))):
        d = make(z)
        inside = bool(d.support(jnp.asarray(x)))
        terms.append(np.log(prior[z]) + (float(d.log_prob(x)) if inside else -np.inf))
    return float(np.logaddexp.reduce(terms))


@pytest.mark.parametrize(
    "make, values, outside",
    [
        # The support moves with z: x = 0.5 cannot come from z = 1.
        (lambda z: dist.Uniform(0.0 + z, 1.0 + z), [0.5, 1.5], 5.0),
        (lambda z: dist.Exponential(1.0 + 2.0 * z), [0.5, 2.0], -1.0),
        (lambda z: dist.Beta(2.0 + z, 2.0), [0.3, 0.9], 1.5),
        (lambda z: dist.Gamma(2.0, 1.0 + z), [0.5], -0.5),
    ],
)
def test_evidence_outside_a_support_scores_minus_inf(make, values, outside):
    """An observed value outside its distribution's support has density zero in
    that state (NumPyro's formula would score it anyway), and evidence outside
    every state's support is refused as probability zero, not scored."""
    prior = np.asarray([0.4, 0.6])

    def model(x=None):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(prior)))
        numpyro.sample("x", make(z), obs=x)

    fg = compile_model(model, x=jnp.asarray(values[0]))
    for x in values:
        got = float(infer(fg, "sum", x=jnp.asarray(x)).log_z)
        # float32 (the test's default): a few ulps of numbers of size ~1.
        np.testing.assert_allclose(got, _support_brute_force(prior, make, x), atol=1e-5)
        ref = brute_force(model, x=jnp.asarray(x))
        np.testing.assert_allclose(got, float(ref.log_z), atol=1e-5)
    with pytest.raises(
        ValueError, match=r"probability zero.*site\(s\) \['x'\].*support"
    ):
        infer(fg, "sum", x=jnp.asarray(outside))


@pytest.mark.parametrize("how", ["method", "handler", "to_event"])
def test_masked_out_placeholders_outside_the_support_are_not_refused(how):
    """Missing data filled with a placeholder outside the support (-1 for a
    count) and masked out is scored 0 there, as NumPyro scores it, by the
    compiled tables and by brute_force (found by a review: the support test read
    the base distribution's support and ignored the mask)."""
    prior = np.asarray([0.3, 0.7])
    rate = jnp.asarray([1.0, 4.0])
    keep = np.asarray([True, False, True])

    def model(x=None):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(prior)))
        if how == "to_event":
            d = dist.Poisson(rate[z] * jnp.ones(3)).mask(jnp.asarray(keep))
            numpyro.sample("x", d.to_event(1), obs=x)
            return
        with numpyro.plate("n", 3):
            if how == "method":
                numpyro.sample(
                    "x", dist.Poisson(rate[z]).mask(jnp.asarray(keep)), obs=x
                )
            else:
                with numpyro.handlers.mask(mask=jnp.asarray(keep)):
                    numpyro.sample("x", dist.Poisson(rate[z]), obs=x)

    x = jnp.asarray([2.0, -1.0, 3.0])
    fg = compile_model(model, x=jnp.asarray([2.0, 1.0, 3.0]))
    with numpyro.validation_enabled(False):
        lp = [float(dist.Poisson(rate[z]).log_prob(x)[keep].sum()) for z in (0, 1)]
    want = np.logaddexp.reduce(np.log(prior) + np.asarray(lp))
    # float32 (the test's default): a few ulps of numbers of size ~4.
    np.testing.assert_allclose(float(infer(fg, "sum", x=x).log_z), want, atol=1e-5)
    np.testing.assert_allclose(float(brute_force(model, x=x).log_z), want, atol=1e-5)
    with pytest.raises(ValueError, match="probability zero"):  # kept entry: refused
        infer(fg, "sum", x=jnp.asarray([-1.0, 1.0, 3.0]))


@pytest.mark.parametrize("schedule", ["auto", "naive"])
def test_infer_inside_jit_or_vmap_says_what_to_use_instead(schedule):
    """infer reads a status flag on the host, which a jit or vmap trace cannot:
    a TypeError that points to a batch or to log_partition, not JAX's tracer
    conversion error; log_partition does that job under both transforms."""

    def model(x=None):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray([0.4, 0.6])))
        numpyro.sample("x", dist.Normal(1.0 * z, 1.0), obs=x)

    fg = compile_model(model, x=jnp.asarray(0.3))
    sched = fg.schedule("tree") if schedule == "naive" else schedule
    xs = jnp.asarray([0.1, 0.2])
    with pytest.raises(TypeError, match="log_partition"):
        jax.vmap(lambda x: infer(fg, "sum", x=x, schedule=sched).log_z)(xs)
    with pytest.raises(TypeError, match="leading batch axis"):
        jax.jit(lambda x: infer(fg, "sum", x=x, schedule=sched).log_z)(xs[0])
    lp = log_partition(fg)
    np.testing.assert_allclose(  # float32: the same program's rounding
        jax.jit(jax.vmap(lambda x: lp({"x": x})))(xs),
        infer(fg, "sum", x=xs).log_z,
        atol=1e-6,
    )


@given(seed=st.integers(0, 10_000))
def test_random_supports_that_move_with_the_latents_equal_brute_force(seed):
    """Random Uniform(low[z], high[z]) and Exponential observations in a plate,
    whose supports depend on the latent: log Z and the posterior of ``z`` equal
    an itertools sum over ``z`` that scores each value -inf outside its
    support; when no ``z`` can explain the data, infer refuses it by name."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 5))
    prior = rng.dirichlet(np.ones(k))
    low = rng.normal(size=k)
    high = low + rng.uniform(0.2, 2.0, size=k)
    shift = rng.normal(size=k)  # Exponential on [shift[z], inf): a moved support
    rate = rng.uniform(0.5, 2.0, size=k)
    x = rng.uniform(low.min() - 0.3, high.max() + 0.3, size=3)
    y = rng.uniform(shift.min() - 0.3, shift.max() + 2.0, size=2)

    lo, hi, sh, ra = (jnp.asarray(a) for a in (low, high, shift, rate))

    def model(x=None, y=None):
        z = numpyro.sample("z", dist.Categorical(jnp.asarray(prior)))
        with numpyro.plate("n", 3):
            numpyro.sample("x", dist.Uniform(lo[z], hi[z]), obs=x)
        with numpyro.plate("m", 2):
            numpyro.sample("u", dist.Exponential(ra[z]), obs=y - sh[z])

    terms = []
    for (z,) in itertools.product(range(k)):
        inside = np.all((x >= low[z]) & (x <= high[z])) and np.all(y - shift[z] > 0)
        lp = -3 * np.log(high[z] - low[z])
        lp += np.sum(np.log(rate[z]) - rate[z] * (y - shift[z]))
        terms.append(np.log(prior[z]) + (lp if inside else -np.inf))
    want = np.logaddexp.reduce(terms)
    fg = compile_model(model, x=jnp.asarray(x), y=jnp.asarray(y))
    if not np.isfinite(want):
        with pytest.raises(ValueError, match="probability zero"):
            infer(fg, "sum", x=jnp.asarray(x), y=jnp.asarray(y))
        return
    post = infer(fg, "sum", x=jnp.asarray(x), y=jnp.asarray(y))
    # float32 (the test's default): a few ulps of numbers of size ~10.
    np.testing.assert_allclose(float(post.log_z), want, atol=1e-4)
    np.testing.assert_allclose(
        np.exp(post.log_marginals["z"]), np.exp(np.asarray(terms) - want), atol=1e-5
    )


def _noisy_chain(x=None, n=70):
    """A loop-written chain of ``n`` binary sites, each seen through a Normal:
    more than ``HOST_SPLIT_SITES`` sites, so the posterior is split on the host."""
    z = numpyro.sample("z0", dist.Bernoulli(0.4))
    numpyro.sample("x0", dist.Normal(1.0 * z, 1.0), obs=x[..., 0])
    for i in range(1, n):
        z = numpyro.sample(f"z{i}", dist.Bernoulli(jnp.where(z == 1, 0.8, 0.3)))
        numpyro.sample(f"x{i}", dist.Normal(1.0 * z, 1.0), obs=x[..., i])


def _counting_full_path(monkeypatch):
    """Count the calls that take ``infer``'s full path (``api._infer``)."""
    from pgm_drm.inference import api

    calls = []
    full = api._infer

    def counted(*args, **kwargs):
        calls.append(1)
        return full(*args, **kwargs)

    monkeypatch.setattr(api, "_infer", counted)
    return calls, full


def _assert_same_posterior(a, b):
    assert (a.temperature, a.schedule) == (b.temperature, b.schedule)
    assert sorted(a.log_marginals) == sorted(b.log_marginals)
    assert sorted(a.map) == sorted(b.map)
    # The same compiled program on the same inputs: equal to the bit.
    np.testing.assert_array_equal(a.log_z, b.log_z)
    for k in a.log_marginals:
        np.testing.assert_array_equal(a.log_marginals[k], b.log_marginals[k])
    for k in a.map:
        np.testing.assert_array_equal(a.map[k], b.map[k])
    assert (a.deltas is None) == (b.deltas is None)
    if a.deltas is not None:
        np.testing.assert_array_equal(a.deltas, b.deltas)


@pytest.mark.parametrize(
    "case",
    ["rm", "rm one image", "host split", "loopy", "tempered, some marginals"],
)
def test_a_repeat_call_takes_the_short_path_and_gives_the_same_posterior(
    case, rm_and_images, monkeypatch
):
    """A call like an earlier one (evidence names, shapes, dtypes, options)
    skips the host checks that cannot fail again: the same program, the same
    status read, the same Posterior as the full path."""

    if case.startswith("rm"):
        rm, images, _ = rm_and_images
        fg = compile_model(rm.model, image=images[0])
        first, second = (
            (images[0], images[1])
            if case == "rm one image"
            else (
                images[:5],
                images[5:10],
            )
        )
        name, opts = "image", {"semiring": "max"}
    else:
        rng = np.random.default_rng(0)
        fg = compile_model(_noisy_chain, x=jnp.asarray(rng.normal(size=70)))
        first = jnp.asarray(rng.normal(size=(3, 70)))
        second = jnp.asarray(rng.normal(size=(3, 70)))
        name = "x"
        opts = {
            "host split": {"semiring": "sum"},
            "loopy": {"schedule": "loopy"},
            "tempered, some marginals": {"temperature": 0.5, "marginals": ["z3"]},
        }[case]
    calls, full_path = _counting_full_path(monkeypatch)
    infer(fg, **opts, **{name: first})
    assert len(calls) == 1
    short = infer(fg, **opts, **{name: second})
    assert len(calls) == 1  # served by the repeat entry
    full = full_path(
        fg,
        opts.get("semiring", "sum"),
        opts.get("temperature"),
        opts.get("schedule", "auto"),
        True,
        opts.get("marginals", True),
        {name: second},
    )
    _assert_same_posterior(short, full)
    # Another shape, dtype or option is another call: the full path again.
    infer(fg, **opts, **{name: second[None] if case == "rm one image" else second[:1]})
    infer(fg, **opts, map=False, **{name: second})
    infer(fg, **opts, **{name: second.astype(jnp.float32)})
    assert len(calls) == 4


def test_a_repeat_call_still_refuses_bad_evidence(monkeypatch):
    """A repeat call that finds NaN evidence or probability zero hands over to
    the full path, which names the problem (and the batch index)."""

    def model(x=None):
        z = numpyro.sample("z", dist.Bernoulli(0.5))
        numpyro.sample("x", dist.Bernoulli(jnp.where(z == 1, 0.9, 0.0)), obs=x)

    fg = compile_model(model, x=jnp.array(1.0))
    calls, _ = _counting_full_path(monkeypatch)
    infer(fg, x=jnp.array([1.0, 1.0, 1.0]))
    infer(fg, x=jnp.array([0.0, 1.0, 1.0]))
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"evidence 'x' contains NaN or inf"):
        infer(fg, x=jnp.array([1.0, jnp.nan, 1.0]))
    # x = 0.5 has probability zero under both states.
    with pytest.raises(ValueError, match=r"probability zero.*batch index \(2,\)"):
        infer(fg, x=jnp.array([1.0, 1.0, 0.5]))
    assert len(calls) == 3
    # Under jax.jit the evidence is a tracer: the full path, and its TypeError;
    # closed over (concrete), the repeat entry's program is traced, its status
    # cannot be read, and the full path says the same.
    xs = jnp.array([1.0, 0.0, 1.0])
    with pytest.raises(TypeError, match="leading batch axis"):
        jax.jit(lambda: infer(fg, x=xs).log_z)()


def test_a_repeat_key_tells_apart_options_that_compare_equal(monkeypatch):
    """0.5 and 0.5 + 0j, 0.0 and -0.0 are equal keys in a dict: the repeat
    entry of one must not serve the other (found by a review)."""
    fg = compile_model(_thresholded, x=jnp.asarray(1.0))
    x = jnp.asarray([1.0, -2.0])
    infer(fg, temperature=0.5, x=x)
    with pytest.raises(TypeError):  # as a first call with it raises
        infer(fg, temperature=0.5 + 0j, x=x)
    infer(fg, temperature=0.0, x=x)
    post = infer(fg, temperature=-0.0, x=x)
    assert math.copysign(1.0, post.temperature) == -1.0


@pytest.mark.parametrize("schedule", ["tree", "exact", "loopy", "naive"])
def test_non_finite_bfloat16_evidence_is_refused(schedule):
    """numpy does not count bfloat16 as a float: NaN bfloat16 evidence, flagged
    by the program, was let through by the host check that names it (found by
    a review). It is refused by name, on a repeat call too."""
    fg = compile_model(_thresholded, x=jnp.asarray(1.0, jnp.bfloat16))
    sched = fg.schedule("tree") if schedule == "naive" else schedule
    good = jnp.asarray([1.0, -2.0], jnp.bfloat16)
    infer(fg, schedule=sched, x=good)
    infer(fg, schedule=sched, x=good)
    for bad in (jnp.nan, jnp.inf):
        with pytest.raises(ValueError, match=r"evidence 'x' contains NaN or inf"):
            infer(fg, schedule=sched, x=good.at[1].set(bad))


def test_evidence_the_graphs_checks_read_never_takes_the_short_path(monkeypatch):
    """Evidence that sets a latent's probabilities is checked on every call
    (``FactorGraph.check_new_evidence``): no repeat entry for it."""
    fg = compile_model(_param_model, **_GOOD)
    assert fg.checks_new_evidence(["pz"]) and fg.checks_new_evidence(["pk"])
    assert not fg.checks_new_evidence(["x", "c"])
    calls, _ = _counting_full_path(monkeypatch)
    infer(fg, "sum", pz=_GOOD["pz"])
    with pytest.raises(ValueError, match="'z'.*summing to 1.8"):
        infer(fg, "sum", pz=jnp.array([0.5, 0.6, 0.7]))
    assert len(calls) == 2
    assert not any(k[0] == "repeat" for k in fg._cache if isinstance(k, tuple))
    # Evidence no check reads does get one.
    infer(fg, "sum", x=jnp.array(0.3))
    infer(fg, "sum", x=jnp.array(0.7))
    assert len(calls) == 3


def _x64_model(x=None, k=None):
    z = numpyro.sample("z", dist.Bernoulli(0.3))
    w = numpyro.sample("w", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))
    numpyro.sample("x", dist.Normal(1.0 * z + 0.5 * w, 1.0), obs=x)
    probs = jnp.array([[0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])[w]
    numpyro.sample("k", dist.Categorical(probs), obs=k)


@pytest.mark.parametrize("compiled_x64", [True, False])
def test_a_graph_used_in_the_other_x64_mode_is_refused_by_name(compiled_x64):
    """A graph compiled with x64 on, then used with it off (or the other way),
    failed deep in lax on some schedules and evidence ("lax.ge requires
    arguments to have the same dtypes") and ran on others. Every entry point is
    refused by name, a repeat call included; compiled again, it runs."""
    with jax.enable_x64(compiled_x64):
        fg = compile_model(_x64_model, x=jnp.array(0.5), k=jnp.array(1))
        ev = {"x": jnp.array([0.1, 0.2]), "k": jnp.array([1, 0])}
        want = infer(fg, **ev)
        infer(fg, **ev)  # a repeat entry is registered
    match = f"compiled with jax_enable_x64 {'on' if compiled_x64 else 'off'}"
    with jax.enable_x64(not compiled_x64):
        ev = {"x": jnp.array([0.1, 0.2]), "k": jnp.array([1, 0])}
        for schedule in ("auto", "tree", "exact", "loopy"):
            for kw in ({}, ev, {"k": ev["k"]}):
                with pytest.raises(ValueError, match=match):
                    infer(fg, schedule=schedule, **kw)
        with pytest.raises(ValueError, match=match):
            log_partition(fg)({"x": jnp.array(0.1)})
        with pytest.raises(ValueError, match=match):
            fg.tables(k=jnp.array(1))
        again = compile_model(_x64_model, x=jnp.array(0.5), k=jnp.array(1))
        got = infer(again, **ev)
    # float32 against float64 on a log Z of about -2: 1e-6 relative.
    np.testing.assert_allclose(got.log_z, want.log_z, rtol=1e-6)


@pytest.mark.parametrize("x64", [True, False])
@given(
    offset=st.floats(-1e4, 1e4),
    scale=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_a_normal_mixture_far_from_zero_is_exact(x64, offset, scale, seed):
    """Data near the means and far from 0 against the scale (found by a review):
    an event-free Normal site was scored in natural form, ``x mu / s^2 -
    mu^2 / (2 s^2)``, whose terms (5e7 at x = 1000, s = 0.1) cancel; float32
    rounding of ~4 nats moved a posterior by 0.24, and x64 lost 1 nat at
    x = 1e6, s = 0.01. It is now scored as numpyro scores it."""
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(3))
    mu = offset + scale * rng.normal(size=3) * 2
    x = offset + scale * rng.normal(size=5) * 2
    dtype = np.float64 if x64 else np.float32
    with jax.enable_x64(x64):

        def model(x=None):
            z = numpyro.sample("z", dist.Categorical(jnp.asarray(w, dtype)))
            numpyro.sample("x", dist.Normal(jnp.asarray(mu, dtype)[z], scale), obs=x)

        fg = compile_model(model, x=jnp.asarray(x[0], dtype))
        post = infer(fg, "sum", x=jnp.asarray(x, dtype))
    # The reference in float64 from the same (rounded) numbers the model holds.
    xr, mur = x.astype(dtype).astype(float), mu.astype(dtype).astype(float)
    sr = float(np.asarray(scale, dtype))
    zs = (xr[:, None] - mur[None, :]) / sr
    lp = (
        np.log(w.astype(dtype).astype(float))
        - 0.5 * zs**2
        - np.log(np.sqrt(2 * np.pi) * sr)
    )
    ref = np.logaddexp.reduce(lp, axis=1)
    # Each term is rounded relative to its own size, (x - mu)^2 / s^2 <= ~100
    # here: a few ulps of that (2.2e-16 or 1.2e-7) plus one of the prior's log.
    eps = np.finfo(dtype).eps
    tol = 16 * eps * (1.0 + float(np.max(zs**2)))
    np.testing.assert_allclose(post.log_z, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(
        post.marginals["z"], np.exp(lp - ref[:, None]), rtol=0, atol=tol
    )


def _constant_kwarg_model(x=None):
    z = numpyro.sample("z", dist.Categorical(jnp.array([0.2, 0.5, 0.3])))
    mu, sd = jnp.array([-1.0, 0.5, 2.0]), jnp.array([0.3, 1.0, 2.5])
    numpyro.sample("x", dist.Normal(mu[z], sd[z]), obs=x)


@pytest.mark.parametrize("given", [0.4, np.float64(0.4)])
def test_a_keyword_compiled_as_a_constant_refuses_another_value(given):
    """Found by a review: a keyword compiled as a Python or NumPy scalar is part
    of the graph; a new value for it was accepted and ignored (the posterior of
    x = 0.4 returned for x = 2, a batch of values given the batch shape but
    not the values). Every entry point refuses it by name; the same value, or
    the keyword compiled as an array, works."""
    fg = compile_model(_constant_kwarg_model, x=given)
    assert fg.evidence_names == ()
    match = "'x' was compiled as a constant"
    for call in (
        lambda: infer(fg, "sum", x=2.0),
        lambda: infer(fg, "sum", x=jnp.array([1.0, 2.0])),
        lambda: infer(fg, "max", schedule="loopy", x=2.0),
        lambda: log_partition(fg)({"x": 2.0}),
        lambda: fg.tables(x=2.0),
        lambda: fg.evidence_tables(x=jnp.array(2.0)),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="unknown evidence 'y'"):
        fg.tables(y=1.0)
    same = infer(fg, "sum", x=given)
    ref = brute_force(_constant_kwarg_model, x=0.4)
    np.testing.assert_allclose(same.log_z, ref.log_z, rtol=1e-12)  # float64
    live = compile_model(_constant_kwarg_model, x=jnp.asarray(0.4))
    got = infer(live, "sum", x=jnp.asarray(2.0))
    want = brute_force(_constant_kwarg_model, x=2.0)
    np.testing.assert_allclose(got.log_z, want.log_z, rtol=1e-12)  # float64
