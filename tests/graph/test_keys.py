"""Static equality keys (pgm_drm.graph.keys): sound on every input, and tight
where the structure is in the program.

Soundness is checked on random inputs: every pair of entries that share a key
must hold the same value (compared exactly: keyed entries are computed by the
same operations from the same numbers, so they agree bit for bit).
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.graph.keys import equality_keys, value_keys


def _assert_sound(keys: np.ndarray, values: np.ndarray) -> None:
    """Entries with the same key hold the same value."""
    k, v = np.asarray(keys).reshape(-1), np.asarray(values).reshape(-1)
    first = {}
    for i, key in enumerate(k.tolist()):
        first.setdefault(key, i)
    rep = np.array([first[key] for key in k.tolist()])
    np.testing.assert_array_equal(v, v[rep])


def test_a_product_with_repeated_columns_keys_them_together():
    rng = np.random.default_rng(0)
    cols = rng.normal(size=(6, 3))
    w = cols[:, [0, 1, 0, 2, 1, 0]]  # 3 distinct columns of 6
    bias = np.array([1.0, 2.0, 1.0, 0.0, 2.0, 5.0])

    def f(x):
        return x @ w - bias

    keys = equality_keys(f, jax.ShapeDtypeStruct((4, 6), jnp.float64))
    assert keys.shape == (4, 6)
    # Column 5 shares column 0's template but not its bias.
    assert [len(np.unique(keys[i])) for i in range(4)] == [4] * 4
    assert len(np.unique(keys)) == 16  # rows of x are free: nothing across rows
    for _ in range(3):
        x = rng.normal(size=(4, 6))
        _assert_sound(keys, f(x))


def test_data_movement_reductions_and_concatenation_move_the_keys():
    rng = np.random.default_rng(1)
    const = np.array([0.0, 1.0, 0.0, 1.0])

    def f(x):
        y = jnp.broadcast_to(x[:, None], (3, 4)) * const  # (3, 4): columns 0, 2 zero
        z = jnp.concatenate([y, y[::-1]], axis=0).T  # (4, 6)
        return jnp.sum(z, axis=1), jnp.max(z.reshape(2, 12), axis=0), z

    got = equality_keys(f, jax.ShapeDtypeStruct((3,), jnp.float64))
    sums, maxes, z = got
    assert sums[0] == sums[2] and sums[1] == sums[3] and sums[0] != sums[1]
    for _ in range(3):
        x = rng.normal(size=3)
        for k, v in zip(got, f(x), strict=True):
            _assert_sound(k, v)


def test_equations_not_understood_claim_nothing():
    def f(x):
        y = jnp.concatenate([x, x])
        return jnp.cumsum(y), jnp.sort(y)

    for k in equality_keys(f, jax.ShapeDtypeStruct((3,), jnp.float64)):
        assert len(np.unique(k)) == k.size


def test_signed_zero_constants_are_told_apart_outside_products():
    # x / c tells c = -0.0 from c = 0.0: an elementwise use keeps them apart.
    const = np.array([0.0, -0.0, 0.0])

    def f(x):
        return x / const

    keys = equality_keys(f, jax.ShapeDtypeStruct((), jnp.float64))
    assert keys[0] == keys[2] != keys[1]
    _assert_sound(keys, f(jnp.float64(1.0)))
    np.testing.assert_array_equal(value_keys(const), [0, 1, 0])


def test_a_value_closed_over_from_a_trace_is_free():
    seen = []

    @jax.jit
    def outer(a):
        seen.append(equality_keys(lambda x: x + a, jax.ShapeDtypeStruct((2,), a.dtype)))
        return a

    outer(jnp.zeros(2))
    assert len(np.unique(seen[0])) == 2


def _plated_model(n_i: int, n_j: int, rng: np.random.Generator):
    import numpyro
    import numpyro.distributions as dist

    # Means with repeats: the states of (g, a, b) that share a mean share a key.
    mu = jnp.asarray(rng.integers(0, 3, size=(3, 2, 2)).astype(float))

    def model(y=None):
        g = numpyro.sample("g", dist.Categorical(jnp.array([0.2, 0.3, 0.5])))
        with numpyro.plate("i", n_i, dim=-2):
            a = numpyro.sample("a", dist.Bernoulli(jnp.where(g == 1, 0.3, 0.6)))
            with numpyro.plate("j", n_j, dim=-1):
                b = numpyro.sample("b", dist.Bernoulli(0.4))
                numpyro.sample("y", dist.Normal(mu[g, a, b], 1.0), obs=y)

    return model, mu


@given(seed=st.integers(0, 10_000))
def test_evidence_table_keys_are_sound_and_find_repeated_means(seed):
    rng = np.random.default_rng(seed)
    model, mu = _plated_model(2, 3, rng)
    y = jnp.asarray(rng.normal(size=(2, 3)))
    fg = compile_model(model, y=y)
    spec = jax.ShapeDtypeStruct(y.shape, y.dtype)
    keys = equality_keys(lambda v: fg.evidence_blocks(y=v)[0], spec)
    assert isinstance(keys, dict) and keys
    for _ in range(3):
        tables = fg.evidence_blocks(y=jnp.asarray(rng.normal(size=(2, 3))))[0]
        for k, key in keys.items():
            _assert_sound(key, tables[k])
            # Tight: one key per distinct mean, in every instance.
            n_means = len(np.unique(np.asarray(mu)))
            for row in np.asarray(key).reshape(key.shape[0], -1):
                assert len(np.unique(row)) == n_means


def test_drm_leaf_tables_have_one_key_per_distinct_value():
    from pgm_drm.models import DeepRenderingModel

    with jax.enable_x64(False):
        drm = DeepRenderingModel.random(
            jax.random.PRNGKey(0), image_shape=(8, 8), levels=3
        )
        images, _ = drm.sample(jax.random.PRNGKey(1), 3)
        fg = compile_model(drm.model, image=images[0])
        spec = jax.ShapeDtypeStruct(images[0].shape, images.dtype)
        keys = equality_keys(lambda v: fg.evidence_blocks(image=v)[0], spec)
        (k,) = keys
        key = np.asarray(keys[k]).reshape(keys[k].shape[0], -1)
        for image in images:
            table = np.asarray(fg.evidence_blocks(image=image)[0][k])
            table = table.reshape(key.shape)
            _assert_sound(key, table)
            for row in range(key.shape[0]):
                # The 768 states of a leaf take a handful of values: all found.
                assert len(np.unique(key[row])) == len(np.unique(table[row])) < 20


def test_a_product_with_signed_zero_columns_keeps_them_apart():
    # (found by review) 1 / (x @ c) is +inf or -inf by the sign of c's zero.
    c = np.array([[0.0, -0.0, 0.0]])

    def f(x):
        return 1.0 / ((jnp.abs(x) + 1.0) @ c)

    keys = equality_keys(f, jax.ShapeDtypeStruct((1, 1), jnp.float64))
    assert keys[0, 0] == keys[0, 2] != keys[0, 1]
    _assert_sound(keys, f(jnp.array([[0.5]])))


def test_constant_prng_keys_are_free_not_an_error():
    # (found by review) numpy cannot hold a PRNG key: its entries claim nothing.
    def f(x):
        return x + jax.random.normal(jax.random.PRNGKey(0), (3,))

    keys = equality_keys(f, jax.ShapeDtypeStruct((3,), jnp.float64))
    assert len(np.unique(keys)) == 3


# --------------------------------------------------------------------------- #
# input_dependence: entries that are the same for every input.
# --------------------------------------------------------------------------- #


def _assert_free_sound(dep: np.ndarray, f, rng, shape) -> None:
    """Entries marked free (``False``) hold the same value at random inputs,
    NaN and inf included (a free entry reads no input at all), bit for bit."""
    outs = [
        np.asarray(f(jnp.asarray(x)))
        for x in (
            rng.normal(size=shape),
            rng.normal(size=shape) * 1e3,
            np.full(shape, np.nan),
            np.full(shape, np.inf),
        )
    ]
    free = ~np.asarray(dep)
    for o in outs[1:]:
        np.testing.assert_array_equal(o[free], outs[0][free])


def test_dependence_follows_known_selectors_and_not_products_with_zero():
    from pgm_drm.graph.keys import input_dependence

    rng = np.random.default_rng(0)
    w = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, 4.0]])  # column 1 is zero
    on = np.array([True, False, True])

    def f(x):
        d = x @ w  # (4, 3): x * 0 is NaN at x = inf, so column 1 is not free
        s = jnp.where(on, d, 7.0)  # a known selector: column 1 is the constant
        r = jnp.sum(s, axis=1)  # reads every column: depends
        c = jnp.concatenate([s, jnp.ones((4, 1))], axis=1)
        return d, s, r, c, jnp.max(s[:, 1:2], axis=1)

    spec = jax.ShapeDtypeStruct((4, 2), jnp.float64)
    d, s, r, c, m = input_dependence(f, spec)
    assert d.all()
    assert (s == on[None, :]).all()
    assert r.all()
    assert (c == np.concatenate([on, [False]])[None, :]).all()
    assert not m.any()
    for i, dep in enumerate((d, s, r, c, m)):
        _assert_free_sound(dep, lambda x, i=i: f(x)[i], rng, (4, 2))


def test_dependence_claims_nothing_for_equations_it_does_not_read():
    from pgm_drm.graph.keys import input_dependence

    def f(x):
        return jnp.cumsum(jnp.zeros(3) + 0.0 * x[0]), jnp.sort(jnp.ones(3))

    a, b = input_dependence(f, jax.ShapeDtypeStruct((2,), jnp.float64))
    assert a.all()  # cumsum is not read: every entry may depend
    assert not b.any()  # constant only: evaluated, free


def _switch_model(family: str, n_c: int, n_a: int, rng: np.random.Generator):
    """``x ~ F(eta = on[a] * w[c])`` over 4 pixels: the states of ``a`` with
    ``on[a] = 0`` render nothing (their natural parameters are zero)."""
    import numpyro
    import numpyro.distributions as dist

    w = jnp.asarray(rng.normal(size=(n_c, 4)))
    on = jnp.asarray((np.arange(n_a) % 2).astype(float))  # a = 0, 2, ... off

    def model(x=None):
        c = numpyro.sample("c", dist.Categorical(jnp.ones(n_c) / n_c))
        a = numpyro.sample("a", dist.Categorical(jnp.ones(n_a) / n_a))
        eta = on[a][..., None] * w[c]
        if family == "normal":
            fn = dist.Normal(eta, 0.7)
        elif family == "bernoulli":
            fn = dist.Bernoulli(logits=eta)
        else:
            fn = dist.Poisson(jnp.exp(eta))
        numpyro.sample("x", fn.to_event(1), obs=x)

    return model


@given(
    seed=st.integers(0, 10_000),
    family=st.sampled_from(["normal", "bernoulli", "poisson"]),
)
def test_switch_off_states_are_free_after_the_gemm_rewrite(seed, family):
    from pgm_drm.graph import gemm
    from pgm_drm.graph.keys import input_dependence

    rng = np.random.default_rng(seed)
    model = _switch_model(family, 3, 2 + seed % 2, rng)
    x = jnp.asarray(rng.integers(0, 2, size=4).astype(float))
    fg = compile_model(model, x=x)
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def tables(v):
        return fg.evidence_blocks(x=v)[0]

    raw = input_dependence(tables, spec)
    rewritten = gemm.dedupe_constant_gemms(tables)
    dep = input_dependence(rewritten, spec)
    assert set(dep) == set(raw) and len(dep) == 1
    (k,) = dep
    # Read as written, x . 0 depends on x; with the zeros explicit, the off
    # states (a even) are free in every instance and the on states are not.
    assert raw[k].all()
    axis_a = 1 + fg.factor_groups[k].scope_sites.index("a")
    per_a = np.moveaxis(dep[k], axis_a, 0).reshape(dep[k].shape[axis_a], -1)
    off = np.arange(per_a.shape[0]) % 2 == 0
    assert not per_a[off].any() and per_a[~off].all()
    # Sound: the free entries are the same at other evidence values, NaN and
    # inf included (a free entry reads no evidence).
    # Run jitted, as infer runs it: the evidence traced, so the rewrite applies
    # (with concrete evidence both operands are known and nothing is rewritten).
    run = jax.jit(rewritten)
    free = ~dep[k]
    first = np.asarray(run(x)[k])
    others = [rng.integers(0, 4, size=4).astype(float) for _ in range(3)]
    for other in others + [np.full(4, np.nan), np.full(4, np.inf)]:
        got = np.asarray(run(jnp.asarray(other))[k])
        np.testing.assert_array_equal(got[free], first[free])
