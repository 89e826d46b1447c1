"""The flat kernel against its naive twin, brute force, NumPyro and numpy twins.

Tolerances: float64 throughout (conftest). The flat and the per-message kernels,
brute force and NumPyro's enumeration sum the same few dozen log-terms in other
orders and with other max-shifts, so they agree to ~1e-12; 1e-8 (and the
suite's 1e-6 where ``assert_posteriors_close`` is used) leaves room for
logsumexp's rescaling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.graph.plan import UNROLL_STEPS, scanned_twin
from pgm_drm.inference import brute_force, enumerate_exact, flat, infer, run_flat_plan
from pgm_drm.inference.flat import flat_inputs
from pgm_drm.testing import (
    assert_posteriors_close,
    chain_loop_model,
    ising_grid,
    ising_loop_model,
    numpy_forward_backward,
    numpy_loopy_ising,
    random_factor_model,
    random_plated_tree_model,
)

ATOL = 1e-8


@given(
    seed=st.integers(0, 100_000),
    kind=st.sampled_from(["chain", "tree"]),
    t=st.sampled_from([0.0, 1.0, 0.4]),
    hard=st.booleans(),
)
def test_flat_tree_equals_naive_twin(seed, kind, t, hard):
    # Brute force and NumPyro check the same "tree" path in test_exactness.py.
    model, kwargs = random_factor_model(seed, n_vars=5, kind=kind, hard_zeros=hard)
    fg = compile_model(model, **kwargs)
    flat = infer(fg, temperature=t, schedule="tree")
    naive = infer(fg, temperature=t, schedule=fg.schedule("tree"))
    assert_posteriors_close(flat, naive, ATOL, model, kwargs)
    if t == 0.0:
        # Backtracking visits the same tree: the same joint MAP, not just as good.
        for site in naive.map:
            assert int(flat.map[site]) == int(naive.map[site])


@given(
    seed=st.integers(0, 100_000),
    t=st.sampled_from([0.0, 1.0, 0.4]),
    hard=st.booleans(),
    batch=st.booleans(),
)
def test_flat_junction_tree_equals_naive_twin(seed, t, hard, batch):
    # Loopy random networks (pairwise factors on extra edges, -inf entries with
    # `hard`); brute force and NumPyro check the same "exact" path in
    # test_exactness.py.
    model, kwargs = random_factor_model(seed, n_vars=6, kind="loopy", hard_zeros=hard)
    fg = compile_model(model, **kwargs)
    assert fg.plan("exact").kind == "exact"
    flat = infer(fg, temperature=t, schedule="exact")
    naive = infer(fg, temperature=t, schedule=fg.schedule("exact"))
    assert_posteriors_close(flat, naive, ATOL, model, kwargs)
    if t == 0.0:
        # Both backtrack the same clusters (rooted differently): the same joint
        # MAP unless two joint states tie exactly, which random tables do not.
        for site in naive.map:
            np.testing.assert_array_equal(flat.map[site], naive.map[site])
    if batch:  # the compiled evidence twice, vmapped: each row is the one run
        two = infer(
            fg,
            temperature=t,
            schedule="exact",
            **{k: jnp.stack([v, v]) for k, v in kwargs.items()},
        )
        for row in range(2):
            np.testing.assert_allclose(two.log_z[row], flat.log_z, atol=ATOL)
            for site, m in flat.log_marginals.items():
                np.testing.assert_allclose(two.log_marginals[site][row], m, atol=ATOL)
            for site, v in flat.map.items():
                np.testing.assert_array_equal(two.map[site][row], v)


def _global_and_plates(n_i: int, n_j: int):
    # A global latent, a plate of children, each with a plate of grandchildren
    # that also read the global: loops through the global, a junction tree of
    # (g, a_i) hubs with (g, a_i, b_ij) leaves.
    def model(y=None):
        g = numpyro.sample("g", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))
        with numpyro.plate("i", n_i, dim=-2):
            a = numpyro.sample("a", dist.Bernoulli(jnp.where(g == 1, 0.3, 0.6)))
            with numpyro.plate("j", n_j, dim=-1):
                b = numpyro.sample("b", dist.Bernoulli(jnp.where(a == g % 2, 0.2, 0.7)))
                numpyro.sample("y", dist.Normal(b + a + g, 1.0), obs=y)

    return model, jnp.linspace(-1.0, 3.0, n_i * n_j).reshape(n_i, n_j)


def test_junction_plan_is_batched_by_depth_whatever_the_plate_sizes():
    shapes = []
    for n_i, n_j in [(3, 2), (6, 5)]:
        model, y = _global_and_plates(n_i, n_j)
        fg = compile_model(model, y=y)
        assert not fg.is_tree()
        jt = fg.plan("exact").junction
        shapes.append([len(step) for step in jt.steps])
        if n_i == 3:  # max-sum: the joint MAP too (sum: test_exactness.py)
            post = infer(fg, "max", y=y)
            assert post.schedule == "exact"
            ref = brute_force(model, semiring="max", y=y)
            assert_posteriors_close(post, ref, 1e-8, model, {"y": y})
    # The same depths and batches of edges (one op each) at 6 and 30 leaves.
    assert shapes[0] == shapes[1]
    assert len(shapes[0]) <= 3


@given(
    seed=st.integers(0, 100_000),
    kind=st.sampled_from(["tree", "loopy"]),
    t=st.sampled_from([0.0, 1.0, 0.4]),
    n_sites=st.integers(1, 3),
    hard=st.booleans(),
)
def test_marginals_of_some_sites_equal_those_of_all(seed, kind, t, n_sites, hard):
    """``marginals=[sites]``: those sites' marginals, equal to the full run's
    (float64: the root read and the downward pass differ in rounding only, 1e-10);
    the other sites are absent, log Z and the MAP unchanged."""
    model, kwargs = random_factor_model(seed, n_vars=5, kind=kind, hard_zeros=hard)
    fg = compile_model(model, **kwargs)
    full = infer(fg, temperature=t, **kwargs)
    rng = np.random.default_rng(seed)
    sites = list(rng.choice(fg.latent_sites, size=n_sites, replace=False))
    some = infer(fg, temperature=t, marginals=sites, **kwargs)
    assert sorted(some.log_marginals) == sorted(sites)
    for site in sites:
        np.testing.assert_allclose(
            some.log_marginals[site], full.log_marginals[site], atol=1e-10
        )
    np.testing.assert_allclose(some.log_z, full.log_z, atol=1e-10)
    for site, v in full.map.items():
        np.testing.assert_array_equal(some.map[site], v)


def test_root_marginals_skip_the_downward_pass():
    """Asked only for root variables (a tree's root; a junction tree's root
    cluster), the kernel runs the upward pass alone: a smaller program, the
    same rows, and NaN in the rows not asked for."""
    for kind, schedule in [("tree", "tree"), ("loopy", "exact")]:
        model, kwargs = random_factor_model(7, n_vars=6, kind=kind)
        fg = compile_model(model, **kwargs)
        plan = fg.plan(schedule)
        inputs = flat_inputs(plan, fg.group_tables(), fg.factor_groups)
        roots = [int(v) for v in flat._readable_at_roots(plan)]
        assert 0 < len(roots) < plan.n_vars

        def size(marg, plan=plan, inputs=inputs):
            return len(
                jax.make_jaxpr(lambda i: run_flat_plan(plan, i, 1.0, False, marg))(
                    inputs
                ).eqns
            )

        assert size(roots) < size(True)
        got = run_flat_plan(plan, inputs, 1.0, False, roots).log_marginals
        want = run_flat_plan(plan, inputs, 1.0, False).log_marginals
        r = np.asarray(roots)
        np.testing.assert_allclose(got[r], want[r], atol=1e-10)
        others = np.setdiff1d(np.arange(plan.n_vars), roots)
        assert np.all(np.isnan(np.asarray(got)[others]))


def test_a_drm_class_posterior_needs_no_downward_pass():
    """The DRM's class sits in the junction tree's root cluster: ``marginals="c"``
    reads it from the upward pass, equal to the DCN-form pass's class posterior
    (float32 rounding of O(100) log scores: 1e-4)."""
    from pgm_drm.models import DeepRenderingModel

    with jax.enable_x64(False):
        drm = DeepRenderingModel.random(
            jax.random.PRNGKey(0), image_shape=(8, 8), levels=3
        )
        images, _ = drm.sample(jax.random.PRNGKey(1), 3)
        fg = compile_model(drm.model, image=images[0])
        plan = fg.plan("exact")
        c = next(g for g in fg.variable_groups if g.site == "c")
        ids = np.arange(c.offset, c.offset + c.size)
        assert np.isin(ids, flat._readable_at_roots(plan)).all()
        post = infer(fg, "sum", marginals="c", image=images)
        ref = drm.infer(images, "sum")
    assert list(post.log_marginals) == ["c"]
    np.testing.assert_allclose(
        post.log_marginals["c"], ref.class_log_posterior, atol=1e-4
    )


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_drm_keyed_leaves_every_marginal_equals_the_dense_kernel(t):
    """A DRM's leaf clusters ``(c, g3, g2, a2, g1, a1)`` are keyed over their
    separator ``(c, g3, g2, a2)`` with two axes left, ``(g1, a1)``, whose
    marginals both read the leaf's blocks (written out once): every marginal
    and the MAP of a batch equal the same plan run densely (flat.KEYED_LEAVES
    off). float64, the same terms summed in another order: 1e-9."""
    from pgm_drm.inference.api import _table_keys
    from pgm_drm.models import DeepRenderingModel

    drm = DeepRenderingModel.random(jax.random.PRNGKey(2), image_shape=(8, 8), levels=3)
    images, _ = drm.sample(jax.random.PRNGKey(3), 3)
    runs = {}
    for on in (True, False):
        flat.KEYED_LEAVES = on
        try:
            fg = compile_model(drm.model, image=images[0])
            if on:
                plan = fg.plan("exact")
                keyed = flat._keyed_plan(
                    plan, _table_keys(fg, plan, {"image": images[0]})
                )
                assert keyed is not None and keyed.edges
                assert any(len(ke.e_shape) > 1 for ke in keyed.edges.values())
            runs[on] = infer(fg, temperature=t, image=images)
        finally:
            flat.KEYED_LEAVES = True
    got, want = runs[True], runs[False]
    np.testing.assert_allclose(got.log_z, want.log_z, rtol=1e-12, atol=1e-9)
    assert list(got.log_marginals) == list(want.log_marginals)
    for site in want.log_marginals:
        np.testing.assert_allclose(
            got.log_marginals[site], want.log_marginals[site], atol=1e-9
        )
    for site in want.map:
        np.testing.assert_array_equal(got.map[site], want.map[site])


def _keyed_model(seed: int, hard: bool, side: bool = False):
    """A global ``g``, hubs ``a_i | g`` and leaves ``b_ij | a_i, g`` observed
    through ``y_ij``. The leaves' tables depend on ``(g, a)`` through two
    patterns of two values each, so a leaf cluster ``(g, a_i, b_ij)`` has at
    most 4 distinct blocks over its 12 separator states ``(g, a_i)``.
    ``hard``: a hard zero in the conditional of ``b``, and a factor on
    ``(g, a_i, b_ij)`` ruling out ``(g, a_i) = (0, 0)``: whole blocks of a
    leaf reduce to ``-inf``. ``side``: each hub also has a small child
    ``c_i | a_i`` (reduced whole, not keyed), whose downward message leaves one
    message out of a cluster that also holds the keyed leaves' messages."""
    rng = np.random.default_rng(seed)
    n_i, n_j = 2, int(rng.integers(2, 4))  # brute force: at most 26,244 states
    rows = rng.dirichlet(np.ones(3), size=2)
    if hard:
        rows[0, 1] = 0.0
        rows[0] /= rows[0].sum()
    cpt = jnp.asarray(rows[rng.integers(0, 2, size=(4, 3))])  # (g, a) -> b
    base = rng.integers(0, 4, size=(2, 3)).astype(float)
    mu = jnp.asarray(base[rng.integers(0, 2, size=(4, 3))])  # (g, a, b)
    prior_a = jnp.asarray(rng.dirichlet(np.ones(3), size=4))
    u = jnp.asarray(rng.normal(size=3))

    def model(y=None):
        g = numpyro.sample("g", dist.Categorical(jnp.array([0.1, 0.2, 0.3, 0.4])))
        with numpyro.plate("i", n_i, dim=-2):
            a = numpyro.sample("a", dist.Categorical(prior_a[g]))
            if side:
                numpyro.sample("c", dist.Categorical(prior_a[a + 1]))
            with numpyro.plate("j", n_j, dim=-1):
                b = numpyro.sample("b", dist.Categorical(cpt[g, a]))
                numpyro.factor("u", u[b])  # a unary term on the leaf's own axis
                if hard:  # (g, a_i) = (0, 0) ruled out at every b: -inf blocks
                    off = (g == 0) & (a == 0) & (b >= 0)
                    numpyro.factor("z", jnp.where(off, -jnp.inf, 0.0))
                numpyro.sample("y", dist.Normal(mu[g, a, b], 1.0), obs=y)

    y = jnp.asarray(rng.normal(size=(n_i, n_j)) + 1.0)
    return model, {"y": y}


@given(
    seed=st.integers(0, 100_000),
    t=st.sampled_from([0.0, 0.4, 1.0]),
    hard=st.booleans(),
)
def test_keyed_leaves_equal_the_dense_kernel_and_brute_force(seed, t, hard):
    """Leaf messages from keyed tables (flat._KeyedEdge) against the same plan
    run densely (flat.KEYED_LEAVES off) and brute force: log Z, the marginals
    read at the roots, every marginal (the keyed leaves' from their blocks,
    flat._keyed_marginals) and the joint MAP (float64; both kernels sum the
    same terms, so 1e-8)."""
    from pgm_drm.inference.api import _table_keys

    model, kwargs = _keyed_model(seed, hard)
    fg = compile_model(model, **kwargs)
    plan = fg.plan("exact")
    keyed = flat._keyed_plan(plan, _table_keys(fg, plan, kwargs))
    assert keyed is not None and keyed.edges  # the leaves are keyed
    at_roots = set(flat._readable_at_roots(plan).tolist())
    sites = [
        g.site
        for g in fg.variable_groups
        if set(range(g.offset, g.offset + g.size)) <= at_roots
    ]
    ref = brute_force(model, temperature=t, **kwargs)
    # At the roots alone (no downward pass), then every marginal.
    for marginals in (sites or False, True):
        runs = {}
        for on in (True, False):
            flat.KEYED_LEAVES = on
            try:
                fg_on = compile_model(model, **kwargs)
                runs[on] = infer(fg_on, temperature=t, marginals=marginals)
            finally:
                flat.KEYED_LEAVES = True
        got, want = runs[True], runs[False]
        np.testing.assert_allclose(got.log_z, want.log_z, atol=ATOL)
        assert list(got.log_marginals) == list(want.log_marginals)
        for site in want.log_marginals:
            np.testing.assert_allclose(
                got.log_marginals[site], want.log_marginals[site], atol=ATOL
            )
            np.testing.assert_allclose(
                got.log_marginals[site], ref.log_marginals[site], atol=1e-6
            )
        np.testing.assert_allclose(got.log_z, ref.log_z, atol=1e-6)
        if t == 0.0:  # the same joint MAP (random means and tables do not tie)
            for site in want.map:
                np.testing.assert_array_equal(got.map[site], want.map[site])
                np.testing.assert_array_equal(got.map[site], ref.map[site])


@pytest.mark.parametrize("seed", [3, 11])
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_keyed_leaves_beside_a_child_that_gets_a_message(seed, t):
    """A hub cluster holds its keyed leaves' messages (some ``-inf``: hard
    zeros) and sends a downward message to a child that is not keyed: that
    message leaves the child's own out of the rest, keyed ones included (they
    are summed uncounted, never taken back out). Every marginal, log Z and the
    MAP against brute force (float64: 1e-6, as above)."""
    model, kwargs = _keyed_model(seed, hard=True, side=True)
    fg = compile_model(model, **kwargs)
    plan = fg.plan("exact")
    from pgm_drm.inference.api import _table_keys

    assert flat._keyed_plan(plan, _table_keys(fg, plan, kwargs)).edges
    got = infer(fg, temperature=t)
    ref = brute_force(model, temperature=t, **kwargs)
    np.testing.assert_allclose(got.log_z, ref.log_z, atol=1e-6)
    for site in ref.log_marginals:
        np.testing.assert_allclose(
            got.log_marginals[site], ref.log_marginals[site], atol=1e-6
        )
    if t == 0.0:
        for site in ref.map:
            np.testing.assert_array_equal(got.map[site], ref.map[site])


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_keyed_messages_by_gather_equal_those_by_selects(monkeypatch, t):
    """Past ``KEYED_SELECTS`` blocks a keyed leaf picks each separator state's
    value by one gather instead of a chain of selects: the same numbers."""
    model, kwargs = _keyed_model(7, hard=True)
    runs = []
    for selects in (flat.KEYED_SELECTS, 0):
        monkeypatch.setattr(flat, "KEYED_SELECTS", selects)
        fg = compile_model(model, **kwargs)
        runs.append(infer(fg, temperature=t))
    (a, b), ref = runs, brute_force(model, temperature=t, **kwargs)
    np.testing.assert_allclose(a.log_z, b.log_z, atol=ATOL)
    np.testing.assert_allclose(b.log_z, ref.log_z, atol=1e-6)
    for site in ref.log_marginals:
        np.testing.assert_allclose(
            a.log_marginals[site], b.log_marginals[site], atol=ATOL
        )
        np.testing.assert_array_equal(a.map[site], b.map[site])


@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("level", [0.0, 1e2, 1e4, 1e5])
def test_belief_reduction_is_shifted_at_any_level(t, level):
    """A belief far from 0 (its level is only its first entry removed) reduced
    for a marginal in float32: as precise as shifting it by its max first,
    against the same float32 numbers in float64 (2e-6: a few float32 ulps of
    O(10) shifted log terms; reducing at the level lost ~1e-3 at 1e4)."""
    rng = np.random.default_rng(0)
    x = (level + 3.0 * rng.normal(size=(50, 16, 2))).astype(np.float32)
    x[3] = -np.inf  # an all -inf row stays -inf
    x[4, :, 1] = -np.inf
    tt = None if t == 0.0 else jnp.float32(t)
    got = np.asarray(flat._reduce_shifted(jnp.asarray(x), (1,), tt), np.float64)
    x64 = x.astype(np.float64)
    m = np.max(x64, axis=(1, 2), keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    y = x64 - m
    if t == 0.0:
        want = np.max(y, axis=1)
    else:
        with np.errstate(divide="ignore"):
            want = t * np.log(np.sum(np.exp(y / t), axis=1))
    assert np.all(np.isneginf(got[3]))
    np.testing.assert_allclose(got, want, atol=2e-6)


def test_marginals_of_some_sites_on_a_model_split_on_the_host():
    """Past ``HOST_SPLIT_SITES`` sites the per-site arrays are cut on the host;
    only the rows asked for leave the program, and they are the full run's
    (float64 rounding: 1e-10)."""
    from pgm_drm.inference.api import HOST_SPLIT_SITES

    model, _ = chain_loop_model(HOST_SPLIT_SITES + 6, k=3)
    fg = compile_model(model)
    sites = [fg.latent_sites[-1], fg.latent_sites[2], fg.latent_sites[40]]
    full = infer(fg, "sum", schedule="tree")
    some = infer(fg, "sum", schedule="tree", marginals=sites)
    assert sorted(some.log_marginals) == sorted(sites)
    for site in sites:
        np.testing.assert_allclose(
            some.log_marginals[site], full.log_marginals[site], atol=1e-10
        )


def test_marginals_argument_forms():
    """A name, a list with repeats, ``None`` (= False) and bools."""
    model, kwargs = random_factor_model(1, n_vars=3)
    fg = compile_model(model, **kwargs)
    site = fg.latent_sites[0]
    assert list(infer(fg, marginals=site, **kwargs).log_marginals) == [site]
    assert list(infer(fg, marginals=[site, site], **kwargs).log_marginals) == [site]
    assert infer(fg, marginals=None, **kwargs).log_marginals == {}
    assert infer(fg, marginals=[], **kwargs).log_marginals == {}
    assert sorted(infer(fg, marginals=True, **kwargs).log_marginals) == sorted(
        fg.latent_sites
    )


def test_marginals_of_an_unknown_site_are_refused():
    model, kwargs = random_factor_model(0, n_vars=3)
    fg = compile_model(model, **kwargs)
    with pytest.raises(ValueError, match="no latent site named \\['nope'\\]"):
        infer(fg, marginals=["nope"], **kwargs)
    with pytest.raises(ValueError, match="variable ids must be in"):
        run_flat_plan(
            fg.plan("tree"),
            flat_inputs(fg.plan("tree"), fg.group_tables(), fg.factor_groups),
            1.0,
            False,
            [99],
        )


def test_junction_rows_are_laid_out_for_slices():
    """Clusters are numbered breadth-first within each class, so every step's
    child rows are a run (a slice in the kernel, not a gather) and its parent
    rows are sorted; pair tables and home variables are listed by row."""
    model, y = _global_and_plates(6, 5)
    jt = compile_model(model, y=y).plan("exact").junction
    for step in jt.steps:
        for e in step:
            assert flat._run_of(e.child_rows) == (int(e.child_rows[0]), 1)
            assert np.all(np.diff(e.parent_rows) >= 0)
    for *_, rows in jt.moves:
        assert np.all(np.diff(rows) > 0)
    for _, _, _, rows, _ in jt.home:
        assert np.all(np.diff(rows) > 0)


def test_junction_roots_are_a_run_whatever_the_declaration_order():
    """Disjoint loops whose factors are declared in the reverse order of their
    clusters: the root rows of the one cluster class stay sorted (a slice, not a
    gather), and the results stay exact."""
    from numpyro.ops.indexing import Vindex

    rng = np.random.default_rng(0)
    pair = [jnp.asarray(rng.normal(size=(2, 2))) for _ in range(12)]

    def model():
        xs = [
            numpyro.sample(f"x{i}", dist.Bernoulli(0.3 + 0.04 * i)) for i in range(12)
        ]
        e = 0
        for c in reversed(range(4)):
            a, b, d = 3 * c, 3 * c + 1, 3 * c + 2
            for i, j in [(a, b), (b, d), (a, d)]:
                numpyro.factor(f"f{e}", Vindex(pair[e])[xs[i], xs[j]])
                e += 1

    fg = compile_model(model)
    for _, rows in fg.plan("exact").junction.roots:
        assert np.all(np.diff(rows) > 0), rows
    for semiring in ("sum", "max"):
        assert_posteriors_close(
            infer(fg, semiring, schedule="exact"),
            brute_force(model, semiring=semiring),
            ATOL,
            model,
            {},
        )


@given(rows=st.lists(st.integers(0, 9), min_size=1, max_size=12))
def test_take_of_static_rows_equals_a_gather(rows):
    """The kernel's row selection (slice for runs, else gather) equals ``x[rows]``."""
    x = jnp.arange(10 * 3, dtype=jnp.float32).reshape(10, 3)
    r = np.asarray(rows, np.int32)
    np.testing.assert_array_equal(flat._take(x, r), x[r])
    for start, stride, n in [(2, 3, 3), (0, 1, 10), (9, 1, 1), (1, 2, 5)]:
        r = np.arange(start, start + stride * n, stride, dtype=np.int32)
        assert flat._run_of(r) == (start, stride if n > 1 else 1)
        np.testing.assert_array_equal(flat._take(x, r), x[r])


@given(
    seed=st.integers(0, 100_000),
    n=st.integers(1, 14),
    kind=st.sampled_from(["runs", "permuted", "scattered", "overlap"]),
)
def test_rows_of_pieces_equals_a_chain_of_set_rows(seed, n, kind):
    """Pieces set at static rows: one concatenate where every piece is a run
    (in order or permuted, with gaps left as they were), else the chain of
    placements it stands for; batched (vmap) too. Exact: only copies."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(
        rng.choice(
            np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))), replace=False
        )
    )
    blocks = [b for b in np.split(np.arange(n), cuts) if rng.random() < 0.8 or n == 1]
    pieces_rows = []
    for b in blocks:
        if kind == "permuted":
            b = rng.permutation(b)
        pieces_rows.append(b.astype(np.int32))
    if kind == "scattered" and n > 2:
        pieces_rows.append(np.array([0, n - 1], np.int32))
        pieces_rows = [np.setdiff1d(r, [0, n - 1]) for r in pieces_rows[:-1]] + [
            pieces_rows[-1]
        ]
    if kind == "overlap" and pieces_rows:
        pieces_rows.append(pieces_rows[0][:1])  # set again, later: the later one wins
    rng.shuffle(pieces_rows)
    acc = jnp.asarray(rng.normal(size=(n, 3)))
    xs = [jnp.asarray(rng.normal(size=(len(r), 3))) for r in pieces_rows]

    def chain(acc, xs):
        for r, x in zip(pieces_rows, xs, strict=True):
            acc = flat._set_rows(acc, r, x)
        return acc

    def joined(acc, xs):
        return flat._rows_of_pieces(acc, list(zip(pieces_rows, xs, strict=True)))

    np.testing.assert_array_equal(joined(acc, xs), chain(acc, xs))
    batch = (jnp.stack([acc, acc + 1.0]), [jnp.stack([x, -x]) for x in xs])
    np.testing.assert_array_equal(jax.vmap(joined)(*batch), jax.vmap(chain)(*batch))


@given(
    k=st.sampled_from([1, 3, flat.ARGMAX_SPLIT, 100]),
    seed=st.integers(0, 10_000),
    levels=st.integers(1, 4),
)
def test_argmax_last_is_the_first_maximum(k, seed, levels):
    """The kernel's argmax (two reductions from ARGMAX_SPLIT states on) equals
    ``jnp.argmax``: the first of tied maxima, 0 on an all ``-inf`` row, the
    first NaN on a row with NaN."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, levels, size=(7, 3, k)).astype(np.float32)  # many ties
    x[rng.random(x.shape) < 0.3] = -np.inf
    x[0, 0] = -np.inf
    x[1, 1, rng.integers(0, k, size=2)] = np.nan  # argmax: the first NaN
    got = jax.jit(flat._argmax_last)(jnp.asarray(x))
    np.testing.assert_array_equal(got, np.argmax(x, axis=-1))


@given(
    rows=st.one_of(
        st.lists(st.integers(0, 9), min_size=1, max_size=10, unique=True),
        st.tuples(st.integers(0, 9), st.integers(1, 4), st.integers(1, 5)).map(
            lambda t: [r for r in range(t[0], 10, t[1])][: t[2]]
        ),
    )
)
def test_rows_placed_added_and_set_equal_scatters(rows):
    """Rows placed into zeros (an interior pad for runs, else a gather), added
    to and set in an accumulator equal NumPy's scatters, -inf entries kept, and
    a run is placed without a gather."""
    r = np.asarray(rows, np.int32)
    rng = np.random.default_rng(len(rows))
    x = rng.normal(size=(len(r), 2, 3)).astype(np.float32)
    x[0, 0, 0] = -np.inf
    acc = rng.normal(size=(10, 2, 3)).astype(np.float32)
    want = np.zeros_like(acc)
    want[r] = x
    np.testing.assert_array_equal(flat._placed(jnp.asarray(x), r, 10), want)
    added = acc.copy()
    added[r] += x
    np.testing.assert_array_equal(flat._add_rows(jnp.asarray(acc), r, x), added)
    put = acc.copy()
    put[r] = x
    np.testing.assert_array_equal(flat._set_rows(jnp.asarray(acc), r, x), put)
    if flat._run_of(r) is not None:
        jaxpr = jax.make_jaxpr(lambda x: flat._placed(x, r, 10))(x)
        assert "gather" not in str(jaxpr)


@given(a=st.integers(2, 6), b=st.integers(2, 6), extra=st.integers(0, 2))
def test_take_of_grid_rows_is_a_transpose_equal_to_a_gather(a, b, extra):
    """Rows ``0..ab-1`` read column by column of an ``(a, b)`` grid are taken by
    a reshape and transpose (no gather), from a table with ``extra`` rows
    after them, and equal ``x[rows]``; other orders are not taken for a grid."""
    n = a * b
    x = jnp.arange((n + extra) * 3, dtype=jnp.float32).reshape(n + extra, 3)
    r = np.arange(n).reshape(a, b).T.ravel().astype(np.int32)
    assert flat._transposed_rows(r) == (a, b)
    np.testing.assert_array_equal(flat._take(x, r), x[r])
    jaxpr = jax.make_jaxpr(lambda x: flat._take(x, r))(x)
    assert "gather" not in str(jaxpr)
    assert flat._transposed_rows(r[::-1]) is None
    assert flat._transposed_rows(np.arange(n)) is None
    swapped = r.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    assert flat._transposed_rows(swapped) is None


def test_drm_patch_tables_reach_their_clusters_without_a_gather():
    """Junction-tree siblings are numbered in the order of the factor instances
    they host, so a DRM's patch-likelihood instances land on their clusters'
    rows window by window: a transpose of the plate order, not a gather (the
    gather, with its layout change, was a third of the DRM's kernel time)."""
    from pgm_drm.models import DeepRenderingModel

    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(0), image_shape=(16, 16), levels=3
    )
    images, _ = drm.sample(jax.random.PRNGKey(1), 2)
    fg = compile_model(drm.model, image=images[0])
    jt = fg.plan("exact").junction
    big = max(jt.moves, key=lambda m: int(np.prod(m[3])))
    inst = big[4]
    assert flat._run_of(inst) is not None or flat._transposed_rows(inst) is not None
    for step in jt.steps:
        for e in step:
            assert flat._run_of(e.child_rows) is not None


@given(seed=st.integers(0, 100_000), semiring=st.sampled_from(["sum", "max"]))
def test_plated_tree_is_exact_against_brute_force_and_numpyro(seed, semiring):
    model, kwargs = random_plated_tree_model(seed, size=3)
    fg = compile_model(model, **kwargs)
    assert fg.is_tree()
    # One group per site, whatever the plate size.
    assert [g.site for g in fg.factor_groups] == ["c", "z", "b", "y"]
    post = infer(fg, semiring, schedule="tree")
    assert_posteriors_close(post, brute_force(model, semiring=semiring, **kwargs), 1e-6)
    ref = enumerate_exact(model, semiring=semiring, **kwargs)
    assert_posteriors_close(post, ref, 1e-6, model, kwargs)


def test_batched_evidence_equals_one_by_one():
    model, kwargs = random_plated_tree_model(3, size=4)
    fg = compile_model(model, **kwargs)
    ys = np.random.default_rng(0).normal(size=(5, 4))
    batch = infer(fg, "sum", y=jnp.asarray(ys))
    for i in range(5):
        one = infer(fg, "sum", y=jnp.asarray(ys[i]))
        np.testing.assert_allclose(float(batch.log_z[i]), float(one.log_z), atol=ATOL)
        for site in one.log_marginals:
            np.testing.assert_allclose(
                batch.log_marginals[site][i], one.log_marginals[site], atol=ATOL
            )


@pytest.mark.parametrize("n", [UNROLL_STEPS // 2, 3 * UNROLL_STEPS])
def test_chain_as_a_loop_equals_forward_backward(n):
    # 3 * UNROLL_STEPS sites run the depth steps inside lax.scan (padded arrays);
    # so does the shorter chain, since these are single queries (scanned_twin).
    model, params = chain_loop_model(n, k=4, seed=n)
    fg = compile_model(model)
    plan = fg.plan("tree")
    assert (plan.padded is not None) == (plan.n_steps > UNROLL_STEPS)
    post = infer(fg, "sum")
    log_z, marg = numpy_forward_backward(params)
    np.testing.assert_allclose(float(post.log_z), log_z, atol=ATOL)
    got = np.stack([np.asarray(post.marginals[f"x_{i}"]) for i in range(n)])
    np.testing.assert_allclose(got, marg, atol=ATOL)
    # The MAP of the flat kernel equals the naive twin's (same backtracking).
    flat = infer(fg, "max")
    naive = infer(fg, "max", schedule=fg.schedule("tree"))
    np.testing.assert_allclose(float(flat.log_z), float(naive.log_z), atol=ATOL)
    assert all(int(flat.map[s]) == int(naive.map[s]) for s in naive.map)


def test_more_sites_than_numpyro_has_enumeration_dims():
    # The example: 30 Bernoulli sites in a Python loop (NumPyro: 25 dims).
    rng = np.random.default_rng(0)
    flips = jnp.asarray(rng.uniform(0.1, 0.9, size=(30, 2)))

    def model():
        x = numpyro.sample("x0", dist.Bernoulli(0.5))
        for i in range(1, 30):
            x = numpyro.sample(f"x{i}", dist.Bernoulli(flips[i][x.astype(int)]))

    fg = compile_model(model)
    assert fg.n_variables == 30
    post = infer(fg, "sum")
    # A chain with no evidence: log Z = 0 and x0's marginal is its prior.
    np.testing.assert_allclose(float(post.log_z), 0.0, atol=ATOL)
    np.testing.assert_allclose(post.marginals["x0"], [0.5, 0.5], atol=ATOL)
    # Marginals propagate through the transition tables.
    p = np.array([0.5, 0.5])
    for i in range(1, 30):
        t = np.stack([1 - np.asarray(flips[i]), np.asarray(flips[i])], axis=1)
        p = p @ t
        np.testing.assert_allclose(post.marginals[f"x{i}"], p, atol=ATOL)


def test_one_compile_serves_every_positive_temperature():
    model, kwargs = random_factor_model(5, n_vars=5, kind="tree")
    fg = compile_model(model, **kwargs)
    infer(fg, temperature=0.3, map=False)
    traces = fg.n_traces
    hot = infer(fg, temperature=0.7, map=False)
    assert fg.n_traces == traces
    ref = brute_force(model, temperature=0.7, **kwargs)
    np.testing.assert_allclose(float(hot.log_z), float(ref.log_z), atol=ATOL)


def test_run_flat_plan_on_flat_inputs_equals_infer():
    model, kwargs = random_plated_tree_model(6, size=3)
    fg = compile_model(model, **kwargs)
    plan = fg.plan("tree")
    inputs = flat_inputs(plan, fg.group_tables(), fg.factor_groups)
    out = run_flat_plan(plan, inputs, jnp.asarray(1.0))
    post = infer(fg, "sum")
    # The same kernel on the same tables: identical up to XLA's fusion.
    np.testing.assert_allclose(float(out.log_z), float(post.log_z), atol=1e-12)
    ref = brute_force(model, semiring="sum", **kwargs)
    np.testing.assert_allclose(float(out.log_z), float(ref.log_z), atol=ATOL)


def test_map_false_skips_the_map():
    model, kwargs = random_factor_model(2, n_vars=4, kind="chain")
    fg = compile_model(model, **kwargs)
    with_map = infer(fg, "sum")
    without = infer(fg, "sum", map=False)
    assert without.map == {}
    np.testing.assert_allclose(float(without.log_z), float(with_map.log_z), atol=0)
    only_z = infer(fg, "sum", map=False, marginals=False)
    assert only_z.log_marginals == {} and only_z.map == {}
    # Same upward pass: the same log Z up to XLA's fusion of the reductions.
    np.testing.assert_allclose(float(only_z.log_z), float(with_map.log_z), atol=1e-12)


@pytest.mark.parametrize("kind", ["chain", "tree"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_flat_loopy_on_a_tree_converges_to_exact(kind, damping):
    model, kwargs = random_factor_model(4, n_vars=5, kind=kind)
    fg = compile_model(model, **kwargs)
    for semiring in ("sum", "max"):
        exact = infer(fg, semiring, schedule="tree")
        plan = fg.plan("loopy", damping=damping, max_iters=150)
        loopy = infer(fg, semiring, schedule=plan)
        assert loopy.converged
        for site in exact.log_marginals:
            # BP is exact on a tree once converged (damping 0.5 halves the error
            # each sweep: 150 sweeps are far below 1e-8).
            np.testing.assert_allclose(
                np.exp(loopy.log_marginals[site]),
                np.exp(exact.log_marginals[site]),
                atol=1e-8,
            )
            assert int(loopy.map[site]) == int(exact.map[site])
        if semiring == "sum":  # the Bethe free energy is exact on a tree
            np.testing.assert_allclose(
                float(loopy.log_z), float(exact.log_z), atol=1e-8
            )


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_flat_loopy_equals_its_numpy_twin_on_an_ising_grid(temperature):
    pot = ising_grid(4, seed=1, coupling=1.0)
    fg = compile_model(ising_loop_model(pot))
    plan = fg.plan("loopy", damping=0.5, max_iters=40)
    post = infer(fg, temperature=temperature, schedule=plan)
    ref = numpy_loopy_ising(pot, 40, damping=0.5, temperature=temperature)
    got = np.stack(
        [
            np.stack([np.exp(post.log_marginals[f"x_{i}_{j}"]) for j in range(4)])
            for i in range(4)
        ]
    )
    # Same iterates (same damping, shift and schedule): float64 round-off only.
    np.testing.assert_allclose(got, ref["marginals"], atol=1e-9)
    np.testing.assert_allclose(np.asarray(post.deltas), ref["deltas"], atol=1e-9)


def test_flat_loopy_matches_naive_loopy_at_convergence():
    model, kwargs = random_factor_model(11, n_vars=5, kind="loopy")
    fg = compile_model(model, **kwargs)
    flat = infer(fg, "sum", schedule=fg.plan("loopy", damping=0.5, max_iters=300))
    naive = infer(fg, "sum", schedule=fg.schedule("loopy", damping=0.5, max_iters=300))
    assert flat.converged and naive.converged
    # Both schedules flood the same Bethe cluster graph: the same fixed point.
    for site in flat.log_marginals:
        np.testing.assert_allclose(
            np.exp(flat.log_marginals[site]),
            np.exp(naive.log_marginals[site]),
            atol=1e-6,
        )
    np.testing.assert_allclose(float(flat.log_z), float(naive.log_z), atol=1e-6)


def _hmm(x=None):
    """An HMM over the entries of ``x``: a narrow tree plan (one factor per step)."""
    pi = jnp.array([0.6, 0.3, 0.1])
    trans = jnp.array([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.1, 0.3, 0.6]])
    mu = jnp.array([-1.0, 0.2, 1.5])
    z = numpyro.sample("z0", dist.Categorical(pi))
    numpyro.sample("x0", dist.Normal(mu[z], 0.8), obs=x[0])
    for t in range(1, x.shape[0]):
        z = numpyro.sample(f"z{t}", dist.Categorical(trans[z]))
        numpyro.sample(f"x{t}", dist.Normal(mu[z], 0.8), obs=x[t])


@pytest.mark.parametrize("semiring", ["sum", "max"])
def test_single_queries_scan_narrow_plans_and_agree_with_batched_unrolled(semiring):
    """A single query runs a narrow plan's steps in lax.scan (its scanned twin);
    a batch runs them unrolled. Both are the same exact computation: each row of
    the batch equals the single query of that row (marginals, log Z, MAP)."""
    xs = np.random.default_rng(3).normal(size=(3, 11))
    fg = compile_model(_hmm, x=jnp.asarray(xs[0]))
    plan = fg.plan("tree")
    twin = scanned_twin(plan)
    assert plan.padded is None and twin is not None and twin.padded is not None
    assert twin.steps is plan.steps and twin.pair_scope is plan.pair_scope
    batch = infer(fg, semiring, x=jnp.asarray(xs))
    assert plan.padded is None  # the plan itself is unchanged
    for i in range(len(xs)):
        one = infer(fg, semiring, x=jnp.asarray(xs[i]))
        np.testing.assert_allclose(float(batch.log_z[i]), float(one.log_z), atol=ATOL)
        for site in one.log_marginals:
            np.testing.assert_allclose(
                batch.log_marginals[site][i], one.log_marginals[site], atol=ATOL
            )
        if semiring == "max":
            assert all(int(batch.map[s][i]) == int(one.map[s]) for s in one.map)
    # The single queries ran the twin: its compiled program is in the cache.
    assert fg._cache[("scanned", id(plan))][1] is not None


def test_scanned_twin_only_for_narrow_unrolled_tree_plans():
    probs = jnp.asarray([0.2, 0.3, 0.5])
    trans = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(3), size=3))

    def wide():  # ten factor instances per step
        r = numpyro.sample("r", dist.Categorical(probs))
        for i in range(10):
            a = numpyro.sample(f"a{i}", dist.Categorical(trans[r]))
            b = numpyro.sample(f"b{i}", dist.Categorical(trans[a]))
            numpyro.sample(f"c{i}", dist.Categorical(trans[b]))

    plan = compile_model(wide).plan("tree")
    assert plan.n_steps == 3 and scanned_twin(plan) is None
    for n, scans in [(3, False), (4, True), (3 * UNROLL_STEPS, False)]:
        chain, _ = chain_loop_model(n, k=3, seed=0)
        plan = compile_model(chain).plan("tree")
        # Past UNROLL_STEPS the plan itself scans: it needs no twin.
        assert (scanned_twin(plan) is not None) == scans, n


def _switch_model(
    rng, n_c: int, n_g: int, n_a: int, hard: bool, family: str = "normal"
):
    """A Rendering Model with a switch: ``x ~ F(eta = on[a] * w[c, g])`` over 4
    pixels (``F``: Normal with scale 0.6, Bernoulli logits, Poisson log rate),
    whose OFF states (``on[a] = 0``, ``a`` even) render nothing; ``hard``: some
    prior probabilities of ``g`` and ``a`` are zero."""
    w = jnp.asarray(rng.normal(size=(n_c, n_g, 4)) * 2.0)
    on = jnp.asarray((np.arange(n_a) % 2).astype(float))
    pc, pg, pa = (rng.dirichlet(np.ones(k)) for k in (n_c, n_g, n_a))
    if hard:
        pg[0] = 0.0  # a nuisance that never occurs
        pa[rng.integers(n_a)] = 0.0  # a switch state (ON or OFF) that never does
    pc, pg, pa = (jnp.asarray(p / p.sum()) for p in (pc, pg, pa))

    def model(x=None):
        c = numpyro.sample("c", dist.Categorical(pc))
        g = numpyro.sample("g", dist.Categorical(pg))
        a = numpyro.sample("a", dist.Categorical(pa))
        eta = on[a][..., None] * w[c, g]
        if family == "normal":
            fn = dist.Normal(eta, 0.6)
        elif family == "bernoulli":
            fn = dist.Bernoulli(logits=eta)
        else:
            fn = dist.Poisson(jnp.exp(eta))
        numpyro.sample("x", fn.to_event(1), obs=x)

    return model


def _free_used(fg) -> bool:
    return any(
        isinstance(k, tuple) and k[0] == "free" and v[1] is not None
        for k, v in fg._cache.items()
    )


@given(
    seed=st.integers(0, 100_000),
    t=st.sampled_from([0.0, 1.0, 0.5]),
    hard=st.booleans(),
    family=st.sampled_from(["normal", "bernoulli", "poisson"]),
)
def test_evidence_free_slices_reduced_once_equal_brute_force(seed, t, hard, family):
    # The switch's OFF slices are reduced once (FreeSlices), the ON ones per
    # image; log Z, every marginal and the MAP against itertools brute force.
    rng = np.random.default_rng(seed)
    n_c, n_g, n_a = 2 + seed % 3, 2 + seed % 2, 2 + seed % 2
    model = _switch_model(rng, n_c, n_g, n_a, hard, family)
    if family == "normal":
        xs = jnp.asarray(rng.normal(size=(3, 4)) * 2.0)
    elif family == "bernoulli":
        xs = jnp.asarray(rng.integers(0, 2, size=(3, 4)).astype(float))
    else:
        xs = jnp.asarray(rng.poisson(2.0, size=(3, 4)).astype(float))
    fg = compile_model(model, x=xs[0])
    got = infer(fg, temperature=t, x=xs)
    assert _free_used(fg)
    semiring = "max" if t == 0.0 else "sum"
    for i in range(3):
        exp = brute_force(model, semiring=semiring, temperature=t or None, x=xs[i])
        one = got._replace(
            log_z=got.log_z[i],
            log_marginals={k: v[i] for k, v in got.log_marginals.items()},
            map={k: v[i] for k, v in got.map.items()},
        )
        assert_posteriors_close(one, exp, ATOL, model, {"x": xs[i]})


def test_evidence_free_slices_equal_the_whole_reduction():
    # The same plan and inputs with and without the split: every output equal.
    rng = np.random.default_rng(3)
    model = _switch_model(rng, 3, 4, 3, hard=True)
    xs = jnp.asarray(rng.normal(size=(5, 4)))
    fg = compile_model(model, x=xs[0])
    infer(fg, "sum", x=xs)
    assert _free_used(fg)
    plan = fg.plan("tree")
    (free,) = [v[1] for k, v in fg._cache.items() if k[0] == "free"]
    fs = [f for f in free if f is not None]
    assert len(fs) == 1 and fs[0].dead == (0, 2) and fs[0].live == (1,)
    # OFF slices that hold more than zeros (some -inf), in the inputs and in
    # the FreeSlices' values alike: the split reads those values for them.
    (k,) = [k for k, f in enumerate(free) if f is not None]
    extra = rng.normal(size=fs[0].values.shape)
    extra[rng.random(extra.shape) < 0.3] = -np.inf
    extra[:, :, :, 1] = 0.0  # the ON state's slice (evidence) left as it is
    free = list(free)
    free[k] = fs[0]._replace(values=fs[0].values + extra)
    for i in range(5):
        tables, offset = fg.evidence_blocks(x=xs[i])
        inputs = flat.add_dynamic(
            plan,
            flat.static_inputs(plan, fg.host_tables(), fg.factor_groups),
            tables,
            fg.factor_groups,
        )
        tabs = list(inputs.tables)
        tabs[k] = tabs[k] + extra
        inputs = inputs._replace(tables=tuple(tabs))
        for temp in (None, 1.0, 0.3):
            a = run_flat_plan(plan, inputs, temp, True, True, None, free)
            b = run_flat_plan(plan, inputs, temp, True, True, None, None)
            np.testing.assert_allclose(float(a.log_z), float(b.log_z), atol=1e-10)
            np.testing.assert_allclose(a.log_marginals, b.log_marginals, atol=1e-10)
            np.testing.assert_array_equal(a.map_index, b.map_index)


def test_free_slices_pick_the_axis_with_the_most_free_states():
    dep = np.ones((2, 3, 4, 2), bool)
    dep[:, :, [0, 3], :] = False  # axis 1: states 0 and 3 free in both instances
    dep[0, :, :, 0] = False  # axis 2: state 0 free in instance 0 only
    vals = np.arange(dep.size, dtype=float).reshape(dep.shape)
    fs = flat.free_slices(dep, vals)
    assert (fs.axis, fs.live, fs.dead) == (1, (1, 2), (0, 3))
    assert flat.free_slices(np.ones((2, 3, 4), bool), vals[..., 0]) is None
    assert flat.free_slices(np.zeros((2, 3, 4), bool), vals[..., 0]) is None


def test_free_slices_follow_the_evidence_each_call_passes():
    # A site held at its compile-time value in one call (its evidence not
    # given) has free tables there; a later call that gives it must not reuse
    # them (found in review: wrong log Z from the second call).
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(3, 4)) * 2)
    v = jnp.asarray(rng.normal(size=(3, 3, 4)) * 2)
    on = jnp.asarray([0.0, 1.0, 0.0])

    def model(x=None, y=None):
        c = numpyro.sample("c", dist.Categorical(jnp.array([0.3, 0.3, 0.4])))
        a = numpyro.sample("a", dist.Categorical(jnp.array([0.2, 0.5, 0.3])))
        g = numpyro.sample("g", dist.Categorical(jnp.array([0.6, 0.1, 0.3])))
        b = numpyro.sample("b", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))
        mean = on[a][..., None] * w[c]
        numpyro.sample("x", dist.Normal(mean, 0.7).to_event(1), obs=x)
        numpyro.sample("y", dist.Normal(v[g, b], 1.0).to_event(1), obs=y)

    xs = jnp.asarray(rng.normal(size=(2, 4)) * 2)
    ys = jnp.asarray(rng.normal(size=(2, 4)) * 2)
    fg = compile_model(model, x=xs[0], y=ys[0])
    for kwargs in ({"x": xs}, {"x": xs, "y": ys}, {"y": ys}):
        got = infer(fg, "sum", **kwargs)
        for i in range(2):
            ev = {"x": xs[0], "y": ys[0]} | {k: a[i] for k, a in kwargs.items()}
            np.testing.assert_allclose(
                float(got.log_z[i]), float(brute_force(model, **ev).log_z), atol=ATOL
            )
