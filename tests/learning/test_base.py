"""Shared pieces of the RM learners (:mod:`pgm_drm.learning.base`): input checks,
labels, and the single-threaded k-means. The fits' own error messages (which
call these) are tested through ``fit_em`` / ``fit_fa_em`` in their files."""

import jax.numpy as jnp
import numpy as np
import pytest

from pgm_drm.learning.base import check_fit_inputs, check_labels, kmeans, real_finite


def test_check_fit_inputs_returns_float_images_and_int_sizes():
    x, c, g = check_fit_inputs(np.arange(12).reshape(3, 2, 2), 2.0, 3)
    assert x.dtype == jnp.result_type(float) and x.shape == (3, 2, 2)
    np.testing.assert_array_equal(np.asarray(x), np.arange(12).reshape(3, 2, 2))
    assert (c, g) == (2, 3) and type(c) is int and type(g) is int


@pytest.mark.parametrize(
    ("images", "sizes", "match"),
    [
        (np.zeros(4), (2, 2), "pixel axis"),
        (np.zeros((0, 3)), (2, 2), "empty"),
        (np.zeros((2, 3)), (0, 2), "n_classes"),
        (np.zeros((2, 3)), (2, 1.5), "n_nuisances"),
        (np.full((2, 3), np.inf), (2, 2), "NaN or inf"),
        (np.zeros((2, 3), complex), (2, 2), "real numbers"),
    ],
)
def test_check_fit_inputs_rejects(images, sizes, match):
    with pytest.raises(ValueError, match=match):
        check_fit_inputs(images, *sizes)


def test_real_finite_rejects_non_numbers():
    with pytest.raises(ValueError, match="real numbers"):
        real_finite(jnp.zeros(3, bool))
    with pytest.raises(ValueError, match="NaN or inf"):
        real_finite(jnp.array([0.0, jnp.nan]))
    assert real_finite(jnp.arange(3)).dtype == jnp.result_type(float)


def test_check_labels():
    np.testing.assert_array_equal(check_labels(None, 3, 2), [-1, -1, -1])
    y = check_labels(np.array([1.0, -1.0, 0.0]), 3, 2)  # integral floats are fine
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y, [1, -1, 0])
    for labels, match in [
        ([0, 1], "shape"),
        ([0, 1, 1.5], "integers"),
        ([0, np.nan, 1], "integers"),
        ([0, 2, 1], "labels must be in 0..1"),
        ([0, -2, 1], "labels must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_labels(np.asarray(labels), 3, 2)


def test_kmeans_depends_only_on_the_generator():
    """One thread and a seed drawn from ``rng``: two fits from equal generators
    are identical; with fewer distinct rows than ``k`` scikit-learn's
    ConvergenceWarning is silenced (the suite turns warnings into errors)."""
    x = np.random.default_rng(0).normal(size=(60, 3))
    a = kmeans(x, 4, np.random.default_rng(7))
    b = kmeans(x, 4, np.random.default_rng(7))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.cluster_centers_.shape == (4, 3) and a.n_iter_ <= 300
    twins = kmeans(np.repeat(x[:2], 5, axis=0), 4, np.random.default_rng(0))
    assert len(np.unique(twins.labels_)) == 2
