"""Tree DRM: layout helpers, sampling, rendering, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgm_drm.models import DeepRenderingModel, grid_to_plates, plates_to_grid


@pytest.mark.parametrize("windows", [(2, 2, 2), (4, 3, 2), (3,), (2, 5)])
def test_grid_plate_round_trip(windows):
    side = int(np.prod(windows))
    x = jnp.arange(2 * side * side).reshape(2, side, side)
    p = grid_to_plates(x, windows)
    assert p.shape == (2,) + tuple(w * w for w in windows)
    np.testing.assert_array_equal(plates_to_grid(p, windows), x)
    # Offset 0 of every level is the top-left pixel.
    assert int(p[(0,) + (0,) * len(windows)]) == 0


def test_sample_latents_and_render(key):
    drm = DeepRenderingModel.default(sigma=1e-3)
    images, latents = drm.sample(key, 6)
    assert images.shape == (6, 24, 24)
    assert latents["c"].shape == (6,) and latents["g3"].shape == (6,)
    assert latents["g2"].shape == (6, 2, 2) and latents["a1"].shape == (6, 6, 6)
    assert latents["s1"].shape == (6, 6, 6)
    # Noise sigma = 1e-3: the image is its rendering to ~5 sigma.
    np.testing.assert_allclose(images, drm.render(latents), atol=5e-3)
    # OFF units render nothing.
    off = np.asarray(latents["s1"] == drm.n_states[0])
    patches = np.asarray(drm.render(latents)).reshape(6, 6, 4, 6, 4)
    assert np.all(np.abs(patches.transpose(0, 1, 3, 2, 4)[off]) == 0)


def test_random_model_shapes(key):
    drm = DeepRenderingModel.random(key, image_shape=(16, 16), levels=3)
    assert drm.windows == (4, 2, 2) and drm.image_shape == (16, 16)
    assert drm.n_nuisances == (4, 4, 4)
    assert drm.grid_shape(1) == (4, 4) and drm.grid_shape(3) == (1, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"windows": (2, 0)}, "windows must be >= 1"),
        ({"windows": (2, -1)}, "windows must be >= 1"),
        ({"child_templates": ()}, "need 1 child_templates"),
        ({"child_templates": (np.full((2, 1, 1), 9),)}, "outside 0..3"),
        ({"child_templates": (np.zeros((2, 3, 3), dtype=int),)}, "exceeds window"),
        ({"nuisance_priors": (np.full(4, 0.25), np.full(3, 0.3))}, "nuisance_priors"),
        ({"switch_priors": (1.2,)}, "switch_priors"),
        ({"sigma": 0.0}, "sigma"),
        ({"class_prior": [0.5, 0.6]}, "sum to 1"),
    ],
)
def test_inconsistent_levels_are_named(change, message):
    base = dict(
        windows=(2, 2),
        pixel_templates=np.ones((3, 1, 1)),
        child_templates=(np.zeros((2, 1, 1), dtype=int),),
        class_prior=[0.5, 0.5],
        nuisance_priors=(np.full(4, 0.25), np.full(4, 0.25)),
        switch_priors=(0.9,),
        sigma=0.5,
    )
    with pytest.raises(ValueError, match=message):
        DeepRenderingModel(**{**base, **change})


def test_wrong_image_size_is_named(key):
    drm = DeepRenderingModel.random(key, image_shape=(8, 8), levels=3)
    with pytest.raises(ValueError, match="image has shape"):
        drm.infer(jnp.zeros((2, 16, 16)))
    with pytest.raises(ValueError, match="NaN or inf"):
        drm.infer(jnp.full((8, 8), jnp.nan))
    with pytest.raises(ValueError, match="not divisible"):
        DeepRenderingModel.random(key, image_shape=(10, 10), levels=3)
    with pytest.raises(ValueError, match="prod"):
        DeepRenderingModel.random(key, image_shape=(8, 8), levels=2, windows=(2, 2))


@given(
    seed=st.integers(0, 2**16),
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    t=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([np.float32, np.float64]),
    levels=st.sampled_from([1, 2, 3]),
)
def test_one_bad_pixel_anywhere_is_refused(seed, bad, t, dtype, levels):
    # drm.infer checks the pixels only when a log Z is not finite: one NaN or
    # infinite pixel, in any image of the batch, must still be refused.
    rng = np.random.default_rng(seed)
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(seed), image_shape=(8, 8), levels=levels
    )
    images = np.array(drm.sample(jax.random.PRNGKey(seed + 1), 3)[0], dtype)
    images[rng.integers(3), rng.integers(8), rng.integers(8)] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        drm.infer(images, temperature=t)
    images[np.isnan(images) | np.isinf(images)] = 0.0
    assert np.all(np.isfinite(drm.infer(images, temperature=t).log_z))


def test_finite_pixels_whose_scores_overflow_are_refused_by_name():
    """Pixels near 1e200 are finite but ``||I||^2`` overflows float64 (max 1.8e308):
    log Z was -inf and the class posterior NaN, silently. Refused, naming the
    image; the other images' answers are those of a batch without it."""
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(0), image_shape=(4, 4), levels=2, windows=(2, 2)
    )
    images = np.array(drm.sample(jax.random.PRNGKey(1), 3)[0])
    huge = images.copy()
    huge[1] *= 1e200
    for t in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"images \[1\].*overflowed float64"):
            drm.infer(huge, temperature=t)
        assert np.all(np.isfinite(drm.infer(images, temperature=t).log_z))


def test_integer_images_are_the_float_images():
    """uint8 pixels are converted to the templates' float dtype at the check:
    the pass sees the same float64 numbers, so the output is bitwise equal."""
    drm = DeepRenderingModel.random(
        jax.random.PRNGKey(0), image_shape=(4, 4), levels=2, windows=(2, 2), sigma=60.0
    )
    x = np.random.default_rng(0).integers(0, 256, size=(2, 4, 4)).astype(np.uint8)
    a, b = drm.infer(x, "sum"), drm.infer(x.astype(np.float64), "sum")
    np.testing.assert_array_equal(a.log_z, b.log_z)
    np.testing.assert_array_equal(a.class_log_posterior, b.class_log_posterior)


def test_sample_statistics():
    """``sample`` (jitted Predictive) follows the model: states from c, g, a;
    image = rendering + noise; class and switch frequencies match the priors."""
    drm = DeepRenderingModel.random(jax.random.PRNGKey(1), (8, 8), levels=3)
    images, latents = drm.sample(jax.random.PRNGKey(0), 4000)
    assert images.shape == (4000, 8, 8)
    # unit states follow from c, g, a; the image is the rendering plus noise
    states = drm.unit_states(latents)
    for site, v in states.items():
        np.testing.assert_array_equal(latents[site], v)
    resid = np.asarray(images - drm.render(latents))
    # 4000 * 64 Gaussian residuals: the std is known to ~0.1 %, 1 % is generous
    np.testing.assert_allclose(resid.std(), drm.sigma, rtol=0.01)
    # class frequencies: binomial sd <= sqrt(0.25 / 4000) = 0.008; 4 sd
    freq = np.bincount(np.asarray(latents["c"]), minlength=drm.n_classes) / 4000
    np.testing.assert_allclose(freq, drm.class_prior, atol=0.032)
    on = np.asarray(latents["a1"]).mean()  # 4000 * 16 switches: sd 0.0012
    np.testing.assert_allclose(on, drm.switch_priors[0], atol=0.005)


def test_placement_table_places_every_template_at_every_translation():
    """The traced scatter of placement_table against a loop over translations."""
    drm = DeepRenderingModel.default()
    for level in (1, 2, 3):
        w, t = drm.windows[level - 1], drm.template_sizes[level - 1]
        k = drm.n_states[level - 1]
        src = np.asarray(
            drm.pixel_templates if level == 1 else drm.child_templates[level - 2]
        )
        off = 0 if level == 1 else drm.n_states[level - 2]
        moves = [(dy, dx) for dy in range(w - t + 1) for dx in range(w - t + 1)]
        want = np.full((k + 1, len(moves), w, w), off, dtype=src.dtype)
        for g, (dy, dx) in enumerate(moves):
            want[:k, g, dy : dy + t, dx : dx + t] = src
        got = np.asarray(drm.placement_table(level))
        np.testing.assert_array_equal(got, want.reshape(k + 1, len(moves), w * w))
