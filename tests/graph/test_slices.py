"""Slice-grouped table evaluation equals the colour evaluator (its naive twin)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pgm_drm.graph.compile as C
from pgm_drm.graph import slices
from pgm_drm.testing import (
    chain_loop_model,
    ising_grid,
    ising_loop_model,
    random_factor_model,
    random_nested_plate_model,
    random_plate_model,
)


def _both(model):
    old = C.GROUP_EQNS
    try:
        C.GROUP_EQNS = 0
        grouped = C.compile_model(model)
        C.GROUP_EQNS = 10**12
        naive = C.compile_model(model)
    finally:
        C.GROUP_EQNS = old
    return grouped, naive


@pytest.mark.parametrize("kind", ["chain", "ising"])
def test_grouped_tables_equal_the_colour_evaluator(kind):
    model = (
        chain_loop_model(12, 3)[0]
        if kind == "chain"
        else ising_loop_model(ising_grid(4))
    )
    grouped, naive = _both(model)
    assert len(grouped._static_tables) == len(naive._static_tables)
    for a, b in zip(grouped._static_tables, naive._static_tables, strict=True):
        # the same ops on the same values: equal up to float round-off
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-12)


def _grouped(model, **kwargs):
    old = C.GROUP_EQNS
    try:
        C.GROUP_EQNS = 0  # every model takes the grouped path
        return C.compile_model(model, **kwargs)
    finally:
        C.GROUP_EQNS = old


@given(
    kind=st.sampled_from(["chain", "ising", "nested", "plate", "factor"]),
    seed=st.integers(0, 10_000),
)
def test_latent_free_values_in_numpy_equal_jax(kind, seed):
    """The numpy rules of the latent-free pass are exact twins of JAX's ops."""
    if kind == "chain":
        model, kwargs = chain_loop_model(8, 3, seed=seed)[0], {}
    elif kind == "ising":
        model, kwargs = ising_loop_model(ising_grid(3, seed=seed)), {}
    elif kind == "nested":
        model, kwargs = random_nested_plate_model(seed)
    elif kind == "plate":
        model, kwargs = random_plate_model(seed)
    else:
        model, kwargs = random_factor_model(seed, kind="loopy", hard_zeros=True)
    fast = _grouped(model, **kwargs)
    mp = pytest.MonkeyPatch()
    mp.setattr(slices, "_NUMPY_RULES", {})
    try:
        naive = _grouped(model, **kwargs)
    finally:
        mp.undo()
    for a, b in zip(fast._static_tables, naive._static_tables, strict=True):
        # The same values into the same compiled programs: bit for bit.
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_numpy_rules_match_xla_on_edge_cases():
    """Cases a reviewer found: an order-F reshape (a reshape with dimensions), a
    float32 compared with a Python-float literal, a subnormal product, negative
    and clamped indices, integer wrap-around."""
    import jax
    import jax.numpy as jnp

    w = jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3)
    x32 = jnp.asarray([0.1, 0.2], jnp.float32)
    tiny = jnp.asarray([1e-40, 1.0], jnp.float32)
    big = jnp.asarray([2**31 - 1], jnp.int32)

    def f():
        return (
            jnp.ravel(w, order="F"),
            x32 > 0.1,
            x32 == 0.1,
            tiny * 1.5,
            jnp.arange(5)[-2],
            w[1],
            w[:, ::2],
            big + 1,
            jnp.where(x32 > 0.15, x32, 0.5),
            x32.astype(jnp.int32),
            jnp.broadcast_to(x32[:, None], (2, 3)),
        )

    closed = jax.make_jaxpr(f)()
    eqns, outs = closed.jaxpr.eqns, closed.jaxpr.outvars
    fast = slices._eval_known(closed, 0, eqns, outs, [])
    naive = slices._eval_known(closed, 0, eqns, outs, [], rules={})
    for v in outs:
        if isinstance(v, slices.Literal):
            continue
        a, b = np.asarray(fast[v]), np.asarray(naive[v])
        assert a.dtype == b.dtype, v
        np.testing.assert_array_equal(a, b)


def test_equal_operations_at_one_level_run_as_one_and_match_op_by_op():
    """A loop's per-site latent-free work (here a Categorical(logits)'s
    normalisation, float ops XLA must compute) is batched: the same operation
    on same-shaped operands at one dependency level runs as one ``vmap``. Each
    result equals the op-by-op naive twin's to 4 ulps, -inf and subnormals
    where they are: at XLA's default optimisation a batch's exp and log are
    vectorised and may round an ulp apart from one small op's (bit for bit at
    make test's -O0)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    logits = [jnp.asarray(rng.normal(size=3), jnp.float32) for _ in range(9)]
    logits[2] = logits[2].at[1].set(-jnp.inf)
    logits[4] = jnp.asarray([1e-39, -1e-40, 0.0], jnp.float32)

    def f():
        return [x - jax.nn.logsumexp(x) for x in logits] + [logits[0] * 2.0]

    closed = jax.make_jaxpr(f)()
    eqns, outs = closed.jaxpr.eqns, closed.jaxpr.outvars
    levels = slices._levels(eqns)
    assert sum(len(lv) for lv in levels) == len(eqns)
    assert len(levels) < len(eqns) / 5  # nine sites' ops share their levels
    fast = slices._eval_known(closed, 0, eqns, outs, [])
    naive = slices._eval_known(closed, 0, eqns, outs, [], rules={})
    for v in outs:
        a, b = np.asarray(fast[v]), np.asarray(naive[v])
        assert a.dtype == b.dtype
        fin = np.isfinite(b)
        np.testing.assert_array_equal(a[~fin], b[~fin])
        np.testing.assert_array_max_ulp(a[fin], b[fin], maxulp=4)
