"""numpy generators seeded from JAX keys (:mod:`pgm_drm._random`)."""

import jax
import numpy as np

from pgm_drm._random import key_data, np_rng


def test_key_data_reads_raw_and_typed_keys_alike():
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(key_data(raw), np.asarray(raw))
    np.testing.assert_array_equal(
        key_data(jax.random.wrap_key_data(raw)), key_data(raw)
    )
    np.testing.assert_array_equal(key_data(None), np.asarray(jax.random.PRNGKey(0)))
    assert key_data(raw).dtype == np.uint32


def test_np_rng_is_a_function_of_the_key():
    a = np_rng(jax.random.PRNGKey(3)).random(5)
    b = np_rng(jax.random.wrap_key_data(jax.random.PRNGKey(3))).random(5)
    c = np_rng(jax.random.PRNGKey(4)).random(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # seeded with the key's two words, as numpy's SeedSequence takes them
    want = np.random.default_rng([0, 3]).random(5)
    np.testing.assert_array_equal(a, want)
