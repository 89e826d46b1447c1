"""The bottom layer: the temperature reduction and the switch (Eq. 9)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import logsumexp

from pgm_drm.semiring import (
    MIN_TEMPERATURE,
    reduce_t,
    reduce_t_unrolled,
    reduce_t_with,
    resolve_temperature,
    switch_reduce,
)

finite = st.floats(-50, 50, allow_nan=False)


@given(
    x=hnp.arrays(np.float64, (3, 4), elements=finite),
    t=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
)
def test_reduce_t_is_temperature_logsumexp(x, t):
    """Independent numpy/scipy reference; float64 round-off only (1e-10)."""
    got = np.asarray(reduce_t(jnp.asarray(x), (1,), t))
    want = x.max(axis=1) if t == 0 else t * logsumexp(x / t, axis=1)
    np.testing.assert_allclose(got, want, atol=1e-10)


@given(
    x=hnp.arrays(np.float64, (2, 3, 2), elements=st.one_of(finite, st.just(-np.inf))),
    axes=st.sampled_from([(0,), (2,), (0, 2), (1,), (-1,)]),
    t=st.sampled_from([0.0, 0.3, 1.0, 2.5, "traced"]),
)
def test_reduce_t_unrolled_equals_reduce_t(x, axes, t):
    """The elementwise form (few states) against the reduction itself, with -inf
    entries and all -inf rows; the same shift and operations, so float64
    round-off only (1e-12). Gradients too (T > 0): the same softmax weights."""
    xs = jnp.asarray(x)
    if t == "traced":
        got = jax.jit(lambda a, tt: reduce_t_unrolled(a, axes, tt))(xs, 0.7)
        want = reduce_t(xs, axes, 0.7)
    else:
        got, want = reduce_t_unrolled(xs, axes, t), reduce_t(xs, axes, t)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-12)
    if t in (0.3, 1.0) and np.all(np.isfinite(x)):
        g1 = jax.grad(lambda a: jnp.sum(reduce_t_unrolled(a, axes, t)))(xs)
        g2 = jax.grad(lambda a: jnp.sum(reduce_t(a, axes, t)))(xs)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g2), atol=1e-12)


@given(
    level=st.floats(1e3, 1e12),
    t=st.sampled_from([1e-29, 0.3, 0.7, 2.5]),
    seed=st.integers(0, 2**31 - 1),
)
def test_reduce_t_at_a_traced_temperature_holds_at_any_level(level, t, seed):
    """The compiled kernel reduces float32 tables at their own level and any
    T >= MIN_TEMPERATURE: ``x / T`` must not overflow (``-1e10 / 1e-29`` is
    ``-inf`` in float32, which made the whole reduction ``-inf``). The reference
    is float64 on the same float32 values; the result, near ``-level``, is good
    to float32 spacing there (``eps * level``) plus the float32 rounding of the
    O(1) log-sum (1e-5)."""
    rng = np.random.default_rng(seed)
    x = (-level + rng.normal(size=(2, 6))).astype(np.float32)
    got = jax.jit(lambda x, t: reduce_t(x, (1,), t))(jnp.asarray(x), jnp.float32(t))
    want = t * logsumexp(x.astype(np.float64) / t, axis=1)
    tol = np.finfo(np.float32).eps * level + 1e-5
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol)


@given(
    x=hnp.arrays(
        np.float64,
        (3, 2, 4),
        elements=st.one_of(finite, st.just(-np.inf)),
    ),
    extra=hnp.arrays(np.float64, (3,), elements=st.one_of(finite, st.just(-np.inf))),
    t=st.sampled_from([0.0, 0.3, 1.0, 2.5]),
    traced=st.booleans(),
)
def test_reduce_t_with_is_reduce_t_over_one_more_entry(x, extra, t, traced):
    """Against scipy's logsumexp over x's entries and ``extra`` together
    (float64 round-off on entries up to 50 in size: 1e-10, absolute near a
    result of 0); all -inf rows reduce to -inf, and the gradient
    is finite there (its entries' softmax weights, 0 on -inf entries)."""
    both = np.concatenate([x.reshape(3, -1), extra[:, None]], axis=1)
    with np.errstate(divide="ignore"):
        want = both.max(axis=1) if t == 0 else t * logsumexp(both / t, axis=1)
    temp = jnp.asarray(t) if traced and t > 0 else t
    got = np.asarray(reduce_t_with(jnp.asarray(x), (1, 2), jnp.asarray(extra), temp))
    finite_rows = np.isfinite(want)
    np.testing.assert_allclose(
        got[finite_rows], want[finite_rows], rtol=1e-10, atol=1e-10
    )
    assert np.all(np.isneginf(got[~finite_rows]))
    if t > 0:
        g = jax.grad(
            lambda a: jnp.sum(
                jnp.where(
                    finite_rows, reduce_t_with(a, (1, 2), jnp.asarray(extra), temp), 0.0
                )
            )
        )(jnp.asarray(x))
        assert np.all(np.isfinite(np.asarray(g)))


def test_reduce_t_tends_to_max_as_t_falls():
    x = jnp.array([0.0, -1.0, -3.0])
    gaps = [float(reduce_t(x, (0,), t) - 0.0) for t in (1.0, 0.5, 0.25)]
    # T * log(1 + e^{-1/T} + e^{-3/T}) falls to 0 with T.
    assert gaps[0] > gaps[1] > gaps[2] > 0
    assert float(reduce_t(x, (), 1.0)[0]) == 0.0  # no axes: unchanged


@pytest.mark.parametrize(
    ("args", "t"), [(("max", None), 0.0), (("sum", None), 1.0), (("max", 0.5), 0.5)]
)
def test_resolve_temperature(args, t):
    assert resolve_temperature(*args) == t


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("product", None), "semiring"),
        (("sum", -1.0), ">= 0"),
        (("sum", float("nan")), "finite"),
        (("sum", MIN_TEMPERATURE / 10), "too small"),
    ],
)
def test_resolve_temperature_refuses_by_name(args, match):
    with pytest.raises(ValueError, match=match):
        resolve_temperature(*args)


@given(
    x=hnp.arrays(np.float64, (5,), elements=finite),
    p_on=st.floats(0.05, 0.95),
)
def test_switch_reduce_at_t0_is_the_relu(x, p_on):
    """Eq. 9: at T = 0 the ON states' message, less the OFF state's, is
    max(x_s - x_OFF + log(p_on / p_off), 0) (a ReLU), and OFF stays OFF."""
    out = np.asarray(switch_reduce(jnp.asarray(x), p_on, 0.0))
    off = x[-1] + max(np.log(p_on), np.log1p(-p_on))
    relu = np.maximum(x[:-1] - x[-1] + np.log(p_on / (1 - p_on)), 0.0)
    # Direct form: out_s = max(log p_on + x_s, log p_off + x_OFF).
    want_on = np.maximum(np.log(p_on) + x[:-1], np.log1p(-p_on) + x[-1])
    np.testing.assert_allclose(out[:-1], want_on, atol=1e-10)
    np.testing.assert_allclose(out[-1], off, atol=1e-10)
    np.testing.assert_allclose(out[:-1] - (np.log1p(-p_on) + x[-1]), relu, atol=1e-10)


def test_switch_reduce_is_jittable_in_p_on():
    f = jax.jit(lambda p: switch_reduce(jnp.zeros(3), p, 1.0))
    assert f(0.3).shape == (3,)
