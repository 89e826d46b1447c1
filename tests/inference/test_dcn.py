"""The DCN-form pass is exact on tree DRMs.

Three independent computations of the same posterior: the vectorised DCN-form
pass, the generic compiler + junction-tree kernel on ``drm.model``, and NumPyro's
enumeration of ``drm.model``; plus a loop-by-loop twin of the DCN pass.
Tolerance 1e-6 (float64): each sums ~100 log-terms of size ~30 in its own order,
so round-off is ~1e-12.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.graph import compile_model
from pgm_drm.inference import dcn_infer, enumerate_exact, infer, naive_dcn_pass
from pgm_drm.models import DeepRenderingModel, grid_to_plates, plates_to_grid
from pgm_drm.testing import log_joint

ATOL = 1e-6


def _plates_map(drm, post_map, b=None):
    out = {}
    for site, v in post_map.items():
        v = np.asarray(v if b is None else v[b])
        if site in ("c", f"g{drm.levels}"):
            out[site] = v
        else:
            out[site] = np.asarray(plates_to_grid(v, drm.windows[int(site[1:]) :]))
    return out


@given(
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([1, 2, 3]),
    t=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_dcn_pass_equals_naive_loop_twin(seed, levels, t):
    side = {1: 3, 2: 6, 3: 8}[levels]
    windows = {1: (3,), 2: (3, 2), 3: (2, 2, 2)}[levels]
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(seed),
        image_shape=(side, side),
        levels=levels,
        windows=windows,
        states=(3,) * levels,
    )
    images, _ = drm.sample(jax.random.PRNGKey(seed + 1), 2)
    out = dcn_infer(drm, images, temperature=t, scores=True)
    for b in range(2):
        post, log_z = naive_dcn_pass(drm, images[b], t)
        np.testing.assert_allclose(out.log_z[b], log_z, atol=ATOL)
        np.testing.assert_allclose(out.class_log_posterior[b], post, atol=ATOL)
    # scores=False (the default) drops the pre-pooling maps only. Without those
    # outputs XLA may fuse the same operations differently: float64 rounding at
    # most (1e-12 absolute on values of order 10-100); integer MAP sites must be
    # identical.
    lean = dcn_infer(drm, images, temperature=t)
    assert lean.scores == () and len(out.scores) == levels
    for a, b in zip(
        jax.tree.leaves(lean._replace(scores=())),
        jax.tree.leaves(out._replace(scores=())),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_dcn_pass_equals_compiled_schedule_and_numpyro(seed):
    # At least 3 levels and 8x8 images (the bound).
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(seed), image_shape=(8, 8), levels=3, states=(3, 2, 2)
    )
    images, _ = drm.sample(jax.random.PRNGKey(100 + seed), 3)
    fg = compile_model(drm.model, image=images[0])
    for semiring in ("max", "sum"):
        out = dcn_infer(drm, images, semiring)
        post = infer(fg, semiring, image=images)
        np.testing.assert_allclose(out.log_z, post.log_z, atol=ATOL)
        np.testing.assert_allclose(
            out.class_log_posterior, post.log_marginals["c"], atol=ATOL
        )
        # The class alone: no downward pass, leaf messages from keyed tables.
        post_c = infer(fg, semiring, marginals="c", image=images)
        np.testing.assert_allclose(out.log_z, post_c.log_z, atol=ATOL)
        np.testing.assert_allclose(
            out.class_log_posterior, post_c.log_marginals["c"], atol=ATOL
        )
        for b in range(images.shape[0]):
            for got in (post, post_c):
                compiled = _plates_map(drm, got.map, b)
                for site, v in compiled.items():
                    np.testing.assert_array_equal(
                        np.asarray(out.map[site][b]), v, err_msg=site
                    )
        # NumPyro's enumeration of this model compiles for ~10 s: each seed
        # checks one semiring against it (both seeds share the structure), the
        # compiled schedule above checks both.
        if semiring != ("max", "sum")[seed]:
            continue
        ref = enumerate_exact(drm.model, image=images[0], semiring=semiring)
        np.testing.assert_allclose(out.log_z[0], ref.log_z, atol=ATOL)
        np.testing.assert_allclose(
            out.class_log_posterior[0], ref.log_marginals["c"], atol=ATOL
        )
        for site, v in _plates_map(drm, ref.map).items():
            np.testing.assert_array_equal(np.asarray(out.map[site][0]), v, err_msg=site)


def test_top_down_map_reconstructs_clean_images(key):
    drm = DeepRenderingModel.default(sigma=0.05)
    images, latents = drm.sample(key, 16)
    out = drm.infer(images, "max", scores=True)
    # Low noise: the class is recovered, the MAP is at least as probable as the
    # true latents under the model's own log-joint, and its rendering is close.
    np.testing.assert_array_equal(out.map["c"], latents["c"])

    def joint(lat, b):
        values = {}
        for site in ["c", "g3", "g2", "a2", "g1", "a1"]:
            v = np.asarray(lat[site][b])
            values[site] = (
                v
                if site in ("c", "g3")
                else grid_to_plates(v, drm.windows[int(site[1:]) :])
            )
        return log_joint(drm.model, values, image=images[b])

    for b in range(4):
        assert joint(out.map, b) >= joint(latents, b) - 1e-9
    recon = np.asarray(drm.render(out.map))
    assert np.max(np.abs(recon - np.asarray(images))) < 0.5
    assert out.messages[0].shape == (16, 6, 6, 5)
    assert out.scores[0].shape == (16, 6, 6, 5, 4)


def test_one_hot_contraction_equals_gather(key):
    """The child layer as a matmul with one-hot templates equals direct indexing,
    including -inf messages (floored, then summed back to -inf or below -1e300)."""
    from pgm_drm.inference.dcn import child_scores_onehot

    drm = DeepRenderingModel.random(key, image_shape=(8, 8), levels=3)
    msgs = jax.random.normal(key, (3, *drm.grid_shape(1), drm.n_states[0] + 1))
    msgs = msgs.at[0, 0, 0, 1].set(-jnp.inf)
    fast = child_scores_onehot(drm, 2, msgs)
    slow = drm.level_scores(2, msgs) - jnp.log(drm.nuisance_priors[1])
    finite = jnp.isfinite(slow)
    # one-hot products are exact; sums of <= w*w terms in another order: ~1e-15
    np.testing.assert_allclose(fast[finite], slow[finite], atol=1e-12)
    assert bool(jnp.all(fast[~finite] < -1e300))
