"""Products against repeated templates (pgm_drm.graph.gemm) against plain products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax import lax

from pgm_drm.graph import compile_model, gemm
from pgm_drm.graph.gemm import axis_recipe, count_factored, dedupe_constant_gemms
from pgm_drm.inference import infer
from pgm_drm.models import RenderingModel

# The rewritten product takes the same inner products of the same vectors, but in
# a GEMM of other width, whose blocking may sum an entry's terms in another order:
# a few float64 ulps of terms of size ~10 (entries of |x| <= 3 times |w| <= 3 over
# <= 12 terms), far below 1e-10.
ATOL = 1e-10


@st.composite
def products(draw):
    k1 = draw(st.integers(1, 5))
    k2 = draw(st.integers(1, 4))
    p = draw(st.integers(1, 6))
    nb = draw(st.integers(0, 2))
    pat1 = draw(st.lists(st.integers(-1, 2), min_size=k1, max_size=k1))
    pat2 = draw(st.lists(st.integers(-1, 1), min_size=k2, max_size=k2))
    seed = draw(st.integers(0, 2**31 - 1))
    known_rhs = draw(st.booleans())
    return k1, k2, p, nb, pat1, pat2, seed, known_rhs


def _known_matrix(rng, k1, k2, p, nb, pat1, pat2) -> np.ndarray:
    """``(2,) * nb + (k1, k2, p)``: ``w[..., i, j, :]`` is base
    ``(pat1[i], pat2[j])``, or ``-0.0`` (a zero to read as zero) where either
    pattern is negative; the batch slices differ."""
    base = rng.normal(size=(2,) * nb + (3, 2, p))
    w = np.empty((2,) * nb + (k1, k2, p))
    for i, a in enumerate(pat1):
        for j, b in enumerate(pat2):
            w[..., i, j, :] = base[..., a, b, :] if a >= 0 and b >= 0 else -0.0
    return w


@given(products())
def test_factored_product_equals_the_plain_one(case):
    k1, k2, p, nb, pat1, pat2, seed, known_rhs = case
    rng = np.random.default_rng(seed)
    w = _known_matrix(rng, k1, k2, p, nb, pat1, pat2)
    x = jnp.asarray(rng.normal(size=(2,) * nb + (3, p)))
    batch = tuple(range(nb))
    if known_rhs:  # x (batch, 3, p) . w (batch, k1, k2, p) -> (batch, 3, k1, k2)
        dims = (((nb + 1,), (nb + 2,)), (batch, batch))

        def f(x):
            return lax.dot_general(x, w, dims, precision=lax.Precision.HIGHEST)
    else:  # w (batch, k1, k2, p) . x (batch, 3, p) -> (batch, k1, k2, 3)
        dims = (((nb + 2,), (nb + 1,)), (batch, batch))

        def f(x):
            return lax.dot_general(w, x, dims, precision=lax.Precision.HIGHEST)

    want = np.asarray(f(x))
    got = np.asarray(jax.jit(dedupe_constant_gemms(f))(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    # The rewrite happens exactly when it keeps at most 3/4 of the product.
    kept = 1
    for axis in (nb, nb + 1):
        recipe = axis_recipe(w, axis)
        kept *= 1.0 if recipe is None else len(recipe[0]) / w.shape[axis]
    assert count_factored(f, x) == (1 if kept <= gemm.MAX_KEPT_FRACTION else 0)


@given(products(), st.integers(1, 4))
def test_row_deduped_product_equals_the_plain_one(case, n_rows):
    """Known operand's free dims holding ``n_rows`` distinct vectors (and zero
    ones) per batch entry: the product over those, restored by selects
    (``rows=True``), equals the plain product."""
    k1, k2, p, nb, _, _, seed, known_rhs = case
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(2,) * nb + (n_rows, p))
    pick = rng.integers(-1, n_rows, size=(2,) * nb + (k1, k2))  # -1: zero
    w = np.where(
        (pick >= 0)[..., None],
        np.take_along_axis(
            base[..., None, :, :],
            np.maximum(pick, 0).reshape(pick.shape[:-2] + (-1, 1, 1)),
            axis=-2,
        ).reshape(pick.shape + (p,)),
        -0.0,
    )
    x = jnp.asarray(rng.normal(size=(2,) * nb + (3, p)))
    batch = tuple(range(nb))
    if known_rhs:
        dims = (((nb + 1,), (nb + 2,)), (batch, batch))

        def f(x):
            return lax.dot_general(x, w, dims, precision=lax.Precision.HIGHEST)
    else:
        dims = (((nb + 2,), (nb + 1,)), (batch, batch))

        def f(x):
            return lax.dot_general(w, x, dims, precision=lax.Precision.HIGHEST)

    want = np.asarray(f(x))
    got = np.asarray(jax.jit(dedupe_constant_gemms(f, rows=True))(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    if k1 * k2 >= 8:  # at most 4 distinct rows of 8 or more: rewritten by rows
        seen = []

        def probe(x):
            args = (x, w) if known_rhs else (w, x)
            seen.append(gemm._row_dot(*args, {"dimension_numbers": dims}))
            return x

        jax.make_jaxpr(probe)(x)
        assert seen[0] is not None


def test_axis_recipe_reads_minus_zero_as_zero_and_keeps_first_copies():
    w = np.array([[1.0, -2.0], [-0.0, 0.0], [1.0, -2.0], [3.0, 0.0], [0.0, -0.0]])
    assert axis_recipe(w, 0) == ([0, 3], [0, -1, 0, 1, -1])
    assert axis_recipe(w, 1) is None  # two distinct non-zero columns
    assert axis_recipe(np.zeros((3, 2)), 0) == ([0], [-1, -1, -1])


def test_products_with_two_known_or_two_traced_operands_are_left_alone():
    w = np.zeros((4, 3))
    x = jnp.ones((2, 3))
    assert count_factored(lambda x: x @ w.T, x) == 1  # all-zero: one kept slice
    assert count_factored(lambda x: x @ x.T, x) == 0
    assert count_factored(lambda x: jnp.asarray(w) @ w.T + x.sum(), x) == 0


def test_products_inside_nested_jits_are_rewritten():
    w = np.zeros((4, 3))
    w[1] = 1.0

    @jax.jit
    def inner(x):
        return x @ w.T

    x = jnp.arange(6.0).reshape(2, 3)
    assert count_factored(lambda x: inner(x) + 1.0, x) == 1
    np.testing.assert_array_equal(
        jax.jit(dedupe_constant_gemms(lambda x: inner(x) + 1.0))(x), inner(x) + 1.0
    )


@pytest.mark.parametrize("semiring", ["sum", "max"])
def test_rm_infer_is_the_same_with_and_without_the_rewrite(monkeypatch, semiring):
    """The RM's ``a = 0`` states render nothing: half its template match is cut.
    Compared with the same graph run as traced (``gemm.ENABLED = False``)."""
    rng = np.random.default_rng(3)
    rm = RenderingModel(rng.normal(size=(3, 4, 4, 4)), sigma=0.7, switch_prior=0.6)
    images, _ = rm.sample(jax.random.PRNGKey(1), 5)
    rewritten = []

    def spy(*args):
        out = factored(*args)
        rewritten.append(out is not None)
        return out

    factored = gemm._factored_dot
    monkeypatch.setattr(gemm, "_factored_dot", spy)
    posts = []
    for enabled in (True, False):
        monkeypatch.setattr(gemm, "ENABLED", enabled)
        fg = compile_model(rm.model, image=images[0])  # a fresh program cache
        posts.append(infer(fg, semiring, image=images))
    on, off = posts
    assert any(rewritten)  # the template match was cut
    # Same inner products (see ATOL) through a log-sum-exp of 24 states.
    np.testing.assert_allclose(on.log_z, off.log_z, rtol=0, atol=ATOL)
    for site in off.marginals:
        np.testing.assert_allclose(
            on.log_marginals[site], off.log_marginals[site], rtol=0, atol=ATOL
        )
        np.testing.assert_array_equal(on.map[site], off.map[site])
