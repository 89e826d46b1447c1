"""The one DCN-form pass: the argmax-following top-down MAP against its naive
twin, and the one-reduction max/argmax against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pgm_drm.models import DeepRenderingModel
from pgm_drm.models.maxsum import (
    bottom_up,
    bottom_up_argmax,
    max_and_argmax,
    naive_top_down,
    top_down,
)


@given(
    x=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 5)),
        # few distinct values: ties are common, and whole rows of -inf occur
        elements=st.sampled_from([-np.inf, -1.0, 0.0, 2.0]),
    )
)
def test_max_and_argmax_is_max_and_first_argmax(x):
    value, index = max_and_argmax(jnp.asarray(x), -1)
    np.testing.assert_array_equal(value, x.max(axis=-1))
    np.testing.assert_array_equal(index, x.argmax(axis=-1))


@given(seed=st.integers(0, 10_000), levels=st.sampled_from([2, 3]))
def test_top_down_following_argmaxes_equals_naive_twin(seed, levels):
    """Identical MAP, free and with the class clamped (hard EM with labels)."""
    side, windows = {2: (6, (3, 2)), 3: (8, (2, 2, 2))}[levels]
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(seed),
        image_shape=(side, side),
        levels=levels,
        windows=windows,
        states=(3,) * levels,
    )
    images, _ = drm.sample(jax.random.PRNGKey(seed + 1), 4)
    up = bottom_up_argmax(drm, images)
    pooled, messages, scores = bottom_up(drm, images, 0.0)
    # the same pass: pooled scores and messages are equal, not just close
    np.testing.assert_array_equal(up.pooled[-1], pooled)
    for a, b in zip(up.messages, messages, strict=True):
        np.testing.assert_array_equal(a, b)
    class_scores = drm.class_scores(pooled)
    clamped = jnp.where(jnp.arange(class_scores.shape[1]) == 1, class_scores, -jnp.inf)
    for cs in (class_scores, clamped):
        fast = top_down(drm, up, cs)
        naive = naive_top_down(drm, scores, cs)
        for a, b in zip(
            jax.tree_util.tree_leaves(fast),
            jax.tree_util.tree_leaves(naive),
            strict=True,
        ):
            np.testing.assert_array_equal(a, b)
