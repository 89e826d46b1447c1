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
