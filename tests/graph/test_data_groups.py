"""The grouped evaluation of a big model's data part (``_data_groups``).

A loop-written model's evidence-dependent part has one slice per observed site;
``compile_model``'s evaluator runs the slices that share a structure as one
vmapped program, reading evidence reached by data movement alone (``y[i]``)
with one gather. ``GROUP_DATA = False`` is its naive twin (the whole part as
one program); both are held to ``brute_force``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile as compile_mod
from pgm_drm.graph import compile_model
from pgm_drm.inference import brute_force, infer, log_partition


def _hmm(n: int, seed: int):
    """Categorical and Normal emissions per step, a Normal on each pair of
    neighbours, a site reading the whole Normal evidence, and one emission
    inside a plate of 2."""
    rng = np.random.default_rng(seed)
    trans = jnp.asarray(rng.dirichlet(np.ones(3), size=3))
    emit = jnp.asarray(rng.dirichlet(np.ones(4), size=(n, 3)))
    means = jnp.asarray(rng.normal(size=(n, 3)))

    def model(y=None, w=None, v=None):
        x = numpyro.sample("x_0", dist.Categorical(trans[0]))
        for i in range(n):
            if i:
                prev = x
                x = numpyro.sample(f"x_{i}", dist.Categorical(trans[x]))
                # Evidence on a pair of latents: a pair class's tables.
                numpyro.sample(
                    f"u_{i}", dist.Normal(means[i][x] - 0.3 * prev, 1.0), obs=w[i]
                )
            numpyro.sample(f"y_{i}", dist.Categorical(emit[i][x]), obs=y[i])
            numpyro.sample(f"w_{i}", dist.Normal(means[i][x], 0.8), obs=w[i])
        numpyro.factor("s", 0.1 * jnp.sum(w) * x)
        with numpyro.plate("p", 2):
            numpyro.sample("v", dist.Normal(means[0][x], 1.0), obs=v)

    ev = {
        "y": jnp.asarray(rng.integers(0, 4, size=n)),
        "w": jnp.asarray(rng.normal(size=n)),
        "v": jnp.asarray(rng.normal(size=2)),
    }
    return model, ev


@pytest.fixture
def small_groups(monkeypatch):
    # GROUP_EQNS low: the small test models take the big-model paths.
    monkeypatch.setattr(compile_mod, "GROUP_EQNS", 10)


def _both(model, ev, new):
    """log Z, marginals and d log Z / d w on new evidence, grouped and plain."""
    out = []
    for grouped in (True, False):
        compile_mod.GROUP_DATA = grouped
        try:
            fg = compile_model(model, **ev)
            post = infer(fg, "sum", **new)
            lz = log_partition(fg)
            grad = jax.grad(lambda w, lz=lz: lz({**new, "w": w}))(new["w"])
            out.append((fg, post, grad))
        finally:
            compile_mod.GROUP_DATA = True
    return out


# n >= 3: from three steps on, some slices share a structure (at n = 2 each
# structure is alone since event-free Normal sites are scored whole).
@given(seed=st.integers(0, 2**16), n=st.integers(3, 4))
def test_grouped_data_part_equals_the_plain_one_and_brute_force(seed, n):
    old = compile_mod.GROUP_EQNS
    compile_mod.GROUP_EQNS = 10
    try:
        model, ev = _hmm(n, seed)
        _, new = _hmm(n, seed + 1)
        (fg, post, grad), (_, post0, grad0) = _both(model, ev, new)
        groups, _ = next(
            v for k, v in fg._evaluator._staged_cache.items() if k[0] == "groups"
        )
        assert any(len(members) >= 2 for members, _ in groups)  # it did group
    finally:
        compile_mod.GROUP_EQNS = old
    ref = brute_force(model, **new)
    # float64 sums of a few dozen terms: 1e-10 is round-off.
    np.testing.assert_allclose(post.log_z, post0.log_z, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(post.log_z, ref.log_z, rtol=1e-10, atol=1e-10)
    for name in post0.marginals:
        np.testing.assert_allclose(
            post.marginals[name], post0.marginals[name], atol=1e-10
        )
        np.testing.assert_allclose(
            post.marginals[name], ref.marginals[name], atol=1e-10
        )
    np.testing.assert_allclose(grad, grad0, rtol=1e-10, atol=1e-10)


def test_grouped_data_part_under_vmap_over_a_batch(small_groups):
    # A batch of evidence (infer vmaps the evaluator): each image as alone.
    model, ev = _hmm(3, 0)
    fg = compile_model(model, **ev)
    batch = {k: jnp.stack([_hmm(3, s)[1][k] for s in range(4)]) for k in ev}
    post = infer(fg, "sum", **batch)
    for b in range(4):
        one = brute_force(model, **{k: v[b] for k, v in batch.items()})
        # float64: round-off.
        np.testing.assert_allclose(post.log_z[b], one.log_z, rtol=1e-10, atol=1e-10)


def test_grouped_plan_cached_under_one_trace_serves_the_next(small_groups):
    # The groups' plan is built during infer's first (jitted) call and cached;
    # a second call with another semiring traces a new program that reuses it.
    # Its arrays were once tracers of the first trace (UnexpectedTracerError in
    # the pgmpy bench).
    model, ev = _hmm(3, 0)
    _, new = _hmm(3, 1)
    fg = compile_model(model, **ev)
    post = infer(fg, "sum", map=False, **new)
    best = infer(fg, "max", **new)
    lz = log_partition(fg)  # the pure log Z, under a user's jit
    jitted = jax.jit(lambda w: lz({**new, "w": w}))
    ref_sum = brute_force(model, **new)
    ref_max = brute_force(model, semiring="max", **new)
    # float64 sums of a few dozen terms: 1e-10 is round-off.
    np.testing.assert_allclose(post.log_z, ref_sum.log_z, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(jitted(new["w"]), ref_sum.log_z, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(best.log_z, ref_max.log_z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_stacked_residuals_equal_jnp_stack_on_host_and_under_trace(dtype):
    """Concrete residuals are stacked on the host (an eager ``jnp.stack`` of a
    loop-written model's thousand residuals compiled one concatenate of a
    thousand operands); traced ones by ``jnp.stack``: the same array and dtype."""
    xs = [jnp.asarray(np.arange(6).reshape(2, 3) + i, dtype) for i in range(5)]
    expected = jnp.stack(xs)
    got = compile_mod._stack(xs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    traced = jax.jit(lambda *a: compile_mod._stack(list(a)))(*xs)
    assert traced.dtype == expected.dtype
    np.testing.assert_array_equal(traced, expected)
