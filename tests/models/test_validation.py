"""Input checks shared by the models: clear errors, and nothing that a model
accepts may fail later inside NumPyro."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.models import RenderingModel, default_templates
from pgm_drm.models.validation import PRIOR_ATOL, check_images, check_prior


def test_prior_within_tolerance_is_renormalised_and_usable():
    """Sums to 1 + 9e-6: inside PRIOR_ATOL but outside NumPyro's own 1e-6 check,
    which used to fail deep inside the model."""
    rm = RenderingModel(default_templates(), class_prior=[0.5, 0.25, 0.25 + 9e-6])
    # float32 sum of three entries: a few ulps of 1.
    np.testing.assert_allclose(float(jnp.sum(rm.class_prior)), 1.0, atol=1e-6)
    images, latents = rm.sample(jax.random.PRNGKey(0), 3)
    assert images.shape == (3, *rm.image_shape)


@pytest.mark.parametrize(
    ("p", "match"),
    [
        ([0.5, 0.5 + 10 * PRIOR_ATOL], "must sum to 1"),
        ([1.5, -0.5], "negative"),
        ([np.nan, 1.0], "NaN"),
        ([[0.5, 0.5]], "1-d"),
    ],
)
def test_bad_priors_are_refused_by_name(p, match):
    with pytest.raises(ValueError, match=f"class_prior.*{match}|{match}"):
        check_prior(p, "class_prior")


def test_integer_prior_becomes_float():
    assert jnp.issubdtype(check_prior([0, 1], "p").dtype, jnp.floating)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((7, 7)), "shape"),
        (np.ones((6, 6), np.complex64), "complex"),
        (np.full((6, 6), np.nan), "NaN or inf"),
    ],
)
def test_bad_images_are_refused_by_name(x, match):
    with pytest.raises(ValueError, match=match):
        check_images(x, (6, 6))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_integer_and_bool_images_become_the_given_float_dtype(dtype):
    """Integer pixels are converted (uint8 ``x**2`` wraps around); float images,
    the models' usual input, are returned as given (the same array)."""
    x = np.array([[200, 17], [90, 255]]).astype(dtype)
    out, single = check_images(x, (2, 2), dtype=jnp.float32)
    assert single and out.dtype == jnp.float32
    np.testing.assert_array_equal(out[0], x.astype(np.float32))
    default, _ = check_images(x, (2, 2))
    assert default.dtype == jnp.result_type(float)
    f = jnp.asarray(x, jnp.float32)[None]
    assert check_images(f, (2, 2), dtype=jnp.float64)[0] is f
