"""The DCN pass on convolutional rendering: exact without overlap (vs the compiled
junction tree and NumPyro enumeration), equal to its loop twin with overlap."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.inference import (
    conv_dcn_infer,
    enumerate_exact,
    infer,
    naive_conv_dcn_pass,
)
from pgm_drm.models import ConvRenderingModel
from pgm_drm.testing import examples

# float64 sums of ~100 log-terms of size <= ~1e3: rounding ~1e-12; 1e-6 is the
# project's exactness bar.
ATOL = 1e-6


def _switch_grid(post, n):
    a = jnp.stack([post.map[f"a_{u // n}_{u % n}"] for u in range(n * n)], -1)
    return a.reshape(a.shape[:-1] + (n, n))


# each example compiles a graph and a NumPyro enumeration (~8 s): 2 examples
@settings(max_examples=examples(2))
@given(seed=st.integers(0, 2**16), patch=st.integers(2, 3))
def test_no_overlap_is_exact(seed, patch):
    """stride == patch: the DCN pass is exact max-sum and sum-product."""
    m = ConvRenderingModel.random(
        jax.random.PRNGKey(seed),
        stride=patch,
        patch=patch,
        grid=2,
        sigma=0.8,
        switch_prior=0.7,
    )
    images, _ = m.sample(jax.random.PRNGKey(seed + 1), 3)
    fg = compile_model(m.model, image=images[0])
    for semiring in ("max", "sum"):
        exact = infer(fg, semiring, schedule="exact", image=images)
        dcn = conv_dcn_infer(m, images, semiring)
        np.testing.assert_allclose(dcn.log_z, exact.log_z, atol=ATOL)
        np.testing.assert_allclose(
            dcn.class_log_posterior, exact.log_marginals["c"], atol=ATOL
        )
        if semiring == "max":
            np.testing.assert_array_equal(dcn.map["c"], exact.map["c"])
            np.testing.assert_array_equal(dcn.map["g"], exact.map["g"])
            np.testing.assert_array_equal(dcn.map["a"], _switch_grid(exact, 2))
    ref = enumerate_exact(m.model, semiring="sum", image=images[0])
    np.testing.assert_allclose(dcn.log_z[0], ref.log_z, atol=ATOL)


@given(
    seed=st.integers(0, 2**16),
    stride=st.integers(1, 3),
    t=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_matches_naive_twin(seed, stride, t):
    m = ConvRenderingModel.random(jax.random.PRNGKey(seed), stride=stride, patch=3)
    images, _ = m.sample(jax.random.PRNGKey(seed + 7), 2)
    out = conv_dcn_infer(m, images, temperature=t)
    for i in range(2):
        post, log_z = naive_conv_dcn_pass(m, images[i], t)
        np.testing.assert_allclose(out.class_log_posterior[i], post, atol=ATOL)
        np.testing.assert_allclose(out.log_z[i], log_z, atol=ATOL)


def test_overlap_is_not_exact_but_compiled_graph_is(key):
    """With overlap the true graph has loops: the junction tree still equals NumPyro
    enumeration, while the DCN's independent-patch pass differs from it."""
    m = ConvRenderingModel.random(key, stride=1, patch=2, grid=2, sigma=0.7)
    images, _ = m.sample(jax.random.PRNGKey(5), 2)
    fg = compile_model(m.model, image=images[0])
    assert not fg.is_tree()
    exact = infer(fg, "sum", schedule="exact", image=images)
    ref = enumerate_exact(m.model, semiring="sum", image=images[1])
    np.testing.assert_allclose(exact.log_z[1], ref.log_z, atol=ATOL)
    np.testing.assert_allclose(
        exact.log_marginals["c"][1], ref.log_marginals["c"], atol=ATOL
    )
    dcn = conv_dcn_infer(m, images, "sum")
    # pixels in overlaps are counted once per covering unit: log Z is off by far
    # more than rounding
    assert float(jnp.max(jnp.abs(dcn.log_z - exact.log_z))) > 1e-3
